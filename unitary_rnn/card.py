"""Model cards of unitary-RNN models.

transformers' ``push_to_hub`` uploads what ``save_pretrained`` writes for our models (``config.json`` with an
``auto_map``, ``model.safetensors``, and this package's model code for ``trust_remote_code=True``), after writing
a generic ``README.md`` into the folder. ``UnitaryRNNPreTrainedModel._upload_modified_files``, the last step of
that push, calls :func:`write_model_card` first, so the uploaded ``README.md`` is this card.

The card reads the architecture from ``model.config``; how the model was trained and what it scored are given
with :func:`set_card_info` before pushing (or before :func:`write_model_card` for a local folder)::

    unitary_rnn.set_card_info(model, task="copy memory (T=1000)", dataset="copy", metrics={"loss": 2e-5},
                              optimizer="projunn_t", projunn_rank=1)
    model.push_to_hub("me/urnn-copy")
"""

from __future__ import annotations

import importlib.metadata
import os
from importlib import resources
from typing import Mapping

from huggingface_hub import EvalResult, ModelCard, ModelCardData

TEMPLATE = resources.files(__package__) / "templates" / "model_card.md"
MANIFOLD_OPTIMIZERS = ("cayley", "projunn_d", "projunn_t")
_HEAD_TASKS = {"ForSequenceClassification": "text-classification", "ForTokenClassification": "token-classification"}
_CARD_INFO_ATTR = "_unitary_rnn_card_info"


def set_card_info(model, *, task: str | None = None, dataset: str | None = None,
                  metrics: Mapping[str, float] | None = None, task_type: str | None = None,
                  optimizer: str | None = None, projunn_rank: int | None = None) -> None:
    """Record how ``model`` was trained and what it scored, for its card; later calls update earlier ones,
    ``None`` keeps a value.

    ``task``: what the model was trained on, in words. ``metrics``: ``{"accuracy": 0.9}`` measured on
    ``dataset``. ``task_type``: the Hub task of the results (default from the head: sequence ->
    text-classification, token -> token-classification). ``optimizer``: the manifold step that trained W
    (``"cayley"``, ``"projunn_d"``, ``"projunn_t"``), with ``projunn_rank`` for projUNN. Tags are transformers'
    own: ``model.add_model_tags([...])`` or ``push_to_hub(..., tags=[...])``.
    """
    if optimizer not in (None, *MANIFOLD_OPTIMIZERS):
        raise ValueError(f"optimizer={optimizer!r} is not a manifold optimizer; valid: {', '.join(MANIFOLD_OPTIMIZERS)}")
    recorded = getattr(model, _CARD_INFO_ATTR, {})
    for name, value in dict(task=task, dataset=dataset, metrics=metrics, task_type=task_type, optimizer=optimizer,
                            projunn_rank=projunn_rank).items():
        if value is not None:
            recorded[name] = value
    setattr(model, _CARD_INFO_ATTR, recorded)


def training_method(config, optimizer: str | None = None, projunn_rank: int | None = None) -> str:
    """How W is kept on the manifold, in words: ``optimizer`` / ``projunn_rank`` (the card facts), else the
    config's training defaults where it still has them, else a pointer to the training settings."""
    if config.parametrization == "restricted":
        return "an ordinary optimizer on its 7N real parameters (W is unitary by construction)"
    optimizer = optimizer or getattr(config, "optimizer", None)
    rank = projunn_rank or getattr(config, "projunn_rank", None)
    rank = f" (rank {rank})" if rank else ""
    return {
        "cayley": "the multiplicative Cayley step W <- (I + lr/2 A)^-1 (I - lr/2 A) W, A = G W^H - W G^H",
        "projunn_d": f"projUNN-D{rank}: W <- polar(W - lr a b^H)",
        "projunn_t": f"projUNN-T{rank}: W <- W exp(-lr skew(W^H a b^H))",
    }.get(optimizer, "a manifold optimizer (see the training settings)")


def model_card_for(model, repo_id: str | None = None) -> ModelCard:
    """The card of ``model`` (any ``UnitaryRNNPreTrainedModel``), to be loaded from ``repo_id``.

    Metadata: ``library_name: transformers``, tags ``unitary-rnn`` or ``orthogonal-rnn`` and ``custom_code``
    (+ the model's ``model_tags``), a ``model-index`` with one result per metric. Text
    (``templates/model_card.md``): the recurrence, how W is parametrised and trained, and how to load the model
    with and without the ``unitary_rnn`` package.
    """
    config = model.config
    info = getattr(model, _CARD_INFO_ATTR, {})
    architecture = type(model).__name__
    head = next((suffix for suffix in _HEAD_TASKS if architecture.endswith(suffix)), None)
    kind = "unitary" if config.field == "complex" else "orthogonal"
    name = repo_id.split("/")[-1] if repo_id else f"{kind}-rnn-{config.hidden_size}"
    results = [
        EvalResult(task_type=info.get("task_type") or _HEAD_TASKS.get(head, "other"), task_name=info.get("task"),
                   dataset_type=info.get("dataset"), dataset_name=info.get("dataset"), metric_type=metric,
                   metric_value=float(value))
        for metric, value in (info.get("metrics") or {}).items()
    ]
    card_data = ModelCardData(
        library_name="transformers",
        tags=list(dict.fromkeys([f"{kind}-rnn", "custom_code", *(model.model_tags or [])])),
        model_name=name if results else None,
        eval_results=results or None,
    )
    return ModelCard.from_template(
        card_data,
        template_str=TEMPLATE.read_text(encoding="utf-8"),
        config=config,
        info=info,
        training=training_method(config, info.get("optimizer"), info.get("projunn_rank")),
        num_parameters=f"{sum(p.numel() * (2 if p.is_complex() else 1) for p in model.parameters()):,}",
        model_name=name,
        kind=kind,
        architecture=architecture,
        auto_class=f"AutoModel{head or ''}",
        model_ref=repo_id or "<model folder or Hub id>",
        versions={dist: importlib.metadata.version(dist) for dist in ("hh-peft", "transformers", "torch")},
    )


def write_model_card(model, folder: str | os.PathLike, repo_id: str | None = None) -> None:
    """Write the card of ``model`` to ``folder/README.md``, keeping the tags of a card already there (transformers'
    push writes one with the push's ``tags`` and the model's ``model_tags``)."""
    path = os.path.join(folder, "README.md")
    card = model_card_for(model, repo_id)
    if os.path.exists(path):
        card.data.tags = list(dict.fromkeys([*card.data.tags, *(ModelCard.load(path).data.tags or [])]))
    card.save(path)
