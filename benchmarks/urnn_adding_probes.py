"""Short probes of the full-capacity uRNN on the adding problem: one setting per call, appended to
``benchmarks/results/urnn_adding_probes.json`` (setting, steps, final and best held-out MSE, wall time).

Every knob defaults to the value of ``create_optimizer``'s / the model's defaults at the time of the call, so a
probe with no flags measures the library's defaults; each flag changes one thing:

    python benchmarks/urnn_adding_probes.py --name defaults --hidden 64 --steps 1500
    python benchmarks/urnn_adding_probes.py --name ulr1e-4 --unitary-lr 1e-4
    python benchmarks/urnn_adding_probes.py --name frozenW --freeze-w

Batches are drawn afresh at every step (seeded, as ``unitary_learning_curves.py`` draws them); the held-out set
(``--eval-size`` examples, seed 10**6) is scored every ``--eval-every`` steps.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from unitary_rnn import UnitaryRNNConfig, UnitaryRNNForSequenceClassification  # noqa: E402
from unitary_rnn.training.optim import create_optimizer  # noqa: E402
from unitary_rnn.training.tasks import AddingTask  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "urnn_adding_probes.json"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True)
    p.add_argument("--length", type=int, default=100)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--parametrization", default="full")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-size", type=int, default=500)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--freeze-w", action="store_true", help="W stays at its initial value")
    p.add_argument("--clip", type=float, default=None, help="clip the global gradient norm")
    p.add_argument("--out-bias", type=float, default=None, help="initialise the head's bias to this")
    p.add_argument("--head-std", type=float, default=None, help="initialise the head's weight N(0, std)")
    p.add_argument("--unitary-init", default=None)
    p.add_argument("--method", default="cayley")
    p.add_argument("--lstm", action="store_true", help="the recipe's LSTM baseline instead (hidden = --hidden)")
    p.add_argument("--forget-bias", type=float, default=None, help="LSTM: forget-gate bias")
    p.add_argument("--opt", nargs="*", default=[], metavar="KEY=VALUE",
                   help="create_optimizer keywords, e.g. unitary_lr=1e-4 rmsprop_unitary=True alpha=0.9")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--threads", type=int, default=1)
    return p


def parse_value(text: str):
    if text in ("True", "False"):
        return text == "True"
    if text == "None":
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def main() -> None:
    args = build_parser().parse_args()
    torch.set_num_threads(args.threads)
    opt_kwargs = {}
    for item in args.opt:
        key, _, value = item.partition("=")
        opt_kwargs[key] = parse_value(value)
    task = AddingTask(length=args.length)
    held = task.generate(args.eval_size, seed=10**6)
    torch.manual_seed(args.seed)
    if args.lstm:
        from recipes.train_unitary_rnn import LSTMBaseline

        model = LSTMBaseline(2, args.hidden, 1, "regression")
        if args.forget_bias is not None:
            with torch.no_grad():
                H = args.hidden
                for name in ("bias_ih_l0", "bias_hh_l0"):
                    b = getattr(model.lstm, name)
                    b[H:2 * H].fill_(args.forget_bias / 2)
        kwargs = {k: v for k, v in opt_kwargs.items()}
        optimizer = create_optimizer(model, **kwargs)
    else:
        config = UnitaryRNNConfig(input_size=2, hidden_size=args.hidden, num_labels=1,
                                  parametrization=args.parametrization,
                                  **({"unitary_init": args.unitary_init} if args.unitary_init else {}))
        model = UnitaryRNNForSequenceClassification(config)
        if args.freeze_w:
            model.model.cell.recurrent_weight.requires_grad_(False)
        with torch.no_grad():
            if args.out_bias is not None:
                model.classifier.bias.fill_(args.out_bias)
            if args.head_std is not None:
                model.classifier.weight.normal_(0, args.head_std)
        optimizer = create_optimizer(model, method=args.method, **opt_kwargs)

    def forward(batch):
        out = model(**batch)
        return out["loss"] if isinstance(out, dict) else out.loss

    def evaluate() -> float:
        model.eval()
        with torch.no_grad():
            loss = forward(held).item()
        model.train()
        return loss

    curve, train_losses = [], []
    t0 = time.perf_counter()
    diverged = None
    for step in range(args.steps):
        batch = task.generate(args.batch_size, seed=args.seed * 10**7 + step)
        optimizer.zero_grad(set_to_none=True)
        loss = forward(batch)
        loss.backward()
        if args.clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        optimizer.step()
        train_losses.append(loss.item())
        if not math.isfinite(train_losses[-1]):
            diverged = step
            break
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            curve.append((step + 1, evaluate()))
    seconds = time.perf_counter() - t0
    evals = [v for _, v in curve]
    record = {
        "name": args.name, "model": "lstm" if args.lstm else args.parametrization, "hidden": args.hidden,
        "length": args.length, "batch": args.batch_size, "steps": args.steps, "seed": args.seed,
        "optimizer": opt_kwargs, "method": args.method, "freeze_w": args.freeze_w, "clip": args.clip,
        "out_bias": args.out_bias, "head_std": args.head_std, "unitary_init": args.unitary_init,
        "forget_bias": args.forget_bias,
        "final_eval_mse": evals[-1] if evals else math.nan, "best_eval_mse": min(evals) if evals else math.nan,
        "best_at": curve[evals.index(min(evals))][0] if evals else None,
        "first_eval_below_0.05": next((s for s, v in curve if v < 0.05), None),
        "eval_curve": curve, "diverged_at": diverged, "seconds": seconds,
        "train_loss_last100": sum(train_losses[-100:]) / len(train_losses[-100:]),
    }
    out = Path(args.out)
    records = json.loads(out.read_text()) if out.exists() else []
    records.append(record)
    out.write_text(json.dumps(records, indent=1))
    print(f"{args.name}: final {record['final_eval_mse']:.4f} best {record['best_eval_mse']:.4f} (step {record['best_at']})"
          f" first<0.05 {record['first_eval_below_0.05']}  {seconds:.0f} s  curve "
          + " ".join(f"{v:.3f}" for v in evals))


if __name__ == "__main__":
    main()
