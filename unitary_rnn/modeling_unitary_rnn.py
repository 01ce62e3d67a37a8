"""Unitary / orthogonal RNNs as transformers models: the base model and two task heads.

Inputs follow transformers' conventions: ``input_ids`` ``(batch, time)`` for symbol tasks (one-hot or a
learned embedding, per ``config.input_embedding``) or ``inputs_embeds`` ``(batch, time, input_size)``
for real-valued features; ``labels`` for the loss. Every step's state is exposed as the real features
``[Re h_t ; Im h_t]`` (``config.feature_size`` = 2N, or N for ``field="real"``).

Only relative imports inside the package: ``save_pretrained`` copies this folder's files next to the
weights for ``trust_remote_code=True`` loading.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import SequenceClassifierOutput, TokenClassifierOutput
from transformers.utils import ModelOutput
from transformers.utils.generic import can_return_tuple

from .cells import UnitaryRNNCell, refuse_complex_conversion
from .configuration_unitary_rnn import UnitaryRNNConfig
from .manifold import check_manifold_state_dict, check_on_manifold, manifold_parameters

__all__ = [
    "OneHotEmbedding",
    "UnitaryRNNForSequenceClassification",
    "UnitaryRNNForTokenClassification",
    "UnitaryRNNModel",
    "UnitaryRNNModelOutput",
    "UnitaryRNNPreTrainedModel",
]


@dataclass
class UnitaryRNNModelOutput(ModelOutput):
    """Output of :class:`UnitaryRNNModel`.

    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(batch, time, feature_size)`):
            Every step's hidden state as real features ``[Re h_t ; Im h_t]`` (``feature_size = 2N``; N for
            ``field="real"``).
        final_state (`torch.FloatTensor` of shape `(batch, feature_size)`):
            The state after the last step (pass it as ``initial_state`` to continue the sequence).
        hidden_states (`tuple(torch.FloatTensor)`, *optional*, returned with ``output_hidden_states=True``):
            ``(x, states)``: the input features ``(batch, time, input_size)`` fed to the cell and the
            states ``(batch, time, feature_size)``.
    """

    last_hidden_state: torch.FloatTensor | None = None
    final_state: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


class OneHotEmbedding(nn.Module):
    """``input_ids -> one_hot(input_ids, num_embeddings)`` as floats: the fixed input map of the symbol
    tasks in the papers (``V`` then acts on the one-hot vector). No parameters."""

    def __init__(self, num_embeddings: int):
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = num_embeddings

    def forward(self, input_ids: torch.LongTensor) -> torch.Tensor:
        return nn.functional.one_hot(input_ids, self.num_embeddings).to(torch.get_default_dtype())

    def extra_repr(self) -> str:
        return f"num_embeddings={self.num_embeddings}"


class UnitaryRNNPreTrainedModel(PreTrainedModel):
    config_class = UnitaryRNNConfig
    config: UnitaryRNNConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = False
    _no_split_modules = ["UnitaryRNNCell"]

    @torch.no_grad()
    def _init_weights(self, module):
        """transformers' defaults (heads and embedding: normal(0, initializer_range), zero bias), and for
        the cell every parameter and buffer from :meth:`UnitaryRNNCell.initial_values` (W per
        ``config.unitary_init``, unitary / orthogonal to working precision)."""
        super()._init_weights(module)
        if isinstance(module, UnitaryRNNCell):
            for name, value in module.initial_values().items():
                target = getattr(module, name)
                init.copy_(target, value.to(dtype=target.dtype, device=target.device))

    def _apply(self, fn, recurse=True):
        refuse_complex_conversion(fn, type(self).__name__)  # before any submodule is converted
        return super()._apply(fn, recurse)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict``, after checking every manifold matrix in ``state_dict`` (W finite
        and within ``unitary_rnn.manifold.manifold_tolerance``): a rejected checkpoint raises ``ValueError``
        before anything is copied, so the model is left as it was."""
        check_manifold_state_dict(self, state_dict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """transformers' ``from_pretrained``, then a check that every manifold matrix loaded is finite and
        within ``unitary_rnn.manifold.manifold_tolerance`` (``ValueError`` naming it otherwise)."""
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # output_loading_info=True
        for name, p in manifold_parameters(model).items():
            if not p.is_meta:
                check_on_manifold(p, f"{cls.__name__}.from_pretrained: {name}")
        return loaded

    def _upload_modified_files(self, working_dir, repo_id, *args, **kwargs):
        """The last step of transformers' ``push_to_hub`` (and of ``save_pretrained(push_to_hub=True)``), which has
        just written a generic ``README.md`` into ``working_dir``: it becomes this model's card before the upload."""
        try:  # the card ships with the unitary_rnn package, not with this file's trust_remote_code copy
            from unitary_rnn.card import write_model_card
        except ImportError:  # loaded with trust_remote_code where the package is not installed: transformers' card
            pass
        else:
            write_model_card(self, working_dir, repo_id)
        return super()._upload_modified_files(working_dir, repo_id, *args, **kwargs)


def _embed(model: "UnitaryRNNModel", input_ids, inputs_embeds) -> torch.Tensor:
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("Pass exactly one of input_ids (batch, time) and inputs_embeds (batch, time, input_size)")
    if inputs_embeds is not None:
        if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != model.config.input_size:
            raise ValueError(
                f"inputs_embeds must be (batch, time, input_size={model.config.input_size}), got {tuple(inputs_embeds.shape)}"
            )
        return inputs_embeds
    if model.embeddings is None:
        raise ValueError("input_ids need config.vocab_size (and input_embedding); pass inputs_embeds instead")
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be (batch, time), got shape {tuple(input_ids.shape)}")
    return model.embeddings(input_ids)


class UnitaryRNNModel(UnitaryRNNPreTrainedModel):
    """The bare unitary RNN: inputs -> every step's state ``(batch, time, feature_size)`` and the last one."""

    def __init__(self, config: UnitaryRNNConfig):
        super().__init__(config)
        if config.vocab_size is None:
            self.embeddings = None
        elif config.input_embedding == "one_hot":
            self.embeddings = OneHotEmbedding(config.vocab_size)
        else:
            self.embeddings = nn.Embedding(config.vocab_size, config.input_size)
        self.cell = UnitaryRNNCell(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module | None:
        return self.embeddings

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.embeddings = value

    def recurrent_matrix(self) -> torch.Tensor:
        """W as a dense N x N matrix (see :meth:`UnitaryRNNCell.recurrent_matrix`)."""
        return self.cell.recurrent_matrix()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        initial_state: torch.FloatTensor | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> UnitaryRNNModelOutput:
        r"""
        input_ids (`torch.LongTensor` of shape `(batch, time)`, *optional*):
            Symbols, mapped to ``x_t`` by ``config.input_embedding``.
        inputs_embeds (`torch.FloatTensor` of shape `(batch, time, input_size)`, *optional*):
            Real input features ``x_t`` (exactly one of ``input_ids`` and ``inputs_embeds``).
        initial_state (`torch.FloatTensor` of shape `(batch, feature_size)`, *optional*):
            Start from this state instead of the learned ``h_0``.
        """
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        x = _embed(self, input_ids, inputs_embeds)
        states, final = self.cell(x, initial_state)
        return UnitaryRNNModelOutput(
            last_hidden_state=states,
            final_state=final,
            hidden_states=(x, states) if output_hidden_states else None,
        )


def _last_valid_step(states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The state at each sequence's last unmasked step (right padding), or at the last step."""
    if attention_mask is None:
        return states[:, -1]
    mask = attention_mask.to(torch.long)
    if mask.shape != states.shape[:2]:
        raise ValueError(f"attention_mask must be (batch, time) = {tuple(states.shape[:2])}, got {tuple(mask.shape)}")
    if (mask[:, 1:] > mask[:, :-1]).any():
        raise ValueError("attention_mask: only right padding is supported by a recurrent model (ones, then zeros)")
    last = (mask.sum(dim=1) - 1).clamp_min(0)
    return states[torch.arange(states.shape[0], device=states.device), last.to(states.device)]


class _UnitaryRNNWithLinearHead(UnitaryRNNPreTrainedModel):
    """The shared body of the task heads: one `UnitaryRNNModel` and a linear ``classifier`` on its real features."""

    def __init__(self, config: UnitaryRNNConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = UnitaryRNNModel(config)
        self.classifier = nn.Linear(config.feature_size, config.num_labels)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module | None:
        return self.model.embeddings

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.embeddings = value


class UnitaryRNNForSequenceClassification(_UnitaryRNNWithLinearHead):
    """A linear head on the last step's state. ``num_labels=1`` is regression (MSE), as in transformers;
    ``config.problem_type`` picks single- / multi-label classification otherwise."""

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        initial_state: torch.FloatTensor | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> SequenceClassifierOutput:
        r"""
        attention_mask (`torch.Tensor` of shape `(batch, time)`, *optional*):
            Right padding only: the head reads each sequence's last unmasked step.
        labels (`torch.Tensor` of shape `(batch,)` or `(batch, num_labels)`, *optional*):
            Class indices (single-label), floats (regression, multi-label).
        """
        outputs = self.model(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            initial_state=initial_state,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        pooled = _last_valid_step(outputs.last_hidden_state, attention_mask)
        logits = self.classifier(pooled)
        loss = None
        if labels is not None:
            loss = self.loss_function(labels=labels, pooled_logits=logits, config=self.config, **kwargs)
        return SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states)


class UnitaryRNNForTokenClassification(_UnitaryRNNWithLinearHead):
    """A linear head on every step's state; labels ``(batch, time)``, ``-100`` ignored (the copy task)."""

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        initial_state: torch.FloatTensor | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> TokenClassifierOutput:
        r"""
        labels (`torch.LongTensor` of shape `(batch, time)`, *optional*):
            A class per step; ``-100`` steps are ignored by the cross-entropy.
        """
        outputs = self.model(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            initial_state=initial_state,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        logits = self.classifier(outputs.last_hidden_state)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.config, **kwargs)
        return TokenClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states)
