"""Model cards for unitary RNNs and a push that uploads them.

transformers' ``PreTrainedModel.push_to_hub`` already uploads what ``save_pretrained`` writes for
our models (``config.json`` with an ``auto_map``, ``model.safetensors``, and the package's model code
for ``trust_remote_code=True``), but then replaces ``README.md`` with a generic card. :func:`push_to_hub`
runs the same steps (create the repo, ``save_pretrained`` into a temporary folder,
``_upload_modified_files``) with the card of :func:`build_unitary_rnn_card` instead.

:func:`install_card_hook` makes ``model.push_to_hub(...)`` on every ``UnitaryRNNPreTrainedModel``
do this (``import unitary_rnn`` calls it); card facts (``task``, ``dataset``, ``metrics``) are then
keyword arguments of ``push_to_hub``.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

from huggingface_hub import EvalResult, ModelCard, ModelCardData

TEMPLATE_PATH = Path(__file__).resolve().parents[1] / "model_cards" / "unitary_rnn.md"
_TASK_TYPES = {"ForSequenceClassification": "text-classification", "ForTokenClassification": "token-classification"}


def _versions() -> str:
    lines = []
    for dist in ("hh-peft", "transformers", "torch"):
        try:
            lines.append(f"- {dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return "\n".join(lines)


def _parametrization_text(config) -> str:
    if config.parametrization == "restricted":
        return (
            "W is the restricted product D3 R2 F^-1 D2 Pi R1 F D1 of Arjovsky et al. (7N real parameters, "
            "O(N log N) per step)."
        )
    group = "unitary" if config.field == "complex" else "orthogonal"
    method = {
        "cayley": "the multiplicative Cayley step W <- (I + lr/2 A)^-1 (I - lr/2 A) W, A = G W^H - W G^H",
        "projunn_d": f"projUNN-D (rank {config.projunn_rank}): W <- polar(W + a b^H)",
        "projunn_t": f"projUNN-T (rank {config.projunn_rank}): W <- W exp(skew(W^H a b^H))",
    }[config.optimizer]
    return f"W is a full {group} N x N matrix (full capacity, Wisdom et al.), trained on the manifold by {method}."


def build_unitary_rnn_card(
    model,
    *,
    repo_id: str | None = None,
    task: str | None = None,
    dataset: str | None = None,
    metrics: Mapping[str, float] | None = None,
    task_type: str | None = None,
    tags: list[str] | tuple[str, ...] = (),
    template_path: str | os.PathLike | None = None,
) -> ModelCard:
    """The model card of a unitary-RNN model (any ``UnitaryRNNPreTrainedModel``).

    Metadata: ``library_name: transformers``, tags (``unitary-rnn`` or ``orthogonal-rnn``,
    ``custom_code``, + ``tags``), a ``model-index`` with one result per entry of ``metrics``
    measured on ``dataset`` (``task_type`` defaults from the head: sequence -> text-classification,
    token -> token-classification). Text: the recurrence, how W is parametrised and trained, and
    how to load the model with and without the ``unitary_rnn`` package.
    """
    config = model.config
    architecture = type(model).__name__
    name = repo_id.split("/")[-1] if repo_id else f"unitary-rnn-{config.hidden_size}"
    kind = "unitary" if config.field == "complex" else "orthogonal"
    task_type = task_type or next((v for k, v in _TASK_TYPES.items() if architecture.endswith(k)), "other")
    metrics = dict(metrics or {})
    eval_results = [
        EvalResult(task_type=task_type, task_name=task, dataset_type=dataset, dataset_name=dataset,
                   metric_type=metric, metric_value=float(value))
        for metric, value in metrics.items()
    ] if dataset and metrics else None
    card_data = ModelCardData(
        library_name="transformers",
        tags=list(dict.fromkeys([f"{kind}-rnn", "custom_code", *tags])),
        model_name=name if eval_results else None,
        eval_results=eval_results,
    )
    auto = next((f"AutoModel{k}" for k in _TASK_TYPES if architecture.endswith(k)), "AutoModel")
    ref = repo_id or "<model folder or Hub id>"
    rows = ["| task | dataset | metric | value |", "|---|---|---|---:|"]
    rows += [f"| {task or '-'} | {dataset or '-'} | {k} | {v:.4f} |" for k, v in metrics.items()]
    kwargs = dict(
        model_name=name,
        kind=kind,
        task=task,
        field=config.field,
        hidden_size=config.hidden_size,
        parametrization=config.parametrization,
        parametrization_text=_parametrization_text(config),
        optimizer=config.optimizer if config.parametrization == "full" else "ordinary (RMSprop / Adam)",
        architecture=architecture,
        num_parameters=f"{sum(p.numel() * (2 if p.is_complex() else 1) for p in model.parameters()):,} (real)",
        usage="\n".join([
            "import unitary_rnn  # registers model_type 'unitary_rnn' with the Auto classes",
            f"from transformers import {auto}",
            "",
            f'model = {auto}.from_pretrained("{ref}")',
        ]),
        remote_usage="\n".join([
            f"from transformers import {auto}",
            "",
            f'model = {auto}.from_pretrained("{ref}", trust_remote_code=True)',
        ]),
        results_table="\n".join(rows) if metrics else None,
        versions=_versions(),
    )
    template = Path(template_path) if template_path else TEMPLATE_PATH
    if template.exists():
        return ModelCard.from_template(card_data, template_path=str(template), **kwargs)
    return ModelCard.from_template(  # installed without the repository's model_cards/: the default template
        card_data, model_id=name, model_summary=_parametrization_text(config),
        direct_use=f"```python\n{kwargs['usage']}\n```", results=kwargs["results_table"],
    )


def push_to_hub(
    model,
    repo_id: str,
    *,
    task: str | None = None,
    dataset: str | None = None,
    metrics: Mapping[str, float] | None = None,
    task_type: str | None = None,
    tags: list[str] | None = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: bool | str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    max_shard_size: int | str | None = "50GB",
) -> Any:
    """Upload ``model``: ``config.json`` (with ``auto_map``), ``model.safetensors``, the model code and its card."""
    from transformers.utils.hub import hf_api

    repo_id = hf_api().create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    card = build_unitary_rnn_card(
        model, repo_id=repo_id, task=task, dataset=dataset, metrics=metrics, task_type=task_type, tags=tags or ()
    )
    with tempfile.TemporaryDirectory() as tmp_dir:
        model.save_pretrained(tmp_dir, max_shard_size=max_shard_size)  # safetensors + code files for trust_remote_code
        card.save(os.path.join(tmp_dir, "README.md"))
        return model._upload_modified_files(
            tmp_dir, repo_id, files_timestamps={}, commit_message=commit_message or "Upload unitary RNN",
            token=token, create_pr=create_pr, revision=revision, commit_description=commit_description,
        )


def install_card_hook() -> None:
    """``UnitaryRNNPreTrainedModel.push_to_hub`` becomes :func:`push_to_hub` (idempotent)."""
    from .modeling_unitary_rnn import UnitaryRNNPreTrainedModel

    if getattr(UnitaryRNNPreTrainedModel, "_unitary_rnn_card_hook", False):
        return

    @functools.wraps(push_to_hub)
    def _push(self, repo_id: str, **kwargs):
        return push_to_hub(self, repo_id, **kwargs)

    UnitaryRNNPreTrainedModel.push_to_hub = _push
    UnitaryRNNPreTrainedModel._unitary_rnn_card_hook = True
