"""The folded convolution: ``Conv2dAct`` (a convolution with its norm folded in, bias, residual
and ReLU in one op) and the check every optimized module makes before running.

The optimized modules have no training semantics (folded norms cannot be trained as norms), so
they refuse to run in training mode, or with grad mode on and an input or parameter that requires
grad, instead of computing gradients of something else.
"""
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..ops.conv import packing

__all__ = ["Conv2dAct"]


def _check_inference(training: bool, name: str, tensors: List[Optional[Tensor]]) -> None:
    """RuntimeError unless the optimized module ``name`` runs in eval mode and autograd records
    nothing: grad mode off, or no input or parameter that requires grad (so exporters and
    tracers, which run with grad mode on, work)."""
    if training:
        raise RuntimeError(name + " comes from fpn_fast.optimize_for_inference and runs in eval mode only "
                           "(its norms are folded into the convolutions): call model.eval(). Losses (a "
                           "validation loss, for example) need training mode: compute them with the original "
                           "model or with fpn_fast.convert(model), which gives torchvision's losses")
    needs_grad = False
    for t in tensors:
        if t is not None and t.requires_grad:
            needs_grad = True
    if torch.is_grad_enabled() and needs_grad:
        raise RuntimeError(name + " comes from fpn_fast.optimize_for_inference and computes no gradients (its "
                           "norms are folded into the convolutions): run it under torch.no_grad() or "
                           "torch.inference_mode(), or use the original model to train")



# Conv2dAct keeps its caches of the weight in other layouts (oneDNN's prepacked weight, NNPACK's
# and the Winograd kernel transforms, keyed by these slots) and what they were made from
# (Conv2dAct._pack_token) in one dict, the module's "_packs": one object for the module's life, so
# making a pack never changes the module's own attributes (the engine's StructureGuard compares them).
_PACK_SLOTS = ("_onednn_weight", "_nnpack_weight", "_winograd_weight")
_PACKED_FROM = "_packed_from"
_PACKS = "_packs"


def _normal_tensor(tensor: Tensor) -> Tensor:
    """``tensor``, or a normal copy of it (same type, requires_grad and memory format) when it is an
    inference tensor: those count no in-place writes, so nothing made from one can be kept."""
    if not tensor.is_inference():
        return tensor
    with torch.inference_mode(False):
        normal = tensor.clone()
        return nn.Parameter(normal, requires_grad=tensor.requires_grad) if isinstance(tensor, nn.Parameter) else normal


def _same_tensor(before: Optional[tuple], after: Optional[tuple]) -> bool:
    """Whether two ``Conv2dAct._weights_state`` entries are the same tensor, unchanged."""
    if before is None or after is None:
        return before is after
    return before[0] is after[0] and before[1:] == after[1:]


class Conv2dAct(nn.Module):
    """A convolution with its norm folded in: relu?(conv2d(x, weight, bias) + residual).

    ``weight`` and ``bias`` are parameters that require no grad; ``forward(x, residual=None)``.
    Scripted (TorchScript), it runs F.conv2d and the tail as plain ops. On CPU it keeps its weight
    prepacked (oneDNN, NNPACK and Winograd kernel transforms) between calls, valid only for the
    weight tensor, contents and generation they were made from (``_pack_token``):

    - ``weight`` and ``bias`` are always normal tensors: one that arrives as an inference tensor
      (assigned, loaded with ``assign=True``, converted by ``.to()`` under ``torch.inference_mode``,
      deep-copied or unpickled there) is replaced by a normal copy, since inference tensors count
      no writes; later writes to the inference tensor itself are then not the module's.
    - Every path that can replace them bumps a generation: assignment (``__setattr__``, which
      ``load_state_dict(assign=True)`` uses), ``_load_from_state_dict``, ``_apply`` (``.to``,
      ``.half``, ``.float``, ``.cuda``, also with ``torch.__future__``'s swap_tensors) where it
      changes a weight or bias (its object, storage, dtype, device or layout: a ``.to()`` that
      changes nothing keeps the packs), unpickling and deepcopy (``__setstate__``).
    - In-place writes (``weight.mul_``, ``load_state_dict`` without ``assign``, also inside
      ``torch.inference_mode``) bump the weight's version counter.
    - A weight put in place some other way (``_parameters`` written directly, ``register_parameter``,
      ``weight.data = t``, ``torch.utils.swap_tensors``) is another tensor object, an inference
      tensor, or at another address (the packed weight's storage is held with its packs), and the
      next call sees it.

    In-place writes through ``weight.data`` (``weight.data.mul_(2)``) bypass the version counter
    and are not seen. The packs are not saved, pickled or copied.
    """

    # The prepacked weights are opaque oneDNN tensors: TorchScript must not copy them (nor what
    # validates them) into a scripted module (torch.jit.save cannot write them), as pickling leaves
    # them out.
    __jit_ignored_attributes__ = [_PACKS, "_weights_generation"]

    def __init__(self, weight: Tensor, bias: Optional[Tensor], stride: Sequence[int], padding: Sequence[int],
                 dilation: Sequence[int], groups: int, relu: bool):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.stride = tuple(stride)
        self.padding = tuple(padding)
        self.dilation = tuple(dilation)
        self.groups = groups
        self.relu = relu
        # The Winograd routes on CPU (optimize_for_inference's ``winograd`` option).
        self.winograd = True
        self.folded_conv = True  # marks it for the scripted InferenceFPN (a static hasattr there)
        self.__dict__[_PACKS] = {}
        self.eval()  # it has no training mode; .train() makes it refuse to run

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        _check_inference(self.training, "Conv2dAct", [x, residual, self.weight, self.bias])
        if torch.jit.is_scripting():
            out = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
            if residual is not None:
                out += residual
            return out.relu_() if self.relu else out
        return self._forward_eager(x, residual)

    @torch.jit.unused
    def _forward_eager(self, x: Tensor, residual: Optional[Tensor]) -> Tensor:
        return ops.conv2d_act(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups,
                              relu=self.relu, residual=residual, packs=self, winograd=getattr(self, "winograd", True))

    # The entry points through which weight and bias may be replaced: each makes them normal
    # tensors and bumps the generation (_weights_replaced).

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        if name in ("weight", "bias"):
            self._weights_replaced()

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._weights_replaced()

    def _apply(self, *args, **kwargs):
        # ``.to``, ``.float``, ``.cpu`` and the like return a parameter as it is where it already
        # has the dtype, device and memory format asked for: the packs stay valid then (serving
        # code calls ``model.to(device)`` per request), so only a real change starts a generation.
        before = self._weights_state()
        result = super()._apply(*args, **kwargs)
        after = self._weights_state()
        if not all(map(_same_tensor, before, after)):
            self._weights_replaced()
        return result

    @torch.jit.unused
    def _weights_state(self) -> List[Optional[tuple]]:
        """Per weight and bias (None where absent): the tensor object and what a conversion can
        change in place of it (``param.data = converted``): storage, data pointer, dtype, device,
        shape, strides."""
        state: List[Optional[tuple]] = []
        for name in ("weight", "bias"):
            t = self._parameters.get(name)
            state.append(None if t is None else (t, t.untyped_storage().data_ptr(), t.data_ptr(), t.dtype,
                                                 t.device, tuple(t.shape), t.stride()))
        return state

    def __getstate__(self):
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        return {k: v for k, v in state.items() if k not in (_PACKS, *_PACK_SLOTS, _PACKED_FROM)}

    def __setstate__(self, state) -> None:
        super().__setstate__({k: v for k, v in state.items() if k not in (*_PACK_SLOTS, _PACKED_FROM)})
        self.__dict__[_PACKS] = {}
        self._weights_replaced()

    @torch.jit.unused
    def _pack_cache(self) -> dict:
        """The dict holding the packs (made here for a module built without ``__init__``)."""
        cache = self.__dict__.get(_PACKS)
        if cache is None:
            cache = self.__dict__[_PACKS] = {}
        return cache

    @torch.jit.unused
    def _weights_replaced(self) -> None:
        """Make weight and bias normal tensors and start a new generation of packs."""
        for name in ("weight", "bias"):
            tensor = self._parameters.get(name)
            if tensor is not None and tensor.is_inference():
                self._parameters[name] = _normal_tensor(tensor)
        self.__dict__["_weights_generation"] = self.__dict__.get("_weights_generation", 0) + 1

    @torch.jit.unused
    def _pack_token(self) -> object:
        """The token the cached packs are keyed by (compared with ``is``), the one place their
        validity is decided. It stays the same object while the weight is the same tensor object
        with the same version counter and data pointer, in the same generation; otherwise a new
        token is made and every pack is dropped. The weight tensor and its storage are held with
        the token (strong references: a weak one would make ``torch.utils.swap_tensors`` refuse
        the weight), so no other tensor can take the weight's identity or address while its
        packs are kept: ``weight.data = t`` and ``swap_tensors``, which keep the object and its
        version counter, always move the data pointer. An inference tensor found here (put in
        place by a path no entry point sees) is replaced by a normal copy first."""
        weight = self.weight
        bias = self.bias
        if weight.is_inference() or (bias is not None and bias.is_inference()):
            self._weights_replaced()
            weight, bias = self.weight, self.bias
            if weight.is_inference() or (bias is not None and bias.is_inference()):
                # Computed anew by each access (a parametrization) under inference_mode: nothing
                # made from it can be kept, so the token is new every time.
                return object()
        made_from = (self.__dict__.get("_weights_generation", 0), weight._version, weight.data_ptr())
        cache = self._pack_cache()
        state = cache.get(_PACKED_FROM)
        if state is None or state[0] != made_from or state[1] is not weight:
            cache.clear()
            state = cache[_PACKED_FROM] = (made_from, weight, weight.untyped_storage(), object())
        return state[3]

    @torch.jit.unused
    def _packed_weight(self, x: Tensor) -> Tensor:
        """The weight prepacked for oneDNN, made on first use for x's size and kept while the
        weight is unchanged (``_pack_token``); not saved or copied with the module."""
        token = self._pack_token()
        cache = self._pack_cache()
        cached = cache.get("_onednn_weight")
        if cached is None or cached[0] is not token:
            packed = packing.onednn_weight(self.weight, self.stride, self.padding, self.dilation, self.groups,
                                           x.shape)
            cached = cache["_onednn_weight"] = (token, packed)
        return cached[1]

    @torch.jit.unused
    def _nnpack_kernels(self, slices: int) -> List[Tensor]:
        """NNPACK's kernel transforms of the weight in ``slices`` output-channel slices (16 MiB for
        a 256 -> 256 conv), made on first use and kept while the weight is unchanged
        (``_pack_token``); not saved or copied."""
        token = self._pack_token()
        made_for = (slices, self.padding)
        cache = self._pack_cache()
        cached = cache.get("_nnpack_weight")
        if cached is None or cached[0] is not token or cached[1] != made_for:
            kernels = packing.nnpack_kernels(self.weight, self.padding, slices)
            cached = cache["_nnpack_weight"] = (token, made_for, kernels)
        return cached[2]

    @torch.jit.unused
    def _winograd_kernels(self, tiles: int) -> Tuple[int, Tensor]:
        """A batch entry size for a map of ``tiles`` tiles and the Winograd kernel transforms
        prepacked for it (4x the weight's size: 9 MiB for a 256 -> 256 conv): the first map's
        entry size, or the fallback one for maps it would pad too much
        (``packing.winograd_group``; at most two packs). Made on first use, kept while the
        weight is unchanged (``_pack_token``); not saved or copied."""
        token = self._pack_token()
        cache = self._pack_cache()
        cached = cache.get("_winograd_weight")
        if cached is None or cached[0] is not token:
            cached = cache["_winograd_weight"] = (token, packing.winograd_first_group(tiles), {})
        group = packing.winograd_group(cached[1], tiles)
        packs = cached[2]
        if group not in packs:
            packs[group] = packing.winograd_kernels(self.weight, group)
        return group, packs[group]

    def extra_repr(self) -> str:
        out_channels, in_per_group, kh, kw = self.weight.shape
        return (f"{in_per_group * self.groups}, {out_channels}, kernel_size=({kh}, {kw}), stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, relu={self.relu}")
