"""COCO detection mAP for `evaluate`, computed with pycocotools; shipped with lors_hf so it loads offline.

Load it with ``lors_hf.metrics.load_metric("coco_map")`` (``evaluate.load(<this directory>)``).
One import per line: evaluate's import scanner misreads ``import a, b``.
"""

import contextlib
import io

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Mean average precision of object detections, as the COCO benchmark defines it (pycocotools' COCOeval,
IoU thresholds 0.50:0.95, up to 100 detections per image). The ground truth is built from the references.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `dict`): one per image: ``image_id`` (int), ``boxes`` (list of
        ``[x, y, width, height]`` in pixels), ``scores`` (list of float), ``labels`` (list of int).
    references (`list` of `dict`): one per image, same order: ``image_id``, ``boxes``, ``labels``.
    crowd_regions (`list` of `dict`, optional, to ``compute``): COCO's ``iscrowd`` annotations, as
        ``image_id``, ``boxes``, ``labels`` (any number per image of the references): as in pycocotools, a crowd
        region is no box to find, and a detection matching it is ignored (neither a hit nor a false positive).

Returns:
    map, map_50, map_75, map_small, map_medium, map_large, mar_1, mar_10, mar_100 (`float`): the twelve
    numbers COCOeval prints, minus the size-split recalls; -1.0 where no ground truth box (crowd regions
    aside) qualifies.

Examples:
    >>> import lors_hf.metrics
    >>> metric = lors_hf.metrics.load_metric("coco_map")
    >>> box = [[10.0, 10.0, 20.0, 20.0]]
    >>> result = metric.compute(predictions=[{"image_id": 1, "boxes": box, "scores": [0.9], "labels": [3]}],
    ...                         references=[{"image_id": 1, "boxes": box, "labels": [3]}])
    >>> round(result["map"], 6)
    1.0
"""

_CITATION = """
@inproceedings{lin2014microsoft,
  title={Microsoft COCO: Common Objects in Context},
  author={Lin, Tsung-Yi and Maire, Michael and Belongie, Serge and others},
  booktitle={ECCV},
  year={2014}
}
"""

_STAT_NAMES = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_1", "mar_10", "mar_100")
_SIZE_RANGES = {"map_small": (0, 32**2), "map_medium": (32**2, 96**2), "map_large": (96**2, 1e10)}  # COCOeval's areas


def _check_inputs(predictions: list[dict], references: list[dict], crowd_regions: list[dict]) -> None:
    """A ValueError naming the image and the field for input COCOeval would fail on, or silently merge."""
    seen = set()
    for reference in references:
        image = int(reference["image_id"])
        if image in seen:
            raise ValueError(f"coco_map: two references have image_id {image}; give each image once")
        seen.add(image)
    for kind, items, fields in (("reference", references, ("boxes", "labels")),
                                ("prediction", predictions, ("boxes", "scores", "labels")),
                                ("crowd region", crowd_regions, ("boxes", "labels"))):
        for item in items:
            image = int(item["image_id"])
            if kind != "reference" and image not in seen:
                raise ValueError(f"coco_map: a {kind} has image_id {image}, which no reference has")
            lengths = {name: len(item[name]) for name in fields}
            if len(set(lengths.values())) > 1:
                raise ValueError(f"coco_map: the {kind} of image {image} has {lengths}: one entry per box in each")
            if any(len(box) != 4 for box in item["boxes"]):
                raise ValueError(f"coco_map: the {kind} of image {image} has a box that is not [x, y, w, h]")


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class CocoMap(evaluate.Metric):
    """COCO mAP of per-image box predictions against per-image reference boxes."""

    def _info(self) -> evaluate.MetricInfo:
        boxes = datasets.Sequence(datasets.Sequence(datasets.Value("float64")))
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": {
                        "image_id": datasets.Value("int64"),
                        "boxes": boxes,
                        "scores": datasets.Sequence(datasets.Value("float64")),
                        "labels": datasets.Sequence(datasets.Value("int64")),
                    },
                    "references": {
                        "image_id": datasets.Value("int64"),
                        "boxes": boxes,
                        "labels": datasets.Sequence(datasets.Value("int64")),
                    },
                }
            ),
            reference_urls=["https://cocodataset.org/#detection-eval"],
        )

    def _compute(self, predictions, references, crowd_regions=None):
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
        crowd_regions = list(crowd_regions or [])
        _check_inputs(predictions, references, crowd_regions)
        annotations, detections, categories = [], [], set()
        images = [{"id": int(reference["image_id"])} for reference in references]
        for crowd, items in ((0, references), (1, crowd_regions)):
            for item in items:
                for box, label in zip(item["boxes"], item["labels"], strict=True):
                    categories.add(int(label))
                    annotations.append({"id": len(annotations) + 1, "image_id": int(item["image_id"]),
                                        "category_id": int(label), "bbox": [float(v) for v in box],
                                        "area": float(box[2] * box[3]), "iscrowd": crowd})
        for prediction in predictions:
            for box, score, label in zip(prediction["boxes"], prediction["scores"], prediction["labels"], strict=True):
                categories.add(int(label))
                detections.append({"image_id": int(prediction["image_id"]), "category_id": int(label),
                                   "bbox": [float(v) for v in box], "score": float(score)})
        if all(annotation["iscrowd"] for annotation in annotations):  # crowd regions are no boxes to find
            return dict.fromkeys(_STAT_NAMES, -1.0)
        if not detections:  # 0 where a ground truth box qualifies, -1 in the size buckets none falls into
            areas = [annotation["area"] for annotation in annotations if not annotation["iscrowd"]]

            def has_boxes(name: str) -> bool:
                low, high = _SIZE_RANGES.get(name, (0.0, float("inf")))
                return any(low <= area <= high for area in areas)

            return {name: 0.0 if has_boxes(name) else -1.0 for name in _STAT_NAMES}
        with contextlib.redirect_stdout(io.StringIO()):
            ground_truth = COCO()
            ground_truth.dataset = {"images": images, "annotations": annotations,
                                    "categories": [{"id": c} for c in sorted(categories)]}
            ground_truth.createIndex()
            evaluation = COCOeval(ground_truth, ground_truth.loadRes(detections), "bbox")
            evaluation.evaluate()
            evaluation.accumulate()
            evaluation.summarize()
        stats = np.asarray(evaluation.stats, dtype=float)
        return {name: float(stats[i]) for i, name in enumerate(_STAT_NAMES)}
