"""Model cards for HTA adapters, and the hook that makes ``save_pretrained`` / ``push_to_hub`` use them.

Two code paths write an adapter's ``README.md``:

* ``PeftModel.save_pretrained`` calls ``PeftModel.create_or_update_model_card``, which writes a
  generic PEFT card (no HTA tags; for timm models no ``base_model``);
* ``PeftModel.push_to_hub`` is transformers' ``PushToHubMixin.push_to_hub``: it runs
  ``save_pretrained`` into a temporary folder and then *overwrites* that ``README.md`` with
  ``transformers.utils.hub.create_and_tag_model_card`` (``library_name: transformers``, no
  ``base_model``), before uploading the folder with ``_upload_modified_files``.

:func:`install_card_hook` (called once by ``import hh_peft``) wraps both methods on ``PeftModel``.
For a model whose adapters are all HTA, the card comes from :func:`build_adapter_card`; every
other PEFT model takes the original code path unchanged. The HTA push does what transformers' push
does (create the repo, ``save_pretrained`` into a temporary folder, ``_upload_modified_files``)
minus the card overwrite.

Evaluation results and other card facts go in with :func:`set_card_info` or as keyword arguments
of ``push_to_hub``::

    import hh_peft
    hh_peft.hub.set_card_info(model, base_model="google/vit-base-patch16-224-in21k", dataset="beans",
                              metrics={"accuracy": 0.97})
    model.push_to_hub("me/vit-beans-hta")           # README.md is the HTA card
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .registration import HTA_PEFT_TYPE

HTA_TAGS = ("hta", "householder", "peft")
TEMPLATE_PATH = Path(__file__).resolve().parents[1] / "model_cards" / "hta_adapter.md"
_CARD_INFO_ATTR = "_hta_card_info"
_CARD_INFO_KEYS = ("base_model", "dataset", "metrics", "trainable_params", "num_labels", "model_family", "model_name", "tags")
_HOUSEHOLDER_FORMULA = {"normalized": "I - 2 u u^T / (||u||^2 + eps)", "paper": "I - u u^T"}


# ----------------------------------------------------------------------------------------------
# Card contents
# ----------------------------------------------------------------------------------------------
def _is_hub_id(name: str | None) -> bool:
    """``owner/name`` that is not a local path: the only kind of ``base_model`` the Hub accepts."""
    return bool(name) and name.count("/") == 1 and not name.startswith((".", "/", "~")) and not os.path.exists(name)


def _versions() -> str:
    lines = []
    for dist in ("hh-peft", "peft", "transformers", "timm", "torch"):
        try:
            lines.append(f"- {dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return "\n".join(lines)


def usage_snippet(base_model: str | None, adapter_id: str, model_family: str | None = None, num_labels: int | None = None) -> str:
    """Python that loads the adapter; its first line is ``import hh_peft`` (PEFT must know the method first)."""
    labels = f", num_classes={num_labels}" if num_labels else ""
    if model_family == "timm" or (base_model or "").startswith("timm/"):
        name = f"hf-hub:{base_model}" if _is_hub_id(base_model) else (base_model or "<timm model name>")
        load = ["import timm", "", f'base = timm.create_model("{name}", pretrained=True{labels})']
    elif base_model:
        labels = f", num_labels={num_labels}" if num_labels else ""
        load = [
            "from transformers import AutoModelForImageClassification",
            "",
            f'base = AutoModelForImageClassification.from_pretrained("{base_model}"{labels})',
        ]
    else:
        load = ["", "base = ...  # the base model this adapter was trained on"]
    return "\n".join(
        [
            "import hh_peft  # registers the HTA method with PEFT: import it before loading the adapter",
            "from peft import PeftModel",
            *load,
            f'model = PeftModel.from_pretrained(base, "{adapter_id}")',
            "model = model.merge_and_unload()  # optional: fold the update into the weights (no inference cost)",
        ]
    )


def _results_table(dataset: str | None, metrics: Mapping[str, float]) -> str:
    rows = ["| dataset | metric | value |", "|---|---|---:|"]
    rows += [f"| {dataset or '-'} | {k} | {v:.4f} |" for k, v in metrics.items()]
    return "\n".join(rows)


def build_adapter_card(
    *,
    config: Any,
    base_model: str | None = None,
    repo_id: str | None = None,
    dataset: str | None = None,
    metrics: Mapping[str, float] | None = None,
    trainable_params: int | None = None,
    num_labels: int | None = None,
    model_family: str | None = None,
    model_name: str | None = None,
    tags: list[str] | tuple[str, ...] = (),
    template_path: str | os.PathLike | None = None,
) -> ModelCard:
    """The model card of an HTA adapter.

    Metadata: ``library_name: peft``, ``base_model`` (only if it is a Hub id: the Hub rejects local
    paths), tags ``hta``, ``householder``, ``peft`` (+ ``tags``), and a ``model-index`` with one
    result per entry of ``metrics`` on ``dataset``. Text: the update rule, a usage snippet starting
    with ``import hh_peft``, the adapter's settings and the results table.

    ``config`` is the adapter's ``HouseholderConfig``; ``base_model`` defaults to its
    ``base_model_name_or_path``.
    """
    if getattr(config, "peft_type", None) != HTA_PEFT_TYPE:
        raise ValueError(f"build_adapter_card expects a HouseholderConfig, got {type(config).__name__}")
    base_model = base_model or getattr(config, "base_model_name_or_path", None)
    hub_base = base_model if _is_hub_id(base_model) else None
    name = model_name or (repo_id.split("/")[-1] if repo_id else "hta-adapter")
    metrics = dict(metrics or {})
    eval_results = [
        EvalResult(
            task_type="image-classification", dataset_type=dataset, dataset_name=dataset,
            metric_type=metric, metric_value=float(value),
        )
        for metric, value in metrics.items()
    ] if dataset and metrics else None
    card_data = ModelCardData(
        library_name="peft",
        base_model=hub_base,
        tags=list(dict.fromkeys([*HTA_TAGS, *tags])),
        datasets=[dataset] if _is_hub_id(dataset) else None,
        model_name=name if eval_results else None,
        eval_results=eval_results,
        pipeline_tag="image-classification" if dataset else None,
    )
    targets = config.target_modules
    targets = ", ".join(f"`{t}`" for t in sorted(targets)) if isinstance(targets, (list, set, tuple)) else f"`{targets}`"
    to_save = ", ".join(f"`{m}`" for m in (config.modules_to_save or [])) or "none"
    template = Path(template_path) if template_path else TEMPLATE_PATH
    kwargs = dict(
        model_name=name,
        base_model=hub_base,
        dataset=dataset,
        householder=config.householder,
        householder_formula=_HOUSEHOLDER_FORMULA.get(config.householder, config.householder),
        lora_rank=config.lora_rank,
        target_modules=targets,
        modules_to_save=to_save,
        trainable_params=f"{trainable_params:,}" if trainable_params else None,
        usage=usage_snippet(base_model, repo_id or "<adapter folder or Hub id>", model_family, num_labels),
        results_table=_results_table(dataset, metrics) if metrics else None,
        versions=_versions(),
    )
    if template.exists():
        return ModelCard.from_template(card_data, template_path=str(template), **kwargs)
    # An installed (non-editable) package has no model_cards/ folder: huggingface_hub's default template.
    return ModelCard.from_template(
        card_data, model_id=name, model_summary=f"HTA (Householder-SVD adaptation) adapter for {base_model}.",
        direct_use=f"```python\n{kwargs['usage']}\n```", results=kwargs["results_table"],
    )


# ----------------------------------------------------------------------------------------------
# Card facts attached to a PeftModel
# ----------------------------------------------------------------------------------------------
def set_card_info(peft_model, **info: Any) -> None:
    """Record facts for the adapter card of ``peft_model``: ``base_model``, ``dataset``, ``metrics``
    (``{"accuracy": 0.9}``), ``trainable_params``, ``num_labels``, ``model_family`` (``"timm"`` /
    ``"transformers"``), ``model_name``, ``tags``. Later calls update earlier ones."""
    unknown = sorted(set(info) - set(_CARD_INFO_KEYS))
    if unknown:
        raise TypeError(f"unknown card field(s) {unknown}; valid fields: {', '.join(_CARD_INFO_KEYS)}")
    current = dict(getattr(peft_model, _CARD_INFO_ATTR, None) or {})
    current.update({k: v for k, v in info.items() if v is not None})
    object.__setattr__(peft_model, _CARD_INFO_ATTR, current)


def _hta_only(peft_model) -> bool:
    configs = getattr(peft_model, "peft_config", None) or {}
    return bool(configs) and all(getattr(c, "peft_type", None) == HTA_PEFT_TYPE for c in configs.values())


def _default_base_model(peft_model, config) -> tuple[str | None, str | None]:
    """(base model name, family) from the adapter config, a transformers config, or timm's pretrained_cfg."""
    base = peft_model.get_base_model()
    name = getattr(config, "base_model_name_or_path", None)
    if hasattr(base, "pretrained_cfg"):  # timm
        cfg = base.pretrained_cfg or {}
        return name or (cfg.get("hf_hub_id") or cfg.get("architecture")), "timm"
    model_config = getattr(base, "config", None)
    return name or getattr(model_config, "_name_or_path", None) or None, "transformers" if model_config is not None else None


def adapter_card_for(peft_model, repo_id: str | None = None) -> ModelCard:
    """The HTA card of ``peft_model`` from its active adapter's config and its :func:`set_card_info` facts."""
    config = peft_model.peft_config[peft_model.active_adapter]
    info = dict(getattr(peft_model, _CARD_INFO_ATTR, None) or {})
    repo_id = info.pop("repo_id", None) or repo_id
    default_base, family = _default_base_model(peft_model, config)
    info.setdefault("base_model", default_base)
    info.setdefault("model_family", family)
    if "trainable_params" not in info:
        info["trainable_params"] = sum(p.numel() for p in peft_model.parameters() if p.requires_grad) or None
    return build_adapter_card(config=config, repo_id=repo_id, **info)


def write_adapter_card(peft_model, output_dir: str, repo_id: str | None = None) -> None:
    """Write the HTA card to ``output_dir/README.md``. A card someone else wrote there keeps its text
    and gets the HTA metadata (library, base model, tags, results), as PEFT does for its own card."""
    path = os.path.join(output_dir, "README.md")
    card = adapter_card_for(peft_model, repo_id)
    if os.path.exists(path):
        existing = ModelCard.load(path)
        if "hta" not in (existing.data.tags or []):
            for key, value in card.data.to_dict().items():
                if key == "tags":
                    value = sorted(set(existing.data.tags or []) | set(value))
                existing.data[key] = value
            card = existing
    card.save(path)


# ----------------------------------------------------------------------------------------------
# The hook
# ----------------------------------------------------------------------------------------------
def install_card_hook() -> None:
    """Make ``PeftModel.save_pretrained`` and ``PeftModel.push_to_hub`` write the HTA card for HTA adapters.

    Idempotent; models whose adapters are not all HTA keep PEFT's and transformers' behaviour exactly.
    """
    from peft import PeftModel

    if getattr(PeftModel, "_hh_peft_card_hook", False):
        return
    original_card = PeftModel.create_or_update_model_card
    original_push = PeftModel.push_to_hub

    @functools.wraps(original_card)
    def create_or_update_model_card(self, output_dir: str):
        if not _hta_only(self):
            return original_card(self, output_dir)
        write_adapter_card(self, output_dir, getattr(self, _CARD_INFO_ATTR, {}).get("repo_id"))

    @functools.wraps(original_push)
    def push_to_hub(self, repo_id: str, *args, **kwargs):
        if not _hta_only(self):
            return original_push(self, repo_id, *args, **kwargs)
        return _push_hta_adapter(self, repo_id, *args, **kwargs)

    PeftModel.create_or_update_model_card = create_or_update_model_card
    PeftModel.push_to_hub = push_to_hub
    PeftModel._hh_peft_card_hook = True


def _push_hta_adapter(
    self,
    repo_id: str,
    *,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: bool | str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    max_shard_size: int | str | None = None,  # accepted for signature parity; adapters are small
    tags: list[str] | None = None,
    **card_info: Any,
):
    """transformers' ``PushToHubMixin.push_to_hub`` for an HTA adapter, with our card instead of the generic one."""
    from transformers.utils.hub import hf_api

    if card_info or tags:
        set_card_info(self, **card_info, **({"tags": tags} if tags else {}))
    repo_id = hf_api().create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    info = dict(getattr(self, _CARD_INFO_ATTR, None) or {})
    object.__setattr__(self, _CARD_INFO_ATTR, {**info, "repo_id": repo_id})
    try:
        with tempfile.TemporaryDirectory() as tmp_dir:
            self.save_pretrained(tmp_dir)  # adapter weights, adapter_config.json, README.md (the HTA card)
            return self._upload_modified_files(
                tmp_dir, repo_id, files_timestamps={}, commit_message=commit_message or "Upload HTA adapter",
                token=token, create_pr=create_pr, revision=revision, commit_description=commit_description,
            )
    finally:
        object.__setattr__(self, _CARD_INFO_ATTR, info)
