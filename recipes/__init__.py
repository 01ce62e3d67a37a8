"""Recipes: scripts run with ``python``, ``torchrun`` or ``accelerate launch`` from the repository root.

The package exists so that the scripts share ``recipes.common`` and the tests can import them;
it is not installed with ``hh-peft``.
"""
