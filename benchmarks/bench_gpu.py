"""The GPU targets in one run: HTA against LoRA / HRA / full fine-tuning on a ViT, the uRNN recurrence against
cuDNN's LSTM, and Cayley against projUNN steps. Every figure is a ratio against a baseline timed in the same run.

* ``hta``: one training step (forward, backward, AdamW) of timm's ViT (default ``vit_base_patch16_224``, batch 64,
  bf16 autocast) under HTA (``lora_rank=1`` on ``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``), LoRA r=1 and
  r=8 and HRA r=8 on the same targets, and full fine-tuning; median step time and peak memory
  (``torch.cuda.max_memory_allocated``) per method. Targets: HTA <= 1.0x LoRA r=8 in step time and in memory.
* ``urnn``: forward + backward of the copy task (T = 1000, batch 20, the reference sizes: uRNN N = 128, LSTM
  hidden 128) for the full-capacity uRNN against ``nn.LSTM`` (cuDNN on a GPU). Target: <= 3x LSTM.
* ``manifold``: one Cayley step (``torch.linalg.solve``) against one projUNN-T and one projUNN-D step of rank 1 at
  N = 1024, 2048, 4096 (complex64). Target: projUNN >= 50x faster than Cayley at N = 2048.

On a GPU each timing synchronises the device before reading the clock. ``--device cpu --quick`` runs the same code
with tiny sizes (the smoke test of ``tests/benchmarks``). ``benchmarks/gpu_check.sh`` runs this after the
device-parametrised tests. Writes ``benchmarks/results/gpu_<part>.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from bench_common import pyplot, write_results
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"
HTA_TARGETS = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]
PARTS = ("hta", "urnn", "manifold")


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str, warmup: int, repeats: int) -> list[float]:
    """Seconds per call of ``fn``, ``repeats`` times after ``warmup`` untimed calls, the device synchronised."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()


# ----------------------------------------------------------------------------------------------------------------
# HTA against the other methods
# ----------------------------------------------------------------------------------------------------------------
def adapted_vit(method: str, args):
    import timm
    from peft import HRAConfig, LoraConfig, get_peft_model

    import hh_peft

    torch.manual_seed(0)
    kwargs = {"img_size": args.img_size, "depth": args.depth} if args.depth else {"img_size": args.img_size}
    model = timm.create_model(args.model, pretrained=False, num_classes=10, **kwargs)
    if method == "full":
        return model
    configs = {
        "hta": lambda: hh_peft.HouseholderConfig(target_modules=HTA_TARGETS, lora_rank=1, modules_to_save=["head"]),
        "lora_r1": lambda: LoraConfig(r=1, lora_alpha=1, target_modules=HTA_TARGETS, modules_to_save=["head"]),
        "lora_r8": lambda: LoraConfig(r=8, lora_alpha=8, target_modules=HTA_TARGETS, modules_to_save=["head"]),
        "hra_r8": lambda: HRAConfig(r=8, target_modules=HTA_TARGETS, modules_to_save=["head"]),
    }
    return get_peft_model(model, configs[method]())


def bench_hta(args) -> dict:
    device, rows = args.device, []
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    for method in ("lora_r8", "lora_r1", "hta", "hra_r8", "full"):
        model = adapted_vit(method, args).to(device).train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step():
            with torch.autocast(device_type=device, dtype=torch.bfloat16):
                loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        times = timed(step, device, args.warmup, args.repeats)
        peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        rows.append({"method": method, "median_ms": 1e3 * statistics.median(times), "peak_bytes": peak,
                     "trainable_params": trainable})
        del model, optimizer
    reference = next(r for r in rows if r["method"] == "lora_r8")
    for row in rows:
        row["time_vs_lora_r8"] = row["median_ms"] / reference["median_ms"]
        row["memory_vs_lora_r8"] = row["peak_bytes"] / reference["peak_bytes"] if row["peak_bytes"] else None
    hta = next(r for r in rows if r["method"] == "hta")
    targets = {"hta_time_le_1.0x_lora_r8": hta["time_vs_lora_r8"] <= 1.0}
    if hta["memory_vs_lora_r8"] is not None:
        targets["hta_memory_le_1.0x_lora_r8"] = hta["memory_vs_lora_r8"] <= 1.0
    return {"rows": rows, "targets": targets, "model": args.model, "batch": args.batch, "img_size": args.img_size,
            "autocast": "bfloat16"}


# ----------------------------------------------------------------------------------------------------------------
# uRNN recurrence against the LSTM
# ----------------------------------------------------------------------------------------------------------------
def bench_urnn(args) -> dict:
    from unitary_rnn import UnitaryRNNConfig, UnitaryRNNForTokenClassification
    from unitary_rnn.training.tasks import CopyMemoryTask

    device = args.device
    task = CopyMemoryTask(delay=args.copy_delay)
    batch = {k: v.to(device) for k, v in task.generate(args.urnn_batch, seed=0).items()}
    torch.manual_seed(0)
    urnn = UnitaryRNNForTokenClassification(UnitaryRNNConfig(
        vocab_size=task.vocab_size, hidden_size=args.urnn_hidden, num_labels=task.num_labels)).to(device)
    lstm = nn.LSTM(task.vocab_size, args.urnn_hidden, batch_first=True).to(device)
    head = nn.Linear(args.urnn_hidden, task.num_labels).to(device)

    def urnn_step():
        urnn(input_ids=batch["input_ids"], labels=batch["labels"]).loss.backward()

    def lstm_step():
        out, _ = lstm(nn.functional.one_hot(batch["input_ids"], task.vocab_size).float())
        logits = head(out)
        nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1)).backward()

    rows = []
    for name, fn in (("nn.LSTM", lstm_step), ("uRNN full", urnn_step)):
        rows.append({"model": name, "median_ms": 1e3 * statistics.median(timed(fn, device, args.warmup, args.repeats))})
    ratio = rows[1]["median_ms"] / rows[0]["median_ms"]
    rows[1]["vs_lstm"], rows[0]["vs_lstm"] = ratio, 1.0
    return {"rows": rows, "targets": {"urnn_le_3x_lstm": ratio <= 3.0}, "delay": args.copy_delay,
            "batch": args.urnn_batch, "hidden": args.urnn_hidden,
            "lstm_backend": "cuDNN" if device == "cuda" and torch.backends.cudnn.is_available() else "native"}


# ----------------------------------------------------------------------------------------------------------------
# Cayley against projUNN
# ----------------------------------------------------------------------------------------------------------------
def bench_manifold(args) -> dict:
    from unitary_rnn.parametrizations import random_unitary
    from unitary_rnn.training.optim import manifold_step

    device, rows = args.device, []
    for n in args.sizes:
        g = torch.Generator().manual_seed(n)
        W = random_unitary(n, generator=g, dtype=torch.complex64).to(device)
        G = torch.randn(n, n, dtype=torch.complex64, generator=g).to(device)
        row = {"N": n}
        for method in ("cayley", "projunn_t", "projunn_d"):
            times = timed(lambda: manifold_step(W, G, 1e-3, method, rank=1), device, args.warmup, args.repeats)
            row[f"{method}_ms"] = 1e3 * statistics.median(times)
        for method in ("projunn_t", "projunn_d"):
            row[f"{method}_speedup"] = row["cayley_ms"] / row[f"{method}_ms"]
        rows.append(row)
    at_2048 = next((r for r in rows if r["N"] == 2048), None)
    targets = {} if at_2048 is None else {"projunn_ge_50x_cayley_at_2048": min(
        at_2048["projunn_t_speedup"], at_2048["projunn_d_speedup"]) >= 50}
    return {"rows": rows, "targets": targets, "dtype": "complex64", "rank": 1}


# ----------------------------------------------------------------------------------------------------------------
def plot(part: str, result: dict):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    rows = result["rows"]
    if part == "hta":
        ax.bar([r["method"] for r in rows], [r["time_vs_lora_r8"] for r in rows])
        ax.set_ylabel("step time / LoRA r=8")
    elif part == "urnn":
        ax.bar([r["model"] for r in rows], [r["vs_lstm"] for r in rows])
        ax.set_ylabel("fwd+bwd time / LSTM")
    else:
        for method in ("cayley", "projunn_t", "projunn_d"):
            ax.loglog([r["N"] for r in rows], [r[f"{method}_ms"] for r in rows], marker="o", label=method)
        ax.set_xlabel("N")
        ax.set_ylabel("ms per step")
        ax.legend()
    ax.set_title(f"{part} on {result['device_name']}")
    return fig


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: the smoke test (any device)")
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--depth", type=int, default=None)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--copy-delay", type=int, default=1000)
    parser.add_argument("--urnn-batch", type=int, default=20)
    parser.add_argument("--urnn-hidden", type=int, default=128)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=RESULTS / "gpu")
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.img_size, args.depth, args.batch = "vit_tiny_patch16_224", 32, 1, 2
        args.copy_delay, args.urnn_batch, args.urnn_hidden, args.sizes = 20, 2, 8, [16, 32]
        args.warmup, args.repeats = 1, 2
    results = {}
    for part in args.parts:
        result = {"hta": bench_hta, "urnn": bench_urnn, "manifold": bench_manifold}[part](args)
        result.update(device=args.device, device_name=device_name(args.device), torch=torch.__version__,
                      quick=args.quick)
        print(f"== {part} on {result['device_name']}")
        for row in result["rows"]:
            print("  " + "  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        print(f"  targets: {result['targets']}")
        write_results(args.out.with_name(f"{args.out.name}_{part}"), result, plot(part, result))
        results[part] = result
    return results


if __name__ == "__main__":
    main()
