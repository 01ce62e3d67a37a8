"""Hot-swapping HTA adapters: replace a loaded adapter's tensors in place with those of another saved adapter.

PEFT's ``peft.utils.hotswap.hotswap_adapter`` is written for LoRA (it reads LoRA's ranks and scalings). This is the
same operation for HTA: the adapter keeps its name, its modules and its parameter objects, and only their values
change (``Tensor.copy_``), so a ``torch.compile``d model runs the new adapter without recompiling.

What may differ between the two adapters is what the tensors hold, within the loaded adapter's shapes:

* a smaller ``lora_rank``: ``A`` and ``B`` are zero-padded (``[B, 0] [A; 0] = B A``, exact);
* fewer adapted layers: the layers the new adapter lacks get all their HTA tensors zeroed, which is exactly no
  update (``H(0) = I`` and ``D = 0``, ``B = 0``).

Everything else that shapes the output must match (the Householder form, ``eps``, dropout, ``fan_in_fan_out``,
``modules_to_save``); a mismatch, an adapted layer the loaded model lacks or a larger rank raises before any tensor
is written, so a refused swap leaves the model as it was.
"""

from __future__ import annotations

import torch
from peft import PeftConfig
from peft.utils import infer_device
from peft.utils.other import ModulesToSaveWrapper
from peft.utils.save_and_load import load_peft_weights
from torch import nn

from .config import HouseholderConfig
from .layer import HouseholderLayer
from .loading import SAVED_PREFIX

# Config fields that change the output beyond what the saved tensors hold.
# block_layout: two adapters of the same shapes may place their blocks differently (adapted_blocks [0, 2] vs [1, 2]).
CONFIG_FIELDS_TO_MATCH = ("householder", "eps", "dropout", "fan_in_fan_out", "rectangular", "block_layout")


def hotswap_adapter(
    model: nn.Module, model_name_or_path: str, adapter_name: str = "default", torch_device: str | None = None, **kwargs
) -> None:
    """Replace the values of the loaded HTA adapter ``adapter_name`` of ``model`` (a `PeftModel`, or a transformers
    model with the adapter from ``load_adapter``; possibly ``torch.compile``d) by those of the HTA adapter saved at
    ``model_name_or_path`` (a folder or a Hub repo id), in place. ``kwargs`` (``subfolder``, ``revision``,
    ``token``, ...) go to the config and weight loading, as in ``PeftModel.from_pretrained``.

    ```py
    >>> model = torch.compile(PeftModel.from_pretrained(base, "adapter-0"))
    >>> hh_peft.hotswap_adapter(model, "adapter-1", adapter_name="default")  # no recompilation
    ```
    """
    peft_model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper keeps the module as _orig_mod
    if adapter_name not in getattr(peft_model, "peft_config", {}):
        raise ValueError(
            f"No adapter {adapter_name!r} to hot-swap in {type(peft_model).__name__}; loaded adapters: "
            f"{sorted(getattr(peft_model, 'peft_config', {}))}"
        )
    hf_kwargs = {key: kwargs[key] for key in ("subfolder", "revision", "cache_dir", "token") if key in kwargs}
    config = PeftConfig.from_pretrained(model_name_or_path, **hf_kwargs)
    state_dict = load_peft_weights(model_name_or_path, device=torch_device or infer_device(), **kwargs)
    hotswap_adapter_from_state_dict(peft_model, state_dict, adapter_name, config)


def hotswap_adapter_from_state_dict(
    model: nn.Module, state_dict: dict[str, torch.Tensor], adapter_name: str, config: PeftConfig
) -> None:
    """Copy an HTA adapter's saved ``state_dict`` (keys as in ``adapter_model.safetensors``: no adapter name) into the
    loaded adapter ``adapter_name`` of ``model`` (a `PeftModel` or a model with injected adapters), in place; all
    checks come before the first copy."""
    loaded = model.peft_config[adapter_name]
    _check_configs(loaded, config, adapter_name)
    layers = {name: module for name, module in model.named_modules() if isinstance(module, HouseholderLayer)}
    if any(adapter_name in layer.merged_adapters for layer in layers.values()):
        raise ValueError(
            f"Cannot hot-swap adapter {adapter_name!r} while it is merged into the base weights (unmerging afterwards "
            "would subtract the new adapter's update); call `unmerge_adapter()` first"
        )
    wrappers = {name: module for name, module in model.named_modules() if isinstance(module, ModulesToSaveWrapper)}
    if not any(name.startswith(SAVED_PREFIX) for name in [*layers, *wrappers]):
        # adapters injected into the model itself (transformers' `load_adapter`): no PeftModel prefix in module names
        state_dict = {key.removeprefix(SAVED_PREFIX): value for key, value in state_dict.items()}
    copies: list[tuple[torch.Tensor, torch.Tensor]] = []
    covered: set[tuple[str, str]] = set()
    unexpected = []
    for key, value in state_dict.items():
        module_name, _, tensor_name = key.rpartition(".")
        if tensor_name in HouseholderLayer.adapter_layer_names:
            layer = layers.get(module_name)
            if layer is None or adapter_name not in getattr(layer, tensor_name):
                unexpected.append(key)
                continue
            target = getattr(layer, tensor_name)[adapter_name]
            copies.append((target, _fit(value, target, key, tensor_name)))
            covered.add((module_name, tensor_name))
            continue
        target = _modules_to_save_tensor(wrappers, key, adapter_name)
        if target is None:
            unexpected.append(key)
            continue
        copies.append((target, _fit(value, target, key, None)))
    if unexpected:
        raise ValueError(
            f"Cannot hot-swap: the new adapter has {len(unexpected)} tensor(s) the loaded adapter {adapter_name!r} "
            "lacks (it adapts other layers, or has a B A term where the loaded one has lora_rank=0), e.g. "
            f"{unexpected[:3]}. Hot-swapping keeps the modules; load the new adapter with `PeftModel.load_adapter` "
            "instead."
        )
    zeroed = [
        getattr(layer, tensor_name)[adapter_name]
        for module_name, layer in layers.items()
        for tensor_name in HouseholderLayer.adapter_layer_names
        if adapter_name in getattr(layer, tensor_name) and (module_name, tensor_name) not in covered
    ]
    with torch.no_grad():
        for target, value in copies:
            target.copy_(value)
        for target in zeroed:
            target.zero_()


def _modules_to_save_tensor(
    wrappers: dict[str, ModulesToSaveWrapper], key: str, adapter_name: str
) -> torch.Tensor | None:
    """The tensor of ``adapter_name``'s trained copy that the saved ``key`` (``<wrapped module>.<tensor path>``)
    holds."""
    for name, wrapper in wrappers.items():
        if key.startswith(f"{name}.") and adapter_name in wrapper.modules_to_save:
            copy = wrapper.modules_to_save[adapter_name]
            tensors = dict(copy.named_parameters()) | dict(copy.named_buffers())
            return tensors.get(key.removeprefix(f"{name}."))
    return None


def _fit(value: torch.Tensor, target: torch.Tensor, key: str, tensor_name: str | None) -> torch.Tensor:
    """``value`` in ``target``'s shape: equal shapes as they are; a smaller ``lora_rank`` zero-padded (``hta_A``
    (r, in) along rows, ``hta_B`` (out, r) along columns); anything else refused."""
    if value.shape == target.shape:
        return value
    padded_dim = {"hta_A": 0, "hta_B": 1}.get(tensor_name)
    other = 1 - padded_dim if padded_dim is not None else None
    if (
        padded_dim is not None
        and value.dim() == 2
        and value.shape[other] == target.shape[other]
        and value.shape[padded_dim] < target.shape[padded_dim]
    ):
        padded = value.new_zeros(target.shape)
        padded.narrow(padded_dim, 0, value.shape[padded_dim]).copy_(value)
        return padded
    hint = " (hot-swapping needs a lora_rank no larger than the loaded adapter's: load the largest-rank adapter first)"
    raise ValueError(
        f"Cannot hot-swap {key}: shape {tuple(value.shape)} in the new adapter, {tuple(target.shape)} in the loaded "
        f"one{hint if padded_dim is not None else ''}. The model was left unchanged."
    )


def _check_configs(loaded: PeftConfig, new: PeftConfig, adapter_name: str) -> None:
    if not isinstance(new, HouseholderConfig):
        raise ValueError(
            f"hh_peft.hotswap_adapter swaps HTA adapters, but the new adapter is {new.peft_type} (for LoRA use "
            "peft.utils.hotswap.hotswap_adapter)"
        )
    if not isinstance(loaded, HouseholderConfig):
        raise ValueError(f"The loaded adapter {adapter_name!r} is {loaded.peft_type}, not HTA")
    differences = [
        f"{field}: {getattr(loaded, field)!r} loaded, {getattr(new, field)!r} new"
        for field in CONFIG_FIELDS_TO_MATCH
        if getattr(loaded, field) != getattr(new, field)
    ]
    if set(loaded.modules_to_save or ()) != set(new.modules_to_save or ()):
        differences.append(f"modules_to_save: {loaded.modules_to_save!r} loaded, {new.modules_to_save!r} new")
    if differences:
        raise ValueError(
            f"Cannot hot-swap adapter {adapter_name!r}: the adapters differ in settings that shape the output "
            f"({'; '.join(differences)}). Load the new adapter with `PeftModel.load_adapter` instead."
        )
