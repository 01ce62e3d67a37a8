"""When does folding ``W + delta_W`` pay? HTA's two forward paths on one adapted ``nn.Linear``, by number of rows.

The folded path (the default without dropout) builds ``W + delta_W`` (a pass over ``out x in``) and runs one
matmul; the activation-space path runs the base matmul and adds ``(x V) U^T + x[:, :m] d`` (passes over
``n x (in + out)``). So folding should pay above roughly ``n* = c * in * out / (in + out)`` rows, with ``c`` a
machine constant. This script measures both paths for a few layer shapes and row counts, in inference (eval,
``torch.no_grad``) and training (forward + backward of the input and adapter gradients, base weight frozen), and
prints, per shape and mode, the measured crossover beside ``n*`` for ``c = 1/3`` (inference) and ``c = 2/3``
(training). Those constants are a hypothesis from a first, uncommitted measurement; the layer does not use any
such rule yet (it always folds when it can), and the README quotes what the committed run found.

Rounds alternate the two paths; each figure is the median over rounds of per-round medians. Writes
``benchmarks/results/bench_hta_paths.{json,png}``.

    python benchmarks/bench_hta_paths.py             # 3 shapes x 7 row counts x 2 modes, 2 threads (~3 minutes)
    python benchmarks/bench_hta_paths.py --quick     # smoke run
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from bench_common import pyplot, time_call, write_results

RESULTS = Path(__file__).resolve().parent / "results"
RULE_CONSTANT = {"inference": 1 / 3, "training": 2 / 3}


def predicted_crossover(in_features: int, out_features: int, mode: str) -> float:
    """``n* = c * in * out / (in + out)``: rows above which folding is expected to be the faster path."""
    return RULE_CONSTANT[mode] * in_features * out_features / (in_features + out_features)


def make_calls(in_features: int, out_features: int, rows: int, mode: str):
    """``(folded, activation)``: zero-argument callables running one step of each path on the same adapted layer."""
    import torch
    from peft import get_peft_model
    from torch import nn

    import hh_peft
    from hh_peft.layer import HouseholderLayer

    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(in_features, out_features)),
                           hh_peft.HouseholderConfig(target_modules=["0"], init_weights=False))
    layer = model.base_model.model[0]
    training = mode == "training"
    model.train(training)
    x = torch.randn(rows, in_features, requires_grad=training)

    def run(forward):
        if training:
            forward(x).square().sum().backward()
        else:
            with torch.no_grad():
                forward(x)

    def folded():
        run(layer)  # the layer's own choice: the folded path (no dropout, one dtype)

    def activation():
        run(lambda inputs: HouseholderLayer._adapted_forward(layer, inputs, ["default"]))  # base + activation delta

    with torch.no_grad():  # the two paths compute the same function
        torch.testing.assert_close(layer(x), HouseholderLayer._adapted_forward(layer, x, ["default"]), rtol=1e-4, atol=1e-4)
    return folded, activation


def measure(shapes, row_counts, modes, rounds: int, repeats: int, min_time: float) -> list[dict]:
    rows_out = []
    for in_features, out_features in shapes:
        for mode in modes:
            for rows in row_counts:
                folded, activation = make_calls(in_features, out_features, rows, mode)
                medians = {"folded": [], "activation": []}
                for _ in range(rounds):
                    for name, call in (("folded", folded), ("activation", activation)):
                        medians[name].append(time_call(call, repeats, min_time)[0])
                folded_ms = 1e3 * statistics.median(medians["folded"])
                activation_ms = 1e3 * statistics.median(medians["activation"])
                rows_out.append({
                    "in": in_features, "out": out_features, "rows": rows, "mode": mode,
                    "folded_ms": folded_ms, "activation_ms": activation_ms, "activation_over_folded": activation_ms / folded_ms,
                })
                print(f"{in_features:5d} x {out_features:5d}  n={rows:5d}  {mode:9s}  folded {folded_ms:8.3f} ms  "
                      f"activation {activation_ms:8.3f} ms  ratio {activation_ms / folded_ms:5.2f}", flush=True)
    return rows_out


def crossovers(results: list[dict]) -> list[dict]:
    """Per (shape, mode): the smallest measured row count from which folding is never slower, beside ``n*``."""
    out = []
    keys = sorted({(r["in"], r["out"], r["mode"]) for r in results})
    for in_features, out_features, mode in keys:
        series = sorted((r for r in results if (r["in"], r["out"], r["mode"]) == (in_features, out_features, mode)),
                        key=lambda r: r["rows"])
        measured = None
        for i, r in enumerate(series):
            if all(s["activation_over_folded"] >= 1.0 for s in series[i:]):
                measured = r["rows"]
                break
        out.append({"in": in_features, "out": out_features, "mode": mode, "measured_crossover_rows": measured,
                    "predicted_crossover_rows": predicted_crossover(in_features, out_features, mode)})
    return out


def make_table(results: list[dict], cross: list[dict]) -> str:
    lines = ["| layer (in x out) | mode | " + " | ".join(f"n={n}" for n in sorted({r['rows'] for r in results}))
             + " | folding pays from (measured) | n* (rule) |"]
    lines.append("|---|---|" + "---:|" * (len({r["rows"] for r in results}) + 2))
    for c in cross:
        series = sorted((r for r in results if (r["in"], r["out"], r["mode"]) == (c["in"], c["out"], c["mode"])),
                        key=lambda r: r["rows"])
        cells = " | ".join(f"{r['activation_over_folded']:.2f}" for r in series)
        measured = "never" if c["measured_crossover_rows"] is None else str(c["measured_crossover_rows"])
        lines.append(f"| {c['in']} x {c['out']} | {c['mode']} | {cells} | {measured} | {c['predicted_crossover_rows']:.0f} |")
    return "\n".join(lines)


def plot(results: list[dict], cross: list[dict], setting: str):
    plt = pyplot()
    modes = sorted({r["mode"] for r in results})
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.2), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        for c in (c for c in cross if c["mode"] == mode):
            series = sorted((r for r in results if (r["in"], r["out"], r["mode"]) == (c["in"], c["out"], mode)),
                            key=lambda r: r["rows"])
            line, = ax.plot([r["rows"] for r in series], [r["activation_over_folded"] for r in series], marker="o",
                            label=f"{c['in']} x {c['out']}")
            ax.axvline(c["predicted_crossover_rows"], color=line.get_color(), linestyle=":", linewidth=1)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("rows n (tokens x batch)")
        ax.set_ylabel("activation path / folded path (time)")
        ax.set_title(f"{mode}: above 1, folding pays; dotted: n* of the rule")
        ax.legend()
    fig.suptitle(setting, fontsize=8)
    return fig


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: one small shape, three row counts")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds per case (default 5)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per round at least (default 5)")
    parser.add_argument("--min-time", type=float, default=0.2, help="seconds per round at least (default 0.2)")
    parser.add_argument("--out", default=str(RESULTS / "bench_hta_paths"), help="output path without suffix")
    args = parser.parse_args(argv)
    for key in ("threads", "rounds", "repeats"):
        if getattr(args, key) < 1:
            parser.error(f"--{key} must be >= 1, got {getattr(args, key)}")

    import torch

    torch.set_num_threads(args.threads)
    if args.quick:
        shapes, row_counts, rounds, repeats, min_time = [(24, 40)], [1, 8, 64], 1, 1, 0.0
    else:
        shapes, row_counts = [(768, 768), (384, 1536), (1024, 4096)], [1, 16, 64, 128, 256, 512, 1024]
        rounds, repeats, min_time = args.rounds, args.repeats, args.min_time
    results = measure(shapes, row_counts, ["inference", "training"], rounds, repeats, min_time)
    cross = crossovers(results)
    setting = (f"one adapted nn.Linear, HTA lora_rank=1, float32, {args.threads} threads, torch {torch.__version__}; "
               f"{rounds} alternating rounds, median of per-round medians")
    table = make_table(results, cross)
    print(f"\n{setting}\nactivation-path time / folded-path time (above 1: folding is faster)\n\n{table}")
    payload = {"setting": setting, "threads": args.threads, "rule_constant": RULE_CONSTANT, "results": results,
               "crossovers": cross, "table_markdown": table}
    write_results(Path(args.out), payload, plot(results, cross, setting))
    return payload


if __name__ == "__main__":
    main()
