"""hh_peft: Householder-SVD adaptation (HTA) as a PEFT method.

``import hh_peft`` registers the method with PEFT (name ``"hta"``, ``peft_type`` ``"HTA"``,
parameter prefix ``"hta_"``), after which ``peft.get_peft_model``, ``PeftModel.from_pretrained``
and every other PEFT entry point accept a `HouseholderConfig`.
"""

from peft.utils import register_peft_method

from .config import HouseholderConfig
from .card import adapter_card_for, install_card_hook, set_card_info
from .functional import (
    delta_weight,
    householder_apply,
    householder_coefficient,
    hta_activation_delta,
    hta_factors,
    hta_factors_backward,
    hta_scalars,
)
from .hotswap import hotswap_adapter
from .layer import Conv2d, HouseholderLayer, Linear
from .model import HouseholderModel
from .persistence import install_persistence_hooks
from .registration import HTA_METHOD_NAME, HTA_PEFT_TYPE

__all__ = [
    "HTA_PEFT_TYPE",
    "Conv2d",
    "HouseholderConfig",
    "HouseholderLayer",
    "HouseholderModel",
    "Linear",
    "adapter_card_for",
    "set_card_info",
    "delta_weight",
    "householder_apply",
    "householder_coefficient",
    "hta_activation_delta",
    "hta_factors",
    "hta_factors_backward",
    "hta_scalars",
    "hotswap_adapter",
]

register_peft_method(name=HTA_METHOD_NAME, config_cls=HouseholderConfig, model_cls=HouseholderModel)
# save_pretrained and push_to_hub write the HTA card (library_name: peft) for models whose adapters are all HTA;
# push_to_hub alone would replace any card with transformers' generic one (hh_peft/card.py).
install_card_hook()
# For HTA adapters, save_pretrained replaces the folder atomically and a failed from_pretrained / load_adapter leaves
# the model as it was (hh_peft/persistence.py).
install_persistence_hooks()
