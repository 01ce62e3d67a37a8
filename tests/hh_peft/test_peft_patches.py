"""Atomic save and all-or-nothing load of HTA adapters (hh_peft/peft_patches.py over hh_peft/atomic_folder.py,
hh_peft/loading.py and hh_peft/rollback.py), and other PEFT methods left untouched by them.

Saving: the folder is replaced whole (other files kept), a full disk or a failing card leaves the old adapter and its
card, stale temporaries are cleaned, an interrupted fallback swap is repaired. Loading: every broken file is refused
with an error naming the file and the problem, and the caller's model (or the existing PeftModel) is left exactly as
it was. Random SIGKILLs of real saving processes: tests/reliability/test_adapter_save_kills.py.
"""

import copy
import errno
import json
import multiprocessing
import os
import resource
import signal
import subprocess
import sys

import pytest
import torch
from huggingface_hub import ModelCard
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import hh_peft
from hh_peft import HouseholderConfig
from hh_peft.loading import DIGEST_KEY, tensors_digest


class TinyNet(nn.Module):
    def __init__(self, width=16):
        super().__init__()
        self.lin0 = nn.Linear(12, width)
        self.lin1 = nn.Linear(width, width)
        self.head = nn.Linear(width, 4)

    def forward(self, x):
        return self.head(torch.tanh(self.lin1(torch.tanh(self.lin0(x)))))


X = torch.randn(5, 12, generator=torch.Generator().manual_seed(0))


def make_base(width=16):
    torch.manual_seed(0)
    base = TinyNet(width).eval()
    base.lin0.bias.requires_grad_(False)  # a flag PEFT would change; it must come back as it was
    return base


def adapted(base, seed=1, **kwargs):
    kwargs.setdefault("target_modules", ["lin0", "lin1"])
    kwargs.setdefault("modules_to_save", ["head"])
    torch.manual_seed(seed)
    return get_peft_model(copy.deepcopy(base), HouseholderConfig(init_weights=False, **kwargs)).eval()


def output(model):
    with torch.no_grad():
        return model(X)


def siblings(folder):
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}.hta-"))


@pytest.fixture
def saved(tmp_path):
    """A complete HTA adapter folder, and the output the adapter gives."""
    model = adapted(make_base())
    folder = tmp_path / "adapter"
    model.save_pretrained(folder)
    return folder, output(model)


# ------------------------------------------------------------------------------------------------ saving
def test_save_writes_the_folder_whole_with_a_digest_and_leaves_no_temporaries(saved):
    folder, expected = saved
    assert sorted(os.listdir(folder)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert siblings(folder) == []
    with safe_open(folder / "adapter_model.safetensors", "pt") as handle:
        metadata = handle.metadata()
    assert metadata["format"] == "pt"
    assert metadata[DIGEST_KEY] == tensors_digest(load_file(folder / "adapter_model.safetensors"))
    assert torch.equal(output(PeftModel.from_pretrained(make_base(), folder)), expected)


def test_resave_keeps_other_files_subfolders_and_selected_adapters(tmp_path):
    base = make_base()
    model = adapted(base)
    model.add_adapter("other", HouseholderConfig(target_modules=["lin1"], lora_rank=2, init_weights=False))
    folder = tmp_path / "adapters"
    model.save_pretrained(folder)
    assert (folder / "other" / "adapter_model.safetensors").is_file()
    (folder / "notes.txt").write_text("mine")
    (folder / "extra").mkdir()
    (folder / "extra" / "data.bin").write_bytes(b"\x00\x01")
    default_weights = (folder / "adapter_model.safetensors").read_bytes()

    with torch.no_grad():
        model.base_model.model.lin1.hta_d["other"].add_(1.0)
    model.save_pretrained(folder, selected_adapters=["other"])

    assert (folder / "notes.txt").read_text() == "mine" and (folder / "extra" / "data.bin").read_bytes() == b"\x00\x01"
    assert (folder / "adapter_model.safetensors").read_bytes() == default_weights  # not selected: kept as it was
    assert siblings(folder) == []
    loaded = PeftModel.from_pretrained(make_base(), folder)
    loaded.load_adapter(folder / "other", adapter_name="other")
    for name in ("default", "other"):
        model.set_adapter(name)
        loaded.set_adapter(name)
        assert torch.equal(output(loaded), output(model)), name


def test_resave_updates_a_users_card_instead_of_replacing_it(saved):
    folder, _ = saved
    (folder / "README.md").write_text("---\nlicense: mit\n---\n# My adapter\n\nHand-written notes.\n")
    adapted(make_base(), seed=2).save_pretrained(folder)
    card = ModelCard.load(folder / "README.md")
    assert "Hand-written notes." in card.text and card.data.license == "mit" and "hta" in card.data.tags


def test_save_over_a_file_is_refused(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(ValueError, match="should be a directory, not a file"):
        adapted(make_base()).save_pretrained(path)
    assert path.read_text() == "x"


def _save_under_file_size_limit(model, folder, limit, queue):
    """Child process: save with RLIMIT_FSIZE = ``limit`` bytes (a write past it fails with EFBIG, as on a full disk)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # otherwise the kernel kills the writer
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    try:
        model.save_pretrained(folder)
        queue.put("saved")
    except BaseException as error:
        queue.put(f"{type(error).__name__}: {error} {getattr(error, '__notes__', '')}")


def test_a_full_disk_during_the_save_leaves_the_old_adapter_and_card(saved):
    folder, expected = saved
    before = {name: (folder / name).read_bytes() for name in os.listdir(folder)}
    bigger = adapted(make_base(width=64), seed=3, lora_rank=8)  # a weights file larger than the limit below
    limit = max(len(data) for data in before.values()) + 512
    queue = multiprocessing.get_context("fork").Queue()
    child = multiprocessing.get_context("fork").Process(target=_save_under_file_size_limit, args=(bigger, folder, limit, queue))
    child.start()
    child.join(120)
    result = queue.get(timeout=5)
    assert "File too large" in result or "os error 27" in result, result
    assert "the folder was left as it was" in result
    assert {name: (folder / name).read_bytes() for name in os.listdir(folder)} == before
    assert siblings(folder) == []
    assert torch.equal(output(PeftModel.from_pretrained(make_base(), folder)), expected)


def test_no_space_left_while_writing_the_card_leaves_the_old_adapter(saved, monkeypatch):
    folder, expected = saved
    before = {name: (folder / name).read_bytes() for name in os.listdir(folder)}

    def disk_full(self, filepath):
        with open(filepath, "w") as handle:
            handle.write("---\nlib")  # part of the card reached the disk
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filepath))

    monkeypatch.setattr(ModelCard, "save", disk_full)
    with pytest.raises(OSError, match="No space left on device") as error:
        adapted(make_base(), seed=2).save_pretrained(folder)
    assert any("the folder was left as it was" in note for note in error.value.__notes__)
    assert {name: (folder / name).read_bytes() for name in os.listdir(folder)} == before
    assert siblings(folder) == []
    monkeypatch.undo()
    assert torch.equal(output(PeftModel.from_pretrained(make_base(), folder)), expected)


def _dead_pid():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_an_interrupted_fallback_swap_is_repaired_by_the_next_load(saved):
    """Killed between the two renames of the fallback swap: the folder is set aside and missing; loading puts it back."""
    folder, expected = saved
    set_aside = folder.parent / f".{folder.name}.hta-old-{_dead_pid()}-0badc0de"
    folder.rename(set_aside)
    assert torch.equal(output(PeftModel.from_pretrained(make_base(), folder)), expected)
    assert folder.is_dir() and siblings(folder) == []


def test_the_next_save_removes_stale_temporaries_of_dead_processes_only(saved):
    folder, _ = saved
    stale = folder.parent / f".{folder.name}.hta-tmp-{_dead_pid()}-0badc0de"
    in_use = folder.parent / f".{folder.name}.hta-tmp-{os.getppid()}-0000beef"  # a live process may be saving
    for path in (stale, in_use):
        path.mkdir()
        (path / "adapter_config.json").write_text("{")
    adapted(make_base(), seed=2).save_pretrained(folder)
    assert siblings(folder) == [in_use.name]


def test_fallback_swap_gives_the_same_folder(saved, monkeypatch):
    folder, _ = saved
    monkeypatch.setattr(hh_peft.atomic_folder, "use_rename_exchange", False)
    model = adapted(make_base(), seed=2)
    model.save_pretrained(folder)
    assert siblings(folder) == []
    assert torch.equal(output(PeftModel.from_pretrained(make_base(), folder)), output(model))


def test_a_non_hta_model_keeps_peft_save(tmp_path):
    lora = get_peft_model(make_base(), LoraConfig(target_modules=["lin0"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "lora")
    with safe_open(tmp_path / "lora" / "adapter_model.safetensors", "pt") as handle:
        assert DIGEST_KEY not in (handle.metadata() or {})


# ------------------------------------------------------------------------------------------------ loading
def _truncate(folder):
    path = folder / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-40])


def _flip_a_data_byte(folder):
    path = folder / "adapter_model.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x10  # inside the last tensor's bytes; the header still parses
    path.write_bytes(bytes(data))


def _garble_header(folder):
    path = folder / "adapter_model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:12] = b"}}}}"
    path.write_bytes(bytes(data))


def _edit_config(**changes):
    def edit(folder):
        path = folder / "adapter_config.json"
        config = json.loads(path.read_text())
        for key, value in changes.items():
            if value is _DELETE:
                del config[key]
            else:
                config[key] = value
        path.write_text(json.dumps(config))

    return edit


_DELETE = object()

BROKEN_FOLDERS = {
    "truncated weights": (_truncate, r"adapter_model\.safetensors is truncated or corrupted"),
    "flipped data byte": (_flip_a_data_byte, r"adapter_model\.safetensors is corrupted: its tensors do not match the hta_sha256"),
    "garbled header": (_garble_header, r"adapter_model\.safetensors: the file is corrupted or not a safetensors file"),
    "empty config": (lambda f: (f / "adapter_config.json").write_text(""), r"adapter_config\.json: the file is empty"),
    "invalid JSON config": (lambda f: (f / "adapter_config.json").write_text('{"peft_type": "HTA",'), r"adapter_config\.json: the file is not valid JSON"),
    "missing peft_type": (_edit_config(peft_type=_DELETE), r'adapter_config\.json has no "peft_type"; the tensors in .*adapter_model\.safetensors are HTA'),
    "unknown peft_type": (_edit_config(peft_type="NOPE"), r"adapter_config\.json says peft_type 'NOPE'"),
    "lora_rank edited to 0": (_edit_config(lora_rank=0), r"adapter_config\.json says lora_rank 0, but .*adapter_model\.safetensors holds .*lin\d\.hta_A / hta_B, saved with lora_rank 1"),
    "lora_rank edited to 2": (_edit_config(lora_rank=2), r"adapter_config\.json says lora_rank 2, but in .*adapter_model\.safetensors .*lin\d\.hta_A has shape \(1, \d+\)"),
    "invalid householder": (_edit_config(householder="qr"), r"adapter_config\.json holds an invalid HTA config: `householder` must be one of"),
    # found only after injection, when PEFT maps the file onto the model: the rollback must undo the injection
    "target_modules edited": (_edit_config(target_modules=["lin0"]), r"saved tensor\(s\) with no place in the model .*lin1\.hta_"),
}


@pytest.mark.parametrize("breakage", list(BROKEN_FOLDERS))
def test_from_pretrained_of_a_broken_folder_names_the_problem_and_leaves_the_model_as_it_was(saved, breakage, model_state):
    folder, _ = saved
    damage, message = BROKEN_FOLDERS[breakage]
    damage(folder)
    base = make_base()
    before = model_state(base, X)
    with pytest.raises(ValueError, match=message):
        PeftModel.from_pretrained(base, folder)
    before.assert_unchanged(base)
    assert not hasattr(base, "peft_config")


def test_from_pretrained_onto_another_base_model_leaves_it_as_it_was(saved, model_state):
    folder, _ = saved
    other = make_base(width=20)
    before = model_state(other, X)
    with pytest.raises(ValueError, match=r"different base model: lin0\.hta_\w+\.default has shape") as error:
        PeftModel.from_pretrained(other, folder)
    assert "The model was left as it was before this call." in error.value.__notes__
    before.assert_unchanged(other)


def _adapter_state(model):
    """Per adapted layer: the adapters each of its per-adapter tables holds, and what is merged / active."""
    return [
        (name, {attr: sorted(getattr(module, attr)) for attr in module.adapter_layer_names + module.other_param_names},
         list(module.merged_adapters), list(module.active_adapters))
        for name, module in model.named_modules() if isinstance(module, hh_peft.HouseholderLayer)
    ]


@pytest.mark.parametrize("breakage", ["truncated weights", "lora_rank edited to 0", "unknown peft_type", "target_modules edited", "other base model"])
def test_load_adapter_failure_leaves_the_existing_adapters_intact(tmp_path, saved, breakage, model_state):
    folder, _ = saved
    if breakage == "other base model":
        folder = tmp_path / "other-base"
        adapted(make_base(width=20)).save_pretrained(folder)
    else:
        BROKEN_FOLDERS[breakage][0](folder)
    model = adapted(make_base(), seed=5).train()
    before = model_state(model, X)
    adapters_before = (dict(model.peft_config), model.active_adapters, _adapter_state(model))
    with pytest.raises(ValueError):
        model.load_adapter(folder, adapter_name="other")
    model.eval()
    before.assert_unchanged(model)
    assert (dict(model.peft_config), model.active_adapters, _adapter_state(model)) == adapters_before


def test_an_adapter_saved_without_a_digest_still_loads(saved):
    """Files written by PEFT's own save (or before digests) have no hta_sha256: their tensors are not checked."""
    folder, expected = saved
    path = folder / "adapter_model.safetensors"
    save_file(load_file(path), path, metadata={"format": "pt"})
    assert torch.equal(output(PeftModel.from_pretrained(make_base(), folder)), expected)


def test_a_non_hta_folder_keeps_peft_errors(tmp_path):
    """A LoRA folder is PEFT's business: a broken one raises PEFT's own error, not ours."""
    lora = get_peft_model(make_base(), LoraConfig(target_modules=["lin0"]))
    lora.save_pretrained(tmp_path / "lora")
    (tmp_path / "lora" / "adapter_config.json").write_text("")
    with pytest.raises(json.JSONDecodeError):
        PeftModel.from_pretrained(make_base(), tmp_path / "lora")


def test_a_mount_point_folder_gets_its_files_replaced_one_by_one(saved, monkeypatch):
    """A mount point cannot be renamed: each file is replaced atomically, with a warning that the folder is not."""
    folder, _ = saved
    real_ismount = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda path: os.fspath(path) == os.path.realpath(folder) or real_ismount(path))
    model = adapted(make_base(), seed=2)
    (folder / "notes.txt").write_text("mine")
    with pytest.warns(UserWarning, match="is a mount point, so the folder cannot be replaced in one step"):
        model.save_pretrained(folder)
    assert (folder / "notes.txt").read_text() == "mine" and siblings(folder) == []
    assert torch.equal(output(PeftModel.from_pretrained(make_base(), folder)), output(model))


@pytest.mark.parametrize("entry", ["from_pretrained", "load_adapter"])
def test_a_config_targeting_layers_the_file_has_no_tensors_for_is_refused(tmp_path, entry, model_state):
    """PEFT only warns about missing adapter keys and keeps those layers' fresh (here random) initialisation."""
    folder = tmp_path / "lin0-only"
    adapted(make_base(), target_modules=["lin0"]).save_pretrained(folder)
    _edit_config(target_modules=["lin0", "lin1"])(folder)
    model = make_base() if entry == "from_pretrained" else adapted(make_base(), seed=5)
    before = model_state(model, X)
    with pytest.raises(ValueError, match=r"no saved tensors for 1 layer\(s\) its config targets, e.g. 'lin1' .*hta_"):
        if entry == "from_pretrained":
            PeftModel.from_pretrained(model, folder)
        else:
            model.load_adapter(folder, adapter_name="other")
    before.assert_unchanged(model)


def test_a_save_with_is_main_process_false_writes_nothing(tmp_path):
    adapted(make_base()).save_pretrained(tmp_path / "adapter", is_main_process=False)
    assert not (tmp_path / "adapter" / "adapter_model.safetensors").exists() and siblings(tmp_path / "adapter") == []


SIGNAL_DURING_SAVE = """
import os, signal, sys, threading
import torch, safetensors.torch
import hh_peft
from peft import get_peft_model

folder, signum = sys.argv[1], getattr(signal, sys.argv[2])
# the handlers of an interactive Python (a background command of a shell without job control inherits SIGINT ignored)
signal.signal(signal.SIGINT, signal.default_int_handler)
signal.signal(signal.SIGTERM, signal.SIG_DFL)
torch.manual_seed(0)
model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(6, 6)),
                       hh_peft.HouseholderConfig(target_modules=["0"], init_weights=False))
write = safetensors.torch.save_file

def write_after_a_signal(*args, **kwargs):
    # the signal arrives in the middle of PEFT's save, sent from another thread (any thread may receive it)
    sender = threading.Thread(target=os.kill, args=(os.getpid(), signum))
    sender.start()
    sender.join()
    write(*args, **kwargs)
    print("written", flush=True)

safetensors.torch.save_file = write_after_a_signal
try:
    model.save_pretrained(folder)
except KeyboardInterrupt:
    print("KeyboardInterrupt", flush=True)
    sys.exit(3)
print("returned", flush=True)
"""


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_a_signal_during_a_save_takes_effect_once_the_save_has_finished(tmp_path, signame):
    """Ctrl-C or SIGTERM mid-save: the save completes, then KeyboardInterrupt (SIGINT) or the default SIGTERM action,
    never a half-written folder nor a KeyboardInterrupt turned into another error inside the save."""
    folder = tmp_path / "adapter"
    proc = subprocess.run([sys.executable, "-c", SIGNAL_DURING_SAVE, str(folder), signame], capture_output=True,
                          text=True, timeout=300)
    if signame == "SIGINT":
        assert proc.returncode == 3 and proc.stdout.splitlines()[-2:] == ["written", "KeyboardInterrupt"], proc
    else:
        assert proc.returncode == -signal.SIGTERM and proc.stdout.splitlines()[-1] == "written", proc
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temporary sibling left
    assert hh_peft.loading.check_adapter_folder(str(folder))


# ------------------------------------------------------------------------------------------------ other methods
_LORA_ROUND_TRIP = r"""
import hashlib, json, os, sys
import torch
from torch import nn
from peft import LoraConfig, PeftModel, get_peft_model

mode, root = sys.argv[1], sys.argv[2]
if mode == "imported":
    import hh_peft  # noqa: F401

def base():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))

for name, seed in (("first", 1), ("second", 2)):
    torch.manual_seed(seed)
    get_peft_model(base(), LoraConfig(r=2, target_modules=["0", "2"], init_lora_weights=False)).save_pretrained(
        os.path.join(root, name))

entered = set()
def profile(frame, event, arg):
    if event == "call":
        path = frame.f_code.co_filename
        if "hh_peft" in path.split(os.sep)[-2:-1] or path.endswith("_hh_peft_autoload.py"):
            entered.add(frame.f_code.co_qualname)

x = torch.randn(5, 8, generator=torch.Generator().manual_seed(3))
sys.setprofile(profile)
model = PeftModel.from_pretrained(base(), os.path.join(root, "first"))
model.load_adapter(os.path.join(root, "second"), adapter_name="second")
model.set_adapter("second")
with torch.no_grad():
    y = model(x)
model.save_pretrained(os.path.join(root, "saved"), selected_adapters=["default", "second"])
sys.setprofile(None)

files = {}
for folder, _, names in os.walk(os.path.join(root, "saved")):
    for name in names:
        path = os.path.join(folder, name)
        files[os.path.relpath(path, root)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
print(json.dumps({"hh_peft_imported": "hh_peft" in sys.modules, "entered": sorted(entered),
                  "output": y.tolist(), "files": files}))
"""

# What a LoRA load, forward and save may run of hh_peft: the wrappers of hh_peft/peft_patches.py and the one read
# of adapter_config.json that tells them the folder is not HTA. Nothing that copies, walks or checks a model.
_TRIVIAL_FOR_OTHER_METHODS = {
    "install.<locals>.from_pretrained", "install.<locals>.load_adapter", "install.<locals>.save_pretrained",
    "install.<locals>.create_or_update_model_card", "_from_pretrained", "local_adapter_folder",
    "check_adapter_folder", "read_config", "has_hta_adapter", "hta_only",
    "has_hta_adapter.<locals>.<genexpr>", "hta_only.<locals>.<genexpr>",  # their any() / all() over peft_config
}


@pytest.mark.slow
def test_a_lora_load_and_save_run_peft_code_only_with_or_without_the_start_up_hook(tmp_path):
    """A LoRA user with hh-peft installed (the start-up hook imports it with peft, or they import it) gets the
    outputs and the byte-identical saved folder of a process where hh_peft is never imported, and enters only the
    trivial wrappers on the way."""
    results = {}
    for mode, autoload in (("never imported", "0"), ("start-up hook", "1"), ("imported", "0")):
        root = tmp_path / mode.replace(" ", "-")
        root.mkdir()
        # one hash seed: PEFT writes target_modules, a set, in its iteration order
        env = {**os.environ, "HH_PEFT_AUTOLOAD": autoload, "HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": "0"}
        run = subprocess.run([sys.executable, "-c", _LORA_ROUND_TRIP, mode, str(root)], env=env, capture_output=True,
                             text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        results[mode] = json.loads(run.stdout.strip().splitlines()[-1])
    assert not results["never imported"]["hh_peft_imported"]
    assert results["never imported"]["entered"] == []
    for mode in ("start-up hook", "imported"):
        assert results[mode]["hh_peft_imported"], mode
        entered = set(results[mode]["entered"])
        assert entered <= _TRIVIAL_FOR_OTHER_METHODS, (mode, sorted(entered - _TRIVIAL_FOR_OTHER_METHODS))
        assert results[mode]["output"] == results["never imported"]["output"], mode
        assert results[mode]["files"] == results["never imported"]["files"], mode
