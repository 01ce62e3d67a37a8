"""``benchmarks/bench_gpu.py`` (the GPU targets of ``benchmarks/gpu_check.sh``), run with ``--device cpu --quick``:
every part must finish and write its JSON, with the ratios and targets the README quotes, and its PNG."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.mark.slow
def test_bench_gpu_runs_every_part_on_the_cpu(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "bench_gpu.py"), "--device", "cpu", "--quick",
                           "--out", str(tmp_path / "gpu")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    hta = json.loads((tmp_path / "gpu_hta.json").read_text())
    assert [r["method"] for r in hta["rows"]] == ["lora_r8", "lora_r1", "hta", "hra_r8", "full"]
    assert next(r for r in hta["rows"] if r["method"] == "lora_r8")["time_vs_lora_r8"] == 1.0
    assert "hta_time_le_1.0x_lora_r8" in hta["targets"]
    urnn = json.loads((tmp_path / "gpu_urnn.json").read_text())
    assert urnn["rows"][1]["vs_lstm"] > 0 and "urnn_le_3x_lstm" in urnn["targets"]
    manifold = json.loads((tmp_path / "gpu_manifold.json").read_text())
    assert [r["N"] for r in manifold["rows"]] == [16, 32] and manifold["rows"][0]["projunn_t_speedup"] > 0
    for part in ("hta", "urnn", "manifold"):
        assert (tmp_path / f"gpu_{part}.png").stat().st_size > 0
