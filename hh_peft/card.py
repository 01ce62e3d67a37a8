"""Model cards of HTA adapters, written by ``save_pretrained`` and ``push_to_hub``.

Two steps of PEFT and transformers write an adapter's ``README.md``:

* ``PeftModel.save_pretrained`` calls ``PeftModel.create_or_update_model_card`` (PEFT's generic card);
* ``PeftModel.push_to_hub`` is transformers' ``PushToHubMixin.push_to_hub``: it runs ``save_pretrained`` into a
  temporary folder, overwrites ``README.md`` there with a generic ``library_name: transformers`` card (or the
  repository's current card) carrying the push's ``tags``, then uploads the folder with ``_upload_modified_files``.

:mod:`hh_peft.peft_patches` wraps these two methods of ``PeftModel``. For a model whose adapters are all HTA
they write the card of :func:`adapter_card_for` (:func:`write_card_on_save`, :func:`write_card_before_upload`); for
every other model they are PEFT's and transformers' own methods, called with the same arguments. The push itself stays transformers' (repo
creation, ``tags``, ``revision``, ``create_pr``, ...).

What the model does not record (the dataset, the results, the base model of a timm backbone) is given with
:func:`set_card_info` before saving or pushing::

    hh_peft.set_card_info(model, base_model="timm/vit_base_patch16_224.augreg2_in21k_ft_in1k", dataset="beans",
                          metrics={"accuracy": 0.97})
    model.push_to_hub("me/vit-beans-hta", tags=["vtab"])  # README.md is the HTA card, library_name: peft
"""

from __future__ import annotations

import importlib.metadata
import os
from importlib import resources
from typing import Mapping

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .registration import HTA_PEFT_TYPE

HTA_TAGS = ("hta", "householder", "peft")
TEMPLATE = resources.files(__package__) / "templates" / "adapter_card.md"
ADAPTER_PLACEHOLDER = "<adapter folder or Hub id>"
_CARD_INFO_ATTR = "_hta_card_info"


# ----------------------------------------------------------------------------------------------
# Facts the model does not record
# ----------------------------------------------------------------------------------------------
def set_card_info(peft_model, *, base_model: str | None = None, dataset: str | None = None,
                  metrics: Mapping[str, float] | None = None, num_labels: int | None = None,
                  model_family: str | None = None, model_name: str | None = None) -> None:
    """Record facts for the HTA card of ``peft_model``; later calls update earlier ones, ``None`` keeps a value.

    ``base_model``: the Hub id, local folder or timm name of the model the adapter was trained on. It becomes the
    adapter config's ``base_model_name_or_path`` (saved in ``adapter_config.json``): PEFT records it only for
    transformers models loaded ``from_pretrained``, so without it a timm backbone's card names no base model.
    ``metrics``: ``{"accuracy": 0.9}`` measured on ``dataset``. ``num_labels``: size of the classifier (default:
    the base model's). ``model_family``: ``"timm"`` or ``"transformers"`` (default: from the base model's type).
    Tags go with ``push_to_hub(..., tags=[...])``.
    """
    if model_family not in (None, "timm", "transformers"):
        raise ValueError(f"model_family must be 'timm' or 'transformers', got {model_family!r}")
    if base_model is not None:
        for config in peft_model.peft_config.values():
            config.base_model_name_or_path = base_model
    facts = {"dataset": dataset, "metrics": metrics, "num_labels": num_labels, "model_family": model_family,
             "model_name": model_name}
    object.__setattr__(peft_model, _CARD_INFO_ATTR,
                       {**_card_info(peft_model), **{k: v for k, v in facts.items() if v is not None}})


def _card_info(peft_model) -> dict:
    return dict(getattr(peft_model, _CARD_INFO_ATTR, None) or {})


def recorded_base_model(peft_model) -> str | None:
    """The model ``peft_model``'s active adapter was trained on, where that is on record, else ``None``.

    The record is the adapter config's ``base_model_name_or_path``: :func:`set_card_info`'s ``base_model``, or
    what PEFT took from the base model's ``name_or_path``, which transformers sets to the folder or Hub id given
    to ``from_pretrained`` and leaves empty for a model built ``from_config``. timm models have no such record:
    their ``pretrained_cfg`` names the architecture's default weights whether or not ``create_model`` loaded
    them, so it is no evidence of a base model.
    """
    return getattr(peft_model.peft_config[peft_model.active_adapter], "base_model_name_or_path", None) or None


# ----------------------------------------------------------------------------------------------
# Card contents
# ----------------------------------------------------------------------------------------------
def _is_hub_id(name: str | None) -> bool:
    """``owner/name`` that is not a local path: the only kind of ``base_model`` the Hub accepts."""
    return bool(name) and name.count("/") == 1 and not name.startswith((".", "/", "~")) and not os.path.exists(name)


def _base_model_lines(base_model: str | None, family: str | None, model_class: type | None,
                      num_labels: int | None, trains_modules: bool, architecture: str | None) -> list[str]:
    """The lines of the usage snippet that build the base model.

    timm: ``create_model`` with ``hf-hub:`` for a Hub id, ``local-dir:`` for a folder, a timm name as it is.
    transformers: ``from_pretrained`` of the model's own class, with ``ignore_mismatched_sizes=True`` when the
    adapter carries fully trained modules (``modules_to_save``, typically the classifier: the adapter's copy
    replaces the checkpoint's). Without a recorded base model, or for another kind of model, the line says
    what is known instead of guessing.
    """
    if not base_model or family not in ("timm", "transformers"):
        known = f"{family} {architecture}" if family and architecture else architecture
        known = ", ".join(filter(None, [base_model, known, None if base_model else "its weights are not on record"]))
        return ["", f"base = ...  # the model this adapter was trained on ({known})"]
    if family == "timm":
        if _is_hub_id(base_model):
            base_model = f"hf-hub:{base_model}"
        elif os.path.isdir(base_model):
            base_model = f"local-dir:{base_model}"
        labels = f", num_classes={num_labels}" if num_labels else ""
        return ["import timm", "", f'base = timm.create_model("{base_model}", pretrained=True{labels})']
    module = "transformers" if model_class.__module__.startswith("transformers.") else model_class.__module__
    labels = f", num_labels={num_labels}" if num_labels else ""
    labels += ", ignore_mismatched_sizes=True" if labels and trains_modules else ""
    name = model_class.__name__
    return [f"from {module} import {name}", "", f'base = {name}.from_pretrained("{base_model}"{labels})']


def usage_snippet(adapter_id: str, base_lines: list[str]) -> str:
    """Python that loads the adapter; its first line is ``import hh_peft`` (PEFT must know the method first)."""
    return "\n".join([
        "import hh_peft  # registers HTA with PEFT (an installed hh-peft also does it when peft is imported)",
        "from peft import PeftModel",
        *base_lines,
        f'model = PeftModel.from_pretrained(base, "{adapter_id}")',
        "model = model.merge_and_unload()  # optional: fold the update into the weights (no inference cost)",
    ])


def build_adapter_card(
    *,
    config,
    usage: str,
    base_model: str | None = None,
    model_name: str = "hta-adapter",
    dataset: str | None = None,
    metrics: Mapping[str, float] | None = None,
    adapter_params: int | None = None,
) -> ModelCard:
    """The model card of an HTA adapter from its ``HouseholderConfig`` and the facts around it.

    Metadata: ``library_name: peft``, ``base_model`` (only a Hub id: the Hub rejects local paths), tags ``hta``,
    ``householder``, ``peft``, and a ``model-index`` with one result per entry of ``metrics`` on
    ``dataset``. Text (``templates/adapter_card.md``): the update rule, ``usage``, the adapter's settings and
    the results table.
    """
    if getattr(config, "peft_type", None) != HTA_PEFT_TYPE:
        raise ValueError(f"build_adapter_card expects a HouseholderConfig, got {type(config).__name__}")
    metrics = dict(metrics or {})
    eval_results = [
        EvalResult(task_type="image-classification", dataset_type=dataset, dataset_name=dataset,
                   metric_type=metric, metric_value=float(value))
        for metric, value in metrics.items()
    ] if dataset and metrics else None
    hub_base = base_model if _is_hub_id(base_model) else None
    card_data = ModelCardData(
        library_name="peft",
        base_model=hub_base,
        tags=list(HTA_TAGS),
        datasets=[dataset] if _is_hub_id(dataset) else None,
        model_name=model_name if eval_results else None,
        eval_results=eval_results,
        pipeline_tag="image-classification" if eval_results else None,
    )
    targets = config.target_modules
    targets = ", ".join(f"`{t}`" for t in sorted(targets)) if isinstance(targets, (list, set, tuple)) else f"`{targets}`"
    return ModelCard.from_template(
        card_data,
        template_str=TEMPLATE.read_text(encoding="utf-8"),
        model_name=model_name,
        base_model=hub_base,
        dataset=dataset,
        config=config,
        target_modules=targets,
        modules_to_save=", ".join(f"`{m}`" for m in (config.modules_to_save or [])) or "none",
        adapter_params=f"{adapter_params:,}" if adapter_params else None,
        usage=usage,
        metrics=metrics,
        versions={dist: importlib.metadata.version(dist) for dist in ("hh-peft", "peft", "transformers", "timm", "torch")},
    )


def _model_family(base) -> str | None:
    from transformers import PreTrainedModel

    return "timm" if hasattr(base, "pretrained_cfg") else "transformers" if isinstance(base, PreTrainedModel) else None


def adapter_card_for(peft_model, repo_id: str | None = None) -> ModelCard:
    """The HTA card of ``peft_model``: its active adapter's config, its :func:`set_card_info` facts, and a usage
    snippet that loads the adapter from ``repo_id`` (a placeholder when ``None``)."""
    from peft import get_peft_model_state_dict

    adapter = peft_model.active_adapter
    config = peft_model.peft_config[adapter]
    info = _card_info(peft_model)
    base = peft_model.get_base_model()
    family = info.get("model_family") or _model_family(base)
    num_labels = info.get("num_labels")
    if num_labels is None and family == "timm":
        num_labels = getattr(base, "num_classes", None)
    elif num_labels is None and family == "transformers" and "Classification" in type(base).__name__:
        num_labels = base.config.num_labels
    architecture = ((base.pretrained_cfg or {}).get("architecture") if hasattr(base, "pretrained_cfg")
                    else type(base).__name__)
    base_model = recorded_base_model(peft_model)
    base_lines = _base_model_lines(base_model, family, type(base), num_labels, bool(config.modules_to_save),
                                   architecture)
    saved = get_peft_model_state_dict(peft_model, adapter_name=adapter, save_embedding_layers=False)  # no Hub lookup
    return build_adapter_card(
        config=config,
        usage=usage_snippet(repo_id or ADAPTER_PLACEHOLDER, base_lines),
        base_model=base_model,
        model_name=info.get("model_name") or (repo_id.split("/")[-1] if repo_id else "hta-adapter"),
        dataset=info.get("dataset"),
        metrics=info.get("metrics"),
        adapter_params=sum(t.numel() for t in saved.values()),
    )


# ----------------------------------------------------------------------------------------------
# The hook
# ----------------------------------------------------------------------------------------------
def write_card_on_save(peft_model, output_dir: str) -> None:
    """``save_pretrained``'s card: the HTA card, or, over a README.md someone else wrote there, that README's
    text with the HTA card's metadata (as PEFT does with its own card)."""
    path = os.path.join(output_dir, "README.md")
    card = adapter_card_for(peft_model)
    if os.path.exists(path):
        existing = ModelCard.load(path)
        if "hta" not in (existing.data.tags or []):
            for key, value in card.data.to_dict().items():
                existing.data[key] = sorted({*(existing.data.tags or []), *value}) if key == "tags" else value
            card = existing
    card.save(path)


def write_card_before_upload(peft_model, working_dir: str, repo_id: str) -> None:
    """``push_to_hub``'s card: the HTA card for ``repo_id``, with the tags of the card transformers put there."""
    path = os.path.join(working_dir, "README.md")
    card = adapter_card_for(peft_model, repo_id)
    if os.path.exists(path):
        card.data.tags = list(dict.fromkeys([*card.data.tags, *(ModelCard.load(path).data.tags or [])]))
    card.save(path)
