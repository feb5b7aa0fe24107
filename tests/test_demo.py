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


def test_a_run_stopped_after_saving_its_model_leaves_no_earlier_results_beside_it(tmp_path, monkeypatch):
    """A demo stopped between saving its model and writing its results left the earlier run's
    demo_results.json and plot next to the new model, describing another model."""
    import lors_hf.demo as demo

    for name in (demo.RESULTS_FILE, demo.PLOT_FILE):
        (tmp_path / name).write_text("an earlier run's")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "_plot", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_demo(tmp_path, quick=True, say=lambda line: None)
    assert (tmp_path / demo.MODEL_DIR / "config.json").is_file()
    assert not (tmp_path / demo.RESULTS_FILE).exists() and not (tmp_path / demo.PLOT_FILE).exists()
