import os

import pytest
import torch

# The Triton kernels run on CPU tensors only through the interpreter, which must be
# switched on before triton (and so fpn_fast.ops) is imported. With a GPU the kernels
# are compiled for real and the CPU-tensor Triton tests are skipped.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_and_restore_backend():
    import fpn_fast.ops as ops

    torch.manual_seed(0)
    previous = ops.get_backend()
    yield
    ops.set_backend(previous)
