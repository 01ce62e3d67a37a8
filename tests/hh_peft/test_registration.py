"""The PeftType extension: the one place hh_peft touches PEFT's internals."""

import pickle

import pytest
from peft import PeftConfig
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType

import hh_peft
from hh_peft.registration import add_peft_type


def test_hta_is_a_full_member_of_peft_type():
    member = PeftType.HTA
    assert member is PeftType("HTA") is PeftType["HTA"] is hh_peft.HTA_PEFT_TYPE
    assert member == "HTA" and member.value == "HTA" and member.name == "HTA"
    assert member in list(PeftType) and isinstance(member, PeftType)
    assert pickle.loads(pickle.dumps(member)) is member
    assert list(PeftType).count(member) == 1


def test_registration_maps_config_tuner_and_prefix():
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.HTA] is hh_peft.HouseholderConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.HTA] is hh_peft.HouseholderModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.HTA] == "hta_" == hh_peft.HouseholderModel.prefix


def test_add_peft_type_is_idempotent_and_validates():
    assert add_peft_type("HTA") is PeftType.HTA
    with pytest.raises(ValueError, match="upper-case identifier"):
        add_peft_type("hta")


def test_config_dict_roundtrip():
    config = hh_peft.HouseholderConfig(target_modules=["q_proj"], lora_rank=2, householder="paper")
    restored = PeftConfig.from_peft_type(**config.to_dict())
    assert isinstance(restored, hh_peft.HouseholderConfig)
    assert restored.lora_rank == 2 and restored.householder == "paper" and restored.peft_type is PeftType.HTA
