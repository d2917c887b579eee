"""Shared test helpers for models and feature maps: random weights and norm statistics
(never the defaults), random FPN inputs at odd sizes, and the level-wise closeness check
against torchvision."""
from collections import OrderedDict

import torch
from torch import nn


# Odd spatial sizes with non-2x ratios between levels (and one level whose "top" is larger in W).
ODD_SIZES = [(25, 38), (13, 19), (7, 11), (3, 5)]
IN_CHANNELS = [8, 16, 24, 32]


def randomise_(module: nn.Module) -> nn.Module:
    """Replace every parameter and floating buffer by random values of a sensible scale:
    conv/linear weights ~ N(0, 2/fan_in), norm weights and running_var in [0.5, 1.5],
    biases and running_mean ~ N(0, 0.1). Nothing keeps its default (zeros/ones) value."""
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if not t.is_floating_point():
                continue
            leaf = name.rsplit(".", 1)[-1]
            if t.dim() > 1:
                t.normal_(0.0, (2.0 / t[0].numel()) ** 0.5)
            elif leaf in ("weight", "running_var"):
                t.uniform_(0.5, 1.5)
            else:
                t.normal_(0.0, 0.1)
    return module


def assert_levels_close(actual, expected):
    """Every output level close to torchvision's.

    rtol=1e-5 per element; atol=1e-5 of the level's largest magnitude: the lateral bias is added
    after the 1x1 conv instead of inside it, which moves the lateral sums by an ulp; the 3x3
    output conv then sums 9*C of those, so the absolute error scales with the level's magnitude,
    and elements that happen to be near zero cannot meet a purely relative bound.
    """
    assert list(actual.keys()) == list(expected.keys())
    for name in expected:
        assert actual[name].shape == expected[name].shape, name
        scale = expected[name].abs().max().item()
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-5 * scale,
                                   msg=lambda m, name=name: f"level {name}: {m}")


def random_features(sizes=ODD_SIZES, channels=IN_CHANNELS, batch=2, channels_last=False, requires_grad=False):
    feats = OrderedDict()
    for i, ((h, w), c) in enumerate(zip(sizes, channels)):
        t = torch.randn(batch, c, h, w)
        if channels_last:
            t = t.contiguous(memory_format=torch.channels_last)
        feats[f"feat{i}"] = t.requires_grad_(requires_grad)
    return feats
