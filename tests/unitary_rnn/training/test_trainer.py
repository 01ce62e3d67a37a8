"""transformers' Trainer on unitary RNNs: UnitaryTrainer trains W on the manifold; a plain Trainer's default
optimizers are refused with an error that names the fix, before W moves."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from transformers import Trainer, TrainingArguments

from unitary_rnn import UnitaryRNNConfig, UnitaryRNNForTokenClassification
from unitary_rnn.manifold import unitarity_error
from unitary_rnn.training import UnitaryOptimizer, UnitaryTrainer


def _model():
    torch.manual_seed(0)
    return UnitaryRNNForTokenClassification(UnitaryRNNConfig(hidden_size=8, vocab_size=5, num_labels=5))


def _dataset():
    g = torch.Generator().manual_seed(0)
    return Dataset.from_dict({
        "input_ids": torch.randint(0, 5, (16, 6), generator=g).tolist(),
        "labels": torch.randint(0, 5, (16, 6), generator=g).tolist(),
    })


def _args(tmp_path, **kw):
    kw.setdefault("max_steps", 4)
    kw.setdefault("save_strategy", "no")
    return TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, report_to=[], use_cpu=True,
                             logging_steps=1, disable_tqdm=True, **kw)


def _W(model):
    return model.model.cell.recurrent_weight


@pytest.mark.parametrize("optim", [None, "adamw_torch"])
def test_plain_trainer_default_optimizers_are_refused_before_w_moves(tmp_path, optim):
    """Trainer's default (fused AdamW: a crash about complex tensors) and adamw_torch (W left U(N) silently,
    ||W^H W - I|| = 0.46 after 3 steps) both raise at the first step, naming UnitaryTrainer."""
    model = _model()
    W0 = _W(model).detach().clone()
    kw = {} if optim is None else {"optim": optim}
    trainer = Trainer(model=model, args=_args(tmp_path, **kw), train_dataset=_dataset())
    with pytest.raises(RuntimeError, match=r"AdamW would step a parameter on U\(N\).*unitary_rnn.training.UnitaryTrainer"):
        trainer.train()
    torch.testing.assert_close(_W(model).detach(), W0, rtol=0, atol=0)


def test_unitary_trainer_trains_w_on_the_manifold(tmp_path):
    model = _model()
    W0 = _W(model).detach().clone()
    head0 = model.classifier.weight.detach().clone()
    trainer = UnitaryTrainer(model=model, args=_args(tmp_path, learning_rate=1e-2, weight_decay=0.01, max_steps=6),
                             train_dataset=_dataset(), unitary_optimizer_kwargs=dict(method="projunn_t", unitary_lr=0.1))
    result = trainer.train()
    assert result.global_step == 6
    opt = trainer.optimizer.optimizer  # accelerate's wrapper around ours
    assert isinstance(opt, UnitaryOptimizer)
    manifold_group, euclidean_group = opt.param_groups
    assert manifold_group["params"] == [_W(model)] and manifold_group["method"] == "projunn_t"
    assert euclidean_group["base_optimizer"] == "adamw" and euclidean_group["weight_decay"] == 0.01
    assert euclidean_group["base_lr"] == 1e-2 and euclidean_group["lr"] < 1e-2  # the linear schedule decays it
    assert (_W(model).detach() - W0).abs().max() > 1e-3 and not torch.equal(model.classifier.weight.detach(), head0)
    assert unitarity_error(_W(model).detach()) < 1e-5


def test_unitary_trainer_refuses_an_optim_it_would_ignore(tmp_path):
    with pytest.raises(ValueError, match=r"ignore TrainingArguments\(optim='sgd'\).*base_optimizer"):
        UnitaryTrainer(model=_model(), args=_args(tmp_path, optim="sgd"), train_dataset=_dataset())
    with pytest.raises(TypeError, match="unknown keyword"):
        UnitaryTrainer(model=_model(), args=_args(tmp_path), unitary_optimizer_kwargs=dict(learning_rate=1))



def test_unitary_trainer_resumes_from_a_checkpoint_exactly(tmp_path):
    """The optimizer state (projUNN's step counts, the Euclidean moments) goes through Trainer's checkpoint and
    resuming at step 3 ends bit-identical to a straight run of 6 steps."""
    kw = dict(unitary_optimizer_kwargs=dict(method="projunn_t", unitary_lr=0.1))
    args = dict(save_strategy="steps", save_steps=3, max_steps=6, learning_rate=1e-2, seed=0)
    straight = _model()
    UnitaryTrainer(model=straight, args=_args(tmp_path / "a", **args), train_dataset=_dataset(), **kw).train()
    resumed = _model()
    UnitaryTrainer(model=resumed, args=_args(tmp_path / "b", **args), train_dataset=_dataset(), **kw).train(
        resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
