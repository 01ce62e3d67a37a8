"""Smoke runs of the unitary benchmark scripts with tiny settings: each must finish and write its JSON (with the
fields the README quotes) and its PNG. They run as the README says, ``python benchmarks/<script>.py``."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def run_script(name: str, *args: str) -> None:
    proc = subprocess.run([sys.executable, str(BENCHMARKS / name), *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]


@pytest.mark.slow
def test_bench_cayley_and_projunn(tmp_path):
    run_script("bench_cayley.py", "--sizes", "16", "32", "--repeats", "1", "--min-time", "0", "--out", str(tmp_path))
    cayley = json.loads((tmp_path / "bench_cayley.json").read_text())
    assert set(cayley["ms_per_step"]["optimizer"]) == {"16", "32"} and "optimizer" in cayley["fitted_exponent"]
    run_script("bench_projunn.py", "--sizes", "16", "32", "--ranks", "1", "--repeats", "1", "--min-time", "0",
               "--out", str(tmp_path / "bench_projunn"))
    projunn = json.loads((tmp_path / "bench_projunn.json").read_text())
    assert set(projunn["fitted_exponent"]) == {"cayley", "projunn_t_k1", "projunn_d_k1"}
    assert set(projunn["speedup_vs_cayley"]["projunn_t_k1"]) == {"16", "32"}
    assert (tmp_path / "bench_cayley.png").stat().st_size > 0 and (tmp_path / "bench_projunn.png").stat().st_size > 0


@pytest.mark.slow
def test_bench_unitary_rnn_and_learning_curves(tmp_path):
    run_script("bench_unitary_rnn.py", "--steps", "8", "--repeats", "1", "--cayley-sizes", "16", "--threads", "1",
               "--no-reference-loops", "--out", str(tmp_path))
    rnn = json.loads((tmp_path / "bench_unitary_rnn_threads1.json").read_text())
    assert rnn["sequence_length"] == 28 and len(rnn["models"]) >= 3
    assert all(r["best_ms"] > 0 for r in rnn["models"])
    run_script("projunn_learning_curves.py", "--adding-steps", "4", "--copy-steps", "3", "--adding-length", "10",
               "--adding-hidden", "6", "--copy-delay", "5", "--copy-hidden", "6", "--eval-size", "8", "--jobs", "2",
               "--out", str(tmp_path / "curves"))
    curves = json.loads((tmp_path / "curves.json").read_text())
    for task, steps in (("adding", 4), ("copy", 3)):
        runs = curves["results"][task]["runs"]
        assert set(runs) == {"cayley", "projunn_t", "projunn_d"}
        assert all(len(run["train_loss"]) == steps and run["unitarity_error"] < 1e-4 for run in runs.values())
    assert (tmp_path / "bench_unitary_rnn_threads1.png").exists() and (tmp_path / "curves.png").exists()
