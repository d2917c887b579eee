"""The plan cache: ``Engine`` keeps one plan per input signature (least recently used evicted),
serves each call from it while its guards hold, builds a plan on a miss, and on CUDA replays the
plan as a CUDA graph (``cuda_graphs.py``). See docs/design.md ("Inference engine") for the
invariants and tests/inference/test_engine.py for their tests.
"""
import operator
import threading
import warnings
from collections import OrderedDict
from typing import Dict, List, Optional

import torch
from torch import Tensor, nn

from .._fast_path import _global_hooks
from .folded_conv import _check_inference
from . import guards as _guards
from .guards import GraphGuard, StructureGuard, WeightGuard, _hooked_or_training, _why_not_hide
from .plan import Plan, PlanError, Signature, build_plan, signature

__all__ = ["Engine", "format_routes"]


class _Entry:
    """One signature's plan and its CUDA graph, or why it has none.

    Attributes:
        plan: the Plan, or None where the backbone cannot be planned (its modules run as written
            while ``structure`` holds, i.e. until a module it covers changes).
        graphed, graph_guard: the captured graph and what it hides (``GraphGuard``), or None.
        captures: graphs captured for it (a graph whose hidden modules changed is captured again,
            at most ``MAX_CAPTURES`` times in all).
        reason: why there is no plan, or no graph.
        host: (``guards.HostGuard``, the graph guard it covers) once the guards held, or None: while
            it holds and the graph guard is the same, a call skips the Python guards.
        unarmable: there is no host guard for this plan (none here, or it could not record the
            plan's guards: an inference tensor among its weights): its calls run the Python guards,
            without trying again.
    """

    def __init__(self, plan: Optional[Plan], reason: Optional[str] = None,
                 structure: Optional[StructureGuard] = None):
        self.plan = plan
        self.structure = structure
        self.graphed = None
        self.graph_guard: Optional[GraphGuard] = None
        self.captures = 0
        self.reason = reason
        self.hits = 0
        self.host = None
        self.unarmable = False

    def retire(self) -> None:
        """Forget the graph once its last replay is done (its memory may be reused at once)."""
        if self.graphed is not None:
            self.graphed.retire()
            self.graphed = self.graph_guard = None
        self.host = None

    def unchanged(self, backbone: nn.Module) -> bool:
        """Whether the host guard says that nothing the plan's and graph's guards read changed
        since they last held (False: ask them)."""
        host = self.host
        return host is not None and host[1] is self.graph_guard and host[0].holds(backbone)

    def arm(self) -> bool:
        """After the plan's guards held: record them (and the graph's, where it holds too) in a
        host guard, kept only if they still hold after the recording, so that whatever changed
        before it was seen by them and whatever changes after it is seen by the record.

        Returns:
            True when it kept one: the plan's guards and the graph's (if any) hold now.
        """
        plan, graph = self.plan, self.graph_guard
        if self.unarmable or (graph is not None and not graph.holds()):
            return False  # a capture or the plan's steps follow; the record is taken at a later call
        host = _guards.arm([plan.structure], [plan.guard], graph)
        if host is None:
            self.unarmable = True
            return False
        if not (_valid(self) and not _global_hooks() and (graph is None or graph.holds())):
            return False
        self.host = (host, graph)
        return True


MAX_CAPTURES = 3
_IN_CAPTURE = ("the current stream is already capturing a CUDA graph (graphs do not nest): the call runs the "
               "plan's steps, or the modules where there is no plan yet, inside it")


class Engine:
    """The optimized backbone's plans by signature (least recently used evicted beyond
    ``max_plans``), their CUDA graphs, and the graph memory pools.

    Calls may come from several threads: lookups and runs take no lock; building, capturing and
    evicting take the engine's lock (a call that finds no valid plan looks again once it holds
    it); replays of graphs sharing a pool take turns (``cuda_graphs.ReplayQueue``).

    Args:
        max_plans: signatures kept (each holds its packs and, on CUDA, its graph's memory).
        cuda_graphs: capture CUDA plans as graphs.
        static_outputs: return a graph's static output tensors (overwritten by the next call of
            the same signature) instead of copies of them; each graph then has a memory pool of
            its own, so no other signature's replay writes into them.
    """

    def __init__(self, max_plans: int = 8, cuda_graphs: bool = True, static_outputs: bool = False):
        if max_plans < 1:
            raise ValueError(f"max_plans must be at least 1, got {max_plans}")
        self.max_plans = max_plans
        self.cuda_graphs = cuda_graphs
        self.static_outputs = static_outputs
        self.entries: "OrderedDict[Signature, _Entry]" = OrderedDict()
        self.pools: Dict[torch.device, object] = {}  # device -> the shared pool's (handle, replay queue)
        self.capture_streams: Dict[torch.device, object] = {}
        self.warned: set = set()
        self.builds = 0
        self.lock = threading.RLock()

    def __call__(self, backbone: nn.Module, x: Tensor) -> Dict[str, Tensor]:
        key = signature(x)
        capturing = x.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        entry = self.entries.get(key)
        if entry is not None:
            out = self._serve(entry, backbone, x, key, capturing)
            if out is not None:
                return out
        return self._slow(backbone, x, key, capturing)

    def _serve(self, entry: _Entry, backbone: nn.Module, x: Tensor, key: Signature, capturing: bool):
        """The call's output from a cached entry, or None where the entry does not serve it."""
        plan = entry.plan
        if plan is None:
            # Cannot be planned: as written, until a module changes.
            return backbone._run_as_written(x) if _valid(entry) else None
        unchanged = entry.unchanged(backbone)
        if not unchanged:
            if not _valid(entry) or _global_hooks():
                return None
            unchanged = entry.arm()  # True: the graph's guard held just now as well
        if key.grad_enabled and _needs_grad(x, plan.guard):  # autograd would record: refuse as eager does
            return backbone._run_as_written(x)
        entry.hits += 1
        try:
            self.entries.move_to_end(key)
        except KeyError:  # evicted by another thread meanwhile
            pass
        if capturing:
            # Inside a user's capture: the plan's steps (never a replay). Under autocast they would
            # bake in the weights' casts made at build time, which the user's graph would then keep.
            _cuda_graphs().warn_once(self.warned, _IN_CAPTURE)
            return plan.run(x) if key.autocast is None else backbone._run_as_written(x)
        graphed, guard = entry.graphed, entry.graph_guard
        if graphed is None or guard is None:
            return plan.run(x)
        if unchanged or guard.holds():
            return graphed(x, self.static_outputs)
        if not guard.plain():  # a hook or training mode the plan's calls honour
            return plan.run(x)
        with self.lock:  # what the graph hides changed: capture again (a few times at most)
            if entry.graph_guard is guard:
                entry.retire()
                if entry.captures < MAX_CAPTURES:
                    self._capture(entry, x, key)
                else:
                    entry.reason = ("the modules the plan calls as written changed after each of its "
                                    f"{MAX_CAPTURES} captures: it runs without a graph")
                    _cuda_graphs().warn_once(self.warned, entry.reason)
        return plan.run(x)

    def _slow(self, backbone: nn.Module, x: Tensor, key: Signature, capturing: bool) -> Dict[str, Tensor]:
        """A call the cached plans do not serve: as written (hooks, training, a capture in
        progress), or a new plan. Only building takes the lock: calls run outside it."""
        if capturing:
            _cuda_graphs().warn_once(self.warned, _IN_CAPTURE)
            return backbone._run_as_written(x)
        entry = self.entries.get(key)
        if (backbone.training or _global_hooks() or _hooked_or_training(backbone.body)
                or _hooked_or_training(backbone.fpn)
                or (entry is not None and entry.plan is not None and not entry.plan.applies())):
            return backbone._run_as_written(x)  # a hook or training mode where a plan would hide it
        with self.lock:
            entry = self.entries.get(key)
            if entry is None or not _valid(entry):  # else another thread has just built it
                return self._build(backbone, x, key)
        out = self._serve(entry, backbone, x, key, capturing)
        return backbone._run_as_written(x) if out is None else out

    def _build(self, backbone: nn.Module, x: Tensor, key: Signature) -> Dict[str, Tensor]:
        _check_inference(backbone.training, "InferenceBackboneWithFPN", [x])  # raises as eager would
        if key.grad_enabled and any(p.requires_grad for p in backbone.parameters()):
            return backbone._run_as_written(x)  # the folded modules raise as eager does
        self._drop_stale()
        try:
            plan, out = build_plan(backbone, x)
        except PlanError as err:
            return self._unplanned(backbone, key, str(err), backbone._run_as_written(x))
        except Exception as err:  # bad input: the modules as written raise the eager error, named there
            out = backbone._run_as_written(x)
            return self._unplanned(backbone, key, f"planning raised {type(err).__name__}: {err}", out)
        self.builds += 1
        entry = _Entry(plan)
        if x.device.type == "cuda" and self.cuda_graphs:
            self._capture(entry, x, key)
        elif x.device.type != "cuda":
            entry.reason = f"CUDA graphs need CUDA tensors; the input is on {x.device}"
        self._store(key, entry)
        return out

    def _unplanned(self, backbone: nn.Module, key: Signature, reason: str, out):
        """Remember that the signature runs as written (until the backbone's modules change)."""
        structure = StructureGuard([backbone.body, backbone.fpn], outer=backbone)
        self._store(key, _Entry(None, reason=reason, structure=structure))
        if reason not in self.warned:
            self.warned.add(reason)
            warnings.warn(f"fpn_fast: the optimized backbone runs its modules as written: {reason}", stacklevel=4)
        return out

    def _capture(self, entry: _Entry, x: Tensor, key: Signature) -> None:
        """Capture the entry's plan as a CUDA graph (the engine's lock held), or say why not."""
        cuda_graphs = _cuda_graphs()
        called = entry.plan.called
        reason = cuda_graphs.why_not_capturable(x) or _why_not_hide(called)
        if reason is None:
            device = x.device
            stream = self.capture_streams.get(device)
            if stream is None:
                stream = self.capture_streams[device] = torch.cuda.Stream(device)
            if self.static_outputs:  # a pool of its own: no other graph writes into its outputs
                pool, queue = None, cuda_graphs.ReplayQueue()
            else:
                if device not in self.pools:
                    self.pools[device] = (torch.cuda.graph_pool_handle(), cuda_graphs.ReplayQueue())
                pool, queue = self.pools[device]
            entry.captures += 1
            try:
                entry.graphed = cuda_graphs.capture(entry.plan.run, x, pool, key.autocast, stream, queue,
                                                    entry.plan.input_format)
                entry.graph_guard = GraphGuard(called)  # after the capture, which ran the called modules
            except Exception as err:  # an op that synchronises, or another that graphs do not allow
                reason = f"capturing the plan failed: {type(err).__name__}: {err}"
        entry.reason = reason
        if reason is not None:
            cuda_graphs.warn_once(self.warned, reason)

    def _drop_stale(self) -> None:
        """Drop the plans whose weights or modules changed (they hold packs and graph memory); a
        plan that fails only because a module it elides has a hook stays for when it is gone."""
        for key, entry in list(self.entries.items()):
            if not _valid(entry) and (entry.plan is None or entry.plan.applies()):
                self.entries.pop(key, None)
                entry.retire()

    def _store(self, key: Signature, entry: _Entry) -> None:
        self.entries[key] = entry
        self.entries.move_to_end(key)
        while len(self.entries) > self.max_plans:
            self.entries.popitem(last=False)[1].retire()

    def info(self) -> List[Dict[str, object]]:
        """One dict per cached signature, least recently used first: ``signature`` (the tuple),
        ``planned`` (False: runs as written), ``graph`` (captured?), ``reason`` (why not planned
        or not captured), ``hits``, ``graph_bytes`` (device memory its capture added: the bytes the
        graph's memory pool grew by while capturing it, plus its static input; graphs sharing a
        pool reuse each other's intermediates, so a later graph may add little; 0 without a graph)."""
        with self.lock:
            items = list(self.entries.items())
        return [dict(signature=key, planned=entry.plan is not None, graph=entry.graphed is not None,
                     reason=entry.reason, hits=entry.hits,
                     graph_bytes=entry.graphed.captured_bytes if entry.graphed is not None else 0)
                for key, entry in items]

    def routes(self) -> List[Dict[str, object]]:
        """Per planned signature (least recently used first), per op step of its plan: the route
        the plan runs and why each other candidate lost or was refused (see
        ``InferenceBackboneWithFPN.route_report``)."""
        with self.lock:
            items = [(key, entry.plan) for key, entry in self.entries.items() if entry.plan is not None]
        rows = []
        for key, plan in items:
            for index, route in enumerate(plan.routes):
                decision = route.decision
                candidates = {} if decision is None else {
                    name: candidate._asdict() for name, candidate in decision.candidates.items()}
                rows.append(dict(signature=key, step=index, module=route.module, op=route.op, route=route.route,
                                 via=route.via, measured=decision is not None, candidates=candidates))
        return rows


def format_routes(rows: List[Dict[str, object]]) -> str:
    """``InferenceBackboneWithFPN.route_report()``'s rows as text: per signature, one line per op
    step: module, op, route (with its median time where measured), then every other candidate:
    ``name: status [time] [(reason)]``."""
    lines, last = [], None
    for row in rows:
        key = row["signature"]
        if key != last:
            lines.append(f"signature {tuple(key.shape)} {key.dtype} {key.device} autocast={key.autocast} "
                         f"backend={key.backend}")
            last = key
        # A measured row names its own route among its candidates; an unmeasured one that runs
        # another op's route (``via``) carries that route's measurement.
        chosen_name = row["route"] if row["route"] in row["candidates"] else (row.get("via") or row["route"])
        chosen = row["candidates"].get(chosen_name, {})
        timed = f" {chosen['ms']:.3f} ms" if chosen.get("ms") is not None else ""
        others = []
        for name, candidate in row["candidates"].items():
            if name == chosen_name:
                continue
            text = f"{name}: {candidate['status']}"
            if candidate["ms"] is not None:
                text += f" {candidate['ms']:.3f} ms"
            if candidate["reason"]:
                text += f" ({candidate['reason']})"
            others.append(text)
        via = f" via {row['via']}" if row.get("via") else ""
        lines.append(f"  {row['module'] or '-':<28} {row['op']:<21} {row['route']}{via}{timed}"
                     + ("  | " + " | ".join(others) if others else ""))
    return "\n".join(lines)


def _valid(entry: _Entry) -> bool:
    """Whether the entry still matches the weights and modules it was made from."""
    if entry.plan is None:
        return entry.structure.holds()
    return entry.plan.structure.holds() and entry.plan.guard.holds()


def _cuda_graphs():
    from . import cuda_graphs  # imported on first use: CPU-only processes never load it
    return cuda_graphs


def _needs_grad(x: Tensor, guard: WeightGuard) -> bool:
    """Grad mode is on (the caller checked) and the input or a folded weight requires grad."""
    return x.requires_grad or any(map(operator.attrgetter("requires_grad"), guard.tensors()))
