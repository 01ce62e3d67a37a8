"""transformers ``Trainer`` for models with parameters on U(N) / O(N).

transformers' ``Trainer`` builds its optimizer from ``TrainingArguments.optim`` (AdamW by default), which would
move W off the manifold; ``unitary_rnn.manifold`` refuses that optimizer at its first step. :class:`UnitaryTrainer`
builds a :class:`~unitary_rnn.training.optim.UnitaryOptimizer` instead::

    from unitary_rnn.training import UnitaryTrainer

    trainer = UnitaryTrainer(
        model=model,
        args=TrainingArguments(output_dir="out", learning_rate=1e-3),
        train_dataset=train,
        unitary_optimizer_kwargs=dict(method="projunn_t", unitary_lr=1e-3, rank=1),
    )
    trainer.train()

Everything else (schedulers, gradient accumulation, checkpoints and resuming, evaluation, accelerate) is the
plain ``Trainer``'s.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Trainer

from .optim import _OPTIMIZER_KEYS, create_optimizer

_ADAMW_OPTIMS = ("adamw_torch", "adamw_torch_fused")


class UnitaryTrainer(Trainer):
    """A ``transformers.Trainer`` whose default optimizer is :func:`~unitary_rnn.training.optim.create_optimizer`.

    The Euclidean parameters get AdamW with the ``TrainingArguments``' ``learning_rate``, ``weight_decay``,
    ``adam_beta1``, ``adam_beta2`` and ``adam_epsilon`` (what ``Trainer`` would use); W gets the manifold step.
    ``unitary_optimizer_kwargs`` are further ``create_optimizer`` keywords (``method``, ``unitary_lr``, ``rank``,
    ``sampling``, ``base_optimizer``, ...) and take precedence. ``optimizers=`` and ``optimizer_cls_and_kwargs=``
    still replace the default, as in ``Trainer``. Any ``optim`` other than the AdamW default raises
    ``ValueError`` (it would be ignored): choose the Euclidean optimizer with ``base_optimizer``.
    """

    def __init__(self, *args: Any, unitary_optimizer_kwargs: dict[str, Any] | None = None, **kwargs: Any):
        self.unitary_optimizer_kwargs = dict(unitary_optimizer_kwargs or {})
        unknown = sorted(set(self.unitary_optimizer_kwargs) - {"method", *_OPTIMIZER_KEYS})
        if unknown:
            raise TypeError(f"unitary_optimizer_kwargs: unknown keyword(s) {unknown}; valid: {['method', *_OPTIMIZER_KEYS]}")
        super().__init__(*args, **kwargs)
        optim = getattr(self.args.optim, "value", self.args.optim)
        if optim not in _ADAMW_OPTIMS and self.optimizer is None and self.optimizer_cls_and_kwargs is None:
            raise ValueError(
                f"UnitaryTrainer builds a UnitaryOptimizer and would ignore TrainingArguments(optim={optim!r}); "
                "choose the optimizer of the Euclidean parameters with "
                "unitary_optimizer_kwargs=dict(base_optimizer='rmsprop' | 'adam' | 'adamw')"
            )

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if self.optimizer is None and self.optimizer_cls_and_kwargs is None:
            args = self.args
            settings = dict(
                lr=args.learning_rate, weight_decay=args.weight_decay, base_optimizer="adamw",
                betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
            )
            settings.update(self.unitary_optimizer_kwargs)
            self.optimizer = create_optimizer(self.model if model is None else model, **settings)
        return super().create_optimizer(model)


__all__ = ["UnitaryTrainer"]
