"""Training a LORS model with the ordinary tools: Trainer, gradients, checkpointing, generate, autocast."""

import copy
import sys
from pathlib import Path

import datasets
import pytest
import torch
import torch.nn.functional as F
import transformers as tf
from torch import nn

from lors_hf import LorsConfig, LorsLinear, SharedWeight, lorsify, merge_and_unload
from lors_hf.discovery import plan_ranks

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import build  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")


def _classification_set(size: int = 256, length: int = 8, seed: int = 0) -> datasets.Dataset:
    """Label 1: tokens drawn from the lower half of the vocabulary; label 0: from the upper half."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (size,), generator=generator)
    low = torch.randint(3, 50, (size, length), generator=generator)
    high = torch.randint(50, 99, (size, length), generator=generator)
    input_ids = torch.where(labels[:, None] == 1, low, high)
    return datasets.Dataset.from_dict({"input_ids": input_ids.tolist(), "attention_mask": [[1] * length] * size,
                                       "labels": labels.tolist()})


def _counting_set(size: int = 256, length: int = 12, seed: int = 0) -> datasets.Dataset:
    """Sequences that count up from a random start (mod vocabulary): the next token is predictable."""
    starts = torch.randint(0, 99, (size, 1), generator=torch.Generator().manual_seed(seed))
    input_ids = (starts + torch.arange(length)) % 99
    return datasets.Dataset.from_dict({"input_ids": input_ids.tolist(), "labels": input_ids.tolist()})


def _train(model, dataset, tmp_path, learning_rate: float, steps: int = 40) -> list[float]:
    args = tf.TrainingArguments(
        output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=16, learning_rate=learning_rate,
        warmup_steps=0, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True,
        seed=0, dataloader_num_workers=0,
    )
    trainer = tf.Trainer(model=model, args=args, train_dataset=dataset)
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def _shared_modules(model) -> list[SharedWeight]:
    return [module for module in model.modules() if isinstance(module, SharedWeight)]


@pytest.mark.parametrize(
    ("family", "dataset", "learning_rate"),
    [("bert", _classification_set, 2e-3), ("gpt2", _counting_set, 1e-2)],
)
def test_trainer_fine_tunes_a_lors_model(family, dataset, learning_rate, tmp_path):
    model, _ = build(family, layers=3)
    lorsify(model, rank=4)  # the paper's from-scratch init: B = 0, every layer starts as the shared weight
    shared_before = {id(m): m.weight.detach().clone() for m in _shared_modules(model)}
    losses = _train(model, dataset(), tmp_path, learning_rate)
    assert len(losses) == 40
    assert all(torch.isfinite(torch.tensor(losses)))
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.6 * first, losses
    # both the shared weights and the private factors learnt
    assert all(not torch.equal(m.weight, shared_before[id(m)]) for m in _shared_modules(model))
    assert all(torch.count_nonzero(layer.lors_B) > 0 for layer in model.modules() if isinstance(layer, LorsLinear))


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_shared_weight_gradient_is_the_sum_of_every_layers_gradient(family):
    model, inputs = build(family, layers=3)
    inputs = {**inputs, "labels": inputs["input_ids"] if family == "gpt2" else torch.tensor([0, 1])}
    config = LorsConfig(rank=3, init="svd")
    groups = [group for stack in plan_ranks(model, config) for group in stack.groups]
    lorsify(model, config)
    dense = merge_and_unload(copy.deepcopy(model))  # same effective weights, independent dense layers
    model(**inputs).loss.backward()
    dense(**inputs).loss.backward()
    assert len(groups) == {"bert": 6, "gpt2": 4}[family]
    for group in groups:
        names = [group.module_name(i) for i in group.layer_indices]
        layers = [model.get_submodule(name) for name in names]
        per_layer = [dense.get_submodule(name).weight.grad for name in names]
        per_layer = [grad.T if layers[0].fan_in_fan_out else grad for grad in per_layer]  # Conv1D: (in, out)
        shared_grad = layers[0].shared.weight.grad
        torch.testing.assert_close(shared_grad, sum(per_layer), rtol=1e-4, atol=1e-7)
        scale = shared_grad.abs().max()
        assert scale > 0
        for grad in per_layer:  # each layer's contribution matters: leaving one out changes the sum
            assert (shared_grad - (sum(per_layer) - grad)).abs().max() > 1e-3 * scale
        for layer, grad in zip(layers, per_layer, strict=True):  # the private factors: the chain rule
            torch.testing.assert_close(layer.lors_B.grad, grad @ layer.lors_A.T, rtol=1e-4, atol=1e-7)
            torch.testing.assert_close(layer.lors_A.grad, layer.lors_B.T @ grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_gradient_checkpointing_gives_the_same_gradients(family):
    model, inputs = build(family, layers=3)
    inputs = {**inputs, "labels": inputs["input_ids"] if family == "gpt2" else torch.tensor([1, 0])}
    lorsify(model, rank=3, init="svd")
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    model.train()
    probe = next(m for m in model.modules() if isinstance(m, LorsLinear))
    calls = []
    probe.register_forward_hook(lambda *_: calls.append(1))

    def gradients(net):
        net.zero_grad(set_to_none=True)
        calls.clear()
        net(**inputs).loss.backward()
        return {name: p.grad.clone() for name, p in net.named_parameters() if p.grad is not None}, len(calls)

    plain, plain_calls = gradients(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed, checkpointed_calls = gradients(model)
    assert plain_calls == 1 and checkpointed_calls == 2  # the block really was recomputed in backward
    assert set(checkpointed) == set(plain)
    assert any("lors_shared" in name for name in plain)
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_gpt2_generate_at_full_rank_matches_the_original():
    original, inputs = build("gpt2", layers=3)
    model = lorsify(copy.deepcopy(original), rank="full", init="svd")
    settings = {"max_new_tokens": 10, "do_sample": False, "pad_token_id": 0}
    prompt = inputs["input_ids"][:, :5]
    with torch.no_grad():
        expected = original.generate(prompt, **settings)
        generated = model.generate(prompt, **settings)
    assert generated.shape == (2, 15)
    assert torch.equal(generated, expected)
    # the comparison is not trivial: a heavily shared model generates something else
    shared_only = lorsify(copy.deepcopy(original), rank=0, init="svd")
    with torch.no_grad():
        assert not torch.equal(shared_only.generate(prompt, **settings), expected)


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_bf16_autocast_forward_and_backward_on_cpu(family):
    model, inputs = build(family, layers=2)
    inputs = {**inputs, "labels": inputs["input_ids"] if family == "gpt2" else torch.tensor([1, 0])}
    lorsify(model, rank=4, init="svd")
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model(**inputs)
    assert outputs.logits.dtype == torch.bfloat16  # autocast really reached the LORS layers
    assert torch.isfinite(outputs.loss)
    outputs.loss.backward()
    for shared in _shared_modules(model):
        assert shared.weight.dtype == torch.float32
        assert shared.weight.grad is not None and torch.isfinite(shared.weight.grad).all()
        assert shared.weight.grad.abs().sum() > 0
    for layer in model.modules():
        if isinstance(layer, LorsLinear):
            assert torch.isfinite(layer.lors_A.grad).all() and torch.isfinite(layer.lors_B.grad).all()


def test_torch_compile_traces_lors_layers_in_one_graph_and_matches_eager():
    model, _ = build("gpt2", layers=3)
    lorsify(model, rank=3, init="svd")
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    model.train()
    eager = copy.deepcopy(model)
    train_ids = torch.randint(0, 99, (2, 40), generator=torch.Generator().manual_seed(1))
    decode_ids = train_ids[:, :1]
    layers = [m for m in model.modules() if isinstance(m, LorsLinear)]
    # both of the layer's paths run: 80 tokens materialise W_shared + B A, 2 tokens take the factored path
    assert all(2 < layer.materialize_above < train_ids.numel() for layer in layers)

    def loss_of(net):  # the loss outside the model: transformers' own loss function breaks the graph
        logits = net(input_ids=train_ids).logits
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), train_ids[:, 1:].flatten())

    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)  # fullgraph: a graph break in a LORS layer is an error
    compiled_loss, eager_loss = loss_of(compiled), loss_of(eager)
    compiled_loss.backward()
    eager_loss.backward()
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
    expected = dict(eager.named_parameters())
    names = [name for name, p in model.named_parameters() if p.grad is not None]
    assert len(names) == len(expected) and any("lors_shared" in name for name in names)
    for name in names:
        torch.testing.assert_close(model.get_parameter(name).grad, expected[name].grad, rtol=1e-4, atol=1e-6,
                                   msg=name)
    with torch.no_grad():
        torch.testing.assert_close(compiled(input_ids=decode_ids).logits, eager(input_ids=decode_ids).logits,
                                   rtol=1e-5, atol=1e-5)


def test_weight_cache_follows_the_trainers_fused_adamw_during_evaluation(tmp_path):
    """Fused AdamW (the Trainer's default optimizer with torch >= 2.8) updates the weights without bumping
    their version counters; evaluations during and after training must still see the trained weights."""
    from lors_hf.layer import set_weight_cache

    model, _ = build("gpt2", layers=2)
    lorsify(model, rank=4)
    set_weight_cache(model)
    args = tf.TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
        optim="adamw_torch_fused", eval_strategy="steps", eval_steps=2, save_strategy="no", report_to="none",
        use_cpu=True, disable_tqdm=True, seed=0, dataloader_num_workers=0,
    )
    trainer = tf.Trainer(model=model, args=args, train_dataset=_counting_set(64),
                         eval_dataset=_counting_set(16, seed=1))
    trainer.train()
    during = [entry["eval_loss"] for entry in trainer.state.log_history if "eval_loss" in entry]
    cached = trainer.evaluate()["eval_loss"]
    set_weight_cache(model, False)
    plain = trainer.evaluate()["eval_loss"]
    assert cached == pytest.approx(plain, abs=1e-6)
    assert during[-1] == pytest.approx(plain, abs=1e-6)
