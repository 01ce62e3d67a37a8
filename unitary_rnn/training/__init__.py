"""Training for unitary RNNs: manifold optimizers (Cayley, projUNN), a transformers ``Trainer`` that uses them,
and the long-memory tasks.

Kept apart from the model package (``unitary_rnn``), which holds only what a saved model needs.
"""

from .optim import UnitaryOptimizer, cayley_step, create_optimizer, unitarity_error_estimate
from .projunn import projunn_direct_step, projunn_tangent_step
from .trainer import UnitaryTrainer

__all__ = [
    "UnitaryOptimizer",
    "UnitaryTrainer",
    "cayley_step",
    "create_optimizer",
    "projunn_direct_step",
    "projunn_tangent_step",
    "unitarity_error_estimate",
]
