"""benchmarks/profile_step.py: its trace summary on a made-up GPU trace, and a tiny run on the CPU."""
from __future__ import annotations

import gzip
import json
import subprocess
import sys

import pytest

from conftest import ROOT, stage_env

sys.path.insert(0, str(ROOT))
from benchmarks.profile_step import DATA_LABEL, summarize_trace  # noqa: E402


def x(cat, name, ts, dur, tid=1, **args):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "tid": tid, "args": args}


def test_trace_summary_counts_kernels_launches_syncs_and_gaps():
    """Two steps of 100 us: per step a data fetch, two launches, two kernels, one H2D copy and one
    item() that waits for the GPU; the GPU idles 40 us per step, in one gap while the host fetches."""
    events = []
    for step in range(2):
        t = step * 100
        events += [
            x("user_annotation", DATA_LABEL, t, 40),
            x("cpu_op", "aten::copy_", t + 40, 5),
            x("cuda_runtime", "cudaMemcpyAsync", t + 41, 2),
            x("gpu_memcpy", "Memcpy HtoD (Pinned -> Device)", t + 41, 9, tid=7, bytes=2**20),
            x("cuda_runtime", "cudaLaunchKernel", t + 45, 3),
            x("kernel", "gemm", t + 50, 30, tid=7),
            x("cuda_runtime", "cudaLaunchKernel", t + 48, 3),
            x("kernel", "softmax", t + 80, 20, tid=7),
            x("cpu_op", "aten::_local_scalar_dense", t + 60, 39),
            x("cuda_runtime", "cudaStreamSynchronize", t + 61, 38),
        ]
    events.append(x("cuda_runtime", "cudaDeviceSynchronize", 199, 1))
    s = summarize_trace({"traceEvents": events + [{"ph": "M", "name": "process_name"}]}, steps=2)
    assert s["window_ms_per_step"] == pytest.approx(0.1)
    assert s["kernel_ms_per_step"] == pytest.approx(0.05) and s["kernels_per_step"] == 2
    assert s["gpu_busy_ms_per_step"] == pytest.approx(0.059)  # the copy (41-50) touches the first kernel (50-80)
    assert s["gpu_idle_ms_per_step"] == pytest.approx(0.041)
    assert s["launches_per_step"] == 2 and s["host_syncs_per_step"] == 1 and s["scalar_reads_per_step"] == 1
    assert s["harness_device_syncs"] == 1
    assert s["h2d_copies_per_step"] == 1 and s["h2d_mb_per_step"] == pytest.approx(1.0)
    assert s["data_path_host_ms_per_step"] == pytest.approx(0.04)
    gap = s["largest_gaps"][0]  # between step 0's last kernel (ends at 100) and step 1's copy (starts at 141)
    assert gap["ms"] == pytest.approx(0.041) and DATA_LABEL in gap["host"]
    assert s["idle_gaps_per_step"] == 0.5


def test_profile_step_runs_on_the_cpu(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/profile_step.py"), "--device", "cpu",
                           "--warmup", "1", "--steps", "2", "--profile-steps", "2", "--images", "160",
                           "--batch-size", "16", "--trace", "--data", str(tmp_path / "ws"), "--out-dir", str(out)],
                          cwd=tmp_path, env=stage_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "profile_cpu_default.json").read_text())
    assert result["step_ms"] > 0 and result["samples_per_s"] > 0
    assert result["model_flops_per_step"] >= result["executed_flops_per_step"] > 0  # padded captions cost more
    assert result["mfu"] is None and result["peak_rss_mb"] > 0  # no peak FLOP rate known for a CPU
    assert result["profile"]["kernel_ms_per_step"] is None and result["profile"]["data_path_host_ms_per_step"] > 0
    assert result["profile"]["top_ops"][0]["calls_per_step"] > 0
    assert result["setup"]["profiled_steps"] == 2 and not result["setup"]["checks_on_device"]
    with gzip.open(out / "profile_cpu_default.trace.json.gz") as f:
        assert json.load(f)["traceEvents"]
