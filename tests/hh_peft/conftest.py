"""Fixtures shared by the hh_peft tests."""

import pytest
import torch


class ModelState:
    """Everything an operation that fails must leave exactly as it was: the module tree (names and types), every
    state-dict tensor's value, every parameter's ``requires_grad`` and, given ``inputs``, the eval-mode output."""

    def __init__(self, model: torch.nn.Module, inputs: torch.Tensor | None = None):
        self.inputs = inputs
        self.modules = self._modules(model)
        self.state = {key: value.clone() for key, value in model.state_dict().items()}
        self.requires_grad = self._requires_grad(model)
        self.output = self._output(model)

    @staticmethod
    def _modules(model):
        return [(name, type(module)) for name, module in model.named_modules()]

    @staticmethod
    def _requires_grad(model):
        return [(name, parameter.requires_grad) for name, parameter in model.named_parameters()]

    def _output(self, model):
        if self.inputs is None:
            return None
        with torch.no_grad():
            return model(self.inputs)

    def assert_unchanged(self, model: torch.nn.Module) -> None:
        assert self._modules(model) == self.modules
        now = model.state_dict()
        assert now.keys() == self.state.keys()
        for key, value in self.state.items():
            assert torch.equal(now[key], value), key
        assert self._requires_grad(model) == self.requires_grad
        if self.inputs is not None:
            assert torch.equal(self._output(model), self.output)


@pytest.fixture
def model_state():
    """``before = model_state(model[, inputs])`` ... ``before.assert_unchanged(model)``."""
    return ModelState
