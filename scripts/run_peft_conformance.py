"""Run PEFT's own generic method matrix (``tests/test_custom_models.py`` of the peft sdist) on HTA.

The suite is fetched by ``scripts/fetch_conformance_suites.py`` (never committed). This script
copies it to ``.cache/conformance/``, adds HTA rows beside HRA's in ``TEST_CASES`` and
``MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES`` (the suite derives the ``init_weights=False`` variants
itself), and runs every test whose id names HTA. Cases that do not apply to HTA are deselected
below, each with its reason (the README lists them); everything else must pass.

    python scripts/run_peft_conformance.py [extra pytest args]
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fetch_conformance_suites import ROOT, fetch  # noqa: E402

HTA_TEST_CASES = '''
    ########
    # HTA #  (added by hh-peft's scripts/run_peft_conformance.py)
    ########
    ("Vanilla MLP 1 HTA", "MLP", HouseholderConfig, {"target_modules": "lin0"}),
    ("Vanilla MLP 2 HTA", "MLP", HouseholderConfig, {"target_modules": ["lin0"]}),
    ("Vanilla MLP 3 HTA", "MLP", HouseholderConfig, {"target_modules": ["lin0", "lin1"]}),
    ("Vanilla MLP 4 HTA rank 0", "MLP", HouseholderConfig, {"target_modules": ["lin0", "lin1"], "lora_rank": 0}),
    ("Vanilla MLP 5 HTA", "MLP", HouseholderConfig, {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    ("Vanilla MLP 6 HTA paper form rank 2", "MLP", HouseholderConfig, {"target_modules": ["lin0"], "householder": "paper", "lora_rank": 2}),
    ("Vanilla MLP 7 HTA dropout", "MLP", HouseholderConfig, {"target_modules": ["lin0", "lin1"], "dropout": 0.1}),
    ("Vanilla MLP 8 HTA exclude", "MLP", HouseholderConfig, {"target_modules": ["lin0", "lin1"], "exclude_modules": ["lin1"]}),
    ("Embedding + transformers Conv1D 1 HTA", "EmbConv1D", HouseholderConfig, {"target_modules": ["conv1d"]}),
    ("Embedding + transformers Conv1D 2 HTA paper form", "EmbConv1D", HouseholderConfig, {"target_modules": ["conv1d"], "householder": "paper"}),
    ("Conv2d 1 HTA", "Conv2d", HouseholderConfig, {"target_modules": ["conv2d"]}),
    ("Conv2d 2 HTA", "Conv2d", HouseholderConfig, {"target_modules": ["conv2d", "lin0"]}),
    ("Conv2d 3 HTA 1x1", "Conv2d1x1", HouseholderConfig, {"target_modules": ["conv2d"]}),
    ("Conv2d 4 HTA 1x1 paper form", "Conv2d1x1", HouseholderConfig, {"target_modules": ["conv2d"], "householder": "paper"}),
    ("Vanilla MLP 9 HTA output blocks", "MLP", HouseholderConfig, {"target_modules": ["lin0"], "output_blocks": 2}),
    ("Vanilla MLP 10 HTA square blocks", "MLP", HouseholderConfig, {"target_modules": ["lin0", "lin1"], "rectangular": "square_blocks"}),
    ("Vanilla MLP 11 HTA adapted blocks paper form", "MLP", HouseholderConfig, {"target_modules": ["lin0"], "output_blocks": 2, "adapted_blocks": {"lin0": [1]}, "householder": "paper"}),
    ("Vanilla MLP 12 HTA input blocks rank 2", "MLP", HouseholderConfig, {"target_modules": ["lin1"], "input_blocks": 2, "lora_rank": 2}),
'''

HTA_MULTIPLE_ACTIVE_CASES = '''
    (
        "HTA Same",
        "hta",
        HouseholderConfig,
        {"target_modules": ["lin0"], "init_weights": False},
        {"target_modules": ["lin0"], "init_weights": False},
    ),
    (
        "HTA Different",
        "hta",
        HouseholderConfig,
        {"target_modules": ["lin0"], "init_weights": False},
        {"target_modules": ["lin1"], "init_weights": False},
    ),
    (
        "HTA blocks Same",
        "hta",
        HouseholderConfig,
        {"target_modules": ["lin0"], "init_weights": False, "output_blocks": 2},
        {"target_modules": ["lin0"], "init_weights": False, "output_blocks": 2},
    ),
    (
        "HTA blocks Mixed layouts",
        "hta",
        HouseholderConfig,
        {"target_modules": ["lin0"], "init_weights": False, "output_blocks": 2},
        {"target_modules": ["lin0"], "init_weights": False},
    ),
'''

# Cases of PEFT's matrix that do not apply to HTA, with the reason (pytest -k expressions).
NOT_APPLICABLE = {
    "test_only_params_are_updated and (EmbConv1D or Conv2d1x1) and not paper": (
        "these layers have a single output (EmbConv1D's Conv1D(1, 5)) or a single input (a 1x1 Conv2d on one "
        "channel): a 1-dimensional normalised Householder matrix is the constant -1, so that vector has no degree "
        "of freedom and rightly gets a zero gradient. The paper-form rows on the same models run this test."
    ),
}


def _insert_after(text: str, anchor: str, addition: str) -> str:
    if text.count(anchor) != 1:
        raise RuntimeError(f"anchor {anchor!r} found {text.count(anchor)} times in the PEFT suite; the suite changed")
    return text.replace(anchor, anchor + addition)


def prepare() -> Path:
    source = fetch("peft") / "tests"
    target = ROOT / ".cache" / "conformance" / source.parent.name / "peft_suite"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target)
    (target / "__init__.py").write_text("")
    module = target / "test_custom_models.py"
    text = module.read_text()
    text = "import hh_peft  # registers HTA with PEFT\nfrom hh_peft import HouseholderConfig\n" + text
    text = _insert_after(text, "\nTEST_CASES = [\n", HTA_TEST_CASES)
    text = _insert_after(text, "\nMULTIPLE_ACTIVE_ADAPTERS_TEST_CASES = [\n", HTA_MULTIPLE_ACTIVE_CASES)
    module.write_text(text)
    return target


def main(argv: list[str]) -> int:
    """Run the HTA rows; ``--select EXPR`` narrows them further (pytest ``-k`` syntax)."""
    suite = prepare()
    selection = "(HTA or hta)"
    if "--select" in argv:
        i = argv.index("--select")
        selection += f" and ({argv[i + 1]})"
        argv = argv[:i] + argv[i + 2 :]
    for expression in NOT_APPLICABLE:
        selection += f" and not ({expression})"
    command = [sys.executable, "-m", "pytest", str(suite / "test_custom_models.py"), "-k", selection, "-q",
               "-p", "no:cacheprovider", "--rootdir", str(suite.parent), *argv]
    print(" ".join(command), flush=True)
    return subprocess.run(command, cwd=suite.parent).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
