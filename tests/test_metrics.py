"""The metric scripts shipped in lors_hf.metrics: coco_map's edge cases and its refusal of malformed input."""

import pytest

from lors_hf.metrics import load_metric

LARGE_BOX = [0.0, 0.0, 100.0, 100.0]  # area 10,000: a "large" box for COCOeval


def _compute(predictions, references):
    return load_metric("coco_map").compute(predictions=predictions, references=references)


def test_no_detections_score_zero_only_where_a_ground_truth_box_qualifies():
    """The size buckets without ground truth are -1 whatever the predictions (they were 0 with no detections
    and -1 with a wrong one)."""
    references = [{"image_id": 1, "boxes": [LARGE_BOX], "labels": [0]}]
    empty = _compute([{"image_id": 1, "boxes": [], "scores": [], "labels": []}], references)
    wrong = _compute([{"image_id": 1, "boxes": [[150.0, 150.0, 10.0, 10.0]], "scores": [0.9], "labels": [0]}],
                     references)
    for name in ("map_small", "map_medium"):
        assert empty[name] == wrong[name] == -1.0
    for name in ("map", "map_50", "map_large", "mar_100"):
        assert empty[name] == wrong[name] == 0.0


@pytest.mark.parametrize("predictions, references, message", [
    ([{"image_id": 2, "boxes": [LARGE_BOX], "scores": [0.9], "labels": [0]}],
     [{"image_id": 1, "boxes": [LARGE_BOX], "labels": [0]}], "image_id 2, which no reference has"),
    ([{"image_id": 1, "boxes": [[0.0, 0.0, 10.0]], "scores": [0.9], "labels": [0]}],
     [{"image_id": 1, "boxes": [LARGE_BOX], "labels": [0]}], "not \\[x, y, w, h\\]"),
    ([{"image_id": 1, "boxes": [LARGE_BOX], "scores": [0.9, 0.5], "labels": [0]}],
     [{"image_id": 1, "boxes": [LARGE_BOX], "labels": [0]}], "one entry per box"),
    ([{"image_id": 1, "boxes": [], "scores": [], "labels": []}] * 2,
     [{"image_id": 1, "boxes": [LARGE_BOX], "labels": [0]}] * 2, "two references have image_id 1"),
])
def test_malformed_input_is_a_value_error_naming_the_image(predictions, references, message):
    with pytest.raises(ValueError, match=message):
        _compute(predictions, references)
