"""HTA tuner layers: both forward paths, merging, dropout, several adapters, dtypes, compile."""

import copy

import pytest
import torch
from peft import get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

import hh_peft
from hh_peft import HouseholderConfig
from hh_peft.layer import _FoldedHTALinear


class MLP(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.lin0 = nn.Linear(10, 24, dtype=dtype)
        self.act = nn.GELU()
        self.lin1 = nn.Linear(24, 6, dtype=dtype)
        self.conv1d = Conv1D(8, 6)  # GPT-2 style: weight stored (in=6, out=8)
        self.head = nn.Linear(8, 3, dtype=dtype)

    def forward(self, x):
        return self.head(self.conv1d(self.lin1(self.act(self.lin0(x))).to(self.conv1d.weight.dtype)).to(self.head.weight.dtype))


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        self.depthwise = nn.Conv2d(5, 5, 3, groups=5)
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        return self.head(self.conv(x).mean((-1, -2)))


def adapted_mlp(dtype=torch.float32, **kwargs):
    kwargs.setdefault("target_modules", ["lin0", "lin1", "conv1d"])
    kwargs.setdefault("init_weights", False)
    torch.manual_seed(0)
    base = MLP().to(dtype)
    return base, get_peft_model(copy.deepcopy(base), HouseholderConfig(**kwargs))


def _raw_adapter(in_features, out_features, rank, dtype=torch.float64):
    m = min(in_features, out_features)
    params = [torch.randn(in_features, dtype=dtype), torch.randn(out_features, dtype=dtype), torch.randn(m, dtype=dtype)]
    params += [torch.randn(rank, in_features, dtype=dtype), torch.randn(out_features, rank, dtype=dtype)] if rank else [None, None]
    return [p.requires_grad_() if p is not None else None for p in params]


@pytest.mark.parametrize("householder", ["normalized", "paper"])
@pytest.mark.parametrize("shape", [(10, 24), (24, 10), (16, 16)])
@pytest.mark.parametrize("adapter_ranks", [(1,), (0,), (2, 0)])
def test_folded_function_gradients_equal_autograd_of_the_explicit_form(shape, householder, adapter_ranks):
    """The hand-written backward (low-rank contractions + hta_factors_backward) against torch's numerical gradient
    and against autograd through the dense reference, with one adapter or two stacked ones (float64)."""
    in_features, out_features = shape
    dtype = torch.float64
    x = torch.randn(5, 3, in_features, dtype=dtype, requires_grad=True)
    weight = torch.randn(out_features, in_features, dtype=dtype, requires_grad=True)
    bias = torch.randn(out_features, dtype=dtype, requires_grad=True)
    householders = tuple((householder, 1e-12) for _ in adapter_ranks)
    params = [p for r in adapter_ranks for p in _raw_adapter(in_features, out_features, r)]
    torch.autograd.gradcheck(lambda x, w, b, *ps: _FoldedHTALinear.apply(x, w, b, householders, *ps), (x, weight, bias, *params))

    y = _FoldedHTALinear.apply(x, weight, bias, householders, *params)
    reference = x @ weight.T + bias
    for i in range(len(adapter_ranks)):
        reference = reference + hh_peft.hta_activation_delta(x, *hh_peft.hta_factors(*params[5 * i : 5 * i + 5], householder=householder))
    torch.testing.assert_close(y, reference, rtol=1e-12, atol=1e-12)
    probe = torch.randn_like(y)
    inputs = [t for t in (x, weight, bias, *params) if t is not None]
    ours = torch.autograd.grad((y * probe).sum(), inputs)
    expected = torch.autograd.grad((reference * probe).sum(), inputs)
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("householder", ["normalized", "paper"])
@pytest.mark.parametrize("adapter_ranks", [(1,), (2, 0)])
def test_folded_function_second_order_gradients(householder, adapter_ranks):
    """Higher-order gradients (``create_graph=True``: gradient penalties, meta-learning) through the folded layer:
    torch's numerical second-order check, and a gradient penalty on the input equal to the dense reference's
    (float64)."""
    dtype = torch.float64
    x = torch.randn(3, 7, dtype=dtype, requires_grad=True)
    weight = torch.randn(9, 7, dtype=dtype, requires_grad=True)
    bias = torch.randn(9, dtype=dtype, requires_grad=True)
    householders = tuple((householder, 1e-12) for _ in adapter_ranks)
    params = [p for r in adapter_ranks for p in _raw_adapter(7, 9, r)]
    torch.autograd.gradgradcheck(lambda x, w, b, *ps: _FoldedHTALinear.apply(x, w, b, householders, *ps), (x, weight, bias, *params))

    def penalty(forward):
        (grad_x,) = torch.autograd.grad(forward().tanh().sum(), x, create_graph=True)
        return grad_x.square().sum()

    def reference():
        y = x @ weight.T + bias
        for i in range(len(adapter_ranks)):
            y = y + hh_peft.hta_activation_delta(x, *hh_peft.hta_factors(*params[5 * i : 5 * i + 5], householder=householder))
        return y

    inputs = [t for t in (x, weight, bias, *params) if t is not None]
    ours = torch.autograd.grad(penalty(lambda: _FoldedHTALinear.apply(x, weight, bias, householders, *params)), inputs)
    expected = torch.autograd.grad(penalty(reference), inputs)
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_folded_function_zero_householder_vector_gives_finite_gradients(dtype):
    """A zero u_in / u_out (H = I under the normalized householder) goes through the hand-written backward without NaN, and
    its gradient equals autograd's through the double-where coefficient."""
    x = torch.randn(4, 6, dtype=dtype, requires_grad=True)
    weight = torch.randn(5, 6, dtype=dtype)
    params = _raw_adapter(6, 5, 1, dtype)
    with torch.no_grad():
        params[0].zero_()
        params[1].zero_()
    householders = (("normalized", 1e-12),)
    y = _FoldedHTALinear.apply(x, weight, None, householders, *params)
    grads = torch.autograd.grad(y.square().sum(), [x, *params])
    reference = x @ weight.T + hh_peft.hta_activation_delta(x, *hh_peft.hta_factors(*params))
    expected = torch.autograd.grad(reference.square().sum(), [x, *params])
    for a, b in zip(grads, expected):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b)


def test_folded_and_activation_paths_give_same_outputs_and_gradients():
    """The folded path and the activation-space path agree to float64 precision on Linear and Conv1D targets, in the
    output and in every adapter gradient."""
    _, folded = adapted_mlp(torch.float64)
    _, activation = adapted_mlp(torch.float64)
    activation.load_state_dict(folded.state_dict())
    for module in activation.modules():
        if isinstance(module, hh_peft.Linear):
            module._can_fold = lambda *a, **k: False  # force the activation-space path for the comparison
    x = torch.randn(4, 10, dtype=torch.float64)
    outputs = []
    for model in (folded, activation):
        model.zero_grad()
        y = model(x)
        y.pow(2).sum().backward()
        outputs.append((y.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    torch.testing.assert_close(outputs[0][0], outputs[1][0], rtol=1e-10, atol=1e-10)
    assert outputs[0][1].keys() == outputs[1][1].keys() and len(outputs[0][1]) == 3 * 5
    for name in outputs[0][1]:
        torch.testing.assert_close(outputs[0][1][name], outputs[1][1][name], rtol=1e-9, atol=1e-10, msg=name)


@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_merge_equals_unmerged_forward_and_unmerge_restores_base_weight(dtype, rtol):
    base, model = adapted_mlp(dtype)
    model.eval()
    x = torch.randn(6, 10, dtype=dtype)
    unmerged = model(x)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer.weight" in n}
    model.merge_adapter()
    merged = model(x)
    torch.testing.assert_close(merged, unmerged, rtol=rtol, atol=rtol * unmerged.abs().max().item())
    model.unmerge_adapter()
    for name, weight in model.named_parameters():
        if name in weights:
            torch.testing.assert_close(weight, weights[name], rtol=0, atol=10 * torch.finfo(dtype).eps * weight.abs().max().item())
    unloaded = model.merge_and_unload()
    assert not any(isinstance(m, hh_peft.HouseholderLayer) for m in unloaded.modules())
    torch.testing.assert_close(unloaded(x), unmerged, rtol=rtol, atol=rtol * unmerged.abs().max().item())


def test_safe_merge_refuses_a_nan_update_and_leaves_the_weight_alone():
    _, model = adapted_mlp()
    layer = model.base_model.model.lin0
    before = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        layer.hta_d["default"][3] = float("nan")
    with pytest.raises(ValueError, match="NaNs or infs .* adapter 'default'"):
        layer.merge(safe_merge=True)
    torch.testing.assert_close(layer.base_layer.weight, before, rtol=0, atol=0)
    assert not layer.merged


def test_safe_merge_of_several_adapters_on_one_layer_is_all_or_nothing():
    _, model = adapted_mlp()
    model.add_adapter("other", HouseholderConfig(target_modules=["lin0", "lin1", "conv1d"], init_weights=False))
    layer = model.base_model.model.lin0
    before = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        layer.hta_d["other"][0] = float("inf")
    with pytest.raises(ValueError, match="NaNs or infs .* adapter 'other'"):
        layer.merge(safe_merge=True, adapter_names=["default", "other"])  # 'default' is fine, 'other' is not
    torch.testing.assert_close(layer.base_layer.weight, before, rtol=0, atol=0)
    assert layer.merged_adapters == []


def test_dropout_applies_only_to_the_adapter_input_in_training():
    base, model = adapted_mlp(dropout=0.5)
    x = torch.randn(64, 10)
    model.eval()
    eval_out = model(x)
    # Evaluation ignores dropout: folded path, deterministic.
    torch.testing.assert_close(model(x), eval_out)
    model.train()
    torch.manual_seed(1)
    a = model(x)
    torch.manual_seed(2)
    b = model(x)
    assert not torch.allclose(a, b)
    with model.disable_adapter():
        torch.testing.assert_close(model(x), base(x))


def test_several_adapters_add_set_delete_and_mixed_batch():
    base, model = adapted_mlp()
    model.add_adapter("other", HouseholderConfig(target_modules=["lin0", "lin1"], init_weights=False, lora_rank=2))
    model.eval()
    x = torch.randn(6, 10)
    out_default = model(x)
    model.set_adapter("other")
    out_other = model(x)
    assert not torch.allclose(out_default, out_other)
    names = ["default", "other", "__base__", "other", "default", "__base__"]
    mixed = model(x, adapter_names=names)
    expected = {"default": out_default, "other": out_other, "__base__": base(x)}
    for i, name in enumerate(names):
        torch.testing.assert_close(mixed[i], expected[name][i], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="non-existing adapter.*nope"):
        model(x, adapter_names=["nope"] * 6)
    # two active adapters at once: the folded path concatenates their factors
    model.base_model.set_adapter(["default", "other"])
    layer = model.base_model.model.lin1
    h = torch.randn(6, 24)
    delta = layer.get_delta_weight("default") + layer.get_delta_weight("other")
    torch.testing.assert_close(layer(h), layer.base_layer(h) + h @ delta.T, rtol=1e-5, atol=1e-5)
    model.delete_adapter("other")
    model.set_adapter("default")
    torch.testing.assert_close(model(x), out_default)
    assert not any("other" in n for n, _ in model.named_parameters())


def test_conv2d_target_is_an_out_by_in_kh_kw_map_and_merges():
    torch.manual_seed(0)
    base = ConvNet()
    model = get_peft_model(copy.deepcopy(base), HouseholderConfig(target_modules=["conv"], init_weights=False))
    layer = model.base_model.model.conv
    assert layer.in_features == 3 * 9 and layer.hta_d["default"].shape == (5,)
    model.eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float32)
    y = model(x)
    delta = layer.get_delta_weight("default")
    expected = base.head(nn.functional.conv2d(x, base.conv.weight + delta, base.conv.bias, padding=1).mean((-1, -2)))
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)
    model.merge_adapter()
    torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-6)


def test_grouped_conv_is_rejected_with_its_name():
    with pytest.raises(TypeError, match="'depthwise'.*groups=5"):
        get_peft_model(ConvNet(), HouseholderConfig(target_modules=["depthwise"]))


def test_bf16_base_with_float32_adapter_and_autocast():
    base, model = adapted_mlp(torch.bfloat16)
    layer = model.base_model.model.lin0
    assert layer.hta_d["default"].dtype == torch.float32  # PEFT's autocast_adapter_dtype keeps adapters in fp32
    x = torch.randn(4, 10, dtype=torch.bfloat16)
    y = model(x)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    y.float().sum().backward()
    assert layer.hta_u_in["default"].grad is not None
    _, fp32 = adapted_mlp(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = fp32(torch.randn(4, 10))
    assert z.dtype == torch.bfloat16 and torch.isfinite(z).all()


def test_torch_compile_matches_eager():
    _, model = adapted_mlp()
    x = torch.randn(4, 10)
    eager = model(x)
    compiled = torch.compile(model, backend="eager")
    torch.testing.assert_close(compiled(x), eager)
    compiled(x).sum().backward()
    assert model.base_model.model.lin0.hta_d["default"].grad is not None
