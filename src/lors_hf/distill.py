"""Recovery by knowledge distillation: a converted (LORS) student learns to behave like its dense teacher.

`DistillationTrainer` is a `transformers.Trainer` whose loss is

    alpha_kl * T^2 * KL(softmax(teacher / T) || softmax(student / T))       (models with logits)
  + alpha_hidden * mean over layers of MSE(norm(student hidden), norm(teacher hidden))  (another depth: last only)
  + alpha_task * the student's own loss (needs labels)

where ``norm`` is a LayerNorm without parameters over the hidden dimension, so every layer counts alike
whatever the scale of its activations. Padding (``attention_mask == 0``; for an encoder-decoder's decoder
outputs ``decoder_attention_mask == 0``, else ``labels == -100``) is left out of both terms. The teacher
runs under the same mixed precision as the student. In evaluation the loss is the student's own, as with
a plain Trainer, so ``eval_loss`` (and a perplexity from it) compares with the dense model's.
A model without logits (``BertModel``) is distilled on its hidden states (``last_hidden_state`` when it
returns no ``hidden_states``).

Example:
    >>> # from lors_hf.distill import DistillationTrainer
    >>> # trainer = DistillationTrainer(model=student, args=TrainingArguments("out"), train_dataset=ds,
    >>> #                               teacher_model=dense_model, temperature=2.0, alpha_hidden=1.0)
    >>> # trainer.train()
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer, TrainingArguments
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from .calibration import decoder_inputs_come_from_labels

__all__ = ["DistillationTrainer", "distill", "distillation_losses"]


class DistillationTrainer(Trainer):
    """A `transformers.Trainer` that trains the model (student) to match a frozen `teacher_model`.

    Args:
        *args, **kwargs: as for `transformers.Trainer` (``model`` is the student).
        teacher_model: the dense model to imitate; it is frozen, put in eval mode and moved to the
            student's device (again whenever the Trainer places the student, e.g. in ``train()``). Same
            tokenizer / inputs as the student.
        temperature: softmax temperature of the KL term (the KL is scaled by ``T^2``).
        alpha_kl: weight of the KL divergence between teacher and student logits (softmax over classes or the
            vocabulary: a regression or multi-label head needs ``alpha_kl=0``, else a ValueError).
        alpha_hidden: weight of the normalised MSE between the hidden states of student and teacher.
        alpha_task: weight of the student's own loss (``outputs.loss``; the batch needs ``labels``).

    The logged training ``loss`` is the weighted sum; ``distill_kl``, ``distill_hidden`` and ``distill_task``
    (the unweighted terms, averaged since the last log of this ``train()``) are logged next to it.
    ``evaluate()`` reports the student's own loss (``eval_loss``), like a plain Trainer.

    Every term is a mean over one batch's positions, so under ``gradient_accumulation_steps`` each accumulated
    batch weighs the same whatever its number of real (unpadded) tokens: with padded batches of unequal length
    that is close to, not exactly, one large batch (the plain Trainer's token-count weighting is exact).

    Example:
        >>> # trainer = DistillationTrainer(model=student, args=args, train_dataset=train,
        >>> #                               teacher_model=teacher, alpha_task=1.0)
        >>> # trainer.train()
    """

    def __init__(
        self,
        *args: Any,
        teacher_model: nn.Module,
        temperature: float = 2.0,
        alpha_kl: float = 1.0,
        alpha_hidden: float = 1.0,
        alpha_task: float = 0.0,
        **kwargs: Any,
    ) -> None:
        if not isinstance(teacher_model, nn.Module):
            given = repr(teacher_model) if teacher_model is None or isinstance(teacher_model, str) else (
                type(teacher_model).__name__)
            raise TypeError(f"DistillationTrainer: teacher_model must be a model (torch.nn.Module), got {given}; "
                            "load a checkpoint first, e.g. AutoModelForCausalLM.from_pretrained(name_or_path).")
        temperature = _checked_temperature(temperature, "DistillationTrainer")
        alphas = (alpha_kl, alpha_hidden, alpha_task)
        if not all(_is_number(a) for a in alphas):
            raise TypeError("DistillationTrainer: the alphas must be numbers, got "
                            f"alpha_kl={alpha_kl!r}, alpha_hidden={alpha_hidden!r}, alpha_task={alpha_task!r}.")
        if not all(math.isfinite(a) and a >= 0 for a in alphas) or sum(alphas) == 0:
            raise ValueError("DistillationTrainer: the alphas must be finite, >= 0 and not all zero, got "
                             f"alpha_kl={alpha_kl}, alpha_hidden={alpha_hidden}, alpha_task={alpha_task}.")
        super().__init__(*args, **kwargs)
        student_parameters = {id(p) for p in self.model.parameters()}
        if any(id(p) in student_parameters for p in teacher_model.parameters()):
            raise ValueError("DistillationTrainer: teacher_model shares parameters with the model (lorsify converts "
                             "in place, so `teacher = model; lorsify(model, ...)` makes them one model, and freezing "
                             "the teacher would freeze the student): pass a copy of the dense model taken before "
                             "conversion, e.g. `teacher = copy.deepcopy(model)` before `lorsify(model, ...)`.")
        self.temperature = temperature
        self.alpha_kl, self.alpha_hidden, self.alpha_task = float(alpha_kl), float(alpha_hidden), float(alpha_task)
        student_device = next(self.model.parameters()).device
        self.teacher_model = teacher_model.to(student_device).eval()
        self.teacher_model.requires_grad_(False)
        # Our loss is a per-batch mean: the Trainer must divide it by the gradient accumulation steps. Since
        # transformers 5.2x it does when told so; before, it skipped the division whenever a compute_loss_func is
        # given (that function then normalises by the tokens of the whole accumulated batch), and we divide instead.
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False
        self._divide_for_accumulation = not hasattr(Trainer, "loss_is_scaled_for_ga")
        self._distill_sums: dict[str, float] = {}
        self._distill_count = 0

    def _move_model_to_device(self, model: nn.Module, device: torch.device) -> None:
        # The Trainer places the student here: in __init__, or only in train() (a model_init's model; with
        # fp16/bf16_full_eval): the teacher follows, else it stays where it was in __init__ (the CPU, say).
        super()._move_model_to_device(model, device)
        teacher = getattr(self, "teacher_model", None)  # None while Trainer.__init__ places the student
        if teacher is not None and getattr(model, "hf_device_map", None) is None and (
                getattr(teacher, "hf_device_map", None) is None):
            teacher.to(device)

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        if not model.training:  # evaluation: the model's own loss, comparable with the dense model's
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        use_hidden = self.alpha_hidden > 0
        student_inputs, teacher_inputs = dict(inputs), dict(inputs)
        # the task loss as the Trainer makes it: from the labels when they are smoothed (label_smoothing_factor)
        # or a compute_loss_func is given, else the model's own loss
        own_task_loss = self.alpha_task > 0 and (self.label_smoother is not None or self.compute_loss_func is not None)
        labels = inputs.get("labels") if own_task_loss else None
        # An encoder-decoder given no decoder inputs builds them from the labels: both models keep them then
        # (each also computes a loss that goes unused unless it is the student's task loss).
        if not decoder_inputs_come_from_labels(self.accelerator.unwrap_model(model), inputs):
            teacher_inputs.pop("labels", None)
            if self.alpha_task == 0 or own_task_loss:
                student_inputs.pop("labels", None)
        if use_hidden:
            student_inputs["output_hidden_states"] = teacher_inputs["output_hidden_states"] = True
        student_outputs = model(**student_inputs)
        config = getattr(self.accelerator.unwrap_model(model), "config", None)
        if self.alpha_kl > 0 and getattr(config, "problem_type", None) == "multi_label_classification":
            raise ValueError("DistillationTrainer: a multi-label classifier (problem_type='multi_label_classification') "
                             "scores each label on its own (a sigmoid), but the KL term compares softmaxes over the "
                             "labels, which ignore how likely each label is (logits all +5 and all -5 give KL 0): "
                             "use alpha_kl=0 (hidden states and the task loss).")
        with torch.no_grad(), self.accelerator.autocast():  # the student's forward runs under it too
            self.teacher_model.eval()
            teacher_outputs = self.teacher_model(**teacher_inputs)
        task_loss = None
        if self.alpha_task > 0:
            if labels is not None:
                task_loss = self._task_loss(model, student_outputs, labels)
            else:
                task_loss = _get(student_outputs, "loss")
            if task_loss is None:
                raise ValueError("DistillationTrainer: alpha_task > 0 but the student returned no loss; "
                                 "does the dataset have a `labels` column?")
        terms = distillation_losses(student_outputs, teacher_outputs, inputs.get("attention_mask"),
                                    self.temperature, use_hidden=use_hidden,
                                    decoder_attention_mask=_decoder_mask(inputs), use_kl=self.alpha_kl > 0)
        loss = None
        for weight, term in ((self.alpha_kl, terms.get("kl")), (self.alpha_hidden, terms.get("hidden")),
                             (self.alpha_task, task_loss)):
            if weight > 0 and term is not None:
                loss = weight * term if loss is None else loss + weight * term
        if loss is None:
            raise ValueError("DistillationTrainer: nothing to distil: the models return neither logits nor "
                             "hidden states (alpha_kl > 0 needs logits, alpha_hidden > 0 hidden states).")
        for name, term in (*terms.items(), ("task", task_loss)):
            if term is not None:
                self._distill_sums[name] = self._distill_sums.get(name, 0.0) + float(term.detach())
        self._distill_count += 1
        if self._divide_for_accumulation and self.compute_loss_func is not None:
            loss = loss / self.current_gradient_accumulation_steps  # older Trainer: see __init__
        if return_outputs:
            return loss, _without_hidden_states(student_outputs, keep=not use_hidden)
        return loss

    def _task_loss(self, model: nn.Module, outputs: Any, labels: torch.Tensor) -> torch.Tensor:
        """The student's loss on `labels` the way `Trainer.compute_loss` makes it with a label smoother or a
        ``compute_loss_func`` (a per-batch mean, like the distillation terms)."""
        if self.compute_loss_func is not None:  # no token count: a per-batch mean, like the other terms
            return self.compute_loss_func(outputs, labels, num_items_in_batch=None)
        causal = self.accelerator.unwrap_model(model)._get_name() in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
        return self.label_smoother(outputs, labels, shift_labels=causal)

    def train(self, *args: Any, **kwargs: Any) -> Any:
        # The terms of the steps after a run's last log are not logged (like the Trainer's own ``loss`` of those
        # steps); they must not be averaged into the first log of a later run.
        self._distill_sums, self._distill_count = {}, 0
        return super().train(*args, **kwargs)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self._distill_count and "loss" in logs:
            for name, total in self._distill_sums.items():
                logs[f"distill_{name}"] = round(total / self._distill_count, 6)
            self._distill_sums, self._distill_count = {}, 0
        super().log(logs, *args, **kwargs)


def distillation_losses(
    student_outputs: Any,
    teacher_outputs: Any,
    attention_mask: torch.Tensor | None = None,
    temperature: float = 2.0,
    use_hidden: bool = True,
    decoder_attention_mask: torch.Tensor | None = None,
    use_kl: bool = True,
) -> dict[str, torch.Tensor]:
    """The unweighted distillation terms ``{"kl": ..., "hidden": ...}`` (a term is absent when it cannot apply).

    ``kl``: ``T^2 * KL(teacher || student)`` of the temperature-scaled logits, averaged over positions; absent
    with ``use_kl=False`` or when neither model returns logits (when only one does, or for a regression head's
    single logit, whose softmax KL is always 0: a ValueError).
    ``hidden``: mean over layers of the MSE between parameter-free-LayerNormed hidden states
    (``hidden_states`` past the embeddings when both models return them, else ``last_hidden_state``; a teacher
    of another depth: the last states only, no layer mapping).
    Positions where the mask is 0 are left out: `attention_mask` for an encoder or decoder-only model,
    `decoder_attention_mask` for the logits and decoder states of an encoder-decoder.

    Example:
        >>> from types import SimpleNamespace
        >>> s, t = SimpleNamespace(logits=torch.zeros(2, 3)), SimpleNamespace(logits=torch.zeros(2, 3))
        >>> float(distillation_losses(s, t)["kl"])
        0.0
    """
    temperature = _checked_temperature(temperature, "distillation_losses")
    for role, outputs in (("student", student_outputs), ("teacher", teacher_outputs)):
        if isinstance(outputs, tuple | list):
            raise TypeError(f"distillation_losses: the {role}'s outputs are a {type(outputs).__name__}, whose "
                            "logits and hidden states cannot be told apart: pass the model's output object or a "
                            "dict (call the model with return_dict=True).")
    terms: dict[str, torch.Tensor] = {}
    if _get(student_outputs, "encoder_last_hidden_state") is not None:  # decoder positions: the decoder's mask
        attention_mask = decoder_attention_mask
    student_logits, teacher_logits = _get(student_outputs, "logits"), _get(teacher_outputs, "logits")
    student_has_logits, teacher_has_logits = (isinstance(x, torch.Tensor) for x in (student_logits, teacher_logits))
    if use_kl and student_has_logits != teacher_has_logits:
        with_logits, without = ("student", "teacher") if student_has_logits else ("teacher", "student")
        raise ValueError(f"distillation: the {with_logits} returns logits but the {without} does not (a model "
                         "without a head, like BertModel), so there is no KL term: give both models the same head, "
                         "or leave the KL term out (DistillationTrainer's alpha_kl=0, distillation_losses' "
                         "use_kl=False).")
    if use_kl and student_has_logits and teacher_has_logits:
        if student_logits.shape != teacher_logits.shape:
            raise ValueError(f"distillation: student logits {tuple(student_logits.shape)} and teacher logits "
                             f"{tuple(teacher_logits.shape)} differ.")
        if student_logits.dim() > 1 and student_logits.shape[-1] == 1:
            raise ValueError(f"distillation: the logits {tuple(student_logits.shape)} hold one value per position (a "
                             "regression head, num_labels=1), whose softmax is always 1, so the KL term would be 0 "
                             "whatever the models predict: leave it out (DistillationTrainer's alpha_kl=0, "
                             "distillation_losses' use_kl=False) and distil the hidden states and the task loss.")
        student_log_probs = F.log_softmax(_masked(student_logits, attention_mask).float() / temperature, dim=-1)
        teacher_log_probs = F.log_softmax(_masked(teacher_logits, attention_mask).float() / temperature, dim=-1)
        per_position = (teacher_log_probs.exp() * (teacher_log_probs - student_log_probs)).sum(-1)
        terms["kl"] = per_position.mean() * temperature**2
    if use_hidden:
        student_hidden, teacher_hidden = _hidden_states(student_outputs), _hidden_states(teacher_outputs)
        if student_hidden and teacher_hidden:
            if len(student_hidden) != len(teacher_hidden):  # different depths: match the last states only
                student_hidden, teacher_hidden = student_hidden[-1:], teacher_hidden[-1:]
            if student_hidden[-1].shape != teacher_hidden[-1].shape:
                raise ValueError(f"distillation: student hidden states {tuple(student_hidden[-1].shape)} and teacher "
                                 f"hidden states {tuple(teacher_hidden[-1].shape)} differ; a teacher of another "
                                 "width needs alpha_hidden=0 (logits only).")
            per_layer = []
            for s, t in zip(student_hidden, teacher_hidden, strict=True):
                s, t = _masked(s, attention_mask).float(), _masked(t, attention_mask).float()
                per_layer.append(F.mse_loss(F.layer_norm(s, s.shape[-1:]), F.layer_norm(t, t.shape[-1:])))
            terms["hidden"] = torch.stack(per_layer).mean()
    return terms


def distill(
    student: nn.Module,
    teacher: nn.Module,
    train_dataset: Any,
    args: TrainingArguments,
    **kwargs: Any,
) -> DistillationTrainer:
    """Distil `teacher` into `student` on `train_dataset` with a `DistillationTrainer`; return the trained trainer.

    Args:
        student: the model to train (e.g. a freshly converted LORS model).
        teacher: the dense model to imitate (frozen).
        train_dataset: tokenized examples (``input_ids``, ``attention_mask``, optionally ``labels``).
        args: the `transformers.TrainingArguments`.
        **kwargs: `DistillationTrainer` options (``temperature``, ``alpha_kl``, ``alpha_hidden``,
            ``alpha_task``) and other `transformers.Trainer` arguments (``data_collator``...).

    Example:
        >>> # trainer = distill(lors_model, dense_model, train, TrainingArguments("out", max_steps=200))
        >>> # trainer.model is lors_model
    """
    if not isinstance(args, TrainingArguments):
        raise TypeError(f"distill: args must be a transformers.TrainingArguments, got {type(args).__name__}; "
                        "e.g. TrainingArguments('out', max_steps=200) (the output folder is its first argument).")
    if hasattr(train_dataset, "__len__") and len(train_dataset) == 0:
        raise ValueError("distill: train_dataset is empty; give it the tokenized examples to distil on.")
    trainer = DistillationTrainer(model=student, args=args, train_dataset=train_dataset, teacher_model=teacher,
                                  **kwargs)
    trainer.train()
    return trainer


def _checked_temperature(temperature: Any, owner: str) -> float:
    """`temperature` as a float; a TypeError unless it is a number, a ValueError unless it is finite and > 0."""
    if not _is_number(temperature):
        raise TypeError(f"{owner}: temperature must be a number, got {temperature!r} ({type(temperature).__name__}).")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"{owner}: temperature must be a finite number > 0, got {temperature}.")
    return float(temperature)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _get(outputs: Any, name: str) -> Any:
    if isinstance(outputs, dict):
        return outputs.get(name)
    return getattr(outputs, name, None)


def _hidden_states(outputs: Any) -> list[torch.Tensor]:
    states = _get(outputs, "hidden_states")
    if states is None:
        states = _get(outputs, "decoder_hidden_states")
    if isinstance(states, tuple | list) and states:
        states = list(states)
        return states[1:] if len(states) > 1 else states  # index 0 is the embeddings' output
    last = _get(outputs, "last_hidden_state")
    return [last] if isinstance(last, torch.Tensor) else []


def _decoder_mask(inputs: dict[str, Any]) -> torch.Tensor | None:
    """The decoder positions an encoder-decoder's loss counts: ``decoder_attention_mask``, else labels != -100."""
    mask = inputs.get("decoder_attention_mask")
    labels = inputs.get("labels")
    if mask is None and isinstance(labels, torch.Tensor) and labels.dim() == 2:
        mask = labels != -100
    return mask


def _masked(values: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The rows of ``(batch, length, ...)`` `values` at non-padding positions, flattened to ``(n, ...)``."""
    if attention_mask is not None and values.dim() >= 3 and values.shape[:2] == attention_mask.shape:
        return values[attention_mask.bool()]
    return values.reshape(-1, values.shape[-1]) if values.dim() >= 3 else values


def _without_hidden_states(outputs: Any, keep: bool) -> Any:
    """The student's outputs as the Trainer's evaluation expects them (no hidden states we asked for)."""
    if keep or not isinstance(outputs, dict) or outputs.get("hidden_states") is None:
        return outputs
    return type(outputs)(**{k: v for k, v in outputs.items() if k != "hidden_states"})
