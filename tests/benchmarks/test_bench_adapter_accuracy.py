"""The learning-rate protocol of ``benchmarks/bench_adapter_accuracy.py``: the choice on validation and the grid's
upward extension, on hand-written run records (the script's end-to-end runs are in ``test_bench_scripts_smoke.py``)."""

import importlib.util
import math
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_adapter_accuracy.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_adapter_accuracy", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def runs(method: str, val: dict[float, list[float]], test: float | None = None) -> list[dict]:
    """Run records of ``method``: ``val[lr][seed]`` is the validation accuracy of that seed."""
    return [
        {"method": method, "lr": lr, "seed": seed, "val_accuracy": acc, "test_accuracy": test, "diverged": acc is None,
         "trainable_params": 10, "ms_per_step": 1.0, "peak_rss_mib": 1.0}
        for lr, accs in val.items() for seed, acc in enumerate(accs)
    ]


def test_next_lr_walks_the_half_decade_scale(bench):
    values = [1e-4]
    for _ in range(6):
        values.append(bench.next_lr(values[-1]))
    assert all(math.isclose(a, b) for a, b in zip(values, [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1]))


def test_the_grid_grows_upward_only_while_its_best_value_is_the_top(bench):
    base = [1e-3, 3e-3, 1e-2]
    seeds = [0, 1]
    inside = runs("m", {1e-3: [0.5, 0.5], 3e-3: [0.9, 0.8], 1e-2: [0.6, 0.7]})
    assert bench.lr_grid(base, inside, seeds, extend_up=2) == base
    at_top = runs("m", {1e-3: [0.5, 0.5], 3e-3: [0.6, 0.6], 1e-2: [0.8, 0.7]})
    assert bench.lr_grid(base, at_top, seeds, extend_up=0) == base
    grown = bench.lr_grid(base, at_top, seeds, extend_up=2)
    assert grown[:3] == base and math.isclose(grown[3], 3e-2) and len(grown) == 4  # 3e-2 not run yet: no further
    # 3e-2 run on one seed only: still undecided, the grid waits for the other seed
    partial = at_top + runs("m", {3e-2: [0.9]})
    assert len(bench.lr_grid(base, partial, seeds, extend_up=2)) == 4
    # 3e-2 best on both seeds: one more value, then the cap
    best_again = at_top + runs("m", {3e-2: [0.9, 0.9]})
    assert math.isclose(bench.lr_grid(base, best_again, seeds, extend_up=2)[-1], 1e-1)
    assert len(bench.lr_grid(base, best_again + runs("m", {1e-1: [0.95, 0.95]}), seeds, extend_up=2)) == 5
    # a diverged run counts as 0 in the mean, so a larger lr that diverges once ends the extension
    diverged = at_top + runs("m", {3e-2: [0.95, None]})
    assert len(bench.lr_grid(base, diverged, seeds, extend_up=2)) == 4


def test_the_summary_reads_only_the_grid_and_test_only_at_the_chosen_lr(bench):
    seeds = [0, 1]
    records = runs("hta_r1", {1e-3: [0.5, 0.5], 3e-3: [0.6, 0.6], 1e-2: [0.8, 0.7]})
    records += runs("hta_r1", {3e-2: [0.9, 0.85]}, test=0.8)
    records += runs("hta_r1", {1e-1: [0.99, 0.99]}, test=0.99)  # outside the grid as extended (extend_up=1)
    [row] = bench.summarise(records, ["hta_r1"], seeds, {"hta_r1": [1e-3, 3e-3, 1e-2]}, extend_up=1)
    assert math.isclose(row["lr"], 3e-2) and row["lr_at_top_of_grid"]
    assert math.isclose(row["test_mean"], 0.8) and row["runs"] == 8
    [narrow] = bench.summarise(records, ["hta_r1"], seeds, {"hta_r1": [1e-3, 3e-3, 1e-2]}, extend_up=0)
    assert math.isclose(narrow["lr"], 1e-2) and narrow["test_mean"] is None and narrow["runs"] == 6


def test_the_two_tracks_keep_their_trained_tensors_apart(bench, tmp_path):
    """A run's trained tensors are read back for its test accuracy: track A's must never overwrite track B's."""
    import argparse

    track_a = bench._state_path(argparse.Namespace(out=str(tmp_path / "bench_adapter_accuracy_track_a")), "hta_r1", 1e-2, 0)
    track_b = bench._state_path(argparse.Namespace(out=str(tmp_path / "bench_adapter_accuracy")), "hta_r1", 1e-2, 0)
    assert track_a != track_b and track_a.parent.is_dir() and track_b.parent.is_dir()
