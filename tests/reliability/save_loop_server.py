"""Fork server for the kill tests: imports torch / PEFT / hh_peft once, then forks a child per command that saves
two different HTA adapters into one folder, over and over, until a signal ends it.

    python save_loop_server.py REFERENCES

writes the two adapters once, complete, to REFERENCES/a and REFERENCES/b, prints ``ready``, then reads commands on
stdin, one per line:

* ``loop SEED MODE FOLDER``: fork a child that saves a and b alternately (order from SEED) into FOLDER forever,
  printing ``started`` once it runs and ``saved a`` / ``saved b`` after each save returns; MODE ``exchange`` (atomic rename exchange) or
  ``fallback`` (the two-rename swap of file systems without one). Prints ``child PID``; once the child has ended,
  ``exit STATUS`` (the raw status of ``os.waitpid``).
* ``once MODE FOLDER``: the same child, but it saves a single time and exits.

The models are built here the way :func:`build_models` does, so the test can rebuild the same base model.
"""

import copy
import os
import random
import signal
import sys

import torch
from torch import nn

LABELS = ("a", "b")


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(12, 16)
        self.lin1 = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(torch.tanh(self.lin1(torch.tanh(self.lin0(x)))))


def build_base() -> nn.Module:
    torch.manual_seed(1234)
    return TinyNet().eval()


def build_models(base: nn.Module) -> dict:
    """Two HTA adapters with different configs (rank, form, targets, head) and different weights."""
    import hh_peft
    from peft import get_peft_model

    configs = {
        "a": hh_peft.HouseholderConfig(target_modules=["lin0", "lin1"], lora_rank=1, init_weights=False),
        "b": hh_peft.HouseholderConfig(target_modules=["lin1"], lora_rank=3, householder="paper", init_weights=False,
                                       modules_to_save=["head"]),
    }
    models = {}
    for seed, (label, config) in enumerate(configs.items()):
        torch.manual_seed(seed)
        model = get_peft_model(copy.deepcopy(base), config).eval()
        if label == "b":
            with torch.no_grad():
                model.base_model.model.head.modules_to_save["default"].weight.mul_(-1.0)
        models[label] = model
    return models


def say(line: str) -> None:
    """One line on stdout in one write (the server and its child share the pipe: lines never interleave)."""
    os.write(1, (line + "\n").encode())


def child(folder: str, models: dict, seed: int, mode: str, once: bool) -> None:
    import hh_peft.atomic_folder

    # Ctrl-C as an interactive Python has it: a shell without job control starts background commands (CI steps,
    # ``cmd &``) with SIGINT ignored, and that is inherited down to here
    signal.signal(signal.SIGINT, signal.default_int_handler)

    hh_peft.atomic_folder.use_rename_exchange = mode == "exchange"
    order = list(LABELS)
    random.Random(seed).shuffle(order)
    try:
        say("started")
        while True:
            for label in order:
                models[label].save_pretrained(folder)
                say(f"saved {label}")
                if once:
                    os._exit(0)
    except KeyboardInterrupt:
        say("interrupted")
        os._exit(3)


def main() -> None:
    torch.set_num_threads(1)
    references = sys.argv[1]
    models = build_models(build_base())
    for label, model in models.items():
        model.save_pretrained(os.path.join(references, label))
    say("ready")
    for line in sys.stdin:
        command, *args = line.split()
        once = command == "once"
        seed, mode, folder = (0, *args) if once else (int(args[0]), *args[1:])
        pid = os.fork()
        if pid == 0:
            try:
                child(folder, models, seed, mode, once)
            finally:
                os._exit(4)  # never return into the server loop
        say(f"child {pid}")
        _, status = os.waitpid(pid, 0)
        say(f"exit {status}")


if __name__ == "__main__":
    main()
