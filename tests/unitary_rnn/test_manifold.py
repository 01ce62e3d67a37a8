"""unitary_rnn.manifold: which parameters are on the manifold (and that this survives copies, pickling, loads,
accelerate), the tolerance, and the guards (foreign optimizers refused, off-manifold edits detected at the next
forward, non-unitary matrices rejected at load)."""

from __future__ import annotations

import copy
import io
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from unitary_rnn import UnitaryRNNConfig, UnitaryRNNForTokenClassification
from unitary_rnn.layers import OrthogonalLinear, UnitaryLinear
from unitary_rnn.manifold import (
    check_on_manifold,
    manifold_of,
    manifold_parameters,
    manifold_tolerance,
    mark_manifold,
    project_to_unitary,
    unitarity_error,
)
from unitary_rnn.training.optim import UnitaryOptimizer, create_optimizer, split_parameters


def _model(**kw):
    kw.setdefault("hidden_size", 8)
    return UnitaryRNNForTokenClassification(UnitaryRNNConfig(vocab_size=5, num_labels=5, **kw))


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, 5, (4, 6), generator=g), "labels": torch.randint(0, 5, (4, 6), generator=g)}


def _steps(model, opt, n=3):
    for i in range(n):
        opt.zero_grad()
        model(**_batch(i)).loss.backward()
        opt.step()


def _W(model):
    return model.model.cell.recurrent_weight


def _assert_trains_on_the_manifold(model):
    """The manifold parameter is found through the tensor's tag and through the model, create_optimizer steps it
    on the manifold (an untagged W used to get RMSprop: ||W^H W - I|| = 6.76 after 3 steps)."""
    W = _W(model)
    assert manifold_of(W) == "unitary"
    assert list(manifold_parameters(model).values()) == [W]
    opt = create_optimizer(model, unitary_lr=0.1, lr=0.1)
    assert opt.param_groups[0]["params"] == [W]
    W0 = W.detach().clone()
    _steps(model, opt)
    assert not torch.equal(W.detach(), W0)
    assert unitarity_error(W.detach()) < 1e-5


# ------------------------------------------------------------------ the tag survives
def test_deepcopy_keeps_the_manifold():
    model = _model()
    _assert_trains_on_the_manifold(copy.deepcopy(model))


def test_pickle_and_torch_save_keep_the_manifold():
    model = _model()
    _assert_trains_on_the_manifold(pickle.loads(pickle.dumps(model)))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    _assert_trains_on_the_manifold(torch.load(buffer, weights_only=False))


@pytest.mark.parametrize("assign", [False, True])
def test_state_dict_round_trip_keeps_the_manifold(assign):
    source, target = _model(), _model()
    target.load_state_dict(copy.deepcopy(source.state_dict()), assign=assign)
    torch.testing.assert_close(_W(target).detach(), _W(source).detach(), rtol=0, atol=0)
    assert _W(target).requires_grad
    _assert_trains_on_the_manifold(target)


def test_save_pretrained_round_trip_keeps_the_manifold(tmp_path):
    _model().save_pretrained(tmp_path)
    _assert_trains_on_the_manifold(UnitaryRNNForTokenClassification.from_pretrained(tmp_path))


def test_accelerate_prepare_keeps_the_manifold():
    from accelerate import Accelerator

    model = _model()
    opt = create_optimizer(model, unitary_lr=0.1, lr=0.1)
    model, opt = Accelerator(cpu=True).prepare(model, opt)
    W = _W(model)
    assert manifold_of(W) == "unitary" and opt.optimizer.param_groups[0]["params"] == [W]
    _steps(model, opt)
    assert unitarity_error(W.detach()) < 1e-5


def test_a_tensor_that_lost_its_tag_is_still_found_through_the_module():
    model = _model()
    del _W(model).manifold  # e.g. a tensor rebuilt by some other library
    manifold, euclidean = split_parameters(model)
    assert manifold == [_W(model)] and manifold_of(_W(model)) == "unitary"  # re-tagged
    assert all(p is not _W(model) for p in euclidean)


@pytest.mark.parametrize("cls", [UnitaryLinear, OrthogonalLinear])
def test_layers_keep_the_manifold_through_deepcopy(cls):
    layer = copy.deepcopy(nn.Sequential(cls(4), nn.Linear(4, 4)))
    assert manifold_of(layer[0].weight) is not None
    assert split_parameters(layer)[0] == [layer[0].weight]


# ------------------------------------------------------------------ tolerance
def test_manifold_tolerance_formula():
    assert manifold_tolerance(100, torch.complex64) == pytest.approx(1e-3)
    assert manifold_tolerance(100, torch.float32) == pytest.approx(1e-3)
    assert manifold_tolerance(100, torch.complex128) == pytest.approx(1e-9)
    assert manifold_tolerance(4, torch.float64) == pytest.approx(2e-10)


def test_check_on_manifold():
    W = torch.linalg.qr(torch.randn(6, 6, dtype=torch.complex128)).Q
    check_on_manifold(W, "W")
    check_on_manifold(W.to(torch.complex64).to(torch.complex128), "upcast W")  # single-precision tolerance
    for bad, shown in ((2 * W, "exceeds the tolerance 0.000245"), (W.clone().fill_(float("nan")), "nan")):
        with pytest.raises(ValueError, match=shown):
            check_on_manifold(bad, "W")


# ------------------------------------------------------------------ foreign optimizers are refused
@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.AdamW(ps, lr=1e-3),
    lambda ps: torch.optim.SGD(ps, lr=1e-3),
    lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True),
])
def test_a_euclidean_optimizer_is_refused_before_it_moves_w(make):
    model = _model()
    opt = make(model.parameters())
    W0 = _W(model).detach().clone()
    model(**_batch()).loss.backward()
    with pytest.raises(RuntimeError, match=r"off the manifold.*create_optimizer.*UnitaryTrainer"):
        opt.step()
    torch.testing.assert_close(_W(model).detach(), W0, rtol=0, atol=0)


def test_a_euclidean_optimizer_on_the_other_parameters_is_fine():
    model = _model()
    others = [p for p in model.parameters() if p is not _W(model)]
    opt = torch.optim.AdamW(others, lr=1e-2)
    before = others[0].detach().clone()
    _steps(model, opt, 2)
    assert not torch.equal(others[0].detach(), before)


def test_a_frozen_w_may_sit_in_a_euclidean_optimizer():
    model = _model()
    _W(model).requires_grad_(False)
    _steps(model, torch.optim.SGD(model.parameters(), lr=1e-2), 1)


# ------------------------------------------------------------------ off-manifold edits are detected at the next forward
def test_an_off_manifold_edit_is_reported_at_the_next_forward():
    model = _model()
    model(**_batch())
    with torch.no_grad():
        _W(model).add_(1e-2 * torch.randn_like(_W(model)))  # what a plain optimizer step does
    with pytest.raises(RuntimeError, match=r"UnitaryRNNCell.recurrent_weight is not unitary.*tolerance.*create_optimizer.*UnitaryRNNCell.project_manifold_parameters_"):
        model(**_batch())
    model.model.cell.project_manifold_parameters_()
    assert unitarity_error(_W(model).detach()) < 1e-5
    model(**_batch())


def test_an_edit_that_stays_on_the_manifold_is_accepted():
    model = _model()
    model(**_batch())
    with torch.no_grad():
        _W(model).mul_(1j)  # i W is unitary
    model(**_batch())


def test_manifold_optimizer_steps_are_not_remeasured():
    """The optimizer records its writes: a forward after a manifold step needs no measurement, and stays valid
    even when the step leaves W (legitimately) a little off, within rounding."""
    model = _model()
    opt = create_optimizer(model, unitary_lr=0.1)
    _steps(model, opt, 3)
    assert _W(model)._manifold_version == _W(model)._version


@pytest.mark.parametrize("cls", [UnitaryLinear, OrthogonalLinear])
def test_layers_detect_off_manifold_edits(cls):
    layer = cls(4)
    x = torch.randn(2, 4, dtype=layer.weight.dtype)
    layer(x)
    with torch.no_grad():
        layer.weight.mul_(2)
    with pytest.raises(RuntimeError, match="is not (unitary|orthogonal)"):
        layer(x)


# ------------------------------------------------------------------ loading a non-unitary W raises, naming the tolerance
@pytest.mark.parametrize("corrupt", ["double", "nan"])
def test_from_pretrained_rejects_a_non_unitary_w(tmp_path, corrupt):
    _model().save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    (key,) = [k for k in weights if k.endswith("recurrent_weight")]
    weights[key] = weights[key] * 2 if corrupt == "double" else weights[key].clone().fill_(float("nan"))
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"recurrent_weight is not unitary: \|\|W\^H W - I\|\|_F = (nan|[0-9.]+) exceeds the tolerance 0.000283"):
        UnitaryRNNForTokenClassification.from_pretrained(tmp_path)


@pytest.mark.parametrize("corrupt", ["double", "nan"])
def test_load_state_dict_rejects_a_non_unitary_w_and_leaves_the_model_as_it_was(corrupt):
    source, target = _model(input_embedding="embedding", input_size=3), _model(input_embedding="embedding", input_size=3)
    state = copy.deepcopy(source.state_dict())
    key = "model.cell.recurrent_weight"
    state[key] = state[key] * 2 if corrupt == "double" else state[key].fill_(float("nan"))
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(ValueError, match=r"model.cell.recurrent_weight is not unitary.*exceeds the tolerance"):
        target.load_state_dict(state)
    for name, value in target.state_dict().items():  # the embedding loads before the cell: nothing was copied
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)


def test_a_bare_cell_or_layer_rejects_a_non_unitary_w_too():
    layer = UnitaryLinear(4)
    state = {"weight": 2 * layer.weight.detach(), "bias": layer.bias.detach()}
    with pytest.raises(ValueError, match="weight is not unitary"):
        layer.load_state_dict(state)
    host = nn.Sequential(nn.Linear(4, 4), UnitaryLinear(4))
    state = {k: v.clone() for k, v in host.state_dict().items()}
    state["1.weight"] = state["1.weight"] * 2
    with pytest.raises(ValueError, match=r"1.weight is not unitary"):
        host.load_state_dict(state)


def test_a_float32_trained_w_loads_into_a_float64_model():
    source, target = _model(), _model().double()
    target.load_state_dict(source.state_dict())
    assert _W(target).dtype == torch.complex128
    target(**_batch())


def test_hand_tagged_parameters_are_found():
    model = nn.Module()
    model.W = mark_manifold(nn.Parameter(torch.eye(3, dtype=torch.complex64)))
    model.b = nn.Parameter(torch.zeros(3))
    assert manifold_parameters(model) == {"W": model.W}
    opt = UnitaryOptimizer(model.parameters())
    model.W.grad = torch.randn(3, 3, dtype=torch.complex64)
    opt.step()
    assert unitarity_error(model.W.detach()) < 1e-5


# ------------------------------------------------------------------------------------------------ project_to_unitary
NEAR_UNITARY_SVD_FAILURE = Path(__file__).parent / "data" / "near_unitary_svd_failure.safetensors"


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.complex64, torch.complex128])
def test_project_to_unitary_gives_the_closest_unitary_matrix(dtype):
    torch.manual_seed(0)
    W = torch.randn(12, 12, dtype=dtype)
    P = project_to_unitary(W)
    assert unitarity_error(P) <= manifold_tolerance(12, dtype)
    # the polar factor: W = P H with H = P^H W Hermitian positive definite
    H = P.mH @ W
    assert torch.allclose(H, H.mH, atol=1e-4 if dtype in (torch.float32, torch.complex64) else 1e-10)
    assert bool((torch.linalg.eigvalsh(0.5 * (H + H.mH)) > 0).all())


def test_project_to_unitary_survives_an_svd_that_does_not_converge(one_thread):
    """A real W of the Cayley optimizer (complex64, N = 128, ||W^H W - I|| = 8.5e-5) on which LAPACK's SVD fails to
    converge with one thread: it crashed a 10,000-step adding run at its periodic re-projection."""
    W = torch.view_as_complex(load_file(str(NEAR_UNITARY_SVD_FAILURE))["W_real_imag"])
    P = project_to_unitary(W)
    assert P.dtype == torch.complex64
    assert unitarity_error(P) <= manifold_tolerance(128, torch.float32)
    U, _, Vh = torch.linalg.svd(W.to(torch.complex128))
    assert torch.allclose(P.to(torch.complex128), U @ Vh, atol=1e-5)
    assert (P - W).abs().max() < 1e-4  # W was nearly unitary: the projection barely moves it


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_project_to_unitary_names_a_non_finite_matrix(bad):
    W = torch.eye(6, dtype=torch.complex64)
    W[2, 3] = bad
    with pytest.raises(ValueError, match=r"\(6, 6\) matrix has NaN or inf entries"):
        project_to_unitary(W)
