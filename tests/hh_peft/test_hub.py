"""HTA adapter cards and pushing, offline.

The network calls of ``huggingface_hub.HfApi`` (``create_repo``, ``create_commit``,
``create_branch``) are replaced by a fake that records the uploaded files; everything above them
(PEFT's and transformers' push code, our card hook) runs for real.
"""

import hashlib
import json
import os
import subprocess
import sys

import pytest
import timm
import torch
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.errors import EntryNotFoundError
from peft import LoraConfig, PeftModel, get_peft_model

import hh_peft
from hh_peft import hub


class _Repo:
    def __init__(self, repo_id):
        self.repo_id = repo_id


class FakeHub:
    """Records what would be uploaded: ``repos[repo_id] = {path_in_repo: bytes}``."""

    def __init__(self):
        self.repos: dict[str, dict[str, bytes]] = {}
        self.commits: list[dict] = []

    def create_repo(self, api, repo_id, **kwargs):
        self.repos.setdefault(repo_id, {})
        return _Repo(repo_id)

    def create_branch(self, api, repo_id, **kwargs):
        return None

    def create_commit(self, api, repo_id, operations, commit_message=None, **kwargs):
        files = self.repos.setdefault(repo_id, {})
        for op in operations:
            src = op.path_or_fileobj
            if isinstance(src, (str, os.PathLike)):
                with open(src, "rb") as f:
                    files[op.path_in_repo] = f.read()
            elif isinstance(src, bytes):
                files[op.path_in_repo] = src
            else:
                files[op.path_in_repo] = src.read()
        self.commits.append({"repo_id": repo_id, "message": commit_message, "paths": [op.path_in_repo for op in operations]})
        return "fake-commit"

    def card(self, repo_id) -> ModelCard:
        return ModelCard(self.repos[repo_id]["README.md"].decode())


@pytest.fixture
def fake_hub(monkeypatch):
    fake = FakeHub()
    monkeypatch.setattr(HfApi, "create_repo", lambda api, repo_id, **kw: fake.create_repo(api, repo_id, **kw))
    monkeypatch.setattr(HfApi, "create_branch", lambda api, repo_id, **kw: fake.create_branch(api, repo_id, **kw))
    monkeypatch.setattr(HfApi, "create_commit", lambda api, repo_id, operations, **kw: fake.create_commit(api, repo_id, operations, **kw))
    return fake


def _tiny_vit(num_classes=10):
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=28, patch_size=7, embed_dim=32, depth=2, num_heads=2,
        in_chans=1, num_classes=num_classes,
    )


def _hta_model(seed=0):
    torch.manual_seed(seed)
    config = hh_peft.HouseholderConfig(
        target_modules=["attn.qkv", "attn.proj"], modules_to_save=["head"], init_weights=False
    )
    return get_peft_model(_tiny_vit(), config)


hub.install_card_hook()  # idempotent; `import hh_peft` does it too (checked below in a fresh process)


def test_import_hh_peft_installs_the_hook_once():
    code = (
        "import hh_peft, hh_peft.hub\n"
        "from peft import PeftModel\n"
        "push = PeftModel.push_to_hub\n"
        "hh_peft.hub.install_card_hook()\n"
        "assert PeftModel._hh_peft_card_hook and PeftModel.push_to_hub is push\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_push_hta_adapter_uploads_files_and_our_card(fake_hub):
    model = _hta_model()
    model.push_to_hub("me/vit-hta", dataset="mnist_5k", metrics={"accuracy": 0.9312}, num_labels=10,
                      base_model="google/vit-base-patch16-224-in21k", model_family="transformers")
    files = fake_hub.repos["me/vit-hta"]
    assert set(files) == {"README.md", "adapter_config.json", "adapter_model.safetensors"}
    assert json.loads(files["adapter_config.json"])["peft_type"] == "HTA"

    card = fake_hub.card("me/vit-hta")
    data = card.data.to_dict()
    assert data["library_name"] == "peft"
    assert data["base_model"] == "google/vit-base-patch16-224-in21k"
    assert {"hta", "householder", "peft"} <= set(data["tags"])
    result = data["model-index"][0]["results"][0]
    assert result["dataset"]["name"] == "mnist_5k"
    assert result["metrics"][0] == {"type": "accuracy", "value": 0.9312}
    code = card.text.split("```python\n", 1)[1].split("```", 1)[0]
    assert code.startswith("import hh_peft")
    assert 'PeftModel.from_pretrained(base, "me/vit-hta")' in code
    assert "num_labels=10" in code
    assert "transformers model that has been pushed" not in card.text  # not the generic card


def test_push_keeps_push_to_hub_options(fake_hub):
    model = _hta_model()
    model.push_to_hub("me/opts", commit_message="my message", tags=["vtab"], private=True)
    assert fake_hub.commits[-1]["message"] == "my message"
    assert {"hta", "householder", "peft", "vtab"} <= set(fake_hub.card("me/opts").data.tags)


def test_timm_base_model_defaults_from_pretrained_cfg(fake_hub):
    model = _hta_model()
    model.push_to_hub("me/timm-default")
    card = fake_hub.card("me/timm-default")
    assert card.data.base_model == model.get_base_model().pretrained_cfg["hf_hub_id"]
    assert "timm.create_model(" in card.text
    assert card.data.eval_results is None  # no results were passed: no model-index


def test_local_base_model_is_not_put_in_metadata(fake_hub, tmp_path):
    model = _hta_model()
    hub.set_card_info(model, base_model=str(tmp_path), model_family="timm")
    model.push_to_hub("me/local-base")
    card = fake_hub.card("me/local-base")
    assert card.data.base_model is None  # the Hub only accepts a Hub id here
    assert str(tmp_path) in card.text  # but the usage snippet names it


def test_save_pretrained_writes_the_hta_card(tmp_path):
    model = _hta_model()
    hub.set_card_info(model, dataset="mnist_5k", metrics={"accuracy": 0.5})
    model.save_pretrained(tmp_path)
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "peft" and "hta" in card.data.tags
    assert card.data.eval_results[0].metric_value == 0.5


def test_existing_readme_keeps_its_text(tmp_path):
    (tmp_path / "README.md").write_text("---\nlicense: mit\n---\n\n# My notes\n\nHand-written.\n")
    model = _hta_model()
    model.save_pretrained(tmp_path)
    card = ModelCard.load(tmp_path / "README.md")
    assert "Hand-written." in card.text
    assert card.data.license == "mit"
    assert card.data.library_name == "peft" and {"hta", "householder", "peft"} <= set(card.data.tags)


def test_lora_push_is_left_to_peft_and_transformers(fake_hub, monkeypatch):
    """Scope: the hook changes nothing for other methods (transformers still writes its generic card)."""

    def no_remote_card(*args, **kwargs):
        raise EntryNotFoundError("no README.md on the fake Hub")

    monkeypatch.setattr("huggingface_hub.repocard.hf_hub_download", no_remote_card)
    model = get_peft_model(_tiny_vit(), LoraConfig(r=2, target_modules=["attn.qkv"]))
    model.push_to_hub("me/lora")
    assert fake_hub.card("me/lora").data.library_name == "transformers"
    assert "hta" not in (fake_hub.card("me/lora").data.tags or [])


def test_card_errors():
    with pytest.raises(ValueError, match="HouseholderConfig"):
        hub.build_adapter_card(config=LoraConfig(target_modules=["x"]))
    with pytest.raises(TypeError, match="unknown card field"):
        hub.set_card_info(_hta_model(), acuracy=0.9)


def _serve_from_cache(repo_id: str, files: dict[str, bytes]) -> None:
    """Lay ``files`` out in the local Hub cache exactly as a download of ``repo_id`` at ``main`` would."""
    from huggingface_hub import constants

    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    repo_dir = os.path.join(constants.HF_HUB_CACHE, "models--" + repo_id.replace("/", "--"))
    os.makedirs(os.path.join(repo_dir, "refs"), exist_ok=True)
    with open(os.path.join(repo_dir, "refs", "main"), "w") as f:
        f.write(commit)
    snapshot = os.path.join(repo_dir, "snapshots", commit)
    os.makedirs(snapshot, exist_ok=True)
    for name, content in files.items():
        with open(os.path.join(snapshot, name), "wb") as f:
            f.write(content)


def test_pushed_adapter_loads_back_by_hub_id(fake_hub):
    """Push, then load what was uploaded by its Hub id (offline, from the cache): same outputs."""
    model = _hta_model(seed=1)
    model.eval()
    x = torch.randn(3, 1, 28, 28)
    expected = model(x)
    model.push_to_hub("me/roundtrip", dataset="mnist_5k", metrics={"accuracy": 0.8})
    _serve_from_cache("me/roundtrip", fake_hub.repos["me/roundtrip"])

    torch.manual_seed(1)
    base = _tiny_vit()  # same base weights (same seed, same construction order)
    loaded = PeftModel.from_pretrained(base, "me/roundtrip")
    loaded.eval()
    assert loaded.peft_config["default"].peft_type == "HTA"
    torch.testing.assert_close(loaded(x), expected, rtol=1e-5, atol=1e-6)
