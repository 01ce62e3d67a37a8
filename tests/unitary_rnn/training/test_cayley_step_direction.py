"""Issue 19: the Cayley step on a real uRNN loss is a descent step of the right size (float64, finite differences).

``benchmarks/urnn_step_diagnosis.py`` prints the same checks as a table."""

import torch

from unitary_rnn import UnitaryRNNConfig, UnitaryRNNForSequenceClassification
from unitary_rnn.training.optim import cayley_step, skew_gradient
from unitary_rnn.training.tasks import AddingTask


def _tiny_model_and_batch():
    torch.manual_seed(0)
    model = UnitaryRNNForSequenceClassification(UnitaryRNNConfig(input_size=2, hidden_size=16, num_labels=1)).double()
    data = AddingTask(length=20).generate(32, seed=0)
    return model, {"inputs_embeds": data["inputs_embeds"].double(), "labels": data["labels"].double()}


def _loss_with(model, data, W):
    p = model.model.cell.recurrent_weight
    with torch.no_grad():
        old = p.detach().clone()
        p.copy_(W)
        p._manifold_version = p._version  # a probe, not an off-manifold edit
        loss = model(**data).loss.item()
        p.copy_(old)
        p._manifold_version = p._version
    return loss


def test_pytorch_complex_gradient_is_the_real_gradient_of_re_and_im():
    # W.grad = dL/dRe + i dL/dIm (= 2 dL/dW*): dL along D is Re tr(G^H D), not half of it
    model, data = _tiny_model_and_batch()
    model(**data).loss.backward()
    W = model.model.cell.recurrent_weight.detach().clone()
    G = model.model.cell.recurrent_weight.grad
    D = torch.randn(16, 16, dtype=W.dtype, generator=torch.Generator().manual_seed(1))
    h = 1e-6
    fd = (_loss_with(model, data, W + h * D) - _loss_with(model, data, W - h * D)) / (2 * h)
    assert abs(fd - torch.real(torch.sum(G.conj() * D)).item()) <= 1e-6 * abs(fd)


def test_cayley_curve_descends_at_the_predicted_rate():
    # d/dt L(Cayley(t)) at t = 0 is -||A||_F^2 / 2 with A = G W^H - W G^H: a descent direction, and the step's
    # first-order size is exactly lr * ||A||^2 / 2 (no stray factor 2 from the complex convention)
    model, data = _tiny_model_and_batch()
    loss = model(**data).loss
    loss.backward()
    W = model.model.cell.recurrent_weight.detach().clone()
    G = model.model.cell.recurrent_weight.grad.detach().clone()
    predicted = -torch.linalg.matrix_norm(skew_gradient(W, G)).item() ** 2 / 2
    assert predicted < 0
    t = 1e-5
    fd = (_loss_with(model, data, cayley_step(W, G, t)) - _loss_with(model, data, cayley_step(W, G, -t))) / (2 * t)
    assert abs(fd - predicted) <= 1e-6 * abs(predicted)
    # a small step lowers the loss, by about the first-order amount
    small = 1e-3
    drop = loss.item() - _loss_with(model, data, cayley_step(W, G, small))
    assert 0.9 * small * -predicted < drop < 1.1 * small * -predicted
