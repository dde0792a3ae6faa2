"""benchmarks/kernel_summary.py on a hand-made trace: kernels, busy time and gaps per plan."""

import gzip
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import kernel_summary  # noqa: E402


def write_trace(trace_dir: Path) -> None:
    """Two plans 5 ms apart, each gemm (3 us), gap 1 us, swish (2 us), gap 4 us, gemm (3 us); one host event."""
    events = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:GPU:0"}},
              {"ph": "M", "pid": 1, "tid": 7, "name": "thread_name", "args": {"name": "Stream #14(Compute)"}},
              {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/host:CPU"}},
              {"ph": "X", "pid": 2, "tid": 3, "ts": 0.0, "dur": 50.0, "name": "python"}]
    for start in (0.0, 5000.0):
        for offset, dur, name in ((0.0, 3.0, "gemm"), (4.0, 2.0, "swish"), (10.0, 3.0, "gemm")):
            events.append({"ph": "X", "pid": 1, "tid": 7, "ts": start + offset, "dur": dur, "name": name})
    folder = trace_dir / "plugins" / "profile" / "2026_11_26"
    folder.mkdir(parents=True)
    with gzip.open(folder / "perfetto_trace.json.gz", "wt") as handle:
        json.dump({"traceEvents": events}, handle)


def test_per_plan_kernels_busy_time_and_gaps(tmp_path):
    write_trace(tmp_path)
    text = kernel_summary.summarise(tmp_path, plans=2, top=5)
    device = next(line for line in text.splitlines() if line.startswith("/device:GPU:0"))
    # 3 kernels and 8 us busy per plan; gaps 1 + 4 us per plan (the 4987 us between the plans is not inside one)
    assert "3 kernels, busy 0.008 ms per plan; gaps inside plans 0.005 ms per plan" in device
    assert "2 x   3.00 us =  0.006 ms  gemm" in text and "1 x   2.00 us =  0.002 ms  swish" in text
    assert "/host:CPU | 3: busy 0.025 ms per plan" in text


def test_missing_trace_is_a_one_line_error(tmp_path, capsys):
    assert kernel_summary.main([str(tmp_path)]) == 2
    assert "no plugins/profile" in capsys.readouterr().err
