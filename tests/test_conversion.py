"""Conversion maths: exact at full rank, alternating refinement, data-aware (covariance) solutions."""

import pytest
import torch

from lors_hf.conversion import decompose, reconstruction_error


def _weights(count=4, out_features=10, in_features=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    common = torch.randn(out_features, in_features, generator=generator)
    return common + 0.7 * torch.randn(count, out_features, in_features, generator=generator)


def _covariances(count=4, in_features=8, samples=200, seed=1):
    """Second moments of strongly anisotropic, layer-specific inputs."""
    generator = torch.Generator().manual_seed(seed)
    scales = torch.logspace(1, -2, in_features)
    covariances = []
    for _ in range(count):
        mixing = torch.linalg.qr(torch.randn(in_features, in_features, generator=generator))[0]
        x = torch.randn(samples, in_features, generator=generator) * scales @ mixing
        covariances.append(x.T @ x / samples)
    return torch.stack(covariances)


def test_decompose_at_full_rank_is_exact():
    weights = _weights(out_features=10, in_features=8)
    shared, factors = decompose(weights, [8] * 4)
    assert shared.shape == (10, 8)
    for weight, (b, a) in zip(weights, factors, strict=True):
        assert b.shape == (10, 8) and a.shape == (8, 8)
        torch.testing.assert_close(shared + b @ a, weight, rtol=0, atol=1e-5)
    assert reconstruction_error(weights, shared, factors) < 1e-10


def test_decompose_inside_an_autocast_block_still_returns_exact_float32_factors():
    """The docstring promises float32: under autocast the SVD's products came back in bf16 and a full-rank split
    was no longer exact."""
    weights = torch.randn(3, 6, 5, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        shared, factors = decompose(weights, [5, 5, 5])
    assert shared.dtype == torch.float32 and all(b.dtype == a.dtype == torch.float32 for b, a in factors)
    for i, (b, a) in enumerate(factors):
        torch.testing.assert_close(shared + b @ a, weights[i], atol=1e-5, rtol=1e-5)


def test_decompose_returns_the_requested_ranks_and_rank_zero_is_the_mean():
    weights = _weights()
    shared, factors = decompose(weights, [0, 1, 3, 8])
    assert [a.shape[0] for _, a in factors] == [0, 1, 3, 8]
    assert [b.shape[1] for b, _ in factors] == [0, 1, 3, 8]
    for b, a in factors:
        assert torch.linalg.matrix_rank(b @ a) == a.shape[0]
    torch.testing.assert_close(shared, weights.mean(0))
    all_zero, _ = decompose(weights, [0] * 4)
    torch.testing.assert_close(all_zero, weights.mean(0))


def test_plain_svd_is_the_best_residual_for_the_mean():
    weights = _weights()
    rank = 2
    shared, factors = decompose(weights, [rank] * 4)
    for weight, (b, a) in zip(weights, factors, strict=True):
        singular = torch.linalg.svdvals(weight - shared)
        optimum = singular[rank:].pow(2).sum()
        achieved = (weight - shared - b @ a).pow(2).sum()
        torch.testing.assert_close(achieved, optimum, rtol=1e-4, atol=1e-5)


def test_decompose_rejects_a_rank_list_of_the_wrong_length():
    with pytest.raises(ValueError, match="3 ranks for 4 weights"):
        decompose(_weights(), [1, 1, 1])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_alternating_refinement_never_increases_the_error_and_beats_plain_svd(seed):
    weights = _weights(count=5, out_features=12, in_features=9, seed=seed)
    ranks = [1, 2, 1, 3, 2]
    errors = [reconstruction_error(weights, *decompose(weights, ranks, steps=steps)) for steps in range(0, 9)]
    for before, after in zip(errors, errors[1:], strict=False):
        assert after <= before + 1e-7
    assert errors[-1] < 0.97 * errors[0]


def test_data_aware_solution_has_lower_output_error_than_plain_svd():
    weights = _weights(count=4, out_features=10, in_features=8)
    covariances = _covariances(count=4, in_features=8)
    ranks = [2] * 4
    plain = decompose(weights, ranks)
    refined = decompose(weights, ranks, steps=8)
    aware = decompose(weights, ranks, steps=8, input_covariances=covariances)
    plain_error = reconstruction_error(weights, *plain, input_covariances=covariances)
    refined_error = reconstruction_error(weights, *refined, input_covariances=covariances)
    aware_error = reconstruction_error(weights, *aware, input_covariances=covariances)
    assert aware_error < 0.5 * plain_error
    assert aware_error < 0.5 * refined_error
    # and it is the output error that improved, not the weight error
    assert reconstruction_error(weights, *aware) > reconstruction_error(weights, *refined)


def test_data_aware_error_matches_the_error_on_real_outputs():
    weights = _weights(count=3)
    generator = torch.Generator().manual_seed(3)
    inputs = [torch.randn(300, 8, generator=generator) * torch.linspace(3, 0.1, 8) for _ in range(3)]
    covariances = torch.stack([x.T @ x / x.shape[0] for x in inputs])
    shared, factors = decompose(weights, [2] * 3, steps=2, input_covariances=covariances)
    error = sum((x @ (w - shared - b @ a).T).pow(2).sum() for x, w, (b, a) in
                zip(inputs, weights, factors, strict=True))
    total = sum((x @ w.T).pow(2).sum() for x, w in zip(inputs, weights, strict=True))
    reported = reconstruction_error(weights, shared, factors, input_covariances=covariances)
    assert reported == pytest.approx((error / total).item(), rel=1e-3)


class _LargestFloat64:
    """Dispatch mode: the most elements of any float64 tensor an operation returns."""

    def __new__(cls):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        class Mode(TorchDispatchMode):
            numel = 0

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for leaf in tree_leaves(out):
                    if isinstance(leaf, torch.Tensor) and leaf.dtype == torch.float64:
                        self.numel = max(self.numel, leaf.numel())
                return out

        return Mode()


def test_data_aware_decompose_works_in_float64_one_layer_at_a_time():
    """The float64 covariances are worked out one layer at a time: for all layers at once their copies came to
    about eight times the float32 covariances (SmolLM2-135M's down_proj, 30 x 1536^2: 2.2 GB; 30 GB for a 7B model)."""
    weights, covariances = _weights(count=6), _covariances(count=6)
    expected = decompose(weights, [3] * 6, steps=2, input_covariances=covariances, damping=0.1)
    with _LargestFloat64() as mode:
        shared, factors = decompose(weights, [3] * 6, steps=2, input_covariances=covariances, damping=0.1)
    assert mode.numel <= 8 * 10  # one layer's (in, in) or (in, out), not all six layers'
    torch.testing.assert_close(shared, expected[0], rtol=0, atol=0)


def _damped_covariances_one_by_one(covariances, damping):
    """`_damped_covariances` as it was: each layer damped, made positive definite, factorised, copied."""
    from lors_hf.conversion import positive_definite

    damped, chol, total = [], [], 0
    for covariance in covariances.double():
        scale = covariance.diagonal().mean().clamp_min(1e-12)
        eye = torch.eye(covariance.shape[-1], dtype=torch.float64)
        covariance = positive_definite((covariance + damping * scale * eye)[None])[0]
        damped.append(covariance.float())
        chol.append(torch.linalg.cholesky(covariance).float())
        total = total + covariance
    return torch.stack(damped), torch.stack(chol), total


@pytest.mark.parametrize("damping, lifted", [(0.0, False), (0.0, True), (0.1, False)])
def test_damped_covariances_at_damping_0_take_positive_definite_float32_covariances_as_they_are(damping, lifted):
    """Data-aware conversion hands `decompose` covariances damped and made positive definite already (float32),
    with damping 0: they are its damped covariances as they are, not a copy (float32 -> float64 -> float32 is
    exact), and each is factorised once. A layer that needs lifting (or damping > 0) gets a copy; the input is
    never written to. The results are those of one layer after the other as before, to the bit."""
    from lors_hf.conversion import _damped_covariances

    covariances = _covariances(count=3)
    if lifted:  # rank 1: not positive definite
        vector = torch.randn(8, generator=torch.Generator().manual_seed(3))
        covariances[1] = vector[:, None] * vector[None, :]
    before = covariances.clone()
    damped, chol, total = _damped_covariances(covariances, damping)
    assert (damped is covariances) == (damping == 0 and not lifted)
    assert torch.equal(covariances, before)
    for got, expected in zip((damped, chol, total), _damped_covariances_one_by_one(before, damping), strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
