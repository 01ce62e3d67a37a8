"""Every method of PEFT that hh_peft wraps, in one place, and why each is needed.

Written against peft 0.21 (tested with 0.21.2) and transformers 5.23. PEFT offers tuner extension points
(``BaseTuner``, ``BaseTunerLayer``, ``register_peft_method``) that hh_peft uses for everything about the method
itself; it has none for how a `PeftModel` saves, loads or describes an adapter, so these five methods of
``peft.PeftModel`` are wrapped by :func:`install` (``import hh_peft`` calls it; idempotent):

============================  ===============================================================================
``save_pretrained``           replaced, for a model whose adapters are all HTA, by PEFT's own ``save_pretrained``
                              into a temporary folder swapped in whole (`hh_peft.atomic_folder`), with a digest of
                              the tensors in the safetensors metadata (`hh_peft.loading`)
``from_pretrained``           checks an HTA folder before anything is injected; restores the model when the load
                              of an HTA adapter fails after injection (`hh_peft.rollback`)
``load_adapter``              the same for a further adapter of an HTA model, and refuses a file that leaves a
                              targeted layer without saved tensors
``create_or_update_model_card``  writes the HTA card instead of PEFT's generic one (`hh_peft.card`)
``_upload_modified_files``    (transformers' last step of ``push_to_hub``) writes the HTA card over transformers'
============================  ===============================================================================

**Other methods are untouched.** Each wrapper first asks the cheapest question that settles whether HTA is
involved (the model's ``peft_config`` types; for a load onto a plain model, the ``peft_type`` in the folder's
``adapter_config.json``), and hands every other call to PEFT's method as it came. A LoRA model's save, load, card
and upload run PEFT's code only (``tests/hh_peft/test_peft_patches.py`` counts the hh_peft functions they enter).
"""

from __future__ import annotations

import functools
import inspect
import os
from typing import Optional

from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME

from . import atomic_folder, card, loading, rollback
from .registration import HTA_PEFT_TYPE

CARD_FILE = "README.md"
# The hidden siblings of an adapter folder being saved: ".<name>.hta-tmp-<pid>-<hex>" / ".<name>.hta-old-...".
ADAPTER_FOLDER_TAGS = atomic_folder.FolderTags(".hta-")


def has_hta_adapter(peft_model) -> bool:
    """True when any adapter of ``peft_model`` is HTA (PEFT refuses to mix types in one `PeftModel`, so then all are)."""
    configs = getattr(peft_model, "peft_config", None) or {}
    return any(getattr(config, "peft_type", None) == HTA_PEFT_TYPE for config in configs.values())


def hta_only(peft_model) -> bool:
    """True when ``peft_model`` has adapters and all of them are HTA."""
    configs = getattr(peft_model, "peft_config", None) or {}
    return bool(configs) and all(getattr(c, "peft_type", None) == HTA_PEFT_TYPE for c in configs.values())


# ----------------------------------------------------------------------------------------------------------------
# save_pretrained
# ----------------------------------------------------------------------------------------------------------------
def atomic_save_pretrained(original, peft_model, save_directory, *args, **kwargs) -> None:
    """PEFT's ``save_pretrained`` (``original``) into a temporary sibling folder, each weights file given its
    digest, then swapped in whole. The existing card is carried over (PEFT updates a card rather than replacing it);
    other files of the old folder are kept; on a mount point the config is replaced last."""
    if os.path.isfile(save_directory):
        raise ValueError(f"Provided path ({save_directory}) should be a directory, not a file")

    def write(folder: str) -> None:
        original(peft_model, folder, *args, **kwargs)
        for subfolder, _, names in os.walk(folder):
            if SAFETENSORS_WEIGHTS_NAME in names:
                loading.add_digest(os.path.join(subfolder, SAFETENSORS_WEIGHTS_NAME))

    atomic_folder.write_folder_atomically(
        save_directory, write, ADAPTER_FOLDER_TAGS, carry_over=(CARD_FILE,), write_last=(CONFIG_NAME,)
    )


# ----------------------------------------------------------------------------------------------------------------
# from_pretrained and load_adapter
# ----------------------------------------------------------------------------------------------------------------
def local_adapter_folder(model_id, subfolder: Optional[str]) -> Optional[str]:
    """The local folder ``model_id`` (plus ``subfolder``) names, or None (a Hub id). A missing folder whose HTA save
    was killed between the two renames of the fallback swap is put back first (`hh_peft.atomic_folder.recover`)."""
    if not isinstance(model_id, (str, os.PathLike)):
        return None
    folder = os.path.join(model_id, subfolder) if subfolder else os.fspath(model_id)
    if os.path.isdir(folder):
        return folder
    parent = os.path.dirname(os.path.abspath(folder))
    if os.path.isdir(parent) and any(n.startswith(f".{os.path.basename(folder)}{ADAPTER_FOLDER_TAGS.old}") for n in os.listdir(parent)):
        atomic_folder.recover(folder, ADAPTER_FOLDER_TAGS)
    return folder if os.path.isdir(folder) else None


def _from_pretrained(original, cls, model, model_id, *args, **kwargs):
    config = kwargs.get("config")
    if config is None and len(args) >= 3:  # (adapter_name, is_trainable, config, ...)
        config = args[2]
    if config is not None and config.peft_type != HTA_PEFT_TYPE:
        return original(cls, model, model_id, *args, **kwargs)
    folder = local_adapter_folder(model_id, kwargs.get("subfolder"))
    if folder is not None and not loading.check_adapter_folder(folder, config):
        return original(cls, model, model_id, *args, **kwargs)  # the folder's config names another method
    # a Hub id, or an HTA folder (checked): HTA's inject_adapter records the model as it was
    # (rollback.record_before_change), restored if the load fails
    with rollback.rollback_on_failure():
        return original(cls, model, model_id, *args, **kwargs)


def _load_adapter(original, peft_model, *args, **kwargs):
    bound = inspect.signature(original).bind(peft_model, *args, **kwargs)
    arguments = {**bound.arguments, **bound.arguments.get("kwargs", {})}
    adapter_name, model_id = arguments["adapter_name"], arguments["model_id"]
    if rollback.guarded():  # inside our from_pretrained: checked before, and rolled back on failure, there
        result = original(peft_model, *args, **kwargs)
        loading.check_every_layer_loaded(peft_model, adapter_name, result, model_id)
        return result
    folder = local_adapter_folder(model_id, arguments.get("subfolder"))
    existing = peft_model.peft_config.get(adapter_name)
    if folder is not None:
        loading.check_adapter_folder(folder, existing)
    overwritten = ()
    if existing is not None:  # PEFT loads into the existing adapter's parameters
        overwritten = tuple(p for n, p in peft_model.named_parameters() if n.endswith(f".{adapter_name}") or f".{adapter_name}." in n)
    with rollback.rollback_on_failure() as pending:
        pending.record(peft_model, overwritten)
        result = original(peft_model, *args, **kwargs)
        loading.check_every_layer_loaded(peft_model, adapter_name, result, model_id)
        return result


# ----------------------------------------------------------------------------------------------------------------
# Installing the wrappers
# ----------------------------------------------------------------------------------------------------------------
def install() -> None:
    """Wrap the five ``PeftModel`` methods of the module docstring. Idempotent."""
    from peft import PeftModel

    if getattr(PeftModel, "_hh_peft_patches", False):
        return
    original_save = PeftModel.save_pretrained
    original_from_pretrained = PeftModel.from_pretrained.__func__
    original_load_adapter = PeftModel.load_adapter
    original_card = PeftModel.create_or_update_model_card
    original_upload = PeftModel._upload_modified_files
    save_signature = inspect.signature(original_save)

    @functools.wraps(original_save)
    def save_pretrained(self, *args, **kwargs):
        if not hta_only(self) or not save_signature.bind(self, *args, **kwargs).arguments.get("is_main_process", True):
            return original_save(self, *args, **kwargs)
        return atomic_save_pretrained(original_save, self, *args, **kwargs)

    @functools.wraps(original_from_pretrained)
    def from_pretrained(cls, model, model_id, *args, **kwargs):
        return _from_pretrained(original_from_pretrained, cls, model, model_id, *args, **kwargs)

    @functools.wraps(original_load_adapter)
    def load_adapter(self, *args, **kwargs):
        if not has_hta_adapter(self):  # PEFT refuses an HTA adapter into a model of another method itself
            return original_load_adapter(self, *args, **kwargs)
        return _load_adapter(original_load_adapter, self, *args, **kwargs)

    @functools.wraps(original_card)
    def create_or_update_model_card(self, output_dir: str):
        if not hta_only(self):
            return original_card(self, output_dir)
        card.write_card_on_save(self, output_dir)

    @functools.wraps(original_upload)
    def _upload_modified_files(self, working_dir, repo_id, *args, **kwargs):
        if hta_only(self):
            card.write_card_before_upload(self, working_dir, repo_id)
        return original_upload(self, working_dir, repo_id, *args, **kwargs)

    PeftModel.save_pretrained = save_pretrained
    PeftModel.from_pretrained = classmethod(from_pretrained)
    PeftModel.load_adapter = load_adapter
    PeftModel.create_or_update_model_card = create_or_update_model_card
    PeftModel._upload_modified_files = _upload_modified_files
    PeftModel._hh_peft_patches = True
