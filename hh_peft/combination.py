"""Weighted combinations of HTA adapters that are exactly HTA adapters again.

The HTA update of adapter ``i`` on a layer is (`functional.hta_factors`)

    delta_W_i = H(u_out_i) D_i H(u_in_i) + B_i A_i = D_i + U_i V_i^T          U_i, V_i of width 2 + r_i

It is not linear in its parameters, so a weighted sum of adapters is in general no adapter of the same rank. Two
combinations are exact:

* ``"cat"``, for any adapters. Since ``H(0) = I`` (the normalised form gives a zero vector ``c = 0``), an adapter with
  ``u_in = u_out = 0`` has the update ``D + B A``, and

      sum_i w_i delta_W_i = diag(sum_i w_i d_i) + [w_1 U_1, ..., w_k U_k] [V_1, ..., V_k]^T

  is the adapter with zero Householder vectors, ``d = sum_i w_i d_i``, ``B = [w_1 U_1, ..., w_k U_k]`` and
  ``A = [V_1, ..., V_k]^T``, of ``lora_rank = sum_i (2 + r_i)``.
* ``"linear"``, for adapters that share ``u_in``, ``u_out`` and the Householder form on every layer (one adapter, or
  adapters trained from one set of frozen vectors). With ``H_o = H(u_out)``, ``H_i = H(u_in)``:

      sum_i w_i (H_o D_i H_i + B_i A_i) = H_o diag(sum_i w_i d_i) H_i + [w_1 B_1, ..., w_k B_k] [A_1; ...; A_k]

  keeps the vectors, ``d = sum_i w_i d_i``, ``lora_rank = sum_i r_i`` (one adapter: ``d -> w d``, ``B -> w B``).

A layer that some of the adapters do not adapt gets zero columns for them (their update there is zero).
"""

from __future__ import annotations

import dataclasses
import math
from numbers import Real
from typing import TYPE_CHECKING

import torch

from .config import HouseholderConfig

if TYPE_CHECKING:
    from .layer import HouseholderLayer
    from .model import HouseholderModel

COMBINATION_TYPES = ("cat", "linear")

# PEFT's LoRA offers these too; none of them gives an HTA adapter whose update is the weighted sum.
_LORA_ONLY_COMBINATIONS = (
    "svd", "ties", "ties_svd", "dare_ties", "dare_linear", "dare_ties_svd", "dare_linear_svd", "magnitude_prune",
    "magnitude_prune_svd",
)


def cat_combination(
    parts: list[tuple[float, torch.Tensor, torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(d, A, B)`` of the zero-vector adapter whose update ``D + B A`` is ``sum_i w_i (D_i + U_i V_i^T)``.

    ``parts`` holds ``(w_i, d_i, U_i, V_i)`` (`functional.hta_factors`, ``U_i`` (out, k_i), ``V_i`` (in, k_i)):
    ``d = sum_i w_i d_i`` (m,), ``B = [w_1 U_1, ..., w_k U_k]`` (out, sum k_i), ``A = [V_1, ..., V_k]^T`` (sum k_i, in).
    """
    d = sum(w * d_i for w, d_i, _, _ in parts)
    B = torch.cat([w * U_i for w, _, U_i, _ in parts], dim=1)
    A = torch.cat([V_i.T for _, _, _, V_i in parts], dim=0)
    return d, A, B


def linear_combination(
    parts: list[tuple[float, torch.Tensor, torch.Tensor | None, torch.Tensor | None]],
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``(d, A, B)`` of ``sum_i w_i (H_o D_i H_i + B_i A_i)`` for adapters sharing ``H_o``, ``H_i``: ``d = sum_i w_i
    d_i``, ``B = [w_1 B_1, ..., w_k B_k]``, ``A = [A_1; ...; A_k]`` (None when every ``r_i`` is 0). ``parts`` holds
    ``(w_i, d_i, A_i, B_i)``."""
    d = sum(w * d_i for w, d_i, _, _ in parts)
    ranked = [(w, A_i, B_i) for w, _, A_i, B_i in parts if A_i is not None]
    if not ranked:
        return d, None, None
    return d, torch.cat([A_i for _, A_i, _ in ranked], dim=0), torch.cat([w * B_i for w, _, B_i in ranked], dim=1)


def add_weighted_adapter(
    tuner: HouseholderModel, adapters: list[str], weights: list[float], adapter_name: str, combination_type: str
) -> None:
    """`HouseholderModel.add_weighted_adapter`: validate everything, compute every layer's new factors, and only then
    add the adapter (a refused combination leaves the model as it was)."""
    from .layer import HouseholderLayer

    _check_arguments(tuner, adapters, weights, adapter_name, combination_type)
    configs = [tuner.peft_config[name] for name in adapters]
    if len(adapters) == 1:
        combination_type = "linear"  # one adapter is always "linear": d -> w d, B -> w B, same rank
    layers = [(name, module) for name, module in tuner.model.named_modules() if isinstance(module, HouseholderLayer)]
    layers = [(name, layer) for name, layer in layers if any(adapter in layer.hta_d for adapter in adapters)]
    if not layers:
        raise ValueError(f"The adapters {adapters} adapt no layer of the model; nothing to combine")
    if combination_type == "linear":
        _check_shared_vectors(layers, adapters)
        rank = sum(config.lora_rank for config in configs)
        first = configs[0]
        householder, eps = first.householder, first.eps
    else:
        rank = sum(2 + config.lora_rank for config in configs)
        householder, eps = "normalized", configs[0].eps  # zero vectors: H = I whatever eps > 0

    new_parameters = {}
    with torch.no_grad():
        for name, layer in layers:
            new_parameters[name] = _combined_layer(layer, adapters, configs, weights, combination_type)

    new_config = dataclasses.replace(
        configs[0],
        target_modules={name for name, _ in layers},
        exclude_modules=None,
        layers_to_transform=None,
        layers_pattern=None,
        modules_to_save=None,
        lora_rank=rank,
        householder=householder,
        eps=eps,
        init_weights=True,
    )
    tuner.peft_config[adapter_name] = new_config
    try:
        tuner.inject_adapter(tuner.model, adapter_name)
    except Exception:
        del tuner.peft_config[adapter_name]
        raise
    with torch.no_grad():
        for name, layer in layers:
            u_in, u_out, d, A, B = new_parameters[name]
            for parameters, value in ((layer.hta_u_in, u_in), (layer.hta_u_out, u_out), (layer.hta_d, d),
                                      (layer.hta_A, A), (layer.hta_B, B)):
                if adapter_name in parameters:
                    parameters[adapter_name].copy_(value)


def _combined_layer(
    layer: HouseholderLayer, adapters: list[str], configs: list[HouseholderConfig], weights: list[float],
    combination_type: str,
) -> tuple[torch.Tensor | None, ...]:
    """``(u_in, u_out, d, A, B)`` of the combination on one layer, in the adapters' dtype. An adapter that does not
    adapt this layer enters with zero factors (its update here is zero)."""
    present = [adapter for adapter in adapters if adapter in layer.hta_d]
    reference = layer.hta_d[present[0]]
    m, n_in, n_out = reference.shape[0], layer.in_features, layer.out_features
    zeros = reference.new_zeros
    if combination_type == "cat":
        parts = []
        for adapter, config, weight in zip(adapters, configs, weights):
            if adapter in layer.hta_d:
                parts.append((weight, *layer._factors(adapter)))
            else:
                width = 2 + config.lora_rank
                parts.append((weight, zeros(m), zeros(n_out, width), zeros(n_in, width)))
        return (zeros(n_in), zeros(n_out), *cat_combination(parts))
    parts = []
    for adapter, config, weight in zip(adapters, configs, weights):
        rank = config.lora_rank
        if adapter in layer.hta_d:
            parts.append((weight, layer.hta_d[adapter], layer.hta_A.get(adapter), layer.hta_B.get(adapter)))
        else:
            parts.append((weight, zeros(m), zeros(rank, n_in) if rank else None, zeros(n_out, rank) if rank else None))
    return (layer.hta_u_in[present[0]].clone(), layer.hta_u_out[present[0]].clone(), *linear_combination(parts))


def _check_arguments(tuner, adapters, weights, adapter_name, combination_type) -> None:
    if combination_type not in COMBINATION_TYPES:
        why = ""
        if combination_type in _LORA_ONLY_COMBINATIONS:
            why = (
                " (LoRA's truncated and pruned combinations have no exact HTA counterpart: the HTA update is not "
                "linear in its parameters)"
            )
        raise ValueError(
            f"combination_type {combination_type!r} is not supported for HTA adapters{why}; valid: 'cat' (the exact "
            "weighted sum of any HTA adapters, as an adapter of lora_rank sum(2 + r_i) with identity Householder "
            "factors) or 'linear' (exact for adapters that share their Householder vectors, e.g. one adapter scaled)"
        )
    if isinstance(adapters, str) or not adapters:
        raise ValueError(f"`adapters` must be a non-empty list of adapter names, got {adapters!r}")
    if len(weights) != len(adapters):
        raise ValueError(f"Got {len(adapters)} adapters but {len(weights)} weights; give one weight per adapter")
    for weight in weights:
        if isinstance(weight, bool) or not isinstance(weight, Real) or not math.isfinite(weight):
            raise ValueError(f"Every weight must be a finite real number, got {weight!r} in {list(weights)}")
    for adapter in adapters:
        if adapter not in tuner.peft_config:
            raise ValueError(f"Adapter {adapter!r} does not exist; existing adapters: {sorted(tuner.peft_config)}")
        if not isinstance(tuner.peft_config[adapter], HouseholderConfig):
            raise ValueError(f"Adapter {adapter!r} is not an HTA adapter ({type(tuner.peft_config[adapter]).__name__})")
    if adapter_name in tuner.peft_config:
        raise ValueError(f"An adapter named {adapter_name!r} already exists; choose a new name for the combination")


def _check_shared_vectors(layers: list[tuple[str, HouseholderLayer]], adapters: list[str]) -> None:
    for name, layer in layers:
        present = [adapter for adapter in adapters if adapter in layer.hta_d]
        first = present[0]
        for other in present[1:]:
            same_form = layer._adapter_householder(other) == layer._adapter_householder(first)
            same_vectors = torch.equal(layer.hta_u_in[other], layer.hta_u_in[first]) and torch.equal(
                layer.hta_u_out[other], layer.hta_u_out[first]
            )
            if not (same_form and same_vectors):
                raise ValueError(
                    f"combination_type='linear' needs adapters that share their Householder vectors and form, but "
                    f"{first!r} and {other!r} differ on layer {name!r}; use combination_type='cat' (exact for any "
                    "HTA adapters)"
                )
