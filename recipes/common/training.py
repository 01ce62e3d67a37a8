"""Pieces of a training run shared by the recipes: the replica check, the curves plot, the command-line entry."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Sequence

import torch

from . import RecipeError


class TrainState:
    """Step counter and per-step history, saved in every checkpoint (``accelerator.register_for_checkpointing``),
    so a resumed run continues at the next step with its curves intact."""

    def __init__(self, history_keys: Sequence[str]):
        self.step = 0
        self.history: dict[str, list] = {key: [] for key in history_keys}

    def state_dict(self) -> dict:
        return {"step": self.step, "history": json.dumps(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.history = json.loads(state["history"])


def checkpoint_folder(output_dir: Path, step: int) -> Path:
    """Where ``accelerator.save_state`` writes the state after ``step`` updates."""
    return Path(output_dir) / "checkpoints" / f"step_{step}"


def resume_from_checkpoint(accelerator, output_dir: Path, where: str, state: TrainState) -> Path:
    """``accelerator.load_state`` from ``where``: a ``checkpoints/step_N`` folder, or ``"latest"`` (the highest N
    under ``output_dir``). Raises `RecipeError` when there is no such folder."""
    if where == "latest":
        found = sorted((Path(output_dir) / "checkpoints").glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
        folder = found[-1] if found else None
    else:
        folder = Path(where)
    if folder is None or not folder.is_dir():
        raise RecipeError(f"--resume_from_checkpoint {where!r}: no such checkpoint folder")
    accelerator.load_state(str(folder))
    accelerator.print(f"resumed from {folder} at step {state.step}")
    return folder


def replica_max_abs_diff(accelerator, model: torch.nn.Module) -> float:
    """``max |theta_rank - theta_0|`` over every trainable parameter (a complex one as its real pair) and every
    process: 0.0 when all replicas hold the same weights, as data-parallel training must keep them."""
    flat = torch.cat([(torch.view_as_real(p) if p.is_complex() else p).detach().reshape(-1).double()
                      for p in model.parameters() if p.requires_grad])
    gathered = accelerator.gather(flat[None])  # (num_processes, P)
    return float((gathered - gathered[:1]).abs().max())


def plot_training_curves(
    path: Path,
    title: str,
    history: dict[str, list],
    accuracy_key: str,
    eval_loss_key: str | None = None,
    baseline_loss: float | None = None,
    loss_scale: str = "linear",
) -> None:
    """Two panels: training loss per step (with the held-out loss and a baseline level when given), and held-out
    accuracy at each evaluation (``history[accuracy_key]``, None entries skipped). Writes a PNG to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    ax[0].plot(history["step"], history["loss"], lw=0.8, label="train")
    if eval_loss_key is not None:
        ax[0].plot(history["eval_step"], history[eval_loss_key], marker="o", label="held out")
    if baseline_loss is not None:
        ax[0].axhline(baseline_loss, ls="--", c="gray", label="memoryless baseline")
    ax[0].set(xlabel="step", ylabel="loss", yscale=loss_scale, title=title)
    if eval_loss_key is not None or baseline_loss is not None:
        ax[0].legend()
    points = [(s, a) for s, a in zip(history["eval_step"], history[accuracy_key]) if a is not None]
    if points:
        ax[1].plot(*zip(*points), marker="o")
    ax[1].set(xlabel="step", ylabel="held-out accuracy", ylim=(0, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_recipe(parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], dict],
               argv: Sequence[str] | None = None) -> dict:
    """Parse ``argv`` and ``run`` it; a `RecipeError` (bad input, raised before training starts) becomes one line
    ``error: ...`` on stderr and exit status 2, as argparse does for a bad flag."""
    args = parser.parse_args(argv)
    try:
        return run(args)
    except RecipeError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
