"""Is the multiplicative Cayley step on U(N) a descent step, and how big is it?

On a tiny full-capacity uRNN (float64 / complex128, adding task) this checks:

(a) the PyTorch complex-gradient convention: for a random direction D, the finite-difference derivative
    (L(W + hD) - L(W - hD)) / 2h equals Re tr(G^H D) with G = W.grad (PyTorch stores dL/dRe + i dL/dIm,
    twice the conjugate Wirtinger derivative dL/dW*);
(b) the Cayley curve W(t) = (I + t/2 A)^{-1}(I - t/2 A) W, A = G W^H - W G^H: its derivative at t = 0 from
    finite differences equals the prediction -||A||_F^2 / 2 (negative: a descent direction; it is the
    Riemannian gradient's squared norm in the metric <X, Y> = Re tr(X^H Y) / 2 ... up to that factor);
    Wisdom et al.'s form, A' = G^H W - W^H G applied on the left, is measured too;
(c) a small step lowers the loss, and the loss along the curve over a range of t (where it stops descending);
(d) the scale of A against N (Frobenius, spectral norm, the spectral norm of the RMS-normalised gradient's A) on
    the default model at initialisation for the adding task, T = 100, batch 50, to read off how far one step at
    a given unitary lr rotates W (the spectral norm of lr * A is the largest rotation angle, in radians).

    python benchmarks/urnn_step_diagnosis.py          # ~1 minute on one thread
Writes ``benchmarks/results/urnn_step_diagnosis.json`` and prints the tables.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from unitary_rnn import UnitaryRNNConfig, UnitaryRNNForSequenceClassification  # noqa: E402
from unitary_rnn.training.optim import cayley_step, rmsprop_scale_, skew_gradient  # noqa: E402
from unitary_rnn.training.tasks import AddingTask  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def build(N: int, T: int, batch: int, seed: int, dtype=torch.float64):
    torch.manual_seed(seed)
    config = UnitaryRNNConfig(input_size=2, hidden_size=N, num_labels=1)
    model = UnitaryRNNForSequenceClassification(config).to(dtype)
    data = AddingTask(length=T).generate(batch, seed=seed)
    data = {"inputs_embeds": data["inputs_embeds"].to(dtype), "labels": data["labels"].to(dtype)}
    return model, data


def loss_at(model, data, W: torch.Tensor) -> float:
    """The loss with W replaced by ``W`` (outside the manifold guard: values only)."""
    p = model.model.cell.recurrent_weight
    with torch.no_grad():
        old = p.detach().clone()
        p.copy_(W)
        p._manifold_version = p._version  # a diagnostic probe, not an off-manifold edit
        loss = model(**data).loss.item()
        p.copy_(old)
        p._manifold_version = p._version
    return loss


def gradient(model, data) -> tuple[float, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss = model(**data).loss
    loss.backward()
    return loss.item(), model.model.cell.recurrent_weight.grad.detach().clone()


def check_convention_and_descent(N: int = 16, T: int = 20, batch: int = 32, seed: int = 0) -> dict:
    model, data = build(N, T, batch, seed)
    W = model.model.cell.recurrent_weight.detach().clone()
    L0, G = gradient(model, data)
    gen = torch.Generator().manual_seed(seed + 1)
    D = torch.randn(N, N, dtype=W.dtype, generator=gen)
    h = 1e-6
    fd_dir = (loss_at(model, data, W + h * D) - loss_at(model, data, W - h * D)) / (2 * h)
    pred_dir = torch.real(torch.sum(G.conj() * D)).item()  # Re tr(G^H D)
    # Wirtinger: dL/dW* = G / 2 would predict half of it
    A = skew_gradient(W, G)
    a2 = torch.linalg.matrix_norm(A).item() ** 2
    pred_curve = -a2 / 2
    rows = []
    for t in (1e-3, 1e-4, 1e-5, 1e-6):
        fd = (loss_at(model, data, cayley_step(W, G, t)) - loss_at(model, data, cayley_step(W, G, -t))) / (2 * t)
        rows.append({"t": t, "fd_derivative": fd, "predicted": pred_curve, "rel_error": abs(fd - pred_curve) / abs(pred_curve)})
    # Wisdom et al.'s printed form A' = G^H W - W^H G, multiplied on the left like ours
    Aw = G.mH @ W - W.mH @ G
    eye = torch.eye(N, dtype=W.dtype)
    t = 1e-5

    def wisdom(tt):
        return torch.linalg.solve(eye + tt / 2 * Aw, (eye - tt / 2 * Aw) @ W)

    fd_wisdom_left = (loss_at(model, data, wisdom(t)) - loss_at(model, data, wisdom(-t))) / (2 * t)

    def wisdom_right(tt):  # W (I + t/2 A')^{-1} (I - t/2 A'): the right-multiplied form, also a descent curve
        return W @ torch.linalg.solve(eye + tt / 2 * Aw, eye - tt / 2 * Aw)

    fd_wisdom_right = (loss_at(model, data, wisdom_right(t)) - loss_at(model, data, wisdom_right(-t))) / (2 * t)
    # (c) the loss along the curve
    along = []
    for t in (0.0, 1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0):
        Wt = cayley_step(W, G, t)
        along.append({"t": t, "loss": loss_at(model, data, Wt), "first_order": L0 + pred_curve * t,
                      "rotation_rad": t * torch.linalg.matrix_norm(A, ord=2).item()})
    return {
        "N": N, "T": T, "batch": batch, "seed": seed, "loss": L0,
        "convention": {"fd_directional_derivative": fd_dir, "re_tr_GH_D": pred_dir,
                       "ratio_fd_over_prediction": fd_dir / pred_dir,
                       "meaning": "1.0: W.grad = dL/dRe + i dL/dIm = 2 dL/dW* (ratio 2 would mean W.grad = dL/dW*)"},
        "cayley_curve": rows,
        "wisdom_printed_A_left_fd_derivative": fd_wisdom_left,
        "wisdom_printed_A_left_predicted_if_descent": -torch.linalg.matrix_norm(Aw).item() ** 2 / 2,
        "wisdom_printed_A_right_fd_derivative": fd_wisdom_right,
        "along_curve": along,
    }


def scale_table(Ns=(16, 32, 64, 128), T: int = 100, batch: int = 50, seed: int = 0) -> list[dict]:
    rows = []
    for N in Ns:
        model, data = build(N, T, batch, seed, dtype=torch.float32)
        W = model.model.cell.recurrent_weight.detach()
        L, G = gradient(model, data)
        A = skew_gradient(W, G)
        sq = torch.zeros(torch.view_as_real(G).shape)
        Gr = rmsprop_scale_(G, sq, 0.9, 1e-6)  # first step of RMSprop on W: |g| / sqrt(0.1 g^2) = sqrt(10) elementwise
        Ar = skew_gradient(W, Gr)
        eu = {name: p.grad.abs().max().item() for name, p in model.named_parameters()
              if p.grad is not None and not p.is_complex()}
        rows.append({
            "N": N, "loss": L, "G_fro": torch.linalg.matrix_norm(G).item(),
            "A_fro": torch.linalg.matrix_norm(A).item(), "A_spec": torch.linalg.matrix_norm(A, ord=2).item(),
            "A_rms_fro": torch.linalg.matrix_norm(Ar).item(), "A_rms_spec": torch.linalg.matrix_norm(Ar, ord=2).item(),
            "max_abs_euclidean_grad": eu,
        })
    return rows


def main() -> None:
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    d = check_convention_and_descent()
    print(f"(a) convention, N={d['N']} T={d['T']}: finite difference along random D {d['convention']['fd_directional_derivative']:.6e}"
          f"  Re tr(G^H D) {d['convention']['re_tr_GH_D']:.6e}  ratio {d['convention']['ratio_fd_over_prediction']:.6f}")
    print("(b) Cayley curve W(t), derivative at t=0:")
    print("| t (finite-difference half-width) | finite difference | -||A||^2/2 | relative error |")
    print("|---|---|---|---|")
    for r in d["cayley_curve"]:
        print(f"| {r['t']:.0e} | {r['fd_derivative']:.6e} | {r['predicted']:.6e} | {r['rel_error']:.1e} |")
    print(f"    Wisdom's printed A' = G^H W - W^H G on the left: dL/dt = {d['wisdom_printed_A_left_fd_derivative']:.4e}"
          f" (a descent curve would give {d['wisdom_printed_A_left_predicted_if_descent']:.4e}); on the right:"
          f" {d['wisdom_printed_A_right_fd_derivative']:.4e}")
    print("(c) loss along the curve:")
    print("| t | loss | first-order prediction | largest rotation angle t*||A||_2 (rad) |")
    print("|---|---|---|---|")
    for r in d["along_curve"]:
        print(f"| {r['t']:g} | {r['loss']:.6f} | {r['first_order']:.6f} | {r['rotation_rad']:.3g} |")
    rows = scale_table()
    print("(d) scale at initialisation, adding T=100, batch 50 (float32):")
    print("| N | loss | ||G||_F | ||A||_F | ||A||_2 | ||A_rms||_F | ||A_rms||_2 |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['N']} | {r['loss']:.4f} | {r['G_fro']:.3g} | {r['A_fro']:.3g} | {r['A_spec']:.3g} | "
              f"{r['A_rms_fro']:.3g} | {r['A_rms_spec']:.3g} |")
    out = {"descent_check": d, "scale_at_init": rows, "seconds": time.perf_counter() - t0}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "urnn_step_diagnosis.json").write_text(json.dumps(out, indent=1))
    print(f"wrote {RESULTS / 'urnn_step_diagnosis.json'} ({out['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
