"""HTA on every available device (CPU always, CUDA when present): the adapter lives where its base layer lives, the
forward equals the merged model, the backward equals finite differences, merge/unmerge restore the weight, and bf16
autocast gives a finite output close to float32's. ``benchmarks/gpu_check.sh`` runs these on a GPU."""

import pytest
import torch
from peft import get_peft_model
from torch import nn

from hh_peft import HouseholderConfig


def _model(device, dtype, seed=0):
    torch.manual_seed(seed)
    base = nn.Sequential(nn.Linear(12, 20), nn.Tanh(), nn.Linear(20, 12), nn.Tanh(), nn.Linear(12, 3))
    base = base.to(device=device, dtype=dtype)
    return get_peft_model(base, HouseholderConfig(target_modules=["0", "2", "4"], lora_rank=1, init_weights=False))


def _adapter_parameters(model):
    return [p for n, p in model.named_parameters() if ".hta_" in n]


# float32: a few ulps of the output scale through three layers; float64: the same at double precision
_TOLERANCE = {torch.float32: 2e-5, torch.float64: 1e-12}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_adapter_on_the_device_and_merge_equals_the_unmerged_forward(device, dtype):
    model = _model(device, dtype)
    parameters = _adapter_parameters(model)
    assert parameters and all(p.device.type == device and p.dtype == dtype for p in parameters)
    x = torch.randn(7, 12, device=device, dtype=dtype)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("base_layer.weight")}
    with torch.no_grad():
        unmerged = model(x)
        model.merge_adapter()
        merged = model(x)
        model.unmerge_adapter()
        again = model(x)
    assert unmerged.device.type == device
    scale = unmerged.abs().max().item()
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=_TOLERANCE[dtype] * scale)
    torch.testing.assert_close(again, unmerged, rtol=0, atol=_TOLERANCE[dtype] * scale)
    for name, weight in weights.items():
        torch.testing.assert_close(model.get_parameter(name), weight, rtol=0, atol=_TOLERANCE[dtype] * weight.abs().max().item())


def test_backward_equals_finite_differences(device):
    """float64: the directional derivative of the loss along a random direction of every adapter tensor, from the
    backward pass, against a central difference (step 1e-6: truncation ~1e-12, rounding ~1e-10)."""
    model = _model(device, torch.float64)
    parameters = _adapter_parameters(model)
    x = torch.randn(5, 12, device=device, dtype=torch.float64)
    target = torch.randn(5, 3, device=device, dtype=torch.float64)

    def loss():
        return ((model(x) - target) ** 2).sum()

    loss().backward()
    directions = [torch.randn_like(p) for p in parameters]
    analytic = sum((p.grad * v).sum() for p, v in zip(parameters, directions)).item()
    assert all(p.grad.device.type == device and torch.isfinite(p.grad).all() for p in parameters)
    step = 1e-6
    with torch.no_grad():
        for p, v in zip(parameters, directions):
            p.add_(step * v)
        plus = loss().item()
        for p, v in zip(parameters, directions):
            p.sub_(2 * step * v)
        minus = loss().item()
        for p, v in zip(parameters, directions):
            p.add_(step * v)
    numeric = (plus - minus) / (2 * step)
    assert abs(analytic - numeric) <= 1e-7 * max(1.0, abs(numeric)), (analytic, numeric)


def test_bf16_autocast_is_finite_and_close_to_float32(device):
    model = _model(device, torch.float32)
    x = torch.randn(9, 12, device=device)
    with torch.no_grad():
        reference = model(x)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        out = model(x)
        out.float().sum().backward()
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in _adapter_parameters(model))
    # bf16 keeps 8 bits of mantissa: a few 1e-2 of the output scale through three layers
    scale = reference.abs().max().item()
    torch.testing.assert_close(out.float(), reference, rtol=0, atol=5e-2 * scale)
