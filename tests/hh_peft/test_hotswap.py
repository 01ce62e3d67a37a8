"""hh_peft.hotswap_adapter: another saved HTA adapter's values copied into a loaded one, in place."""

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

import hh_peft
from hh_peft import HouseholderConfig


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4))


def save_adapter(path, seed, **config):
    """A random (non-identity) adapter for `mlp()`, with the last layer as a trained head by default."""
    base = mlp()
    torch.manual_seed(seed)
    settings = dict(target_modules=["0", "2"], lora_rank=2, init_weights=False, modules_to_save=["4"]) | config
    model = get_peft_model(base, HouseholderConfig(**settings))
    if settings["modules_to_save"]:
        nn.init.normal_(model.base_model.model[4].modules_to_save["default"].weight)
    model.save_pretrained(path)
    return path


def fresh_output(path, x):
    with torch.no_grad():
        return PeftModel.from_pretrained(mlp(), path).eval()(x)


def test_compiled_model_runs_the_swapped_adapter_without_recompiling(tmp_path):
    first, second = save_adapter(tmp_path / "first", 1), save_adapter(tmp_path / "second", 2)
    model = PeftModel.from_pretrained(mlp(), first).eval()
    parameters_before = [id(p) for p in model.parameters()]
    compiled = torch.compile(model, backend="aot_eager")
    x = torch.randn(5, 8)
    with torch._dynamo.config.patch(error_on_recompile=True), torch.no_grad():
        before = compiled(x)
        hh_peft.hotswap_adapter(compiled, second, adapter_name="default", torch_device="cpu")
        after = compiled(x)
    assert [id(p) for p in model.parameters()] == parameters_before
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, fresh_output(second, x), rtol=0, atol=0)


def test_smaller_rank_and_fewer_layers_are_exact(tmp_path):
    """A rank-1 adapter of layer "0" only, swapped into a rank-2 adapter of "0" and "2": zero-padded B A on "0",
    zeroed (no update) on "2"."""
    loaded = save_adapter(tmp_path / "loaded", 1)
    smaller = save_adapter(tmp_path / "smaller", 2, target_modules=["0"], lora_rank=1)
    model = PeftModel.from_pretrained(mlp(), loaded).eval()
    hh_peft.hotswap_adapter(model, smaller, adapter_name="default", torch_device="cpu")
    x = torch.randn(5, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), fresh_output(smaller, x))
    layer = model.base_model.model[2]
    assert not layer.hta_d["default"].any() and not layer.hta_u_in["default"].any()
    torch.testing.assert_close(layer.get_delta_weight("default"), torch.zeros(12, 16), rtol=0, atol=0)


@pytest.mark.parametrize(
    "new_config, message",
    [
        (dict(householder="paper"), r"differ in settings that shape the output \(householder: 'normalized' loaded, 'paper' new\)"),
        (dict(dropout=0.1), r"dropout: 0.0 loaded, 0.1 new"),
        (dict(modules_to_save=None), r"modules_to_save: \['4'\] loaded, None new"),
        (dict(lora_rank=3), r"hta_A: shape \(3, 8\) in the new adapter, \(2, 8\) in the loaded one \(hot-swapping needs a lora_rank no larger"),
    ],
    ids=["householder", "dropout", "modules_to_save", "larger-rank"],
)
def test_incompatible_adapter_is_refused_and_model_left_unchanged(tmp_path, new_config, message):
    assert_refused_and_unchanged(save_adapter(tmp_path / "loaded", 1), save_adapter(tmp_path / "other", 2, **new_config), message)


def test_adapter_of_other_layers_is_refused_and_model_left_unchanged(tmp_path):
    loaded = save_adapter(tmp_path / "loaded", 1, modules_to_save=None)
    other = save_adapter(tmp_path / "other", 2, target_modules=["0", "2", "4"], modules_to_save=None)
    assert_refused_and_unchanged(loaded, other, r"the new adapter has 5 tensor\(s\) the loaded adapter 'default' lacks .*'base_model\.model\.4\.hta_")


def assert_refused_and_unchanged(loaded, other, message):
    model = PeftModel.from_pretrained(mlp(), loaded)
    state = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        hh_peft.hotswap_adapter(model, other, adapter_name="default", torch_device="cpu")
    assert state.keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_merged_adapter_is_refused(tmp_path):
    model = PeftModel.from_pretrained(mlp(), save_adapter(tmp_path / "loaded", 1))
    model.merge_adapter()
    with pytest.raises(ValueError, match=r"while it is merged into the base weights .*call `unmerge_adapter\(\)` first"):
        hh_peft.hotswap_adapter(model, save_adapter(tmp_path / "other", 2), adapter_name="default", torch_device="cpu")


def test_unknown_adapter_name_and_lora_adapter_are_refused(tmp_path):
    model = PeftModel.from_pretrained(mlp(), save_adapter(tmp_path / "loaded", 1))
    with pytest.raises(ValueError, match=r"No adapter 'other' to hot-swap in PeftModel; loaded adapters: \['default'\]"):
        hh_peft.hotswap_adapter(model, tmp_path / "loaded", adapter_name="other")
    get_peft_model(mlp(), LoraConfig(target_modules=["0"])).save_pretrained(tmp_path / "lora")
    with pytest.raises(ValueError, match=r"swaps HTA adapters, but the new adapter is .*LORA.*peft.utils.hotswap.hotswap_adapter"):
        hh_peft.hotswap_adapter(model, tmp_path / "lora", adapter_name="default", torch_device="cpu")


def test_transformers_model_with_load_adapter_is_hot_swapped_too(tmp_path, close_across_load_paths):
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(image_size=32, patch_size=8, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=96, num_labels=5)
    torch.manual_seed(0)
    ViTForImageClassification(config).save_pretrained(tmp_path / "base")
    hta = dict(init_weights=False, target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"])
    for seed, name in enumerate(["first", "second"]):
        base = ViTForImageClassification.from_pretrained(tmp_path / "base")
        torch.manual_seed(seed + 1)
        get_peft_model(base, HouseholderConfig(**hta)).save_pretrained(tmp_path / name)
    model = ViTForImageClassification.from_pretrained(tmp_path / "base").eval()
    model.load_adapter(str(tmp_path / "first"))
    hh_peft.hotswap_adapter(model, tmp_path / "second", adapter_name="default", torch_device="cpu")
    reference = PeftModel.from_pretrained(ViTForImageClassification.from_pretrained(tmp_path / "base"), tmp_path / "second")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        # load_adapter's tensors sit in the file's buffer, PeftModel's are copied: another summation order
        close_across_load_paths(model(pixel_values=x).logits, reference.eval()(pixel_values=x).logits)


def test_adapters_of_the_same_shapes_but_other_blocks_are_not_swapped(tmp_path):
    """Blocks [0, 1] and [1, 2] of layer 0 cut into four 4-row blocks hold tensors of the same shapes: swapping
    the values would move the update to other rows silently, so the block layout must match."""
    layout = dict(output_blocks={"0": 4})
    first = save_adapter(tmp_path / "first", 1, adapted_blocks={"0": [0, 1]}, **layout)
    second = save_adapter(tmp_path / "second", 2, adapted_blocks={"0": [1, 2]}, **layout)
    model = PeftModel.from_pretrained(mlp(), first)
    with pytest.raises(ValueError, match=r"block_layout: .* loaded, .* new"):
        hh_peft.hotswap_adapter(model, str(second))
