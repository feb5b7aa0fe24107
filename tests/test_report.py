"""parameter_report: dense against LORS counts per stack and in total, and its table."""

import sys
from pathlib import Path

import pytest

from lors_hf import LorsConfig, ParameterReport, lorsify, merge_and_unload, parameter_report
from lors_hf.discovery import plan_ranks

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import build  # noqa: E402


def _stack_parameters(model, stack_name: str) -> int:
    return sum(p.numel() for p in model.get_submodule(stack_name).parameters())


@pytest.mark.parametrize("family", ["bert", "t5", "llama"])
def test_dense_model_reports_zero_reduction(family):
    model, _ = build(family)
    report = parameter_report(model)
    assert report.stacks, "a dense model still lists its stacks"
    for row in [*report.stacks, report.stacks_total, report.total]:
        assert row.dense == row.lors and row.reduction == 0.0
    assert report.total.dense == model.num_parameters()
    for row in report.stacks:
        assert row.dense == _stack_parameters(model, row.name)


def test_counts_match_an_independent_count():
    model, _ = build("t5", layers=3)
    dense_total = model.num_parameters()
    dense_stacks = {name: _stack_parameters(model, name) for name in ("encoder.block", "decoder.block")}
    config = LorsConfig(rank=[1, 2, 3])
    stacks = plan_ranks(model, config)
    lorsify(model, config)
    report = parameter_report(model)
    assert [row.name for row in report.stacks] == ["encoder.block", "decoder.block"]
    for stack, row in zip(stacks, report.stacks, strict=True):
        saved = sum(len(g.layer_indices) * g.out_features * g.in_features
                    - g.out_features * g.in_features - sum(g.ranks) * (g.out_features + g.in_features)
                    for g in stack.groups)
        assert row.layers == 3
        assert row.dense == dense_stacks[row.name]
        assert row.lors == dense_stacks[row.name] - saved
        assert 0 < row.reduction < 1
    assert report.stacks_total.dense == sum(dense_stacks.values())
    assert report.stacks_total.lors == sum(row.lors for row in report.stacks)
    assert report.total.dense == dense_total
    assert report.total.lors == model.num_parameters()
    assert report.total.dense - report.total.lors == report.stacks_total.dense - report.stacks_total.lors


def test_str_is_a_table_with_each_stack_and_the_totals():
    model, _ = build("whisper")
    lorsify(model, rank=2)
    report = parameter_report(model)
    text = str(report)
    lines = text.splitlines()
    assert lines[0].split() == ["stack", "layers", "dense", "LORS", "reduction"]
    for row in [*report.stacks, report.stacks_total, report.total]:
        line = next(line for line in lines if line.startswith(row.name + " "))
        assert f"{row.dense:,}" in line and f"{row.lors:,}" in line and f"{row.reduction:.1%}" in line
    assert "model.encoder.layers" in text and "model.decoder.layers" in text
    # totals are set apart from the per-stack rows
    for name in ("all stacks", "whole model"):
        index = next(i for i, line in enumerate(lines) if line.startswith(name))
        assert set(lines[index - 1]) == {"-"}


def test_to_dict_holds_the_same_numbers():
    model, _ = build("gpt2")
    lorsify(model, rank=3)
    report = parameter_report(model)
    data = report.to_dict()
    assert data["stacks"][0]["name"] == "transformer.h"
    assert data["stacks_total"]["lors"] == report.stacks_total.lors
    assert data["model_total"]["dense"] == report.total.dense
    assert data["stacks_total"]["reduction"] == pytest.approx(report.stacks_total.reduction, abs=1e-6)


def test_report_after_merge_is_dense_again():
    model, _ = build("bert")
    dense_total = model.num_parameters()
    lorsify(model, rank=2)
    assert parameter_report(model).total.lors < dense_total
    merge_and_unload(model)
    report = parameter_report(model)
    assert report.total.lors == report.total.dense == dense_total
    assert report.stacks_total.reduction == 0.0


def test_more_private_rank_means_less_reduction():
    reductions = []
    for rank in (0, 2, 8):
        model, _ = build("llama")
        lorsify(model, rank=rank)
        reductions.append(parameter_report(model).stacks_total.reduction)
    assert reductions[0] > reductions[1] > reductions[2] > 0


def test_a_checkpoint_path_instead_of_a_model_is_a_type_error_naming_from_pretrained(tmp_path):
    """Was an AttributeError: 'str' object has no attribute 'modules'."""
    with pytest.raises(TypeError, match=r"parameter_report takes a model .* got str .*from_pretrained\(path\)"):
        parameter_report(str(tmp_path))


def test_a_report_built_by_hand_without_a_total_prints_and_converts():
    """`ParameterReport()` (public, its fields default) raised AttributeError in str() and to_dict()."""
    report = ParameterReport()
    assert str(report).splitlines()[-1].startswith("all stacks")
    assert report.to_dict()["model_total"] is None and report.to_dict()["stacks"] == []
