"""Image classifiers for the recipes: loading (timm / transformers / local folder), target presets, methods.

``--model`` may be
* a timm model name (``vit_tiny_patch16_224``; pretrained weights unless ``random_init``), with
  optional constructor overrides (``model_kwargs``, e.g. a small ViT for 28x28 images);
* a local folder: a timm folder (``config.json`` with ``architecture``, as written by
  ``timm.models.save_for_hf`` and by the main job's cache) or a transformers folder
  (``config.json`` with ``model_type``);
* a Hub model id, timm (``timm/...``) or transformers.

``--method``: ``hta`` (hh_peft), ``lora``, ``hra`` (PEFT), ``full`` (every weight trained),
``linear`` (only the classification head). For PEFT methods the head goes to ``modules_to_save``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import RecipeError
from .data import ImageSpec

METHODS = ("hta", "lora", "hra", "full", "linear")
PEFT_METHODS = ("hta", "lora", "hra")

# Target presets per model family. timm fuses q, k, v into one `attn.qkv` Linear; a bare "proj"
# would also match the patch embedding's Conv2d (`patch_embed.proj`), hence "attn.proj".
TARGET_PRESETS: dict[str, dict[str, list[str]]] = {
    "timm": {
        "attn": ["attn.qkv", "attn.proj"],
        "attn_mlp": ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"],
        "qkv": ["attn.qkv"],
        "mlp": ["mlp.fc1", "mlp.fc2"],
    },
    "transformers": {
        "attn": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "attn_mlp": ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"],
        "qkv": ["q_proj", "k_proj", "v_proj"],
        "qv": ["q_proj", "v_proj"],
        "mlp": ["fc1", "fc2"],
    },
}
PRESET_NAMES = ("attn", "attn_mlp", "qkv", "qv", "mlp")


@dataclass
class LoadedModel:
    """A classifier plus what the recipes need to know about it."""

    model: nn.Module
    family: str  # "timm" or "transformers"
    spec: ImageSpec  # the input it takes
    head: str  # name of the classification head module (goes to modules_to_save)
    fixed_input_size: bool  # True if it cannot take another image size (absolute position embeddings)
    patch_size: int | None
    base_model: str  # how to name it on a model card (Hub id, timm name or folder)
    timm_config: dict[str, Any] | None = field(default=None)  # for saving a timm model as a folder

    def forward_logits(self, model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        """Logits [B, num_labels] of ``model`` (this model, possibly wrapped) for ``pixels`` [B, C, H, W]."""
        out = model(pixel_values=pixels) if self.family == "transformers" else model(pixels)
        return out.logits if hasattr(out, "logits") else out


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------
def _timm_spec(model: nn.Module) -> tuple[ImageSpec, bool, int | None]:
    import timm.data

    cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
    c, h, w = cfg.get("input_size", (3, 224, 224))
    embed = getattr(model, "patch_embed", None)
    if getattr(embed, "img_size", None) is not None:  # the size the model was built for, not its weights' tag
        h, w = embed.img_size
    conv = getattr(embed, "proj", None)
    if isinstance(conv, nn.Conv2d):
        c = conv.in_channels
    cfg.setdefault("mean", timm.data.IMAGENET_DEFAULT_MEAN)
    cfg.setdefault("std", timm.data.IMAGENET_DEFAULT_STD)
    patch = getattr(embed, "patch_size", None)
    patch = patch[0] if isinstance(patch, (tuple, list)) else patch
    fixed = getattr(model, "dynamic_img_size", True) is False and patch is not None
    mean, std = tuple(cfg["mean"]), tuple(cfg["std"])
    if len(mean) != c:
        mean, std = (sum(mean) / len(mean),), (sum(std) / len(std),)
    return ImageSpec(c, h, w, mean, std), fixed, patch


def _channel_normalization(name: str, kwargs: dict) -> dict:
    """``pretrained_cfg_overlay`` giving a model built with another ``in_chans`` a mean/std of its own.

    timm keeps the architecture's 3-channel mean/std in ``pretrained_cfg`` whatever ``in_chans`` is, then warns
    ("Pretrained mean does not match 1 channels") each time it resolves them (``save_for_hf``, data configs) and
    uses their channel average. That average, given up front, is the same normalisation without the warning.
    """
    import timm.models

    in_chans = kwargs.get("in_chans")
    cfg = timm.models.get_pretrained_cfg(name) if in_chans is not None and ":" not in name else None
    if cfg is None or cfg.mean is None or len(cfg.mean) in (1, in_chans):
        return {}
    mean, std = (sum(cfg.mean) / len(cfg.mean),), (sum(cfg.std) / len(cfg.std),)
    return {"pretrained_cfg_overlay": {"mean": mean, "std": std}}


def _load_timm(name: str, num_labels: int, pretrained: bool, model_kwargs: dict, base_model: str, image_size):
    import timm

    kwargs = dict(model_kwargs)
    if image_size is not None and not name.startswith(("local-dir:", "hf-hub:")):
        kwargs.setdefault("img_size", image_size)
    try:
        model = timm.create_model(
            name, pretrained=pretrained, num_classes=num_labels, **kwargs, **_channel_normalization(name, kwargs)
        )
    except TypeError as err:
        raise RecipeError(f"timm model {name!r} does not take the arguments {sorted(kwargs)}: {err}") from err
    except (OSError, RuntimeError) as err:
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RecipeError(
            f"could not load the weights of timm model {name!r} ({text}); offline, pass --random_init or a "
            "local model folder"
        ) from err
    spec, fixed, patch = _timm_spec(model)
    head = model.pretrained_cfg.get("classifier", "head") if hasattr(model, "pretrained_cfg") else "head"
    timm_config = None
    if name.startswith("local-dir:"):
        timm_config = json.loads((Path(name[len("local-dir:"):]) / "config.json").read_text())
    else:
        timm_config = {"architecture": name.split(":")[-1].split(".")[0], "model_args": kwargs}
    return LoadedModel(model, "timm", spec, head, fixed, patch, base_model, timm_config)


def _load_transformers(name: str, num_labels: int, base_model: str):
    from transformers import AutoConfig, AutoModelForImageClassification

    try:
        config = AutoConfig.from_pretrained(name)
        model = AutoModelForImageClassification.from_pretrained(
            name, num_labels=num_labels, ignore_mismatched_sizes=True
        )
    except Exception as err:
        raise RecipeError(f"transformers could not load {name!r} as an image classifier ({err})") from err
    c = getattr(config, "num_channels", 3)
    size = getattr(config, "image_size", 224)
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    mean, std = (0.5,), (0.5,)
    try:
        from transformers import AutoImageProcessor

        proc = AutoImageProcessor.from_pretrained(name)
        mean, std = tuple(proc.image_mean), tuple(proc.image_std)
    except Exception:  # no preprocessor_config.json: ViT's default normalisation
        pass
    patch = getattr(config, "patch_size", None)
    patch = patch[0] if isinstance(patch, (tuple, list)) else patch
    head = "classifier" if hasattr(model, "classifier") else "head"
    # transformers ViTs interpolate position embeddings only when asked: the input size is fixed.
    return LoadedModel(model, "transformers", ImageSpec(c, h, w, mean, std), head, True, patch, base_model)


def load_image_classifier(
    name: str,
    num_labels: int,
    *,
    random_init: bool = False,
    model_kwargs: dict | None = None,
    image_size: int | None = None,
) -> LoadedModel:
    """Load ``name`` (timm name, local folder, or Hub id) as a classifier with a fresh ``num_labels`` head.

    Raises :class:`RecipeError` with one line naming what was expected if ``name`` is none of these.
    """
    model_kwargs = dict(model_kwargs or {})
    path = Path(name).expanduser()
    if path.is_dir():
        cfg_file = path / "config.json"
        if not cfg_file.exists():
            raise RecipeError(f"model folder {name!r} has no config.json (expected a timm or transformers model folder)")
        cfg = json.loads(cfg_file.read_text())
        if "architecture" in cfg:
            if model_kwargs:
                raise RecipeError("--model_kwargs applies to timm model names, not to a saved model folder")
            return _load_timm(f"local-dir:{path.resolve()}", num_labels, True, {}, str(path), image_size)
        if "model_type" in cfg:
            return _load_transformers(str(path), num_labels, str(path))
        raise RecipeError(f"model folder {name!r}: config.json has neither 'architecture' (timm) nor 'model_type' (transformers)")
    if name.startswith((".", "/", "~")):
        raise RecipeError(f"model folder {name!r} does not exist")

    import timm

    if timm.is_model(name.split(".")[0]) and "/" not in name:
        return _load_timm(name, num_labels, not random_init, model_kwargs, name, image_size)
    if "/" in name:
        from huggingface_hub import hf_hub_download

        try:
            cfg = json.loads(Path(hf_hub_download(name, "config.json")).read_text())
        except Exception as err:
            raise RecipeError(
                f"model {name!r} not found: not a timm model name, a local folder, or a reachable Hub model id "
                f"({type(err).__name__})"
            ) from err
        if "architecture" in cfg:
            return _load_timm(f"hf-hub:{name}", num_labels, not random_init, {}, name, image_size)
        return _load_transformers(name, num_labels, name)
    raise RecipeError(
        f"model {name!r} not found: expected a timm model name (e.g. vit_tiny_patch16_224), a Hub model id "
        "(owner/name), or a local model folder"
    )


def check_image_size(loaded: LoadedModel, image_size: int | None) -> ImageSpec:
    """The input spec to train with: the model's own size, or ``image_size`` if the model can take it."""
    spec = loaded.spec
    if image_size is None or (image_size, image_size) == (spec.height, spec.width):
        return spec
    if loaded.fixed_input_size:
        raise RecipeError(
            f"model {loaded.base_model!r} takes {spec.height}x{spec.width} images only (fixed position "
            f"embeddings), not --image_size {image_size}"
        )
    if loaded.patch_size and image_size % loaded.patch_size:
        raise RecipeError(
            f"--image_size {image_size} is not a multiple of the model's patch size {loaded.patch_size}"
        )
    return ImageSpec(spec.channels, image_size, image_size, spec.mean, spec.std)


def dry_run(loaded: LoadedModel, spec: ImageSpec, num_labels: int) -> None:
    """One forward pass on a zero batch: a model that cannot take ``spec`` fails here, before training."""
    x = torch.zeros(1, spec.channels, spec.height, spec.width)
    was_training = loaded.model.training
    loaded.model.eval()
    try:
        with torch.no_grad():
            logits = loaded.forward_logits(loaded.model, x)
    except Exception as err:
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RecipeError(
            f"model {loaded.base_model!r} cannot take {spec.channels}x{spec.height}x{spec.width} images: {text}"
        ) from err
    finally:
        loaded.model.train(was_training)
    if logits.shape[-1] != num_labels:
        raise RecipeError(f"model {loaded.base_model!r} gives {logits.shape[-1]} logits, the dataset has {num_labels} classes")


# ----------------------------------------------------------------------------------------------
# Methods
# ----------------------------------------------------------------------------------------------
def resolve_targets(loaded: LoadedModel, preset: str, target_modules: str | None = None) -> list[str]:
    """PEFT ``target_modules`` for ``preset`` (or the comma-separated ``target_modules``) on this model."""
    if target_modules:
        return [t.strip() for t in target_modules.split(",") if t.strip()]
    if preset not in PRESET_NAMES:
        raise RecipeError(f"unknown --target_preset {preset!r}; choose one of {', '.join(PRESET_NAMES)}")
    presets = TARGET_PRESETS[loaded.family]
    if preset not in presets:
        raise RecipeError(
            f"--target_preset {preset!r} does not apply to this {loaded.family} model (it fuses q, k, v into one "
            f"attn.qkv layer); choose one of {', '.join(presets)}"
        )
    targets = presets[preset]
    names = [n for n, _ in loaded.model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise RecipeError(
            f"--target_preset {preset!r} expects modules {missing} which model {loaded.base_model!r} does not have; "
            "pass --target_modules"
        )
    return targets


@dataclass
class MethodOptions:
    method: str = "hta"
    target_preset: str = "attn_mlp"
    target_modules: str | None = None
    lora_rank: int = 1
    householder: str = "normalized"
    lora_r: int = 8
    lora_alpha: float | None = None
    hra_r: int = 8
    adapter_dropout: float = 0.0


def method_config(opts: MethodOptions, target_modules, head: str | None):
    """The one place a method's PEFT config is built (the recipes, the main job and the accuracy benchmark all come
    here): HTA, LoRA or HRA on ``target_modules`` (a list of names or a regex), ``head`` trained in full."""
    modules_to_save = [head] if head else None
    if opts.method == "hta":
        import hh_peft

        return hh_peft.HouseholderConfig(target_modules=target_modules, lora_rank=opts.lora_rank,
                                         householder=opts.householder, dropout=opts.adapter_dropout,
                                         modules_to_save=modules_to_save)
    if opts.method == "lora":
        from peft import LoraConfig

        if opts.lora_r <= 0:
            raise ValueError(f"--lora_r must be positive, got {opts.lora_r}")
        return LoraConfig(r=opts.lora_r, lora_alpha=opts.lora_alpha if opts.lora_alpha is not None else opts.lora_r,
                          lora_dropout=opts.adapter_dropout, target_modules=target_modules,
                          modules_to_save=modules_to_save)
    if opts.method == "hra":
        from peft import HRAConfig

        return HRAConfig(r=opts.hra_r, target_modules=target_modules, modules_to_save=modules_to_save)
    raise RecipeError(f"{opts.method!r} is not a PEFT method ({', '.join(PEFT_METHODS)})")


def validate_method_options(opts: MethodOptions) -> None:
    """Everything about the method that can be checked without a model (so it fails before data loading)."""
    if opts.method not in METHODS:
        raise RecipeError(f"unknown --method {opts.method!r}; choose one of {', '.join(METHODS)}")
    if opts.target_modules is None and opts.target_preset not in PRESET_NAMES:
        raise RecipeError(f"unknown --target_preset {opts.target_preset!r}; choose one of {', '.join(PRESET_NAMES)}")
    if opts.method in PEFT_METHODS:
        try:
            method_config(opts, ["x"], None)
        except (ValueError, TypeError) as err:
            raise RecipeError(f"--method {opts.method}: {str(err).strip().splitlines()[0]}") from err


def prepare_for_method(model: nn.Module, opts: MethodOptions, target_modules, head: str) -> nn.Module:
    """The model to train under ``opts.method``: a PEFT model for hta / lora / hra (on ``target_modules``, ``head``
    trained in full), the model itself with every weight (full) or only ``head`` (linear) trainable."""
    if opts.method not in METHODS:
        raise RecipeError(f"unknown --method {opts.method!r}; choose one of {', '.join(METHODS)}")
    if opts.method in PEFT_METHODS:
        from peft import get_peft_model

        return get_peft_model(model, method_config(opts, target_modules, head))
    model.requires_grad_(opts.method == "full")
    model.get_submodule(head).requires_grad_(True)
    return model


def apply_method(loaded: LoadedModel, opts: MethodOptions) -> nn.Module:
    """:func:`prepare_for_method` on a loaded classifier, its targets resolved from ``opts``' preset or names."""
    targets = resolve_targets(loaded, opts.target_preset, opts.target_modules) if opts.method in PEFT_METHODS else None
    return prepare_for_method(loaded.model, opts, targets, loaded.head)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def save_model(loaded: LoadedModel, model: nn.Module, output_dir: Path, method: str) -> None:
    """Adapter (PEFT methods) or whole model (full / linear) into ``output_dir``, as safetensors."""
    output_dir.mkdir(parents=True, exist_ok=True)
    if method in PEFT_METHODS:
        model.save_pretrained(str(output_dir))
    elif loaded.family == "transformers":
        model.save_pretrained(str(output_dir))
    else:
        save_timm_folder(loaded, model, output_dir)


def save_timm_folder(loaded: LoadedModel, model: nn.Module, output_dir: Path) -> None:
    """A timm model as ``config.json`` + ``model.safetensors``, loadable with ``timm.create_model("local-dir:...")``."""
    from timm.models import save_for_hf

    model_args = dict((loaded.timm_config or {}).get("model_args", {}))
    model_args["num_classes"] = model.get_classifier().out_features if hasattr(model, "get_classifier") else None
    save_for_hf(model, str(output_dir), model_args=model_args, safe_serialization=True)
