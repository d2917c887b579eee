"""The main job of ``python -m fpn_fast`` (``make demo``), and the harness the benchmarks use.

Is fpn_fast the same as torchvision, and how much faster, on a whole detector and real photos?
The detector job runs a torchvision detector on photographs as torchvision eager, after
``fpn_fast.convert`` and after ``fpn_fast.optimize_for_inference``; the backbone job times the
ResNet50-FPN backbone alone per fpn_fast backend. Both check parity against torchvision and
return JSON-ready numbers; nothing is printed but progress bars on stderr.

Modules: ``cli`` (the command line), ``detector_job`` and ``backbone_job`` (the two jobs),
``models`` (models, random norms, checkpoints), ``photos`` (bundled photos, decoding),
``parity`` (the parity bound, pyramid differences, detection matching), ``timing`` (backends,
machine info, timed runs, progress), ``common`` (row labels, dtypes, ``InputError``), ``report``
(text and PNG; matplotlib only to write a PNG).

It needs the "demo" extra (torchvision, scikit-image, Pillow, tqdm, matplotlib). The core
package never imports it: ``import fpn_fast`` loads none of it.
"""
from .backbone_job import BackboneJob, run_backbone
from .common import COMPILED, CONVERTED, DTYPES, OPTIMIZED, REFERENCE, TORCHVISION, InputError
from .detector_job import DetectorJob, run_detector
from .models import DETECTORS, build_detector, build_models, category_names, load_weights, randomize_norms
from .parity import MATCH_IOU, PARITY_BOUND, level_diffs, match_detections, max_diff, parity_applies, total_matches
from .photos import BUNDLED_PHOTOS, bundled_photos, find_images, load_image
from .timing import backend_reasons, machine_info, selected_backends, summary_stats, time_runs

__all__ = [
    "BackboneJob", "run_backbone", "DetectorJob", "run_detector",
    "COMPILED", "CONVERTED", "DTYPES", "OPTIMIZED", "REFERENCE", "TORCHVISION", "InputError",
    "DETECTORS", "build_detector", "build_models", "category_names", "load_weights", "randomize_norms",
    "MATCH_IOU", "PARITY_BOUND", "level_diffs", "match_detections", "max_diff", "parity_applies", "total_matches",
    "BUNDLED_PHOTOS", "bundled_photos", "find_images", "load_image",
    "backend_reasons", "machine_info", "selected_backends", "summary_stats", "time_runs",
]
