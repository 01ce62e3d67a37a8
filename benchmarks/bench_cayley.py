"""Time of one Cayley optimizer step against N (complex64), with its baselines measured in the same run.

Columns (all timed interleaved per N, median of several runs, after a warm-up call):

- ``optimizer``: ``UnitaryOptimizer.step()`` with ``method="cayley"`` on one N x N unitary parameter whose
  gradient is set (re-projection and the drift check off; the re-projection's amortised cost is the last column);
- ``optimizer+rms``: the same with the reference's RMSprop scaling of G (``rmsprop_unitary=True``);
- ``cayley_step``: the bare functional step (``torch.linalg.solve``);
- ``inverse``: the same maths with an explicit ``torch.linalg.inv`` (the formula as printed, what we avoid);
- ``numpy``: the same maths in numpy complex64 with ``numpy.linalg.solve`` (how the published reference
  figures, 694 ms at N = 1024 and 4023 ms at N = 2048, were measured);
- ``reproject/100``: the polar re-projection (one complex SVD) divided by 100 (``reproject_every=100``).

Ratios are against ``numpy`` and ``cayley_step`` from the same run. Writes ``benchmarks/results/bench_cayley.{json,png}``.

    python benchmarks/bench_cayley.py                 # N = 128 ... 2048, 1 thread
    python benchmarks/bench_cayley.py --sizes 128 256 --threads 2
"""

from __future__ import annotations

import argparse
import os

# BLAS threads must be fixed before numpy loads its BLAS; overridden by --threads below for torch only.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import json  # noqa: E402
import platform  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from bench_common import fit_exponent, pyplot, time_call, write_results  # noqa: E402
from tqdm import tqdm  # noqa: E402

from unitary_rnn.manifold import mark_manifold, project_to_unitary  # noqa: E402
from unitary_rnn.training.optim import UnitaryOptimizer, cayley_step  # noqa: E402
from unitary_rnn.parametrizations import random_unitary  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
LR = 1e-3
METHODS = ("optimizer", "optimizer+rms", "cayley_step", "inverse", "numpy", "reproject/100")


def cayley_inverse(W: torch.Tensor, G: torch.Tensor, lr: float) -> torch.Tensor:
    """``(I + lr/2 A)^{-1} (I - lr/2 A) W`` with an explicit inverse (the baseline to beat)."""
    A = G @ W.mH - W @ G.mH
    eye = torch.eye(W.shape[0], dtype=W.dtype)
    return torch.linalg.inv(eye + lr / 2 * A) @ ((eye - lr / 2 * A) @ W)


def cayley_numpy(W: np.ndarray, G: np.ndarray, lr: float) -> np.ndarray:
    """The Cayley step in numpy (complex64): ``solve(I + lr/2 A, (I - lr/2 A) W)``."""
    A = G @ W.conj().T - W @ G.conj().T
    eye = np.eye(W.shape[0], dtype=W.dtype)
    return np.linalg.solve(eye + np.complex64(lr / 2) * A, (eye - np.complex64(lr / 2) * A) @ W)


def bench_size(n: int, repeats: int, min_time: float, skip_slow_above: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(n)
    W0 = random_unitary(n, generator=g, dtype=torch.complex64)
    G = torch.complex(torch.randn(n, n, generator=g), torch.randn(n, n, generator=g))
    out: dict[str, float] = {}

    def optimizer_step(rms: bool):
        p = mark_manifold(torch.nn.Parameter(W0.clone()))
        opt = UnitaryOptimizer([p], unitary_lr=LR, rmsprop_unitary=rms, reproject_every=None, reproject_tol=None)

        def step():
            p.grad = G
            opt.step()

        return step

    reps = 1 if n > skip_slow_above else repeats
    mt = 0.0 if n > skip_slow_above else min_time
    out["optimizer"] = time_call(optimizer_step(False), repeats, min_time, max_runs=200)[0]
    out["optimizer+rms"] = time_call(optimizer_step(True), reps, mt, max_runs=200)[0]
    out["cayley_step"] = time_call(lambda: cayley_step(W0, G, LR), repeats, min_time, max_runs=200)[0]
    out["inverse"] = time_call(lambda: cayley_inverse(W0, G, LR), reps, mt, max_runs=200)[0]
    Wn, Gn = W0.numpy(), G.numpy()
    out["numpy"] = time_call(lambda: cayley_numpy(Wn, Gn, LR), repeats, min_time, max_runs=200)[0]
    out["reproject/100"] = time_call(lambda: project_to_unitary(W0), reps, mt, max_runs=200)[0] / 100
    return out


def plot(results: dict[int, dict[str, float]], threads: int):
    """Log-log time per step against N, and the same-run ratios (a matplotlib figure)."""
    plt = pyplot()
    sizes = sorted(results)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for m in METHODS:
        ax.loglog(sizes, [1e3 * results[n][m] for n in sizes], marker="o", label=m)
    ax.set_ylabel("ms per step")
    ax.set_title(f"Cayley optimizer step, complex64, {threads} thread(s)")
    ax.legend(fontsize=8)
    ax2.semilogx(sizes, [results[n]["optimizer"] / results[n]["numpy"] for n in sizes], marker="o", label="optimizer / numpy")
    ax2.semilogx(sizes, [results[n]["inverse"] / results[n]["cayley_step"] for n in sizes], marker="s", label="inverse / solve")
    ax2.axhline(1.0, color="grey", lw=0.8)
    ax2.set_ylabel("time ratio (same run)")
    ax2.legend(fontsize=8)
    for a in (ax, ax2):
        a.set_xlabel("N")
        a.set_xticks(sizes, [str(n) for n in sizes])
        a.minorticks_off()
        a.grid(True, alpha=0.3)
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512, 1024, 2048])
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (the machine is shared)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per point (at least)")
    parser.add_argument("--min-time", type=float, default=0.5, help="keep timing a point until this many seconds")
    parser.add_argument("--skip-slow-above", type=int, default=1024,
                        help="above this N the secondary columns are timed once")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--replot", action="store_true", help="only redraw the PNG from the existing JSON")
    args = parser.parse_args()
    if args.replot:
        record = json.loads((args.out / "bench_cayley.json").read_text())
        ms = record["ms_per_step"]
        results = {int(n): {m: ms[m][n] / 1e3 for m in METHODS} for n in ms["optimizer"]}
        write_results(args.out / "bench_cayley", record, plot(results, record["threads"]))  # the same JSON back
        return
    torch.set_num_threads(args.threads)

    results: dict[int, dict[str, float]] = {}
    for n in tqdm(args.sizes, desc="N"):
        results[n] = bench_size(n, args.repeats, args.min_time, args.skip_slow_above)

    header = "| N | " + " | ".join(f"{m} (ms)" for m in METHODS) + " | optimizer / numpy | inverse / solve |"
    lines = [header, "|" + "---|" * (len(METHODS) + 3)]
    for n, r in results.items():
        cells = [str(n)] + [f"{1e3 * r[m]:.1f}" for m in METHODS]
        cells += [f"{r['optimizer'] / r['numpy']:.2f}", f"{r['inverse'] / r['cayley_step']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    sizes = list(results)
    exponents = {m: fit_exponent(sizes, [results[n][m] for n in sizes]) for m in METHODS} if len(sizes) > 1 else {}
    if exponents:
        lines.append("")
        lines.append("fitted exponent (time ~ N^p): " + ", ".join(f"{m} {p:.2f}" for m, p in exponents.items()))
    table = "\n".join(lines)
    print(table)

    record = {
        "dtype": "complex64", "lr": LR, "threads": args.threads, "torch": torch.__version__, "numpy": np.__version__,
        "machine": platform.machine(), "processor": platform.processor(),
        "secondary_columns_timed_once_above": args.skip_slow_above,
        "ms_per_step": {m: {str(n): 1e3 * results[n][m] for n in sizes} for m in METHODS},
        "ratio_optimizer_over_numpy": {str(n): results[n]["optimizer"] / results[n]["numpy"] for n in sizes},
        "ratio_inverse_over_solve": {str(n): results[n]["inverse"] / results[n]["cayley_step"] for n in sizes},
        "fitted_exponent": exponents,
        "design_reference_numpy_ms": {"1024": 694, "2048": 4023},
        "table": table,
    }
    write_results(args.out / "bench_cayley", record, plot(results, args.threads))


if __name__ == "__main__":
    main()
