"""`HouseholderModel`: the PEFT tuner that injects HTA layers into a model."""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _ExcludedModule
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn
from transformers.pytorch_utils import Conv1D

from .combination import add_weighted_adapter
from .config import HouseholderConfig
from .layer import Conv2d, HouseholderLayer, Linear, unsupported_layer_message

# Default targets when `target_modules` is None, keyed by transformers `model_type` (transformers 5 names).
TRANSFORMERS_MODELS_TO_HTA_TARGET_MODULES_MAPPING: dict[str, list[str]] = {
    "vit": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "deit": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "dinov2": ["q_proj", "k_proj", "v_proj", "o_proj"],
}


def _adapter_names_pre_forward_hook(module, args, kwargs, adapter_names):
    kwargs["adapter_names"] = adapter_names
    return args, kwargs


class HouseholderModel(BaseTuner):
    """Householder-SVD adaptation (HTA): each targeted layer gets the additive update
    ``H(u_out) diag(d) H(u_in) + B A`` (see `HouseholderConfig`).

    Use it through PEFT, after ``import hh_peft``:

    ```py
    >>> import hh_peft, timm
    >>> from peft import get_peft_model
    >>> model = timm.create_model("vit_tiny_patch16_224", num_classes=10)
    >>> config = hh_peft.HouseholderConfig(target_modules=["qkv", "attn.proj", "fc1", "fc2"], modules_to_save=["head"])
    >>> model = get_peft_model(model, config)
    >>> model.print_trainable_parameters()
    ```
    """

    prefix: str = "hta_"
    tuner_layer_cls = HouseholderLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_HTA_TARGET_MODULES_MAPPING

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, state_dict=None, **kwargs) -> None:
        """Validate every target before the first module is replaced, then let PEFT inject.

        A failed validation leaves ``model`` exactly as it was: no module is replaced and no flag is changed.
        """
        if state_dict is None:
            self._validate_targets(model, self.peft_config[adapter_name])
        # Remembered so that a load that fails after injection can restore the model (see `_undo_injection`).
        self._requires_grad_before_injection = [(p, p.requires_grad) for p in model.parameters()]
        super().inject_adapter(model, adapter_name, *args, state_dict=state_dict, **kwargs)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """PEFT's key remapping, then a shape check of every entry against the model before anything is copied.

        An adapter saved for a different base model (other layer widths, another number of classes in a saved head)
        raises a ValueError that names the first mismatching layer; the freshly injected adapter is removed again
        first, so the model is left as it was.
        """
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        own = model.state_dict()
        prefix = "base_model.model."
        strip = not any(k.startswith(prefix) for k in own)
        mismatches = []
        for key, value in remapped.items():
            model_key = key.removeprefix(prefix) if strip else key
            if model_key in own and own[model_key].shape != value.shape:
                mismatches.append((model_key, tuple(value.shape), tuple(own[model_key].shape)))
        if mismatches:
            key, saved, here = mismatches[0]
            _undo_injection(model, adapter_name)
            raise ValueError(
                f"The HTA adapter {adapter_name!r} was saved for a different base model: "
                f"{key.removeprefix(prefix)} has shape {saved} in "
                f"the checkpoint but {here} in this model ({len(mismatches)} mismatching tensor(s) in all). Load it "
                "onto the base model it was trained on. The model was left unchanged."
            )
        return remapped

    def _validate_targets(self, model: nn.Module, config: HouseholderConfig) -> None:
        if config.target_modules is None:
            model_type = getattr(getattr(model, "config", None), "model_type", None)
            if model_type not in self.target_module_mapping:
                raise ValueError(
                    f"`target_modules` is not set and HTA has no default targets for model type {model_type!r} "
                    f"(defaults exist for {sorted(self.target_module_mapping)}); pass `target_modules`, e.g. "
                    f"{_example_targets(model)}"
                )
            return  # PEFT fills the default in `_prepare_adapter_config`
        if config.target_modules == "all-linear":
            return
        matched = []
        for name, module in model.named_modules():
            if not name or _inside_tuner_layer(model, name):
                continue
            result = self._check_target_module_exists(config, name)
            if result and not isinstance(result, _ExcludedModule):
                matched.append((name, module))
        if not matched:
            layers = ""
            if config.layers_to_transform is not None:
                layers = f" with layers_to_transform={config.layers_to_transform} and layers_pattern={config.layers_pattern}"
            raise ValueError(
                f"HTA target_modules {_describe(config.target_modules)}{layers} match no module of "
                f"{type(model).__name__}; adaptable modules include {_example_targets(model)}"
            )
        for name, module in matched:
            base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
            if not isinstance(base, (nn.Linear, Conv1D, nn.Conv2d)):
                raise TypeError(unsupported_layer_message(name, base))
            if isinstance(base, nn.Conv2d) and base.groups != 1:
                raise TypeError(
                    f"Target module {name!r} is an nn.Conv2d with groups={base.groups}; HTA adapts only groups=1 "
                    "convolutions (the weight as one out x (in*kh*kw) matrix)"
                )

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **optional_kwargs):
        if current_key is None:
            raise ValueError("Current Key shouldn't be `None`")
        if isinstance(target, HouseholderLayer):
            target.update_layer(adapter_name, config)
            return
        new_module = self._create_new_module(config, adapter_name, target, current_key)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an additional adapter is not trainable until activated
        self._replace_module(parent, target_name, new_module, target)

    @staticmethod
    def _create_new_module(config, adapter_name, target, name: str = "") -> nn.Module:
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if isinstance(base, (nn.Linear, Conv1D)):
            return Linear(target, adapter_name, config)
        if isinstance(base, nn.Conv2d):
            return Conv2d(target, adapter_name, config)
        raise TypeError(unsupported_layer_message(name, base))

    # ------------------------------------------------------------------ weighted combination
    def add_weighted_adapter(
        self, adapters: list[str], weights: list[float], adapter_name: str, combination_type: str = "cat"
    ) -> None:
        """Add ``adapter_name``, an HTA adapter whose update on every layer is exactly ``sum_i w_i delta_W_i`` of
        the given HTA adapters (it is added inactive; ``set_adapter(adapter_name)`` uses it).

        ``combination_type="cat"`` (any adapters): ``d = sum_i w_i d_i`` with identity Householder factors and the
        adapters' rank-(2 + r_i) terms side by side, ``lora_rank = sum_i (2 + r_i)``. ``"linear"`` (adapters that share
        their Householder vectors; always used for one adapter): the vectors are kept, ``d = sum_i w_i d_i``,
        ``B = [w_i B_i]``, ``lora_rank = sum_i r_i``. See `hh_peft.combination` for the algebra. ``modules_to_save``
        are not combined: the new adapter uses the base model's modules there.
        """
        add_weighted_adapter(self, adapters, weights, adapter_name, combination_type)

    @contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        """Per-sample adapters at inference: ``model(x, adapter_names=[...])``, as LoRA offers."""
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        if self.training:
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode.")
        known = set()
        for module in self.modules():
            if isinstance(module, HouseholderLayer):
                known |= set(module.hta_d.keys())
        unknown = {name for name in adapter_names if name != "__base__"} - known
        if unknown:
            raise ValueError(
                f"Trying to infer with non-existing adapter(s): {', '.join(sorted(unknown))}; "
                f"known adapters: {sorted(known)} and '__base__'"
            )
        handles = []
        for module in self.modules():
            if isinstance(module, (HouseholderLayer, AuxiliaryTrainingWrapper)):
                hook = partial(_adapter_names_pre_forward_hook, adapter_names=adapter_names)
                handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


def _undo_injection(model: nn.Module, adapter_name: str) -> None:
    """Remove ``adapter_name`` again after a failed load: delete it if other adapters remain, else unload every HTA
    layer (restoring the original modules) and the base parameters' ``requires_grad`` flags."""
    tuner = getattr(model, "base_model", None)
    if not isinstance(tuner, HouseholderModel):
        return
    if any(name != adapter_name for name in tuner.peft_config):
        model.delete_adapter(adapter_name)
        return
    restore = getattr(tuner, "_requires_grad_before_injection", [])
    tuner.unload()
    for parameter, requires_grad in restore:
        parameter.requires_grad_(requires_grad)


def _inside_tuner_layer(model: nn.Module, name: str) -> bool:
    """True for the internals of an existing tuner layer (``...qkv.base_layer``, ``...qkv.hta_dropout.x``)."""
    parts = name.split(".")
    module = model
    for part in parts[:-1]:
        module = getattr(module, part)
        if isinstance(module, BaseTunerLayer):
            return True
    return False


def _describe(target_modules) -> str:
    if isinstance(target_modules, str):
        return f"(regex {target_modules!r})"
    return str(sorted(target_modules))


def _example_targets(model: nn.Module, limit: int = 8) -> str:
    """A few real names of adaptable layers of ``model``, for error messages."""
    names = [
        n
        for n, m in model.named_modules()
        if n and isinstance(m, (nn.Linear, Conv1D, nn.Conv2d, BaseTunerLayer)) and not _inside_tuner_layer(model, n)
    ]
    if not names:
        return "(none: the model has no nn.Linear, Conv1D or nn.Conv2d layer)"
    shown = names[:limit]
    more = f" ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(repr(n) for n in shown) + more
