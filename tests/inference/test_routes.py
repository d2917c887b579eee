"""Measured routes (fpn_fast.ops.measure) and the route report: the policy's CPU-side logic on
CPU tensors (the host clock stands in for CUDA events), cuDNN's NaN probe keyed per layout with
the GPU part mocked, and the report the GPU check prints. The GPU paths themselves run in the
cuda-marked tests of test_engine.py and test_inference.py."""
import pytest
import torch

import fpn_fast
from fpn_fast import ops
from fpn_fast.inference import format_routes
from fpn_fast.ops import dispatch, measure
from fpn_fast.ops.conv import _cudnn
from tests._models import randomise_

triton = pytest.importorskip("triton")


def _raises(error: Exception):
    def run():
        raise error
    return run


def test_a_candidate_that_raises_any_exception_loses_with_its_reason():
    """Triton's OutOfResources and CompilationError are not RuntimeErrors: a candidate raising
    one loses the race (the reason kept) instead of aborting the build."""
    from triton.runtime.errors import OutOfResources
    assert not issubclass(OutOfResources, RuntimeError)
    x = torch.randn(64, 64)
    nan = x.clone()
    nan[3, 4] = float("nan")
    runs = {"fused": _raises(OutOfResources(232448, 101376, "shared memory")), "table": lambda: x * 2,
            "off": lambda: x * 3, "nan": lambda: nan * 2, "tf32": lambda: x * 2 * (1 + 1e-4)}
    decision = measure.fastest("test_op", "raising candidates", runs, {"cudnn_relu": "maps NaN to 0"},
                               torch.device("cpu"))
    got = decision.candidates
    assert got["fused"].status == "raised" and "OutOfResources" in got["fused"].reason and got["fused"].ms is None
    assert got["off"].status == "disagreed" and "over 0.01 of the output's scale" in got["off"].reason
    assert got["nan"].status == "disagreed" and "non-finite" in got["nan"].reason
    assert {got["table"].status, got["tf32"].status} == {"chosen", "slower"}  # rounding only: both agree
    assert got["table"].ms is not None and got["tf32"].ms is not None
    assert got["cudnn_relu"] == measure.Candidate("refused", None, "maps NaN to 0")
    assert decision.chosen in ("table", "tf32")
    assert list(got) == ["fused", "table", "off", "nan", "tf32", "cudnn_relu"]
    listed = [d for d in measure.choices() if d["signature"] == "raising candidates"]
    assert listed and listed[-1]["chosen"] == decision.chosen
    assert listed[-1]["candidates"]["fused"]["status"] == "raised"


def test_when_no_candidate_runs_the_first_is_chosen_and_the_call_raises_its_error():
    from triton.compiler.errors import CompilationError
    decision = measure.fastest("test_op", "nothing runs", {"a": _raises(CompilationError("src", None, "bad")),
                                                          "b": _raises(ValueError("no"))}, {}, torch.device("cpu"))
    assert decision.chosen == "a" and {c.status for c in decision.candidates.values()} == {"raised"}


@pytest.fixture
def nan_probes(monkeypatch):
    """cuDNN's NaN probe with its GPU part replaced: an NCHW graph cannot be built, channels_last
    float32 maps NaN to 0, channels_last bfloat16 keeps it. Returns the keys probed."""
    monkeypatch.setattr(_cudnn, "_NAN_PROBES", {})
    probed = []

    def on_gpu(device, probe):
        _, dtype, memory_format = probe.args
        probed.append((device, dtype, memory_format))
        if memory_format == torch.contiguous_format:
            raise RuntimeError("cuDNN Frontend error: No execution plans support the graph.")
        return [dtype == torch.bfloat16] * 2
    monkeypatch.setattr(_cudnn, "on_side_stream", on_gpu)
    return probed


def test_the_nan_probe_is_keyed_per_layout_dtype_and_device(nan_probes):
    device = torch.device("cuda", 0)
    nchw = _cudnn.nan_refusal(device, torch.float32, torch.contiguous_format)
    nhwc = _cudnn.nan_refusal(device, torch.float32, torch.channels_last)
    bf16 = _cudnn.nan_refusal(device, torch.bfloat16, torch.channels_last)
    assert "raised RuntimeError" in nchw and "NCHW" in nchw  # refuses NCHW only
    assert "maps NaN to 0" in nhwc and "channels_last" in nhwc
    assert bf16 is None
    assert _cudnn.nan_refusal(device, torch.float32, torch.channels_last) == nhwc
    assert "cuda:1" in _cudnn.nan_refusal(torch.device("cuda", 1), torch.float32, torch.channels_last)
    assert len(nan_probes) == 4  # once per key: the repeated question is answered from the cache


def test_the_fused_routes_refusal_says_why(nan_probes, monkeypatch):
    x = torch.randn(1, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(8, 8, 3, 3)
    assert ops.conv.cudnn_relu_refusal(x, weight, relu=False) == "no ReLU to fuse"
    assert "maps NaN to 0" in ops.conv.cudnn_relu_refusal(x, weight, relu=True)
    assert "raised" in ops.conv.cudnn_relu_refusal(x.contiguous(), weight, relu=True)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    assert "deterministic" in ops.conv.cudnn_relu_refusal(x, weight, relu=True)


@pytest.fixture
def measured_on_cpu():
    """conv2d_act's CPU row measured as the CUDA one is (host clock): the policy end to end."""
    dispatch.MEASURED.add(("conv2d_act", "cpu"))
    dispatch.forget_runners()
    yield
    dispatch.MEASURED.discard(("conv2d_act", "cpu"))
    dispatch.forget_runners()


def test_a_measured_row_times_its_candidates_once_per_signature(measured_on_cpu):
    x = torch.randn(1, 64, 20, 20)
    weight = torch.randn(64, 64, 3, 3) / 24
    bias = torch.randn(64)
    with torch.inference_mode():
        run = ops.conv.runner(x, weight, bias, padding=(1, 1), relu=True)
        assert ops.conv.runner(x, weight, bias, padding=(1, 1), relu=True) is run  # decided once
        got = ops.conv2d_act(x, weight, bias, padding=(1, 1), relu=True)
    decision = run.decision
    assert decision is not None and decision.chosen == run.route
    taken = [name for name, c in decision.candidates.items() if c.status in ("chosen", "slower")]
    assert run.route in taken and "torch" in taken
    assert decision.candidates[run.route].ms is not None
    want = torch.nn.functional.conv2d(x, weight, bias, padding=1).relu()
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    with ops.use_backend("torch"):  # a named backend is the caller's choice: nothing measured
        assert ops.conv.runner(x, weight, bias, padding=(1, 1), relu=True).decision is None


def test_the_route_report_names_each_layer_its_route_and_the_others_fate(measured_on_cpu):
    torch.manual_seed(0)
    model = fpn_fast.optimize_for_inference(
        randomise_(fpn_fast.resnet_fpn_backbone(backbone_name="resnet18", weights=None)).eval())
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        model(x)
    rows = model.route_report()
    convs = [row for row in rows if row["op"] == "conv2d_act"]
    assert len(convs) == 1 + 8 * 2 + 3  # stem, two per block, the downsamples
    assert convs[0]["module"] == "body.conv1" and convs[1]["module"] == "body.layer1.0.convs.0"
    for row in convs:
        assert row["measured"] and row["candidates"][row["route"]]["status"] == "chosen"
        assert all(c["status"] in ("chosen", "slower", "refused", "raised", "disagreed")
                   for c in row["candidates"].values())
    laterals = [row for row in rows if row["op"] == "lateral_upsample_add"]
    assert [row["module"] for row in laterals] == [f"fpn.inner_blocks.{i}" for i in (3, 2, 1, 0)]
    text = format_routes(rows)
    assert "body.layer1.0.convs.0" in text and "conv2d_act" in text and "signature (1, 3, 64, 64)" in text


def test_graph_bytes_count_the_pools_own_segments(monkeypatch):
    """A capture's graph_bytes come from the allocator's segments of that pool (no
    empty_cache, which would break another thread's capture)."""
    from fpn_fast.inference import cuda_graphs
    segments = [dict(device=0, segment_pool_id=(0, 7), total_size=2 << 20),
                dict(device=0, segment_pool_id=(0, 7), total_size=1 << 20),
                dict(device=0, segment_pool_id=(0, 0), total_size=64 << 20),
                dict(device=1, segment_pool_id=(0, 7), total_size=8 << 20)]
    monkeypatch.setattr(torch.cuda, "memory_snapshot", lambda: segments)
    assert cuda_graphs._pool_bytes(torch.device("cuda", 0), (0, 7)) == 3 << 20
    assert cuda_graphs._pool_bytes(torch.device("cuda", 0), None) == 0
