"""An installed hh-peft is enough: a process that never imports hh_peft loads HTA adapters through PEFT.

Every test here runs a fresh interpreter (``subprocess``), because the hook acts at interpreter start-up and on the
first ``import peft`` of a process.
"""

import os
import site
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from safetensors.torch import load_file, save_file
from transformers import ViTConfig, ViTForImageClassification

import _hh_peft_autoload
from hh_peft import HouseholderConfig


def run_python(code: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter of this environment, offline, with ``env`` added to the environment."""
    environment = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **env)
    return subprocess.run(
        [sys.executable, *args, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=environment, timeout=300
    )


@pytest.fixture
def saved_hta_vit(tmp_path):
    """A tiny transformers ViT saved to ``base/`` and a random (non-identity) HTA adapter for it in ``adapter/``
    (its ``base_model_name_or_path`` is the local ``base/``), an input batch and the adapted model's logits."""
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=96, num_labels=5)
    ViTForImageClassification(config).save_pretrained(tmp_path / "base")
    base = ViTForImageClassification.from_pretrained(tmp_path / "base")
    hta = HouseholderConfig(init_weights=False, target_modules=["q_proj", "v_proj", "fc1"], modules_to_save=["classifier"])
    model = get_peft_model(base, hta).eval()
    model.save_pretrained(tmp_path / "adapter")
    x = torch.randn(3, 3, 32, 32)
    save_file({"x": x}, tmp_path / "x.safetensors")
    with torch.no_grad():
        expected = model(pixel_values=x).logits
    return tmp_path, expected


LOAD_WITHOUT_IMPORT = """
    import sys
    from safetensors.torch import load_file, save_file
    from peft import {entry_point}
    from transformers import ViTForImageClassification
    root = {root!r}
    x = load_file(root + "/x.safetensors")["x"]
    {load}
    y = model.eval()(pixel_values=x).logits
    save_file({{"y": y.detach().contiguous()}}, root + "/y.safetensors")
    print("imported automatically:", "hh_peft" in sys.modules)
"""


@pytest.mark.parametrize(
    "entry_point, load",
    [
        ("PeftModel", "model = PeftModel.from_pretrained(ViTForImageClassification.from_pretrained(root + '/base'), root + '/adapter')"),
        ("AutoPeftModel", "model = AutoPeftModel.from_pretrained(root + '/adapter')"),
    ],
    ids=["PeftModel", "AutoPeftModel"],
)
def test_fresh_process_loads_hta_adapter_without_importing_hh_peft(saved_hta_vit, entry_point, load):
    root, expected = saved_hta_vit
    assert "import hh_peft" not in load
    result = run_python(LOAD_WITHOUT_IMPORT.format(entry_point=entry_point, root=str(root), load=load))
    assert result.returncode == 0, result.stderr
    assert "imported automatically: True" in result.stdout
    torch.testing.assert_close(load_file(root / "y.safetensors")["y"], expected, rtol=0, atol=0)


def test_autoload_pth_is_installed_in_site_packages():
    """``pip install hh-peft`` (regular or ``-e``) puts the one-line .pth beside the other site-packages."""
    candidates = [Path(directory, "hh_peft_autoload.pth") for directory in site.getsitepackages()]
    installed = [path for path in candidates if path.is_file()]
    assert installed, (
        f"hh_peft_autoload.pth is in none of {site.getsitepackages()}: this environment was installed before the "
        "autoload hook existed; reinstall with `pip install -c constraints.txt -e '.[test,recipes]'`"
    )
    assert installed[0].read_text() == "import _hh_peft_autoload\n"


def test_start_up_installs_only_the_finder_and_imports_nothing_heavy():
    result = run_python("""
        import sys
        print(sorted(name for name in ("_hh_peft_autoload", "hh_peft", "peft", "torch") if name in sys.modules))
        print(type(sys.meta_path[0]).__name__)
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == ["['_hh_peft_autoload']", "RegisterAfterPeftFinder"]


def test_hook_registers_hta_after_peft_and_leaves_peft_as_imported():
    """After ``import peft`` alone: HTA is registered, the finder is gone and peft keeps its own loader."""
    result = run_python("""
        import sys
        import peft
        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
        from peft.utils import PeftType
        print(PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.HTA].__name__)
        print(any(type(f).__name__ == "RegisterAfterPeftFinder" for f in sys.meta_path))
        print(type(peft.__loader__).__name__, peft.__spec__.loader is peft.__loader__)
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:3] == ["HouseholderConfig", "False", "SourceFileLoader True"]


@pytest.mark.parametrize("first", ["import hh_peft", "from peft.utils import PeftType", "import peft.tuners.lora"])
def test_any_import_order_registers_hta_once(first):
    result = run_python(f"""
        {first}
        import hh_peft, peft
        from peft.utils import PeftType
        print(list(PeftType).count(PeftType.HTA), peft.PEFT_TYPE_TO_TUNER_MAPPING[PeftType.HTA].__name__)
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "1 HouseholderModel"


def test_disabled_hook_leaves_peft_without_hta(saved_hta_vit):
    """``HH_PEFT_AUTOLOAD=0`` opts out: PEFT alone then does not know the type (its own ``KeyError: 'HTA'``), and an
    explicit ``import hh_peft`` is what makes the same load work."""
    root, _ = saved_hta_vit
    load = f"from peft import PeftConfig; print(type(PeftConfig.from_pretrained({str(root / 'adapter')!r})).__name__)"
    refused = run_python(load, HH_PEFT_AUTOLOAD="0")
    assert refused.returncode != 0 and "KeyError: 'HTA'" in refused.stderr
    accepted = run_python("import hh_peft\n" + load, HH_PEFT_AUTOLOAD="0")
    assert accepted.returncode == 0 and accepted.stdout.strip() == "HouseholderConfig", accepted.stderr


def test_failing_hh_peft_import_warns_and_keeps_peft_usable():
    """A broken plugin must not break ``import peft``: the hook reports the failure as a warning naming it."""
    result = run_python("""
        import sys

        class Broken:  # a finder that makes `import hh_peft` fail, as a broken installation would
            def find_spec(self, fullname, path=None, target=None):
                if fullname == "hh_peft":
                    raise ImportError("simulated broken hh_peft")

        sys.meta_path.insert(1, Broken())
        import peft
        print(peft.get_peft_model.__name__)
    """, "-W", "always")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "get_peft_model"
    assert "RuntimeWarning: hh-peft is installed but `import hh_peft` failed (ImportError: simulated broken hh_peft)" in result.stderr


def test_install_is_idempotent():
    finders_before = list(sys.meta_path)
    _hh_peft_autoload.install()  # hh_peft is imported in this process: nothing to do
    assert sys.meta_path == finders_before


@pytest.mark.slow
@pytest.mark.parametrize("build", ["wheel", "editable"])
def test_regular_and_editable_wheels_carry_the_pth(build_distribution, build):
    """setup.py's build_py writes the .pth into both wheels (`pip install hh-peft` and `pip install -e .`), at the
    wheel's top level, i.e. into site-packages."""
    import zipfile

    repo = Path(__file__).resolve().parents[2]
    wheel = build_distribution(build)
    with zipfile.ZipFile(wheel) as archive:
        assert archive.read("hh_peft_autoload.pth") == b"import _hh_peft_autoload\n"
        if build == "wheel":
            assert archive.read("_hh_peft_autoload.py") == (repo / "_hh_peft_autoload.py").read_bytes()
        else:  # the editable finder maps the module to the checkout
            finder = next(name for name in archive.namelist() if name.endswith("_finder.py"))
            assert "'_hh_peft_autoload': " in archive.read(finder).decode()
