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


def assert_close_across_load_paths(actual: torch.Tensor, expected: torch.Tensor, ulps: int = 32) -> None:
    """Outputs of one adapter reached by two load paths that run the same operations on the same values, but on
    buffers at other memory addresses.

    transformers' ``load_adapter`` (and ``AutoModel...from_pretrained`` of an adapter folder) leaves the adapter's
    tensors where safetensors put them, 4-byte aligned inside the file's buffer, while ``PeftModel.from_pretrained``
    and ``get_peft_model`` copy them into 64-byte-aligned allocations. BLAS's vectorised dot product (``u @ u`` and
    ``(d * u_out) @ u_in`` in ``hh_peft.functional.hta_scalars``) peels a different head off an unaligned vector, so
    it adds the same products in another order: on random 48-vectors the float32 result differs in the last bit in
    about 4 draws of 10. One such ulp per reduction, carried through a few layers and their LayerNorms, gave logits
    3e-8 to 6e-8 apart (about one ulp of their largest value) on a fresh machine. The tolerance is ``ulps`` units in
    the last place of the output's largest magnitude: 32 leaves room for deeper models and other vector widths,
    and stays four orders of magnitude below what a wrong or missing adapter changes (1e-3 and up).
    """
    scale = expected.abs().max().item()
    atol = ulps * torch.finfo(expected.dtype).eps * max(scale, torch.finfo(expected.dtype).tiny)
    torch.testing.assert_close(actual, expected, rtol=0, atol=atol)


@pytest.fixture
def close_across_load_paths():
    """`assert_close_across_load_paths`, as a fixture (tests in this folder do not import the conftest)."""
    return assert_close_across_load_paths
