"""Unitary-RNN cards and pushing, offline: ``fake_hub`` (tests/conftest.py) replaces the Hub's network calls."""

import os
import subprocess
import sys

import pytest
import torch
from huggingface_hub import ModelCard

import unitary_rnn
from unitary_rnn import UnitaryRNNConfig, UnitaryRNNForSequenceClassification, UnitaryRNNForTokenClassification
from unitary_rnn import card


def _model(cls=UnitaryRNNForSequenceClassification, **kw):
    torch.manual_seed(0)
    return cls(UnitaryRNNConfig(input_size=1, hidden_size=8, num_labels=10, **kw))


def test_push_uploads_config_weights_code_and_card(fake_hub):
    model = _model()
    unitary_rnn.set_card_info(model, task="pixel MNIST", dataset="mnist_5k", metrics={"accuracy": 0.42},
                              task_type="image-classification", optimizer="cayley")
    model.push_to_hub("me/urnn", tags=["pixel-mnist"])
    files = fake_hub.repos["me/urnn"]
    assert {"README.md", "config.json", "model.safetensors", "modeling_unitary_rnn.py",
            "configuration_unitary_rnn.py"} <= set(files)
    assert "card.py" not in files  # the card code is not part of the exported model code
    assert not any(name.endswith((".bin", ".pt")) for name in files)
    pushed = fake_hub.card("me/urnn")
    data = pushed.data.to_dict()
    assert data["library_name"] == "transformers"
    assert {"unitary-rnn", "custom_code", "pixel-mnist"} <= set(data["tags"])
    result = data["model-index"][0]["results"][0]
    assert result["task"]["type"] == "image-classification"
    assert result["metrics"][0] == {"type": "accuracy", "value": 0.42}
    assert 'AutoModelForSequenceClassification.from_pretrained("me/urnn", trust_remote_code=True)' in pushed.text
    assert "multiplicative Cayley step" in pushed.text
    assert "has been pushed on the Hub" not in pushed.text  # not transformers' generic card


def test_card_tags_are_transformers_model_tags(tmp_path):
    model = _model()
    model.add_model_tags(["copy-task"])
    unitary_rnn.write_model_card(model, tmp_path)
    assert ModelCard.load(tmp_path / "README.md").data.tags == ["unitary-rnn", "custom_code", "copy-task"]


def test_save_pretrained_push_to_hub_uploads_the_card_too(fake_hub, tmp_path):
    """transformers' other push path (``save_pretrained(push_to_hub=True)``) ends in the same upload step."""
    model = _model()
    model.save_pretrained(tmp_path / "me-urnn-save", push_to_hub=True, repo_id="me/urnn-save")
    assert "unitary-rnn" in fake_hub.card("me/urnn-save").data.tags
    assert ModelCard.load(tmp_path / "me-urnn-save" / "README.md").data.tags == fake_hub.card("me/urnn-save").data.tags


def test_training_method_comes_from_card_info_then_config():
    model = _model()
    unitary_rnn.set_card_info(model, optimizer="projunn_t", projunn_rank=4)
    assert "projUNN-T (rank 4): W <- W exp(-lr skew(W^H a b^H))" in card.model_card_for(model).text

    class NoTrainingSettings:  # a config without the training defaults
        parametrization = "full"

    assert card.training_method(NoTrainingSettings()) == "a manifold optimizer (see the training settings)"
    assert card.training_method(NoTrainingSettings(), "projunn_d", 2) == "projUNN-D (rank 2): W <- polar(W - lr a b^H)"
    with pytest.raises(ValueError, match="'cayley', 'projunn_d', 'projunn_t'|cayley, projunn_d, projunn_t"):
        unitary_rnn.set_card_info(model, optimizer="adam")


def test_card_variants(tmp_path):
    real = _model(UnitaryRNNForTokenClassification, field="real")
    unitary_rnn.write_model_card(real, tmp_path, repo_id="me/ornn")
    saved = ModelCard.load(tmp_path / "README.md")
    assert "orthogonal-rnn" in saved.data.tags and "W in O(8)" in saved.text
    assert 'AutoModelForTokenClassification.from_pretrained("me/ornn")' in saved.text
    assert saved.data.eval_results is None
    restricted = card.model_card_for(_model(parametrization="restricted"))
    assert "D3 R2 F^-1 D2 Pi R1 F D1" in restricted.text


def test_template_is_package_data():
    from importlib import resources

    assert card.TEMPLATE.is_file()
    assert card.TEMPLATE == resources.files("unitary_rnn") / "templates" / "model_card.md"


@pytest.mark.slow
def test_usage_snippets_of_the_pushed_card_run_as_written(fake_hub, tmp_path):
    """Both snippets of the pushed card, served from the local Hub cache, run unedited in fresh processes; the
    ``trust_remote_code`` one never imports unitary_rnn."""
    model = _model()
    model.eval()
    x = torch.rand(2, 12, 1)
    expected = model(inputs_embeds=x).logits
    model.push_to_hub("me/urnn-remote")
    fake_hub.serve("me/urnn-remote")
    torch.save({"x": x, "expected": expected.detach()}, tmp_path / "io.pt")
    check = (
        "\nimport sys, torch\n"
        f"io = torch.load({str(tmp_path / 'io.pt')!r})\n"
        "torch.testing.assert_close(model.eval()(inputs_embeds=io['x']).logits, io['expected'], rtol=1e-5, atol=1e-6)\n"
    )
    with_package, remote = [block.split("```", 1)[0] for block in fake_hub.card("me/urnn-remote").text.split("```python\n")[1:]]
    assert "trust_remote_code=True" in remote and "import unitary_rnn" not in remote
    remote_check = check + "assert 'unitary_rnn' not in sys.modules, 'the package must not be needed'\n"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for code in (with_package + check, remote + remote_check):
        run = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180)
        assert run.returncode == 0, f"{code}\n{run.stderr[-3000:]}"
