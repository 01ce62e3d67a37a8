"""recipes/finetune_vit.py on a tiny ViT: methods, outputs, bad input, resuming."""

import json

import pytest
import torch
from safetensors.torch import load_file

from recipes import finetune_vit
from recipes.common import RecipeError
from recipes.common.models import TARGET_PRESETS

# A ViT small enough for a training step in milliseconds: 28x28 grey images, 16 patches, width 32.
TINY_VIT = "vit_tiny_patch16_224"
TINY_VIT_KWARGS = '{"img_size": 28, "patch_size": 7, "embed_dim": 32, "depth": 2, "num_heads": 2, "in_chans": 1}'
BASE = ["--model", TINY_VIT, "--random_init", "--model_kwargs", TINY_VIT_KWARGS, "--dataset", "mnist_5k",
        "--batch_size", "16", "--eval_batch_size", "128", "--max_eval_samples", "64", "--quiet", "--threads", "1"]


def _run(tmp_path, *extra, name="out"):
    out = tmp_path / name
    metrics = finetune_vit.main([*BASE, "--output_dir", str(out), *extra])
    return out, metrics


def _hta_params(fan_in, fan_out, r=1):
    """u_in (in) + u_out (out) + d (min) + B A (r (in + out))."""
    return fan_in + fan_out + min(fan_in, fan_out) + r * (fan_in + fan_out)


@pytest.mark.slow
def test_hta_run_writes_adapter_metrics_and_curves(tmp_path):
    out, m = _run(tmp_path, "--method", "hta", "--max_train_steps", "8", "--eval_every", "4")
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md", "metrics.json", "training_curves.png"} <= {
        p.name for p in out.iterdir()}
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["steps"] == 8 and on_disk["history"]["eval_step"] == [4, 8]
    assert 0.0 <= on_disk["test_accuracy"] <= 1.0 and all(map(lambda v: v == v, on_disk["history"]["loss"]))
    # every adapted layer of the 2 blocks (width 32, MLP 128) plus the 10-class head; timm's fused qkv is three
    # 32 x 32 projections, one HTA block each (the paper's q, k, v)
    per_block = 3 * _hta_params(32, 32) + _hta_params(32, 32) + _hta_params(32, 128) + _hta_params(128, 32)
    assert m["trainable_params"] == 2 * per_block + (32 * 10 + 10)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "HTA" and config["modules_to_save"] == ["head"]
    assert sorted(config["target_modules"]) == sorted(TARGET_PRESETS["timm"]["attn_mlp"])
    assert "hta" in (out / "README.md").read_text()  # the HTA card (hh_peft.card)


def test_lora_and_linear_parameter_counts(tmp_path):
    _, lora = _run(tmp_path, "--method", "lora", "--lora_r", "2", "--target_preset", "qkv", "--max_train_steps", "2",
                   "--no_plot", name="lora")
    assert lora["trainable_params"] == 2 * 2 * (32 + 96) + 330  # r (in + out) per block, plus the head
    out, linear = _run(tmp_path, "--method", "linear", "--max_train_steps", "2", "--no_plot", name="linear")
    assert linear["trainable_params"] == 330
    assert {"config.json", "model.safetensors"} <= {p.name for p in out.iterdir()}  # a timm folder


def test_training_reduces_the_loss(tmp_path):
    _, m = _run(tmp_path, "--method", "full", "--max_train_steps", "40", "--lr", "1e-3", "--no_plot",
                "--warmup_ratio", "0")
    loss = m["history"]["loss"]
    assert sum(loss[-10:]) / 10 < sum(loss[:10]) / 10


def test_resume_continues_without_losing_steps(tmp_path):
    common = ["--method", "hta", "--max_train_steps", "6", "--no_plot", "--adapter_dropout", "0.1"]
    straight, m1 = _run(tmp_path, *common, "--checkpointing_steps", "3", name="straight")
    assert (straight / "checkpoints" / "step_3").is_dir() and (straight / "checkpoints" / "step_6").is_dir()
    resumed, m2 = _run(tmp_path, *common, "--resume_from_checkpoint", str(straight / "checkpoints" / "step_3"),
                       name="resumed")
    assert m2["steps"] == 6 and m2["history"]["step"] == list(range(1, 7))
    assert m2["history"] == m1["history"]  # bit for bit: losses, rates, held-out figures
    a, b = load_file(straight / "adapter_model.safetensors"), load_file(resumed / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _tiny_timm_folder(tmp_path):
    import timm
    from timm.models import save_for_hf

    kwargs = json.loads(TINY_VIT_KWARGS)
    folder = tmp_path / "tiny_vit"
    save_for_hf(timm.create_model(TINY_VIT, num_classes=3, **kwargs), str(folder), model_args=kwargs,
                safe_serialization=True)
    return folder


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--method", "ia3"], "unknown --method 'ia3'; choose one of hta, lora, hra, full, linear"),
        (["--target_preset", "everything"], "unknown --target_preset 'everything'"),
        (["--target_preset", "qv"], "fuses q, k, v"),
        (["--dataset", "no-such-owner-hh/no-such-dataset"], "dataset 'no-such-owner-hh/no-such-dataset' could not be loaded"),
        (["--model", "no_such_model_hh"], "model 'no_such_model_hh' not found"),
        (["--lora_rank", "-1"], "--method hta:"),
        (["--householder", "exact"], "--method hta:"),
        (["--model_kwargs", "{bad json"], "--model_kwargs is not a JSON object"),
        (["--batch_size", "0"], "--batch_size must be an integer >= 1, got 0"),
        (["--max_train_steps", "0"], "--max_train_steps must be an integer >= 1, got 0"),
        (["--lr", "0"], "--lr must be a number > 0, got 0.0"),
        (["--lr=-1e-3"], "--lr must be a number > 0, got -0.001"),
        (["--epochs", "0"], "--epochs must be a number > 0, got 0.0"),
        (["--warmup_ratio", "1"], "--warmup_ratio must be a number in [0, 1), got 1.0"),
        (["--weight_decay", "-1"], "--weight_decay must be a number >= 0, got -1.0"),
        (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps must be an integer >= 1, got 0"),
        (["--checkpointing_steps", "0"], "--checkpointing_steps must be an integer >= 1, got 0"),
        (["--eval_batch_size", "-2"], "--eval_batch_size must be an integer >= 1, got -2"),
        (["--adapter_dropout", "1.0"], "--adapter_dropout must be a number in [0, 1), got 1.0"),
        (["--threads", "0"], "--threads must be an integer >= 1, got 0"),
    ],
)
def test_bad_input_is_one_line_before_training(tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        finetune_vit.main([*BASE, "--output_dir", str(out), *extra])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not out.exists()  # nothing was trained or written


@pytest.mark.parametrize("where", ["a_file", "under_a_file", "unwritable"])
def test_unusable_output_dir_fails_before_loading_anything(tmp_path, capsys, where):
    """Checked first: the dataset named here does not exist, yet the error is about --output_dir."""
    (tmp_path / "a_file").write_text("x")
    out = {"a_file": tmp_path / "a_file", "under_a_file": tmp_path / "a_file" / "out",
           "unwritable": "/proc/hh-peft-out"}[where]  # nothing can be created in /proc, not even by root
    with pytest.raises(SystemExit) as exit_info:
        finetune_vit.main([*BASE, "--dataset", "no-such-owner-hh/no-such-dataset", "--output_dir", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --output_dir {str(out)!r} "), err
    assert {"a_file": "is a file", "under_a_file": "is a file", "unwritable": "cannot be created"}[where] in err[0]


def test_image_size_the_model_cannot_take(tmp_path):
    folder = _tiny_timm_folder(tmp_path)
    args = finetune_vit.build_parser().parse_args(
        ["--model", str(folder), "--image_size", "32", "--output_dir", str(tmp_path / "o"), "--dataset", "mnist_5k"])
    with pytest.raises(RecipeError, match=r"takes 28x28 images only .* not --image_size 32"):
        finetune_vit.run(args)


def test_local_timm_folder_and_resume_errors(tmp_path):
    folder = _tiny_timm_folder(tmp_path)
    argv = ["--model", str(folder), "--dataset", "mnist_5k", "--method", "hta", "--max_train_steps", "2",
            "--batch_size", "8", "--max_eval_samples", "16", "--quiet", "--no_plot", "--output_dir", str(tmp_path / "o")]
    m = finetune_vit.main(argv)
    assert m["num_labels"] == 10 and m["image_size"] == [1, 28, 28]
    with pytest.raises(RecipeError, match="no such checkpoint"):
        finetune_vit.run(finetune_vit.build_parser().parse_args([*argv, "--resume_from_checkpoint", "latest",
                                                                 "--output_dir", str(tmp_path / "empty")]))


def test_transformers_vit_presets(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification

    folder = tmp_path / "hf_vit"
    ViTForImageClassification(ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=28,
        patch_size=7, num_channels=1, num_labels=3,
    )).save_pretrained(folder)
    argv = ["--model", str(folder), "--dataset", "mnist_5k", "--method", "hta", "--target_preset", "qv",
            "--max_train_steps", "2", "--batch_size", "8", "--max_eval_samples", "16", "--quiet", "--no_plot"]
    m = finetune_vit.main([*argv, "--output_dir", str(tmp_path / "o")])
    config = json.loads((tmp_path / "o" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"] and config["modules_to_save"] == ["classifier"]
    assert m["trainable_params"] == 2 * 2 * _hta_params(32, 32) + (32 * 10 + 10)
