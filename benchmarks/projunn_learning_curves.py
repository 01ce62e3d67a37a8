"""Learning curves: Cayley against projUNN-T and projUNN-D (rank k = 1) on the adding and copy-memory tasks.

The projUNN paper's claim checked here: with the same learning rates and the same number of optimizer steps,
rank-1 projUNN reaches the same loss as the full (Cayley) unitary step. Every method trains the same model
(same seed, same initial W, same stream of batches); only the manifold step differs. Each step draws a fresh batch
from the task's generator (online learning: the training loss is an unbiased estimate of the test loss); at the end
every model is evaluated on one held-out set.

    python benchmarks/projunn_learning_curves.py                  # both tasks: adding 6000 steps, copy 1000 (~25 min, 2 cores)
    python benchmarks/projunn_learning_curves.py --task copy --steps 300 --jobs 3

Writes ``benchmarks/results/projunn_learning_curves.{json,png}``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import math
import time
from pathlib import Path

import torch
from bench_common import pyplot, write_results
from tqdm import tqdm

from unitary_rnn import UnitaryRNNConfig, UnitaryRNNForSequenceClassification, UnitaryRNNForTokenClassification
from unitary_rnn.manifold import unitarity_error
from unitary_rnn.training.optim import create_optimizer
from unitary_rnn.training.tasks import AddingTask, CopyMemoryTask

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("cayley", "projunn_t", "projunn_d")


def build(task_name: str, args: argparse.Namespace, method: str):
    """(task, model, optimizer) for one run; the model seed is fixed so every method starts from the same W."""
    torch.manual_seed(args.seed)
    if task_name == "adding":
        task = AddingTask(length=args.adding_length)
        config = UnitaryRNNConfig(input_size=task.input_size, hidden_size=args.adding_hidden, num_labels=1)
        model = UnitaryRNNForSequenceClassification(config)
    else:
        task = CopyMemoryTask(delay=args.copy_delay)
        config = UnitaryRNNConfig(vocab_size=task.vocab_size, hidden_size=args.copy_hidden, num_labels=task.num_labels)
        model = UnitaryRNNForTokenClassification(config)
    optimizer = create_optimizer(
        model, method=method, rank=args.rank, sampling=args.sampling, lr=args.lr, unitary_lr=args.unitary_lr,
        base_optimizer="rmsprop", reproject_every=100, rmsprop_unitary=args.rmsprop_unitary,
    )
    return task, model, optimizer


def train(task_name: str, method: str, args: argparse.Namespace) -> dict:
    task, model, opt = build(task_name, args, method)
    held_out = task.generate(args.eval_size, seed=10**6)
    losses, t0 = [], time.perf_counter()
    for step in tqdm(range(args.steps), desc=f"{task_name}/{method}", leave=False):
        batch = task.generate(args.batch_size, seed=step)  # the same stream for every method
        opt.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            raise RuntimeError(f"{task_name}/{method}: loss became {losses[-1]} at step {step}")
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        eval_loss = model(**held_out).loss.item()
    W = model.base_model.recurrent_matrix().detach()
    return {
        "train_loss": losses,
        "eval_loss": eval_loss,
        "baseline_loss": task.baseline_loss,
        "seconds": seconds,
        "unitarity_error": float(unitarity_error(W)),
    }


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (window ``window``)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def steps_to_reach(curve: list[float], level: float) -> int | None:
    """First step at which the smoothed curve is at or below ``level`` (None if never)."""
    return next((i for i, v in enumerate(curve) if v <= level), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=["adding", "copy", "both"], default="both")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: per task, below)")
    parser.add_argument("--adding-steps", type=int, default=6000)
    parser.add_argument("--copy-steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--adding-length", type=int, default=200)
    parser.add_argument("--adding-hidden", type=int, default=170)
    parser.add_argument("--copy-delay", type=int, default=1000)
    parser.add_argument("--copy-hidden", type=int, default=128)
    parser.add_argument("--rank", type=int, default=1)
    parser.add_argument("--sampling", choices=["lsi", "column"], default="lsi")
    parser.add_argument("--lr", type=float, default=1e-3, help="RMSprop learning rate of the non-manifold parameters")
    parser.add_argument("--unitary-lr", type=float, default=1e-3, help="learning rate of the manifold step (all methods)")
    parser.add_argument("--rmsprop-unitary", action="store_true",
                        help="divide W's gradient by an RMSprop accumulator before the manifold step (Wisdom et al.)")
    parser.add_argument("--eval-size", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="1: the recurrence is sequential; more threads only contend")
    parser.add_argument("--jobs", type=int, default=2, help="runs side by side in worker processes (one per core)")
    parser.add_argument("--out", default=str(RESULTS / "projunn_learning_curves"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    tasks = ["adding", "copy"] if args.task == "both" else [args.task]
    results: dict[str, dict] = {}
    jobs: dict[str, dict] = {}
    for task_name in tasks:
        task_args = argparse.Namespace(**vars(args))
        task_args.steps = args.steps or (args.adding_steps if task_name == "adding" else args.copy_steps)
        results[task_name] = {"steps": task_args.steps, "runs": {}}
        jobs[task_name] = {method: (task_name, method, task_args) for method in args.methods}
    # every (task, method) run is independent: with --jobs > 1 they run side by side in worker processes
    with concurrent.futures.ProcessPoolExecutor(args.jobs, initializer=torch.set_num_threads,
                                                initargs=(args.threads,)) as pool:
        futures = {(t, m): pool.submit(train, *job) for t, by_method in jobs.items() for m, job in by_method.items()}
        for (task_name, method), future in futures.items():
            run = results[task_name]["runs"][method] = future.result()
            tail = run["train_loss"][-max(1, results[task_name]["steps"] // 10):]
            tqdm.write(f"{task_name:6s} {method:10s} final train (last 10%) {sum(tail) / len(tail):.4f}  "
                       f"held-out {run['eval_loss']:.4f}  baseline {run['baseline_loss']:.4f}  {run['seconds']:.0f} s")

    # ---- summary: losses, and steps each method needs to reach the loss Cayley ends with -----------------------------
    lines = ["| task | method | steps | held-out loss | final train loss (last 10%) | baseline | steps to Cayley's final loss | s |",
             "|---|---|---|---|---|---|---|---|"]
    for task_name, r in results.items():
        window = max(1, r["steps"] // 10)
        curves = {m: smooth(run["train_loss"], window) for m, run in r["runs"].items()}
        target = curves["cayley"][-1] if "cayley" in curves else None
        for m, run in r["runs"].items():
            tail = run["train_loss"][-window:]
            reach = steps_to_reach(curves[m], target) if target is not None else None
            run["smoothed_train_loss"] = curves[m]
            run["steps_to_cayley_final_loss"] = reach
            lines.append(f"| {task_name} | {m} | {r['steps']} | {run['eval_loss']:.4f} | {sum(tail) / len(tail):.4f} | "
                         f"{run['baseline_loss']:.4f} | {reach if reach is not None else 'not reached'} | {run['seconds']:.0f} |")
    table = "\n".join(lines)
    print("\n" + table)

    payload = {"settings": vars(args), "results": results, "table_markdown": table}
    plt = pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.2), squeeze=False)
    for ax, (task_name, r) in zip(axes[0], results.items()):
        for m, run in r["runs"].items():
            ax.plot(run["smoothed_train_loss"], label=f"{m} (held-out {run['eval_loss']:.3f})")
        baseline = next(iter(r["runs"].values()))["baseline_loss"]
        ax.axhline(baseline, color="gray", ls="--", lw=1, label=f"memoryless baseline {baseline:.3f}")
        title = (f"adding, T={args.adding_length}, N={args.adding_hidden}" if task_name == "adding"
                 else f"copy, T={args.copy_delay}, N={args.copy_hidden}")
        ax.set_title(f"{title}, rank {args.rank}, unitary lr {args.unitary_lr:g}")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("training loss (moving average)")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    write_results(Path(args.out), payload, fig, indent=None)


if __name__ == "__main__":
    main()
