"""Unitary and orthogonal recurrent networks as transformers models.

``import unitary_rnn`` registers ``model_type="unitary_rnn"`` with ``AutoConfig``, ``AutoModel``,
``AutoModelForSequenceClassification`` and ``AutoModelForTokenClassification``. A folder written by
``save_pretrained`` also carries this package's model code and an ``auto_map``, so it loads with
``trust_remote_code=True`` in a process that never imports ``unitary_rnn``.
"""

from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoModelForTokenClassification

from .card import model_card_for, set_card_info, write_model_card
from .configuration_unitary_rnn import UnitaryRNNConfig
from .manifold import (
    ManifoldModule,
    manifold_of,
    manifold_parameters,
    manifold_tolerance,
    mark_manifold,
    project_to_unitary,
    unitarity_error,
)
from .modeling_unitary_rnn import (
    UnitaryRNNForSequenceClassification,
    UnitaryRNNForTokenClassification,
    UnitaryRNNModel,
    UnitaryRNNModelOutput,
    UnitaryRNNPreTrainedModel,
)
from .parametrizations import (
    modrelu,
    random_unitary,
    real_modrelu,
    restricted_unitary_apply,
    restricted_unitary_matrix,
)

AutoConfig.register(UnitaryRNNConfig.model_type, UnitaryRNNConfig, exist_ok=True)
AutoModel.register(UnitaryRNNConfig, UnitaryRNNModel, exist_ok=True)
AutoModelForSequenceClassification.register(UnitaryRNNConfig, UnitaryRNNForSequenceClassification, exist_ok=True)
AutoModelForTokenClassification.register(UnitaryRNNConfig, UnitaryRNNForTokenClassification, exist_ok=True)

# save_pretrained writes the code files and an auto_map, for trust_remote_code loading
UnitaryRNNConfig.register_for_auto_class()
UnitaryRNNModel.register_for_auto_class("AutoModel")
UnitaryRNNForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")
UnitaryRNNForTokenClassification.register_for_auto_class("AutoModelForTokenClassification")

__all__ = [
    "ManifoldModule",
    "UnitaryRNNConfig",
    "UnitaryRNNForSequenceClassification",
    "UnitaryRNNForTokenClassification",
    "UnitaryRNNModel",
    "UnitaryRNNModelOutput",
    "UnitaryRNNPreTrainedModel",
    "manifold_of",
    "manifold_parameters",
    "manifold_tolerance",
    "mark_manifold",
    "model_card_for",
    "modrelu",
    "project_to_unitary",
    "random_unitary",
    "real_modrelu",
    "restricted_unitary_apply",
    "restricted_unitary_matrix",
    "set_card_info",
    "unitarity_error",
    "write_model_card",
]
