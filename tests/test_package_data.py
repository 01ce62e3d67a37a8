"""The distribution carries its package data: a wheel holds the card templates, and a wheel install renders the
same cards as this checkout."""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TEMPLATES = ("hh_peft/templates/adapter_card.md", "unitary_rnn/templates/model_card.md")

_RENDER_CARDS = """
import json, torch, hh_peft, unitary_rnn
from hh_peft.card import build_adapter_card
config = hh_peft.HouseholderConfig(target_modules=["attn.qkv"], modules_to_save=["head"])
adapter = build_adapter_card(config=config, usage="import hh_peft", model_name="m", dataset="mnist",
                             metrics={"accuracy": 0.5}, adapter_params=1234)
torch.manual_seed(0)
model = unitary_rnn.UnitaryRNNForSequenceClassification(unitary_rnn.UnitaryRNNConfig(input_size=1, hidden_size=4))
print(json.dumps({"files": [hh_peft.__file__, unitary_rnn.__file__], "adapter": str(adapter),
                  "unitary": str(unitary_rnn.model_card_for(model, "me/u"))}))
"""


def _render(pythonpath: str | None) -> dict:
    env = {**os.environ, "HH_PEFT_AUTOLOAD": "0"}
    env.pop("PYTHONPATH", None)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    run = subprocess.run([sys.executable, "-c", _RENDER_CARDS], env=env, capture_output=True, text=True, timeout=180,
                         cwd=pythonpath or REPO)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_wheel_ships_the_templates_and_renders_the_same_cards(tmp_path, build_distribution):
    wheel = build_distribution("wheel")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        assert set(TEMPLATES) <= names, sorted(n for n in names if not n.endswith(".py"))
        for template in TEMPLATES:
            assert archive.read(template) == (REPO / template).read_bytes()
        archive.extractall(tmp_path / "site")  # a pure-Python wheel, installed: its files on sys.path

    installed, checkout = _render(str(tmp_path / "site")), _render(None)
    assert all(Path(f).is_relative_to(tmp_path / "site") for f in installed["files"])
    assert all(Path(f).is_relative_to(REPO) for f in checkout["files"])
    assert installed["adapter"] == checkout["adapter"] and "| mnist | accuracy | 0.5 |" in installed["adapter"]
    assert installed["unitary"] == checkout["unitary"] and "# u" in installed["unitary"]
