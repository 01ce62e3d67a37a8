"""recipes/main_job.py end to end on minimal settings (the real run is README command 1)."""

import json
from pathlib import Path

import pytest

from recipes import main_job

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


def test_mean_and_sample_std_over_seeds_and_the_table():
    assert main_job.mean_std([0.5]) == (0.5, 0.0)
    mean, std = main_job.mean_std([0.90, 0.92, 0.97])
    assert mean == pytest.approx(0.93) and std == pytest.approx(((0.03**2 + 0.01**2 + 0.04**2) / 2) ** 0.5)
    runs = [{"seed": s, "test_accuracy": a, "val_accuracy": 0.9, "trainable_params": 12345, "total_params": 1234500,
             "train_time_s": t, "steps": 10} for s, a, t in ((0, 0.90, 10.0), (1, 0.92, 12.0), (2, 0.97, 14.68))]
    row = main_job.summarise("hta", runs)
    assert row["seeds"] == [0, 1, 2] and row["runs"] == runs
    table = main_job.format_table([row]).splitlines()
    assert table[0].startswith("| method | test accuracy (mean ± std, 3 seeds) |")
    assert f"| HTA (rank 1) | 93.00 ± {100 * std:.2f} % | 90.00 ± 0.00 % | 12,345 | 1.00 % | 12.2 |" in table


def test_backbone_cache_key_changes_with_the_pretraining_code(monkeypatch, tmp_path):
    """A backbone cached by other code is not reused: the digest covers the recipe sources it lists."""
    before = main_job.pretraining_code_digest()
    assert before == main_job.pretraining_code_digest()
    fake_root = tmp_path / "repo"
    for source in main_job.PRETRAINING_SOURCES:
        (fake_root / source).parent.mkdir(parents=True, exist_ok=True)
        (fake_root / source).write_bytes((main_job.ROOT / source).read_bytes())
    monkeypatch.setattr(main_job, "ROOT", fake_root)
    assert main_job.pretraining_code_digest() == before
    with open(fake_root / "recipes" / "common" / "data.py", "a") as f:
        f.write("\n# changed\n")
    assert main_job.pretraining_code_digest() != before


@pytest.mark.parametrize("extra, message", [
    (["--methods", "hta,adapterfusion"], "unknown method(s) ['adapterfusion']"),
    (["--seeds", "0,one"], "--seeds '0,one' is not a comma-separated list of integers"),
    (["--threads", "0"], "--threads must be an integer >= 1, got 0"),
])
def test_bad_input_is_one_line(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        main_job.main([*extra, "--output_dir", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "cache").exists()


@pytest.mark.slow
@pytest.mark.skipif(not FASHION_MNIST.exists(), reason="apt-get install -y dataset-fashion-mnist")
def test_main_job_pretrains_once_then_adapts_with_hta_and_lora(tmp_path, capsys):
    argv = ["--pretrain_steps", "2", "--pretrain_batch_size", "16", "--epochs", "0.1", "--batch_size", "16",
            "--max_eval_samples", "64", "--cache_dir", str(tmp_path / "cache"), "--output_dir", str(tmp_path / "out"),
            "--quiet", "--threads", "1", "--seeds", "0,1"]
    rows = main_job.main(argv)
    printed = capsys.readouterr().out
    assert [r["method"] for r in rows] == ["hta", "lora"] and [r["seeds"] for r in rows] == [[0, 1], [0, 1]]
    assert "threads: 1" in printed and "| HTA (rank 1) |" in printed and "| LoRA r=8 |" in printed
    hta, lora = rows
    assert 0 < hta["trainable_params"] < lora["trainable_params"]  # rank-1 HTA is smaller than LoRA r=8
    (backbone,) = (tmp_path / "cache").iterdir()
    assert {"config.json", "model.safetensors"} <= {p.name for p in backbone.iterdir()}
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["pretraining"]["steps"] == 2 and len(results["rows"]) == 2
    assert json.loads((tmp_path / "out" / "hta" / "seed_1" / "adapter_config.json").read_text())["peft_type"] == "HTA"

    again = main_job.main([*argv, "--methods", "hta"])  # second run: the cached backbone, no pre-training
    assert "(cached)" in capsys.readouterr().out
    # same thread count, same seeds: the same figures to the last bit
    assert [r["test_accuracy"] for r in again[0]["runs"]] == [r["test_accuracy"] for r in hta["runs"]]
    assert [r["val_accuracy"] for r in again[0]["runs"]] == [r["val_accuracy"] for r in hta["runs"]]
