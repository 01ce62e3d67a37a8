"""Everything about reading a saved HTA adapter back: its key format, its digest, and the checks made before and
while PEFT loads it.

**Key format.** PEFT saves an HTA layer's tensors as ``<prefix><module path>.hta_<name>`` with ``<name>`` one of
:data:`HTA_TENSOR_NAMES` and ``<prefix>`` :data:`SAVED_PREFIX` for a `PeftModel` (none for adapters injected into a
transformers model); inside a model the adapter name follows: ``<module path>.hta_<name>.<adapter>``.
:data:`HTA_KEY` matches both forms.

**Checks** (all raise a ``ValueError`` that names the file, the layer and what would be valid):

* :func:`check_adapter_folder`, before anything is injected: the config is JSON with ``"peft_type": "HTA"`` and
  valid values; the weights file is a complete safetensors file whose digest (:data:`DIGEST_KEY`, written on save)
  matches; every adapted layer has its tensors with consistent shapes and the config's ``lora_rank``;
* :func:`check_state_dict_fits_model`, when PEFT maps the file onto the model (`HouseholderModel` calls it from
  ``_remap_adapter_state_dict_for_load``): every tensor has the shape of its place in the model, and every HTA
  tensor has a place (an adapter saved for another base model, or with another config, is refused);
* :func:`check_every_layer_loaded`, after PEFT has copied the tensors: no targeted layer kept its fresh
  initialisation for want of saved tensors (PEFT only warns).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from typing import Optional

import torch
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME, PeftType

from .registration import HTA_PEFT_TYPE

# Saved keys of a PeftModel start with this (the PeftModel's ``base_model`` and the tuner's ``model``).
SAVED_PREFIX = "base_model.model."
HTA_TENSOR_NAMES = ("u_in", "u_out", "d", "A", "B")
# "<module>.hta_<name>" as saved, or "<module>.hta_<name>.<adapter>" inside a model.
HTA_KEY = re.compile(r"^(?P<module>.+)\.hta_(?P<name>u_in|u_out|d|A|B)(?:\.(?P<adapter>[^.]+))?$")
# safetensors metadata entry: sha256 of every tensor (name, dtype, shape, bytes), checked on load.
DIGEST_KEY = "hta_sha256"


def hta_layer_of(key: str) -> Optional[str]:
    """The module path of the HTA layer an (in-model or saved) key belongs to, without :data:`SAVED_PREFIX`; None
    for a key that is not an HTA tensor."""
    match = HTA_KEY.match(key)
    return match["module"].removeprefix(SAVED_PREFIX) if match else None


# ----------------------------------------------------------------------------------------------------------------
# The digest of the weights file
# ----------------------------------------------------------------------------------------------------------------
def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors in name order, each as ``name|dtype|shape`` then its raw bytes."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


def add_digest(path: str) -> None:
    """Rewrite the safetensors file ``path`` with :func:`tensors_digest` of its tensors in the metadata."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(path, "pt") as handle:
        metadata = dict(handle.metadata() or {})
    tensors = load_file(path)
    metadata[DIGEST_KEY] = tensors_digest(tensors)
    save_file(tensors, path, metadata=metadata)


# ----------------------------------------------------------------------------------------------------------------
# Before injection: the folder
# ----------------------------------------------------------------------------------------------------------------
def read_config(path: str) -> tuple[Optional[dict], Optional[str]]:
    """(the JSON object in ``path``, None) or (None, what is wrong with the file)."""
    if not os.path.isfile(path):
        return None, "the file is missing"
    with open(path, "rb") as handle:
        raw = handle.read()
    if not raw.strip():
        return None, "the file is empty"
    try:
        loaded = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        return None, f"the file is not valid JSON ({error})"
    if not isinstance(loaded, dict):
        return None, f"the file holds a JSON {type(loaded).__name__}, not an object"
    return loaded, None


def read_safetensors_header(path: str) -> tuple[Optional[dict], Optional[str]]:
    """(the safetensors header of ``path``, None) or (None, what is wrong). Format: 8 bytes little-endian header
    length ``n``, ``n`` bytes of JSON, then the data; a header that parses tells the tensor names even when the data
    is cut short."""
    if not os.path.isfile(path):
        return None, "the file is missing"
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        if size < 8:
            return None, f"the file is truncated ({size} bytes, shorter than a safetensors header)"
        (length,) = struct.unpack("<Q", handle.read(8))
        if length > size - 8:
            return None, f"the file is truncated or not a safetensors file (header of {length} bytes, file of {size})"
        try:
            header = json.loads(handle.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            return None, f"the file is corrupted or not a safetensors file (unreadable header: {error})"
    if not isinstance(header, dict):
        return None, "the file is corrupted (its header is not a JSON object)"
    return header, None


def _hta_keys(header: Optional[dict]) -> list[str]:
    return [key for key in (header or {}) if HTA_KEY.match(key)]


def check_tensor_shapes(tensors: dict[str, torch.Tensor], lora_rank: int, config_path: str, weights_path: str) -> None:
    """Every adapted layer holds ``u_in`` (in), ``u_out`` (out), ``d`` (min(in, out)) and, when ``lora_rank`` > 0,
    ``A`` (lora_rank, in) and ``B`` (out, lora_rank)."""
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = HTA_KEY.match(key)
        if match:
            layers.setdefault(match["module"], {})[match["name"]] = tensor
    if not layers:
        raise ValueError(f"{weights_path} holds no HTA tensors (no '.hta_' keys), but {config_path} says HTA")
    for module, found in layers.items():
        missing = [name for name in ("u_in", "u_out", "d") if name not in found]
        if missing:
            raise ValueError(f"{weights_path} is incomplete: layer {module} lacks {', '.join('hta_' + n for n in missing)}")
        u_in, u_out, d = found["u_in"], found["u_out"], found["d"]
        if u_in.dim() != 1 or u_out.dim() != 1:
            raise ValueError(f"{weights_path}: {module}.hta_u_in / hta_u_out must be vectors, got shapes "
                             f"{tuple(u_in.shape)} and {tuple(u_out.shape)}")
        n_in, n_out = u_in.numel(), u_out.numel()
        if tuple(d.shape) != (min(n_in, n_out),):
            raise ValueError(f"{weights_path}: {module}.hta_d has shape {tuple(d.shape)}, expected ({min(n_in, n_out)},) "
                             f"for a layer of {n_in} inputs and {n_out} outputs")
        has_low_rank = "A" in found or "B" in found
        if lora_rank == 0 and has_low_rank:
            saved = found["A"].shape[0] if "A" in found else found["B"].shape[-1]
            raise ValueError(
                f"{config_path} says lora_rank 0, but {weights_path} holds {module}.hta_A / hta_B, saved with "
                f"lora_rank {saved}: the config and the weights belong to different adapters (or the config was edited)"
            )
        if lora_rank > 0:
            if "A" not in found or "B" not in found:
                raise ValueError(
                    f"{config_path} says lora_rank {lora_rank}, but {weights_path} has no {module}.hta_A / hta_B "
                    "(saved with lora_rank 0): the config and the weights belong to different adapters"
                )
            A, B = found["A"], found["B"]
            if tuple(A.shape) != (lora_rank, n_in) or tuple(B.shape) != (n_out, lora_rank):
                raise ValueError(
                    f"{config_path} says lora_rank {lora_rank}, but in {weights_path} {module}.hta_A has shape "
                    f"{tuple(A.shape)} and hta_B {tuple(B.shape)} (expected ({lora_rank}, {n_in}) and "
                    f"({n_out}, {lora_rank})): the config and the weights belong to different adapters"
                )


def check_adapter_folder(folder: str, config=None) -> bool:
    """Check the adapter saved in ``folder`` before anything is injected; True if it is an HTA adapter (its config
    says HTA, or has no readable ``peft_type`` but its tensors are HTA's), False otherwise (PEFT's own code path,
    unchecked here).

    ``config``: the config the caller passed instead of the folder's ``adapter_config.json``.
    Raises a ``ValueError`` that names the file and the problem.
    """
    from .config import HouseholderConfig

    config_path = os.path.join(folder, CONFIG_NAME)
    weights_path = os.path.join(folder, SAFETENSORS_WEIGHTS_NAME)
    if config is not None:
        if config.peft_type != HTA_PEFT_TYPE:
            return False
    else:
        loaded, config_problem = read_config(config_path)
        peft_type = (loaded or {}).get("peft_type")
        if peft_type is not None and peft_type != HTA_PEFT_TYPE and peft_type in PeftType.__members__:
            return False  # another PEFT method's folder: PEFT's own checks and errors apply
        header, _ = read_safetensors_header(weights_path)
        if peft_type != HTA_PEFT_TYPE and not _hta_keys(header):
            return False  # not ours (or not decidable)
        if config_problem:
            raise ValueError(f"Cannot load the HTA adapter in {folder}: {config_path}: {config_problem}")
        if peft_type is None:
            raise ValueError(
                f'{config_path} has no "peft_type"; the tensors in {weights_path} are HTA\'s (".hta_" keys): '
                'add "peft_type": "HTA"'
            )
        if peft_type != HTA_PEFT_TYPE:
            raise ValueError(
                f"{config_path} says peft_type {peft_type!r}, but {weights_path} holds HTA tensors "
                f"(e.g. {_hta_keys(header)[0]!r}); the config and the weights belong to different adapters "
                '(an HTA adapter has "peft_type": "HTA")'
            )
        try:
            config = HouseholderConfig.from_pretrained(folder)
        except (ValueError, TypeError) as error:
            raise ValueError(f"{config_path} holds an invalid HTA config: {error}") from error
    header, header_problem = read_safetensors_header(weights_path)
    if header_problem == "the file is missing" and os.path.isfile(os.path.join(folder, WEIGHTS_NAME)):
        return True  # a pickled adapter_model.bin: PEFT loads it; nothing to check before
    if header_problem:
        raise ValueError(f"Cannot load the HTA adapter in {folder}: {weights_path}: {header_problem}")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(weights_path)
    except SafetensorError as error:
        raise ValueError(f"Cannot load the HTA adapter in {folder}: {weights_path} is truncated or corrupted ({error})") from error
    recorded = (header.get("__metadata__") or {}).get(DIGEST_KEY)
    if recorded is not None and tensors_digest(tensors) != recorded:
        raise ValueError(
            f"Cannot load the HTA adapter in {folder}: {weights_path} is corrupted: its tensors do not match the "
            f"{DIGEST_KEY} digest recorded when it was saved"
        )
    check_tensor_shapes(tensors, config.lora_rank, config_path, weights_path)
    return True


# ----------------------------------------------------------------------------------------------------------------
# During and after PEFT's load
# ----------------------------------------------------------------------------------------------------------------
def check_state_dict_fits_model(model: torch.nn.Module, config, adapter_name: str, state_dict: dict) -> None:
    """Every entry of ``state_dict`` (keys as PEFT maps them onto ``model``) has the shape of its place in the
    model, and every HTA tensor has a place. Names the first offender and what the model holds instead."""
    own = model.state_dict()
    strip = not any(k.startswith(SAVED_PREFIX) for k in own)
    mismatches, unplaced = [], []
    for key, value in state_dict.items():
        model_key = key.removeprefix(SAVED_PREFIX) if strip else key
        if model_key in own and own[model_key].shape != value.shape:
            mismatches.append((model_key, tuple(value.shape), tuple(own[model_key].shape)))
        elif model_key not in own and HTA_KEY.match(key):
            unplaced.append(key.removeprefix(SAVED_PREFIX))
    if mismatches:
        key, saved, here = mismatches[0]
        raise ValueError(
            f"The HTA adapter {adapter_name!r} was saved for a different base model: "
            f"{key.removeprefix(SAVED_PREFIX)} has shape {saved} in the checkpoint but {here} in this model "
            f"({len(mismatches)} mismatching tensor(s) in all). Load it onto the base model it was trained on."
        )
    if unplaced:
        targets = config.target_modules
        described = f"(regex {targets!r})" if isinstance(targets, str) else str(sorted(targets or []))
        raise ValueError(
            f"The HTA adapter {adapter_name!r} has {len(unplaced)} saved tensor(s) with no place in the model under "
            f"its config (lora_rank={config.lora_rank}, target_modules={described}), e.g. {unplaced[0]!r}: the "
            "config and the weights do not belong together."
        )


def check_every_layer_loaded(peft_model, adapter_name: str, load_result, model_id) -> None:
    """An HTA layer the config targets but the file has no tensors for would keep its fresh initialisation (PEFT
    only warns): refuse it, since the config and the weights then belong to different adapters."""
    if getattr(peft_model.peft_config.get(adapter_name), "peft_type", None) != HTA_PEFT_TYPE:
        return
    missing = [key for key in load_result.missing_keys if HTA_KEY.match(key)]
    if missing:
        layers = sorted({hta_layer_of(key) for key in missing})
        raise ValueError(
            f"The HTA adapter in {model_id} has no saved tensors for {len(layers)} layer(s) its config targets, e.g. "
            f"{layers[0]!r} (missing {missing[0]!r}): the config and the weights belong to different adapters"
        )
