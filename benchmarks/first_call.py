"""First-call times of the optimized ResNet50-FPN backbone in fresh processes (issue 19).

For each precision (float32 with cuDNN's TF32 off, float32 with it on, bfloat16 autocast) two
child processes run one after the other with the same, initially empty, Triton cache directory:

- cold: nothing compiled yet (Triton compiles every kernel the backbone launches, and every
  measured route is timed); it saves its route choices (``fpn_fast.save_choices``);
- warm: a new process with the Triton cache the cold one left, which loads those choices
  (``fpn_fast.load_choices``) first: what a restarted server sees. It reports how many routes it
  measured all the same (``measured_routes``: 0 expected) and how many choices it loaded.

Each child builds the model and ``optimize_for_inference`` copy (set-up, timed apart), then times
the first call at shape A, a second call at A (steady state, for scale) and the first call at
shape B. Targets on a GPU: warm first call <= 3 s, second shape <= 1 s, cold first call <= 15 s;
a missed target makes the exit status 1 (not in --dry mode, which runs everything on CPU at tiny
sizes so the script itself is exercised by CI).

    python benchmarks/first_call.py --device cuda --json first_call.json
    python benchmarks/first_call.py --dry --json first_call.json
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# PyTorch's default flags (TF32 convolutions) and bfloat16 first: the GPU check may cut the rest.
PRECISIONS = ("float32-tf32", "bfloat16", "float32")
TARGETS_S = {"warm_first_call": 3.0, "second_shape": 1.0, "cold_first_call": 15.0}


def _child(args) -> None:
    import torch

    import fpn_fast
    from fpn_fast.demo import build_models

    device = torch.device(args.device)
    tf32 = args.precision == "float32-tf32"
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    dtype = torch.bfloat16 if args.precision == "bfloat16" else None

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    loaded = fpn_fast.load_choices(args.load_choices) if args.load_choices else 0
    start = time.perf_counter()
    ours, _ = build_models(0, device, torch.contiguous_format)
    optimized = fpn_fast.optimize_for_inference(ours)
    sync()
    setup_s = time.perf_counter() - start

    def call(shape):
        images = torch.randn(shape, device=device)
        sync()
        begin = time.perf_counter()
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype or torch.float32,
                                                    enabled=dtype is not None):
            optimized(images)
        sync()
        return time.perf_counter() - begin

    first = call(args.shape_a)
    steady = call(args.shape_a)
    second_shape = call(args.shape_b)
    from fpn_fast.ops import measure
    measured_routes = sum(d["loaded_from"] is None and d["candidates"][d["chosen"]]["ms"] is not None
                          for d in measure.choices())
    if args.save_choices:
        fpn_fast.save_choices(args.save_choices)
    print("RESULT " + json.dumps(dict(setup_s=setup_s, first_call_s=first, steady_call_s=steady,
                                      second_shape_first_call_s=second_shape, loaded_choices=loaded,
                                      measured_routes=measured_routes)))


def _run_child(precision: str, device: str, cache_dir: str, shape_a, shape_b, choices: list) -> dict:
    env = dict(os.environ, TRITON_CACHE_DIR=cache_dir)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    command = [sys.executable, os.path.abspath(__file__), "--child", "--device", device, "--precision", precision,
               "--shape-a", *map(str, shape_a), "--shape-b", *map(str, shape_b), *choices]
    begin = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - begin
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    if result.returncode != 0 or len(lines) != 1:
        raise RuntimeError(f"first-call child ({precision}) failed with exit {result.returncode}:\n"
                           f"{result.stderr[-3000:]}")
    measured = json.loads(lines[0][len("RESULT "):])
    measured["process_wall_s"] = wall
    return measured


def _write(path, report: dict) -> None:
    """Replace ``path`` with the report so far (written whole, then renamed: never half a file)."""
    if path:
        with open(path + ".tmp", "w") as f:
            json.dump(report, f, indent=1)
        os.replace(path + ".tmp", path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dry", action="store_true", help="CPU, tiny shapes, float32 only, no targets")
    parser.add_argument("--json", help="write every number here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--precision", choices=PRECISIONS, help=argparse.SUPPRESS)
    parser.add_argument("--shape-a", type=int, nargs=4, default=[2, 3, 800, 1216])
    parser.add_argument("--shape-b", type=int, nargs=4, default=[1, 3, 512, 512])
    parser.add_argument("--save-choices", help=argparse.SUPPRESS)
    parser.add_argument("--load-choices", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args)
        return 0
    if args.dry:
        args.device, args.shape_a, args.shape_b = "cpu", [1, 3, 64, 96], [1, 3, 64, 64]
    precisions = ("float32",) if args.dry else PRECISIONS
    report = dict(device=args.device, shape_a=args.shape_a, shape_b=args.shape_b, targets_s=TARGETS_S, runs={},
                  missed=[])
    missed = report["missed"]
    for precision in precisions:
        with tempfile.TemporaryDirectory(prefix="fpn_fast_triton_cache_") as cache_dir:
            runs = report["runs"][precision] = {}
            choices = os.path.join(cache_dir, "choices.json")
            # warm: a new process with the Triton cache and the route choices the cold one left
            for kind, flags in (("cold", ["--save-choices", choices]), ("warm", ["--load-choices", choices])):
                runs[kind] = _run_child(precision, args.device, cache_dir, args.shape_a, args.shape_b, flags)
                _write(args.json, report)  # as it happens: a cut run keeps every finished child
        cold, warm = runs["cold"], runs["warm"]
        checks = {"cold_first_call": cold["first_call_s"], "warm_first_call": warm["first_call_s"],
                  "second_shape": warm["second_shape_first_call_s"]}
        for name, seconds in checks.items():
            if seconds > TARGETS_S[name]:
                missed.append(f"{precision} {name} {seconds:.2f} s > {TARGETS_S[name]} s")
        if warm["measured_routes"]:
            missed.append(f"{precision} the warm process measured {warm['measured_routes']} routes with "
                          f"{warm['loaded_choices']} choices loaded (0 expected)")
        _write(args.json, report)
        print(f"{precision:13s} set-up {warm['setup_s']:6.2f} s | first call cold {cold['first_call_s']:6.2f} s, "
              f"warm {warm['first_call_s']:6.2f} s | second shape cold {cold['second_shape_first_call_s']:6.2f} s, "
              f"warm {warm['second_shape_first_call_s']:6.2f} s | steady {warm['steady_call_s'] * 1e3:8.2f} ms | "
              f"choices: {cold['measured_routes']} measured, {warm['loaded_choices']} loaded, "
              f"{warm['measured_routes']} measured again",
              flush=True)
    for line in missed:
        print("TARGET MISSED: " + line)
    return 1 if missed and not args.dry else 0


if __name__ == "__main__":
    sys.exit(main())
