"""The recurrent cell: the fused recurrence against autograd, the complex maths, init, dtype safety."""

import logging

import warnings

import pytest
import torch
from torch import nn

from unitary_rnn import UnitaryRNNConfig
from unitary_rnn.cells import UnitaryRNNCell, real_block_matrix, reference_recurrence, unitary_recurrence
from unitary_rnn.manifold import manifold_of, unitarity_error
from unitary_rnn.parametrizations import modrelu, random_unitary, real_modrelu


def _problem(groups, T=7, B=3, N=5, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = random_unitary(N, generator=g, dtype=torch.complex128 if groups == 2 else torch.float64)
    X = real_block_matrix(W).to(dtype).clone().requires_grad_()
    D = groups * N
    u = torch.randn(T, B, D, generator=g, dtype=dtype).requires_grad_()
    # biases of both signs, so that some units are cut by the relu and some are not
    b = (torch.randn(N, generator=g, dtype=dtype) * 0.7).requires_grad_()
    h0 = torch.randn(B, D, generator=g, dtype=dtype).requires_grad_()
    return u, X, b, h0


@pytest.mark.parametrize("groups", [2, 1])
def test_fused_recurrence_passes_gradcheck(groups):
    u, X, b, h0 = _problem(groups)
    assert torch.autograd.gradcheck(lambda *a: unitary_recurrence(*a, 1e-8, groups), (u, X, b, h0))


@pytest.mark.parametrize("groups", [2, 1])
def test_fused_backward_equals_autograd_of_plain_loop(groups):
    u, X, b, h0 = _problem(groups, T=40, B=4, N=6)
    H_fast = unitary_recurrence(u, X, b, h0, 1e-8, groups)
    H_ref = reference_recurrence(u, X, b, h0, 1e-8, groups)
    # float64 over 40 steps: the two loops sum in different orders, and each step's rounding (~1e-16 relative)
    # is carried forward, so a few 1e-12 is the expected spread (seen: 1.7e-12 on this machine's BLAS); a wrong
    # step is off by O(1)
    torch.testing.assert_close(H_fast, H_ref, rtol=1e-10, atol=1e-10)
    dH = torch.randn_like(H_ref)
    fast = torch.autograd.grad(H_fast, (u, X, b, h0), dH)
    ref = torch.autograd.grad(H_ref, (u, X, b, h0), dH)
    for name, a, r in zip(("u", "X", "bias", "h0"), fast, ref):
        # float64; the real modReLU's 1/|z| near z = 0 costs a few digits, hence a scale-relative atol
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-10 * r.abs().max().item(), msg=f"gradient of {name}")


def test_fused_recurrence_nan_free_at_zero_state():
    """All-zero inputs and state: modReLU at z = 0 in every step, forward and backward finite."""
    u, X, b, h0 = _problem(2, T=5)
    u = torch.zeros_like(u, requires_grad=True)
    h0 = torch.zeros_like(h0, requires_grad=True)
    H = unitary_recurrence(u, X, b, h0, 1e-8, 2)
    assert torch.equal(H, torch.zeros_like(H))
    H.sum().backward()
    for t in (u, X, b, h0):
        assert torch.isfinite(t.grad).all()


def _cell(**kw):
    kw.setdefault("input_size", 3)
    kw.setdefault("hidden_size", 6)
    return UnitaryRNNCell(UnitaryRNNConfig(**kw))


@pytest.mark.parametrize("parametrization", ["full", "restricted"])
def test_cell_matches_the_complex_maths(parametrization):
    """z_t = W h_{t-1} + V x_t, h_t = modReLU(z_t), written with complex tensors."""
    cell = _cell(parametrization=parametrization).double()
    x = torch.randn(2, 9, 3, dtype=torch.float64)
    states, last = cell(x)
    N = cell.hidden_size
    W = cell.recurrent_matrix().detach()
    V = torch.complex(cell.input_weight[:N], cell.input_weight[N:]).detach()
    h = torch.complex(cell.initial_state[:N], cell.initial_state[N:]).detach().expand(2, N)
    for t in range(9):
        h = modrelu((W @ h.T).T + x[:, t].to(V.dtype) @ V.T, cell.hidden_bias.detach(), cell.eps)
        torch.testing.assert_close(states[:, t], torch.cat([h.real, h.imag], dim=-1))
    torch.testing.assert_close(last, states[:, -1])


def test_real_cell_matches_the_real_maths():
    cell = _cell(field="real").double()
    x = torch.randn(2, 6, 3, dtype=torch.float64)
    states, _ = cell(x)
    assert states.shape == (2, 6, 6)
    W, V, b = cell.recurrent_weight.detach(), cell.input_weight.detach(), cell.hidden_bias.detach()
    h = cell.initial_state.detach().expand(2, -1)
    for t in range(6):
        h = real_modrelu(h @ W.T + x[:, t] @ V.T, b, cell.eps)
        torch.testing.assert_close(states[:, t], h)


def test_cell_initial_state_override_and_empty_sequence():
    cell = _cell()
    x = torch.randn(2, 4, 3)
    h0 = torch.randn(2, 12)
    states, last = cell(x, h0)
    states2, _ = cell(x[:, 2:], states[:, 1])
    torch.testing.assert_close(states2, states[:, 2:], rtol=1e-5, atol=1e-6)
    empty, last = cell(x[:, :0], h0)
    assert empty.shape == (2, 0, 12) and torch.equal(last, h0)


@pytest.mark.parametrize(
    "kw",
    [
        dict(unitary_init="identity"),
        dict(unitary_init="random"),
        dict(unitary_init="restricted"),
        dict(parametrization="restricted"),
        dict(field="real", unitary_init="identity"),
        dict(field="real", unitary_init="random"),
    ],
)
def test_w_is_unitary_at_init(kw):
    cell = _cell(hidden_size=32, **kw)
    W = cell.recurrent_matrix().detach()
    assert W.is_complex() == (kw.get("field", "complex") == "complex")
    assert unitarity_error(W) < 1e-5
    if kw.get("unitary_init") == "identity":
        assert torch.equal(W, torch.eye(32, dtype=W.dtype))
    else:
        assert not torch.allclose(W, torch.eye(32, dtype=W.dtype))


def test_full_w_is_one_tagged_parameter():
    cell = _cell()
    manifold = [n for n, p in cell.named_parameters() if manifold_of(p)]
    assert manifold == ["recurrent_weight"]
    assert cell.recurrent_weight.dtype == torch.complex64 and manifold_of(cell.recurrent_weight) == "unitary"
    assert manifold_of(_cell(field="real").recurrent_weight) == "orthogonal"
    restricted = _cell(parametrization="restricted")
    assert not any(manifold_of(p) for p in restricted.parameters())
    assert sum(p.numel() for n, p in restricted.named_parameters() if n.startswith(("theta", "reflection"))) == 7 * 6


def test_replacing_w_keeps_tag_and_trainability():
    """transformers' loader assigns a fresh Parameter with requires_grad = is_floating_point() (False for complex)."""
    cell = _cell()
    new = nn.Parameter(random_unitary(6), requires_grad=False)
    cell.recurrent_weight = new
    assert cell.recurrent_weight is new
    assert manifold_of(new) == "unitary" and new.requires_grad


@pytest.mark.parametrize("cast", ["to_bf16", "half", "float", "to_f16"])
def test_real_casts_keep_w_complex(cast, caplog):
    cell = _cell()
    W0 = cell.recurrent_weight.detach().clone()
    with caplog.at_level(logging.WARNING, logger="unitary_rnn.cells"):
        if cast == "to_bf16":
            cell.to(torch.bfloat16)
        elif cast == "to_f16":
            cell.to(torch.float16)
        else:
            getattr(cell, cast)()
    W = cell.recurrent_weight
    assert W.dtype == torch.complex64 and torch.equal(W.detach(), W0)
    assert manifold_of(W) == "unitary" and W.requires_grad
    if cast in ("to_bf16", "half", "to_f16"):
        assert cell.input_weight.dtype in (torch.bfloat16, torch.float16)
        assert "keeping the unitary recurrent matrix" in caplog.text
        states, _ = cell(torch.randn(2, 5, 3))
        assert states.dtype == cell.input_weight.dtype and torch.isfinite(states).all()


def test_double_and_back_follow_precision():
    cell = _cell()
    W0 = cell.recurrent_weight.detach().clone()
    cell.double()
    assert cell.recurrent_weight.dtype == torch.complex128 and cell.input_weight.dtype == torch.float64
    assert cell(torch.randn(1, 3, 3, dtype=torch.float64))[0].dtype == torch.float64
    cell.float()
    assert cell.recurrent_weight.dtype == torch.complex64 and torch.equal(cell.recurrent_weight.detach(), W0)
    with pytest.raises(TypeError, match=r"cannot convert to torch.complex128.*\.double\(\): complex128 W"), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's "complex modules are a new feature"
        cell.to(torch.complex128)  # would make the real inputs and features complex
    assert cell.recurrent_weight.dtype == torch.complex64 and cell.input_weight.dtype == torch.float32


def test_real_w_keeps_float32_under_narrow_casts():
    cell = _cell(field="real")
    cell.to(torch.bfloat16)
    assert cell.recurrent_weight.dtype == torch.float32 and manifold_of(cell.recurrent_weight) == "orthogonal"
    cell.double()
    assert cell.recurrent_weight.dtype == torch.float64


def test_restricted_fft_path_equals_matrix_path():
    """restricted_apply="fft" (O(N log N) per step) and "matrix" (materialised W, fused loop) agree."""
    torch.manual_seed(0)
    fft = _cell(parametrization="restricted", restricted_apply="fft").double()
    dense = _cell(parametrization="restricted", restricted_apply="matrix").double()
    dense.load_state_dict(fft.state_dict())
    assert fft.uses_fft and not dense.uses_fft
    x = torch.randn(2, 8, 3, dtype=torch.float64)
    (a, a_last), (b, b_last) = fft(x), dense(x)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(a_last, b_last)
    w = torch.randn_like(a)
    ga = torch.autograd.grad((a * w).sum(), list(fft.parameters()))
    gb = torch.autograd.grad((b * w).sum(), list(dense.parameters()))
    for (name, _), x1, x2 in zip(fft.named_parameters(), ga, gb):
        torch.testing.assert_close(x1, x2, rtol=1e-9, atol=1e-9, msg=name)


def test_restricted_auto_switches_to_fft_for_large_n():
    from unitary_rnn.cells import RESTRICTED_FFT_ABOVE

    assert not _cell(parametrization="restricted").uses_fft
    big = UnitaryRNNCell(UnitaryRNNConfig(input_size=1, hidden_size=RESTRICTED_FFT_ABOVE + 1, parametrization="restricted"))
    assert big.uses_fft
    assert not _cell(restricted_apply="fft").uses_fft  # only the restricted parametrisation has an FFT form


def test_fused_backward_refuses_double_backward():
    u, X, b, h0 = _problem(2, T=3)
    H = unitary_recurrence(u, X, b, h0, 1e-8, 2)
    (gX,) = torch.autograd.grad(H.sum(), X, create_graph=True)
    with pytest.raises(RuntimeError):
        gX.sum().backward()


# ------------------------------------------------------------------ complex32 and the restricted cell in half precision
@pytest.mark.parametrize("parametrization", ["full", "restricted"])
def test_complex_casts_raise_a_clear_error_and_change_nothing(parametrization):
    """Before: .to(torch.complex32) made every tensor complex32 and the forward died in a kernel ("addmm_impl_cpu_"
    / "eye" not implemented for 'ComplexHalf')."""
    from unitary_rnn import UnitaryRNNForTokenClassification

    model = UnitaryRNNForTokenClassification(UnitaryRNNConfig(hidden_size=6, vocab_size=5, num_labels=5, input_embedding="embedding",
                                                              input_size=3, parametrization=parametrization))
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's "complex modules are a new feature"
        for dtype in (torch.complex32, torch.complex64):
            with pytest.raises(TypeError, match=rf"UnitaryRNNForTokenClassification: cannot convert to {dtype}: the inputs, "
                                                r"heads and features are real.*\.half\(\)"):
                model.to(dtype)
    assert {name: p.dtype for name, p in model.named_parameters()} == dtypes  # the embedding was not converted either


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("apply", ["matrix", "fft"])
def test_restricted_cell_runs_under_half_precision_casts(dtype, apply, caplog):
    """Before: the restricted parametrisation cast to bf16 died in the FFT / complex kernels. Its angles and
    reflections now stay float32 (like a full W), the recurrence runs in float32, features come out in ``dtype``."""
    cell = _cell(parametrization="restricted", restricted_apply=apply)
    x = torch.randn(2, 5, 3)
    reference, _ = cell(x)
    with caplog.at_level(logging.WARNING, logger="unitary_rnn.cells"):
        cell.to(dtype)
    assert "keeping the restricted parametrisation's angles and reflections in torch.float32" in caplog.text
    for name in ("theta1", "theta2", "theta3", "reflection1", "reflection2"):
        assert getattr(cell, name).dtype == torch.float32, name
    assert cell.input_weight.dtype == dtype
    states, _ = cell(x.to(dtype))
    assert states.dtype == dtype
    states.float().sum().backward()
    assert cell.theta1.grad.dtype == torch.float32 and torch.isfinite(cell.theta1.grad).all()
    # only the input projection, bias and h0 were rounded to half precision
    torch.testing.assert_close(states.float(), reference, rtol=0, atol=5e-2)
