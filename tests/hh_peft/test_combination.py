"""Weighted combinations of HTA adapters (`HouseholderModel.add_weighted_adapter`), and what PEFT does not mix."""

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn

from hh_peft import HouseholderConfig, HouseholderLayer


def mlp(dtype=torch.float64):
    """Non-square layers on purpose (m = min(in, out) differs from both)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(7, 11), nn.ReLU(), nn.Linear(11, 5), nn.ReLU(), nn.Linear(5, 3)).to(dtype)


def three_adapters(model):
    """Three random HTA adapters of different ranks, forms and targets ("third" does not adapt layer 2)."""
    configs = {
        "first": HouseholderConfig(target_modules=["0", "2", "4"], lora_rank=0, init_weights=False),
        "second": HouseholderConfig(target_modules=["0", "2", "4"], lora_rank=2, householder="paper", init_weights=False),
        "third": HouseholderConfig(target_modules=["0", "4"], lora_rank=1, init_weights=False),
    }
    peft_model = get_peft_model(model, configs["first"], adapter_name="first")
    for name in ("second", "third"):
        peft_model.add_adapter(name, configs[name])
    return peft_model


def hta_layers(peft_model):
    return {name: module for name, module in peft_model.named_modules() if isinstance(module, HouseholderLayer)}


def test_cat_combination_is_the_exact_weighted_sum_in_float64():
    peft_model = three_adapters(mlp())
    weights = [0.7, -1.3, 2.0]
    peft_model.add_weighted_adapter(["first", "second", "third"], weights, "sum", combination_type="cat")
    layers = hta_layers(peft_model)
    for name, layer in layers.items():
        assert layer.hta_d["sum"].dtype == torch.float64
        expected = sum(w * layer.get_delta_weight(a) for a, w in zip(["first", "second", "third"], weights) if a in layer.hta_d)
        torch.testing.assert_close(layer.get_delta_weight("sum"), expected, rtol=0, atol=1e-10, msg=name)
        assert not layer.hta_u_in["sum"].any() and not layer.hta_u_out["sum"].any()
    config = peft_model.peft_config["sum"]
    assert config.lora_rank == (2 + 0) + (2 + 2) + (2 + 1)
    assert config.householder == "normalized" and config.modules_to_save is None
    assert config.target_modules == {"0", "2", "4"}

    # The model with the combined adapter computes base(x) + x (sum_i w_i delta_W_i)^T on every layer.
    x = torch.randn(4, 7, dtype=torch.float64)
    peft_model.set_adapter("sum")
    with torch.no_grad():
        combined = peft_model(x)
        with peft_model.disable_adapter():
            for layer in layers.values():
                layer.get_base_layer().weight += sum(w * layer.get_delta_weight(a) for a, w in zip(["first", "second", "third"], weights) if a in layer.hta_d)
            reference = peft_model(x)
    torch.testing.assert_close(combined, reference, rtol=0, atol=1e-10)


def test_one_adapter_is_scaled_in_place_of_its_d_and_b_keeping_rank_and_vectors():
    peft_model = three_adapters(mlp())
    peft_model.add_weighted_adapter(["second"], [-0.4], "scaled", combination_type="cat")  # one adapter: always "linear"
    assert peft_model.peft_config["scaled"].lora_rank == 2
    assert peft_model.peft_config["scaled"].householder == "paper"
    for layer in hta_layers(peft_model).values():
        assert torch.equal(layer.hta_u_in["scaled"], layer.hta_u_in["second"])
        assert torch.equal(layer.hta_A["scaled"], layer.hta_A["second"])
        torch.testing.assert_close(layer.get_delta_weight("scaled"), -0.4 * layer.get_delta_weight("second"), rtol=0, atol=1e-12)


def test_linear_combination_of_adapters_sharing_householder_vectors_is_exact():
    model = get_peft_model(mlp(), HouseholderConfig(target_modules=["0", "2"], lora_rank=1, init_weights=False), adapter_name="first")
    model.add_adapter("second", HouseholderConfig(target_modules=["0", "2"], lora_rank=3, init_weights=False))
    layers = hta_layers(model)
    with torch.no_grad():
        for layer in layers.values():  # e.g. two adapters trained from one set of frozen vectors
            layer.hta_u_in["second"].copy_(layer.hta_u_in["first"])
            layer.hta_u_out["second"].copy_(layer.hta_u_out["first"])
    model.add_weighted_adapter(["first", "second"], [1.5, 0.25], "mix", combination_type="linear")
    assert model.peft_config["mix"].lora_rank == 4
    for layer in layers.values():
        expected = 1.5 * layer.get_delta_weight("first") + 0.25 * layer.get_delta_weight("second")
        torch.testing.assert_close(layer.get_delta_weight("mix"), expected, rtol=0, atol=1e-10)
        assert torch.equal(layer.hta_u_out["mix"], layer.hta_u_out["first"])


def test_linear_combination_of_adapters_with_different_vectors_is_refused_and_model_unchanged():
    peft_model = three_adapters(mlp())
    names_before = [name for name, _ in peft_model.named_parameters()]
    with pytest.raises(ValueError, match=r"share their Householder vectors.*'first' and 'second' differ on layer '0'; use combination_type='cat'"):
        peft_model.add_weighted_adapter(["first", "second"], [1.0, 1.0], "mix", combination_type="linear")
    assert "mix" not in peft_model.peft_config
    assert [name for name, _ in peft_model.named_parameters()] == names_before


@pytest.mark.parametrize("combination_type", ["svd", "ties", "dare_linear"])
def test_lora_only_combinations_are_refused_naming_the_exact_ones(combination_type):
    peft_model = three_adapters(mlp())
    with pytest.raises(ValueError, match=rf"{combination_type!r} is not supported for HTA .*not linear in its parameters.*valid: 'cat' .*'linear'"):
        peft_model.add_weighted_adapter(["first", "second"], [1.0, 1.0], "mix", combination_type=combination_type)
    assert "mix" not in peft_model.peft_config


@pytest.mark.parametrize(
    "adapters, weights, name, message",
    [
        (["first", "zz"], [1.0, 1.0], "mix", r"Adapter 'zz' does not exist; existing adapters: \['first', 'second', 'third'\]"),
        (["first", "second"], [1.0], "mix", "Got 2 adapters but 1 weights"),
        (["first", "second"], [1.0, float("nan")], "mix", "finite real number, got nan"),
        (["first", "second"], [1.0, 1.0], "third", "An adapter named 'third' already exists"),
        ("first", [1.0], "mix", "non-empty list of adapter names"),
    ],
)
def test_bad_arguments_name_the_problem(adapters, weights, name, message):
    peft_model = three_adapters(mlp())
    with pytest.raises(ValueError, match=message):
        peft_model.add_weighted_adapter(adapters, weights, name)


def test_combined_adapter_saves_and_loads_like_any_hta_adapter(tmp_path):
    peft_model = three_adapters(mlp(torch.float32))
    peft_model.add_weighted_adapter(["first", "second", "third"], [0.5, 0.5, 1.0], "sum")
    peft_model.set_adapter("sum")
    peft_model.save_pretrained(tmp_path, selected_adapters=["sum"])
    x = torch.randn(4, 7)
    loaded = PeftModel.from_pretrained(mlp(torch.float32), tmp_path / "sum")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), peft_model(x), rtol=0, atol=0)


def test_peft_mixed_model_refuses_hta_naming_the_compatible_types():
    """PeftMixedModel mixes a fixed list of PEFT's own methods (its tuner dispatches on their config classes), so HTA
    cannot join it; several HTA adapters on one PeftModel, or `add_weighted_adapter`, combine HTA adapters."""
    with pytest.raises(ValueError, match=r"peft_type. 'HTA' is not compatible with the `PeftMixedModel`. Compatible types are: .*LORA"):
        get_peft_model(mlp(torch.float32), HouseholderConfig(target_modules=["0"]), mixed=True)
