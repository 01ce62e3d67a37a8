"""Analysis of unitary parametrizations: the numerical capacity checker (``python -m unitary_rnn.analysis.capacity``)."""
