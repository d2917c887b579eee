"""Short table from a pytest-benchmark JSON: group, name, median, ratio against the group's eager
baseline (torchvision eager / eager / eager max_pool2d / torchvision; >1 means faster, from the medians), the
minimum (the least disturbed run on a shared machine) and % of copy bandwidth.
Groups that hold a second reference get a second ratio against it, named after the group: the
compiled torchvision (max-autotune, else default mode), or the unfused op a fused kernel replaces.
Peak-memory groups show the peak instead, and their ratio is the fraction of the baseline's peak.

Also reads the JSON of benchmarks/first_call.py (first-call times per precision) and of the main
job (``python -m fpn_fast --json``: its speed-ups and first-call time).

Usage: python benchmarks/summarize.py bench.json
"""
import json
import sys

BASELINES = ("torchvision eager", "eager max_pool2d", "eager", "torchvision")
SECOND_REFERENCES = ("torchvision max-autotune", "torchvision compiled", "extension unfused")


def _label(bench) -> str:
    return bench["params"]["variant"] if bench.get("params") and "variant" in bench["params"] else bench["name"]


def summarize(path: str) -> None:
    with open(path) as f:
        data = json.load(f)
    if "runs" in data:
        _first_calls(data)
        return
    if "mode" in data:
        _main_job(data)
        return
    groups = {}
    for bench in data["benchmarks"]:
        groups.setdefault(bench["group"], []).append(bench)
    info = data.get("machine_info", {})
    print(f"{info.get('cpu', {}).get('brand_raw', '')}  {data.get('datetime', '')}")
    print(f"{'group / variant':<64} {'median/call':>11} {'min/call':>11} {'vs eager':>9} {'vs 2nd':>7} "
          f"{'% copy bw':>10}")
    for group in sorted(groups, key=str):
        rows = groups[group]
        by_label = {_label(b): b for b in rows}
        base = next((by_label[name] for name in BASELINES if name in by_label), None)
        second = next((name for name in SECOND_REFERENCES if name in by_label), None)
        print(group + (f"  (vs 2nd = vs {second})" if second else ""))
        for label in sorted(by_label):
            b = by_label[label]
            extra = b.get("extra_info", {})
            median, fastest = (b["stats"][k] / extra.get("calls_per_round", 1) for k in ("median", "min"))
            pct, memory = extra.get("pct_copy_bandwidth"), extra.get("peak_mib")
            if base is None:
                ratio = ""
            elif memory is not None:
                ratio = f"{memory / base['extra_info']['peak_mib']:.2f} mem"
            else:
                ratio = f"{base['stats']['median'] / b['stats']['median']:.2f}x"
            ratio2 = f"{by_label[second]['stats']['median'] / b['stats']['median']:.2f}x" if second else ""
            tail = f"{pct:.0f}%" if pct is not None else (f"{memory:.0f} MiB" if memory is not None else "")
            print(f"  {label:<62} {_fmt(median):>11} {_fmt(fastest):>11} {ratio:>9} {ratio2:>7} {tail:>10}")


def _first_calls(data: dict) -> None:
    print(f"first calls on {data['device']}, shape A {data['shape_a']}, B {data['shape_b']} (targets {data['targets_s']})")
    for precision, run in data["runs"].items():
        cold, warm = run["cold"], run["warm"]
        print(f"  {precision:<13} first call cold {cold['first_call_s']:.2f} s, warm {warm['first_call_s']:.2f} s; "
              f"second shape warm {warm['second_shape_first_call_s']:.2f} s; steady {_fmt(warm['steady_call_s'])}; "
              f"set-up {warm['setup_s']:.2f} s")
    for line in data.get("missed", []):
        print("  TARGET MISSED: " + line)


def _main_job(data: dict) -> None:
    print(f"main job ({data['mode']}): speed-ups {json.dumps(data.get('speedups'))}; "
          f"vs compiled {json.dumps(data.get('speedups_vs_compiled'))}; "
          f"optimized first call {data.get('optimized_first_call_s')}; failures {json.dumps(data.get('failures'))}")


def _fmt(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.1f} us"


if __name__ == "__main__":
    summarize(sys.argv[1])
