"""recipes/train_unitary_rnn.py on tiny settings: every task, optimizer and the LSTM baseline."""

import json

import pytest
import torch
from safetensors.torch import load_file

from recipes import train_unitary_rnn

TINY = ["--hidden_size", "8", "--batch_size", "8", "--eval_batches", "1", "--quiet", "--no_plot", "--threads", "1"]


def _run(tmp_path, *extra):
    out = tmp_path / "out"
    return out, train_unitary_rnn.main([*TINY, "--output_dir", str(out), *extra])


@pytest.mark.parametrize("optimizer", ["cayley", "projunn_d", "projunn_t"])
def test_copy_task_stays_unitary_and_saves_a_loadable_model(tmp_path, optimizer):
    from transformers import AutoModelForTokenClassification

    import unitary_rnn  # noqa: F401

    out, m = _run(tmp_path, "--task", "copy", "--seq_len", "4", "--optimizer", optimizer, "--rank", "2",
                  "--max_train_steps", "5", "--unitary_lr", "1e-2")
    assert m["steps"] == 5 and m["unitarity_error"] < 1e-4
    assert m["baseline_loss"] == pytest.approx(10 * __import__("math").log(8) / 24)
    assert {"config.json", "model.safetensors", "modeling_unitary_rnn.py", "README.md"} <= {p.name for p in out.iterdir()}
    model = AutoModelForTokenClassification.from_pretrained(out)
    assert model.config.hidden_size == 8
    card = (out / "README.md").read_text()  # the card names the manifold step that trained W
    assert {"cayley": "Cayley step", "projunn_d": "projUNN-D (rank 2)", "projunn_t": "projUNN-T (rank 2)"}[optimizer] in card


@pytest.mark.parametrize("optimizer", ["cayley", "projunn_t"])
def test_resume_continues_without_losing_steps(tmp_path, optimizer):
    # 40 sequences in batches of 8: 5 steps per epoch, so step 7 resumes mid-epoch and step 10 crosses an epoch end
    common = ["--task", "copy", "--seq_len", "4", "--max_train_steps", "12", "--train_samples", "40",
              "--optimizer", optimizer, "--rank", "2", "--unitary_lr", "1e-2"]
    straight, m1 = _run(tmp_path / "straight", *common, "--checkpointing_steps", "7")
    assert (straight / "checkpoints" / "step_7").is_dir()
    resumed, m2 = _run(tmp_path / "resumed", *common, "--resume_from_checkpoint", str(straight / "checkpoints" / "step_7"))
    assert m2["steps"] == 12 and m2["history"]["step"] == list(range(1, 13))
    assert m2["history"] == m1["history"]  # bit for bit: losses, rates, held-out figures
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_resume_from_a_missing_checkpoint_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        _run(tmp_path, "--max_train_steps", "2", "--resume_from_checkpoint", "latest")
    assert "--resume_from_checkpoint 'latest': no such checkpoint folder" in capsys.readouterr().err


def test_adding_task_restricted_and_lstm(tmp_path):
    _, urnn = _run(tmp_path, "--task", "adding", "--seq_len", "10", "--parametrization", "restricted",
                   "--max_train_steps", "3")
    assert urnn["eval_accuracy"] is None and urnn["eval_loss"] > 0 and urnn["parametrization"] == "restricted"
    out, lstm = _run(tmp_path, "--task", "adding", "--seq_len", "10", "--model", "lstm", "--max_train_steps", "3")
    assert lstm["optimizer"] == "rmsprop" and "lstm.weight_hh_l0" in load_file(out / "model.safetensors")
    assert json.loads((out / "config.json").read_text())["model"] == "lstm"


@pytest.mark.slow
def test_permuted_pixel_mnist_and_learning(tmp_path):
    _, m = _run(tmp_path, "--task", "permuted_pixel_mnist", "--dataset", "mnist_5k", "--max_train_steps", "2",
                "--train_samples", "16")
    assert m["seq_len"] == 784 and 0.0 <= m["eval_accuracy"] <= 1.0
    _, copy = _run(tmp_path, "--task", "copy", "--seq_len", "3", "--max_train_steps", "150", "--lr", "1e-2",
                   "--unitary_lr", "1e-2", "--hidden_size", "16", "--eval_batches", "4")
    assert copy["eval_loss"] < copy["history"]["eval_loss"][0]  # it learns


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--task", "parity"], "unknown --task 'parity'"),
        (["--task", "pixel_mnist", "--dataset", "cifar10"], "unknown --dataset 'cifar10'"),
        (["--model", "gru"], "unknown --model 'gru'"),
        (["--optimizer", "sgd"], "unknown --optimizer 'sgd'; choose one of cayley, projunn_d, projunn_t"),
        (["--field", "real", "--parametrization", "restricted"], "field='real'"),
        (["--hidden_size", "0"], "--hidden_size must be an integer >= 1, got 0"),
        (["--seq_len", "1"], "--seq_len must be an integer >= 2, got 1"),
        (["--rank", "0"], "--rank must be an integer >= 1, got 0"),
        (["--optimizer", "projunn_d", "--rank", "9"], "--rank must be an integer in [1, --hidden_size 8], got 9"),
        (["--lr", "-0.1"], "--lr must be a number > 0, got -0.1"),
        (["--unitary_lr", "0"], "--unitary_lr must be a number > 0, got 0.0"),
        (["--batch_size", "0"], "--batch_size must be an integer >= 1, got 0"),
        (["--max_train_steps", "0"], "--max_train_steps must be an integer >= 1, got 0"),
        (["--train_samples", "0"], "--train_samples must be an integer >= 1, got 0"),
        (["--eval_batches", "0"], "--eval_batches must be an integer >= 1, got 0"),
        (["--eval_every", "0"], "--eval_every must be an integer >= 1, got 0"),
        (["--checkpointing_steps", "-1"], "--checkpointing_steps must be an integer >= 1, got -1"),
    ],
)
def test_bad_input(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        _run(tmp_path, *extra) if "--max_train_steps" in extra else _run(tmp_path, "--max_train_steps", "1", *extra)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "out").exists()


def test_output_dir_that_is_a_file_fails_before_any_work(tmp_path, capsys):
    (tmp_path / "out").write_text("x")
    with pytest.raises(SystemExit) as exit_info:  # pixel MNIST would parse a dataset first: it is not reached
        train_unitary_rnn.main([*TINY, "--task", "pixel_mnist", "--output_dir", str(tmp_path / "out" / "sub")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --output_dir {str(tmp_path / 'out' / 'sub')!r} cannot be created: "
                   f"{str(tmp_path / 'out')!r} is a file"]
