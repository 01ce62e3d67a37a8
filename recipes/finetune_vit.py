#!/usr/bin/env python
"""Fine-tune an image classifier with HTA, LoRA, HRA, full fine-tuning or a linear probe.

Runs on one CPU, several CPU processes, one or many GPUs: everything (device placement, DDP,
gradient synchronisation, mixed precision, checkpoints) goes through ``accelerate``.

    python recipes/finetune_vit.py --model vit_tiny_patch16_224 --dataset mnist_5k --method hta
    accelerate launch --config_file recipes/accelerate/multi_gpu.yaml recipes/finetune_vit.py ...
    ACCELERATE_USE_CPU=true torchrun --standalone --nproc_per_node 2 recipes/finetune_vit.py ...

Writes into ``--output_dir`` (main process only): the adapter (or the whole model for ``full`` /
``linear``), ``metrics.json`` (accuracy, trainable parameters, time, the per-step history),
``training_curves.png``, and ``checkpoints/step_N`` (``accelerator.save_state``, written under a
temporary name and renamed when complete) every ``--checkpointing_steps``;
``--resume_from_checkpoint`` (a folder, or ``latest``: the newest complete one) continues from one
bit for bit as the uninterrupted run would have. Bad flags and an unusable ``--output_dir`` fail
before any data is loaded.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `recipes` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from recipes.common import RecipeError
from recipes.common.data import BUILTIN_DATASETS, ImageCollator, load_image_dataset, loader_view
from recipes.common.metrics import load_accuracy
from recipes.common.training import (
    exit_script,
    add_output_arguments,
    FRACTION,
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    POSITIVE,
    POSITIVE_INT,
    check_run_args,
    plot_training_curves,
    replica_max_abs_diff,
    run_recipe,
    train,
    write_json,
)
from recipes.common.models import (
    METHODS,
    PEFT_METHODS,
    PRESET_NAMES,
    MethodOptions,
    apply_method,
    check_image_size,
    count_parameters,
    dry_run,
    load_image_classifier,
    save_model,
    validate_method_options,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default="vit_tiny_patch16_224", help="timm name, Hub id, or local model folder")
    g.add_argument("--model_kwargs", default=None, help="JSON dict of timm constructor overrides, e.g. a small ViT")
    g.add_argument("--random_init", action="store_true", help="timm name: do not download pretrained weights")
    g.add_argument("--dataset", default="mnist_5k", help=f"built-in ({', '.join(BUILTIN_DATASETS)}), Hub name, or imagefolder dir")
    g.add_argument("--dataset_config", default=None, help="configuration name of a Hub dataset")
    g.add_argument("--image_column", default=None)
    g.add_argument("--label_column", default=None)
    g.add_argument("--image_size", type=int, default=None, help="input size (default: the model's own)")
    g.add_argument("--max_train_samples", type=int, default=None)
    g.add_argument("--max_eval_samples", type=int, default=None)
    g = p.add_argument_group("method")
    g.add_argument("--method", default="hta", help=f"one of {', '.join(METHODS)}")
    g.add_argument("--target_preset", default="attn_mlp", help=f"one of {', '.join(PRESET_NAMES)}")
    g.add_argument("--target_modules", default=None, help="comma-separated module names (overrides the preset)")
    g.add_argument("--lora_rank", type=int, default=1, help="HTA: rank of the additive low-rank term (0: pure Householder)")
    g.add_argument("--householder", default="normalized", help="HTA: 'normalized' (orthogonal) or 'paper' (I - vv^T)")
    g.add_argument("--lora_r", type=int, default=8)
    g.add_argument("--lora_alpha", type=float, default=None, help="default: lora_r")
    g.add_argument("--hra_r", type=int, default=8)
    g.add_argument("--adapter_dropout", type=float, default=0.0)
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=float, default=10)
    g.add_argument("--max_train_steps", type=int, default=None, help="overrides --epochs")
    g.add_argument("--batch_size", type=int, default=64, help="per process")
    g.add_argument("--eval_batch_size", type=int, default=256)
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--weight_decay", type=float, default=1e-4)
    g.add_argument("--warmup_ratio", type=float, default=0.1, help="fraction of the steps spent warming up")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--eval_every", type=int, default=None, help="validate every N steps (overrides --eval_epochs)")
    g.add_argument("--eval_epochs", type=float, default=1.0, help="validate every this many epochs (and at the end)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--num_workers", type=int, default=0)
    g.add_argument("--threads", type=int, default=None, help="torch.set_num_threads per process (CPU)")
    g = p.add_argument_group("output")
    add_output_arguments(g, "outputs/finetune_vit")
    g.add_argument("--hub_private", action="store_true")
    return p


def evaluate_accuracy(accelerator, loaded, model, loader, metric) -> float:
    """Accuracy over the whole split, gathered across processes (duplicates of the last batch dropped)."""
    model.eval()
    with torch.no_grad():
        for pixels, labels in loader:
            logits = loaded.forward_logits(model, pixels)
            preds, refs = accelerator.gather_for_metrics((logits.argmax(-1), labels))
            metric.add_batch(predictions=preds.cpu().numpy(), references=refs.cpu().numpy())
    model.train()
    return float(metric.compute()["accuracy"])


#: valid values of the numeric flags (checked before any work)
FLAG_RANGES = {
    "image_size": POSITIVE_INT, "max_train_samples": POSITIVE_INT, "max_eval_samples": POSITIVE_INT,
    "lora_r": POSITIVE_INT, "lora_alpha": POSITIVE, "hra_r": POSITIVE_INT, "adapter_dropout": FRACTION,
    "epochs": POSITIVE, "max_train_steps": POSITIVE_INT, "batch_size": POSITIVE_INT, "eval_batch_size": POSITIVE_INT,
    "lr": POSITIVE, "weight_decay": NON_NEGATIVE, "warmup_ratio": FRACTION, "gradient_accumulation_steps": POSITIVE_INT,
    "eval_every": POSITIVE_INT, "eval_epochs": POSITIVE, "num_workers": NON_NEGATIVE_INT, "threads": POSITIVE_INT,
    "checkpointing_steps": POSITIVE_INT,
}


def run(args: argparse.Namespace) -> dict:
    """Train, evaluate and save as ``args`` says; returns the metrics dict (on every process)."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
    from transformers import get_cosine_schedule_with_warmup

    # ---- everything that can be wrong with the input fails here, before any work ----
    if args.method not in METHODS:
        raise RecipeError(f"unknown --method {args.method!r}; choose one of {', '.join(METHODS)}")
    resume_from = check_run_args(args, FLAG_RANGES)
    opts = MethodOptions(
        method=args.method, target_preset=args.target_preset, target_modules=args.target_modules,
        lora_rank=args.lora_rank, householder=args.householder, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
        hra_r=args.hra_r, adapter_dropout=args.adapter_dropout,
    )
    validate_method_options(opts)
    try:
        model_kwargs = json.loads(args.model_kwargs) if args.model_kwargs else {}
    except json.JSONDecodeError as err:
        raise RecipeError(f"--model_kwargs is not a JSON object: {err}") from err
    if args.threads:
        torch.set_num_threads(args.threads)
    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
        project_config=ProjectConfiguration(project_dir=str(output_dir)),
    )
    set_seed(args.seed)

    dsd = load_image_dataset(
        args.dataset, config=args.dataset_config, image_column=args.image_column, label_column=args.label_column,
        max_train_samples=args.max_train_samples, max_eval_samples=args.max_eval_samples, seed=args.seed,
    )
    label_names = dsd["train"].features["label"].names
    num_labels = len(label_names)
    loaded = load_image_classifier(
        args.model, num_labels, random_init=args.random_init, model_kwargs=model_kwargs, image_size=args.image_size
    )
    spec = check_image_size(loaded, args.image_size)
    dry_run(loaded, spec, num_labels)
    try:
        model = apply_method(loaded, opts)
    except (ValueError, TypeError) as err:  # PEFT / hh_peft config validation
        if isinstance(err, RecipeError):
            raise
        raise RecipeError(f"--method {args.method}: {str(err).strip().splitlines()[0]}") from err
    trainable, total = count_parameters(model)

    collate = ImageCollator(spec)
    train_loader = torch.utils.data.DataLoader(
        loader_view(dsd["train"]), batch_size=args.batch_size, shuffle=True, drop_last=True,
        collate_fn=collate, num_workers=args.num_workers, generator=torch.Generator().manual_seed(args.seed),
    )
    val_loader, test_loader = accelerator.prepare(*(
        torch.utils.data.DataLoader(loader_view(dsd[split]), batch_size=args.eval_batch_size, collate_fn=collate,
                                    num_workers=args.num_workers)
        for split in ("validation", "test")))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    with accelerator.main_process_first():  # the metric module is compiled into a shared cache once
        metric = load_accuracy()

    def make_scheduler(optimizer, total_steps: int, num_processes: int):
        return get_cosine_schedule_with_warmup(
            optimizer, num_warmup_steps=int(args.warmup_ratio * total_steps) * num_processes,
            num_training_steps=total_steps * num_processes)

    def loss_fn(model, batch):
        pixels, labels = batch
        return F.cross_entropy(loaded.forward_logits(model, pixels), labels)

    result = train(
        accelerator, model, optimizer, train_loader, loss_fn, output_dir=output_dir,
        max_train_steps=args.max_train_steps, epochs=args.epochs, make_scheduler=make_scheduler,
        evaluate=lambda model: {"val_accuracy": evaluate_accuracy(accelerator, loaded, model, val_loader, metric)},
        eval_every=args.eval_every, eval_epochs=args.eval_epochs, checkpointing_steps=args.checkpointing_steps,
        resume_from=resume_from, desc=args.method, quiet=args.quiet,
    )
    model, state = result.model, result.state
    test_acc = evaluate_accuracy(accelerator, loaded, model, test_loader, metric)
    replica_diff = replica_max_abs_diff(accelerator, model)

    unwrapped = accelerator.unwrap_model(model)
    metrics = {
        "method": args.method,
        "method_options": asdict(opts),
        "model": args.model,
        "dataset": args.dataset,
        "num_labels": num_labels,
        "image_size": [spec.channels, spec.height, spec.width],
        "trainable_params": trainable,
        "total_params": total,
        "steps": state.step,
        "train_time_s": state.train_time_s,
        "val_accuracy": state.history["val_accuracy"][-1] if state.history.get("val_accuracy") else None,
        "test_accuracy": test_acc,
        "threads": torch.get_num_threads(),
        "distributed": {
            "num_processes": accelerator.num_processes,
            "distributed_type": str(accelerator.distributed_type),
            "model_wrapper": type(model).__name__,
            "replica_max_abs_diff": replica_diff,
        },
        "history": state.history,
    }
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        if args.method == "hta":  # the adapter's README.md is the HTA card, with this run's results
            import hh_peft

            hh_peft.set_card_info(  # a --random_init backbone has no base model to name
                unwrapped, base_model=None if args.random_init else loaded.base_model, dataset=args.dataset,
                metrics={"accuracy": test_acc}, num_labels=num_labels, model_family=loaded.family,
            )
        save_model(loaded, unwrapped, output_dir, args.method)
        write_json(output_dir / "metrics.json", metrics)
        if not args.no_plot:
            plot_training_curves(output_dir / "training_curves.png", f"{args.method} on {args.dataset}", state.history,
                                 accuracy_key="val_accuracy", loss_scale="log")
        if args.push_to_hub:
            push(args, loaded, unwrapped, metrics, output_dir)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return metrics


def push(args, loaded, model, metrics: dict, output_dir: Path) -> str:
    """Upload the result to ``--hub_model_id`` (default: the output folder's name).

    PEFT methods push the adapter (an HTA adapter with its HTA card, see ``hh_peft.card``); transformers
    models push themselves; a fully trained timm model is uploaded as its saved folder.
    """
    repo_id = args.hub_model_id or output_dir.name
    if args.method in PEFT_METHODS or loaded.family == "transformers":
        model.push_to_hub(repo_id, private=args.hub_private)
    else:
        from huggingface_hub import HfApi

        api = HfApi()
        repo_id = api.create_repo(repo_id, exist_ok=True, private=args.hub_private).repo_id
        api.upload_folder(repo_id=repo_id, folder_path=str(output_dir), ignore_patterns=["checkpoints/*"])
    return repo_id


def main(argv=None) -> dict:
    return run_recipe(build_parser(), run, argv)

if __name__ == "__main__":
    main()
    exit_script()
