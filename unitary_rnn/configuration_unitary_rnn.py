"""Configuration of the unitary / orthogonal RNN models (``model_type="unitary_rnn"``)."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig
from transformers.utils import logging

logger = logging.get_logger(__name__)

PARAMETRIZATIONS = ("full", "restricted")
FIELDS = ("complex", "real")
NONLINEARITIES = ("modrelu",)
UNITARY_INITS = ("identity", "random", "restricted")
INPUT_EMBEDDINGS = ("one_hot", "embedding")
RESTRICTED_APPLIES = ("auto", "matrix", "fft")

LEGACY_OPTIMIZER_KEYS = {
    "optimizer": "method",
    "unitary_learning_rate": "unitary_lr",
    "learning_rate": "lr",
    "base_optimizer": "base_optimizer",
    "rmsprop_unitary": "rmsprop_unitary",
    "projunn_rank": "rank",
    "projunn_sampling": "sampling",
    "reproject_every": "reproject_every",
}
"""Training settings that configurations written before they moved out of the model configuration
carried, and the keyword of ``unitary_rnn.training.create_optimizer`` each one became."""


def _check_choice(name: str, value, valid: tuple) -> None:
    if value not in valid:
        raise ValueError(f"UnitaryRNNConfig: {name}={value!r} is not valid; valid values: {', '.join(map(repr, valid))}")


@strict
class UnitaryRNNConfig(PreTrainedConfig):
    r"""Configuration of a unitary (complex, W in U(N)) or orthogonal (real, W in O(N)) recurrent network.

    The cell (Arjovsky et al. 2016; Wisdom et al. 2016), hidden state h in C^N (R^N for ``field="real"``):

        z_t = W h_{t-1} + V x_t;   h_t = modReLU(z_t) = z_t / |z_t| * relu(|z_t| + b)

    The models expose every step's state as real features ``[Re h_t ; Im h_t]`` (2N of them; N for
    ``field="real"``).

    Args:
        input_size (`int`, *optional*):
            Size of the real input vector ``x_t``. With ``input_embedding="one_hot"`` and a ``vocab_size``
            it must be ``vocab_size`` (the default then); otherwise it defaults to 1.
        hidden_size (`int`, defaults to 128):
            N, the number of complex (or real) hidden units; W is N x N.
        num_hidden_layers (`int`, defaults to 1):
            Exposed for the transformers API; only one recurrent layer is implemented, so it must be 1.
        parametrization (`str`, defaults to `"full"`):
            `"full"`: W is one N x N complex parameter (full capacity, Wisdom et al.), kept on the
            manifold by the optimizer. `"restricted"`: W = D3 R2 F^-1 D2 Pi R1 F D1 with 7N real
            parameters (Arjovsky et al.).
        restricted_apply (`str`, defaults to `"auto"`):
            How the restricted W is applied: `"matrix"` (materialised once per forward, then the fused
            real recurrence: fastest for small N), `"fft"` (O(N log N) FFTs every step), or `"auto"`
            (`"matrix"` up to N = 512, `"fft"` above; the crossover measured on CPU).
        field (`str`, defaults to `"complex"`):
            `"complex"`: unitary RNN. `"real"`: orthogonal RNN, real state and real W in O(N) (as trained in
            the projUNN paper); only with `parametrization="full"`.
        nonlinearity (`str`, defaults to `"modrelu"`):
            Only `"modrelu"` (its real counterpart sign(z) relu(|z| + b) for `field="real"`).
        modrelu_eps (`float`, defaults to 1e-8):
            The eps in |z| = sqrt(Re^2 + Im^2 + eps) that keeps modReLU NaN-free at z = 0.
        unitary_init (`str`, *optional*):
            Initial W. `"identity"`; `"random"`: Haar-random unitary (orthogonal); `"restricted"`: a random
            restricted product (for `"full"`, the full matrix is initialised from it, like Wisdom et al.).
            Defaults to `"restricted"` for complex fields and `"random"` for `field="real"`. The restricted
            parametrization only accepts `"restricted"` (with identity its reflections would get no gradient).
        vocab_size (`int`, *optional*):
            Number of symbols for `input_ids`.
        input_embedding (`str`, defaults to `"one_hot"`):
            How `input_ids` become `x_t`: `"one_hot"` (x_t is the one-hot vector, `input_size == vocab_size`)
            or `"embedding"` (a learned `nn.Embedding(vocab_size, input_size)`).
        initializer_range (`float`, defaults to 0.02):
            Standard deviation of the normal initialisation of the heads and of the embedding.

    Training settings (the manifold optimizer, its learning rates, projUNN's rank, ...) are not part of
    the model configuration: pass them to ``unitary_rnn.training.create_optimizer``. A configuration
    saved with them (``optimizer``, ``unitary_learning_rate``, ``learning_rate``, ``base_optimizer``,
    ``rmsprop_unitary``, ``projunn_rank``, ``projunn_sampling``, ``reproject_every``) still loads: the
    keys are dropped with a warning that names the ``create_optimizer`` arguments to use instead.
    """

    model_type = "unitary_rnn"

    input_size: int | None = None
    hidden_size: int = 128
    num_hidden_layers: int = 1
    parametrization: str = "full"
    restricted_apply: str = "auto"
    field: str = "complex"
    nonlinearity: str = "modrelu"
    modrelu_eps: float = 1e-8
    unitary_init: str | None = None
    vocab_size: int | None = None
    input_embedding: str = "one_hot"
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        _drop_legacy_optimizer_keys(kwargs)
        _check_choice("parametrization", self.parametrization, PARAMETRIZATIONS)
        _check_choice("restricted_apply", self.restricted_apply, RESTRICTED_APPLIES)
        _check_choice("field", self.field, FIELDS)
        _check_choice("nonlinearity", self.nonlinearity, NONLINEARITIES)
        _check_choice("input_embedding", self.input_embedding, INPUT_EMBEDDINGS)
        if self.field == "real" and self.parametrization != "full":
            raise ValueError(
                "UnitaryRNNConfig: field='real' (orthogonal RNN) needs parametrization='full'; "
                "the restricted product is complex"
            )
        if self.unitary_init is None:
            self.unitary_init = "random" if self.field == "real" else "restricted"
        _check_choice("unitary_init", self.unitary_init, UNITARY_INITS)
        if self.parametrization == "restricted" and self.unitary_init != "restricted":
            raise ValueError(
                f"UnitaryRNNConfig: parametrization='restricted' needs unitary_init='restricted', got "
                f"{self.unitary_init!r} (the identity zeroes the reflections, which then never get a gradient)"
            )
        if self.field == "real" and self.unitary_init == "restricted":
            raise ValueError(
                "UnitaryRNNConfig: unitary_init='restricted' is complex; valid values for field='real': 'identity', 'random'"
            )
        if self.input_embedding == "one_hot" and self.vocab_size is not None:
            if self.input_size is None:
                self.input_size = self.vocab_size
            elif self.input_size != self.vocab_size:
                raise ValueError(
                    f"UnitaryRNNConfig: input_embedding='one_hot' needs input_size == vocab_size, got "
                    f"input_size={self.input_size}, vocab_size={self.vocab_size}"
                )
        if self.input_embedding == "embedding" and self.vocab_size is None:
            raise ValueError("UnitaryRNNConfig: input_embedding='embedding' needs vocab_size")
        if self.input_size is None:
            self.input_size = 1
        for name in ("input_size", "hidden_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"UnitaryRNNConfig: {name} must be >= 1, got {getattr(self, name)}")
        if self.vocab_size is not None and self.vocab_size < 1:
            raise ValueError(f"UnitaryRNNConfig: vocab_size must be >= 1 or None, got {self.vocab_size}")
        if self.num_hidden_layers != 1:
            raise ValueError(f"UnitaryRNNConfig: only num_hidden_layers=1 is implemented, got {self.num_hidden_layers}")
        if self.modrelu_eps <= 0:
            raise ValueError(f"UnitaryRNNConfig: modrelu_eps must be > 0 (it keeps modReLU NaN-free), got {self.modrelu_eps}")
        super().__post_init__(**kwargs)

    @property
    def feature_size(self) -> int:
        """Width of the real per-step features the models output: 2N (complex) or N (real)."""
        return 2 * self.hidden_size if self.field == "complex" else self.hidden_size


def _drop_legacy_optimizer_keys(kwargs: dict) -> None:
    """Remove the training settings of :data:`LEGACY_OPTIMIZER_KEYS` from ``kwargs`` (in place), warning
    once per distinct set with the equivalent ``create_optimizer`` call."""
    legacy = {key: kwargs.pop(key) for key in LEGACY_OPTIMIZER_KEYS if key in kwargs}
    if legacy:
        arguments = ", ".join(f"{LEGACY_OPTIMIZER_KEYS[key]}={value!r}" for key, value in legacy.items())
        logger.warning_once(
            f"UnitaryRNNConfig: ignoring {', '.join(sorted(legacy))}: training settings are not part of the "
            f"model configuration any more. Pass them to the optimizer instead: "
            f"unitary_rnn.training.create_optimizer(model, {arguments})"
        )


__all__ = ["LEGACY_OPTIMIZER_KEYS", "UnitaryRNNConfig"]
