"""Unitary-RNN cards and pushing, offline: ``HfApi``'s network calls are replaced by a recorder."""

import hashlib
import os
import subprocess
import sys

import pytest
import torch
from huggingface_hub import HfApi, ModelCard

from unitary_rnn import UnitaryRNNConfig, UnitaryRNNForSequenceClassification, UnitaryRNNForTokenClassification
from unitary_rnn import hub

hub.install_card_hook()  # idempotent; `import unitary_rnn` is meant to call it


class _Repo:
    def __init__(self, repo_id):
        self.repo_id = repo_id


@pytest.fixture
def uploads(monkeypatch):
    """``uploads[repo_id][path_in_repo] = bytes`` for every file a push would send."""
    repos: dict[str, dict[str, bytes]] = {}

    def create_repo(api, repo_id, **kwargs):
        repos.setdefault(repo_id, {})
        return _Repo(repo_id)

    def create_commit(api, repo_id, operations, **kwargs):
        for op in operations:
            with open(op.path_or_fileobj, "rb") as f:
                repos[repo_id][op.path_in_repo] = f.read()
        return "fake-commit"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    monkeypatch.setattr(HfApi, "create_branch", lambda api, repo_id, **kw: None)
    return repos


def _model(cls=UnitaryRNNForSequenceClassification, **kw):
    torch.manual_seed(0)
    return cls(UnitaryRNNConfig(input_size=1, hidden_size=8, num_labels=10, **kw))


def test_push_uploads_config_weights_code_and_card(uploads):
    model = _model()
    model.push_to_hub("me/urnn", task="pixel MNIST", dataset="mnist_5k", metrics={"accuracy": 0.42},
                      task_type="image-classification")
    files = uploads["me/urnn"]
    assert {"README.md", "config.json", "model.safetensors", "modeling_unitary_rnn.py",
            "configuration_unitary_rnn.py"} <= set(files)
    assert not any(name.endswith((".bin", ".pt")) for name in files)
    card = ModelCard(files["README.md"].decode())
    data = card.data.to_dict()
    assert data["library_name"] == "transformers"
    assert {"unitary-rnn", "custom_code"} <= set(data["tags"])
    result = data["model-index"][0]["results"][0]
    assert result["task"]["type"] == "image-classification"
    assert result["metrics"][0] == {"type": "accuracy", "value": 0.42}
    assert "trust_remote_code=True" in card.text and "Cayley" in card.text
    assert "has been pushed on the Hub" not in card.text  # not the generic transformers card


def test_card_variants():
    real = _model(UnitaryRNNForTokenClassification, field="real")
    card = hub.build_unitary_rnn_card(real, repo_id="me/ornn")
    assert "orthogonal-rnn" in card.data.tags and "O(8)" in card.text
    assert card.data.eval_results is None
    restricted = hub.build_unitary_rnn_card(_model(parametrization="restricted"))
    assert "D3 R2 F^-1 D2 Pi R1 F D1" in restricted.text


@pytest.mark.slow
def test_pushed_model_loads_back_with_trust_remote_code(uploads, tmp_path):
    """What was uploaded, served from the local Hub cache, loads in a process that never imports unitary_rnn."""
    from huggingface_hub import constants

    model = _model()
    model.eval()
    x = torch.rand(2, 12, 1)
    expected = model(inputs_embeds=x).logits
    model.push_to_hub("me/urnn-remote")
    commit = hashlib.sha1(b"me/urnn-remote").hexdigest()
    repo_dir = os.path.join(constants.HF_HUB_CACHE, "models--me--urnn-remote")
    os.makedirs(os.path.join(repo_dir, "refs"), exist_ok=True)
    with open(os.path.join(repo_dir, "refs", "main"), "w") as f:
        f.write(commit)
    snapshot = os.path.join(repo_dir, "snapshots", commit)
    os.makedirs(snapshot, exist_ok=True)
    for name, content in uploads["me/urnn-remote"].items():
        with open(os.path.join(snapshot, name), "wb") as f:
            f.write(content)
    torch.save({"x": x, "expected": expected.detach()}, tmp_path / "io.pt")
    code = (
        "import sys, torch\n"
        "from transformers import AutoModelForSequenceClassification\n"
        "m = AutoModelForSequenceClassification.from_pretrained('me/urnn-remote', trust_remote_code=True).eval()\n"
        "assert 'unitary_rnn' not in sys.modules, 'the package must not be needed'\n"
        f"io = torch.load({str(tmp_path / 'io.pt')!r})\n"
        "torch.testing.assert_close(m(inputs_embeds=io['x']).logits, io['expected'], rtol=1e-5, atol=1e-6)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    subprocess.run([sys.executable, "-c", code], check=True, timeout=180, env=env, cwd=tmp_path)
