"""Nothing is lost by a kill: both recipes, SIGKILLed at random (seeded) moments and resumed with
``--resume_from_checkpoint latest`` again and again, end with exactly the weights and history of an uninterrupted run.

The runs are real processes killed with SIGKILL. To keep each run to about a second they are forked from a
small server process that has imported the recipes (and parsed the dataset) once; the server never runs a
torch operation itself, so the children start as fresh as a new interpreter. The kill moments are drawn
uniformly over the expected remaining run time (start-up, training with a checkpoint every step, and the
final save), so they land in data loading, training steps, ``save_state`` and the rename of a checkpoint.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from recipes.common.training import complete_checkpoints

ROOT = Path(__file__).resolve().parents[2]

SERVER = r"""
import json, os, signal, sys, time, traceback
sys.path.insert(0, sys.argv[1])
import hh_peft, unitary_rnn  # registered before the fork, as the recipes import them
from recipes import finetune_vit, train_unitary_rnn
from recipes.common.data import load_image_dataset

load_image_dataset("mnist_5k")  # parsed once here (numpy and Arrow only), inherited by every child
RECIPES = {"finetune_vit": finetune_vit, "train_unitary_rnn": train_unitary_rnn}
print("ready", flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        log = os.open(cmd["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(log, 1)
        os.dup2(log, 2)
        code = 0
        try:
            RECIPES[cmd["recipe"]].main(cmd["argv"])
        except SystemExit as err:
            code = err.code if isinstance(err.code, int) else 1
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    killed = False
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if cmd["kill_after"] is not None and time.monotonic() - start >= cmd["kill_after"]:
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            killed = True
            break
        time.sleep(0.001)
    print(json.dumps({"killed": killed, "exit_code": os.waitstatus_to_exitcode(status),
                      "wall_s": time.monotonic() - start}), flush=True)
"""


class ForkServer:
    def __init__(self, log: Path):
        self.log = log
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER, str(ROOT)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, cwd=ROOT)
        assert self.proc.stdout.readline().strip() == "ready"

    def run(self, recipe: str, argv: list[str], kill_after: float | None) -> dict:
        """Run ``recipe.main(argv)`` in a fresh fork; SIGKILL it ``kill_after`` seconds after the fork."""
        self.proc.stdin.write(json.dumps({"recipe": recipe, "argv": argv, "kill_after": kill_after,
                                          "log": str(self.log)}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"fork server died; log:\n{self.log.read_text()[-3000:]}"
        return json.loads(line)

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.fixture
def server(tmp_path):
    s = ForkServer(tmp_path / "runs.log")
    yield s
    s.close()


TINY_VIT_KWARGS = '{"img_size": 28, "patch_size": 7, "embed_dim": 32, "depth": 2, "num_heads": 2, "in_chans": 1}'
RECIPES = {
    # 40 sequences in batches of 8: 5 steps per epoch, so kills land mid-epoch and across epoch ends
    "train_unitary_rnn": (["--task", "copy", "--seq_len", "5", "--hidden_size", "8", "--optimizer", "projunn_t",
                           "--rank", "2", "--unitary_lr", "1e-2", "--batch_size", "8", "--train_samples", "40",
                           "--max_train_steps", "24", "--eval_batches", "1", "--eval_every", "5"],
                          "model.safetensors"),
    # adapter dropout: the RNG streams must come back too; 96 images in batches of 16, 2 accumulated: 3 updates
    # per epoch
    "finetune_vit": (["--model", "vit_tiny_patch16_224", "--random_init", "--model_kwargs", TINY_VIT_KWARGS,
                      "--dataset", "mnist_5k", "--max_train_samples", "96", "--max_eval_samples", "32",
                      "--batch_size", "16", "--gradient_accumulation_steps", "2", "--eval_batch_size", "32",
                      "--method", "hta", "--adapter_dropout", "0.1", "--max_train_steps", "16", "--eval_every", "4"],
                     "adapter_model.safetensors"),
}
COMMON = ["--threads", "1", "--quiet", "--no_plot", "--seed", "3"]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_kills_at_random_moments_then_resume_latest_end_bit_identical(tmp_path, server, recipe):
    argv, weights_file = RECIPES[recipe]
    argv = [*argv, *COMMON]
    steps = int(argv[argv.index("--max_train_steps") + 1])

    # a first run compiles and caches the bytecode of every module the recipe imports (a fresh clone has none), so
    # it is slower than the others and would set too long a time scale: it only warms up
    warm_up = server.run(recipe, [*argv, "--output_dir", str(tmp_path / "warm-up")], kill_after=None)
    assert warm_up["exit_code"] == 0, (tmp_path / "runs.log").read_text()[-3000:]
    reference = tmp_path / "reference"
    ref = server.run(recipe, [*argv, "--output_dir", str(reference)], kill_after=None)
    assert ref["exit_code"] == 0, (tmp_path / "runs.log").read_text()[-3000:]
    ref_metrics = json.loads((reference / "metrics.json").read_text())
    # the uninterrupted run without checkpoints sets the time scale; checkpointing every step adds to it
    expected_run_s = 2.0 * ref["wall_s"]

    out = tmp_path / "killed"
    rng = random.Random(20261203 + len(recipe))
    kills = resumes = 0
    tmp_leftovers = 0
    for attempt in range(12):
        done = complete_checkpoints(out)
        done_steps = int(done[-1].name.split("_")[1]) if done else 0
        resume = ["--resume_from_checkpoint", "latest"] if done else []
        resumes += bool(done)
        kill_after = rng.uniform(0.0, expected_run_s * (1.0 - 0.8 * done_steps / steps)) if kills < 8 else None
        result = server.run(recipe, [*argv, "--checkpointing_steps", "1", "--output_dir", str(out), *resume],
                            kill_after=kill_after)
        if result["killed"]:
            kills += 1
            tmp_leftovers += any((out / "checkpoints").glob(".tmp_step_*"))
            continue
        assert result["exit_code"] == 0, (tmp_path / "runs.log").read_text()[-3000:]
        break
    else:
        pytest.fail("the run never completed")
    assert kills >= 4, f"only {kills} of the runs were killed before they finished"

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == steps
    assert metrics["history"] == ref_metrics["history"]  # losses, rates and held-out figures, exactly
    a, b = load_file(reference / weights_file), load_file(out / weights_file)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [p.name for p in complete_checkpoints(out)] == [f"step_{s}" for s in range(1, steps + 1)]
    print(f"{recipe}: {kills} kills ({tmp_leftovers} inside a checkpoint write), {resumes} resumes")
