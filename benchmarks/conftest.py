"""Session fixtures of the benchmark suites (GPU copy bandwidth) and the notes printed after the
tables (compile times, copy bandwidth, peak memory)."""
import pytest
import torch

from _bench import HAS_CUDA, SUMMARY


@pytest.fixture(scope="session")
def copy_gbps():
    """Device copy bandwidth, (read + written bytes) / time of a 512 MiB ``dst.copy_(src)``; None on CPU."""
    if not HAS_CUDA:
        return None
    src = torch.empty(128 * 2 ** 20, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(20):
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    gbps = 2 * src.numel() * src.element_size() / times[len(times) // 2] / 1e9
    SUMMARY.append(f"CUDA copy bandwidth ({torch.cuda.get_device_name()}): {gbps:.0f} GB/s (read + write)")
    return gbps


def pytest_terminal_summary(terminalreporter):
    # An entry is a line, or a callable returning lines when the notes are printed (a table of
    # rows measured by then).
    lines = [text for entry in SUMMARY for text in (entry() if callable(entry) else [entry])]
    if lines:
        terminalreporter.write_sep("-", "fpn_fast benchmark notes")
        for line in lines:
            terminalreporter.write_line(line)
