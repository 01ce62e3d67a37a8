"""`HouseholderModel`: the PEFT tuner that injects HTA layers into a model."""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from functools import partial
from typing import Optional

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _ExcludedModule, onload_layer
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn
from transformers.pytorch_utils import Conv1D

from .combination import add_weighted_adapter
from .config import HouseholderConfig
from .functional import ONE_BLOCK
from .layer import Conv2d, HouseholderLayer, Linear, unsupported_layer_message
from .loading import check_state_dict_fits_model
from .rollback import record_before_change

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
        """Validate every target (and every ``modules_to_save`` entry) before the first module is replaced, then let
        PEFT inject; warn about layers where ``lora_rank`` exceeds ``min(in, out)``.

        A failed validation leaves ``model`` exactly as it was: no module is replaced and no flag is changed.
        """
        config = self.peft_config[adapter_name]
        record_before_change(model)  # inside PeftModel.from_pretrained: the model as it was, for a failed load
        if state_dict is None:
            self._validate_targets(model, config)
            _validate_modules_to_save(model, config)
        # A fresh config resolves every target's block layout now and records it (`HouseholderConfig.block_layout`,
        # saved with the adapter); a loaded one has it already and gets exactly that layout.
        resolving = config.block_layout is None
        if resolving:
            config.block_layout = {}
        self._resolving_block_layout = resolving
        try:
            super().inject_adapter(model, adapter_name, *args, state_dict=state_dict, **kwargs)
        except BaseException:
            if resolving:
                config.block_layout = None
            raise
        finally:
            self._resolving_block_layout = False
        _warn_rank_above_layer_size(model, adapter_name, config.lora_rank)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """PEFT's key remapping, then a check of every entry against the model before anything is copied
        (`hh_peft.loading.check_state_dict_fits_model`): an adapter saved for a different base model, or an HTA
        tensor with no place under the config, raises a ValueError naming the first offender, and
        ``PeftModel.from_pretrained`` / ``load_adapter`` put the model back as it was (`hh_peft.rollback`)."""
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        check_state_dict_fits_model(model, config, adapter_name, remapped)
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
        layout = self._block_layout(config, current_key, target, target_name, parent)
        if isinstance(target, HouseholderLayer):
            target.update_layer(adapter_name, config, layout=layout)
            return
        new_module = self._create_new_module(config, adapter_name, target, current_key, layout=layout)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an additional adapter is not trainable until activated
        self._replace_module(parent, target_name, new_module, target)

    def _block_layout(self, config, current_key, target, target_name, parent):
        """The target's `functional.BlockLayout` (`HouseholderConfig.layer_block_layout`), recorded in
        ``config.block_layout`` while a fresh config is injected; a layout that does not tile the layer raises
        naming it."""
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if isinstance(base, Conv1D):
            in_features, out_features = base.weight.shape
        elif isinstance(base, nn.Linear):
            in_features, out_features = base.in_features, base.out_features
        elif isinstance(base, nn.Conv2d):
            in_features, out_features = base.in_channels * base.kernel_size[0] * base.kernel_size[1], base.out_channels
        else:
            return ONE_BLOCK
        resolving = getattr(self, "_resolving_block_layout", False)
        layout = config.layer_block_layout(
            current_key, target_name, parent, in_features, out_features, linear=isinstance(base, (nn.Linear, Conv1D)),
            resolve=resolving,
        )
        try:
            layout.block_shape(out_features, in_features)
        except ValueError as error:
            raise ValueError(f"HTA block layout of {current_key!r}: {error}") from error
        if resolving and not layout.trivial:
            config.block_layout[current_key] = list(layout.grid)
        return layout

    @staticmethod
    def _create_new_module(config, adapter_name, target, name: str = "", layout=ONE_BLOCK) -> nn.Module:
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if isinstance(base, (nn.Linear, Conv1D)):
            return Linear(target, adapter_name, config, layout=layout)
        if isinstance(base, nn.Conv2d):
            return Conv2d(target, adapter_name, config, layout=layout)
        raise TypeError(unsupported_layer_message(name, base))

    # ------------------------------------------------------------------ merging, all or nothing
    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        """Merge the active (or the given) adapters into the base weights of every HTA layer.

        ``safe_merge=True`` is all or nothing: every layer's merged weight is computed and checked for NaN / inf
        before the first base weight is written, and a failure names the layer (its module path) and the adapter.
        Any other error part-way through unmerges the layers this call merged before it is raised.
        """
        self._check_merge_allowed()
        layers = self._hta_layers()
        if safe_merge:
            self._check_safe_merge(layers, adapter_names)
        merged: list[tuple[HouseholderLayer, int]] = []
        try:
            for _, layer in layers:
                merged.append((layer, len(layer.merged_adapters)))
                with onload_layer(layer):
                    layer.merge(adapter_names=adapter_names)
        except BaseException:
            for layer, count in reversed(merged):
                with onload_layer(layer):
                    layer.unmerge_last(len(layer.merged_adapters) - count)
            raise

    def _unload_and_optionally_merge(self, merge=True, progressbar=False, safe_merge=False, adapter_names=None):
        """PEFT's unloading; ``merge_and_unload(safe_merge=True)`` first checks every layer (`merge_adapter`), so a
        NaN / inf update raises naming its layer before any layer is merged or unloaded."""
        if merge and safe_merge:
            self._check_merge_allowed()
            self._check_safe_merge(self._hta_layers(), adapter_names)
        return super()._unload_and_optionally_merge(
            merge=merge, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )

    def _hta_layers(self) -> list[tuple[str, HouseholderLayer]]:
        return [(name, module) for name, module in self.model.named_modules() if isinstance(module, HouseholderLayer)]

    @staticmethod
    def _check_safe_merge(layers: list[tuple[str, HouseholderLayer]], adapter_names: Optional[list[str]]) -> None:
        """Raise (naming the layer) if merging would put a NaN or inf into any layer's base weight; writes nothing."""
        for name, layer in layers:
            names = adapter_names if adapter_names is not None else layer.active_adapters
            names = [n for n in names if n in layer.hta_d and n not in layer.merged_adapters]
            if not names:
                continue
            try:
                with onload_layer(layer):
                    layer.merged_weight(names)
            except ValueError as error:
                raise ValueError(f"safe_merge refused layer {name!r}: {error}. No layer was merged.") from error

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
        are not combined: the new adapter uses the base model's modules there. Adapters with blocks combine block by
        block; they must then have the same layout on every layer any of them adapts (`_check_block_layouts`).
        """
        _check_block_layouts(self, adapters, combination_type)
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


# Entries PEFT itself adds to `modules_to_save` for these task types (whichever the model has).
_TASK_MODULES_TO_SAVE = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"), "QUESTION_ANS": ("qa_outputs",)}


def _validate_modules_to_save(model: nn.Module, config: HouseholderConfig) -> None:
    """Every ``modules_to_save`` entry must name a module (PEFT's rule: a module name ending with the entry)."""
    if not config.modules_to_save:
        return
    names = [n for n, _ in model.named_modules() if n and not _inside_tuner_layer(model, n)]
    task = str(getattr(config.task_type, "value", config.task_type))
    added_by_peft = _TASK_MODULES_TO_SAVE.get(task, ())
    unmatched = [
        entry for entry in config.modules_to_save
        if entry not in added_by_peft and not any(name.endswith(entry) for name in names)
    ]
    if unmatched:
        top = [n for n in names if "." not in n]
        leaves = [n for n, m in model.named_modules() if n and not any(True for _ in m.children())]
        heads = list(dict.fromkeys([*top, *leaves[-4:]]))
        raise ValueError(
            f"`modules_to_save` entr{'y' if len(unmatched) == 1 else 'ies'} {unmatched} match no module of "
            f"{type(model).__name__}; an entry is a module name or its ending, e.g. one of {heads[:12]}"
        )


def _check_block_layouts(tuner: HouseholderModel, adapters: list[str], combination_type: str) -> None:
    """`add_weighted_adapter` combines block adapters block by block ("linear"): on a layer where any of
    ``adapters`` has blocks, all of them must adapt it with the same layout (the combination takes the first
    adapter's layout). "cat" of block adapters is refused: `hh_peft.combination` sizes its zero Householder vectors
    by the layer (``in_features``), not by the blocks."""
    for name, layer in tuner._hta_layers():
        layouts = {adapter: layer.hta_layout.get(adapter, ONE_BLOCK) for adapter in adapters if adapter in layer.hta_d}
        if not layouts or all(layout.trivial for layout in layouts.values()):
            continue
        if combination_type == "cat" and len(adapters) > 1:
            raise ValueError(
                f"combination_type='cat' is not supported yet for HTA adapters with blocks (layer {name!r} has "
                f"{list(next(l for l in layouts.values() if not l.trivial).grid)} [row, column] blocks); use "
                "combination_type='linear' (adapters sharing their Householder vectors, e.g. one adapter scaled) or "
                "adapters created with output_blocks=1. Nothing was added."
            )
        missing = [adapter for adapter in adapters if adapter in tuner.peft_config and adapter not in layouts]
        if missing or len(set(layouts.values())) > 1:
            described = ", ".join(
                f"{adapter!r}: {list(layouts[adapter].grid) if adapter in layouts else 'not adapted'}" for adapter in adapters
            )
            raise ValueError(
                f"add_weighted_adapter combines HTA adapters with blocks block by block, so on every layer where one of "
                f"them has blocks all must adapt it with the same [row blocks, column blocks]; layer {name!r} has "
                f"{described}. Nothing was added."
            )


def _warn_rank_above_layer_size(model: nn.Module, adapter_name: str, lora_rank: int) -> None:
    """``B A`` of rank ``lora_rank`` > min(in, out) cannot reach rank ``lora_rank``: warn, naming the layers."""
    layers = [
        f"{name} ({module.in_features} -> {module.out_features})"
        for name, module in model.named_modules()
        if isinstance(module, HouseholderLayer) and adapter_name in module.hta_d
        and lora_rank > min(module.in_features, module.out_features)
    ]
    if layers:
        more = f" and {len(layers) - 4} more" if len(layers) > 4 else ""
        warnings.warn(
            f"HTA lora_rank={lora_rank} exceeds min(in, out) of {len(layers)} targeted layer(s): {', '.join(layers[:4])}"
            f"{more}; their B A term has rank at most min(in, out), so the extra parameters add nothing."
        )


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
