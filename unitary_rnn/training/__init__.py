"""Training for unitary RNNs: manifold optimizers (Cayley, projUNN) and the long-memory tasks.

Kept apart from the model package (``unitary_rnn``), which holds only what a saved model needs.
"""
