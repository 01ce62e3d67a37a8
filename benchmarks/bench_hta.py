"""Training-step time and peak memory of HTA against LoRA, HRA, full fine-tuning and the "floor", on a timm ViT.

One run, one table. Every configuration trains the same timm model (random weights) on the same random batch with
AdamW; adapters target ``attn.qkv, attn.proj, mlp.fc1, mlp.fc2`` in every block and train the head too
(``modules_to_save=["head"]``):

    head_only     only the classification head is trainable (no backward pass through the blocks)
    floor         the head and the patch-embedding bias: backward runs through every block, no adapter can be faster
    lora_r1/r8    PEFT LoraConfig(r=1 / 8, lora_alpha=r)
    hra_r8        PEFT HRAConfig(r=8)
    hta           HouseholderConfig(lora_rank=1): the folded forward path; timm's fused ``attn.qkv`` in one
                  Householder-SVD block per projection (q, k, v), the default since block layouts exist
    hta_fused     the same with ``output_blocks=1``: ``attn.qkv`` as one block (the layout before blocks)
    hta_square    ``rectangular="square_blocks"``: the FFN's fc1 / fc2 as 4 square blocks each (own d, vectors)
    hta_dropout   HouseholderConfig(lora_rank=1, dropout=0.1): the activation-space path
    full          every parameter trainable
    bare_infer / hta_merged_infer / hta_unmerged_infer
                  eval-mode forward under ``torch.no_grad()``: the bare model, HTA after ``merge_and_unload()``
                  and HTA left unmerged (the folded path rebuilds ``W + delta_W`` per call)

What is measured:

* **time**: wall time of one step (``zero_grad`` + forward + cross-entropy + backward + ``AdamW.step``; inference
  rows: one forward) after warm-up steps. The machine is shared and noisy, so configurations are interleaved:
  ``--rounds`` rounds, each running every configuration once (``--warmup`` + ``--steps`` steps); the reported
  figure is the median over all timed steps of all rounds. Ratios compare medians of the same run.
* **memory**: every (configuration, round) runs in its own fresh process, forked from a clean server process that
  has imported torch/timm/peft and run nothing. ``peak RSS`` is that process's ``getrusage`` max resident set size;
  ``step mem`` is peak RSS minus the RSS of the built model and optimizer just before the first step, i.e. what
  training itself adds (activations, gradients, optimizer state, temporaries). The maximum over rounds is reported.

Prints a markdown table and writes ``benchmarks/results/bench_hta.{json,png}``.

    python benchmarks/bench_hta.py                  # vit_small_patch16_224, batch 8 at 224, 2 threads, 4 rounds
                                                    # of (1 warm-up + 2 timed steps; inference 6 forwards);
                                                    # OMP_WAIT_POLICY=PASSIVE
    python benchmarks/bench_hta.py --quick          # smoke run: vit_tiny, batch 2, 1 round, 2 steps
    python benchmarks/bench_hta.py --configs floor lora_r8 hta --rounds 5
    python benchmarks/bench_hta.py --steady-allocator   # glibc keeps freed memory: no page faults after warm-up;
                                                      # writes benchmarks/results/bench_hta_steady_allocator.*

``--steady-allocator`` is a diagnostic, not the headline. With glibc's default heuristics a process gives freed
memory back to the kernel and faults it in again; how often depends on the order of its allocations, so the same
configuration can take from 0 to 100k+ page faults per step (measured: HTA alternates between those in one
process). Each worker then calls ``mallopt(M_MMAP_THRESHOLD, 32 MiB)`` and ``mallopt(M_TRIM_THRESHOLD, 1 GiB)``,
which every configuration gets alike, so the table shows the cost of the computation alone.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

from bench_common import pyplot, write_results

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_MODULES = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]
TRAIN_CONFIGS = ["head_only", "floor", "lora_r1", "lora_r8", "hra_r8", "hta", "hta_fused", "hta_square", "hta_dropout", "full"]
INFER_CONFIGS = ["bare_infer", "hta_merged_infer", "hta_unmerged_infer"]
CONFIGS = TRAIN_CONFIGS + INFER_CONFIGS
LABELS = {
    "head_only": "head only",
    "floor": "floor (head + patch bias)",
    "lora_r1": "LoRA r=1",
    "lora_r8": "LoRA r=8",
    "hra_r8": "HRA r=8",
    "hta": "HTA (lora_rank=1), qkv per projection",
    "hta_fused": "HTA, qkv one block",
    "hta_square": "HTA, FFN square blocks",
    "hta_dropout": "HTA, dropout 0.1",
    "full": "full fine-tuning",
    "bare_infer": "bare model, inference",
    "hta_merged_infer": "HTA merged, inference",
    "hta_unmerged_infer": "HTA unmerged, inference",
}
# Targets, as (numerator, denominator, metric, bound). Step time: at most 1.05x LoRA r=1 and 0.90x LoRA r=8 (the
# earlier 1.10x the floor needs a fused kernel that reads each activation once for all the adapter's products; the
# ratio to the floor stays in the table).
TARGETS = [
    ("hta", "lora_r1", "ms_per_step", 1.05),
    ("hta", "lora_r8", "ms_per_step", 0.90),
    ("hta", "hra_r8", "ms_per_step", 0.35),
    ("hta", "lora_r8", "peak_rss_mib", 1.00),
    ("hta", "lora_r8", "step_mem_mib", 0.80),
    ("hta_merged_infer", "bare_infer", "ms_per_step", 1.02),
]


# ---------------------------------------------------------------------------------------------------- worker side
def _rss_mib() -> float:
    """Current resident set size of this process (MiB), from /proc/self/statm."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def build(config: str, model_name: str, img_size: int, num_classes: int, depth: int | None = None):
    """The model of ``config`` (train or eval mode set) and its trainable parameters."""
    import timm
    import torch
    from peft import HRAConfig, LoraConfig, get_peft_model

    import hh_peft

    torch.manual_seed(0)
    sizes = {} if depth is None else {"depth": depth}
    model = timm.create_model(model_name, pretrained=False, img_size=img_size, num_classes=num_classes, **sizes)
    adapter = None
    if config in ("lora_r1", "lora_r8"):
        r = int(config[-1])
        adapter = LoraConfig(r=r, lora_alpha=r, target_modules=TARGET_MODULES, modules_to_save=["head"])
    elif config == "hra_r8":
        adapter = HRAConfig(r=8, target_modules=TARGET_MODULES, modules_to_save=["head"])
    elif config in ("hta", "hta_dropout", "hta_fused", "hta_square"):
        layout = {"hta_fused": dict(output_blocks=1), "hta_square": dict(rectangular="square_blocks")}.get(config, {})
        adapter = hh_peft.HouseholderConfig(
            lora_rank=1, dropout=0.1 if config == "hta_dropout" else 0.0, target_modules=TARGET_MODULES,
            modules_to_save=["head"], **layout,
        )
    elif config in ("hta_merged_infer", "hta_unmerged_infer"):
        # init_weights=False: a non-trivial adapter, so merging really changes the weights.
        adapter = hh_peft.HouseholderConfig(
            lora_rank=1, init_weights=False, target_modules=TARGET_MODULES, modules_to_save=["head"]
        )
    if adapter is not None:
        model = get_peft_model(model, adapter)
        if config == "hta_merged_infer":
            model = model.merge_and_unload()
    elif config == "head_only":
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("head."))
    elif config == "floor":
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("head.") or name == "patch_embed.proj.bias")
    elif config == "full":
        model.requires_grad_(True)
    elif config != "bare_infer":
        raise ValueError(f"unknown configuration {config!r}; valid: {CONFIGS}")
    if config in INFER_CONFIGS:
        model.eval().requires_grad_(False)
    else:
        model.train()
    return model, [p for p in model.parameters() if p.requires_grad]


def hold_freed_memory() -> None:
    """glibc: serve every allocation below 32 MiB (the largest threshold glibc accepts) from the heap and never trim
    the heap, so memory freed by one step is reused by the next without page faults."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    if libc.mallopt(m_mmap_threshold, 32 << 20) != 1 or libc.mallopt(m_trim_threshold, 1 << 30) != 1:
        raise RuntimeError("mallopt refused M_MMAP_THRESHOLD=32 MiB / M_TRIM_THRESHOLD=1 GiB")


def run_config(config: str, opts: dict) -> dict:
    """Build ``config`` in this (fresh) process, run warm-up and timed steps; return times and memory."""
    import torch
    import torch.nn.functional as F

    if opts["steady_allocator"]:
        hold_freed_memory()

    torch.set_num_threads(opts["threads"])
    model, params = build(config, opts["model"], opts["img_size"], opts["num_classes"], opts["depth"])
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(opts["batch"], 3, opts["img_size"], opts["img_size"], generator=gen)
    y = torch.randint(0, opts["num_classes"], (opts["batch"],), generator=gen)
    if config in INFER_CONFIGS:
        def step():
            with torch.no_grad():
                model(x)
    else:
        optimizer = torch.optim.AdamW(params, lr=1e-4)

        def step():
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            optimizer.step()

    rss_before = _rss_mib()
    for _ in range(opts["warmup"]):
        step()
    times = []
    for _ in range(opts["infer_steps"] if config in INFER_CONFIGS else opts["steps"]):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = _max_rss_mib()
    return {
        "seconds": times,
        "peak_rss_mib": peak,
        "step_mem_mib": max(peak - rss_before, 0.0),
        "trainable_params": sum(p.numel() for p in params),
        "torch": torch.__version__,
    }


def _worker(config: str, opts: dict, queue) -> None:
    try:
        queue.put(("ok", run_config(config, opts)))
    except BaseException as error:  # report, never hang the parent
        import traceback

        queue.put(("error", f"{type(error).__name__}: {error}\n{traceback.format_exc()}"))


def run_isolated(ctx, config: str, opts: dict) -> dict:
    """``run_config`` in a fresh process forked from the clean forkserver; raises if the worker failed."""
    queue = ctx.Queue()
    process = ctx.Process(target=_worker, args=(config, opts, queue))
    process.start()
    status, payload = queue.get()
    process.join()
    if status != "ok":
        raise RuntimeError(f"configuration {config!r} failed in its worker process:\n{payload}")
    return payload


# ---------------------------------------------------------------------------------------------------- parent side
def summarise(raw: dict[str, list[dict]]) -> dict[str, dict]:
    summary = {}
    for config, rounds in raw.items():
        times = [t for r in rounds for t in r["seconds"]]
        summary[config] = {
            "ms_per_step": 1e3 * statistics.median(times),
            "ms_min": 1e3 * min(times),
            "ms_per_round": [1e3 * statistics.median(r["seconds"]) for r in rounds],
            "timed_steps": len(times),
            "peak_rss_mib": max(r["peak_rss_mib"] for r in rounds),
            "step_mem_mib": max(r["step_mem_mib"] for r in rounds),
            "trainable_params": rounds[0]["trainable_params"],
        }
    return summary


def ratio(summary: dict, a: str, b: str, metric: str = "ms_per_step") -> float:
    if a not in summary or b not in summary:
        return float("nan")
    return summary[a][metric] / summary[b][metric]


def make_table(summary: dict) -> str:
    lines = [
        "| configuration | trainable params | ms/step | vs LoRA r=1 | vs LoRA r=8 | vs floor | peak RSS (MiB) | step mem (MiB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for config in TRAIN_CONFIGS:
        if config not in summary:
            continue
        s = summary[config]
        lines.append(
            f"| {LABELS[config]} | {s['trainable_params']:,} | {s['ms_per_step']:.0f} | "
            f"{ratio(summary, config, 'lora_r1'):.2f}x | {ratio(summary, config, 'lora_r8'):.2f}x | {ratio(summary, config, 'floor'):.2f}x | "
            f"{s['peak_rss_mib']:.0f} | {s['step_mem_mib']:.0f} |"
        )
    infer = [c for c in INFER_CONFIGS if c in summary]
    if infer:
        lines += ["", "| inference (eval, no grad) | ms/forward | vs bare model | peak RSS (MiB) |", "|---|---:|---:|---:|"]
        for config in infer:
            s = summary[config]
            lines.append(
                f"| {LABELS[config]} | {s['ms_per_step']:.1f} | {ratio(summary, config, 'bare_infer'):.3f}x | "
                f"{s['peak_rss_mib']:.0f} |"
            )
    return "\n".join(lines)


def check_targets(summary: dict) -> list[dict]:
    checks = []
    for a, b, metric, bound in TARGETS:
        value = ratio(summary, a, b, metric)
        if math.isnan(value):
            continue
        checks.append({"what": f"{a} / {b} ({metric})", "ratio": value, "bound": bound, "met": value <= bound})
    return checks


def plot(summary: dict, title: str):
    """Bar charts of step time, peak memory and inference time (a matplotlib figure)."""
    plt = pyplot()
    train = [c for c in TRAIN_CONFIGS if c in summary]
    infer = [c for c in INFER_CONFIGS if c in summary]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8), gridspec_kw={"width_ratios": [3, 3, 1.6]})
    colors = ["tab:red" if c.startswith("hta") else "tab:gray" if c in ("floor", "head_only") else "tab:blue"
              for c in train]
    labels = [LABELS[c] for c in train]
    for ax, metric, ylabel in (
        (axes[0], "ms_per_step", "ms per training step (median)"),
        (axes[1], "peak_rss_mib", "peak RSS (MiB)"),
    ):
        values = [summary[c][metric] for c in train]
        bars = ax.bar(range(len(train)), values, color=colors)
        ax.set_xticks(range(len(train)), labels, rotation=35, ha="right", fontsize=8)
        ax.set_ylabel(ylabel)
        if metric == "ms_per_step" and "lora_r8" in summary:
            for bar, c in zip(bars, train):
                ax.annotate(f"{ratio(summary, c, 'lora_r8'):.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=7)
            ax.set_title("training step (labels: ratio to LoRA r=8)", fontsize=9)
        if metric == "peak_rss_mib":
            ax.set_ylim(min(values) * 0.9, max(values) * 1.03)
            ax.set_title("peak resident memory, fresh process per configuration", fontsize=9)
    if infer:
        values = [summary[c]["ms_per_step"] for c in infer]
        axes[2].bar(range(len(infer)), values, color=["tab:gray"] + ["tab:red"] * (len(infer) - 1))
        axes[2].set_xticks(range(len(infer)), [LABELS[c].replace(", inference", "") for c in infer], rotation=35,
                           ha="right", fontsize=8)
        axes[2].set_ylabel("ms per eval forward")
        axes[2].set_title("inference", fontsize=9)
    else:
        axes[2].axis("off")
    fig.suptitle(title, fontsize=10)
    return fig


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: vit_tiny_patch16_224, batch 2, 1 round, 1 warm-up + 2 timed steps")
    parser.add_argument("--model", default=None, help="timm model name (default vit_small_patch16_224)")
    parser.add_argument("--img-size", type=int, default=None, help="input resolution (default 224)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default 8)")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--depth", type=int, default=None, help="override the number of blocks (smoke tests)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in every worker")
    parser.add_argument("--rounds", type=int, default=None, help="round-robin rounds over all configurations (default 4)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per round (default 1)")
    parser.add_argument("--steps", type=int, default=None, help="timed training steps per round (default 2)")
    parser.add_argument("--infer-steps", type=int, default=None,
                        help="timed forwards per round of the inference rows (default 3x --steps: they are short)")
    parser.add_argument("--configs", nargs="+", default=CONFIGS, choices=CONFIGS, metavar="CONFIG",
                        help=f"subset to run (default all): {' '.join(CONFIGS)}")
    parser.add_argument("--steady-allocator", action="store_true",
                        help="glibc keeps freed memory in every worker (no page faults after warm-up); a diagnostic")
    parser.add_argument("--out", default=None,
                        help="output path without suffix (default benchmarks/results/bench_hta, or "
                             "bench_hta_steady_allocator with --steady-allocator)")
    args = parser.parse_args(argv)
    defaults = (
        dict(model="vit_tiny_patch16_224", img_size=224, batch=2, rounds=1, warmup=1, steps=2) if args.quick
        else dict(model="vit_small_patch16_224", img_size=224, batch=8, rounds=4, warmup=1, steps=2)
    )
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.infer_steps is None:
        args.infer_steps = 3 * args.steps
    for key in ("img_size", "batch", "rounds", "steps", "infer_steps", "threads", "num_classes"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.steady_allocator and platform.libc_ver()[0] != "glibc":
        parser.error(f"--steady-allocator needs glibc's mallopt; this Python runs on {platform.libc_ver()[0] or 'another libc'}")
    if args.depth is not None and args.depth < 1:
        parser.error(f"--depth must be >= 1, got {args.depth}")
    opts = dict(model=args.model, img_size=args.img_size, batch=args.batch, num_classes=args.num_classes, depth=args.depth,
                threads=args.threads, warmup=args.warmup, steps=args.steps,
                infer_steps=args.infer_steps, steady_allocator=args.steady_allocator)

    from tqdm import tqdm

    # Idle OpenMP threads sleep instead of spinning: on a shared, oversubscribed machine spinning workers wait on
    # descheduled peers and a 2-thread step ran ~2x slower than with PASSIVE here. Inherited by the forkserver.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "timm", "peft", "hh_peft", "torch.nn.functional"])
    load_before = os.getloadavg()
    raw: dict[str, list[dict]] = {c: [] for c in args.configs}
    started = time.perf_counter()
    with tqdm(total=args.rounds * len(args.configs), desc="bench_hta", file=sys.stderr) as bar:
        for round_index in range(args.rounds):
            for config in args.configs:
                bar.set_postfix_str(f"round {round_index + 1} {config}")
                result = run_isolated(ctx, config, opts)
                raw[config].append(result)
                bar.update()
                tqdm.write(f"round {round_index + 1} {config:20s} {1e3 * statistics.median(result['seconds']):9.1f} ms"
                           f"  peak RSS {result['peak_rss_mib']:7.0f} MiB", file=sys.stderr)
    elapsed = time.perf_counter() - started

    summary = summarise(raw)
    table = make_table(summary)
    checks = check_targets(summary)
    setting = (f"timm {args.model}{'' if args.depth is None else f' (depth {args.depth})'} (random weights), batch {args.batch} at {args.img_size}, {args.threads} threads, "
               f"AdamW; {args.rounds} interleaved rounds x ({args.warmup} warm-up + {args.steps} timed steps; inference "
               f"{args.infer_steps} forwards), median{'; glibc holding freed memory (--steady-allocator)' if args.steady_allocator else ''}")
    print(f"\n{setting}\n")
    print(table)
    if "hta" in summary and "hta_dropout" in summary:
        print(f"\nHTA with dropout 0.1 (activation-space path): {ratio(summary, 'hta_dropout', 'hta'):.2f}x the folded path")
    if checks:
        print("\ntargets:")
        for check in checks:
            print(f"  {'met   ' if check['met'] else 'MISSED'} {check['what']}: {check['ratio']:.3f} (<= {check['bound']})")

    out = Path(args.out or RESULTS / ("bench_hta_steady_allocator" if args.steady_allocator else "bench_hta"))
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "setting": setting,
        "model": args.model, "depth": args.depth, "img_size": args.img_size, "batch": args.batch, "num_classes": args.num_classes,
        "threads": args.threads, "omp_wait_policy": os.environ["OMP_WAIT_POLICY"], "rounds": args.rounds, "warmup": args.warmup, "steps": args.steps, "infer_steps": args.infer_steps,
        "steady_allocator": args.steady_allocator,
        "target_modules": TARGET_MODULES,
        "torch": next(iter(raw.values()))[0]["torch"], "python": platform.python_version(),
        "machine": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "wall_seconds": elapsed,
        "memory_measure": "getrusage max RSS of a fresh process per (configuration, round), forked from a clean "
                          "forkserver; step_mem = peak RSS - RSS before the first step; max over rounds",
        "configs": summary,
        "ratios": {
            c: {
                "vs_lora_r1": ratio(summary, c, "lora_r1"),
                "vs_lora_r8": ratio(summary, c, "lora_r8"),
                "vs_floor": ratio(summary, c, "floor"),
                "vs_hra_r8": ratio(summary, c, "hra_r8"),
                "peak_rss_vs_lora_r8": ratio(summary, c, "lora_r8", "peak_rss_mib"),
            } for c in TRAIN_CONFIGS if c in summary
        } | {c: {"vs_bare": ratio(summary, c, "bare_infer")} for c in INFER_CONFIGS if c in summary},
        "hta_dropout_vs_hta": ratio(summary, "hta_dropout", "hta"),
        "targets": checks,
        "table_markdown": table,
    }
    write_results(out, payload, plot(summary, setting))
    return payload


if __name__ == "__main__":
    main()
