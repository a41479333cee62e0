"""`benchmarks/gpu.sh --smoke`: the one-GPU benchmark's whole path on the CPU (tiny config, a few steps).

Proves the script runs end to end (shards made on the spot, the real trainer with
ZeRO-2, benchmarks/step.py, the loader, ITM re-ranking throughput) and writes one
JSON with the summary keys; the numbers themselves are the GPU run's business.
Several minutes on a loaded 2-core machine, hence `slow`.

`benchmarks/download.py` at a few dozen rows: both stages, the CPU ceiling and the
ratios to it are in its JSON (about 3 minutes on the loaded machine, `slow` as well).
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_gpu_benchmark_smoke_writes_one_json(tmp_path):
    out = tmp_path / "result.json"
    proc = subprocess.run([str(REPO / "benchmarks" / "gpu.sh"), "--smoke", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=1700)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    result = json.loads(out.read_text())
    assert result["mode"] == "smoke"
    for name in ("train", "step", "loader", "retrieval"):
        assert result[name]["status"] == "ok", (name, result[name])
    summary = result["summary"]
    assert summary["samples_per_s"] > 0 and 0 <= summary["data_wait_frac"] <= 1 and summary["peak_memory_mb"] > 0
    assert result["train"]["steps"] == 6 and result["train"]["analytic_gflop_per_sample"] > 0
    step_lines = result["step"]["results"]
    assert "analytic_flops_per_sample" in step_lines[0] and step_lines[1]["analytic_gflops_per_sample"] > 0
    assert 0.9 < step_lines[1]["counted_over_analytic"] < 1.1     # the analytic count matches FlopCounterMode
    rates = result["retrieval"]["results"]
    assert [r["precision"] for r in rates] == ["fp32", "bf16"]
    assert all(r["itm_pairs_per_s_i2t"] > 0 and r["itm_pairs_per_s_t2i"] > 0 for r in rates)
    assert any(key.startswith("shard_loader") for key in result["loader"]["results"])


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_download_benchmark_smoke_reports_the_ceiling():
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "download.py"), "--rows", "40",
                           "--distinct-images", "4", "--samples-per-shard", "20", "--processes", "1",
                           "--threads", "8", "--ceiling-rows", "40"],
                          cwd=REPO, capture_output=True, text=True, timeout=560)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    result = json.loads(proc.stdout)
    assert result["samples"] == {"download": 40, "pack": 40}
    assert result["ceiling_rows_per_s"] > 0 and len(result["ceiling_rows_per_s_before_after"]) == 2
    for key in ("download_vs_ceiling", "pack_vs_ceiling", "download_cpu_vs_ceiling",
                "download_stage_cpu_vs_ceiling", "pack_cpu_vs_ceiling"):
        assert result[key] > 0, key
    assert set(result["cpu_ms_per_row"]) == {"ceiling", "download_stage", "download_server", "pack_stage"}
    # the stage's CPU includes its forkserver's workers (reaped here), so it is at least the ceiling's work
    if result["cpu_of_whole_tree"]:
        assert result["cpu_ms_per_row"]["download_stage"] > result["cpu_ms_per_row"]["ceiling"]
