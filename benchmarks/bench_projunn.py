"""Optimizer-step time against N: Cayley (O(N^3)) vs projUNN-D / projUNN-T at rank k (O(k N^2)), complex64.

One step = everything an optimizer does with a given gradient G: for projUNN the rank-k approximation of G
(``sampling``, LSI by default) and the manifold update written in place (``out=W``; ``--projunn-out-of-place`` to
allocate a new matrix instead); for Cayley ``unitary_rnn.training.optim.cayley_step`` (its O(N^3) solve dominates). All methods are timed in the same run,
interleaved per N, so the ratios are meaningful on a noisy shared machine. Prints a table (ms per step, speed-up
against Cayley, fitted log-log exponents) and writes ``benchmarks/results/bench_projunn.{json,png}``.

    python benchmarks/bench_projunn.py                       # N = 256 ... 4096, k = 1 and 4, 1 thread
    python benchmarks/bench_projunn.py --sizes 256 512 --threads 2
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch
from bench_common import fit_exponent, pyplot, time_call, write_results
from tqdm import tqdm

from unitary_rnn.training.optim import cayley_step
from unitary_rnn.parametrizations import random_unitary
from unitary_rnn.training.projunn import projunn_direct_step, projunn_tangent_step

RESULTS = Path(__file__).resolve().parent / "results"


def make_table(results: dict, methods: list[str], sizes: list[int], key: str, exponents: dict) -> str:
    """Markdown table: ms per step per method, speed-up of each projUNN variant over Cayley, fitted exponents."""
    header = "| N | " + " | ".join(methods) + " | " + " | ".join(f"Cayley / {m}" for m in methods[1:]) + " |"
    lines = [header, "|" + "---|" * (2 * len(methods))]
    for n in sizes:
        row = [f"{1e3 * results[m][n][key]:.2f}" if n in results[m] else "-" for m in methods]
        cay = results["cayley"].get(n)
        ratios = [f"{cay[key] / results[m][n][key]:.1f}x" if cay else "-" for m in methods[1:]]
        lines.append(f"| {n} | " + " | ".join(row) + " | " + " | ".join(ratios) + " |")
    lines.append("| fitted exponent | " + " | ".join(f"{exponents.get(m, float('nan')):.2f}" for m in methods)
                 + " |" + " |" * (len(methods) - 1))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--sampling", default="lsi", choices=["lsi", "column"])
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (the machine is shared)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per point (at least)")
    parser.add_argument("--min-time", type=float, default=0.5, help="keep timing a point until this many seconds")
    parser.add_argument("--cayley-once-above", type=int, default=2048,
                        help="above this N, time Cayley once (no warm-up, one run): it takes tens of seconds")
    parser.add_argument("--cayley-max-n", type=int, default=4096, help="skip Cayley above this N")
    parser.add_argument("--projunn-out-of-place", action="store_true",
                        help="time projUNN returning a new N x N tensor (default: in place via out=W, as an optimizer "
                             "would; a fresh N x N allocation costs page faults that dominate on CPU at large N)")
    parser.add_argument("--out", default=str(RESULTS / "bench_projunn"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = torch.complex64
    gen = torch.Generator().manual_seed(0)

    methods = ["cayley"] + [f"projunn_{v}_k{k}" for k in args.ranks for v in ("t", "d")]
    results: dict[str, dict[int, dict]] = {m: {} for m in methods}
    lr = 1e-3
    for n in tqdm(args.sizes, desc="N"):
        W = random_unitary(n, generator=gen, dtype=dtype).contiguous()  # a parameter is row-major
        G = torch.randn(n, n, dtype=dtype, generator=gen)
        W_work = W.clone()
        for m in methods:
            if m == "cayley":
                if n > args.cayley_max_n:
                    continue
                fn = lambda: cayley_step(W, G, lr)  # noqa: E731
                if n > args.cayley_once_above:
                    t0 = time.perf_counter()
                    fn()
                    t = t_min = time.perf_counter() - t0
                    runs = 1
                else:
                    t, t_min, runs = time_call(fn, args.repeats, args.min_time)
            else:
                variant, k = m.split("_")[1], int(m.split("_k")[1])
                step = projunn_tangent_step if variant == "t" else projunn_direct_step
                if args.projunn_out_of_place:
                    fn = lambda: step(W, G, lr, k, args.sampling, generator=gen)  # noqa: E731
                else:  # in place, like an optimizer writing into its parameter: W_work <- step(W_work)
                    fn = lambda: step(W_work, G, lr, k, args.sampling, generator=gen, out=W_work)  # noqa: E731
                t, t_min, runs = time_call(fn, args.repeats, args.min_time)
            results[m][n] = {"seconds": t, "min_seconds": t_min, "runs": runs}
            tqdm.write(f"N={n:5d} {m:14s} median {1e3 * t:10.2f} ms, min {1e3 * t_min:10.2f} ms ({runs} runs)")

    # ---- tables ----------------------------------------------------------------------------------------------------
    tables, exponents_by = {}, {}
    for key, label in (("seconds", "median"), ("min_seconds", "minimum")):
        exponents_by[label] = exponents = {
            m: fit_exponent(list(r), [v[key] for v in r.values()]) for m, r in results.items() if len(r) >= 2
        }
        tables[label] = make_table(results, methods, args.sizes, key, exponents)
        print(f"\nms per optimizer step ({label} over runs), complex64, {args.threads} thread(s), "
              f"sampling={args.sampling}\n")
        print(tables[label])
    exponents, table = exponents_by["median"], tables["median"]

    out = Path(args.out)
    payload = {
        "dtype": "complex64", "threads": args.threads, "sampling": args.sampling, "lr": lr,
        "projunn_in_place": not args.projunn_out_of_place,
        "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
        "cayley_timed_once_above": args.cayley_once_above,
        "ms_per_step": {m: {str(n): 1e3 * v["seconds"] for n, v in r.items()} for m, r in results.items()},
        "ms_per_step_min": {m: {str(n): 1e3 * v["min_seconds"] for n, v in r.items()} for m, r in results.items()},
        "runs": {m: {str(n): v["runs"] for n, v in r.items()} for m, r in results.items()},
        "fitted_exponent": exponents,
        "fitted_exponent_min": exponents_by["minimum"],
        "speedup_vs_cayley": {
            m: {str(n): results["cayley"][n]["seconds"] / v["seconds"] for n, v in r.items() if n in results["cayley"]}
            for m, r in results.items() if m != "cayley"
        },
        "table_markdown": table,
        "table_markdown_min": tables["minimum"],
    }
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for m, r in results.items():
        ns = sorted(r)
        ax.loglog(ns, [1e3 * r[n]["seconds"] for n in ns], "o-", label=f"{m} (slope {exponents.get(m, float('nan')):.2f})")
    ax.set_xlabel("N")
    ax.set_ylabel("ms per optimizer step")
    ax.set_title(f"Unitary optimizer step, complex64, {args.threads} CPU thread(s)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    write_results(out, payload, fig)

if __name__ == "__main__":
    main()
