"""The optimized backbone: body + InferenceFPN, its eager calls served by the inference engine
(``engine.py``), its scripted and traced forms running the modules as written."""
from typing import Dict, List, Optional

import torch
from torch import Tensor, nn

from .. import ops
from ..ops import cpu_cache
from ..ops.runner import step
from .folded_conv import Conv2dAct, _check_inference
from .engine import Engine
from .modules import InferenceFPN

__all__ = ["InferenceBackboneWithFPN"]


def _python_modes() -> bool:
    """Whether a TorchDispatchMode, or a TorchFunctionMode other than ``torch.set_default_device``'s,
    is active (the engine then runs the modules as written, so the mode sees every op)."""
    if torch._C._len_torch_dispatch_stack():
        return True
    if torch._C._len_torch_function_stack():
        from torch.overrides import _get_current_function_mode_stack
        from torch.utils._device import DeviceContext
        return any(type(mode) is not DeviceContext for mode in _get_current_function_mode_stack())
    return False


def _check_image(x, stem: Optional[nn.Module]) -> None:
    """The entry check of the optimized backbone's eager calls, made before any plan is looked
    up, so a bad input is named here instead of failing inside a kernel or a layout change.

    Args:
        x: the input. stem: the body's first convolution (``body.conv1``), whose input channels
            the image must have where it is a folded or plain convolution.

    Raises:
        TypeError: ``x`` is not a tensor (a list of images, a numpy array).
        ValueError: ``x`` is neither (N, C, H, W) nor an unbatched (C, H, W) image, or its C is
            not the stem convolution's input channels.
    """
    if isinstance(x, torch.fx.Proxy):
        return  # symbolic tracing: nothing to check until the traced graph runs
    if not isinstance(x, Tensor):
        raise TypeError(f"InferenceBackboneWithFPN expects an image batch as a Tensor of shape (N, C, H, W) (or "
                        f"one image, (C, H, W)), got a {type(x).__name__}; a detection model's transform batches "
                        f"a list of images into one tensor")
    if x.dim() not in (3, 4):
        raise ValueError(f"InferenceBackboneWithFPN expects a tensor of shape (N, C, H, W) (or one image, "
                         f"(C, H, W)), got shape {tuple(x.shape)}")
    channels = None
    if isinstance(stem, nn.Conv2d):
        channels = stem.in_channels
    elif isinstance(stem, Conv2dAct) and stem._parameters.get("weight") is not None:
        channels = stem._parameters["weight"].shape[1] * stem.groups
    if channels is not None and x.shape[-3] != channels:
        raise ValueError(f"InferenceBackboneWithFPN expects a tensor of shape (N, {channels}, H, W) (or one "
                         f"image, ({channels}, H, W)): its first convolution takes {channels} channels; got "
                         f"shape {tuple(x.shape)}")


class InferenceBackboneWithFPN(nn.Module):
    """body + InferenceFPN; the image goes to channels_last first when ``channels_last``.
    Keeps ``out_channels``, so detection models use it as they used the original backbone.

    Eager calls run through the inference engine (``engine.Engine``): the first call with an input
    signature plans the forward (implementations resolved, weights packed, on CUDA captured as a
    CUDA graph), later calls with it only run the plan. ``plans()`` lists what is cached;
    ``set_engine(...)`` configures or turns it off. Scripted, traced, compiled and exported forms
    run the modules as written.

    Args:
        body: the ResNet body (folded), returning its stages. fpn: the InferenceFPN.
        out_channels: the FPN's channels. channels_last: convert the image to channels_last first.
    """

    # The engine holds plans, packs and CUDA graphs: never scripted, pickled or copied.
    __jit_ignored_attributes__ = ["_engine", "engine_options"]

    def __init__(self, body: nn.Module, fpn: "InferenceFPN", out_channels: int, channels_last: bool):
        super().__init__()
        self.body = body
        self.fpn = fpn
        self.out_channels = out_channels
        self.channels_last = channels_last
        self.engine_options = dict(enabled=True, max_plans=8, cuda_graphs=True, static_outputs=False)

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        if torch.jit.is_scripting():
            image: List[Optional[Tensor]] = [x]
            _check_inference(self.training, "InferenceBackboneWithFPN", image)
            if x.dim() == 3:
                x = x.unsqueeze(0)
            return self._run(x)
        return self._forward_eager(x)

    @torch.jit.unused
    def _forward_eager(self, x: Tensor) -> Dict[str, Tensor]:
        _check_image(x, getattr(self.body, "conv1", None))
        engine = self.__dict__.get("_engine")
        # A plan runs plain tensors outside tracing and torch's Python modes (FakeTensor, FLOP
        # counters, a TorchFunctionMode besides set_default_device's): those see every op as written.
        if type(x) is not Tensor or ops.capturing_graph() or _python_modes():
            return self._run_as_written(x)
        if engine is None:
            if not getattr(self, "engine_options", {}).get("enabled", False):
                return self._run_as_written(x)
            engine = self._make_engine()
        if x.device.type == "cpu":
            with cpu_cache.pooled():
                return engine(self, x)
        if x.device.type == "cuda" and x.device.index != torch.cuda.current_device():
            with torch.cuda.device(x.device):  # Triton launches and graphs on x's device
                return engine(self, x)
        return engine(self, x)

    @torch.jit.unused
    def _make_engine(self):
        options = self.engine_options
        engine = self.__dict__["_engine"] = Engine(options["max_plans"], options["cuda_graphs"],
                                                   options["static_outputs"])
        return engine

    @torch.jit.unused
    def set_engine(self, enabled: bool = True, *, max_plans: int = 8, cuda_graphs: bool = True,
                   static_outputs: bool = False) -> None:
        """Configure the inference engine (drops every cached plan and graph).

        Args:
            enabled: plan per signature (False: every call runs the modules as written).
            max_plans: signatures kept, least recently used evicted (each holds its packs and, on
                CUDA, its graph's memory in the shared pool).
            cuda_graphs: replay CUDA plans as CUDA graphs.
            static_outputs: return a graph's static output tensors, which the next call with the
                same signature overwrites, instead of copies of them (saves one copy of every
                output per call).

        Raises:
            ValueError: max_plans < 1.
        """
        if max_plans < 1:
            raise ValueError(f"max_plans must be at least 1, got {max_plans}")
        self.engine_options = dict(enabled=bool(enabled), max_plans=int(max_plans), cuda_graphs=bool(cuda_graphs),
                                   static_outputs=bool(static_outputs))
        self.__dict__.pop("_engine", None)

    @torch.jit.unused
    def plans(self) -> List[Dict[str, object]]:
        """The cached signatures, least recently used first (``engine.Engine.info``): signature,
        planned, graph, reason, hits, graph_bytes."""
        engine = self.__dict__.get("_engine")
        return [] if engine is None else engine.info()

    @torch.jit.unused
    def route_report(self) -> List[Dict[str, object]]:
        """The routes of the cached plans: one dict per op step of each planned signature, least
        recently used signature first, steps in order.

        Returns:
            [{"signature": plan.Signature, "step": int, "module": the name of the module whose
            weight the step uses (e.g. "body.layer1.0.convs.0") or None, "op": str, "route": the
            implementation run ("triton", "cudnn_relu", "onednn", "winograd", ...), "via": the
            route of another op's runner it runs, or None (``ops.runner.Runner.via``), "measured":
            bool, "candidates": {implementation: {"status": "chosen" | "slower" | "raised" |
            "disagreed" | "refused", "ms": median ms or None, "reason": str or None}} (empty where
            the route was not measured)}]. ``engine.format_routes(rows)`` writes them as text.
        """
        engine = self.__dict__.get("_engine")
        return [] if engine is None else engine.routes()

    def __getstate__(self):
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        return {k: v for k, v in state.items() if k != "_engine"}

    @torch.jit.unused
    def _run_as_written(self, x: Tensor) -> Dict[str, Tensor]:
        """The forward through the modules, without a plan (what scripted forms run, plus the
        CPU buffer pool for eager CPU calls)."""
        image: List[Optional[Tensor]] = [x]
        _check_inference(self.training, "InferenceBackboneWithFPN", image)
        if x.dim() == 3:
            # An unbatched [C, H, W] image: torchvision's backbone returns batched maps for it (its
            # first norm broadcasts against [1, C, 1, 1]), so this one does too.
            x = step(torch.unsqueeze, x, 0)  # recorded, as every step of this forward, by a plan
        if isinstance(x, Tensor) and x.device.type == "cpu" and not ops.capturing_graph():
            with cpu_cache.pooled():
                return self._run(x)
        return self._run(x)

    def _run(self, x: Tensor) -> Dict[str, Tensor]:
        if self.channels_last:
            if torch.jit.is_scripting():
                x = x.contiguous(memory_format=torch.channels_last)
            else:
                x = ops.to_channels_last(x)
        return self.fpn(self.body(x))
