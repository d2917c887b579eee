"""End to end: a whole torchvision Faster R-CNN (fasterrcnn_resnet50_fpn, seeded random weights and
norm statistics: ``fpn_fast.demo.build_detector``) on one photograph bundled with scikit-image
(rocket.jpg, 427x640; the detector's transform resizes it to 800x1199 and pads it to 800x1216), passed
as a one-image list as a service would: torchvision eager, the same model after ``fpn_fast.convert``
(auto backend), and after ``fpn_fast.optimize_for_inference``. float32.

The main job (``python -m fpn_fast``) measures the same rows on all bundled photos with their parity
checks and the backbone's share; this group puts them in the pytest-benchmark run beside the others.
"""
import copy

import pytest
import torch

import fpn_fast
from fpn_fast import ops
from _bench import DEVICES, rounds, run_benchmark

pytest.importorskip("torchvision")  # as the other suites

from fpn_fast import demo  # noqa: E402

MODEL = "fasterrcnn_resnet50_fpn"
VARIANTS = [demo.TORCHVISION, demo.CONVERTED, demo.OPTIMIZED]
_MODELS = {}


def _models(device: str):
    """The three rows' models, one device at a time (they are large)."""
    if device not in _MODELS:
        _MODELS.clear()
        tv = demo.build_detector(MODEL).to(device)
        _MODELS[device] = {demo.TORCHVISION: tv, demo.CONVERTED: fpn_fast.convert(copy.deepcopy(tv)),
                           demo.OPTIMIZED: fpn_fast.optimize_for_inference(tv)}
    return _MODELS[device]


@pytest.mark.parametrize("variant", VARIANTS, ids=[v.replace(" ", "_") for v in VARIANTS])
@pytest.mark.parametrize("device", DEVICES)
def test_detector_end_to_end(benchmark, device, variant):
    model = _models(device)[variant]
    path = demo.bundled_photos()[-1]
    photo = demo.load_image(path).to(device) / 255.0
    benchmark.group = f"detector end-to-end {device} float32 {MODEL} {path.name} {photo.shape[1]}x{photo.shape[2]}"

    def forward():
        with torch.inference_mode(), ops.use_backend("auto"):
            model([photo])
    run_benchmark(benchmark, forward, device, rounds(3, 20, device))
