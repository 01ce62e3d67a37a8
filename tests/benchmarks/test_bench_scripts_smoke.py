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
def test_bench_unitary_rnn(tmp_path):
    run_script("bench_unitary_rnn.py", "--steps", "8", "--repeats", "1", "--cayley-sizes", "16", "--threads", "1",
               "--no-reference-loops", "--out", str(tmp_path))
    rnn = json.loads((tmp_path / "bench_unitary_rnn_threads1.json").read_text())
    assert rnn["sequence_length"] == 28 and len(rnn["models"]) >= 3
    assert all(r["best_ms"] > 0 for r in rnn["models"])
    assert (tmp_path / "bench_unitary_rnn_threads1.png").exists()


@pytest.mark.slow
def test_unitary_learning_curves(tmp_path):
    # every task, model and method in one process; two seeds, so the spread and the merge are exercised
    run_script("unitary_learning_curves.py", "--tasks", "copy", "adding", "pmnist", "--methods", "cayley", "projunn_t",
               "--hidden", "full=6", "restricted=6", "lstm=5", "--seeds", "0", "1", "--copy-steps", "3",
               "--adding-steps", "4", "--pmnist-steps", "2", "--copy-delay", "5", "--adding-length", "10",
               "--batch-size", "4", "--train-size", "16", "--eval-size", "8", "--jobs", "2",
               "--out", str(tmp_path / "curves"))
    curves = json.loads((tmp_path / "curves.json").read_text())
    assert curves["complete"] and curves["seeds"] == [0, 1]
    for task, steps in (("copy", 3), ("adding", 4), ("pmnist", 2)):
        runs = curves["results"][task]["runs"]
        assert set(runs) == {"full-cayley", "full-projunn_t", "restricted", "lstm"}
        assert runs["lstm"]["hidden_size"] == 5 and runs["full-cayley"]["parameters"]["degrees_of_freedom"] > 0
        for entry in runs.values():
            assert set(entry["per_seed"]) == {"0", "1"} and entry["summary"]["eval_loss"]["n"] == 2
            assert all(len(run["train_loss"]) == steps for run in entry["per_seed"].values())
        assert all(run["unitarity_error"] < 1e-4 for run in runs["full-cayley"]["per_seed"].values())
        assert ("eval_accuracy" in runs["lstm"]["summary"]) == (task != "adding")
    assert (tmp_path / "curves.png").stat().st_size > 0 and not (tmp_path / "curves.partial").exists()
    # pieces run separately combine into one file, a run in flight (its partial curve) as unfinished
    (tmp_path / "copy_only.json").write_text(json.dumps({**curves, "results": {"copy": curves["results"]["copy"]}}))
    in_flight = {"run": "copy/lstm/seed2", "steps_done": 2, "train_loss": [2.2, 2.1], "seconds": 0.5}
    (tmp_path / "copy_lstm_seed2.json").write_text(json.dumps(in_flight))
    run_script("unitary_learning_curves.py", "--merge", str(tmp_path / "copy_only.json"), str(tmp_path / "copy_lstm_seed2.json"),
               "--hidden", "lstm=5", "--copy-steps", "3", "--copy-delay", "5", "--batch-size", "4",
               "--out", str(tmp_path / "merged"))
    merged = json.loads((tmp_path / "merged.json").read_text())
    lstm = merged["results"]["copy"]["runs"]["lstm"]
    assert set(merged["results"]) == {"copy"} and lstm["summary"]["seeds"] == [0, 1, 2]
    assert lstm["per_seed"]["2"]["unfinished"] and lstm["summary"]["eval_loss"]["n"] == 2
    assert "| copy | lstm | 5 |" in merged["table_markdown"] and "| 3 (unfinished: 2) |" in merged["table_markdown"]


@pytest.mark.slow
def test_bench_adapter_accuracy_chooses_lr_on_validation_and_resumes(tmp_path):
    """Tiny settings, two methods, two learning rates, two seeds: every run lands in the JSON, test accuracy is read
    only at the learning rate chosen on validation, and a second invocation finds nothing left to run."""
    out = tmp_path / "acc"
    args = ("--methods", "lora_r8,hta_r1", "--seeds", "0,1", "--lrs", "1e-3,1e-2", "--extend-up", "0", "--max-steps", "2",
            "--train", "20", "--val", "10", "--max-test", "32", "--image-size", "32", "--jobs", "1", "--out", str(out))
    run_script("bench_adapter_accuracy.py", *args)
    result = json.loads(out.with_suffix(".json").read_text())
    assert len(result["runs"]) == 2 * 2 * 2
    assert all(r["steps"] == 2 and r["ms_per_step"] > 0 for r in result["runs"])  # --max-steps reached the one loop
    for row in result["summary"]:
        mine = [r for r in result["runs"] if r["method"] == row["method"]]
        val_mean = {lr: sum(r["val_accuracy"] or 0.0 for r in mine if r["lr"] == lr) / 2 for lr in (1e-3, 1e-2)}
        assert row["lr"] == max(val_mean, key=val_mean.get)
        assert all((r["test_accuracy"] is not None) == (r["lr"] == row["lr"] and not r["diverged"]) for r in mine)
    assert "HTA lora_rank=1 vs LoRA r=8" in result["verdict"] and "not both measured" not in result["verdict"]
    assert out.with_suffix(".png").stat().st_size > 0
    run_script("bench_adapter_accuracy.py", *args)  # resumable: nothing is run twice
    assert len(json.loads(out.with_suffix(".json").read_text())["runs"]) == 8


@pytest.mark.slow
def test_bench_adapter_accuracy_track_a_runs_on_the_vit_and_mnist(tmp_path):
    """Track A's plumbing (the main job's ViT layout, MNIST 5k split, PEFT on attn_mlp) with a tiny random ViT."""
    out = tmp_path / "track_a"
    run_script("bench_adapter_accuracy.py", "--track", "a", "--quick", "--methods", "lora_r8,hta_r1", "--out", str(out))
    result = json.loads((tmp_path / "track_a_quick.json").read_text())
    assert result["settings"]["track"] == "a"
    assert {r["method"] for r in result["runs"]} == {"lora_r8", "hta_r1"}
    assert all(r["test_accuracy"] is not None for r in result["runs"])
    hta = next(r for r in result["runs"] if r["method"] == "hta_r1")
    lora = next(r for r in result["runs"] if r["method"] == "lora_r8")
    assert hta["trainable_params"] < lora["trainable_params"]


@pytest.mark.slow
def test_unitary_learning_curves_keeps_the_other_runs_when_one_fails(tmp_path):
    """A run that raises (here: pMNIST asked for more training images than the split has) is named in the results
    file and the exit status, and the runs beside it are kept."""
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "unitary_learning_curves.py"), "--tasks", "copy", "pmnist", "--models", "lstm",
         "--hidden", "lstm=5", "--seeds", "0", "--copy-steps", "3", "--pmnist-steps", "2", "--copy-delay", "5",
         "--batch-size", "4", "--train-size", "1000000", "--eval-size", "8", "--jobs", "2", "--out", str(tmp_path / "curves")],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 1 and "pmnist/lstm/seed0" in proc.stderr, (proc.stdout + proc.stderr)[-3000:]
    curves = json.loads((tmp_path / "curves.json").read_text())
    assert not curves["complete"] and [f["run"] for f in curves["failed_runs"]] == ["pmnist/lstm/seed0"]
    assert "exceeds the 4000 images" in curves["failed_runs"][0]["error"]
    assert list(curves["results"]) == ["copy"] and curves["results"]["copy"]["runs"]["lstm"]["per_seed"]["0"]["steps_done"] == 3
