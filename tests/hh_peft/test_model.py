"""HouseholderModel on real architectures: identity at init, parameter counts, save/load, bad input."""

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import timm
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import ViTConfig, ViTForImageClassification

import hh_peft
from hh_peft import HouseholderConfig

TIMM_TARGETS = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]


def tiny_hf_vit(**kwargs):
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=96, num_labels=5, **kwargs)
    return ViTForImageClassification(config).eval()


def test_identity_at_init_timm_vit_tiny():
    torch.manual_seed(0)
    base = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10).eval()
    x = torch.randn(2, 3, 224, 224)
    expected = base(x)
    model = get_peft_model(copy.deepcopy(base), HouseholderConfig(target_modules=TIMM_TARGETS, modules_to_save=["head"]))
    model.eval()
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    adapted = [n for n, m in model.named_modules() if isinstance(m, hh_peft.HouseholderLayer)]
    assert len(adapted) == 12 * 4 and not any("patch_embed" in n for n in adapted)
    # the classification head is trained in full and saved
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("head.modules_to_save" in n for n in trainable)


def test_identity_at_init_transformers_vit_and_default_targets():
    torch.manual_seed(0)
    base = tiny_hf_vit()
    x = torch.randn(3, 3, 32, 32)
    expected = base(pixel_values=x).logits
    model = get_peft_model(copy.deepcopy(base), HouseholderConfig(modules_to_save=["classifier"])).eval()
    torch.testing.assert_close(model(pixel_values=x).logits, expected, rtol=0, atol=0)
    targeted = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, hh_peft.HouseholderLayer)})
    assert targeted == ["k_proj", "o_proj", "q_proj", "v_proj"]


def test_vit_b16_attention_parameter_count_is_the_papers_184320():
    config = ViTConfig()  # ViT-B/16: 12 blocks of 768-wide attention
    with torch.device("meta"):
        base = ViTForImageClassification(config)
    model = get_peft_model(base, HouseholderConfig(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], lora_rank=1))
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == 12 * 4 * 5 * 768 == 184_320


@pytest.mark.parametrize("rank, per_layer", [(0, 3 * 768), (2, 7 * 768)])
def test_rank_ablation_parameter_counts(rank, per_layer):
    with torch.device("meta"):
        base = ViTForImageClassification(ViTConfig())
    model = get_peft_model(base, HouseholderConfig(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], lora_rank=rank))
    assert model.get_nb_trainable_parameters()[0] == 48 * per_layer


def test_training_step_moves_only_adapter_and_head():
    torch.manual_seed(0)
    model = get_peft_model(tiny_hf_vit(), HouseholderConfig(modules_to_save=["classifier"]))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 5, (8,))
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    losses = []
    for _ in range(15):
        loss = model(pixel_values=x, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name


def test_save_load_roundtrip_in_a_fresh_process(tmp_path):
    torch.manual_seed(0)
    base = tiny_hf_vit()
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(copy.deepcopy(base), HouseholderConfig(init_weights=False, modules_to_save=["classifier"]))
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    torch.save(x, tmp_path / "x.pt")
    expected = model(pixel_values=x).logits
    model.save_pretrained(tmp_path / "adapter")
    files = sorted(os.listdir(tmp_path / "adapter"))
    assert "adapter_model.safetensors" in files and "adapter_config.json" in files
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "HTA" and saved["lora_rank"] == 1 and saved["householder"] == "normalized"
    keys = load_file(tmp_path / "adapter" / "adapter_model.safetensors").keys()
    assert all(".hta_" in k or "classifier" in k for k in keys) and any(k.endswith("hta_u_in") for k in keys)

    script = textwrap.dedent(f"""
        import torch, hh_peft
        from peft import PeftModel
        from transformers import ViTForImageClassification
        base = ViTForImageClassification.from_pretrained({str(tmp_path / 'base')!r}).eval()
        model = PeftModel.from_pretrained(base, {str(tmp_path / 'adapter')!r}).eval()
        x = torch.load({str(tmp_path / 'x.pt')!r})
        torch.save(model(pixel_values=x).logits, {str(tmp_path / 'y.pt')!r})
    """)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=300)
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), expected, rtol=1e-6, atol=1e-6)


def test_adapter_for_a_different_base_model_is_refused_and_model_left_unchanged(tmp_path, model_state):
    torch.manual_seed(0)
    get_peft_model(tiny_hf_vit(), HouseholderConfig(init_weights=False)).save_pretrained(tmp_path)
    other = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2,
                                                num_attention_heads=4, intermediate_size=96, num_labels=5))
    before = model_state(other)
    with pytest.raises(ValueError, match=r"different base model: vit\.layers\.0\.attention\.\w_proj\.hta_\w+\.default has shape \(.*48.*\) in the checkpoint but \(.*64.*\) in this model") as error:
        PeftModel.from_pretrained(other, tmp_path)
    assert "The model was left as it was before this call." in error.value.__notes__
    before.assert_unchanged(other)


def test_target_modules_matching_nothing_lists_patterns_and_real_names(model_state):
    base = tiny_hf_vit()
    before = model_state(base)
    with pytest.raises(ValueError, match=r"\['attn.qkv', 'nope'\] match no module of ViTForImageClassification; adaptable modules include .*q_proj"):
        get_peft_model(base, HouseholderConfig(target_modules=["attn.qkv", "nope"]))
    before.assert_unchanged(base)


def test_unsupported_layer_type_names_module_type_and_supported_types(model_state):
    base = tiny_hf_vit()
    before = model_state(base)
    with pytest.raises(TypeError, match=r"'vit.layernorm' of type torch.nn.modules.normalization.LayerNorm .*supported layer types: torch.nn.modules.linear.Linear, .*Conv1D, .*Conv2d"):
        get_peft_model(base, HouseholderConfig(target_modules=["q_proj", "layernorm"]))
    before.assert_unchanged(base)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"lora_rank": -1}, r"`lora_rank` must be an integer >= 0.*-1"),
        ({"lora_rank": 1.5}, r"`lora_rank` must be an integer"),
        ({"householder": "gram-schmidt"}, r"`householder` must be one of \('normalized', 'paper'\), got 'gram-schmidt'"),
        ({"dropout": 1.0}, r"`dropout` must be in \[0, 1\)"),
        ({"eps": 0.0}, r"`eps` must be a finite number > 0.*got 0.0"),
        ({"eps": float("inf")}, r"`eps` must be a finite number > 0.*got inf"),
        ({"eps": float("nan")}, r"`eps` must be a finite number > 0.*got nan"),
        ({"eps": "1e-6"}, r"`eps` must be a finite number > 0.*got '1e-6'"),
    ],
)
def test_bad_config_values_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        HouseholderConfig(target_modules=["q_proj"], **kwargs)


def test_paper_form_reproduces_printed_householder_and_starts_orthogonal():
    torch.manual_seed(0)
    model = get_peft_model(tiny_hf_vit(), HouseholderConfig(householder="paper", init_weights=False))
    layer = next(m for m in model.modules() if isinstance(m, hh_peft.HouseholderLayer))
    u = layer.hta_u_in["default"].detach().double()
    assert abs(u.pow(2).sum().item() - 2.0) < 1e-6  # scaled so that I - u u^T starts as a reflection
    H = torch.eye(u.numel(), dtype=torch.float64) - torch.outer(u, u)
    torch.testing.assert_close(H @ H.T, torch.eye(u.numel(), dtype=torch.float64), rtol=0, atol=1e-6)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_adapter_gradients(use_reentrant):
    """transformers' gradient checkpointing re-runs each layer's forward in backward; the folded layer's saved
    tensors must come out the same, so the adapter gradients equal those of a plain run (float64)."""
    torch.manual_seed(0)
    base = tiny_hf_vit().double()
    config = HouseholderConfig(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"], init_weights=False)
    plain = get_peft_model(copy.deepcopy(base), config).train()
    checkpointed = get_peft_model(copy.deepcopy(base), config).train()
    checkpointed.load_state_dict(plain.state_dict())
    checkpointed.base_model.model.activation_checkpointing_enable({"use_reentrant": use_reentrant})
    if use_reentrant:
        checkpointed.enable_input_require_grads()  # PEFT's rule: reentrant checkpointing needs a grad-requiring input
    assert checkpointed.base_model.model.is_activation_checkpointing
    x, y = torch.randn(3, 3, 32, 32, dtype=torch.float64), torch.tensor([0, 3, 1])
    calls = {}
    for label, model in (("plain", plain), ("checkpointed", checkpointed)):
        layer = next(m for m in model.modules() if isinstance(m, hh_peft.Linear))
        calls[label] = 0
        handle = layer.register_forward_hook(lambda *_, label=label: calls.__setitem__(label, calls[label] + 1))
        torch.nn.functional.cross_entropy(model(pixel_values=x).logits, y).backward()
        handle.remove()
    assert calls == {"plain": 1, "checkpointed": 2}  # the layer really ran again in backward
    grads = {n: p.grad for n, p in plain.named_parameters() if "hta_" in n}
    assert len(grads) == 2 * 6 * 5
    for name, param in checkpointed.named_parameters():
        if "hta_" in name:
            torch.testing.assert_close(param.grad, grads[name], rtol=1e-10, atol=1e-12)


def test_modules_to_save_matching_nothing_lists_real_module_names(model_state):
    base = tiny_hf_vit()
    before = model_state(base)
    with pytest.raises(ValueError, match=r"`modules_to_save` entry \['clasifier'\] match no module of ViTForImageClassification; .*'vit', 'classifier'"):
        get_peft_model(base, HouseholderConfig(modules_to_save=["classifier", "clasifier"]))
    before.assert_unchanged(base)


def test_modules_to_save_added_by_peft_for_a_task_type_need_not_all_exist():
    """PEFT adds both 'classifier' and 'score' for SEQ_CLS; a ViT has only the first: no error."""
    model = get_peft_model(tiny_hf_vit(), HouseholderConfig(task_type="SEQ_CLS"))
    assert any("classifier.modules_to_save" in n for n, p in model.named_parameters() if p.requires_grad)


def test_lora_rank_above_a_layers_min_in_out_warns_naming_the_layer():
    class Narrow(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.wide = torch.nn.Linear(32, 32)
            self.narrow = torch.nn.Linear(32, 3)

        def forward(self, x):
            return self.narrow(self.wide(x))

    with pytest.warns(UserWarning, match=r"lora_rank=4 exceeds min\(in, out\) of 1 targeted layer\(s\): narrow \(32 -> 3\)"):
        get_peft_model(Narrow(), HouseholderConfig(target_modules=["wide", "narrow"], lora_rank=4))


def _break_one_late_layer(model):
    """An inf in the update of the last adapted layer in module order (every other layer would merge before it)."""
    name, layer = [(n, m) for n, m in model.base_model.model.named_modules() if isinstance(m, hh_peft.HouseholderLayer)][-1]
    with torch.no_grad():
        layer.hta_d["default"][0] = float("inf")
    return name


def test_safe_merge_adapter_is_all_or_nothing_and_names_the_layer():
    torch.manual_seed(0)
    model = get_peft_model(tiny_hf_vit(), HouseholderConfig(init_weights=False))
    broken = _break_one_late_layer(model)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=rf"safe_merge refused layer '{broken}': NaNs or infs .* adapter 'default'.*No layer was merged"):
        model.merge_adapter(safe_merge=True)
    for key, value in model.state_dict().items():
        assert torch.equal(value, weights[key]), key
    assert not any(m.merged for m in model.modules() if isinstance(m, hh_peft.HouseholderLayer))


def test_safe_merge_and_unload_is_all_or_nothing_and_names_the_layer(model_state):
    torch.manual_seed(0)
    model = get_peft_model(tiny_hf_vit(), HouseholderConfig(init_weights=False))
    broken = _break_one_late_layer(model)
    before = model_state(model)
    with pytest.raises(ValueError, match=rf"safe_merge refused layer '{broken}'"):
        model.merge_and_unload(safe_merge=True)
    before.assert_unchanged(model)  # still adapted, nothing merged, nothing unloaded


def test_merge_adapter_unmerges_what_it_merged_when_a_layer_fails():
    """Beyond NaN / inf (checked before any write): any error part-way through undoes the layers merged so far."""
    torch.manual_seed(0)
    model = get_peft_model(tiny_hf_vit().double(), HouseholderConfig(init_weights=False))
    layers = [m for m in model.modules() if isinstance(m, hh_peft.HouseholderLayer)]
    weights = [layer.base_layer.weight.detach().clone() for layer in layers]

    def fail(*args, **kwargs):
        raise RuntimeError("out of memory")

    layers[-1].get_delta_weight = fail
    with pytest.raises(RuntimeError, match="out of memory"):
        model.merge_adapter()
    assert not any(layer.merged for layer in layers)
    for layer, weight in zip(layers, weights):
        torch.testing.assert_close(layer.base_layer.weight, weight, rtol=0, atol=1e-12)
