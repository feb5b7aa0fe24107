"""DistillationTrainer: a converted student moves towards its frozen dense teacher."""

import copy
import math

import datasets
import pytest
import torch
import transformers as tf
from tiny_models import build

from lors_hf import LorsConfig, lorsify
from lors_hf.distill import DistillationTrainer, distill, distillation_losses


def _token_dataset(vocab: int, rows: int = 64, length: int = 16, labels: int | None = None, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    data = {"input_ids": torch.randint(1, vocab, (rows, length), generator=generator).tolist(),
            "attention_mask": torch.ones(rows, length, dtype=torch.long).tolist()}
    data["attention_mask"][0][-4:] = [0] * 4  # some padding, left out of the losses
    if labels is not None:
        data["labels"] = torch.randint(0, labels, (rows,), generator=generator).tolist()
    return datasets.Dataset.from_dict(data)


def _args(tmp_path, steps: int = 40, **overrides) -> tf.TrainingArguments:
    return tf.TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=8,
                                learning_rate=overrides.pop("learning_rate", 5e-3), warmup_steps=0, logging_steps=10,
                                save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
                                **overrides)


def _tiny_bert_model() -> tf.BertModel:
    """A BertModel (no logits); no dropout and larger weights, so that the layers matter."""
    torch.manual_seed(0)
    config = tf.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=0.0, initializer_range=0.2)
    return tf.BertModel(config).eval()


def _student_and_teacher(family: str):
    teacher, _ = build(family, layers=3)
    student = lorsify(copy.deepcopy(teacher), LorsConfig(rank=1, init="svd"))
    return student.train(), teacher


def _distances(student, teacher, batch) -> dict[str, float]:
    student.eval()
    with torch.no_grad():
        terms = distillation_losses(student(**batch, output_hidden_states=True),
                                    teacher(**batch, output_hidden_states=True), batch["attention_mask"])
    student.train()
    return {name: float(value) for name, value in terms.items()}


def _held_out_batch(vocab: int) -> dict[str, torch.Tensor]:
    held_out = _token_dataset(vocab, rows=16, seed=1)
    return {k: torch.tensor(held_out[k]) for k in ("input_ids", "attention_mask")}


def test_distillation_reduces_the_kl_of_a_causal_lm_to_its_teacher(tmp_path):
    student, teacher = _student_and_teacher("llama")
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    batch = _held_out_batch(99)
    before = _distances(student, teacher, batch)
    trainer = DistillationTrainer(model=student, args=_args(tmp_path), train_dataset=_token_dataset(99),
                                  teacher_model=teacher, temperature=2.0, alpha_kl=1.0, alpha_hidden=1.0)
    trainer.train()
    after = _distances(student, teacher, batch)
    assert before["kl"] > 1e-4
    assert after["kl"] < 0.7 * before["kl"]
    assert after["hidden"] < before["hidden"]
    # the teacher is frozen, in eval mode and untouched
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    for name, value in teacher.state_dict().items():
        torch.testing.assert_close(value, teacher_state[name], rtol=0, atol=0)
    logged = [entry for entry in trainer.state.log_history if "distill_kl" in entry]
    assert logged and "distill_hidden" in logged[0]


def test_distillation_works_for_a_model_without_logits(tmp_path):
    teacher = _tiny_bert_model()
    student = lorsify(copy.deepcopy(teacher), LorsConfig(rank=1, init="svd")).train()
    batch = _held_out_batch(99)
    before = _distances(student, teacher, batch)
    assert "kl" not in before and before["hidden"] > 1e-4
    trainer = distill(student, teacher, _token_dataset(99), _args(tmp_path), alpha_kl=1.0, alpha_hidden=1.0)
    assert trainer.model is student
    after = _distances(student, teacher, batch)
    assert after["hidden"] < 0.7 * before["hidden"]


def test_last_hidden_state_alone_is_distilled_when_hidden_states_are_off(tmp_path):
    teacher = _tiny_bert_model()
    student = lorsify(copy.deepcopy(teacher), LorsConfig(rank=1, init="svd"))
    batch = _held_out_batch(99)
    with torch.no_grad():
        terms = distillation_losses(student(**batch), teacher(**batch), batch["attention_mask"])
        same = distillation_losses(teacher(**batch), teacher(**batch), batch["attention_mask"])
    assert terms["hidden"] > 1e-4 and float(same["hidden"]) == 0.0


def test_task_loss_and_evaluation_with_a_classifier(tmp_path):
    student, teacher = _student_and_teacher("bert")
    train = _token_dataset(99, labels=2)
    trainer = DistillationTrainer(model=student, args=_args(tmp_path, steps=10), train_dataset=train,
                                  eval_dataset=train.select(range(16)), teacher_model=teacher, alpha_task=1.0)
    trainer.train()
    assert any("distill_task" in entry for entry in trainer.state.log_history)
    metrics = trainer.evaluate()
    # evaluation reports the student's own loss, as a plain Trainer does (not the distillation objective)
    plain = tf.Trainer(model=student, args=_args(tmp_path, steps=10), eval_dataset=train.select(range(16)))
    assert metrics["eval_loss"] == pytest.approx(plain.evaluate()["eval_loss"], rel=1e-6)
    predictions = trainer.predict(train.select(range(8)))
    assert predictions.predictions.shape == (8, 2)  # logits only: the hidden states are not returned


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_the_task_loss_is_label_smoothed_as_the_trainer_smooths_it(family, tmp_path):
    """With label_smoothing_factor, the task term is the Trainer's smoothed loss (shifted for a causal LM),
    not the model's plain cross-entropy."""
    student, teacher = _student_and_teacher(family)
    for module in student.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    ids = torch.randint(1, student.config.vocab_size, (4, 12), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "labels": ids.clone() if family == "gpt2" else torch.tensor([0, 1, 1, 0])}
    args = _args(tmp_path, steps=1, label_smoothing_factor=0.3)
    trainer = DistillationTrainer(model=student, args=args, teacher_model=teacher, alpha_kl=0.0, alpha_hidden=0.0,
                                  alpha_task=1.0)
    with torch.no_grad():
        distilled = float(trainer.compute_loss(student, dict(batch)))
        smoothed = float(tf.Trainer(model=student, args=args).compute_loss(student, dict(batch)))
        plain = float(student(**batch).loss)
    assert distilled == pytest.approx(smoothed, rel=1e-6)
    assert abs(distilled - plain) > 1e-5  # smoothing changes it (a little: the tiny models' logits are flat)


def test_kl_is_zero_for_identical_logits_and_positive_otherwise():
    logits = torch.randn(2, 5, 7)
    mask = torch.ones(2, 5, dtype=torch.long)
    outputs = {"logits": logits}
    assert float(distillation_losses(outputs, outputs, mask, use_hidden=False)["kl"]) == pytest.approx(0.0, abs=1e-7)
    other = {"logits": logits + torch.randn(2, 5, 7)}
    assert float(distillation_losses(other, outputs, mask, use_hidden=False)["kl"]) > 0.01
    # masked positions do not count
    mask[1, 3:] = 0
    changed = logits.clone()
    changed[1, 3:] += 10 * torch.randn(2, 7)
    assert float(distillation_losses({"logits": changed}, outputs, mask, use_hidden=False)["kl"]) == pytest.approx(
        0.0, abs=1e-7)


def test_kl_needs_logits_from_both_models(tmp_path):
    """A teacher without a head (BertModel) and a classifier student: alpha_kl > 0 was silently left out."""
    hidden = torch.randn(2, 5, 32)
    with_logits, without = {"logits": torch.randn(2, 3), "last_hidden_state": hidden}, {"last_hidden_state": hidden}
    with pytest.raises(ValueError, match="the student returns logits but the teacher does not.*alpha_kl=0"):
        distillation_losses(with_logits, without)
    with pytest.raises(ValueError, match="the teacher returns logits but the student does not"):
        distillation_losses(without, with_logits)
    assert set(distillation_losses(with_logits, without, use_kl=False)) == {"hidden"}
    teacher = _tiny_bert_model()
    student = tf.BertForSequenceClassification(teacher.config).train()
    batch = {"input_ids": torch.tensor([[1, 2, 3, 4]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    trainer = DistillationTrainer(model=student, args=_args(tmp_path), teacher_model=teacher)
    with pytest.raises(ValueError, match="alpha_kl=0"):
        trainer.compute_loss(student, dict(batch))
    trainer = DistillationTrainer(model=student, args=_args(tmp_path), teacher_model=teacher, alpha_kl=0.0)
    assert math.isfinite(float(trainer.compute_loss(student, dict(batch)).detach()))


def test_distillation_losses_refuses_a_bad_temperature_and_tuple_outputs():
    """temperature=0 gave a nan KL, a negative one was taken, and tuple outputs (return_dict=False) gave {}."""
    outputs = {"logits": torch.randn(2, 5, 7)}
    for temperature in (0.0, -2.0, float("inf")):
        with pytest.raises(ValueError, match="distillation_losses: temperature must be a finite number > 0"):
            distillation_losses(outputs, outputs, temperature=temperature)
    with pytest.raises(TypeError, match="temperature must be a number, got '2'"):
        distillation_losses(outputs, outputs, temperature="2")
    model = tf.BertForSequenceClassification(_tiny_bert_model().config).eval()
    with torch.no_grad():
        output = model(input_ids=torch.tensor([[1, 2, 3]]))
    with pytest.raises(TypeError, match="the student's outputs are a tuple.*return_dict=True"):
        distillation_losses(output.to_tuple(), output)
    with pytest.raises(TypeError, match="the teacher's outputs are a tuple"):
        distillation_losses(output, output.to_tuple())


def test_invalid_settings_are_refused(tmp_path):
    student, teacher = _student_and_teacher("llama")
    with pytest.raises(ValueError, match="temperature"):
        DistillationTrainer(model=student, args=_args(tmp_path), teacher_model=teacher, temperature=0)
    with pytest.raises(ValueError, match="alphas"):
        DistillationTrainer(model=student, args=_args(tmp_path), teacher_model=teacher, alpha_kl=0, alpha_hidden=0)
    with pytest.raises(ValueError, match="temperature must be a finite"):
        DistillationTrainer(model=student, args=_args(tmp_path), teacher_model=teacher, temperature=float("nan"))
    with pytest.raises(ValueError, match="alphas must be finite"):
        DistillationTrainer(model=student, args=_args(tmp_path), teacher_model=teacher, alpha_hidden=float("nan"))


def test_bad_teacher_settings_and_distill_arguments_are_named(tmp_path):
    """A teacher that is no model, a string temperature or alpha, args that are no TrainingArguments and an empty
    dataset failed with AttributeErrors and TypeErrors from deep inside, or torch's num_samples error."""
    student, teacher = _student_and_teacher("llama")
    for bad in (None, "bert-base-uncased"):
        with pytest.raises(TypeError, match=f"teacher_model must be a model.*got {bad!r}.*from_pretrained"):
            DistillationTrainer(model=student, args=_args(tmp_path), teacher_model=bad)
    with pytest.raises(TypeError, match="temperature must be a number, got '2'"):
        DistillationTrainer(model=student, args=_args(tmp_path), teacher_model=teacher, temperature="2")
    with pytest.raises(TypeError, match="alphas must be numbers.*alpha_kl='1'"):
        DistillationTrainer(model=student, args=_args(tmp_path), teacher_model=teacher, alpha_kl="1")
    with pytest.raises(TypeError, match="args must be a transformers.TrainingArguments, got str"):
        distill(student, teacher, _token_dataset(99), str(tmp_path))
    with pytest.raises(ValueError, match="train_dataset is empty"):
        distill(student, teacher, _token_dataset(99).select([]), _args(tmp_path))


def test_a_teacher_that_is_the_student_is_refused(tmp_path):
    """lorsify converts in place: `teacher = model` before it makes teacher and student one model, which freezing
    the teacher would freeze (and training then fails deep in autograd)."""
    model, _ = build("llama")
    teacher = model
    lorsify(model, LorsConfig(rank=1, init="svd"))
    with pytest.raises(ValueError, match="shares parameters with the model.*copy.deepcopy"):
        DistillationTrainer(model=model, args=_args(tmp_path), teacher_model=teacher)
    assert all(p.requires_grad for p in model.parameters())  # nothing was frozen


def _gradients_of_one_step(student, teacher, args, batch, **kwargs) -> tuple[float, dict[str, torch.Tensor]]:
    trainer = DistillationTrainer(model=student, args=args, teacher_model=teacher, **kwargs)
    trainer.current_gradient_accumulation_steps = args.gradient_accumulation_steps
    student.zero_grad()
    loss = float(trainer.training_step(student, dict(batch)))
    return loss, {name: p.grad.clone() for name, p in student.named_parameters() if p.grad is not None}


def test_gradient_accumulation_divides_the_loss_with_or_without_a_compute_loss_func(tmp_path):
    """The distillation loss is a per-batch mean: each of N accumulated steps counts 1/N, also when the user gives
    a compute_loss_func (the Trainer alone would then leave the loss undivided: N times the gradient)."""
    student, teacher = _student_and_teacher("llama")
    ids = torch.randint(1, 99, (4, 12), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    calls = []

    def next_token_loss(outputs, labels, num_items_in_batch=None):  # the signature transformers documents
        calls.append(num_items_in_batch)
        logits = outputs.logits[:, :-1]
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))

    one_loss, one = _gradients_of_one_step(student, teacher, _args(tmp_path, steps=1), batch)
    args = _args(tmp_path, steps=1, gradient_accumulation_steps=2)
    for kwargs in ({}, {"compute_loss_func": next_token_loss}, {"compute_loss_func": next_token_loss,
                                                                 "alpha_task": 1.0}):
        loss, grads = _gradients_of_one_step(student, teacher, args, batch, **kwargs)
        reference_loss, reference = (one_loss, one) if "alpha_task" not in kwargs else _gradients_of_one_step(
            student, teacher, _args(tmp_path, steps=1), batch, **kwargs)
        assert loss == pytest.approx(reference_loss / 2, rel=1e-5), kwargs
        assert all(torch.allclose(grads[name], reference[name] / 2, atol=1e-7, rtol=1e-4) for name in reference)
    assert calls and all(count is None for count in calls)  # the task term is a per-batch mean, like the others


@pytest.mark.parametrize("alpha_task", [0.0, 1.0])
def test_an_encoder_decoder_given_only_labels_distils(alpha_task, tmp_path):
    """A seq2seq batch (input_ids, attention_mask, labels) has no decoder inputs: T5 builds them from the labels,
    so the teacher (and a student without task loss) must get the labels too."""
    student, teacher = _student_and_teacher("t5")
    rows = 16
    generator = torch.Generator().manual_seed(0)
    data = datasets.Dataset.from_dict({"input_ids": torch.randint(2, 99, (rows, 10), generator=generator).tolist(),
                                       "attention_mask": [[1] * 10] * rows,
                                       "labels": torch.randint(2, 99, (rows, 6), generator=generator).tolist()})
    trainer = DistillationTrainer(model=student, args=_args(tmp_path, steps=2), train_dataset=data,
                                  teacher_model=teacher, alpha_task=alpha_task)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "distill_kl" in entry or "train_loss" in entry]
    assert logged and all(math.isfinite(entry.get("distill_kl", entry.get("train_loss"))) for entry in logged)


def test_encoder_decoder_outputs_are_masked_with_the_decoder_mask():
    """Decoder logits are masked by the decoder's mask (or labels != -100), not by the encoder's."""
    logits = torch.randn(2, 5, 7)
    teacher = {"logits": logits, "encoder_last_hidden_state": torch.randn(2, 9, 4)}
    changed = logits.clone()
    changed[1, 3:] += 10 * torch.randn(2, 7)  # decoder padding of sequence 1 differs
    student = {"logits": changed, "encoder_last_hidden_state": torch.randn(2, 9, 4)}
    encoder_mask = torch.ones(2, 9, dtype=torch.long)
    decoder_mask = torch.ones(2, 5, dtype=torch.long)
    decoder_mask[1, 3:] = 0
    kl = distillation_losses(student, teacher, encoder_mask, use_hidden=False, decoder_attention_mask=decoder_mask)
    assert float(kl["kl"]) == pytest.approx(0.0, abs=1e-7)
    unmasked = distillation_losses(student, teacher, encoder_mask, use_hidden=False)
    assert float(unmasked["kl"]) > 0.01


def test_a_teacher_of_another_width_needs_alpha_hidden_zero():
    student = {"last_hidden_state": torch.randn(2, 5, 32)}
    teacher = {"last_hidden_state": torch.randn(2, 5, 64)}
    with pytest.raises(ValueError, match="another width needs alpha_hidden=0"):
        distillation_losses(student, teacher)


def test_teacher_runs_under_the_students_mixed_precision(tmp_path):
    student, teacher = _student_and_teacher("llama")
    seen = {}

    def record(name):
        def hook(_module, _args):
            seen.setdefault(name, torch.is_autocast_enabled("cpu"))
        return hook

    student.model.layers[0].register_forward_pre_hook(record("student"))
    teacher.model.layers[0].register_forward_pre_hook(record("teacher"))
    trainer = DistillationTrainer(model=student, args=_args(tmp_path, steps=1, bf16=True),
                                  train_dataset=_token_dataset(99), teacher_model=teacher)
    trainer.train()
    assert seen == {"student": True, "teacher": True}


def test_a_regression_head_is_refused_for_the_kl_term(tmp_path):
    """One logit per position (num_labels=1): the softmax is always 1, so the KL term was 0 whatever the models
    predicted (teacher 3.0, student -5.0 gave kl 0.0) and alpha_kl silently did nothing."""
    student, teacher = {"logits": torch.tensor([[-5.0], [2.0]])}, {"logits": torch.tensor([[3.0], [-1.0]])}
    with pytest.raises(ValueError, match="regression head.*alpha_kl=0"):
        distillation_losses(student, teacher, use_hidden=False)
    assert set(distillation_losses(student, teacher, use_hidden=False, use_kl=False)) == set()
    teacher_model = tf.BertForSequenceClassification(tf.BertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, num_labels=1)).eval()
    student_model = lorsify(copy.deepcopy(teacher_model), LorsConfig(rank=1, init="svd")).train()
    batch = {"input_ids": torch.tensor([[1, 2, 3, 4]]), "attention_mask": torch.ones(1, 4, dtype=torch.long),
             "labels": torch.tensor([0.5])}
    trainer = DistillationTrainer(model=student_model, args=_args(tmp_path), teacher_model=teacher_model)
    with pytest.raises(ValueError, match="regression head"):
        trainer.compute_loss(student_model, dict(batch))
    trainer = DistillationTrainer(model=student_model, args=_args(tmp_path), teacher_model=teacher_model,
                                  alpha_kl=0.0, alpha_task=1.0)
    assert math.isfinite(float(trainer.compute_loss(student_model, dict(batch)).detach()))


def test_a_multi_label_classifier_is_refused_for_the_kl_term(tmp_path):
    """A multi-label head scores each label with a sigmoid; the softmax KL ignored that: a teacher sure of every
    label (logits +5) and a student sure of none (-5) were at KL 0.0, so alpha_kl pulled nowhere."""
    config = tf.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=64, num_labels=3,
                           problem_type="multi_label_classification")
    teacher = tf.BertForSequenceClassification(config).eval()
    student = lorsify(copy.deepcopy(teacher), LorsConfig(rank=1, init="svd")).train()
    batch = {"input_ids": torch.tensor([[1, 2, 3, 4]]), "attention_mask": torch.ones(1, 4, dtype=torch.long),
             "labels": torch.tensor([[1.0, 0.0, 1.0]])}
    trainer = DistillationTrainer(model=student, args=_args(tmp_path), teacher_model=teacher)
    with pytest.raises(ValueError, match="multi-label classifier.*alpha_kl=0"):
        trainer.compute_loss(student, dict(batch))
    trainer = DistillationTrainer(model=student, args=_args(tmp_path), teacher_model=teacher, alpha_kl=0.0,
                                  alpha_task=1.0)
    assert math.isfinite(float(trainer.compute_loss(student, dict(batch)).detach()))


def test_the_distill_averages_of_a_second_train_call_hold_only_its_own_steps(tmp_path, monkeypatch):
    """The terms summed after the last logging step of one train() (steps 11-15 with logging_steps=10) were never
    logged and were folded into the first log of the next train(): 15 batches averaged under a log of 10."""
    import lors_hf.distill as distill_module

    student, teacher = _student_and_teacher("llama")
    trainer = DistillationTrainer(model=student, args=_args(tmp_path, steps=15), train_dataset=_token_dataset(99),
                                  teacher_model=teacher)
    trainer.train()
    seen = []
    original = distill_module.distillation_losses

    def recording(*args, **kwargs):
        terms = original(*args, **kwargs)
        seen.append({name: float(value.detach()) for name, value in terms.items()})
        return terms

    monkeypatch.setattr(distill_module, "distillation_losses", recording)
    trainer.train()
    first = next(entry for entry in trainer.state.log_history if "distill_kl" in entry)
    assert first["step"] == 10 and len(seen) == 15
    for name in ("kl", "hidden"):
        assert first[f"distill_{name}"] == pytest.approx(sum(s[name] for s in seen[:10]) / 10, abs=2e-6)


def test_the_teacher_follows_the_student_when_the_trainer_places_it_in_train(tmp_path, monkeypatch):
    """With bf16_full_eval the Trainer leaves the student where it is in __init__ and moves it to args.device only
    in train(); the teacher, moved once in __init__ to the student's device then, stayed behind (on a GPU: the
    student and the inputs on cuda, the teacher on the CPU). It must be moved after the student, to its device."""
    student, teacher = _student_and_teacher("llama")
    trainer = DistillationTrainer(model=student, args=_args(tmp_path, steps=1, bf16_full_eval=True),
                                  train_dataset=_token_dataset(99), teacher_model=teacher)
    assert not trainer.place_model_on_device
    moves = []
    for name, module in (("student", student), ("teacher", teacher)):
        def to(*args, _name=name, _to=module.to, **kwargs):
            moves.append((_name, args, kwargs))
            return _to(*args, **kwargs)
        monkeypatch.setattr(module, "to", to)
    trainer.train()
    # the Trainer moves the student (accelerate's prepare moves it again, to the same device); the teacher follows
    assert moves[0][0] == "student" and moves[1] == ("teacher", *moves[0][1:])
