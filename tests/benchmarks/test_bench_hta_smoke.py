"""Smoke test of benchmarks/bench_hta.py: a --quick run with tiny settings writes a complete JSON and a PNG.

No timing assertions: the machine is shared, only the structure and finiteness of the results are checked.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_hta.py"
sys.path.insert(0, str(SCRIPT.parent))
import bench_hta  # noqa: E402


@pytest.mark.slow
def test_quick_run_writes_every_configuration_with_finite_numbers(tmp_path):
    out = tmp_path / "bench_hta"
    subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--img-size", "32", "--depth", "1", "--num-classes", "10", "--threads", "1",
         "--warmup", "0", "--steps", "1", "--infer-steps", "1", "--out", str(out)],
        check=True, timeout=300, capture_output=True, text=True,
    )
    payload = json.loads(out.with_suffix(".json").read_text())
    assert out.with_suffix(".png").stat().st_size > 0
    assert set(payload["configs"]) == set(bench_hta.CONFIGS)
    for config, numbers in payload["configs"].items():
        for key in ("ms_per_step", "peak_rss_mib", "step_mem_mib"):
            assert math.isfinite(numbers[key]) and numbers[key] >= 0, (config, key, numbers[key])
        assert numbers["ms_per_step"] > 0 and numbers["peak_rss_mib"] > 0
        assert numbers["timed_steps"] == 1
    for config, ratios in payload["ratios"].items():
        assert all(math.isfinite(v) and v > 0 for v in ratios.values()), (config, ratios)
    assert {check["what"] for check in payload["targets"]} == {
        f"{a} / {b} ({metric})" for a, b, metric, _ in bench_hta.TARGETS
    }
    # trainable-parameter bookkeeping is exact, not timing: the floor trains the head plus one bias vector,
    # full fine-tuning trains everything, and every adapter trains more than the floor.
    configs = payload["configs"]
    assert configs["floor"]["trainable_params"] == configs["head_only"]["trainable_params"] + 192  # vit_tiny width
    for name in ("lora_r1", "lora_r8", "hra_r8", "hta", "hta_dropout"):
        assert configs["floor"]["trainable_params"] < configs[name]["trainable_params"] < configs["full"]["trainable_params"]
    assert configs["hta"]["trainable_params"] == configs["hta_dropout"]["trainable_params"]


@pytest.mark.slow
def test_steady_allocator_run_records_the_setting(tmp_path):
    """--steady-allocator: glibc's mallopt is accepted in the worker (it raises otherwise) and the JSON says so."""
    out = tmp_path / "steady"
    subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--img-size", "32", "--depth", "1", "--num-classes", "10", "--threads", "1",
         "--warmup", "0", "--steps", "1", "--configs", "floor", "hta", "--steady-allocator", "--out", str(out)],
        check=True, timeout=300, capture_output=True, text=True,
    )
    payload = json.loads(out.with_suffix(".json").read_text())
    assert payload["steady_allocator"] is True
    assert "--steady-allocator" in payload["setting"]
    assert set(payload["configs"]) == {"floor", "hta"}


@pytest.mark.slow
def test_paths_benchmark_quick_run(tmp_path):
    """bench_hta_paths.py --quick: both paths timed (after checking they agree) for every row count and mode."""
    out = tmp_path / "paths"
    subprocess.run([sys.executable, str(SCRIPT.parent / "bench_hta_paths.py"), "--quick", "--threads", "1", "--out", str(out)],
                   check=True, timeout=300, capture_output=True, text=True)
    payload = json.loads(out.with_suffix(".json").read_text())
    assert out.with_suffix(".png").stat().st_size > 0
    assert {(r["mode"], r["rows"]) for r in payload["results"]} == {(m, n) for m in ("inference", "training") for n in (1, 8, 64)}
    assert all(r["folded_ms"] > 0 and r["activation_ms"] > 0 for r in payload["results"])
    assert {c["mode"] for c in payload["crossovers"]} == {"inference", "training"}


def test_unknown_configuration_is_rejected_with_the_valid_names(capsys):
    with pytest.raises(SystemExit):
        bench_hta.main(["--configs", "lora_r3"])
    assert "hta_dropout" in capsys.readouterr().err


def test_bad_sizes_are_rejected():
    with pytest.raises(SystemExit):
        bench_hta.main(["--quick", "--batch", "0"])
    with pytest.raises(ValueError, match="unknown configuration 'lora_r3'.*valid"):
        bench_hta.build("lora_r3", "vit_tiny_patch16_224", 32, 10)
