"""The quick-start demo's settings: bad values are refused before any work, and evaluation and fidelity
snippets never overlap."""

import pytest

from lors_hf.demo import DemoSettings, run_demo


@pytest.mark.parametrize("changes, message", [
    ({"fidelity_samples": 0}, "fidelity_samples must be >= 1"),  # [-0:] was the whole test split
    ({"batch_size": 0}, "batch_size must be >= 1"),
    ({"learning_rate": 0.0}, "learning_rate > 0"),
])
def test_bad_settings_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        DemoSettings(**changes)


def test_fidelity_snippets_may_not_overlap_the_evaluation_ones(tmp_path):
    with pytest.raises(ValueError, match="must not exceed the .* test snippets"):
        run_demo(tmp_path, settings=DemoSettings(eval_samples=2500, fidelity_samples=100))
