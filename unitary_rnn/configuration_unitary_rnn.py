"""Configuration of the unitary / orthogonal RNN models (``model_type="unitary_rnn"``)."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

PARAMETRIZATIONS = ("full", "restricted")
FIELDS = ("complex", "real")
NONLINEARITIES = ("modrelu",)
UNITARY_INITS = ("identity", "random", "restricted")
INPUT_EMBEDDINGS = ("one_hot", "embedding")
OPTIMIZERS = ("cayley", "projunn_d", "projunn_t")
BASE_OPTIMIZERS = ("rmsprop", "adam", "adamw")  # the same choices as unitary_rnn.training.optim.BASE_OPTIMIZERS
PROJUNN_SAMPLINGS = ("lsi", "column")
RESTRICTED_APPLIES = ("auto", "matrix", "fft")


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
        optimizer (`str`, defaults to `"cayley"`):
            Training default for `unitary_rnn.training.optim.create_optimizer`: `"cayley"` (multiplicative Cayley
            step), `"projunn_d"` or `"projunn_t"` (rank-k projUNN).
        unitary_learning_rate (`float`, defaults to 1e-4):
            Learning rate of the manifold step on W.
        learning_rate (`float`, defaults to 1e-3):
            Learning rate of every other parameter.
        base_optimizer (`str`, defaults to `"rmsprop"`):
            `"rmsprop"`, `"adam"` or `"adamw"`, for every parameter that is not on the manifold.
        rmsprop_unitary (`bool`, defaults to `False`):
            Divide the gradient of W by an RMSprop accumulator before the Cayley step (Wisdom et al.'s option).
        projunn_rank (`int`, defaults to 1):
            Rank k of the projUNN update.
        projunn_sampling (`str`, defaults to `"lsi"`):
            projUNN's low-rank approximation: `"lsi"` (random projection) or `"column"` (norm-weighted columns).
        reproject_every (`int`, defaults to 100):
            Re-project W onto the manifold (polar factor) every this many optimizer steps; 0 never does.
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
    optimizer: str = "cayley"
    unitary_learning_rate: float = 1e-4
    learning_rate: float = 1e-3
    base_optimizer: str = "rmsprop"
    rmsprop_unitary: bool = False
    projunn_rank: int = 1
    projunn_sampling: str = "lsi"
    reproject_every: int = 100

    def __post_init__(self, **kwargs):
        _check_choice("parametrization", self.parametrization, PARAMETRIZATIONS)
        _check_choice("restricted_apply", self.restricted_apply, RESTRICTED_APPLIES)
        _check_choice("field", self.field, FIELDS)
        _check_choice("nonlinearity", self.nonlinearity, NONLINEARITIES)
        _check_choice("input_embedding", self.input_embedding, INPUT_EMBEDDINGS)
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("base_optimizer", self.base_optimizer, BASE_OPTIMIZERS)
        _check_choice("projunn_sampling", self.projunn_sampling, PROJUNN_SAMPLINGS)
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
        if self.projunn_rank < 1:
            raise ValueError(f"UnitaryRNNConfig: projunn_rank must be >= 1, got {self.projunn_rank}")
        if self.reproject_every < 0:
            raise ValueError(f"UnitaryRNNConfig: reproject_every must be >= 0 (0: never), got {self.reproject_every}")
        if self.modrelu_eps <= 0:
            raise ValueError(f"UnitaryRNNConfig: modrelu_eps must be > 0 (it keeps modReLU NaN-free), got {self.modrelu_eps}")
        super().__post_init__(**kwargs)

    @property
    def feature_size(self) -> int:
        """Width of the real per-step features the models output: 2N (complex) or N (real)."""
        return 2 * self.hidden_size if self.field == "complex" else self.hidden_size


__all__ = ["UnitaryRNNConfig"]
