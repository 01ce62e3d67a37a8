"""recipes/common/training.py: the shared loop, its checkpoints and the argument checks, on a tiny model."""

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from recipes.common import RecipeError
from recipes.common.training import (
    FRACTION,
    POSITIVE,
    POSITIVE_INT,
    check_ranges,
    complete_checkpoints,
    find_checkpoint,
    save_checkpoint,
    train,
)


def _accelerator(accumulation=1):
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    return Accelerator(gradient_accumulation_steps=accumulation,
                       dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=0))


def _pieces(n=40, batch=4):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 1))
    x = torch.randn(n, 3)
    data = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True))
    loader = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=True, drop_last=True,
                                         generator=torch.Generator().manual_seed(0))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2), loader


def _loss(model, batch):
    x, y = batch
    return torch.nn.functional.mse_loss(model(x), y)


def _run(out, accumulation=1, **kwargs):
    from accelerate.utils import set_seed

    accelerator = _accelerator(accumulation)
    set_seed(0)
    model, optimizer, loader = _pieces()
    sched = lambda opt, total, procs: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / (total * procs + 1))
    return train(accelerator, model, optimizer, loader, _loss, output_dir=out, make_scheduler=sched,
                 evaluate=lambda m: {"probe": float(m[0].weight.detach().sum())}, quiet=True, **kwargs)


def test_steps_epochs_accumulation_and_history(tmp_path):
    # 10 batches per epoch in groups of 3: 3 updates per epoch (the 10th batch unused), 2.5 epochs -> 8 updates
    result = _run(tmp_path, accumulation=3, epochs=2.5, eval_every=3)
    assert result.updates_per_epoch == 3 and result.total_steps == 8 and result.state.step == 8
    h = result.state.history
    assert h["step"] == list(range(1, 9)) and len(h["loss"]) == len(h["lr"]) == 8
    assert h["eval_step"] == [3, 6, 8] and len(h["probe"]) == 3
    assert h["lr"] == pytest.approx([1e-2 * (1 - s / 9) for s in range(1, 9)])  # the scheduler stepped once per update


def test_progress_in_a_log_is_plain_lines(tmp_path, capsys):
    from accelerate.utils import set_seed

    set_seed(0)
    model, optimizer, loader = _pieces()
    train(_accelerator(), model, optimizer, loader, _loss, output_dir=tmp_path, max_train_steps=20, desc="tiny",
          evaluate=lambda m: {"probe": 0.5}, eval_every=10)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("tiny:")]
    assert "\r" not in err and len(lines) == 10  # every 10 % of 20 steps
    assert lines[-1].startswith("tiny: 100% 20/20") and "loss=" in lines[-1] and "probe=0.5000" in lines[-1]


def test_resume_mid_epoch_is_bit_identical(tmp_path):
    straight = _run(tmp_path / "a", max_train_steps=17, checkpointing_steps=4, eval_every=5)
    assert [p.name for p in complete_checkpoints(tmp_path / "a")] == ["step_4", "step_8", "step_12", "step_16"]
    # step 12 of 10-per-epoch batches: resumes two batches into the second epoch
    resumed = _run(tmp_path / "b", max_train_steps=17, eval_every=5,
                   resume_from=find_checkpoint(tmp_path / "a", str(tmp_path / "a" / "checkpoints" / "step_12")))
    assert resumed.state.history == straight.state.history
    for p, q in zip(straight.model.parameters(), resumed.model.parameters()):
        assert torch.equal(p, q)


def test_latest_is_the_newest_complete_checkpoint(tmp_path):
    _run(tmp_path, max_train_steps=6, checkpointing_steps=3)
    checkpoints = tmp_path / "checkpoints"
    (checkpoints / ".tmp_step_9").mkdir()  # a save killed half way
    (checkpoints / ".tmp_step_9" / "optimizer.bin").write_bytes(b"\x80")
    (checkpoints / "step_notes").mkdir()
    assert find_checkpoint(tmp_path, "latest") == checkpoints / "step_6"
    with pytest.raises(RecipeError, match="'latest': no such checkpoint folder"):
        find_checkpoint(tmp_path / "elsewhere", "latest")
    with pytest.raises(RecipeError, match="is not a complete checkpoint of this run"):
        _run(tmp_path / "c", max_train_steps=6, resume_from=checkpoints / ".tmp_step_9")


def test_save_replaces_a_stale_temporary_and_an_older_copy_of_the_step(tmp_path):
    accelerator = _accelerator()
    model, optimizer, _ = _pieces()
    model, optimizer = accelerator.prepare(model, optimizer)
    stale = tmp_path / "checkpoints" / ".tmp_step_2"
    stale.mkdir(parents=True)
    (stale / "junk").write_text("half written")
    first = save_checkpoint(accelerator, tmp_path, 2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_2"]
    assert not (first / "junk").exists() and (first / "model.safetensors").exists()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    save_checkpoint(accelerator, tmp_path, 2)  # a rerun from an earlier checkpoint saves step 2 again
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_2"]
    from safetensors.torch import load_file

    assert torch.equal(load_file(first / "model.safetensors")["0.weight"], model[0].weight.detach())


def test_check_ranges_names_the_flag_and_the_valid_range():
    args = argparse.Namespace(batch_size=0, lr=1e-3, warmup_ratio=None)
    with pytest.raises(RecipeError, match=r"^--batch_size must be an integer >= 1, got 0$"):
        check_ranges(args, {"lr": POSITIVE, "batch_size": POSITIVE_INT, "warmup_ratio": FRACTION})
    args.batch_size = 2.5
    with pytest.raises(RecipeError, match="got 2.5"):
        check_ranges(args, {"batch_size": POSITIVE_INT})
    args.batch_size, args.lr = 4, float("nan")
    with pytest.raises(RecipeError, match=r"--lr must be a number > 0, got nan"):
        check_ranges(args, {"lr": POSITIVE, "batch_size": POSITIVE_INT, "warmup_ratio": FRACTION})


EXIT_SCRIPT = """
import atexit, logging, sys
from recipes.common.training import exit_script
atexit.register(lambda: print("finalized", flush=True))
logging.basicConfig(stream=sys.stderr)
logging.getLogger("recipe").warning("logged")
print("written", end="")  # no newline, no flush: exit_script must flush it
exit_script()
print(" returned")
"""


@pytest.mark.parametrize("world_size, expected_out", [(None, "written returned\nfinalized\n"), ("2", "written")])
def test_exit_script_skips_finalization_only_in_a_multi_process_run(tmp_path, world_size, expected_out):
    """A multi-process recipe leaves with os._exit(0) once flushed (see exit_script); a single process returns."""
    env = {k: v for k, v in os.environ.items() if k != "WORLD_SIZE"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    if world_size:
        env["WORLD_SIZE"] = world_size
    proc = subprocess.run([sys.executable, "-c", EXIT_SCRIPT], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == expected_out
    assert "logged" in proc.stderr
