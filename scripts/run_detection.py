#!/usr/bin/env python
"""Train a DETR object detector (built from a config: ResNet backbone, no timm, no download) with LORS.

Both Transformer stacks (encoder and decoder layers) share their projections; COCO-style data; mAP by
pycocotools (through the shipped ``coco_map`` metric)::

    python scripts/prepare_data.py --out data
    python scripts/run_detection.py --train_annotation_file data/fashion_detection/train.json \\
        --validation_annotation_file data/fashion_detection/val.json --lors_rank 16 \\
        --do_train --do_eval --num_train_epochs 20 --output_dir out/detr-lors
    # the dense baseline: --no_lors in place of --lors_rank; a bigger model: --config_overrides
    # d_model=256,encoder_layers=6

Images are resized to ``--image_size`` squares (boxes are kept in relative coordinates, so they follow).
A DETR built from a config trains its whole backbone, BatchNorm included (`train_backbone_from_scratch`);
a checkpoint keeps DETR's frozen BatchNorm.
Every evaluation, the periodic ones (``--eval_strategy``) included, reports COCO mAP (``eval_map``,
``eval_map_50``, ...), so ``--metric_for_best_model map --load_best_model_at_end`` keeps the best checkpoint.
Writes to ``--output_dir``: the model, ``{train,eval,all}_results.json`` (loss, mAP, AP50, ...),
``parameter_report.{txt,json}``; ``--push_to_hub`` uploads them.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import (
    AutoConfig,
    DetrConfig,
    DetrForObjectDetection,
    ResNetConfig,
    Trainer,
    TrainingArguments,
    set_seed,
)

from lors_hf.metrics import load_metric
from lors_hf.training_args import (
    LorsArguments,
    ScriptError,
    check_counts,
    check_file,
    checkpoint_labels,
    convert_model,
    defer_push_to_hub,
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

DEFAULT_BACKBONE = {"num_channels": 3, "embedding_size": 32, "hidden_sizes": [32, 64, 128], "depths": [1, 1, 1],
                    "layer_type": "basic", "out_features": ["stage3"]}
"""A small ResNet (stride 16) that DETR builds from its config: no timm, no pretrained download."""
DEFAULT_DETR = {"d_model": 128, "encoder_layers": 3, "decoder_layers": 3, "encoder_attention_heads": 4,
                "decoder_attention_heads": 4, "encoder_ffn_dim": 256, "decoder_ffn_dim": 256, "num_queries": 20,
                "dropout": 0.0}
"""A small DETR for CPU. Without dropout: trained from scratch with dropout 0.1, the queries came out
nearly identical in eval mode (train loss 3.3 against 6.4 in eval mode on the same images)."""
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A DETR checkpoint to fine-tune; default: a new DETR built from a config."}
    )
    config_overrides: str | None = field(
        default=None, metadata={"help": "DetrConfig fields, e.g. d_model=64,encoder_layers=2,num_queries=10."}
    )
    backbone_overrides: str | None = field(
        default=None, metadata={"help": "ResNetConfig fields of the backbone, e.g. hidden_sizes=[16,32],depths=[1,1]."}
    )


@dataclass
class DataArguments:
    train_annotation_file: str | None = field(default=None, metadata={"help": "COCO-format json of training images."})
    validation_annotation_file: str | None = field(default=None, metadata={"help": "COCO-format json for evaluation."})
    image_dir: str | None = field(
        default=None, metadata={"help": "Where file_name points (default: <json dir>/images if it exists, else <json dir>)."}
    )
    dataset_name: str | None = field(
        default=None, metadata={"help": "A Hub dataset (online) with 'image' and 'objects' {bbox, category} columns."}
    )
    image_size: int = field(default=128, metadata={"help": "Images are resized to this square size."})
    max_train_samples: int | None = field(default=None)
    max_eval_samples: int | None = field(default=None)

    def __post_init__(self) -> None:  # at parse time
        check_counts(max_train_samples=self.max_train_samples, max_eval_samples=self.max_eval_samples)


# ------------------------------------------------------------------------------------------------- data


def read_coco(annotation_file: str, image_dir: str | None, option: str) -> tuple[list[dict], dict[int, str]]:
    """Records ``{image_id, image, width, height, boxes (xywh), category_ids, crowd_boxes, crowd_category_ids}``
    and ``{category_id: name}``.

    Crowd annotations (``iscrowd``) are no training targets (as in DETR's COCO loader): they are kept apart, for
    the mAP, which ignores detections of crowd regions as pycocotools does. A ScriptError names the first
    malformed entry: a missing field, an image or category id given twice, an annotation of an image the file
    does not list, a ``bbox`` that is not four finite numbers with width and height >= 0, an image file not found
    or not an image.
    """
    from PIL import Image

    check_file(annotation_file, option, (".json",))
    try:
        coco = json.loads(Path(annotation_file).read_text(encoding="utf-8"))
        images, annotations, categories = coco["images"], coco.get("annotations", []), coco["categories"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ScriptError(f"{option} {annotation_file}: not a COCO detection file ({type(err).__name__}: {err})") from None
    root = Path(annotation_file).parent
    folder = Path(image_dir) if image_dir else (root / "images" if (root / "images").is_dir() else root)
    entry = "the file"
    try:
        names: dict[int, str] = {}
        for index, category in enumerate(categories):
            entry = f"categories[{index}]"
            category_id = int(category["id"])
            if category_id in names:
                raise ValueError(f"category id {category_id} is listed twice")
            names[category_id] = str(category.get("name", category_id))
        image_ids: set[int] = set()
        for index, image in enumerate(images):
            entry = f"images[{index}]"
            image_id, _ = int(image["id"]), str(image["file_name"])
            if image_id in image_ids:
                raise ValueError(f"image id {image_id} is listed twice")
            image_ids.add(image_id)
        by_image: dict[int, list[tuple[list[float], int]]] = {}
        crowds: dict[int, list[tuple[list[float], int]]] = {}
        for index, annotation in enumerate(annotations):
            entry = f"annotations[{index}]"
            image_id, category_id = int(annotation["image_id"]), int(annotation["category_id"])
            box = [float(v) for v in annotation["bbox"]]
            if image_id not in image_ids:
                raise ValueError(f"image_id {image_id} is not in 'images'")
            if len(box) != 4 or not all(np.isfinite(box)) or box[2] < 0 or box[3] < 0:
                raise ValueError(f"bbox {annotation['bbox']} is not [x, y, width, height] with width, height >= 0")
            (crowds if annotation.get("iscrowd", 0) else by_image).setdefault(image_id, []).append((box, category_id))
    except (KeyError, TypeError, ValueError) as err:
        reason = f"no field {err}" if isinstance(err, KeyError) else str(err)
        raise ScriptError(f"{option} {annotation_file}: {entry}: {reason}") from None
    if not images:
        raise ScriptError(f"{option} {annotation_file}: lists no images")
    records = []
    for image in images:
        path = folder / str(image["file_name"])
        if not path.is_file():
            raise ScriptError(f"{option} {annotation_file}: image {path} not found (set --image_dir)")
        try:  # the header only: a file PIL cannot read failed in the data loader, mid-training or after it
            with Image.open(path):
                pass
        except OSError as err:
            raise ScriptError(f"{option} {annotation_file}: image {path} cannot be read ({err})") from None
        found, crowd = by_image.get(int(image["id"]), []), crowds.get(int(image["id"]), [])
        records.append({"image_id": int(image["id"]), "image": str(path), "width": image.get("width"),
                        "height": image.get("height"), "boxes": [box for box, _ in found],
                        "category_ids": [category_id for _, category_id in found],
                        "crowd_boxes": [box for box, _ in crowd],
                        "crowd_category_ids": [category_id for _, category_id in crowd]})
    return records, names


def records_from_hub(split: Any) -> tuple[list[dict], dict[int, str]]:
    """Records from a Hub detection dataset laid out like ``cppe-5``: ``image``, ``objects`` {bbox, category}."""
    import datasets

    missing = [c for c in ("image", "objects") if c not in split.column_names]
    if missing:
        raise ScriptError(f"the dataset has no column {missing[0]!r} (columns: {split.column_names})")
    objects = split.features["objects"]
    category = objects["category"] if isinstance(objects, dict) else objects.feature["category"]
    feature = getattr(category, "feature", category)
    names = feature.names if isinstance(feature, datasets.ClassLabel) else None
    records, seen = [], set()
    for index, row in enumerate(split):
        image = row["image"].convert("RGB")
        objs = row["objects"]
        seen.update(int(c) for c in objs["category"])
        records.append({"image_id": int(row.get("image_id", index)), "image": image, "width": image.width,
                        "height": image.height, "boxes": [list(map(float, b)) for b in objs["bbox"]],
                        "category_ids": [int(c) for c in objs["category"]]})
    categories = dict(enumerate(names)) if names else {c: str(c) for c in sorted(seen)}
    return records, categories


class DetectionDataset(torch.utils.data.Dataset):
    """COCO records as DETR inputs: a normalised square image and ``labels`` {class_labels, boxes (cxcywh, 0-1)}.

    Boxes are clipped to the image; those with no area inside it are left out (of training and of the mAP).
    A record's crowd regions go, clipped alike, to ``crowd_labels`` / ``crowd_boxes``: the mAP's alone (DETR's
    loss reads class_labels and boxes).
    """

    def __init__(self, records: list[dict], label_of_category: dict[int, int], image_size: int) -> None:
        self.records, self.label_of_category, self.image_size = records, label_of_category, image_size
        self.mean = torch.tensor(IMAGE_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGE_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        from PIL import Image

        record = self.records[index]
        image = record["image"]
        image = Image.open(image) if isinstance(image, str) else image
        if image.mode.startswith("I;16") or image.mode == "I":  # 16-bit grey: convert("RGB") clips it at 255
            image = Image.fromarray((np.asarray(image, dtype=np.float64) / 257).clip(0, 255).astype(np.uint8))
        image = image.convert("RGB")
        width, height = image.size
        pixels = np.asarray(image.resize((self.image_size, self.image_size), Image.BILINEAR), dtype=np.float32)
        pixel_values = (torch.from_numpy(pixels).permute(2, 0, 1) / 255.0 - self.mean) / self.std
        labels, cxcywh = self._targets(record["boxes"], record["category_ids"], width, height)
        crowd_labels, crowd_boxes = self._targets(record.get("crowd_boxes", []), record.get("crowd_category_ids", []),
                                                  width, height)
        return {"pixel_values": pixel_values,
                "labels": {"class_labels": labels, "boxes": cxcywh, "image_id": torch.tensor([record["image_id"]]),
                           "orig_size": torch.tensor([height, width]), "crowd_labels": crowd_labels,
                           "crowd_boxes": crowd_boxes}}

    def _targets(self, boxes: list, category_ids: list[int], width: int, height: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """(labels, boxes as relative cxcywh) of xywh pixel `boxes`."""
        boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
        scale = torch.tensor([width, height, width, height], dtype=torch.float32)
        # clipped to the image as corners (clamping the centre moved a box that crossed the right or bottom
        # edge); boxes left with no area are dropped, as DETR's COCO loader does: no detection can match them
        corners = (torch.cat([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], dim=1) / scale).clamp(0.0, 1.0)
        keep = ((corners[:, 2:] > corners[:, :2]).all(dim=1)).tolist()
        corners = corners[torch.tensor(keep, dtype=torch.bool)].reshape(-1, 4)
        cxcywh = torch.cat([(corners[:, :2] + corners[:, 2:]) / 2, corners[:, 2:] - corners[:, :2]], dim=1)
        labels = torch.tensor([self.label_of_category[c] for c, k in zip(category_ids, keep, strict=True) if k],
                              dtype=torch.long)
        return labels, cxcywh


def collate(examples: list[dict[str, Any]]) -> dict[str, Any]:
    pixel_values = torch.stack([e["pixel_values"] for e in examples])
    return {"pixel_values": pixel_values,
            "pixel_mask": torch.ones(pixel_values.shape[0], *pixel_values.shape[2:], dtype=torch.long),
            "labels": [e["labels"] for e in examples]}


# ------------------------------------------------------------------------------------------------ model


def build_model(model_args: ModelArguments, id2label: dict[int, str]) -> tuple[DetrForObjectDetection, bool]:
    """(model, pretrained?): a checkpoint, or a new DETR from the default small config plus overrides."""
    label2id = {name: i for i, name in id2label.items()}
    if model_args.model_name_or_path is not None:
        if model_args.config_overrides or model_args.backbone_overrides:
            raise ScriptError("--config_overrides / --backbone_overrides build a new model; "
                              "they do not combine with --model_name_or_path")
        path = resolve_model_path(model_args.model_name_or_path)
        with user_errors():
            model_type = AutoConfig.from_pretrained(path).model_type
            if model_type != "detr":  # DETR's class would load a Conditional / Deformable DETR as a DETR, half new
                raise ScriptError(f"{model_args.model_name_or_path} is a {model_type} checkpoint; this script trains "
                                  "DETR (model_type detr) only. lors_hf.lorsify converts the others in Python.")
            model = DetrForObjectDetection.from_pretrained(
                path, num_labels=len(id2label), id2label=id2label, label2id=label2id, ignore_mismatched_sizes=True)
        return model, True
    backbone_overrides = parse_overrides(model_args.backbone_overrides)
    check_config_keys(ResNetConfig(), backbone_overrides, "--backbone_overrides")
    overrides = parse_overrides(model_args.config_overrides)
    check_config_keys(DetrConfig(backbone_config=ResNetConfig()), overrides, "--config_overrides")
    with user_errors(ValueError, TypeError, KeyError, IndexError):
        backbone = ResNetConfig(**{**DEFAULT_BACKBONE, **backbone_overrides})
        config = DetrConfig(**{**DEFAULT_DETR, **overrides, "backbone_config": backbone, "num_labels": len(id2label),
                               "id2label": id2label, "label2id": label2id})
        model = DetrForObjectDetection(config)
    # The original DETR initialises its object queries N(0, 1) (nn.Embedding's default); transformers uses
    # std 0.02, and from scratch the queries then stay alike: overfitting 8 images reached mAP 0.18, not 0.80.
    torch.nn.init.normal_(model.model.query_position_embeddings.weight)
    train_backbone_from_scratch(model)
    return model, False


def label_mapping(categories: dict[int, str], model_name_or_path: str | None
                  ) -> tuple[dict[int, str], dict[int, int], dict[int, int]]:
    """``(id2label, label_of_category, category_of_label)`` for the data's ``{category_id: name}``.

    A checkpoint whose head was trained on every category name keeps its label order (and any labels the
    data lacks, scored as categories no image has); otherwise the labels follow the sorted category ids.
    """
    category_ids = sorted(categories)
    saved = None
    if model_name_or_path is not None:
        saved = checkpoint_labels(resolve_model_path(model_name_or_path), [categories[c] for c in category_ids])
    if saved is None:
        return ({i: categories[c] for i, c in enumerate(category_ids)}, {c: i for i, c in enumerate(category_ids)},
                dict(enumerate(category_ids)))
    id_of = {name: i for i, name in saved.items()}  # the data's names are unique in the checkpoint
    label_of_category = {c: id_of[categories[c]] for c in category_ids}
    category_of_label = {i: c for c, i in label_of_category.items()}
    spare_ids = iter(range(max(category_ids) + 1, max(category_ids) + 1 + len(saved)))
    category_of_label.update({i: next(spare_ids) for i in sorted(saved) if i not in category_of_label})
    return saved, label_of_category, category_of_label


def train_backbone_from_scratch(model: DetrForObjectDetection, trainable_norm: bool = True) -> int:
    """Make the backbone of a DETR built from a config trainable; returns how many BatchNorms were swapped.

    DETR assumes a pretrained backbone. It freezes backbone parameters whose names lack ``stage.1``..``stage.3``
    (a timm-era rule that matches no parameter of a transformers ResNet, whose stages are ``stages.N``): the
    whole random backbone stays frozen. It also freezes BatchNorm, which from scratch is the identity, so the
    ResNet trains without normalisation (AP 0.01% after 2,000 CPU steps in `bench_detr` probes, see README).
    This unfreezes the backbone and, with `trainable_norm`, puts trainable ``nn.BatchNorm2d`` in place of the
    frozen ones. A saved model reloads with frozen BatchNorm holding the trained statistics: the same
    function in eval mode.

    Example::

        model = DetrForObjectDetection(config)
        train_backbone_from_scratch(model)
    """
    from transformers.models.detr.modeling_detr import DetrFrozenBatchNorm2d

    model.model.unfreeze_backbone()
    swapped = 0
    for parent in list(model.model.backbone.modules()) if trainable_norm else []:
        for name, child in list(parent.named_children()):
            if isinstance(child, DetrFrozenBatchNorm2d):
                setattr(parent, name, torch.nn.BatchNorm2d(child.weight.shape[0]))
                swapped += 1
    if trainable_norm and not swapped:
        raise RuntimeError("the DETR backbone has no frozen BatchNorm to make trainable")
    return swapped


def check_config_keys(config: Any, overrides: dict[str, Any], option: str) -> None:
    for key in overrides:
        if not hasattr(config, key):
            raise ScriptError(f"{option}: {type(config).__name__} has no field {key!r}")


@torch.no_grad()
def detection_metrics(model: DetrForObjectDetection, dataset: DetectionDataset, category_of_label: dict[int, int],
                      batch_size: int, prefix: str = "eval") -> dict[str, float]:
    """COCO mAP of `model` on `dataset` (every query a detection, scored by its best class), keys ``{prefix}_*``."""
    metric = load_metric("coco_map")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate)
    crowd_regions: list[dict[str, Any]] = []
    for batch in loader:
        outputs = model(pixel_values=batch["pixel_values"].to(device), pixel_mask=batch["pixel_mask"].to(device))
        probabilities = outputs.logits.softmax(-1)[..., :-1]  # the last class is "no object"
        scores, labels = probabilities.max(-1)
        for i, target in enumerate(batch["labels"]):
            height, width = target["orig_size"].tolist()
            cx, cy, w, h = outputs.pred_boxes[i].unbind(-1)
            boxes = torch.stack([(cx - w / 2) * width, (cy - h / 2) * height, w * width, h * height], dim=-1)
            metric.add(
                prediction={"image_id": int(target["image_id"]), "boxes": boxes.tolist(),
                            "scores": scores[i].tolist(), "labels": [category_of_label[int(k)] for k in labels[i]]},
                reference={"image_id": int(target["image_id"]), "boxes": _reference_boxes(target),
                           "labels": [category_of_label[int(k)] for k in target["class_labels"]]},
            )
            if len(target["crowd_labels"]):  # ignored regions, as pycocotools' iscrowd
                crowd_regions.append({
                    "image_id": int(target["image_id"]),
                    "boxes": _reference_boxes({"boxes": target["crowd_boxes"], "orig_size": target["orig_size"]}),
                    "labels": [category_of_label[int(k)] for k in target["crowd_labels"]]})
    model.train(was_training)
    return {f"{prefix}_{k}": v for k, v in metric.compute(crowd_regions=crowd_regions).items()}


def _reference_boxes(target: dict[str, torch.Tensor]) -> list[list[float]]:
    height, width = target["orig_size"].tolist()
    cx, cy, w, h = target["boxes"].unbind(-1)
    return torch.stack([(cx - w / 2) * width, (cy - h / 2) * height, w * width, h * height], dim=-1).tolist()


# ------------------------------------------------------------------------------------------------- main


class DetectionTrainer(Trainer):
    """`Trainer` whose every evaluation also scores COCO mAP on the evaluated set.

    The mAP joins the evaluation loop's metrics, so it is logged, passed to callbacks (early stopping) and
    usable as ``metric_for_best_model``. The main process scores it and, under DDP, sends it to the others.
    """

    def __init__(self, *args: Any, category_of_label: dict[int, int], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.category_of_label = category_of_label

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                         metric_key_prefix)
        scores = [None]
        if self.is_world_process_zero():
            scores[0] = detection_metrics(self.model, dataloader.dataset, self.category_of_label,
                                          self.args.per_device_eval_batch_size, prefix=metric_key_prefix)
        if self.args.world_size > 1:
            torch.distributed.broadcast_object_list(scores, src=0)
        output.metrics.update(scores[0])
        return output


def main(argv: list[str] | None = None) -> int:
    model_args, data_args, lors_args, training_args = parse_script_args(
        (ModelArguments, DataArguments, LorsArguments, TrainingArguments), argv)
    if lors_args.lors_calibration_batches:
        raise ScriptError("--lors_calibration_batches is not supported for detection (DETR's decoder "
                          "needs the encoder's outputs; convert with --lors_init svd or alternating)")
    set_seed(training_args.seed)

    splits: dict[str, list[dict]] = {}
    categories: dict[int, str] = {}
    if data_args.dataset_name is not None:
        import datasets

        with user_errors():
            hub = datasets.load_dataset(data_args.dataset_name)
        for name, hub_name in (("train", "train"), ("validation", "validation" if "validation" in hub else "test")):
            if hub_name in hub:
                splits[name], found = records_from_hub(hub[hub_name])
                categories.update(found)
    else:
        for name, option, path in (("train", "--train_annotation_file", data_args.train_annotation_file),
                                   ("validation", "--validation_annotation_file", data_args.validation_annotation_file)):
            if path is not None:
                splits[name], found = read_coco(path, data_args.image_dir, option)
                renamed = [c for c in found if c in categories and categories[c] != found[c]]
                if renamed:
                    raise ScriptError(f"category id {renamed[0]} is {categories[renamed[0]]!r} in "
                                      f"--train_annotation_file but {found[renamed[0]]!r} in {option}")
                categories.update(found)
    if not splits:
        raise ScriptError("give --train_annotation_file / --validation_annotation_file (COCO json) or --dataset_name")
    if training_args.do_train and "train" not in splits:
        raise ScriptError("--do_train needs --train_annotation_file")
    if training_args.do_eval and "validation" not in splits:
        raise ScriptError("--do_eval needs --validation_annotation_file")
    if not categories:
        raise ScriptError("the annotations list no categories")
    for name, limit in (("train", data_args.max_train_samples), ("validation", data_args.max_eval_samples)):
        if name in splits and limit is not None:
            splits[name] = splits[name][:limit]
    category_ids = sorted(categories)
    unknown = {c for records in splits.values() for r in records
               for c in (*r["category_ids"], *r.get("crowd_category_ids", []))} - set(category_ids)
    if unknown:
        raise ScriptError(f"annotations use category ids {sorted(unknown)} missing from 'categories'")
    id2label, label_of_category, category_of_label = label_mapping(categories, model_args.model_name_or_path)
    datasets_ = {name: DetectionDataset(records, label_of_category, data_args.image_size)
                 for name, records in splits.items()}

    model, pretrained = build_model(model_args, id2label)
    model = convert_model(model, lors_args, pretrained=pretrained)
    if training_args.should_save:
        logger.info("parameters:\n%s", write_parameter_report(model, training_args.output_dir))

    push_to_hub = defer_push_to_hub(training_args)
    training_args.remove_unused_columns = False
    training_args.prediction_loss_only = True  # mAP is scored separately, on the whole evaluated set
    trainer = DetectionTrainer(model=model, args=training_args, train_dataset=datasets_.get("train"),
                               eval_dataset=datasets_.get("validation"), data_collator=collate,
                               optimizers=lors_optimizers(model, training_args, lors_args),
                               category_of_label=category_of_label)
    train_and_evaluate(trainer, lors_args)
    if push_to_hub and trainer.is_world_process_zero():
        logger.info("pushed: %s", push_trained_model(trainer, trainer_model_card=lors_args.no_lors))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
