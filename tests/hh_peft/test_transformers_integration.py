"""transformers' own PEFT integration (``PeftAdapterMixin`` on every ``PreTrainedModel``) with HTA adapters.

transformers refuses most of that API when the installed PEFT is older than its ``MIN_PEFT_VERSION``; which methods
work therefore depends on the pair of versions installed, and both cases are pinned down here.
"""

import importlib.metadata

import pytest
import torch
from packaging.version import Version
from peft import PeftModel, get_peft_model
from transformers import AutoModelForImageClassification, ViTConfig, ViTForImageClassification
from transformers.integrations.peft import MIN_PEFT_VERSION

from hh_peft import HouseholderConfig

PEFT_VERSION = Version(importlib.metadata.version("peft"))
FULL_INTEGRATION = PEFT_VERSION >= Version(MIN_PEFT_VERSION)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny ViT saved to ``base/``, two random HTA adapters for it, an input and each adapter's PeftModel logits."""
    root = tmp_path_factory.mktemp("integration")
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=96, num_labels=5)
    torch.manual_seed(0)
    ViTForImageClassification(config).save_pretrained(root / "base")
    x = torch.randn(2, 3, 32, 32)
    expected = {}
    for seed, name in enumerate(["first", "second"]):
        base = ViTForImageClassification.from_pretrained(root / "base")
        torch.manual_seed(seed + 1)
        hta = HouseholderConfig(init_weights=False, target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"])
        model = get_peft_model(base, hta).eval()
        model.save_pretrained(root / name)
        with torch.no_grad():
            expected[name] = model(pixel_values=x).logits
    return root, x, expected


def logits(model, x):
    with torch.no_grad():
        return model.eval()(pixel_values=x).logits


def test_load_adapter_gives_the_peft_model_output(saved, close_across_load_paths):
    root, x, expected = saved
    model = ViTForImageClassification.from_pretrained(root / "base")
    model.load_adapter(str(root / "first"))
    close_across_load_paths(logits(model, x), expected["first"])  # same operations, other buffer alignment
    # PeftModel copies the loaded tensors into parameters allocated like the original ones: the same computation
    reference = PeftModel.from_pretrained(ViTForImageClassification.from_pretrained(root / "base"), root / "first")
    torch.testing.assert_close(logits(reference, x), expected["first"], rtol=0, atol=0)


def test_auto_model_from_an_adapter_folder_loads_base_and_adapter(saved, close_across_load_paths):
    root, x, expected = saved
    model = AutoModelForImageClassification.from_pretrained(root / "first")
    close_across_load_paths(logits(model, x), expected["first"])


@pytest.mark.skipif(not FULL_INTEGRATION, reason=f"transformers needs peft>={MIN_PEFT_VERSION}; see the test below")
def test_full_adapter_api_with_hta(saved, tmp_path, close_across_load_paths):
    root, x, expected = saved
    model = ViTForImageClassification.from_pretrained(root / "base")
    model.load_adapter(str(root / "first"), adapter_name="first")
    model.load_adapter(str(root / "second"), adapter_name="second")
    model.set_adapter("second")
    assert model.active_adapters() == ["second"]
    close_across_load_paths(logits(model, x), expected["second"])
    model.disable_adapters()
    base = ViTForImageClassification.from_pretrained(root / "base")
    with torch.no_grad():
        # the adapted classifier copy (modules_to_save) is disabled too
        torch.testing.assert_close(logits(model, x), logits(base, x), rtol=0, atol=0)
    model.enable_adapters()
    assert set(model.get_adapter_state_dict("second")) == set(model.get_adapter_state_dict("first"))
    model.delete_adapter("first")
    model.save_pretrained(tmp_path / "saved")
    reloaded = PeftModel.from_pretrained(ViTForImageClassification.from_pretrained(root / "base"), tmp_path / "saved")
    torch.testing.assert_close(logits(reloaded, x), expected["second"], rtol=0, atol=0)
    model.add_adapter(HouseholderConfig(target_modules=["q_proj"], modules_to_save=["classifier"]), adapter_name="fresh")
    assert model.active_adapters() == ["fresh"]


REFUSED_CALLS = {
    "set_adapter": lambda model: model.set_adapter("default"),
    "active_adapters": lambda model: model.active_adapters(),
    "disable_adapters": lambda model: model.disable_adapters(),
    "enable_adapters": lambda model: model.enable_adapters(),
    "get_adapter_state_dict": lambda model: model.get_adapter_state_dict(),
    "delete_adapter": lambda model: model.delete_adapter("default"),
    "add_adapter": lambda model: model.add_adapter(HouseholderConfig(target_modules=["q_proj"]), adapter_name="other"),
    "save_pretrained": lambda model: model.save_pretrained("unused"),
}


@pytest.mark.skipif(FULL_INTEGRATION, reason=f"peft {PEFT_VERSION} satisfies transformers' MIN_PEFT_VERSION")
@pytest.mark.parametrize("call", sorted(REFUSED_CALLS))
def test_adapter_api_beyond_loading_is_refused_by_transformers_version_check(saved, call):
    """With this pair of versions only loading works; everything else raises transformers' own version error (the
    README names the working pair, and `PeftModel` offers all of it)."""
    root, _, _ = saved
    model = ViTForImageClassification.from_pretrained(root / "base")
    model.load_adapter(str(root / "first"))
    with pytest.raises(ValueError, match=rf"The version of PEFT you are using is not compatible, please use a version >= {MIN_PEFT_VERSION}"):
        REFUSED_CALLS[call](model)
