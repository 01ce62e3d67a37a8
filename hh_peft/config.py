"""`HouseholderConfig`: the PEFT configuration of Householder-SVD adaptation (HTA)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft.config import PeftConfig

from .functional import HOUSEHOLDER_FORMS
from .registration import HTA_PEFT_TYPE


@dataclass
class HouseholderConfig(PeftConfig):
    """Configuration of a [`HouseholderModel`]: per targeted layer, the additive update

        delta_W = H(u_out) D H(u_in) + B A

    with ``H(u)`` a Householder matrix built from one vector, ``D`` the rectangular diagonal of
    ``min(in, out)`` learned values and ``B A`` a rank-``lora_rank`` term ("Efficient Adaptation of
    Pre-trained Vision Transformer via Householder Transformation", NeurIPS 2024).

    Args:
        target_modules: names (exact or suffix match), a regex string, or ``"all-linear"``: the layers to adapt.
            ``nn.Linear``, transformers' ``Conv1D`` and ``nn.Conv2d`` are supported.
        exclude_modules: names or a regex of modules never to adapt.
        lora_rank: rank ``r`` of the additive low-rank term ``B A`` (default 1, the paper's HTA; 0 disables it).
        householder: ``"normalized"`` (default) uses ``H(u) = I - 2 u u^T / ||u||^2``, exactly orthogonal
            for any ``u``; ``"paper"`` uses the printed ``H(u) = I - u u^T``.
        eps: in the normalised form, vectors with ``||u||^2 <= eps`` give ``H = I`` (no division by zero, no NaN).
        init_weights: ``True``: the adapter starts as the identity (``D = 0``, ``B = 0``; ``u_in``, ``u_out``, ``A``
            random and non-zero). ``False``: every factor random, so the adapter changes the output (for tests).
        dropout: dropout on the adapter's input (the base path never sees it).
        fan_in_fan_out: ``True`` when the base layer stores its weight as (in, out) (GPT-2's ``Conv1D``); set
            automatically for ``Conv1D``.
        layers_to_transform / layers_pattern: restrict adaptation to these layer indices of the block list.
        modules_to_save: extra modules (e.g. the classification head) trained in full and saved with the adapter.
    """

    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Module names (exact or suffix), a regex, or 'all-linear': the layers to adapt with HTA."},
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or a regex of modules not to adapt."}
    )
    lora_rank: int = field(default=1, metadata={"help": "Rank of the additive B A term; 0 disables it."})
    householder: Literal["normalized", "paper"] = field(
        default="normalized",
        metadata={"help": "'normalized': I - 2uu^T/||u||^2, exactly orthogonal; 'paper': I - uu^T as printed."},
    )
    eps: float = field(default=1e-12, metadata={"help": "Normalised form: a vector with ||u||^2 <= eps gives H = I (no NaN)."})
    init_weights: bool = field(
        default=True, metadata={"help": "True: the adapter starts as the identity; False: random (for tests)."}
    )
    dropout: float = field(default=0.0, metadata={"help": "Dropout probability on the adapter's input."})
    fan_in_fan_out: bool = field(
        default=False, metadata={"help": "True if the base layer stores its weight as (in, out), like GPT-2's Conv1D."}
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Only adapt the layers with these indices."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Name of the nn.ModuleList holding the layers (used with layers_to_transform)."}
    )
    modules_to_save: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Modules besides the adapted layers to train in full and save, e.g. the classifier head."},
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = HTA_PEFT_TYPE
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int) or self.lora_rank < 0:
            raise ValueError(f"`lora_rank` must be an integer >= 0 (0 disables the B A term), got {self.lora_rank!r}")
        if self.householder not in HOUSEHOLDER_FORMS:
            raise ValueError(f"`householder` must be one of {HOUSEHOLDER_FORMS}, got {self.householder!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1), got {self.dropout!r}")
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) or not 0.0 < self.eps < math.inf:
            raise ValueError(
                f"`eps` must be a finite number > 0 (it keeps a zero Householder vector finite), got {self.eps!r}"
            )
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("`layers_to_transform` cannot be used when `target_modules` is a regex string.")
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise ValueError("`layers_pattern` cannot be used when `target_modules` is a regex string.")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("When `layers_pattern` is specified, `layers_to_transform` must also be specified.")
