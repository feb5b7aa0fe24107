"""LorsConfig: validation (errors that name the fix) and the JSON round trip of config.json."""

import json

import numpy as np
import pytest

from lors_hf import LorsConfig
from lors_hf.config import FORMAT_VERSION


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"rank": -1}, ValueError, r"must be >= 0"),
        ({"rank": [4, -2, 4]}, ValueError, r"must be >= 0"),
        ({"rank": 1.5}, TypeError, r"must hold ints"),
        ({"rank": True}, TypeError, r"must hold ints"),
        ({"rank": [4, "8"]}, TypeError, r"must hold ints"),
        ({"rank": "half"}, ValueError, r"an int, 'full' or a list of ints"),
        ({"rank": []}, ValueError, r"empty list; give one rank per layer"),
        ({"rank": {}}, ValueError, r"empty dict"),
        ({"rank": {1: 4}}, TypeError, r"dict keys must be regex strings"),
        ({"rank": {"(attention": 4}}, ValueError, r"not a valid regex"),
        ({"rank": {"attention": -3}}, ValueError, r"must be >= 0"),
        ({"init": "random"}, ValueError, r"unknown init 'random'; choose one of auto, scratch, svd, alternating"),
        ({"rank": 8, "target_reduction": 0.5}, ValueError, r"either `rank` or `target_reduction`, not both"),
        ({"target_modules": "(query"}, ValueError, r"`target_modules` pattern .* is not a valid regex"),
        ({"exclude_modules": "[a-"}, ValueError, r"`exclude_modules` pattern .* is not a valid regex"),
        ({"target_modules": 3}, TypeError, r"list of names or one regex string"),
        ({"exclude_modules": ["query", 7]}, TypeError, r"list of names or one regex string"),
        ({"target_reduction": 0.0}, ValueError, r"must lie in \(0, 1\)"),
        ({"target_reduction": 1.0}, ValueError, r"must lie in \(0, 1\)"),
        ({"target_reduction": 1.5}, ValueError, r"must lie in \(0, 1\)"),
        ({"target_reduction": -0.2}, ValueError, r"must lie in \(0, 1\)"),
        ({"target_reduction": "0.6"}, TypeError, r"must be a float in \(0, 1\)"),
        ({"alternating_steps": 0}, ValueError, r"positive int"),
        ({"format_version": FORMAT_VERSION + 1}, ValueError, r"newer than the format .* upgrade lors_hf"),
        ({"format_version": "1"}, TypeError, r"`format_version` must be an int"),  # was "format 1, newer than 1"
        ({"format_version": True}, TypeError, r"`format_version` must be an int"),
        ({"format_version": 0}, ValueError, r"`format_version` must be >= 1"),
    ],
)
def test_invalid_config_raises_with_a_message_naming_the_fix(kwargs, error, message):
    with pytest.raises(error, match=message):
        LorsConfig(**kwargs)


def test_defaults_rank_32_unless_target_reduction_is_given():
    assert LorsConfig().rank == 32
    config = LorsConfig(target_reduction=0.6)
    assert config.rank is None and config.target_reduction == 0.6


@pytest.mark.parametrize(
    "config",
    [
        LorsConfig(),
        LorsConfig(rank="full", init="svd"),
        LorsConfig(rank=[1, 2, 3], init="alternating", alternating_steps=3),
        LorsConfig(rank={r"attention": [8, 8, 16], r".*": 4}, target_modules=["query", "value"]),
        LorsConfig(target_reduction=0.6, target_modules=r".*decoder.*(q|v)_proj", exclude_modules=["fc2"]),
        LorsConfig(rank=(2, 4), target_modules=("query", "key")),
        LorsConfig(rank={"query": (1, 2, 3), ".*": "full"}),
        LorsConfig(rank=np.int64(4), alternating_steps=np.int32(3)),  # ranks computed with numpy
        LorsConfig(rank={"query": list(np.arange(1, 4)), ".*": np.int64(2)}),
        LorsConfig(target_reduction=np.float32(0.6)),
    ],
)
def test_to_dict_from_dict_round_trips_through_json(config):
    plain = [v for v in (config.rank, config.target_reduction, config.alternating_steps) if v is not None]
    for value in plain:  # numpy numbers become Python ones
        for leaf in value.values() if isinstance(value, dict) else [value]:
            assert type(leaf) in (int, float, str) or all(type(v) is int for v in leaf)
    text = json.dumps(config.to_dict())
    restored = LorsConfig.from_dict(json.loads(text))
    assert restored == config
    assert restored.to_dict() == config.to_dict()
    assert LorsConfig.from_dict(json.loads(config.to_json_string())) == config


def test_from_dict_refuses_fields_of_a_newer_lors_hf():
    data = LorsConfig(rank=4).to_dict()
    data["adaptive_generators"] = True
    with pytest.raises(ValueError, match=r"\['adaptive_generators'\].*newer lors_hf: upgrade"):
        LorsConfig.from_dict(data)


def test_from_dict_refuses_a_newer_format_version():
    data = LorsConfig(rank=4).to_dict()
    data["format_version"] = FORMAT_VERSION + 1
    with pytest.raises(ValueError, match=rf"LORS format {FORMAT_VERSION + 1}.*upgrade lors_hf"):
        LorsConfig.from_dict(data)


def test_from_dict_refuses_a_non_dict():
    with pytest.raises(TypeError, match="lors_config must be a dict, got list"):
        LorsConfig.from_dict([("rank", 4)])


def test_replace_switches_between_rank_and_target_reduction_and_validates():
    config = LorsConfig(rank=8, init="svd")
    by_reduction = config.replace(target_reduction=0.5)
    assert by_reduction.rank is None and by_reduction.target_reduction == 0.5 and by_reduction.init == "svd"
    back = by_reduction.replace(rank=4)
    assert back.rank == 4 and back.target_reduction is None
    assert config.rank == 8  # the original is untouched
    with pytest.raises(ValueError, match="unknown init"):
        config.replace(init="zeros")


def test_a_resolved_plan_names_its_ranks_and_the_groups_it_left_dense():
    plan = LorsConfig(rank={r"^enc\.layer\.query$": [4, 0, 8], r"^enc\.layer\.key$": "dense", r"^enc\.layer\.value$": [4, 4, 4]})
    assert plan.private_ranks() == [4, 8]
    assert plan.dense_groups() == ["enc.layer.key"]
    assert LorsConfig.from_dict(plan.to_dict()).dense_groups() == ["enc.layer.key"]
    assert LorsConfig(rank=6).private_ranks() == [6] and LorsConfig(rank=6).dense_groups() == []
    assert LorsConfig(rank=0).private_ranks() == []
