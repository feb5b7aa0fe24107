#!/usr/bin/env python
"""Fine-tune a BERT-family model for text classification, as a LORS model or as the dense baseline.

The default model is the bundled, pretrained all-MiniLM-L6-v2 (``bundled:minilm``)::

    python scripts/prepare_data.py --out data
    python scripts/run_classification.py --train_file data/rotten_tomatoes/train.csv \\
        --validation_file data/rotten_tomatoes/test.csv --lors_target_reduction 0.5 \\
        --do_train --do_eval --num_train_epochs 1 --output_dir out/minilm-lors
    # the dense baseline: --no_lors in place of the --lors_* options; recovery by distillation: add --distill
    # two processes (DDP, gloo): torchrun --nproc_per_node 2 scripts/run_classification.py ...

Writes to ``--output_dir``: the model and tokenizer, ``{train,eval,all}_results.json``,
``parameter_report.{txt,json}``; ``--push_to_hub`` uploads them.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    TrainingArguments,
    set_seed,
)

from lors_hf.metrics import load_metric
from lors_hf.training_args import (
    DistillArguments,
    LorsArguments,
    ScriptError,
    build_trainer,
    calibration_batches,
    check_counts,
    check_file,
    check_fits_positions,
    check_no_empty_cells,
    checkpoint_labels,
    convert_model,
    defer_push_to_hub,
    load_teacher,
    lors_optimizers,
    parse_script_args,
    push_trained_model,
    resolve_model_path,
    run_main,
    train_and_evaluate,
    user_errors,
    write_parameter_report,
)

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default="bundled:minilm",
        metadata={"help": "Local directory or Hub id; 'bundled:minilm' (default) is the offline all-MiniLM-L6-v2."},
    )
    tokenizer_name: str | None = field(default=None, metadata={"help": "Default: the model's own tokenizer."})


@dataclass
class DataArguments:
    train_file: str | None = field(default=None, metadata={"help": "Training data: a .csv or .json/.jsonl file."})
    validation_file: str | None = field(default=None, metadata={"help": "Evaluation data, same format."})
    dataset_name: str | None = field(default=None, metadata={"help": "A Hub dataset instead of files (online)."})
    dataset_config_name: str | None = field(default=None)
    validation_split_name: str = field(default="validation", metadata={"help": "Hub split used for evaluation."})
    text_column: str = field(default="text")
    text_pair_column: str | None = field(default=None, metadata={"help": "Second text of sentence-pair tasks."})
    label_column: str = field(default="label")
    max_seq_length: int = field(default=128)
    max_train_samples: int | None = field(default=None)
    max_eval_samples: int | None = field(default=None)

    def __post_init__(self) -> None:  # at parse time
        check_counts(max_seq_length=self.max_seq_length, max_train_samples=self.max_train_samples,
                     max_eval_samples=self.max_eval_samples)


def load_raw_datasets(data_args: DataArguments):
    """The ``train`` / ``validation`` splits from local files or a Hub dataset."""
    import datasets

    if data_args.dataset_name is None and data_args.train_file is None and data_args.validation_file is None:
        raise ScriptError("give --train_file / --validation_file (csv or json) or --dataset_name")
    with user_errors():
        if data_args.dataset_name is not None:
            raw = datasets.load_dataset(data_args.dataset_name, data_args.dataset_config_name)
            if data_args.validation_split_name in raw and data_args.validation_split_name != "validation":
                raw["validation"] = raw.pop(data_args.validation_split_name)
            # only these two: a test split (often unlabelled, -1) would add its labels to the head
            return datasets.DatasetDict({name: raw[name] for name in ("train", "validation") if name in raw})
        files = {}
        for split, option, path in (("train", "--train_file", data_args.train_file),
                                    ("validation", "--validation_file", data_args.validation_file)):
            if path is not None:
                files[split] = check_file(path, option, (".csv", ".json", ".jsonl"))
        kinds = {"csv" if p.endswith(".csv") else "json" for p in files.values()}
        if len(kinds) > 1:
            raise ScriptError("--train_file and --validation_file must have the same format")
        return datasets.load_dataset(kinds.pop(), data_files=files)


def label_names(raw, label_column: str) -> list:
    """The label values, in id order: a ClassLabel's names, else the sorted distinct values."""
    import datasets

    split = raw["train"] if "train" in raw else next(iter(raw.values()))
    feature = split.features[label_column]
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    for part in raw.values():
        if not isinstance(part.features[label_column], datasets.Value):  # a list per row: pyarrow's unique failed
            raise ScriptError(f"column {label_column!r} holds {part.features[label_column]}, not one label per row: "
                              "this script trains single-label classification (multi-label data is not supported)")
    values = set()
    for part in raw.values():
        values.update(part.unique(label_column))
    if None in values:
        raise ScriptError(f"column {label_column!r} has empty labels")
    # regression targets would each become a class of their own (a 9-class head for 9 scores), silently
    fractional = sorted(v for v in values if isinstance(v, float) and not float(v).is_integer())
    if fractional:
        raise ScriptError(f"column {label_column!r} holds numbers that are not whole (e.g. {fractional[0]!r}): this "
                          "script classifies, one class per distinct label; regression is not supported")
    return sorted(values)


def main(argv: list[str] | None = None) -> int:
    model_args, data_args, lors_args, distill_args, training_args = parse_script_args(
        (ModelArguments, DataArguments, LorsArguments, DistillArguments, TrainingArguments), argv)
    if distill_args.distill and lors_args.no_lors:
        raise ScriptError("--distill trains a LORS model from the dense one; drop --no_lors")
    set_seed(training_args.seed)

    raw = load_raw_datasets(data_args)
    columns = [c for c in (data_args.text_column, data_args.text_pair_column, data_args.label_column) if c]
    for split_name, split in raw.items():
        missing = [c for c in columns if c not in split.column_names]
        if missing:
            raise ScriptError(f"{split_name} data has no column {missing[0]!r}; its columns are "
                              f"{split.column_names} (set --text_column / --label_column)")
    check_no_empty_cells(raw, [c for c in (data_args.text_column, data_args.text_pair_column) if c])
    if training_args.do_train and "train" not in raw:
        raise ScriptError("--do_train needs --train_file (or a dataset with a train split)")
    if training_args.do_eval and "validation" not in raw:
        raise ScriptError("--do_eval needs --validation_file (or a dataset with a validation split)")
    names = label_names(raw, data_args.label_column)
    model_path = resolve_model_path(model_args.model_name_or_path)
    saved = checkpoint_labels(model_path, names)
    new_head = saved is None
    if not new_head:  # a head trained on these labels: keep it and its order
        id_of = {label: i for i, label in saved.items()}
        label_to_id = {name: id_of[str(name)] for name in names}
        id2label = saved
    else:  # a head new to these labels (initialised, or kept as a starting point if the class count matches)
        label_to_id = {name: i for i, name in enumerate(names)}
        id2label = {i: str(name) for i, name in enumerate(names)}
    if distill_args.distill and distill_args.distill_alpha_kl > 0 and new_head \
            and distill_args.teacher_model_name_or_path is None:
        raise ScriptError("--distill's default teacher is this model before conversion, whose classifier head is "
                          "new (not trained on these labels): its logits would teach noise. Give "
                          "--teacher_model_name_or_path (a dense model fine-tuned on these labels), or "
                          "--distill_alpha_kl 0 to distil the hidden states only")
    with user_errors():
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(model_args.tokenizer_name or model_args.model_name_or_path))
        model = AutoModelForSequenceClassification.from_pretrained(
            model_path, num_labels=len(id2label), id2label=id2label, label2id={v: k for k, v in id2label.items()},
            ignore_mismatched_sizes=True, output_loading_info=True,
        )
    model, loading = model
    untrained = sorted({*loading["missing_keys"], *(k[0] if isinstance(k, tuple) else k
                                                    for k in loading["mismatched_keys"])})
    if untrained and not training_args.do_train:  # it scored a random head (chance accuracy) with status 0
        raise ScriptError(f"--do_eval without --do_train would score weights the checkpoint does not hold, newly "
                          f"initialised ({', '.join(untrained)}): its head was not trained on the data's labels "
                          f"{[str(name) for name in names]}. Add --do_train, or give a model fine-tuned on them")
    if tokenizer.pad_token is None:  # a decoder's tokenizer (Llama, GPT-2): pad with its end-of-text token
        if tokenizer.eos_token is None:
            raise ScriptError("the tokenizer has no padding token and no end-of-text token to pad with; give "
                              "--tokenizer_name of one that has a padding token")
        tokenizer.pad_token = tokenizer.eos_token
        logger.info("the tokenizer has no padding token: padding with its end-of-text token %r", tokenizer.eos_token)
    if model.config.pad_token_id is None:
        # a decoder classifier scores the last token before the padding: it needs the id before calibration and the
        # teacher (a copy of this model) run, not only once the Trainer sets it
        model.config.pad_token_id = tokenizer.pad_token_id
    check_fits_positions(model, data_args.max_seq_length, "--max_seq_length")

    def preprocess(batch):
        texts = (batch[data_args.text_column],)
        if data_args.text_pair_column:
            texts += (batch[data_args.text_pair_column],)
        encoded = tokenizer(*texts, truncation=True, max_length=data_args.max_seq_length)
        encoded["labels"] = [label_to_id[value] for value in batch[data_args.label_column]]
        return encoded

    with training_args.main_process_first(desc="tokenizing"), user_errors():
        for split_name, limit in (("train", data_args.max_train_samples), ("validation", data_args.max_eval_samples)):
            if split_name in raw and limit is not None:
                raw[split_name] = raw[split_name].select(range(min(limit, len(raw[split_name]))))
        encoded = raw.map(preprocess, batched=True, remove_columns=raw[next(iter(raw))].column_names)
    collator = DataCollatorWithPadding(tokenizer)

    teacher = load_teacher(model, distill_args, AutoModelForSequenceClassification)
    if teacher is not None and teacher.config.pad_token_id is None:
        teacher.config.pad_token_id = tokenizer.pad_token_id
    if teacher is not None and distill_args.distill_alpha_kl > 0:
        teacher_ids = {str(label): int(i) for label, i in (teacher.config.label2id or {}).items()}
        if teacher.config.num_labels != len(id2label) or any(teacher_ids.get(str(name)) != i
                                                             for name, i in label_to_id.items()):
            raise ScriptError(f"the teacher's labels {teacher_ids} do not match the data's {label_to_id} "
                              "(label -> id): the KL term compares logits class by class. Give a teacher "
                              "fine-tuned on these labels, or --distill_alpha_kl 0")
    batches = calibration_batches(encoded["train"] if "train" in encoded else encoded["validation"], collator,
                                  training_args.per_device_train_batch_size, lors_args.lors_calibration_batches)
    model = convert_model(model, lors_args, pretrained=True, calibration_batches=batches)
    report = write_parameter_report(model, training_args.output_dir) if training_args.should_save else None
    if report:
        logger.info("parameters:\n%s", report)

    accuracy = load_metric("accuracy")

    def compute_metrics(prediction):
        return accuracy.compute(predictions=np.argmax(prediction.predictions, axis=-1), references=prediction.label_ids)

    trainer_kwargs = dict(model=model, args=training_args, train_dataset=encoded.get("train"),
                          eval_dataset=encoded.get("validation"), processing_class=tokenizer,
                          data_collator=collator, compute_metrics=compute_metrics,
                          optimizers=lors_optimizers(model, training_args, lors_args))
    push_to_hub = defer_push_to_hub(training_args)
    trainer = build_trainer(teacher, distill_args, **trainer_kwargs)
    # A classifier's loss is the mean over its batch (BERT's takes no token count): the Trainer must not treat it
    # as normalised by the token count of all processes and accumulated batches, which it multiplies by the
    # number of processes under DDP and leaves undivided by --gradient_accumulation_steps
    trainer.model_accepts_loss_kwargs = False
    train_and_evaluate(trainer, lors_args)
    if push_to_hub and trainer.is_world_process_zero():
        logger.info("pushed: %s", push_trained_model(trainer, trainer_model_card=lors_args.no_lors))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
