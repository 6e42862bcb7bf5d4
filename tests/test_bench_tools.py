"""The benchmark scripts' pure parts: the loop-log parser and FP8 verdict, and the trace summary's busy time."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools" / "bench"))

import fp8_sanity  # noqa: E402
import pretrain_throughput  # noqa: E402

LOG = """iteration  5/10 | lm loss 6.231 | lr 2.964e-03 | grad norm 6.015 | skipped iterations 0 | tokens/s 454
some other line
iteration 10/10 | lm loss 5.899 | lr 3.000e-04 | grad norm 1.208 | skipped iterations 0 | tokens/s 8,864
"""


def test_losses_are_read_from_the_loop_log_lines():
    assert fp8_sanity.losses_from_log(LOG) == {5: 6.231, 10: 5.899}


def test_fp8_verdict_uses_the_final_loss_and_the_tolerance():
    class Args:
        iters, tolerance = 10, 0.02

    ok_text, ok = fp8_sanity.report({"bf16_mixed": {5: 6.0, 10: 5.0}, "fp8": {5: 6.5, 10: 5.09}}, Args)
    bad_text, bad = fp8_sanity.report({"bf16_mixed": {5: 6.0, 10: 5.0}, "fp8": {5: 6.0, 10: 5.11}}, Args)
    assert ok and "1.80% apart" in ok_text and "| 5 | 6.0000 | 6.5000 | 8.33% |" in ok_text
    assert not bad and "FAILED" in bad_text


def test_trace_summary_counts_overlapping_kernels_once(tmp_path):
    events = [{"cat": "kernel", "name": "gemm", "ts": 0, "dur": 100},
              {"cat": "kernel", "name": "gemm", "ts": 50, "dur": 100},   # overlaps the first: busy 0..150
              {"cat": "gpu_memset", "name": "memset", "ts": 200, "dur": 50},  # idle 150..200
              {"cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 1000}]   # host events are not GPU time
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": events}))
    summary = pretrain_throughput.summarize_trace(str(path))
    assert summary.startswith("profiled span 0.2 ms, GPU busy 0.2 ms (80.0%), idle 0.1 ms; 3 kernels")
    assert "    0.20      2  gemm" in summary
