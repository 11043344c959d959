"""The timeline summary that --profile prints, on a hand-written trace whose answer is known."""
import json

import pytest

from training.profiling import format_timeline, kernel_kind, timeline_summary


def kernel(name, start_us, end_us, cat="kernel", stream=7):
    return {"ph": "X", "cat": cat, "name": name, "ts": start_us, "dur": end_us - start_us, "pid": 0, "tid": stream}


def annotation(name, start_us, end_us):
    return {"ph": "X", "cat": "gpu_user_annotation", "name": name, "ts": start_us, "dur": end_us - start_us}


@pytest.fixture
def trace(tmp_path):
    events = [
        kernel("sm90_xmma_gemm_bf16bf16_bf16f32", 1000, 11000),
        kernel("ncclDevKernel_ReduceScatter_Sum_bf16", 5000, 15000, stream=20),  # overlaps the matmul
        kernel("_rms_norm_forward_kernel", 20000, 26000),  # after 5 ms idle
        kernel("Memcpy HtoD (Pinned -> Device)", 26000, 27000, cat="gpu_memcpy"),
        kernel("multi_tensor_apply_kernel<AdamFunctor>", 29000, 31000),  # after 2 ms idle
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 50000},  # host events are not GPU time
        annotation("forward_backward", 1000, 16000),
        annotation("optimizer_step", 18000, 31000),
    ]
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": events}))
    return path


def test_busy_time_counts_overlapping_streams_once(trace):
    summary = timeline_summary(trace)
    assert summary["wall_ms"] == pytest.approx(30.0)
    assert summary["busy_ms"] == pytest.approx(14 + 7 + 2)
    assert summary["busy_fraction"] == pytest.approx(23 / 30)


def test_gpu_time_by_kind(trace):
    assert timeline_summary(trace)["by_kind_ms"] == pytest.approx(
        {"matmul": 10, "communication": 10, "triton": 6, "memcpy/memset": 1, "optimizer": 2})


def test_phases_and_longest_gaps(trace):
    summary = timeline_summary(trace)
    assert summary["phases"]["forward_backward"] == pytest.approx({"wall_ms": 15, "busy_ms": 14})
    assert summary["phases"]["optimizer_step"] == pytest.approx({"wall_ms": 13, "busy_ms": 9})
    gaps = summary["longest_gaps"]
    assert [round(g["ms"], 3) for g in gaps] == [5.0, 2.0]
    assert gaps[0]["phase"] == "between phases" and gaps[0]["next_kernel"] == "_rms_norm_forward_kernel"
    assert gaps[1]["phase"] == "optimizer_step" and gaps[1]["next_kernel"].startswith("multi_tensor_apply")
    text = format_timeline(summary, steps=1)
    assert "busy 23.0 ms (76.7%)" in text and "idle 5.00 ms" in text


def test_a_trace_without_gpu_work_has_no_timeline(tmp_path):
    path = tmp_path / "cpu.json"
    path.write_text(json.dumps({"traceEvents": [{"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 5}]}))
    assert timeline_summary(path) is None


def test_kernel_kinds():
    assert kernel_kind({"cat": "kernel", "name": "cudnn_generated_fort_native_sdpa_sm90_flash_fprop"}) == "attention"
    flash_attn4 = "kernel_cutlass_kernel_flash_attncuteflash_bwd_sm90FlashAttentionBackwardSm90_object_at__tensor"
    assert kernel_kind({"cat": "kernel", "name": flash_attn4}) == "attention"  # a CUTLASS kernel, but not a matmul
    assert kernel_kind({"cat": "kernel", "name": "nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT"}) == "matmul"
    assert kernel_kind({"cat": "kernel", "name": "void at::native::vectorized_elementwise_kernel<4>"}) == "other"
