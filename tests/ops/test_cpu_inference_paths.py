"""The CPU inference paths of issue 14: NNPACK's Winograd route of ``ops.conv2d_nchw`` /
``ops.conv2d_act`` (the extension's Winograd, which it follows in the dispatch rows, is tested in
test_winograd.py; the parity of every route with F.conv2d is the OpTester's, test_conv.py), and the
CPU buffer pool the optimized backbones run in.

Here: where NNPACK takes a call and where not, its kernel transforms (one set for every image
size), its two call paths handing non-finite and huge results to the direct convolution (so masks
equal eager's), and its probe. The pool changes where memory comes from, not what is computed:
outputs are compared bit for bit with the pool on and off, in fresh processes (the pool installs
itself as torch's CPU allocator).
"""
import textwrap

import pytest
import torch
import torch.nn.functional as F

import fpn_fast
from fpn_fast import ops
from fpn_fast.ops.conv import _nnpack

NNPACK = pytest.mark.skipif(_nnpack.unavailable_reason() is not None,
                            reason=f"NNPACK unusable here: {_nnpack.unavailable_reason()}")
EXTENSION = pytest.mark.skipif(ops._extension.unavailable_reason("cpu") is not None,
                               reason="the CPU buffer pool is part of the compiled extension")


@pytest.fixture
def no_winograd(monkeypatch):
    """The extension's Winograd convolution turned off, so the NNPACK route it precedes runs."""
    monkeypatch.setattr(ops.conv._winograd, "unavailable_reason", lambda: "turned off by the test")
    ops.dispatch._PROBED.clear()
    yield
    monkeypatch.undo()
    ops.dispatch._PROBED.clear()


def _inputs(n, c, h, w, k, seed, bias=True, channels_last=False):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=generator)
    weight = torch.randn(k, c, 3, 3, generator=generator) / (9 * c) ** 0.5
    b = torch.randn(k, generator=generator) if bias else None
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, weight, b


@NNPACK
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), 3e36], ids=str)
@pytest.mark.parametrize("size", [(37, 39), (103, 101)], ids=["sliced", "torch_call"])
def test_conv2d_nchw_non_finite_and_huge_values_take_the_direct_path(value, size, no_winograd):
    """Winograd spreads a non-finite input over its tile (inf - inf = NaN): such results, and
    values beyond 1e30, are recomputed by the direct convolution, so masks equal eager's."""
    x, weight, b = _inputs(1, 8, *size, 6, seed=3)
    x[0, 2, 10, 11] = value
    x[0, 5, 30, 3] = value
    with torch.no_grad():
        out = ops.conv2d_nchw(x, weight, b, (1, 1), (1, 1))
        raw = torch._nnpack_spatial_convolution(x, weight, b, [1, 1], [1, 1])
        want = F.conv2d(x, weight, b, 1, 1)
    assert ops.conv.conv2d_nchw_implementation(x, weight, b, (1, 1), (1, 1), (1, 1), 1) == "nnpack"
    if value != 3e36:
        # the case is real: NNPACK alone would not match eager's mask
        assert not torch.equal(raw.isnan(), want.isnan()) or not torch.equal(raw.isinf(), want.isinf())
    for mask in (torch.isnan, torch.isposinf, torch.isneginf):
        assert torch.equal(mask(out), mask(want))
    finite = want.isfinite()
    torch.testing.assert_close(out[finite], want[finite], rtol=1e-5, atol=1e-5 * want[finite].abs().max().item())


@NNPACK
def test_conv2d_nchw_dispatch(no_winograd):
    x, weight, b = _inputs(1, 8, 40, 40, 8, seed=1)

    def implementation(x=x, weight=weight, bias=b, stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1):
        return ops.conv.conv2d_nchw_implementation(x, weight, bias, stride, padding, dilation, groups)

    assert implementation() == "nnpack"
    assert implementation(x=x[:, :, :19, :20]) != "nnpack"  # under min_pixels
    assert implementation(x=x.double(), weight=weight.double(), bias=b.double()) != "nnpack"
    assert implementation(stride=(2, 2)) != "nnpack"
    assert implementation(dilation=(2, 2)) != "nnpack"
    assert implementation(padding=(2, 2)) != "nnpack"
    assert implementation(weight=torch.randn(8, 4, 3, 3), groups=2) != "nnpack"
    assert implementation(weight=torch.randn(8, 8, 5, 5)) != "nnpack"
    with ops.use_backend("torch"):
        assert implementation() == "torch"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert implementation() != "nnpack"
    assert ops.conv2d_nchw_input_format(x.contiguous(memory_format=torch.channels_last), weight, b, (1, 1),
                                        (1, 1)) == torch.contiguous_format
    small = x[:, :, :15, :20].contiguous(memory_format=torch.channels_last)
    assert ops.conv2d_nchw_input_format(small, weight, b, (1, 1), (1, 1)) == torch.channels_last
    # a traced graph records no NNPACK call (the graph may run elsewhere)
    with torch.no_grad():
        traced = torch.jit.trace(lambda t: ops.conv2d_nchw(t, weight, b, (1, 1), (1, 1)), (x,), check_trace=False)
    assert "nnpack" not in str(traced.graph)
    with pytest.raises(RuntimeError, match="inference only"):
        ops.conv2d_nchw(x, weight.requires_grad_(), b, (1, 1), (1, 1))


@pytest.mark.skipif(_nnpack.sliced_unavailable_reason() is not None,
                    reason=f"the sliced NNPACK path is unavailable: {_nnpack.sliced_unavailable_reason()}")
def test_sliced_nnpack_kernels_serve_every_size_and_bad_inputs_raise():
    """pack() makes one set of kernel transforms for all image sizes: check the bytes agree for
    sizes from 7x9 to 200x304 (an NNPACK build where they did not would fail here), and that the
    op refuses bad inputs with a clear error before running."""
    weight = torch.randn(12, 7, 3, 3)
    base = torch.ops.fpn_fast.nnpack_pack_3x3(weight, 64, 64, [1, 1], 2)
    for h, w in [(7, 9), (20, 20), (80, 80), (200, 304)]:
        other = torch.ops.fpn_fast.nnpack_pack_3x3(weight, h, w, [1, 1], 2)
        assert all(torch.equal(a, b) for a, b in zip(other, base))
    x = torch.randn(1, 7, 30, 31)
    op = torch.ops.fpn_fast.nnpack_conv_3x3_packed
    with pytest.raises(TypeError, match="float32"):
        op(x.double(), base, None, 12, [1, 1])
    with pytest.raises(ValueError, match="contiguous"):
        op(x.contiguous(memory_format=torch.channels_last), base, None, 12, [1, 1])
    with pytest.raises(ValueError, match="padding"):
        op(x, base, None, 12, [2, 2])
    with pytest.raises(ValueError, match="bias"):
        op(x, base, torch.randn(11), 12, [1, 1])
    with pytest.raises(ValueError, match="smaller than the 3x3 kernel"):
        op(torch.randn(1, 7, 1, 5), base, None, 12, [0, 0])
    with pytest.raises(ValueError, match=r"weight must be \[K, C, 3, 3\]"):
        torch.ops.fpn_fast.nnpack_pack_3x3(torch.randn(12, 7, 5, 5), 8, 8, [1, 1], 2)
    with pytest.raises(ValueError, match="slices"):
        torch.ops.fpn_fast.nnpack_pack_3x3(weight, 8, 8, [1, 1], 13)
    # one slice per intra-op thread; any count gives the same result
    want = F.conv2d(x, weight, None, 1, 1)
    for count in (1, 3, 12):
        kernels = torch.ops.fpn_fast.nnpack_pack_3x3(weight, 30, 31, [1, 1], count)
        out, finite = op(x, kernels, None, 12, [1, 1])
        assert finite and (out - want).abs().max() <= 1e-4 * want.abs().max()


@NNPACK
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_conv2d_act_takes_nnpack_only_for_wide_3x3_convs(channels_last, no_winograd):
    """The body's 3x3 convs of >= 128 channels over >= min_pixels (with the extension's Winograd
    off; test_conv.py's OpTester holds the route to its rounding): not narrower convs, strided
    ones, groups, or maps under 20x20 pixels."""
    x, weight, b = _inputs(1, 128, 20, 21, 40, seed=7, channels_last=channels_last)

    def implementation(x=x, weight=weight, stride=(1, 1)):
        return ops.resolve("conv2d_act", "cpu", lambda impl: ops.conv.conv2d_act_supports(
            impl, x, weight, b, stride, (1, 1), (1, 1), True, None))

    assert implementation() == "nnpack"
    assert implementation(x=x[:, :100], weight=weight[:, :100]) != "nnpack"
    assert implementation(x=x[:, :, :19, :20]) != "nnpack"
    assert implementation(stride=(2, 2)) != "nnpack"
    assert implementation(weight=weight[:, :64]) != "nnpack"  # groups=2


@NNPACK
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=str)
def test_conv2d_act_nnpack_hands_non_finite_results_to_the_direct_conv(value, no_winograd):
    x, weight, b = _inputs(1, 128, 24, 25, 16, seed=5, channels_last=True)
    x[0, 7, 3, 4] = value
    r = torch.randn(1, 16, 24, 25).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out = ops.conv2d_act(x, weight, b, (1, 1), (1, 1), relu=True, residual=r)
        want = (F.conv2d(x, weight, b, 1, 1) + r).relu()
    for mask in (torch.isnan, torch.isposinf, torch.isneginf):
        assert torch.equal(mask(out), mask(want))
    assert not want.isfinite().all()  # non-trivial


def test_nnpack_probe_reports_a_disagreeing_convolution(monkeypatch):
    _nnpack.unavailable_reason.cache_clear()
    try:
        monkeypatch.setattr(torch, "_nnpack_available", lambda: True)
        monkeypatch.setattr(torch, "_nnpack_spatial_convolution", lambda x, w, b, p, s: F.conv2d(x, w, b, 1, p) * 1.01)
        assert "disagrees" in _nnpack.unavailable_reason()
        _nnpack.unavailable_reason.cache_clear()
        monkeypatch.setattr(torch, "_nnpack_available", lambda: False)
        assert "not available" in _nnpack.unavailable_reason()
    finally:
        monkeypatch.undo()
        _nnpack.unavailable_reason.cache_clear()


POOL_SCRIPT = textwrap.dedent("""
    import threading
    import torch, fpn_fast
    from fpn_fast import ops
    from tests._models import randomise_
    torch.manual_seed(0)
    model = randomise_(fpn_fast.resnet_fpn_backbone(backbone_name="resnet18")).eval()
    optimized = fpn_fast.optimize_for_inference(model)
    images = [torch.randn(1, 3, 260, 300), torch.randn(2, 3, 131, 171)]
    with torch.no_grad():
        outs = [optimized(x) for x in images] + [optimized(x) for x in images]
        threads = [threading.Thread(target=lambda x=x, i=i: outs.append((i, optimized(x))))
                   for i, x in enumerate(images * 2)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        big = torch.empty(64 << 20, dtype=torch.uint8)  # outside any scope: not pooled
    stats = ops.cpu_cache_stats()
    torch.save({"outs": outs[:4], "threaded": outs[4:], "stats": stats, "freed": ops.empty_cpu_cache(),
                "after": ops.cpu_cache_stats()}, OUT)
""")


@EXTENSION
def test_cpu_pool_reuses_memory_and_changes_no_result(run_python, tmp_path):
    results = {}
    for mode, env in (("pooled", {}), ("off", {"FPN_FAST_CPU_POOL_MB": "0"})):
        path = tmp_path / f"{mode}.pt"
        proc = run_python(f"OUT = {str(path)!r}\n" + POOL_SCRIPT, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[mode] = torch.load(path)
    pooled, off = results["pooled"], results["off"]
    for got, want in zip(pooled["outs"] + [o for _, o in sorted(pooled["threaded"], key=lambda t: t[0])],
                         off["outs"] + [o for _, o in sorted(off["threaded"], key=lambda t: t[0])]):
        for name in want:
            assert torch.equal(got[name], want[name]), name
    for result in (pooled, off):  # a second call, and calls from threads, equal the first call
        first = result["outs"][:2]
        for got in [result["outs"][2], result["outs"][3]] + [o for _, o in result["threaded"]]:
            want = first[0] if got["0"].shape == first[0]["0"].shape else first[1]
            assert all(torch.equal(got[k], want[k]) for k in want)
    stats = pooled["stats"]
    assert stats["hits"] > 0 and stats["misses"] > 0 and stats["cached_bytes"] > 0
    assert stats["cached_bytes"] <= stats["limit_bytes"] == 1024 << 20
    assert pooled["freed"] == stats["cached_bytes"] and pooled["after"]["cached_bytes"] == 0
    assert off["stats"]["hits"] == off["stats"]["misses"] == 0  # never entered


@EXTENSION
def test_cpu_pool_limit_and_bad_environment(run_python):
    proc = run_python(textwrap.dedent("""
        import torch
        from fpn_fast import ops
        from fpn_fast.ops import cpu_cache
        with cpu_cache.pooled() as active:
            assert active
            blocks = [torch.empty(3 << 20, dtype=torch.uint8) for _ in range(4)]  # 12 MiB in use
        del blocks  # freed outside the scope: back to the pool, up to its 8 MiB limit
        stats = ops.cpu_cache_stats()
        assert stats["limit_bytes"] == 8 << 20 and 0 < stats["cached_bytes"] <= 8 << 20, stats
        assert stats["blocks_in_use"] == 0, stats
        with cpu_cache.pooled():
            again = torch.empty(3 << 20, dtype=torch.uint8)
        assert ops.cpu_cache_stats()["hits"] == 1
        print("ok")
    """), env={"FPN_FAST_CPU_POOL_MB": "8"})
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]
    proc = run_python("import fpn_fast, torch\n"
                      "m = fpn_fast.optimize_for_inference(fpn_fast.resnet_fpn_backbone(backbone_name='resnet18'))\n"
                      "with torch.no_grad(): m(torch.randn(1, 3, 64, 64))\n", env={"FPN_FAST_CPU_POOL_MB": "lots"})
    assert proc.returncode != 0 and "FPN_FAST_CPU_POOL_MB" in proc.stderr


@EXTENSION
def test_cpu_pool_exit_without_enter_raises():
    with pytest.raises(RuntimeError, match="without a matching"):
        torch.ops.fpn_fast._cpu_pool_exit()
    with pytest.raises(ValueError, match="limit_bytes"):
        torch.ops.fpn_fast._cpu_pool_set_limit(-1)


@EXTENSION
def test_cpu_pool_survives_fork(run_python):
    """A process forked after the pool is installed, while another thread uses it, can still
    allocate. The child runs on one thread, as DataLoader workers do: torch's OpenMP runtime
    itself hangs in a forked child that uses more (checked here with a bare F.conv2d)."""
    proc = run_python(textwrap.dedent("""
        import os, threading, torch, fpn_fast
        from fpn_fast.ops import cpu_cache
        m = fpn_fast.optimize_for_inference(fpn_fast.resnet_fpn_backbone(backbone_name="resnet18"))
        x = torch.randn(1, 3, 96, 96)
        with torch.no_grad():
            want = m(x)
            stop = threading.Event()
            def churn():  # another thread allocating and freeing pooled blocks meanwhile
                while not stop.is_set():
                    with cpu_cache.pooled():
                        torch.empty(2 << 20, dtype=torch.uint8)
            t = threading.Thread(target=churn); t.start()
            pids = []
            for _ in range(5):
                pid = os.fork()
                if pid == 0:
                    torch.set_num_threads(1)
                    got = m(x)
                    os._exit(0 if all(torch.equal(got[k], want[k]) for k in want) else 3)
                pids.append(pid)
            stop.set(); t.join()
            codes = [os.waitpid(pid, 0)[1] for pid in pids]
        print("codes", codes)
        assert codes == [0] * 5
    """), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
