"""The transformers models: shapes, losses, save/load, Auto classes, trust_remote_code, dtype casts."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from unitary_rnn import (
    UnitaryRNNConfig,
    UnitaryRNNForSequenceClassification,
    UnitaryRNNForTokenClassification,
    UnitaryRNNModel,
    UnitaryRNNModelOutput,
)
from unitary_rnn.manifold import manifold_of, unitarity_error


def _config(**kw):
    kw.setdefault("hidden_size", 8)
    kw.setdefault("vocab_size", 10)
    return UnitaryRNNConfig(**kw)


# ------------------------------------------------------------------ config
def test_config_defaults_and_resolution():
    c = UnitaryRNNConfig()
    assert (c.model_type, c.parametrization, c.field, c.unitary_init, c.input_size) == ("unitary_rnn", "full", "complex", "restricted", 1)
    assert UnitaryRNNConfig(field="real").unitary_init == "random"
    assert UnitaryRNNConfig(vocab_size=10).input_size == 10  # one-hot: x_t is the one-hot vector
    assert UnitaryRNNConfig(vocab_size=10, input_embedding="embedding", input_size=4).input_size == 4
    assert c.feature_size == 256 and UnitaryRNNConfig(field="real").feature_size == 128


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(parametrization="givens"), r"parametrization='givens'.*'full', 'restricted'"),
        (dict(field="quaternion"), r"'complex', 'real'"),
        (dict(restricted_apply="loop"), r"'auto', 'matrix', 'fft'"),
        (dict(nonlinearity="tanh"), r"'modrelu'"),
        (dict(unitary_init="zeros"), r"'identity', 'random', 'restricted'"),
        (dict(input_embedding="linear"), r"'one_hot', 'embedding'"),
        (dict(field="real", parametrization="restricted"), r"needs parametrization='full'"),
        (dict(parametrization="restricted", unitary_init="identity"), r"needs unitary_init='restricted'"),
        (dict(field="real", unitary_init="restricted"), r"'identity', 'random'"),
        (dict(vocab_size=10, input_size=3), r"input_size == vocab_size"),
        (dict(input_embedding="embedding"), r"needs vocab_size"),
        (dict(num_hidden_layers=2), r"num_hidden_layers=1"),
        (dict(hidden_size=0), r"hidden_size"),
    ],
)
def test_config_rejects_invalid_choices(kw, match):
    with pytest.raises(ValueError, match=match):
        UnitaryRNNConfig(**kw)


LEGACY = {"optimizer": "projunn_t", "unitary_learning_rate": 0.0123, "learning_rate": 0.002, "base_optimizer": "adam",
          "rmsprop_unitary": True, "projunn_rank": 3, "projunn_sampling": "column", "reproject_every": 50}


def test_config_holds_no_training_settings():
    config = UnitaryRNNConfig()
    for key in LEGACY:
        assert not hasattr(config, key), key
        assert key not in config.to_dict(), key


def test_a_config_json_saved_with_optimizer_settings_still_loads(tmp_path, caplog):
    """A folder written before the training settings left the configuration: its model loads, the keys are dropped
    (and not written again), and one warning says which create_optimizer call replaces them."""
    model = UnitaryRNNForTokenClassification(_config(num_labels=4))
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**saved, **LEGACY}))
    with caplog.at_level("WARNING", logger="unitary_rnn.configuration_unitary_rnn"):
        loaded = AutoModelForTokenClassification.from_pretrained(tmp_path)
    messages = [r.getMessage() for r in caplog.records if "ignoring" in r.getMessage()]
    assert len(messages) == 1, messages
    assert "unitary_rnn.training.create_optimizer(model, method='projunn_t', unitary_lr=0.0123, lr=0.002, " \
           "base_optimizer='adam', rmsprop_unitary=True, rank=3, sampling='column', reproject_every=50)" in messages[0]
    for key in LEGACY:
        assert not hasattr(loaded.config, key), key
    torch.testing.assert_close(loaded.model.cell.recurrent_weight, model.model.cell.recurrent_weight, rtol=0, atol=0)
    loaded.save_pretrained(tmp_path / "again")
    assert not set(LEGACY) & set(json.loads((tmp_path / "again" / "config.json").read_text()))


def test_passing_a_training_setting_to_the_config_warns(caplog):
    with caplog.at_level("WARNING", logger="unitary_rnn.configuration_unitary_rnn"):
        config = UnitaryRNNConfig(optimizer="cayley", unitary_learning_rate=0.0456)
    assert "create_optimizer(model, method='cayley', unitary_lr=0.0456)" in caplog.text
    assert not hasattr(config, "optimizer") and not hasattr(config, "unitary_learning_rate")


# ------------------------------------------------------------------ shapes and outputs
@pytest.mark.parametrize("field,width", [("complex", 16), ("real", 8)])
def test_base_model_shapes(field, width):
    model = UnitaryRNNModel(_config(field=field))
    out = model(input_ids=torch.randint(0, 10, (3, 7)), output_hidden_states=True)
    assert isinstance(out, UnitaryRNNModelOutput)
    assert out.last_hidden_state.shape == (3, 7, width)
    assert out.final_state.shape == (3, width)
    torch.testing.assert_close(out.final_state, out.last_hidden_state[:, -1])
    x, states = out.hidden_states
    assert x.shape == (3, 7, 10) and torch.equal(states, out.last_hidden_state)
    assert torch.equal(x.sum(-1), torch.ones(3, 7))  # one-hot
    assert model(input_ids=torch.randint(0, 10, (3, 7))).hidden_states is None


def test_inputs_embeds_and_embedding_mode():
    model = UnitaryRNNModel(_config(input_embedding="embedding", input_size=4))
    ids = torch.randint(0, 10, (2, 5))
    a = model(input_ids=ids).last_hidden_state
    b = model(inputs_embeds=model.get_input_embeddings()(ids)).last_hidden_state
    torch.testing.assert_close(a, b)
    float_model = UnitaryRNNModel(UnitaryRNNConfig(input_size=2, hidden_size=8))
    assert float_model.get_input_embeddings() is None
    assert float_model(inputs_embeds=torch.rand(2, 5, 2)).last_hidden_state.shape == (2, 5, 16)
    with pytest.raises(ValueError, match="vocab_size"):
        float_model(input_ids=ids)


def test_input_errors():
    model = UnitaryRNNModel(_config())
    ids = torch.randint(0, 10, (2, 5))
    with pytest.raises(ValueError, match="exactly one"):
        model(input_ids=ids, inputs_embeds=torch.rand(2, 5, 10))
    with pytest.raises(ValueError, match="exactly one"):
        model()
    with pytest.raises(ValueError, match="input_size=10"):
        model(inputs_embeds=torch.rand(2, 5, 3))
    with pytest.raises(ValueError, match=r"\(batch, time\)"):
        model(input_ids=ids[0])


def test_return_dict_false_gives_tuples():
    model = UnitaryRNNForTokenClassification(_config(num_labels=3))
    out = model(input_ids=torch.randint(0, 10, (2, 4)), labels=torch.zeros(2, 4, dtype=torch.long), return_dict=False)
    assert isinstance(out, tuple) and out[0].ndim == 0 and out[1].shape == (2, 4, 3)


# ------------------------------------------------------------------ heads and losses
def test_sequence_regression_is_mse_on_last_step():
    model = UnitaryRNNForSequenceClassification(UnitaryRNNConfig(input_size=2, hidden_size=8, num_labels=1))
    x, y = torch.rand(4, 6, 2), torch.rand(4)
    out = model(inputs_embeds=x, labels=y)
    assert out.logits.shape == (4, 1) and model.config.problem_type == "regression"
    last = model.model(inputs_embeds=x).final_state
    torch.testing.assert_close(out.logits, model.classifier(last))
    torch.testing.assert_close(out.loss, torch.nn.functional.mse_loss(out.logits.squeeze(-1), y))


def test_sequence_classification_losses():
    model = UnitaryRNNForSequenceClassification(_config(num_labels=3))
    ids, y = torch.randint(0, 10, (4, 6)), torch.tensor([0, 2, 1, 2])
    out = model(input_ids=ids, labels=y)
    assert model.config.problem_type == "single_label_classification"
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits, y))
    multi = UnitaryRNNForSequenceClassification(_config(num_labels=3, problem_type="multi_label_classification"))
    targets = torch.randint(0, 2, (4, 3)).float()
    out = multi(input_ids=ids, labels=targets)
    torch.testing.assert_close(out.loss, torch.nn.functional.binary_cross_entropy_with_logits(out.logits, targets))
    out.loss.backward()


def test_sequence_classification_reads_last_unpadded_step():
    model = UnitaryRNNForSequenceClassification(_config(num_labels=2))
    ids = torch.randint(0, 10, (2, 6))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    logits = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(logits[0], model(input_ids=ids[:1]).logits[0])
    torch.testing.assert_close(logits[1], model(input_ids=ids[1:, :3]).logits[0])
    with pytest.raises(ValueError, match="right padding"):
        model(input_ids=ids, attention_mask=torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]]))


def test_token_classification_ignores_minus_100():
    model = UnitaryRNNForTokenClassification(_config(num_labels=9))
    ids = torch.randint(0, 10, (3, 8))
    labels = torch.randint(0, 9, (3, 8))
    labels[:, :5] = -100
    out = model(input_ids=ids, labels=labels)
    assert out.logits.shape == (3, 8, 9)
    expected = torch.nn.functional.cross_entropy(out.logits[:, 5:].reshape(-1, 9), labels[:, 5:].reshape(-1))
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    W = model.model.cell.recurrent_weight
    assert W.grad is not None and W.grad.dtype == torch.complex64 and torch.isfinite(torch.view_as_real(W.grad)).all()
    for name, p in model.named_parameters():
        assert p.grad is not None, name


def test_restricted_model_trains_its_7n_parameters():
    model = UnitaryRNNForTokenClassification(_config(parametrization="restricted", num_labels=3))
    out = model(input_ids=torch.randint(0, 10, (2, 5)), labels=torch.randint(0, 3, (2, 5)))
    out.loss.backward()
    cell = model.model.cell
    for name in ("theta1", "theta2", "theta3", "reflection1", "reflection2"):
        assert torch.isfinite(getattr(cell, name).grad).all() and getattr(cell, name).grad.abs().sum() > 0
    assert unitarity_error(model.model.recurrent_matrix().detach()) < 1e-5


@pytest.mark.parametrize("init", ["identity", "random", "restricted"])
def test_model_w_unitary_after_post_init(init):
    model = UnitaryRNNModel(_config(hidden_size=24, unitary_init=init))
    assert unitarity_error(model.cell.recurrent_weight.detach()) < 1e-5


# ------------------------------------------------------------------ save / load
@pytest.mark.parametrize("kw", [dict(), dict(parametrization="restricted"), dict(field="real")])
def test_save_load_is_bit_exact(tmp_path, kw):
    model = UnitaryRNNForTokenClassification(_config(num_labels=4, **kw))
    model.save_pretrained(tmp_path)
    stored = load_file(tmp_path / "model.safetensors")
    if kw == {}:
        assert stored["model.cell.recurrent_weight"].dtype == torch.complex64
    loaded = UnitaryRNNForTokenClassification.from_pretrained(tmp_path)
    original = model.state_dict()
    for name, value in loaded.state_dict().items():
        assert value.dtype == original[name].dtype and torch.equal(value, original[name]), name
    if kw.get("parametrization") != "restricted":
        W = loaded.model.cell.recurrent_weight
        assert manifold_of(W) is not None and W.requires_grad  # still trainable by the manifold optimizers
    ids = torch.randint(0, 10, (2, 5))
    assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)


def test_load_with_bfloat16_keeps_w_complex(tmp_path):
    model = UnitaryRNNForSequenceClassification(_config(num_labels=2))
    model.save_pretrained(tmp_path)
    loaded = UnitaryRNNForSequenceClassification.from_pretrained(tmp_path, dtype=torch.bfloat16)
    W = loaded.model.cell.recurrent_weight
    assert W.dtype == torch.complex64 and torch.equal(W, model.model.cell.recurrent_weight)
    assert loaded.classifier.weight.dtype == torch.bfloat16
    assert torch.isfinite(loaded(input_ids=torch.randint(0, 10, (2, 5))).logits).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_restricted_model_loads_and_trains_in_half_precision(tmp_path, dtype):
    """from_pretrained(dtype=bf16) builds the model under a bf16 default dtype: the restricted angles and reflections
    are still created in float32 (in bf16 the FFT and complex kernels failed), and keep the saved values exactly."""
    model = UnitaryRNNForTokenClassification(_config(num_labels=3, parametrization="restricted"))
    model.save_pretrained(tmp_path)
    loaded = UnitaryRNNForTokenClassification.from_pretrained(tmp_path, dtype=dtype)
    cell = loaded.model.cell
    for name in ("theta1", "theta2", "theta3", "reflection1", "reflection2"):
        assert getattr(cell, name).dtype == torch.float32 and torch.equal(getattr(cell, name), getattr(model.model.cell, name))
    assert loaded.classifier.weight.dtype == dtype
    ids, labels = torch.randint(0, 10, (2, 5)), torch.randint(0, 3, (2, 5))
    out = loaded(input_ids=ids, labels=labels)
    out.loss.backward()
    assert torch.isfinite(cell.theta1.grad).all()
    torch.testing.assert_close(out.logits.float(), model(input_ids=ids).logits, rtol=0, atol=2e-2)


@pytest.mark.parametrize("cast", ["to_bf16", "half", "float"])
def test_model_casts_keep_w_complex(cast):
    model = UnitaryRNNForTokenClassification(_config(num_labels=3))
    W0 = model.model.cell.recurrent_weight.detach().clone()
    {"to_bf16": lambda: model.to(torch.bfloat16), "half": model.half, "float": model.float}[cast]()
    W = model.model.cell.recurrent_weight
    assert W.dtype == torch.complex64 and torch.equal(W.detach(), W0) and manifold_of(W) == "unitary"
    logits = model(input_ids=torch.randint(0, 10, (2, 5))).logits
    assert logits.dtype == model.classifier.weight.dtype and torch.isfinite(logits).all()


# ------------------------------------------------------------------ Auto classes and remote code
def test_auto_classes_after_import(tmp_path):
    config = AutoConfig.for_model("unitary_rnn", hidden_size=8, vocab_size=10)
    assert isinstance(config, UnitaryRNNConfig)
    assert type(AutoModel.from_config(config)) is UnitaryRNNModel
    assert type(AutoModelForSequenceClassification.from_config(config)) is UnitaryRNNForSequenceClassification
    assert type(AutoModelForTokenClassification.from_config(config)) is UnitaryRNNForTokenClassification
    UnitaryRNNForSequenceClassification(config).save_pretrained(tmp_path)
    assert type(AutoModelForSequenceClassification.from_pretrained(tmp_path)) is UnitaryRNNForSequenceClassification


_FRESH_PROCESS = textwrap.dedent(
    """
    import json, sys
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForTokenClassification
    folder = sys.argv[1]
    model = AutoModelForTokenClassification.from_pretrained(folder, trust_remote_code=True)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    assert "unitary_rnn" not in sys.modules, "the fresh process imported the installed package"
    stored = load_file(folder + "/model.safetensors")
    exact = all(torch.equal(v, stored[k]) for k, v in model.state_dict().items())
    W = model.model.cell.recurrent_weight
    ids = torch.load(folder + "/ids.pt")
    torch.save(model(input_ids=ids).logits, folder + "/logits_remote.pt")
    print(json.dumps({
        "model_module": type(model).__module__, "config_class": type(config).__name__, "exact": exact,
        "dtype": str(W.dtype), "manifold": getattr(W, "manifold", None), "requires_grad": W.requires_grad,
    }))
    """
)


def test_trust_remote_code_in_fresh_process(tmp_path):
    model = UnitaryRNNForTokenClassification(_config(num_labels=5))
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["auto_map"]["AutoModelForTokenClassification"] == "modeling_unitary_rnn.UnitaryRNNForTokenClassification"
    assert saved["auto_map"]["AutoConfig"] == "configuration_unitary_rnn.UnitaryRNNConfig"
    for code in ("modeling_unitary_rnn.py", "configuration_unitary_rnn.py", "cells.py", "parametrizations.py", "manifold.py"):
        assert (tmp_path / code).is_file(), code
    ids = torch.randint(0, 10, (2, 6))
    torch.save(ids, tmp_path / "ids.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    script = tmp_path / "load.py"
    script.write_text(_FRESH_PROCESS)
    # -I: isolated mode, so neither the working directory nor PYTHONPATH puts the repository on sys.path
    result = subprocess.run(
        [sys.executable, "-I", str(script), str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads(result.stdout.strip().splitlines()[-1])
    assert info["model_module"].startswith("transformers_modules."), info
    assert info == dict(info, config_class="UnitaryRNNConfig", exact=True, dtype="torch.complex64", manifold="unitary", requires_grad=True)
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "logits_remote.pt"), model(input_ids=ids).logits, rtol=0, atol=0)


# ------------------------------------------------------------------ end to end
@pytest.mark.parametrize("kw", [dict(), dict(field="real"), dict(parametrization="restricted")])
def test_training_lowers_loss_and_keeps_w_on_the_manifold(kw):
    """A short copy task trained with the project's optimizer."""
    optim = pytest.importorskip("unitary_rnn.training.optim")
    from unitary_rnn.training.tasks import CopyMemoryTask

    task = CopyMemoryTask(delay=5, copy_length=3, num_symbols=4)
    data = task.generate(64, seed=0)
    config = UnitaryRNNConfig(
        vocab_size=task.vocab_size, hidden_size=16, num_labels=task.num_labels, **kw,
    )
    torch.manual_seed(0)
    model = UnitaryRNNForTokenClassification(config)
    opt = optim.create_optimizer(model, lr=1e-2, unitary_lr=1e-2)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = model(**data).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses[::10]
    assert unitarity_error(model.model.recurrent_matrix().detach()) < 1e-4
