"""The one place where hh_peft touches PEFT's internals: adding ``HTA`` to PEFT's closed enum.

``peft.utils.register_peft_method(name="hta", ...)`` only accepts names whose upper-case form is
already a member of ``peft.utils.PeftType`` (a ``str`` enum with no extension point). A plugin
method therefore has to add its member to the enum before registering. Everything that depends
on enum internals lives here and is covered by ``tests/hh_peft/test_registration.py``.
"""

from __future__ import annotations

import enum

from peft.utils import PeftType

HTA_METHOD_NAME = "hta"


def add_peft_type(name: str) -> PeftType:
    """Return ``PeftType[name]``, adding the member to the enum if it is not there yet (idempotent).

    The new member behaves like a built-in one: ``PeftType(name) is PeftType[name]``, it is listed by
    ``list(PeftType)``, it is a ``str`` equal to ``name`` and it pickles by name.
    """
    if not name.isupper() or not name.isidentifier():
        raise ValueError(f"a PeftType member name must be an upper-case identifier, got {name!r}")
    existing = PeftType.__members__.get(name)
    if existing is not None:
        return existing
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    member.__init__(name)
    # Bypass EnumType.__setattr__ (which forbids rebinding members), then record the member in the three
    # tables the enum machinery reads: by name, by value, and the ordered list behind iteration.
    type.__setattr__(PeftType, name, member)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    assert isinstance(member, enum.Enum) and PeftType(name) is member
    return member


HTA_PEFT_TYPE = add_peft_type(HTA_METHOD_NAME.upper())
