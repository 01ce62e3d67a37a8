"""The recipes as two real processes on this machine (gloo): DDP, identical replicas, rank 0 writes alone.

``ACCELERATE_USE_CPU=true torchrun --standalone --nproc_per_node 2`` really starts two processes
here (``accelerate launch --cpu --num_processes 2`` starts one on this machine, as measured). Which process
writes what is observed from outside the recipe: a ``sitecustomize`` module on ``PYTHONPATH``
installs an audit hook (PEP 578) in every process that logs, per rank, each file Python opens for
writing and each directory it creates under the output folder (safetensors writes from Rust and are
not seen, but every save path also writes JSON or creates a folder from Python).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

AUDIT_HOOK = '''
import os, sys
_watch = os.environ.get("WRITE_AUDIT_WATCH")
_log = os.environ.get("WRITE_AUDIT_LOG")
if _watch and _log:
    _rank = os.environ.get("RANK", "0")
    _write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def _hook(event, args):
        if event == "open":
            path, mode, flags = args
            writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                mode is None and isinstance(flags, int) and bool(flags & _write_flags))
        elif event in ("os.mkdir", "os.rename", "os.replace", "os.remove", "shutil.copyfile"):
            # a copy or a rename writes its destination
            path, writes = args[1] if event in ("shutil.copyfile", "os.rename", "os.replace") else args[0], True
        else:
            return
        if not writes or isinstance(path, int):
            return
        path = os.path.abspath(os.fsdecode(path))
        if path.startswith(_watch):
            with open(os.path.join(_log, "rank" + _rank + ".log"), "a") as f:
                f.write(event + " " + path + "\\n")

    sys.addaudithook(_hook)
'''


def torchrun(script: str, args: list[str], tmp_path: Path, out: Path) -> tuple[dict[str, list[str]], str]:
    """Run ``script`` as two processes; returns ({rank: written paths}, combined output)."""
    hook_dir, log_dir = tmp_path / "hook", tmp_path / "audit"
    hook_dir.mkdir()
    log_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(AUDIT_HOOK)
    env = {
        **os.environ,
        "ACCELERATE_USE_CPU": "true",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(hook_dir), str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "WRITE_AUDIT_WATCH": str(out.resolve()),
        "WRITE_AUDIT_LOG": str(log_dir),
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / script), *args]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    writes = {}
    for rank in ("0", "1"):
        log = log_dir / f"rank{rank}.log"
        writes[rank] = log.read_text().splitlines() if log.exists() else []
    return writes, output


@pytest.mark.slow
def test_hta_recipe_with_two_processes(tmp_path):
    # watched: the output folder's parent, where the adapter is written into a sibling folder and swapped in
    watched = tmp_path / "run"
    watched.mkdir()
    out = watched / "out"
    writes, output = torchrun("recipes/finetune_vit.py", [
        "--model", "vit_tiny_patch16_224", "--random_init", "--model_kwargs",
        '{"img_size": 28, "patch_size": 7, "embed_dim": 32, "depth": 2, "num_heads": 2, "in_chans": 1}',
        "--dataset", "mnist_5k", "--method", "hta", "--max_train_steps", "4", "--batch_size", "8",
        "--max_eval_samples", "32", "--adapter_dropout", "0.1", "--quiet", "--output_dir", str(out),
    ], tmp_path, watched)
    metrics = json.loads((out / "metrics.json").read_text())
    dist = metrics["distributed"]
    assert dist["num_processes"] == 2 and dist["model_wrapper"] == "DistributedDataParallel", dist
    assert dist["replica_max_abs_diff"] == 0.0  # all-gathered trainable weights of both ranks agree exactly
    assert metrics["steps"] == 4
    assert writes["1"] == [], f"rank 1 wrote: {writes['1']}"
    written = {Path(line.split(" ", 1)[1]).name for line in writes["0"]}
    assert {"metrics.json", "README.md", "adapter_config.json"} <= written  # (safetensors writes from Rust: unseen)
    assert (out / "adapter_model.safetensors").exists()

    import hh_peft  # noqa: F401  (registers HTA before loading the adapter)
    from peft import PeftConfig

    assert PeftConfig.from_pretrained(str(out)).peft_type == "HTA"


@pytest.mark.slow
def test_unitary_rnn_recipe_with_two_processes(tmp_path):
    out = tmp_path / "out"
    writes, output = torchrun("recipes/train_unitary_rnn.py", [
        "--task", "copy", "--seq_len", "5", "--hidden_size", "8", "--optimizer", "cayley", "--max_train_steps", "4",
        "--batch_size", "8", "--eval_batches", "1", "--quiet", "--output_dir", str(out),
    ], tmp_path, out)
    metrics = json.loads((out / "metrics.json").read_text())
    dist = metrics["distributed"]
    assert dist["num_processes"] == 2 and dist["model_wrapper"] == "DistributedDataParallel", dist
    assert dist["replica_max_abs_diff"] == 0.0  # the Cayley step kept W identical on both ranks
    assert metrics["unitarity_error"] < 1e-4
    assert writes["1"] == [], f"rank 1 wrote: {writes['1']}"
    assert (out / "model.safetensors").exists() and (out / "config.json").exists()


@pytest.mark.slow
def test_two_process_checkpoints_resume_bit_identically(tmp_path):
    """Every rank writes its RNG streams into the temporary folder; rank 0 renames it once all have written."""
    argv = ["--task", "copy", "--seq_len", "5", "--hidden_size", "8", "--optimizer", "projunn_t", "--rank", "2",
            "--max_train_steps", "6", "--batch_size", "4", "--train_samples", "40", "--eval_batches", "1", "--quiet",
            "--no_plot", "--checkpointing_steps", "2"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    torchrun("recipes/train_unitary_rnn.py", [*argv, "--output_dir", str(straight)], tmp_path / "a", straight)
    step_2 = straight / "checkpoints" / "step_2"
    assert sorted(p.name for p in (straight / "checkpoints").iterdir()) == ["step_2", "step_4", "step_6"]
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in step_2.iterdir()}
    torchrun("recipes/train_unitary_rnn.py", [*argv, "--output_dir", str(resumed), "--resume_from_checkpoint",
                                              str(step_2)], tmp_path / "b", resumed)
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (straight, resumed))
    assert a["history"] == b["history"] and b["distributed"]["replica_max_abs_diff"] == 0.0

    from safetensors.torch import load_file

    wa, wb = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
