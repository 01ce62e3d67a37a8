"""recipes/main_job.py end to end on minimal settings (the real run is README command 1)."""

import json
from pathlib import Path

import pytest

from recipes import main_job

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


def test_table_format():
    rows = [{"label": "HTA (rank 1)", "test_accuracy": 0.91234, "val_accuracy": 0.9, "trainable_params": 12345,
             "total_params": 1234500, "train_time_s": 12.34}]
    table = main_job.format_table(rows)
    assert "| HTA (rank 1) | 91.23 % | 90.00 % | 12,345 | 1.00 % | 12.3 |" in table.splitlines()


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


def test_unknown_method(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main_job.main(["--methods", "hta,adapterfusion"])
    assert exit_info.value.code == 2 and "adapterfusion" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(not FASHION_MNIST.exists(), reason="apt-get install -y dataset-fashion-mnist")
def test_main_job_pretrains_once_then_adapts_with_hta_and_lora(tmp_path, capsys):
    argv = ["--pretrain_steps", "2", "--pretrain_batch_size", "16", "--epochs", "0.1", "--batch_size", "16",
            "--max_eval_samples", "64", "--cache_dir", str(tmp_path / "cache"), "--output_dir", str(tmp_path / "out"), "--quiet", "--threads", "1"]
    rows = main_job.main(argv)
    printed = capsys.readouterr().out
    assert [r["method"] for r in rows] == ["hta", "lora"]
    assert "| HTA (rank 1) |" in printed and "| LoRA r=8 |" in printed
    hta, lora = rows
    assert 0 < hta["trainable_params"] < lora["trainable_params"]  # rank-1 HTA is smaller than LoRA r=8
    (backbone,) = (tmp_path / "cache").iterdir()
    assert {"config.json", "model.safetensors"} <= {p.name for p in backbone.iterdir()}
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["pretraining"]["steps"] == 2 and len(results["rows"]) == 2
    assert json.loads((tmp_path / "out" / "hta" / "adapter_config.json").read_text())["peft_type"] == "HTA"

    main_job.main([*argv, "--methods", "hta"])  # second run: the cached backbone, no pre-training
    assert "(cached)" in capsys.readouterr().out
