"""HTA adapter cards on save and push, offline.

``fake_hub`` (tests/conftest.py) replaces the network calls of ``huggingface_hub`` with a recorder; everything
above them (PEFT's and transformers' save and push code, our card hook) runs for real. The usage snippet of a
card is run as written in a fresh process.
"""

import json
import os
import subprocess
import sys

import pytest
import timm
import torch
from huggingface_hub import ModelCard
from peft import LoraConfig, PeftModel, get_peft_model

import hh_peft
from hh_peft import card

TINY_VIT = dict(img_size=28, patch_size=7, embed_dim=32, depth=2, num_heads=2, in_chans=1)


def _tiny_vit(num_classes=10):
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=num_classes, **TINY_VIT)


def _tiny_transformers_vit():
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=28, patch_size=7, num_channels=1, num_labels=10)
    return ViTForImageClassification(config)


def _hta(base, targets=("attn.qkv", "attn.proj"), head="head"):
    config = hh_peft.HouseholderConfig(target_modules=list(targets), modules_to_save=[head], init_weights=False)
    return get_peft_model(base, config)


def _hta_model(seed=0):
    torch.manual_seed(seed)
    return _hta(_tiny_vit())


def _usage(model_card: ModelCard) -> str:
    return model_card.text.split("```python\n", 1)[1].split("```", 1)[0]


def _run_usage(code: str, tmp_path, x: torch.Tensor, expected: torch.Tensor, *, pixel_values=False) -> None:
    """Run ``code`` (a card's usage snippet) in a fresh offline process, then check that the ``model`` it built
    gives ``expected`` on ``x``."""
    torch.save({"x": x, "expected": expected.detach()}, tmp_path / "io.pt")
    call = "model(pixel_values=io['x']).logits" if pixel_values else "model(io['x'])"
    check = (
        "\nimport torch\n"
        f"io = torch.load({str(tmp_path / 'io.pt')!r})\n"
        "model.eval()\n"
        f"torch.testing.assert_close({call}, io['expected'], rtol=1e-5, atol=1e-5)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", code + check], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=180)
    assert run.returncode == 0, f"the card's usage snippet failed:\n{code}\n{run.stderr[-3000:]}"


# ----------------------------------------------------------------------------------------------
# The hook
# ----------------------------------------------------------------------------------------------
def test_import_hh_peft_installs_the_hook_once():
    code = (
        "import hh_peft, hh_peft.peft_patches\n"
        "from peft import PeftModel\n"
        "methods = PeftModel.create_or_update_model_card, PeftModel._upload_modified_files\n"
        "hh_peft.peft_patches.install()\n"
        "assert PeftModel._hh_peft_patches\n"
        "assert (PeftModel.create_or_update_model_card, PeftModel._upload_modified_files) == methods\n"
        "assert methods[1].__wrapped__ is __import__('transformers').utils.PushToHubMixin._upload_modified_files\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


_LORA_SAVE_AND_PUSH = """
import hashlib, json, os, sys
from huggingface_hub import HfApi, RepoUrl
from huggingface_hub.errors import EntryNotFoundError
if sys.argv[1] == "with":
    import hh_peft
import timm, torch
from peft import LoraConfig, PeftModel, get_peft_model
assert ("hh_peft" in sys.modules) == (sys.argv[1] == "with")
uploaded = {}
def create_commit(api, repo_id, operations, **kwargs):
    for op in operations:
        uploaded[op.path_in_repo] = open(op.path_or_fileobj, "rb").read()
def no_card(*args, **kwargs):
    raise EntryNotFoundError("new repo")
HfApi.create_repo = lambda api, repo_id, **kwargs: RepoUrl("https://huggingface.co/" + repo_id)
HfApi.create_commit = create_commit
import huggingface_hub.repocard
huggingface_hub.repocard.hf_hub_download = no_card
torch.manual_seed(0)
base = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, **json.loads(sys.argv[3]))
model = get_peft_model(base, LoraConfig(r=2, target_modules=["attn.qkv"], modules_to_save=["head"]))
model.save_pretrained(sys.argv[2])
model.push_to_hub("me/lora", tags=["vtab"])
saved = {name: open(os.path.join(sys.argv[2], name), "rb").read() for name in sorted(os.listdir(sys.argv[2]))}
digest = lambda files: {name: hashlib.sha256(content).hexdigest() for name, content in files.items()}
print(json.dumps({"saved": digest(saved), "pushed": digest(uploaded)}))
"""


@pytest.mark.slow
def test_other_peft_methods_write_and_push_the_same_bytes_with_and_without_hh_peft(tmp_path):
    """The hook's reach: a LoRA model's saved folder and uploaded files, README.md included, are byte for byte
    those of a process that never imported hh_peft."""
    outputs = {}
    for mode in ("with", "without"):
        env = {**os.environ, "HH_PEFT_AUTOLOAD": "0"}
        run = subprocess.run([sys.executable, "-c", _LORA_SAVE_AND_PUSH, mode, str(tmp_path / mode), json.dumps(TINY_VIT)],
                             env=env, capture_output=True, text=True, timeout=180, cwd=tmp_path)
        assert run.returncode == 0, run.stderr[-3000:]
        outputs[mode] = json.loads(run.stdout.strip().splitlines()[-1])
    assert {"README.md", "adapter_config.json", "adapter_model.safetensors"} <= set(outputs["with"]["pushed"])
    assert outputs["with"] == outputs["without"]


# ----------------------------------------------------------------------------------------------
# push_to_hub
# ----------------------------------------------------------------------------------------------
def test_push_hta_adapter_uploads_files_and_our_card(fake_hub):
    model = _hta_model()
    card.set_card_info(model, dataset="mnist_5k", metrics={"accuracy": 0.9312}, base_model="timm/vit_tiny_patch16_224.augreg_in21k")
    model.push_to_hub("me/vit-hta")
    files = fake_hub.repos["me/vit-hta"]
    assert set(files) == {"README.md", "adapter_config.json", "adapter_model.safetensors"}
    adapter_config = json.loads(files["adapter_config.json"])
    assert adapter_config["peft_type"] == "HTA"
    assert adapter_config["base_model_name_or_path"] == "timm/vit_tiny_patch16_224.augreg_in21k"  # PEFT's record

    pushed = fake_hub.card("me/vit-hta")
    data = pushed.data.to_dict()
    assert data["library_name"] == "peft"
    assert data["base_model"] == "timm/vit_tiny_patch16_224.augreg_in21k"
    assert {"hta", "householder", "peft"} <= set(data["tags"])
    result = data["model-index"][0]["results"][0]
    assert result["dataset"]["name"] == "mnist_5k"
    assert result["metrics"][0] == {"type": "accuracy", "value": 0.9312}
    code = _usage(pushed)
    assert code.startswith("import hh_peft")
    assert 'timm.create_model("hf-hub:timm/vit_tiny_patch16_224.augreg_in21k", pretrained=True, num_classes=10)' in code
    assert 'PeftModel.from_pretrained(base, "me/vit-hta")' in code
    assert "transformers model that has been pushed" not in pushed.text  # not transformers' generic card


def test_push_keeps_transformers_push_options(fake_hub):
    model = _hta_model()
    model.push_to_hub("me/opts", commit_message="my message", tags=["vtab"], private=True)
    assert fake_hub.commits[-1]["message"] == "my message"
    assert {"hta", "householder", "peft", "vtab"} <= set(fake_hub.card("me/opts").data.tags)


def test_a_second_push_replaces_the_card(fake_hub):
    """transformers' push starts from the card already on the Hub: the new push's facts must still win."""
    model = _hta_model()
    card.set_card_info(model, dataset="mnist_5k", metrics={"accuracy": 0.5})
    model.push_to_hub("me/twice", tags=["first"])
    card.set_card_info(model, metrics={"accuracy": 0.75})
    model.push_to_hub("me/twice")
    pushed = fake_hub.card("me/twice")
    assert [r.metric_value for r in pushed.data.eval_results] == [0.75]
    assert "| mnist_5k | accuracy | 0.75 |" in pushed.text and "0.5 |" not in pushed.text
    assert "first" in pushed.data.tags  # the first push's tag is on the Hub's card and stays


def test_pushed_adapter_loads_back_by_hub_id(fake_hub):
    """Push, then load what was uploaded by its Hub id (offline, from the cache): same outputs."""
    model = _hta_model(seed=1)
    model.eval()
    x = torch.randn(3, 1, 28, 28)
    expected = model(x)
    model.push_to_hub("me/roundtrip")
    fake_hub.serve("me/roundtrip")

    torch.manual_seed(1)
    loaded = PeftModel.from_pretrained(_tiny_vit(), "me/roundtrip")  # the same base weights (same seed)
    loaded.eval()
    assert loaded.peft_config["default"].peft_type == "HTA"
    torch.testing.assert_close(loaded(x), expected, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# The base model: named only when it is on record
# ----------------------------------------------------------------------------------------------
def test_random_init_timm_backbone_claims_no_base_model(fake_hub):
    """timm's pretrained_cfg names default weights whether or not they were loaded: it is no evidence."""
    model = _hta_model()
    assert model.get_base_model().pretrained_cfg["hf_hub_id"]  # what the card must not claim
    model.push_to_hub("me/random-timm")
    pushed = fake_hub.card("me/random-timm")
    assert pushed.data.base_model is None
    assert model.get_base_model().pretrained_cfg["hf_hub_id"] not in pushed.text
    code = _usage(pushed)
    assert "base = ...  # the model this adapter was trained on (timm vit_tiny_patch16_224, its weights are not on record)" in code
    assert "create_model" not in code


def test_from_config_transformers_backbone_claims_no_base_model(tmp_path):
    torch.manual_seed(0)
    model = _hta(_tiny_transformers_vit(), targets=("q_proj", "v_proj"), head="classifier")
    model.save_pretrained(tmp_path)
    saved = ModelCard.load(tmp_path / "README.md")
    assert saved.data.base_model is None
    assert "base = ...  # the model this adapter was trained on (transformers ViTForImageClassification, its weights" in saved.text
    assert "from_pretrained(base" in _usage(saved)


def test_local_base_model_is_not_put_in_metadata(fake_hub, tmp_path):
    model = _hta_model()
    card.set_card_info(model, base_model=str(tmp_path))
    model.push_to_hub("me/local-base")
    pushed = fake_hub.card("me/local-base")
    assert pushed.data.base_model is None  # the Hub only accepts a Hub id here
    assert f'timm.create_model("local-dir:{tmp_path}", pretrained=True, num_classes=10)' in _usage(pushed)


# ----------------------------------------------------------------------------------------------
# The usage snippet runs as written
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_usage_snippet_of_pushed_transformers_adapter_runs_as_written(fake_hub, tmp_path):
    """Base model and adapter both on the (fake) Hub: the pushed card's snippet runs unedited, offline."""
    from transformers import ViTForImageClassification

    torch.manual_seed(0)
    _tiny_transformers_vit().push_to_hub("me/tiny-vit-base")
    fake_hub.serve("me/tiny-vit-base")
    model = _hta(ViTForImageClassification.from_pretrained("me/tiny-vit-base"), targets=("q_proj", "v_proj"),
                 head="classifier")
    model.eval()
    x = torch.randn(2, 1, 28, 28)
    expected = model(pixel_values=x).logits
    model.push_to_hub("me/tiny-vit-hta")
    fake_hub.serve("me/tiny-vit-hta")

    pushed = fake_hub.card("me/tiny-vit-hta")
    assert pushed.data.base_model == "me/tiny-vit-base"
    code = _usage(pushed)
    assert 'ViTForImageClassification.from_pretrained("me/tiny-vit-base", num_labels=10, ignore_mismatched_sizes=True)' in code
    _run_usage(code, tmp_path, x, expected, pixel_values=True)


@pytest.mark.slow
def test_usage_snippet_of_pushed_timm_adapter_runs_as_written(fake_hub, tmp_path):
    """A timm base on the Hub, named with set_card_info: the pushed card's snippet runs unedited, offline."""
    from timm.models import save_for_hf

    torch.manual_seed(0)
    save_for_hf(_tiny_vit(), str(tmp_path / "base"), model_args=TINY_VIT, safe_serialization=True)
    fake_hub.repos["me/tiny-timm-base"] = {f.name: f.read_bytes() for f in (tmp_path / "base").iterdir()}
    fake_hub.serve("me/tiny-timm-base")
    model = _hta(timm.create_model("hf-hub:me/tiny-timm-base", pretrained=True, num_classes=10))
    card.set_card_info(model, base_model="me/tiny-timm-base")
    model.eval()
    x = torch.randn(2, 1, 28, 28)
    expected = model(x)
    model.push_to_hub("me/tiny-timm-hta")
    fake_hub.serve("me/tiny-timm-hta")

    code = _usage(fake_hub.card("me/tiny-timm-hta"))
    assert 'timm.create_model("hf-hub:me/tiny-timm-base", pretrained=True, num_classes=10)' in code
    _run_usage(code, tmp_path, x, expected)


@pytest.mark.slow
def test_usage_snippet_of_saved_adapter_on_local_base_runs(tmp_path):
    """A local base folder (recorded by PEFT from from_pretrained) and a local adapter folder: the saved card's
    snippet runs once the adapter placeholder is replaced by that folder."""
    from transformers import ViTForImageClassification

    torch.manual_seed(0)
    _tiny_transformers_vit().save_pretrained(tmp_path / "base")
    model = _hta(ViTForImageClassification.from_pretrained(tmp_path / "base"), targets=("q_proj", "v_proj"),
                 head="classifier")
    model.eval()
    x = torch.randn(2, 1, 28, 28)
    expected = model(pixel_values=x).logits
    model.save_pretrained(tmp_path / "adapter")

    code = _usage(ModelCard.load(tmp_path / "adapter" / "README.md"))
    assert f'from_pretrained("{tmp_path / "base"}", num_labels=10' in code
    assert card.ADAPTER_PLACEHOLDER in code
    _run_usage(code.replace(card.ADAPTER_PLACEHOLDER, str(tmp_path / "adapter")), tmp_path, x, expected,
               pixel_values=True)


# ----------------------------------------------------------------------------------------------
# save_pretrained
# ----------------------------------------------------------------------------------------------
def test_save_pretrained_writes_the_hta_card(tmp_path):
    model = _hta_model()
    card.set_card_info(model, dataset="mnist_5k", metrics={"accuracy": 0.5})
    model.save_pretrained(tmp_path)
    saved = ModelCard.load(tmp_path / "README.md")
    assert saved.data.library_name == "peft" and "hta" in saved.data.tags
    assert saved.data.eval_results[0].metric_value == 0.5
    adapter_params = sum(p.numel() for p in model.parameters() if p.requires_grad)  # adapter + trained head
    assert f"| parameters in the adapter file | {adapter_params:,} |" in saved.text


def test_existing_readme_keeps_its_text(tmp_path):
    (tmp_path / "README.md").write_text("---\nlicense: mit\n---\n\n# My notes\n\nHand-written.\n")
    model = _hta_model()
    model.save_pretrained(tmp_path)
    saved = ModelCard.load(tmp_path / "README.md")
    assert "Hand-written." in saved.text
    assert saved.data.license == "mit"
    assert saved.data.library_name == "peft" and {"hta", "householder", "peft"} <= set(saved.data.tags)


def test_card_errors():
    with pytest.raises(ValueError, match="HouseholderConfig"):
        card.build_adapter_card(config=LoraConfig(target_modules=["x"]), usage="")
    with pytest.raises(TypeError, match="acuracy"):
        card.set_card_info(_hta_model(), acuracy=0.9)
    with pytest.raises(ValueError, match="'timm' or 'transformers'"):
        card.set_card_info(_hta_model(), model_family="keras")


# ----------------------------------------------------------------------------------------------
# The template ships inside the package
# ----------------------------------------------------------------------------------------------
def test_template_is_package_data():
    from importlib import resources

    assert card.TEMPLATE.is_file()
    assert card.TEMPLATE == resources.files("hh_peft") / "templates" / "adapter_card.md"
