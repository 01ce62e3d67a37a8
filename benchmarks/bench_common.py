"""Shared pieces of the benchmark scripts: timing a call, fitting a log-log slope, writing results.

The scripts run as ``python benchmarks/<script>.py``, so this directory is on ``sys.path`` and they import this
module as ``bench_common``.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path
from typing import Any, Callable


def time_call(fn: Callable[[], Any], repeats: int, min_time: float, max_runs: int = 1000) -> tuple[float, float, int]:
    """Wall time (s) of ``fn()`` over at least ``repeats`` runs (more while their total is under ``min_time``, at
    most ``max_runs``), after one untimed warm-up call. Returns (median, minimum, number of timed runs)."""
    fn()
    times: list[float] = []
    while len(times) < repeats or sum(times) < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= max_runs:
            break
    return statistics.median(times), min(times), len(times)


def fit_exponent(sizes: list[int], times: list[float]) -> float:
    """Least-squares slope ``p`` of ``log(time) = p log(N) + c``: the empirical exponent of ``time ~ N^p``."""
    xs, ys = [math.log(n) for n in sizes], [math.log(t) for t in times]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def pyplot():
    """matplotlib's pyplot on the non-interactive Agg backend (benchmarks run headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_results(out: Path, payload: dict, fig=None, indent: int | None = 2) -> tuple[Path, Path | None]:
    """Write ``out.json`` (``payload``) and, when ``fig`` is given, ``out.png`` (then closes the figure).

    ``out`` is a path without suffix; its folder is created. Returns the paths written."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    json_path = out.with_suffix(".json")
    json_path.write_text(json.dumps(payload, indent=indent, allow_nan=True) + "\n")
    png_path = None
    if fig is not None:
        png_path = out.with_suffix(".png")
        fig.tight_layout()
        fig.savefig(png_path, dpi=120)
        pyplot().close(fig)
    print(f"wrote {json_path}" + (f" and {png_path}" if png_path else ""))
    return json_path, png_path
