"""HTA tuner layers: `HouseholderLayer` (the adapter state) and its `Linear` / `Conv2d` variants.

Adapter state lives in ``ParameterDict``s keyed by adapter name. ``merge`` / ``unmerge`` /
``get_delta_weight`` are the only methods that touch the base weight.

Forward paths of `Linear` (chosen per call, all computing ``base(x) + x delta_W^T``):

* **folded** (no dropout, no autocast, one dtype: the training and inference default).
  ``y = x (W + delta_W)^T + b`` is a single matmul; ``delta_W`` costs O(in * out) to build.
  The custom autograd function (`functional.FoldedHTALinear`, beside the maths it calls) takes the parameter gradients by low-rank contractions
  (``dU = G^T (X V)``, ``dV = X^T (G U)``, ``dd = sum_n G[:, :m] * X[:, :m]``), never forming the full
  ``out x in`` weight gradient, rebuilds ``W + delta_W`` in backward instead of storing it, and carries the
  gradients of U, V and d to the raw parameters with the chain rule written out
  (`functional.hta_factors_backward`): one autograd node per layer, whatever the number of active adapters.
* **activation space** (dropout, autocast, mixed dtypes, per-sample
  ``adapter_names``): ``base(x) + (drop(x) V) U^T + drop(x)[:, :m] * d``, like LoRA.

**Blocks.** An adapter may cut its layer into ``k`` blocks, each with its own ``u_in``, ``u_out``, ``d``, ``A``, ``B``
(`functional.BlockLayout`; a fused ``qkv`` gets one block per projection). The tensors keep their names and are
stored flat, the blocks one after the other, so one block has exactly the shapes of an adapter saved before blocks
existed. The layout of each adapter is ``hta_layout[adapter_name]``.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import HouseholderConfig
from .functional import (
    ONE_BLOCK,
    AdapterSpec,
    BlockLayout,
    FoldedHTALinear,
    HTATensors,
    adapter_factors,
    delta_weight,
    hta_activation_delta,
    hta_factors,
    pack_adapters,
)

SUPPORTED_LAYER_TYPES = (nn.Linear, Conv1D, nn.Conv2d)

# The folded path's autograd Function lives beside the maths it calls (`functional.FoldedHTALinear`).
_FoldedHTALinear = FoldedHTALinear


class HouseholderLayer(BaseTunerLayer):
    """Adapter state of one adapted layer: per adapter ``u_in`` (in), ``u_out`` (out), ``d`` (min(in, out)),
    ``A`` (r, in) and ``B`` (out, r), or with ``k`` blocks of ``out_b x in_b`` each block's tensors one after the
    other (`functional.BlockLayout.parameter_shapes`). ``in`` is ``in_channels * kh * kw`` for a Conv2d."""

    adapter_layer_names = ("hta_u_in", "hta_u_out", "hta_d", "hta_A", "hta_B")
    other_param_names = ("hta_lora_rank", "hta_householder", "hta_eps", "hta_dropout", "hta_layout")

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.hta_u_in = nn.ParameterDict({})
        self.hta_u_out = nn.ParameterDict({})
        self.hta_d = nn.ParameterDict({})
        self.hta_A = nn.ParameterDict({})
        self.hta_B = nn.ParameterDict({})
        self.hta_lora_rank: dict[str, int] = {}
        self.hta_householder: dict[str, str] = {}
        self.hta_eps: dict[str, float] = {}
        self.hta_layout: dict[str, BlockLayout] = {}
        self.hta_dropout = nn.ModuleDict({})
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.cast_input_dtype_enabled = True
        self.kwargs = kwargs

        base_layer = self.get_base_layer()
        if isinstance(base_layer, nn.Linear):
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        elif isinstance(base_layer, Conv1D):
            self.in_features, self.out_features = base_layer.weight.shape  # Conv1D stores (in, out)
        elif isinstance(base_layer, nn.Conv2d):
            if base_layer.groups != 1:
                raise TypeError(
                    f"HTA adapts nn.Conv2d only with groups=1 (its weight as an out x (in*kh*kw) map); "
                    f"got groups={base_layer.groups}"
                )
            kh, kw = base_layer.kernel_size
            self.in_features, self.out_features = base_layer.in_channels * kh * kw, base_layer.out_channels
        else:
            raise TypeError(unsupported_layer_message("", base_layer))

    def update_layer(self, adapter_name: str, config: HouseholderConfig, layout: BlockLayout = ONE_BLOCK, **kwargs) -> None:
        """Create (or replace) the adapter ``adapter_name`` on this layer from ``config``, cut into ``layout``'s
        blocks (`HouseholderModel` resolves the layout from the config, `HouseholderConfig.block_layout`)."""
        rank = config.lora_rank
        if rank < 0:
            raise ValueError(f"`lora_rank` must be >= 0, got {rank}")
        shapes = layout.parameter_shapes(self.out_features, self.in_features, rank)
        self.hta_lora_rank[adapter_name] = rank
        self.hta_householder[adapter_name] = config.householder
        self.hta_eps[adapter_name] = config.eps
        self.hta_layout[adapter_name] = layout
        self.hta_dropout[adapter_name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.hta_u_in[adapter_name] = nn.Parameter(torch.empty(shapes["u_in"]))
        self.hta_u_out[adapter_name] = nn.Parameter(torch.empty(shapes["u_out"]))
        self.hta_d[adapter_name] = nn.Parameter(torch.empty(shapes["d"]))
        if rank > 0:
            self.hta_A[adapter_name] = nn.Parameter(torch.empty(shapes["A"]))
            self.hta_B[adapter_name] = nn.Parameter(torch.empty(shapes["B"]))
        else:  # a replaced adapter may have had a B A term
            for low_rank in (self.hta_A, self.hta_B):
                if adapter_name in low_rank:
                    del low_rank[adapter_name]
        self.reset_hta_parameters(adapter_name, config.init_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    @torch.no_grad()
    def reset_hta_parameters(self, adapter_name: str, init_weights: bool = True) -> None:
        """Identity at init (PEFT's rule): ``d = 0`` and ``B = 0``; ``u_in``, ``u_out``, ``A`` random and non-zero.

        The Householder vectors (every block's) start as random unit vectors; with the printed form ``I - u u^T``
        they are scaled to ``||u||^2 = 2`` so that ``H(u)`` starts orthogonal. ``init_weights=False`` makes ``d`` and
        ``B`` random too.
        """
        scale = math.sqrt(2.0) if self.hta_householder[adapter_name] == "paper" else 1.0
        blocks = self.hta_layout.get(adapter_name, ONE_BLOCK).count
        for vectors in (self.hta_u_in, self.hta_u_out):
            u = vectors[adapter_name].view(blocks, -1)
            u.normal_()
            u.mul_(scale / u.norm(dim=-1, keepdim=True))
        if adapter_name in self.hta_A:
            nn.init.kaiming_uniform_(self.hta_A[adapter_name], a=math.sqrt(5))
        if init_weights:
            self.hta_d[adapter_name].zero_()
            if adapter_name in self.hta_B:
                self.hta_B[adapter_name].zero_()
        else:
            self.hta_d[adapter_name].uniform_(-0.5, 0.5)
            if adapter_name in self.hta_B:
                nn.init.normal_(self.hta_B[adapter_name], std=0.1)

    # ------------------------------------------------------------------ maths of one adapter
    def _adapter_parameters(self, adapter_name: str) -> HTATensors:
        """The stored tensors ``(u_in, u_out, d, A, B)`` of ``adapter_name`` (``A``, ``B`` None without a low-rank
        term); ``self.hta_layout[adapter_name].unpack(...)`` gives them per block."""
        return HTATensors(
            self.hta_u_in[adapter_name],
            self.hta_u_out[adapter_name],
            self.hta_d[adapter_name],
            self.hta_A.get(adapter_name),
            self.hta_B.get(adapter_name),
        )

    def _adapter_householder(self, adapter_name: str) -> tuple[str, float]:
        """``(householder, eps)`` of ``adapter_name``."""
        return self.hta_householder[adapter_name], self.hta_eps[adapter_name]

    def _adapter_spec(self, adapter_name: str) -> AdapterSpec:
        """Everything besides the tensors that shapes ``adapter_name``'s update."""
        return AdapterSpec(*self._adapter_householder(adapter_name), self.hta_layout.get(adapter_name, ONE_BLOCK))

    def _dense_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(d, U, V)`` with ``delta_W = D + U V^T`` over the whole (out, in) matrix (`functional.adapter_factors`;
        ``D`` placed by the adapter's layout)."""
        return adapter_factors(self._adapter_parameters(adapter_name), self._adapter_spec(adapter_name))[:3]

    def _factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(d, U, V)`` in the adapter's stored layout: ``d`` flat like ``hta_d``, ``U`` like ``hta_B`` (out, 2 + r)
        and ``V^T`` like ``hta_A`` (2 + r, in), so that the adapter with zero Householder vectors, these ``d``,
        ``B = U`` and ``A = V^T`` and the same layout has the same update (`hh_peft.combination` builds on that).
        With one block this is ``functional.hta_factors``."""
        layout = self.hta_layout.get(adapter_name, ONE_BLOCK)
        householder, eps = self._adapter_householder(adapter_name)
        blocks = layout.unpack(self._adapter_parameters(adapter_name))
        d, U, V = hta_factors(*blocks, householder=householder, eps=eps)  # per block: (k, m), (k, out_b, w), (k, in_b, w)
        packed = layout.pack(HTATensors(blocks.u_in, blocks.u_out, d, V.transpose(-1, -2), U))
        return packed.d, packed.B, packed.A.T

    def _delta_matrix(self, adapter_name: str) -> torch.Tensor:
        """``delta_W`` as an (out, in) matrix in the adapter's dtype (float32 on CPU for half-precision bases)."""
        factors = self._dense_factors(adapter_name)
        if factors[0].device.type == "cpu" and factors[0].dtype in (torch.float16, torch.bfloat16):
            factors = tuple(f.float() for f in factors)  # half-precision matmuls on CPU are slow and inexact
        return delta_weight(*factors, layout=self.hta_layout.get(adapter_name, ONE_BLOCK))

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``delta_W`` of ``adapter_name`` in the base weight's own layout and dtype: (out, in) for Linear,
        (in, out) for Conv1D, (out, in, kh, kw) for Conv2d."""
        weight = self.get_base_layer().weight
        return self._weight_layout(self._delta_matrix(adapter_name)).to(weight.dtype)

    def _weight_layout(self, matrix: torch.Tensor) -> torch.Tensor:
        return matrix

    # ------------------------------------------------------------------ merging
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Add the active (or the given) adapters' ``delta_W`` to the base weight.

        ``safe_merge=True`` computes the merged weight out of place and raises before touching the base weight if it
        holds a NaN or inf (`merged_weight`): with several adapters, none of them is merged then.
        """
        adapter_names = [name for name in check_adapters_to_merge(self, adapter_names) if name in self.hta_d]
        if not adapter_names:
            return
        weight = self.get_base_layer().weight
        if safe_merge:
            weight.data.copy_(self.merged_weight(adapter_names))
            self.merged_adapters.extend(adapter_names)
            return
        for adapter_name in adapter_names:
            weight.data.add_(self.get_delta_weight(adapter_name))
            self.merged_adapters.append(adapter_name)

    def merged_weight(self, adapter_names: list[str]) -> torch.Tensor:
        """``W + sum_a delta_W_a`` over ``adapter_names`` (in that order), out of place; raises a ValueError naming the
        first adapter after whose update the weight holds a NaN or inf. The base weight is never written."""
        base_layer = self.get_base_layer()
        merged = base_layer.weight.data
        for adapter_name in adapter_names:
            merged = merged + self.get_delta_weight(adapter_name)
            if not torch.isfinite(merged).all():
                raise ValueError(
                    f"NaNs or infs detected in the merged weight of {type(base_layer).__name__} for adapter "
                    f"{adapter_name!r}: the adapter seems to be broken; the base weight was left unchanged"
                )
        return merged

    def unmerge(self) -> None:
        """Subtract every merged adapter's ``delta_W`` again, last merged first."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        self.unmerge_last(len(self.merged_adapters))

    def unmerge_last(self, count: int) -> None:
        """Subtract the ``delta_W`` of the last ``count`` merged adapters, last merged first."""
        base_layer = self.get_base_layer()
        for _ in range(count):
            adapter_name = self.merged_adapters.pop()
            if adapter_name in self.hta_d:
                base_layer.weight.data.sub_(self.get_delta_weight(adapter_name))

    # ------------------------------------------------------------------ forward helpers
    def _check_forward_args(self, x, *args, **kwargs):
        adapter_names = kwargs.get("adapter_names", None)
        if adapter_names is None:
            return
        if len(x) != len(adapter_names):
            raise ValueError(
                "Length of `adapter_names` should be the same as the number of inputs, but got "
                f"{len(adapter_names)} and {len(x)} respectively."
            )
        if self.merged:
            raise ValueError("Cannot pass `adapter_names` when there are merged adapters, call `unmerge_adapter` first.")

    def _active_hta_adapters(self) -> list[str]:
        return [name for name in self.active_adapters if name in self.hta_d]

    def _adapter_delta_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        raise NotImplementedError

    def _mixed_batch_forward(self, x: torch.Tensor, *args: Any, adapter_names: list[str], **kwargs: Any):
        """Per-sample adapters: row ``i`` of the batch goes through ``adapter_names[i]`` (``"__base__"``: none)."""
        result = self.base_layer(x, *args, **kwargs)
        for adapter_name in set(adapter_names):
            if adapter_name == "__base__" or adapter_name not in self.hta_d:
                continue
            rows = [i for i, name in enumerate(adapter_names) if name == adapter_name]
            delta = self._adapter_delta_output(x[rows], adapter_name)
            result[rows] += delta.to(result.dtype)
        return result

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        adapter_names = kwargs.pop("adapter_names", None)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        active = self._active_hta_adapters()
        if self.merged or not active:
            return self.base_layer(x, *args, **kwargs)
        return self._adapted_forward(x, active, *args, **kwargs)

    def _adapted_forward(self, x: torch.Tensor, active: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        for adapter_name in active:
            result = result + self._adapter_delta_output(x, adapter_name).to(result.dtype)
        return result



class _HouseholderModule(nn.Module, HouseholderLayer):
    """What the adapted module types share: construction from a base layer and a config, forward, repr."""

    forward = HouseholderLayer.forward  # nn.Module comes first in the MRO, as in PEFT's own layers

    def __repr__(self) -> str:
        return "hta." + super().__repr__()

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, config: HouseholderConfig, layout: BlockLayout = ONE_BLOCK, **kwargs
    ) -> None:
        super().__init__()
        HouseholderLayer.__init__(self, base_layer, **kwargs)
        self._configure(config)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, layout=layout)

    def _configure(self, config: HouseholderConfig) -> None:
        """Layer-type settings read from the config before the first adapter is created."""

    # Base layer types whose forward the folded path reproduces exactly (subclasses such as quantised layers keep
    # their own forward and take the activation-space path).
    _foldable_base_types: tuple[type, ...] = ()

    def _can_fold(self, x: torch.Tensor, active: list[str], args: tuple, kwargs: dict) -> bool:
        """The folded path computes exactly ``base(x) + x delta_W^T``; it applies to a plain base layer called with
        ``x`` alone, when nothing differs between the adapter's input and the base layer's input (no dropout in
        training, no autocast) and all dtypes agree."""
        base_layer = self.get_base_layer()
        if args or kwargs or type(base_layer) not in self._foldable_base_types:
            return False
        if torch.is_autocast_enabled(x.device.type):
            return False
        weight = base_layer.weight
        for name in active:
            if self.training and isinstance(self.hta_dropout[name], nn.Dropout):
                return False
            if self.hta_d[name].dtype != weight.dtype or x.dtype != weight.dtype:
                return False
        return True


class Linear(_HouseholderModule):
    """HTA on an ``nn.Linear`` or on transformers' ``Conv1D`` (``fan_in_fan_out``: weight stored as (in, out))."""

    _foldable_base_types = (nn.Linear, Conv1D)

    def _configure(self, config: HouseholderConfig) -> None:
        self.fan_in_fan_out = isinstance(self.get_base_layer(), Conv1D) or config.fan_in_fan_out

    def _weight_layout(self, matrix: torch.Tensor) -> torch.Tensor:
        return matrix.T if self.fan_in_fan_out else matrix

    def _adapter_delta_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        d = self.hta_d[adapter_name]
        x = self._cast_input_dtype(x, d.dtype)
        layout = self.hta_layout.get(adapter_name, ONE_BLOCK)
        return hta_activation_delta(self.hta_dropout[adapter_name](x), *self._dense_factors(adapter_name), layout=layout)

    def _adapted_forward(self, x: torch.Tensor, active: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        if not self._can_fold(x, active, args, kwargs):
            return super()._adapted_forward(x, active, *args, **kwargs)
        base_layer = self.get_base_layer()
        weight = base_layer.weight.T if self.fan_in_fan_out else base_layer.weight  # (out, in)
        specs = tuple(self._adapter_spec(name) for name in active)
        params = pack_adapters([self._adapter_parameters(name) for name in active])
        return FoldedHTALinear.apply(x, weight, base_layer.bias, specs, *params)


class Conv2d(_HouseholderModule):
    """HTA on an ``nn.Conv2d`` (groups=1), its weight seen as an ``out x (in * kh * kw)`` matrix.

    The adapted convolution is one convolution with the folded kernel ``W + delta_W``; with dropout, the adapter's
    kernel ``delta_W`` runs on the dropped-out input beside the base convolution.
    """

    _foldable_base_types = (nn.Conv2d,)

    def _weight_layout(self, matrix: torch.Tensor) -> torch.Tensor:
        return matrix.view(self.get_base_layer().weight.shape)

    def _adapter_delta_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        base_layer = self.get_base_layer()
        kernel = self._weight_layout(self._delta_matrix(adapter_name))
        x = self._cast_input_dtype(x, kernel.dtype)
        return base_layer._conv_forward(self.hta_dropout[adapter_name](x), kernel, None)

    def _adapted_forward(self, x: torch.Tensor, active: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        if not self._can_fold(x, active, args, kwargs):
            return super()._adapted_forward(x, active, *args, **kwargs)
        base_layer = self.get_base_layer()
        kernel = base_layer.weight
        for name in active:
            kernel = kernel + self.get_delta_weight(name)  # in the base weight's layout and dtype
        return base_layer._conv_forward(x, kernel, base_layer.bias)


def unsupported_layer_message(name: str, module: nn.Module) -> str:
    where = f"Target module {name!r}" if name else "Target module"
    supported = ", ".join(f"{t.__module__}.{t.__qualname__}" for t in SUPPORTED_LAYER_TYPES)
    return f"{where} of type {type(module).__module__}.{type(module).__qualname__} cannot be adapted by HTA; supported layer types: {supported}"
