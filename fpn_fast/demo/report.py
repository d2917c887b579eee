"""Text and PNG reports of the main job's results (``python -m fpn_fast``): those of
:mod:`fpn_fast.demo.backbone_job` and :mod:`fpn_fast.demo.detector_job`.

matplotlib is imported only to write a PNG.
"""
import sys
from typing import Dict, List, Optional

import torch

from .common import COMPILED, OPTIMIZED, TORCHVISION

# Detections drawn on the photos: those scoring at least this, at most this many per photo.
DRAW_SCORE = 0.5
DRAW_MAX = 30


def _writer(out):
    def say(line: str = "") -> None:
        print(line, file=out or sys.stdout)  # looked up per call: sys.stdout may be replaced after import
    return say


def _header(result: Dict[str, object], say) -> None:
    v = result["machine"]["versions"]
    say(f"fpn_fast {v['fpn_fast']}  torch {v['torch']}  torchvision {v['torchvision'] or '(not installed)'}  "
        f"triton {v['triton'] or '(not installed)'}")


def _device_line(result: Dict[str, object]) -> str:
    m = result["machine"]
    return f"device {m['device']} ({m['gpu'] or m['cpu']}, {m['torch_threads']} threads)"


def _failures(result: Dict[str, object], say) -> None:
    for label, error in result["failures"].items():
        say(f"  FAILED {label}: {error}")


def print_backbone(result: Dict[str, object], out=None) -> None:
    """Print the backbone job's report: backends, pyramid shapes, differences, timings.

    Args:
        result: :func:`fpn_fast.demo.backbone_job.run_backbone`'s result.
        out: a text stream (stdout when None).
    """
    say = _writer(out)
    m, c = result["machine"], result["config"]
    _header(result, say)
    say(f"{_device_line(result)}  batch {c['batch']}  image {c['size'][0]}x{c['size'][1]}  "
        f"{c['dtype']}{'  channels_last' if c['channels_last'] else ''}")

    say("\nBackends")
    for name, b in result["backends"].items():
        say(f"  {name:<10} {'available' if b['available'] else 'unavailable: ' + b['reason']}")

    say("\nPyramid")
    for level, shape in result["pyramid"].items():
        say(f"  {level:<5} {' x '.join(map(str, shape))}")

    say("\nLargest difference of the backbone output (abs, and abs / max|reference|)")
    say(f"  {'variant':<12} {'vs torch reference':>24} {'vs torchvision':>24}")
    for name, d in result["diffs"].items():
        cells = [f"{x['abs']:.2e} ({x['rel']:.1e} rel)" if x else "n/a"
                 for x in (d["vs_reference"], d["vs_torchvision"])]
        say(f"  {name:<12} {cells[0]:>24} {cells[1]:>24}")
    parity = result["parity"]
    if parity:
        checks = ", ".join(f"{against.replace('_', ' ')} {'yes' if ok else 'NO'} "
                           f"({result['diffs']['optimized'][against]['level_rel']:.1e})"
                           for against, ok in parity["within"].items())
        say(f"  optimized within {parity['bound']:g} of each level's largest value (worst level): {checks}")
        if not parity["applies"]:
            say("    (that bound is one of IEEE float32; this run has low precision or TF32 convolutions)")
    if not result["torchvision"]:
        say("  torchvision is not installed: no comparison with it, and no torchvision timings")
    _failures(result, say)

    setup = []
    if result["compile_s"]:
        setup.append(f"{COMPILED}: compile (first call) " + ", ".join(
            f"{part} {seconds:.1f} s" for part, seconds in result["compile_s"].items()) + ", outside the timings")
    if result["optimized_first_call_s"] is not None:
        on_gpu = m["device"].startswith("cuda")
        setup.append(f"{OPTIMIZED}: first call {result['optimized_first_call_s']:.2f} s, nothing compiled ahead"
                     + (" (it compiles and autotunes the Triton lateral kernel)" if on_gpu else ""))
    if setup:
        say()
        for line in setup:
            say(line)

    vs_compiled = result["speedups_vs_compiled"]
    say(f"\nTimings, ms: median [min - max] of {c['repeats']} runs after {c['warmup']} warm-up; "
        f"speed-up = {result['speedup_baseline']} median / median")
    header = f"  {'part':<9} {'variant':<24} {'median':>10} {'min - max':>21} {'speed-up':>9}"
    say(header + (f" {'vs max-autotune':>15}" if vs_compiled else ""))
    for part, rows in result["timings"].items():
        for label, t in rows.items():
            spread = f"{t['min'] * 1e3:.1f} - {t['max'] * 1e3:.1f}"
            speedup = result["speedups"][part][label]
            line = (f"  {part:<9} {label:<24} {t['median'] * 1e3:>10.1f} {spread:>21} "
                    f"{f'{speedup:.2f}x' if speedup else 'n/a':>9}")
            say(line + (f" {vs_compiled[part][label]:>14.2f}x" if vs_compiled else ""))
    say(f"\nruntime {result['runtime_s']:.1f} s")


def _fmt(value: Optional[float], spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def print_detector(result: Dict[str, object], out=None) -> None:
    """Print the detector job's report: photos, pyramid and detection parity, end-to-end timings.

    Args:
        result: the first item of :func:`fpn_fast.demo.detector_job.run_detector`'s return value.
        out: a text stream (stdout when None).
    """
    say = _writer(out)
    c = result["config"]
    _header(result, say)
    weights = (f"weights {c['weights']} ({c['weights_kind']} checkpoint)" if c["weights"]
               else f"random weights and norm statistics (seed {c['seed']})")
    say(f"model {c['model']}, {c['num_classes']} classes, {weights}")
    say(f"{_device_line(result)}  {c['dtype']}  batch {c['batch']}  min_size {c['min_size']}  "
        f"max_size {c['max_size']}  fpn_fast backend {c['backend']}")

    say(f"\nPhotos ({len(result['images'])}): original HxW -> resized by the detector's transform")
    for row in result["images"]:
        say(f"  {row['name']:<28} {row['size'][0]:>5}x{row['size'][1]:<5} -> {row['resized'][0]}x{row['resized'][1]}")

    say(f"\nPyramid vs {TORCHVISION}: max|difference| / max|{TORCHVISION}| per level, worst photo")
    levels = list(next(iter(result["pyramid"].values()), {}))
    say(f"  {'variant':<26}" + "".join(f"{level:>10}" for level in levels) + "   within bound")
    parity = result["parity"]
    for label, worst in result["pyramid"].items():
        verdict = "yes" if parity["within"][label] else "NO"
        say(f"  {label:<26}" + "".join(f"{worst[level]:>10.1e}" for level in levels) + f"   {verdict}")
    say(f"  (bound {parity['bound']:g}" + (")" if parity["applies"] else
                                          "; it is one of IEEE float32: not enforced for this run)"))

    say(f"\nDetections vs {TORCHVISION} (greedy matching at IoU >= {c['match_iou']}, all photos)")
    say(f"  {'variant':<26} {'tv':>5} {'ours':>5} {'matched':>8} {'unmatched tv/ours':>18} {'min IoU':>9} "
        f"{'mean IoU':>9} {'max |dscore|':>13} {'label diffs':>12}")
    for label, d in result["detections"].items():
        say(f"  {label:<26} {d['reference']:>5} {d['other']:>5} {d['matched']:>8} "
            f"{str(d['unmatched_reference']) + '/' + str(d['unmatched_other']):>18} {_fmt(d['min_iou'], '.4f'):>9} "
            f"{_fmt(d['mean_iou'], '.4f'):>9} {_fmt(d['max_score_diff'], '.1e'):>13} {d['label_mismatches']:>12}")
    if c["weights_kind"] != "detector":
        say(f"  ({'random weights' if not c['weights'] else 'random heads'}: the detections are not meaningful "
            "objects; they are compared as computed)")
    _failures(result, say)

    n = len(result["images"])
    say(f"\nEnd to end: median of {c['repeats']} passes over the {n} photos (rows in turn) after {c['warmup']} "
        f"warm-up (first calls in an untimed check pass); speed-up = {TORCHVISION} median / median")
    vs_compiled = result["speedups_vs_compiled"]
    say(f"  {'variant':<26} {'ms/image':>9} {'images/s':>9} {'backbone ms':>12} {'share':>6} "
        f"{'speed-up':>9} {'backbone':>9} {'first call s':>13}" + (f" {'vs max-autotune':>16}" if vs_compiled else ""))
    for label, t in result["timings"].items():
        s = result["speedups"][label]
        line = (f"  {label:<26} {t['per_image_ms']:>9.0f} {t['images_per_s']:>9.2f} "
                f"{t['backbone_per_image_ms']:>12.0f} {t['backbone_share']:>6.0%} {s['detector']:>8.2f}x "
                f"{s['backbone']:>8.2f}x {t['first_call_s']:>13.2f}")
        say(line + (f" {vs_compiled[label]['detector']:>15.2f}x" if vs_compiled else ""))
    say("  backbone's first call per padded input shape (each a new plan for the optimized row):")
    for label, t in result["timings"].items():
        shapes = t.get("backbone_first_call_s") or {}
        say(f"    {label:<24} " + ", ".join(f"{shape} {seconds:.2f} s" for shape, seconds in shapes.items()))
    say(f"\nruntime {result['runtime_s']:.1f} s")


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _bars(ax, groups: List[str], series: Dict[str, List[float]], ylabel: str) -> None:
    width = 0.8 / len(series)
    for i, (label, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        ax.bar_label(ax.bar(xs, values, width, label=label), fmt="%.2fx", fontsize=8)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1.3 * max(max(values) for values in series.values()))  # room for the legend
    ax.legend(fontsize=8, loc="upper left", ncols=len(series))


def write_backbone_png(result: Dict[str, object], path: str) -> None:
    """Write the backbone job's speed-up bars (neck and whole backbone, per variant) as a PNG.

    Args:
        result: :func:`fpn_fast.demo.backbone_job.run_backbone`'s result, with a speed-up baseline.
        path: the PNG file.
    """
    plt = _pyplot()
    parts = list(result["speedups"])
    labels = list(result["speedups"][parts[0]])
    fig, ax = plt.subplots(figsize=(7, 4))
    _bars(ax, parts, {label: [result["speedups"][part][label] for part in parts] for label in labels},
          f"speed-up vs {result['speedup_baseline']}")
    c, m = result["config"], result["machine"]
    ax.set_title(f"ResNet50-FPN, batch {c['batch']}, {c['size'][0]}x{c['size'][1]}, {c['dtype']}, "
                 f"{m['gpu'] or m['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _drawn(photo: torch.Tensor, detections: Dict[str, torch.Tensor], categories: Optional[List[str]]) -> torch.Tensor:
    from torchvision.utils import draw_bounding_boxes
    keep = (detections["scores"] >= DRAW_SCORE).nonzero().flatten()[:DRAW_MAX]
    labels = [f"{categories[int(label)] if categories else int(label)} {float(score):.2f}"
              for label, score in zip(detections["labels"][keep], detections["scores"][keep])]
    width = max(1, round(max(photo.shape[1:]) / 250))
    return draw_bounding_boxes(photo, detections["boxes"][keep], labels=labels, colors="yellow", width=width)


def write_detector_png(result: Dict[str, object], pictures: Dict[str, object], path: str) -> None:
    """Write the detector job's PNG report.

    Top: the end-to-end and backbone speed-ups of each variant over torchvision eager. Then one
    row per kept photo: the photo, its pyramid levels as heat maps (mean |activation| over the
    256 channels, the padding cropped off), and with a checkpoint (``--weights``) the detections
    scoring at least ``DRAW_SCORE`` of torchvision eager beside those of fpn_fast.

    Args:
        result: the first item of :func:`fpn_fast.demo.detector_job.run_detector`'s return value.
        pictures: its second item.
        path: the PNG file.
    """
    plt = _pyplot()
    photos = pictures["photos"]
    with_detections = result["config"]["weights"] is not None
    levels = list(photos[0]["heat_maps"]) if photos else []
    columns = 1 + len(levels) + (2 if with_detections else 0)
    ratios = [1.0] + [0.45] * len(levels) + ([1.0, 1.0] if with_detections else [])
    fig = plt.figure(figsize=(2.2 * sum(ratios) + 1, 3.2 + 2.0 * len(photos)))
    grid = fig.add_gridspec(1 + len(photos), columns, width_ratios=ratios,
                            height_ratios=[1.3] + [1.0] * len(photos))
    ax = fig.add_subplot(grid[0, :])
    labels = list(result["speedups"])
    _bars(ax, ["whole detector", "backbone"],
          {label: [result["speedups"][label]["detector"], result["speedups"][label]["backbone"]] for label in labels},
          f"speed-up vs {TORCHVISION}")
    c, m = result["config"], result["machine"]
    per_image = ", ".join(f"{label} {t['per_image_ms']:.0f} ms" for label, t in result["timings"].items())
    ax.set_title(f"{c['model']} on {len(result['images'])} photos, min_size {c['min_size']}, batch {c['batch']}, "
                 f"{c['dtype']}, {m['gpu'] or m['cpu']}\nper image: {per_image}", fontsize=9)
    for row, entry in enumerate(photos, start=1):
        image_ax = fig.add_subplot(grid[row, 0])
        image_ax.imshow(entry["photo"].permute(1, 2, 0).numpy())
        image_ax.set_title(entry["name"], fontsize=8)
        image_ax.axis("off")
        image_row = next(r for r in result["images"] if r["name"] == entry["name"])
        for col, level in enumerate(levels, start=1):
            level_ax = fig.add_subplot(grid[row, col])
            level_ax.imshow(entry["heat_maps"][level].numpy(), cmap="magma")
            rel = image_row["pyramid"].get(entry["heat_maps_of"], {}).get(level, {}).get("rel")
            level_ax.set_title(f"level {level}" + (f"\ndiff {rel:.0e}" if rel is not None else ""), fontsize=7)
            level_ax.axis("off")
        if with_detections:
            for col, (label, detections) in enumerate(entry["detections"].items(), start=1 + len(levels)):
                det_ax = fig.add_subplot(grid[row, col])
                det_ax.imshow(_drawn(entry["photo"], detections, pictures["categories"]).permute(1, 2, 0).numpy())
                det_ax.set_title(f"{label} (score >= {DRAW_SCORE})", fontsize=8)
                det_ax.axis("off")
    if photos:
        fig.text(0.01, 0.005, f"heat maps: mean |activation| of {photos[0]['heat_maps_of']}'s levels; diff: "
                 f"max|difference| / max|{TORCHVISION}| of the level", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
