"""Short table from a pytest-benchmark JSON: group, name, median, ratio against the group's eager
baseline (torchvision eager / eager / eager max_pool2d / torchvision; >1 means faster, from the medians), the
minimum (the least disturbed run on a shared machine) and % of copy bandwidth.
Groups that hold a second reference get a second ratio against it, named after the group: the
compiled torchvision (max-autotune, else default mode), or the unfused op a fused kernel replaces.
Peak-memory groups show the peak instead, and their ratio is the fraction of the baseline's peak.

Also reads the JSON of benchmarks/headline.py (the headline table: one column per group, one
row per variant, then the ratios of fpn_fast optimized against the best torch.compile row and
torchvision eager), of benchmarks/first_call.py (first-call times per precision, finished
children only) and of the main job (``python -m fpn_fast --json``: its speed-ups and first-call
time).

Usage: python benchmarks/summarize.py bench.json
       python benchmarks/summarize.py --check-headline summary.txt   (the GPU check's dry run: exit 1
       unless the summary opens with the headline table, with its rows, in float32 and bfloat16)
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
    if "groups" in data:
        headline(data)
        return
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


HEADLINE_TITLE = "## headline: fpn_fast optimized vs torchvision eager and torch.compile"


def headline(data: dict) -> None:
    """The headline table (benchmarks/headline.py): rows are variants, columns groups."""
    groups = data["groups"]
    print(f"{HEADLINE_TITLE} ({data['device']}, torch {data['torch']}, dry run: {data['dry']})")
    if not groups:
        print("  no group finished")
        return
    size = "x".join(map(str, groups[0]["size"]))
    print(f"median ms per call, 3x{size} images; ratios > 1: fpn_fast optimized is faster")
    names = [f"{g['group']}" for g in groups]
    width = max(16, *map(len, names))
    print(f"{'':<28}" + "".join(f"{name:>{width + 2}}" for name in names))
    variants = []
    for g in groups:
        variants += [name for name in list(g["rows"]) + list(g["errors"]) if name not in variants]
    for name in variants:
        cells = []
        for g in groups:
            row = g["rows"].get(name, {})
            cells.append(f"{row['median_ms']:.2f}" if "median_ms" in row else ("FAILED" if name in g["errors"] else "-"))
        print(f"{name:<28}" + "".join(f"{cell:>{width + 2}}" for cell in cells))

    def ratio(g, key):
        return f"{g[key]:.2f}x" if key in g else "-"
    print(f"{'optimized vs best compile':<28}" + "".join(f"{ratio(g, 'vs_best_peer'):>{width + 2}}" for g in groups))
    print(f"{'  (best compile row)':<28}" + "".join(f"{str(g.get('best_peer', '-')).replace('compile ', ''):>{width + 2}}"
                                                   for g in groups))
    print(f"{'optimized vs eager':<28}" + "".join(f"{ratio(g, 'vs_eager'):>{width + 2}}" for g in groups))
    host = [g["rows"].get("fpn_fast optimized", {}).get("host_us") for g in groups]
    print(f"{'optimized host us/call':<28}" + "".join(f"{h:>{width + 2}.1f}" if h is not None else f"{'-':>{width + 2}}"
                                                      for h in host))
    first = [g["rows"].get("fpn_fast optimized", {}).get("first_call_s") for g in groups]
    print(f"{'optimized first call s':<28}" + "".join(f"{f:>{width + 2}.2f}" if f is not None else f"{'-':>{width + 2}}"
                                                      for f in first))
    for g in groups:
        graphs = [f"{p.get('graph')}" + (f" ({p.get('reason')})" if p.get("reason") else "") for p in g.get("plans", [])]
        parity = g.get("parity", {})
        worst = max(parity.values()) if parity else None
        print(f"  {g['group']}: plans' graphs {graphs}; parity (max error / level max) "
              f"{'-' if worst is None else f'{worst:.1e}'}; errors {list(g['errors']) or 'none'}")
        routes = g.get("routes")
        if isinstance(routes, dict):
            print(f"    routes (steps per op: route): {routes.get('counts')}")


def _first_calls(data: dict) -> None:
    print(f"first calls on {data['device']}, shape A {data['shape_a']}, B {data['shape_b']} (targets {data['targets_s']})")
    for precision, run in data["runs"].items():
        cold, warm = run.get("cold"), run.get("warm")
        if warm is None:  # the run was cut after the cold child
            print(f"  {precision:<13} first call cold {cold['first_call_s']:.2f} s (warm: not run)" if cold else
                  f"  {precision:<13} not run")
            continue
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


HEADLINE_ROWS = ("torchvision eager", "torchvision channels_last", "compile default", "compile reduce-overhead",
                 "fpn_fast optimized")


def check_headline(path: str) -> int:
    """0 if the GPU check's summary opens with the headline table (its second line, after the
    run's own line) holding every row of HEADLINE_ROWS with a number in a float32 and in a
    bfloat16 column; else 1, saying what is missing."""
    with open(path) as f:
        lines = f.read().splitlines()
    problems = []
    if len(lines) < 2 or not lines[1].startswith(HEADLINE_TITLE):
        problems.append(f"its second line is not {HEADLINE_TITLE!r}")
    else:
        header = next((line.split() for line in lines[2:6] if "b1-" in line or "b2-" in line), [])
        columns = {"float32": [i for i, g in enumerate(header) if g.endswith(("fp32", "tf32"))],
                   "bfloat16": [i for i, g in enumerate(header) if g.endswith("bf16")]}
        for precision, found in columns.items():
            if not found:
                problems.append(f"no {precision} column")
        for name in HEADLINE_ROWS:
            row = next((line[len(name):].split() for line in lines if line.startswith(name + " ")), None)
            if row is None:
                problems.append(f"no row {name!r}")
                continue
            for precision, found in columns.items():
                if not any(i < len(row) and _is_number(row[i]) for i in found):
                    problems.append(f"row {name!r} has no {precision} number")
    for problem in problems:
        print(f"FAILED: summary.txt: {problem}")
    return 1 if problems else 0


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


if __name__ == "__main__":
    if sys.argv[1] == "--check-headline":
        sys.exit(check_headline(sys.argv[2]))
    summarize(sys.argv[1])
