"""`lors_parameter_groups`: every parameter once, `lors_B` faster, and the ratio kept by the Trainer's schedule."""

import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import transformers as tf

from lors_hf import LorsLinear, SharedWeight, lors_parameter_groups, lorsify

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import build  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")


def _lors_gpt2(rank: int = 4):
    model, _ = build("gpt2", layers=3)
    return lorsify(model, rank=rank)


@pytest.mark.parametrize("stack_lr_ratio", [1.0, 0.5])
def test_groups_hold_every_trainable_parameter_once_with_lors_b_faster(stack_lr_ratio):
    model = _lors_gpt2()
    model.transformer.wte.weight.requires_grad_(False)  # frozen parameters stay out
    groups = lors_parameter_groups(model, lr=1e-3, weight_decay=0.1, b_lr_ratio=8, stack_lr_ratio=stack_lr_ratio)
    grouped = [id(p) for group in groups for p in group["params"]]
    assert len(grouped) == len(set(grouped))
    assert set(grouped) == {id(p) for p in model.parameters() if p.requires_grad}

    def group_of(param):
        return next(group for group in groups if any(p is param for p in group["params"]))

    layers = [m for m in model.modules() if isinstance(m, LorsLinear)]
    shared = [m.weight for m in model.modules() if isinstance(m, SharedWeight)]
    assert layers and shared
    for weight in [*shared, *(layer.lors_A for layer in layers)]:
        assert group_of(weight)["lr"] == pytest.approx(1e-3 * stack_lr_ratio) and group_of(weight)["weight_decay"] == 0.1
    for layer in layers:
        assert group_of(layer.lors_B)["lr"] == pytest.approx(8e-3 * stack_lr_ratio)
        assert group_of(layer.lors_B)["weight_decay"] == 0.1
        assert group_of(layer.bias)["lr"] == 1e-3 and group_of(layer.bias)["weight_decay"] == 0.0  # private bias

    def ids_at(lr):
        return {id(p) for group in groups if group["lr"] == pytest.approx(lr) for p in group["params"]}

    private_b = {id(layer.lors_B) for layer in layers}
    stack = {id(w) for w in shared} | {id(layer.lors_A) for layer in layers}
    assert ids_at(8e-3 * stack_lr_ratio) == private_b  # nothing else learns at lors_B's rate
    rest = set(grouped) - private_b - stack
    assert ids_at(1e-3) == (rest | stack if stack_lr_ratio == 1 else rest)
    head = group_of(model.transformer.wpe.weight)
    assert head["lr"] == 1e-3 and head["weight_decay"] == 0.1
    assert all(p.ndim == 1 for group in groups if group["weight_decay"] == 0.0 for p in group["params"])


@pytest.mark.parametrize(
    ("model_factory", "kwargs", "message"),
    [
        (lambda: build("gpt2", layers=3)[0], {}, "lorsify"),
        (lambda: _lors_gpt2(rank=0), {}, "private rank"),
        (_lors_gpt2, {"lr": 0.0}, "positive"),
        (_lors_gpt2, {"b_lr_ratio": -1.0}, "positive"),
        (_lors_gpt2, {"stack_lr_ratio": 0.0}, "positive"),
        (_lors_gpt2, {"lr": float("inf")}, "finite positive"),  # these four were accepted
        (_lors_gpt2, {"b_lr_ratio": float("inf")}, "finite positive"),
        (_lors_gpt2, {"weight_decay": -0.1}, "weight_decay must be a finite number >= 0"),
        (_lors_gpt2, {"weight_decay": float("inf")}, "weight_decay must be a finite number >= 0"),
        (_lors_gpt2, {"weight_decay": float("nan")}, "weight_decay must be a finite number >= 0"),  # NaN weights
    ],
)
def test_bad_input_is_named(model_factory, kwargs, message):
    with pytest.raises(ValueError, match=message):
        lors_parameter_groups(model_factory(), **{"lr": 1e-3, **kwargs})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": "1e-3"}, r"lr must be a number, got '1e-3' \(str\)"),  # a string from a config file
        ({"weight_decay": None}, "weight_decay must be a number, got None"),  # failed in step(); was a ValueError
        ({"b_lr_ratio": True}, "b_lr_ratio must be a number, got True"),
    ],
)
def test_a_value_that_is_not_a_number_is_a_type_error(kwargs, message):
    """Like distill's temperature: a wrong type is a TypeError, a number out of range a ValueError."""
    with pytest.raises(TypeError, match=message):
        lors_parameter_groups(_lors_gpt2(), **{"lr": 1e-3, **kwargs})
    assert lors_parameter_groups(_lors_gpt2(), lr=np.float32(1e-3), weight_decay=np.float32(0.1))  # a numpy number


def test_a_checkpoint_path_instead_of_a_model_is_a_type_error(tmp_path):
    """Was an AttributeError: 'str' object has no attribute 'modules'."""
    with pytest.raises(TypeError, match=r"lors_parameter_groups takes a model .*from_pretrained\(path\)"):
        lors_parameter_groups(str(tmp_path), lr=1e-3)


class _LearningRates(tf.TrainerCallback):
    def __init__(self):
        self.seen: list[list[float]] = []

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        self.seen.append([group["lr"] for group in optimizer.param_groups])


def test_trainer_schedule_keeps_the_ratio_and_the_model_learns(tmp_path):
    model = _lors_gpt2()
    starts = torch.randint(0, 99, (256, 1), generator=torch.Generator().manual_seed(0))
    ids = ((starts + torch.arange(12)) % 99).tolist()  # counting sequences: the next token is predictable
    dataset = datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})
    args = tf.TrainingArguments(
        output_dir=str(tmp_path), max_steps=40, per_device_train_batch_size=16, learning_rate=1e-2, warmup_steps=4,
        lr_scheduler_type="cosine", logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
        disable_tqdm=True, seed=0, dataloader_num_workers=0,
    )
    optimizer = torch.optim.AdamW(lors_parameter_groups(model, lr=args.learning_rate, weight_decay=0.01))
    rates = _LearningRates()
    trainer = tf.Trainer(model=model, args=args, train_dataset=dataset, optimizers=(optimizer, None),
                         callbacks=[rates])
    trainer.train()
    assert len(rates.seen) == 40
    assert len({round(lrs[0], 12) for lrs in rates.seen}) > 10  # the schedule moved the learning rate
    for lrs in rates.seen:
        if lrs[0] > 0:
            assert max(lrs) / min(lrs) == pytest.approx(8.0)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert sum(losses[-4:]) / 4 < 0.7 * sum(losses[:4]) / 4, losses
