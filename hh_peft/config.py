"""`HouseholderConfig`: the PEFT configuration of Householder-SVD adaptation (HTA)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft.config import PeftConfig

from .functional import HOUSEHOLDER_FORMS, BlockLayout

RECTANGULAR_FORMS = ("diagonal", "square_blocks")
# Fused projections whose rows are [W_q; W_k; W_v] (consecutive row blocks), detected by `fused_projection_blocks`.
FUSED_QKV_NAMES = ("qkv", "c_attn")
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
        output_blocks: cut a layer's output into this many row blocks, each with its own ``u_in``, ``u_out``,
            ``d``, ``A``, ``B`` (what separate layers would get): an int for every target, or a dict from a name
            pattern to a number (matched like LoRA's ``rank_pattern``: the pattern is a regex that must match the
            end of the module name at a ``.`` boundary, e.g. ``{"attn.qkv": 3}``); targets it does not name are
            detected (below). ``output_blocks=1`` turns the detection off everywhere.
        input_blocks: the same for column blocks (``delta_W = [delta_1, ..., delta_k]``), e.g. ``{"mlp.fc2": 4}``
            for square blocks on a 3072 -> 768 FFN down-projection. Takes precedence over ``output_blocks``.
        rectangular: how a rectangular target nobody cut into blocks is adapted. ``"diagonal"`` (default): one
            block whose ``D`` has ``min(in, out)`` values. ``"square_blocks"``: when the longer side is a multiple
            of the shorter, square blocks along the longer side (768 -> 3072: 4 row blocks of 768 x 768), each with
            its own ``d``, Householder vectors and rank-``r`` term: ``(3 + 2 r) * max(in, out)`` parameters instead
            of ``(1 + r) * (in + out) + min(in, out)`` (768 -> 3072 with ``r = 1``: 15,360 instead of 8,448).
        adapted_blocks: name pattern -> indices of the blocks to adapt on a layer with blocks (the others get no
            update and no parameters), e.g. ``{"attn.qkv": [0, 2]}``: HTA on q and v only of a fused qkv. Patterns
            as for ``output_blocks``; unnamed layers adapt all their blocks.
        block_layout: the resolved layout, filled in when the adapter is injected and saved with it: module name
            -> ``[row blocks, column blocks]`` (and ``[..., adapted block indices]`` when not all are adapted) for
            every layer that is not one block. An adapter loads to exactly
            this layout. A saved config without the field (saved before blocks existed) is one block everywhere.

    **Detection of fused projections** (targets that neither ``output_blocks`` nor ``input_blocks`` names): an
    ``nn.Linear`` / ``Conv1D`` with ``out_features == 3 * in_features`` gets 3 row blocks (q, k, v) when it is

    * ``qkv`` of a timm module (timm's ``Attention``, ``WindowAttention``, ...: all reshape ``qkv`` as
      ``(3, heads, head_dim)``, so q, k, v are consecutive row blocks), or
    * ``c_attn`` of a transformers ``...Attention`` (GPT-2's ``Conv1D`` split into q, k, v along its outputs).

    Not detected: ``query_key_value`` of GPT-NeoX / BLOOM / Falcon, whose rows interleave q, k, v per head (no
    row blocks are q, k, v there), and anything else; name those in ``output_blocks`` only if their rows really
    are ``[W_q; W_k; W_v]``.
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
    output_blocks: Optional[Union[int, dict[str, int]]] = field(
        default=None,
        metadata={"help": "Row blocks per layer (int for all, or {name pattern: k}); None: detect fused qkv layers."},
    )
    input_blocks: Optional[Union[int, dict[str, int]]] = field(
        default=None, metadata={"help": "Column blocks per layer (int for all, or {name pattern: k})."}
    )
    rectangular: Literal["diagonal", "square_blocks"] = field(
        default="diagonal",
        metadata={"help": "'diagonal': one min(in, out) diagonal; 'square_blocks': square blocks along the longer side."},
    )
    adapted_blocks: Optional[dict[str, list[int]]] = field(
        default=None, metadata={"help": "{name pattern: [block indices]}: adapt only these blocks (e.g. q and v of a qkv)."}
    )
    block_layout: Optional[dict[str, list]] = field(
        default=None,
        metadata={"help": "Resolved on injection and saved: module name -> [row blocks, column blocks(, adapted)] (1 block if absent)."},
    )

    def __post_init__(self):
        # Only a config built from saved attributes (PEFT's `from_peft_type`, `dataclasses.replace`) passes
        # `peft_type`; one saved before block layouts existed lacks `block_layout`: its layout is one block everywhere.
        if self.peft_type is not None and self.block_layout is None:
            self.block_layout = {}
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
        for name in ("output_blocks", "input_blocks"):
            value = getattr(self, name)
            counts = value.values() if isinstance(value, dict) else [] if value is None else [value]
            if any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in counts):
                raise ValueError(f"`{name}` must be None, an integer >= 1 or a dict of name pattern -> integer >= 1, got {value!r}")
        if self.adapted_blocks is not None and (
            not isinstance(self.adapted_blocks, dict)
            or not all(isinstance(v, (list, tuple)) and v and all(isinstance(i, int) and i >= 0 for i in v) for v in self.adapted_blocks.values())
        ):
            raise ValueError(f"`adapted_blocks` must be a dict of name pattern -> non-empty list of block indices, got {self.adapted_blocks!r}")
        if self.rectangular not in RECTANGULAR_FORMS:
            raise ValueError(f"`rectangular` must be one of {RECTANGULAR_FORMS}, got {self.rectangular!r}")
        if self.block_layout is not None:
            if not isinstance(self.block_layout, dict):
                raise ValueError(f"`block_layout` must be a dict of module name -> [row blocks, column blocks], got {self.block_layout!r}")
            for key, grid in self.block_layout.items():
                BlockLayout.from_grid(grid)  # raises on a malformed entry

    # ------------------------------------------------------------------ block layout of one layer
    def layer_block_layout(
        self, key: str, target_name: str, parent, in_features: int, out_features: int, linear: bool, resolve: bool = False
    ) -> BlockLayout:
        """The block layout of the target ``key`` (its module name; ``target_name`` its attribute name in
        ``parent``). A resolved ``block_layout`` (a loaded adapter) decides alone unless ``resolve`` (the layout is
        being resolved for a fresh config); otherwise, in this order:
        ``input_blocks``, ``output_blocks``, the detection of fused projections (``linear`` layers only, see the
        class docstring), ``rectangular="square_blocks"`` (``linear`` layers only), one block."""
        if self.block_layout is not None and not resolve:
            return BlockLayout.from_grid(self.block_layout.get(key, (1, 1)))
        layout = self._resolve_blocks(key, target_name, parent, in_features, out_features, linear)
        adapted = _pattern_value(self.adapted_blocks, key)
        if adapted is not None:
            if layout.trivial:
                raise ValueError(f"`adapted_blocks` names {key!r}, which has one block (no output_blocks / input_blocks / detected fused projection)")
            layout = layout.with_adapted(adapted)
        return layout

    def _resolve_blocks(self, key, target_name, parent, in_features, out_features, linear) -> BlockLayout:
        blocks = _pattern_value(self.input_blocks, key)
        if blocks is not None and blocks > 1:
            return BlockLayout(blocks, "in")
        blocks = _pattern_value(self.output_blocks, key)
        if blocks is not None:
            return BlockLayout(blocks, "out")
        if linear and fused_projection_blocks(target_name, parent, in_features, out_features) > 1:
            return BlockLayout(3, "out")
        if linear and self.rectangular == "square_blocks":
            if out_features > in_features and out_features % in_features == 0:
                return BlockLayout(out_features // in_features, "out")
            if in_features > out_features and in_features % out_features == 0:
                return BlockLayout(in_features // out_features, "in")
        return BlockLayout()


def _pattern_value(setting, key: str):
    """``setting`` for the module ``key``: an int as it is; a dict: the value of the first pattern matching the end
    of ``key`` at a ``.`` boundary (PEFT's ``get_pattern_key`` rule), None if none does."""
    if setting is None or isinstance(setting, int):
        return setting
    for pattern, value in setting.items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return None


def fused_projection_blocks(target_name: str, parent, in_features: int, out_features: int) -> int:
    """3 for a fused ``[W_q; W_k; W_v]`` projection recognised by the rule in `HouseholderConfig`'s docstring, else
    1."""
    if target_name not in FUSED_QKV_NAMES or out_features != 3 * in_features or parent is None:
        return 1
    parent_type = type(parent)
    if target_name == "qkv" and parent_type.__module__.split(".")[0] == "timm":
        return 3
    if target_name == "c_attn" and parent_type.__module__.startswith("transformers.") and parent_type.__name__.endswith("Attention"):
        return 3
    return 1
