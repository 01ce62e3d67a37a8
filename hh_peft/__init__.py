"""hh_peft: Householder-SVD adaptation (HTA) as a PEFT method.

``import hh_peft`` registers the method with PEFT (name ``"hta"``, ``peft_type`` ``"HTA"``,
parameter prefix ``"hta_"``), after which ``peft.get_peft_model``, ``PeftModel.from_pretrained``
and every other PEFT entry point accept a `HouseholderConfig`.
"""

from peft.utils import register_peft_method

from .config import HouseholderConfig
from .card import adapter_card_for, set_card_info
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
from . import peft_patches
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
# The five PeftModel methods hh_peft wraps, each for HTA models only (hh_peft/peft_patches.py): save_pretrained
# replaces the folder atomically, from_pretrained / load_adapter check a folder first and leave the model as it was
# when they fail, and save_pretrained / push_to_hub write the HTA card.
peft_patches.install()
