#!/usr/bin/env python
"""Causal language modelling with a LORS model: fine-tune a pretrained model or train from scratch.

    python scripts/prepare_data.py --out data
    # fine-tune the bundled, pretrained SmolLM2-135M, converted with 50% fewer stack parameters:
    python scripts/run_clm.py --model_name_or_path bundled:smollm2 --lors_target_reduction 0.5 \\
        --train_file data/shakespeare/train.txt --validation_file data/shakespeare/validation.txt \\
        --do_train --do_eval --max_steps 200 --output_dir out/smollm2-lors
    # from scratch, a small GPT-2 (tokenizer: SmolLM2's unless --tokenizer_name):
    python scripts/run_clm.py --model_type gpt2 --config_overrides n_layer=6,n_embd=256,n_head=4 \\
        --lors_rank 16 --train_file data/shakespeare/train.txt --do_train --output_dir out/gpt2-lors
    # the dense baseline: --no_lors in place of the --lors_* options; recovery by distillation (pretrained
    # models): add --distill

Writes to ``--output_dir``: the model and tokenizer, ``{train,eval,all}_results.json`` (loss, perplexity,
next-token accuracy), ``parameter_report.{txt,json}``; ``--push_to_hub`` uploads them.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from dataclasses import dataclass, field
from itertools import chain

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    TrainingArguments,
    default_data_collator,
    set_seed,
)

from lors_hf.metrics import load_metric
from lors_hf.training_args import (
    DistillArguments,
    LorsArguments,
    ScriptError,
    apply_overrides,
    build_trainer,
    calibration_batches,
    check_counts,
    check_file,
    check_fits_positions,
    check_no_empty_cells,
    convert_model,
    defer_push_to_hub,
    load_teacher,
    lors_optimizers,
    parse_overrides,
    parse_script_args,
    push_trained_model,
    resolve_model_path,
    run_main,
    train_and_evaluate,
    user_errors,
    write_parameter_report,
)

logger = logging.getLogger(__name__)
DEFAULT_SCRATCH_TOKENIZER = "bundled:smollm2"


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Pretrained model to fine-tune: a directory, a Hub id or 'bundled:smollm2'. "
                          "Leave out and give --model_type to train from scratch."},
    )
    model_type: str | None = field(default=None, metadata={"help": "From scratch: gpt2, llama, ..."})
    config_overrides: str | None = field(
        default=None, metadata={"help": "From scratch: config fields, e.g. n_layer=4,n_embd=128,n_head=4."}
    )
    tokenizer_name: str | None = field(
        default=None, metadata={"help": f"Default: the model's tokenizer ({DEFAULT_SCRATCH_TOKENIZER} from scratch)."}
    )


@dataclass
class DataArguments:
    train_file: str | None = field(default=None, metadata={"help": "Training text: .txt, .csv or .json/.jsonl."})
    validation_file: str | None = field(default=None, metadata={"help": "Evaluation text, same format."})
    dataset_name: str | None = field(default=None, metadata={"help": "A Hub dataset instead of files (online)."})
    dataset_config_name: str | None = field(default=None)
    text_column: str = field(default="text", metadata={"help": "Text column of csv/json/Hub data."})
    block_size: int = field(default=128, metadata={"help": "Tokens per training sequence."})
    validation_split_percentage: int = field(
        default=5, metadata={"help": "Without validation data, when evaluating: the share of the training data held out."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Cap on training blocks."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Cap on evaluation blocks."})

    def __post_init__(self) -> None:  # at parse time
        check_counts(max_train_samples=self.max_train_samples, max_eval_samples=self.max_eval_samples)
        if not 0 < self.validation_split_percentage < 100:  # it held out one line whatever, then blamed the data
            raise ValueError(f"--validation_split_percentage must be in 1..99, got {self.validation_split_percentage}")


def load_raw_datasets(data_args: DataArguments, seed: int, evaluate: bool = True):
    """The ``train`` / ``validation`` splits; without validation data, `evaluate` holds out
    ``--validation_split_percentage`` of the training data (a run that does not evaluate keeps all of it)."""
    import datasets

    if data_args.dataset_name is None and data_args.train_file is None and data_args.validation_file is None:
        raise ScriptError("give --train_file / --validation_file (txt, csv or json) or --dataset_name")
    with user_errors():
        if data_args.dataset_name is not None:
            raw = datasets.load_dataset(data_args.dataset_name, data_args.dataset_config_name)
        else:
            files = {}
            if data_args.train_file:
                files["train"] = check_file(data_args.train_file, "--train_file", (".txt", ".csv", ".json", ".jsonl"))
            if data_args.validation_file:
                files["validation"] = check_file(data_args.validation_file, "--validation_file",
                                                 (".txt", ".csv", ".json", ".jsonl"))
            kinds = {p.rsplit(".", 1)[-1].replace("jsonl", "json").replace("txt", "text") for p in files.values()}
            if len(kinds) > 1:
                raise ScriptError("--train_file and --validation_file must have the same format")
            kind = kinds.pop()
            raw = datasets.load_dataset(kind, data_files=files, **({"keep_linebreaks": True} if kind == "text" else {}))
        if "validation" not in raw and evaluate:
            if "train" not in raw:
                raise ScriptError(f"the data has no train split (splits: {list(raw)})")
            held_out = max(1, len(raw["train"]) * data_args.validation_split_percentage // 100)
            split = raw["train"].train_test_split(test_size=held_out, shuffle=False, seed=seed)
            raw = datasets.DatasetDict({"train": split["train"], "validation": split["test"]})
    for name, part in raw.items():
        if data_args.text_column not in part.column_names:
            raise ScriptError(f"{name} data has no column {data_args.text_column!r}; its columns are "
                              f"{part.column_names} (set --text_column)")
    return raw


def build_model(model_args: ModelArguments, block_size: int):
    """(model, tokenizer, pretrained?) from a checkpoint or, with --model_type, from a config."""
    if model_args.model_name_or_path is None and model_args.model_type is None:
        raise ScriptError("give --model_name_or_path (e.g. bundled:smollm2) or --model_type (e.g. gpt2) "
                          "to train from scratch")
    if model_args.model_name_or_path is not None and (model_args.model_type or model_args.config_overrides):
        raise ScriptError("--model_type / --config_overrides build a model from scratch; "
                          "they do not combine with --model_name_or_path")
    pretrained = model_args.model_name_or_path is not None
    tokenizer_name = model_args.tokenizer_name or (model_args.model_name_or_path if pretrained
                                                   else DEFAULT_SCRATCH_TOKENIZER)
    with user_errors():
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(tokenizer_name))
        if pretrained:
            model = AutoModelForCausalLM.from_pretrained(resolve_model_path(model_args.model_name_or_path),
                                                         dtype=torch.float32)
        else:
            defaults = AutoConfig.for_model(model_args.model_type)
            overrides = parse_overrides(model_args.config_overrides)
            apply_overrides(defaults, overrides)  # an unknown key is a ScriptError
            overrides["vocab_size"] = len(tokenizer)
            overrides.update({name: getattr(tokenizer, name) for name in ("bos_token_id", "eos_token_id", "pad_token_id")
                              if getattr(tokenizer, name) is not None and hasattr(defaults, name)})
            # built with the overrides, not set on the default config afterwards: what its __init__ derives
            # from them (Llama's head_dim = hidden_size / num_attention_heads, Qwen2's layer_types) follows
            config = AutoConfig.for_model(model_args.model_type, **overrides)
            model = AutoModelForCausalLM.from_config(config)
    if getattr(model, "loss_type", None) is None:
        # GPT-2 and a few others name no loss type, and the Trainer then counts every label token in the
        # denominator of the loss, not the shifted ones: eval_loss came out (block_size - 1) / block_size too low
        model.loss_type = "ForCausalLM"
    check_fits_positions(model, block_size, "--block_size")
    return model, tokenizer, pretrained


def perplexity(metrics: dict[str, float]) -> dict[str, float]:
    """``{"perplexity": exp(eval_loss)}`` (inf where the exponential would overflow)."""
    loss = metrics["eval_loss"]
    return {"perplexity": math.exp(loss) if loss < 700 else float("inf")}


def main(argv: list[str] | None = None) -> int:
    model_args, data_args, lors_args, distill_args, training_args = parse_script_args(
        (ModelArguments, DataArguments, LorsArguments, DistillArguments, TrainingArguments), argv)
    if distill_args.distill and lors_args.no_lors:
        raise ScriptError("--distill trains a LORS model from the dense one; drop --no_lors")
    if data_args.block_size < 2:
        raise ScriptError("--block_size must be at least 2")
    if (training_args.metric_for_best_model or "").removeprefix("eval_") == "perplexity":
        raise ScriptError("--metric_for_best_model perplexity: the evaluations during training report eval_loss "
                          "(perplexity is exp(eval_loss), written at the end): use --metric_for_best_model eval_loss")
    set_seed(training_args.seed)

    raw = load_raw_datasets(data_args, training_args.seed, evaluate=training_args.do_eval)
    check_no_empty_cells(raw, [data_args.text_column])
    if training_args.do_train and "train" not in raw:
        raise ScriptError("--do_train needs --train_file (or a dataset with a train split)")
    model, tokenizer, pretrained = build_model(model_args, data_args.block_size)
    if distill_args.distill and not pretrained and distill_args.teacher_model_name_or_path is None:
        raise ScriptError("--distill needs a pretrained dense teacher: give --model_name_or_path "
                          "or --teacher_model_name_or_path")
    block_size = data_args.block_size

    def tokenize(batch):
        return tokenizer(batch[data_args.text_column])

    def group_texts(batch):
        joined = {k: list(chain(*batch[k])) for k in batch}
        total = (len(joined["input_ids"]) // block_size) * block_size
        blocks = {k: [v[i:i + block_size] for i in range(0, total, block_size)] for k, v in joined.items()}
        blocks["labels"] = [ids.copy() for ids in blocks["input_ids"]]
        return blocks

    with training_args.main_process_first(desc="tokenizing"), user_errors():
        tokenized = raw.map(tokenize, batched=True, remove_columns=raw[next(iter(raw))].column_names)
        blocks = tokenized.map(group_texts, batched=True)
    for name, limit in (("train", data_args.max_train_samples), ("validation", data_args.max_eval_samples)):
        if name not in blocks:
            continue
        if len(blocks[name]) == 0:
            held_out = name == "validation" and data_args.validation_file is None and data_args.dataset_name is None
            raise ScriptError(f"the {name} text is shorter than one block of {block_size} tokens; give more text"
                              + (" (a larger --validation_split_percentage or a --validation_file)" if held_out else "")
                              + " or a smaller --block_size")
        if limit is not None:
            blocks[name] = blocks[name].select(range(min(limit, len(blocks[name]))))

    teacher = load_teacher(model, distill_args, AutoModelForCausalLM, dtype=torch.float32)
    batches = calibration_batches(blocks["train" if "train" in blocks else "validation"], default_data_collator,
                                  training_args.per_device_train_batch_size, lors_args.lors_calibration_batches)
    model = convert_model(model, lors_args, pretrained=pretrained, calibration_batches=batches)
    if training_args.should_save:
        logger.info("parameters:\n%s", write_parameter_report(model, training_args.output_dir))

    accuracy = load_metric("accuracy")

    def preprocess_logits_for_metrics(logits, labels):
        return (logits[0] if isinstance(logits, tuple) else logits).argmax(dim=-1)

    def compute_metrics(prediction):
        labels = prediction.label_ids[:, 1:].reshape(-1)
        predictions = prediction.predictions[:, :-1].reshape(-1)
        keep = labels != -100
        return accuracy.compute(predictions=predictions[keep], references=labels[keep])

    push_to_hub = defer_push_to_hub(training_args)
    trainer_kwargs = dict(model=model, args=training_args, train_dataset=blocks.get("train"),
                          eval_dataset=blocks.get("validation"), processing_class=tokenizer,
                          data_collator=default_data_collator, compute_metrics=compute_metrics,
                          preprocess_logits_for_metrics=preprocess_logits_for_metrics,
                          optimizers=lors_optimizers(model, training_args, lors_args))
    trainer = build_trainer(teacher, distill_args, **trainer_kwargs)
    train_and_evaluate(trainer, lors_args, eval_metrics=perplexity)
    if push_to_hub and trainer.is_world_process_zero():
        logger.info("pushed: %s", push_trained_model(trainer, trainer_model_card=lors_args.no_lors))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
