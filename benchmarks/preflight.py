"""The GPU check's preflight: every package and fpn_fast backend its later steps need, one line
each, before any of them runs. A missing one is named here once, instead of failing every later
step at once.

    python benchmarks/preflight.py --device cuda     # exit 1 if something required is missing

Required: torch, torchvision, fpn_fast and its benchmark harness (fpn_fast.demo), pytest and
pytest-benchmark; on CUDA also a visible GPU, Triton, the extension's CUDA kernels, and one fused
top-down step per backend that agrees with the reference. Optional (a note, the steps adapt):
pytest-xdist (tests run in one process), tqdm (the main job's progress bars).
"""
import argparse
import importlib
import sys

REQUIRED = ("torch", "torchvision", "fpn_fast", "fpn_fast.demo", "pytest", "pytest_benchmark")
OPTIONAL = {"xdist": "the tests run in one process", "tqdm": "the main job (progress bars) fails"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    missing = []

    def check(name: str, ok: bool, detail: str = "", required: bool = True) -> None:
        print(f"{'ok' if ok else ('MISSING' if required else 'note'):8} {name}{': ' + detail if detail else ''}")
        if not ok and required:
            missing.append(name)

    for module in REQUIRED:
        try:
            importlib.import_module(module)
            check(module, True)
        except Exception as error:  # an import can fail in more ways than ImportError
            check(module, False, f"{type(error).__name__}: {error}")
    for module, consequence in OPTIONAL.items():
        try:
            importlib.import_module(module)
            check(module, True)
        except ImportError:
            check(module, False, consequence, required=False)
    if "torch" in missing or "fpn_fast" in missing:
        return 1
    import torch

    if args.device == "cuda":
        check("CUDA GPU", torch.cuda.is_available(),
              torch.cuda.get_device_name() if torch.cuda.is_available() else "torch.cuda.is_available() is False")
        try:
            import triton
            check("triton", True, triton.__version__)
        except ImportError as error:
            check("triton", False, str(error))
    if not missing:
        from fpn_fast import ops
        from fpn_fast.ops import reference
        backends = ops.available_backends()
        wanted = ("extension", "triton") if args.device == "cuda" else ("extension",)
        for backend in wanted:
            reason = backends[backend][args.device]
            check(f"fpn_fast backend {backend} on {args.device}", reason is None, reason or "")
            if reason is not None:
                continue
            generator = torch.Generator().manual_seed(0)
            lateral = torch.randn(2, 8, 13, 21, generator=generator).to(args.device)
            top = torch.randn(2, 8, 7, 11, generator=generator).to(args.device)
            bias = torch.randn(8, generator=generator).to(args.device)
            with ops.use_backend(backend):
                out = ops.upsample_add(lateral, top, bias)
            same = bool(torch.equal(out, reference.upsample_add(lateral, top, bias)))
            check(f"upsample_add under {backend} on {args.device} equals the reference", same)
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
