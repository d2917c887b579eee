"""How the main job compares fpn_fast with torchvision: the float32 parity bound and when it holds,
the differences between feature pyramids, and the matching of detections."""
import statistics
from collections import OrderedDict
from typing import Dict, Sequence

import torch
from torch import Tensor

from fpn_fast.ops.measure import cudnn_conv_allows_tf32

from .common import torchvision

# The optimized model's float32 parity bound (tests/inference/test_inference.py): every output level within
# 1e-4 of that level's largest magnitude. It does not hold for TF32 or low-precision runs.
PARITY_BOUND = 1e-4
# Detections are matched greedily, reference boxes by descending score, at this IoU or more.
MATCH_IOU = 0.5


def parity_applies(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether ``PARITY_BOUND`` holds for a run.

    The 1e-4 bound is one of IEEE float32: not of autocast runs, nor of CUDA float32 runs whose
    convolutions use TF32 (cudnn.allow_tf32, torch's default; the fused lateral kernel follows the
    same flags), where each product keeps 10 bits.

    Args:
        dtype: the run's compute dtype (float32, or an autocast dtype).
        device: the run's device.

    Returns:
        True when the outputs must agree to ``PARITY_BOUND``.
    """
    if dtype != torch.float32:
        return False
    return device.type != "cuda" or not cudnn_conv_allows_tf32()


def max_diff(outputs: Dict[str, Tensor], reference: Dict[str, Tensor]) -> Dict[str, float]:
    """The largest differences between two feature pyramids.

    Args:
        outputs: {level: Tensor[N, C, H, W]}.
        reference: the same levels and shapes.

    Returns:
        "abs": the largest |a - b| over all levels; "rel": that divided by the largest |b| of all
        levels (a scale-aware relative error that stays finite where the reference is near zero);
        "level_rel": the worst level's largest |a - b| divided by that level's largest |b| (what the
        parity bound is stated in: the coarse levels have a smaller scale than the fine ones).
    """
    per_level = level_diffs(outputs, reference)
    abs_diff = max(d["abs"] for d in per_level.values())
    scale = max(d["scale"] for d in per_level.values())
    return {"abs": abs_diff, "rel": abs_diff / scale if scale > 0 else abs_diff,
            "level_rel": max(d["rel"] for d in per_level.values())}


def level_diffs(outputs: Dict[str, Tensor], reference: Dict[str, Tensor]) -> Dict[str, Dict[str, float]]:
    """Per pyramid level: the largest |a - b|, the level's largest |b|, and their ratio.

    Args:
        outputs: {level: Tensor[...]}.
        reference: the same levels and shapes.

    Returns:
        {level: {"abs", "scale", "rel"}}; "rel" = abs / scale (abs itself when the scale is 0).
    """
    result = OrderedDict()
    for level, ref in reference.items():
        ref = ref.float()
        diff = (outputs[level].float() - ref).abs().max().item()
        scale = ref.abs().max().item()
        result[level] = {"abs": diff, "scale": scale, "rel": diff / scale if scale > 0 else diff}
    return result


def match_detections(reference: Dict[str, Tensor], other: Dict[str, Tensor],
                     iou_threshold: float = MATCH_IOU) -> Dict[str, object]:
    """Match one image's detections against a reference's.

    Reference boxes, by descending score, each take the still unmatched other box of highest IoU
    if that IoU is at least ``iou_threshold``; labels need not agree (disagreements are counted).

    Args:
        reference: {"boxes": Tensor[R, 4] (x1, y1, x2, y2), "scores": Tensor[R], "labels": Tensor[R]}.
        other: the same keys, Tensor[O, ...].
        iou_threshold: the least IoU of a match.

    Returns:
        {"reference", "other": the counts, "matched", "unmatched_reference", "unmatched_other",
        "min_iou", "mean_iou" (None without a match), "max_score_diff" (largest |score difference|
        of matched pairs, None without a match), "label_mismatches" (matched pairs whose labels
        differ)}.
    """
    ref_boxes, ref_scores, ref_labels = (reference[k].detach().cpu() for k in ("boxes", "scores", "labels"))
    boxes, scores, labels = (other[k].detach().cpu() for k in ("boxes", "scores", "labels"))
    ious = torchvision.ops.box_iou(ref_boxes.float(), boxes.float())
    taken = torch.zeros(len(boxes), dtype=torch.bool)
    pair_ious, score_diffs, label_mismatches = [], [], 0
    for r in torch.argsort(ref_scores, descending=True).tolist():
        if len(boxes) == 0:
            break
        candidates = ious[r].masked_fill(taken, -1.0)
        best = int(candidates.argmax())
        if candidates[best] < iou_threshold:
            continue
        taken[best] = True
        pair_ious.append(float(candidates[best]))
        score_diffs.append(abs(float(ref_scores[r]) - float(scores[best])))
        label_mismatches += int(ref_labels[r] != labels[best])
    matched = len(pair_ious)
    return {"reference": len(ref_boxes), "other": len(boxes), "matched": matched,
            "unmatched_reference": len(ref_boxes) - matched, "unmatched_other": len(boxes) - matched,
            "min_iou": min(pair_ious) if pair_ious else None,
            "mean_iou": statistics.fmean(pair_ious) if pair_ious else None,
            "max_score_diff": max(score_diffs) if score_diffs else None,
            "label_mismatches": label_mismatches}


def total_matches(per_image: Sequence[Dict[str, object]]) -> Dict[str, object]:
    """Sum :func:`match_detections` results over images.

    Args:
        per_image: one result per image.

    Returns:
        The same keys: counts summed, "min_iou" the least, "mean_iou" the match-weighted mean,
        "max_score_diff" the largest (None where no image had a match).
    """
    counts = ("reference", "other", "matched", "unmatched_reference", "unmatched_other", "label_mismatches")
    total = {key: sum(m[key] for m in per_image) for key in counts}
    with_matches = [m for m in per_image if m["matched"]]
    total["min_iou"] = min((m["min_iou"] for m in with_matches), default=None)
    total["mean_iou"] = (sum(m["mean_iou"] * m["matched"] for m in with_matches) / total["matched"]
                         if with_matches else None)
    total["max_score_diff"] = max((m["max_score_diff"] for m in with_matches), default=None)
    return total
