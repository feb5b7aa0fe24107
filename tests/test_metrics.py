"""The metric scripts shipped in lors_hf.metrics: coco_map's edge cases, and malformed input refused by both."""

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


def test_crowd_regions_are_ignored_as_pycocotools_ignores_iscrowd():
    """A detection of a crowd region is neither a hit nor a false positive; a crowd region is no box to find."""
    crowd_box = [200.0, 200.0, 100.0, 100.0]
    references = [{"image_id": 1, "boxes": [LARGE_BOX], "labels": [0]}]
    predictions = [{"image_id": 1, "boxes": [crowd_box, LARGE_BOX], "scores": [0.9, 0.8], "labels": [0, 0]}]
    crowd = [{"image_id": 1, "boxes": [crowd_box], "labels": [0]}]
    assert _compute(predictions, references)["map"] == pytest.approx(0.5)  # the crowd detection: a false positive
    metric = load_metric("coco_map")
    assert metric.compute(predictions=predictions, references=references, crowd_regions=crowd)["map"] == (
        pytest.approx(1.0))
    only_crowd = load_metric("coco_map").compute(
        predictions=[{"image_id": 1, "boxes": [], "scores": [], "labels": []}],
        references=[{"image_id": 1, "boxes": [], "labels": []}], crowd_regions=crowd)
    assert set(only_crowd.values()) == {-1.0}  # no box to find, as COCOeval says
    with pytest.raises(ValueError, match="a crowd region has image_id 2, which no reference has"):
        load_metric("coco_map").compute(predictions=predictions, references=references,
                                        crowd_regions=[{"image_id": 2, "boxes": [crowd_box], "labels": [0]}])


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"predictions": [0.9, 0.2, 0.6], "references": [1, 0, 1]}, "predictions must be integer .* argmax"),  # was 0.333
    ({"predictions": [1, 0, 1], "references": [1.0, 0.5, 1.0]}, "references must be integer"),
    ({"predictions": [1, 0, 1], "references": [1, 0, 1], "sample_weight": [1.0, 2.0]}, "one weight per prediction"),
    ({"predictions": [1, 0, 1], "references": [1, 0, 1], "sample_weight": [0, 0, 0]}, "sums to zero"),
    ({"predictions": [1, 0, 1], "references": [1, 0, 1], "sample_weight": [1, -1, 1]}, "finite weights >= 0"),
])
def test_accuracy_refuses_scores_and_unusable_weights(kwargs, message):
    """Float scores were truncated to label 0 by the int32 feature; a wrong-length weight list was numpy's "shapes
    not aligned" and all-zero weights a ZeroDivisionError."""
    with pytest.raises(ValueError, match=message):
        load_metric("accuracy").compute(**kwargs)


def test_accuracy_refuses_scores_added_one_by_one_and_in_multilabel_rows():
    with pytest.raises(ValueError, match="predictions must be integer"):
        load_metric("accuracy").add(prediction=0.7, reference=1)
    with pytest.raises(ValueError, match="predictions must be integer"):
        load_metric("accuracy", config_name="multilabel").compute(predictions=[[0, 1], [0.5]], references=[[0, 1], [1]])


def test_accuracy_takes_whole_floats_and_a_zero_weighted_count():
    metric = load_metric("accuracy")
    assert metric.compute(predictions=[1.0, 0.0, 1.0], references=[1, 0, 0]) == {"accuracy": pytest.approx(2 / 3)}
    assert metric.compute(predictions=[1, 0], references=[1, 0], sample_weight=[0, 0], normalize=False) == {
        "accuracy": 0.0}


def test_accuracy_leaves_ragged_rows_to_evaluates_own_format_error():
    """Lists where single labels belong: evaluate's message naming the expected format, not numpy's."""
    with pytest.raises(ValueError, match="don't match the expected format"):
        load_metric("accuracy").compute(predictions=[[0, 1], [1]], references=[1, 0])
