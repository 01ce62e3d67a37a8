"""The unitary RNN on every available device (CPU always, CUDA when present): the fused recurrence against autograd
of the plain loop, a model's forward/backward staying on the device, and the three manifold steps keeping W unitary
there. ``benchmarks/gpu_check.sh`` runs these on a GPU."""

import pytest
import torch

from unitary_rnn import UnitaryRNNConfig, UnitaryRNNForSequenceClassification
from unitary_rnn.cells import real_block_matrix, reference_recurrence, unitary_recurrence
from unitary_rnn.manifold import unitarity_error
from unitary_rnn.parametrizations import random_unitary
from unitary_rnn.training.optim import create_optimizer, manifold_step


def test_fused_recurrence_equals_autograd_of_the_plain_loop(device):
    g = torch.Generator().manual_seed(0)
    N, T, B = 6, 30, 4
    W = random_unitary(N, generator=g, dtype=torch.complex128)
    X = real_block_matrix(W).to(device).requires_grad_()
    u = torch.randn(T, B, 2 * N, generator=g, dtype=torch.float64).to(device).requires_grad_()
    b = (0.7 * torch.randn(N, generator=g, dtype=torch.float64)).to(device).requires_grad_()
    h0 = torch.randn(B, 2 * N, generator=g, dtype=torch.float64).to(device).requires_grad_()
    fast = unitary_recurrence(u, X, b, h0, 1e-8, 2)
    reference = reference_recurrence(u, X, b, h0, 1e-8, 2)
    assert fast.device.type == device
    # float64 over 30 steps: the two loops sum in other orders; a wrong step is off by O(1)
    torch.testing.assert_close(fast, reference, rtol=1e-10, atol=1e-10)
    dH = torch.randn_like(reference)
    for name, a, r in zip(("u", "X", "bias", "h0"), torch.autograd.grad(fast, (u, X, b, h0), dH),
                          torch.autograd.grad(reference, (u, X, b, h0), dH)):
        torch.testing.assert_close(a, r, rtol=1e-8, atol=1e-8 * r.abs().max().item(), msg=name)


@pytest.mark.parametrize("method", ["cayley", "projunn_d", "projunn_t"])
def test_manifold_steps_keep_w_unitary_on_the_device(device, method):
    g = torch.Generator().manual_seed(1)
    N = 32
    W = random_unitary(N, generator=g, dtype=torch.complex64).to(device)
    for _ in range(50):
        G = torch.randn(N, N, dtype=torch.complex64, generator=g).to(device)
        W = manifold_step(W, G, 1e-2, method, rank=2)
    assert W.device.type == device and W.dtype == torch.complex64
    # complex64: the manifold tolerance of the package is sqrt(N) * 1e-4
    assert unitarity_error(W).item() < N ** 0.5 * 1e-4


@pytest.mark.parametrize("parametrization", ["full", "restricted"])
def test_model_trains_on_the_device(device, parametrization):
    config = UnitaryRNNConfig(vocab_size=5, input_size=5, hidden_size=16, num_labels=3, parametrization=parametrization)
    model = UnitaryRNNForSequenceClassification(config).to(device)
    optimizer = create_optimizer(model, lr=1e-2, unitary_lr=1e-2)
    ids = torch.randint(0, 5, (4, 12), device=device)
    labels = torch.randint(0, 3, (4,), device=device)
    losses = []
    for _ in range(5):
        out = model(input_ids=ids, labels=labels)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out.loss.item())
    assert out.logits.device.type == device
    assert all(p.device.type == device for p in model.parameters())
    assert all(torch.isfinite(torch.tensor(losses)))
    if parametrization == "full":
        W = model.get_parameter(next(n for n, p in model.named_parameters() if p.is_complex()))
        assert unitarity_error(W.detach()).item() < 16 ** 0.5 * 1e-4
