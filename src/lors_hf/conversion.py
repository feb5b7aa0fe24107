"""From N dense weights to one shared weight plus N low-rank residuals.

All methods minimise ``sum_i || (W_i - S - B_i A_i) L_i ||_F^2`` where ``L_i L_i^T = C_i``:

- ``"svd"`` (Relaxed Recursive Transformers): ``C_i = I``; ``S`` = mean of the ``W_i``,
  ``B_i A_i`` = truncated SVD of ``W_i - S``.
- ``"alternating"``: the same objective, refined by alternating the two exact partial minimisers
  (``S`` given the residuals, the residuals given ``S``); the error never rises.
- data-aware (calibration): ``C_i = X_i^T X_i / n`` is the second moment of the inputs the i-th
  layer's projection really sees, so the error that is minimised is that of the projection's
  *outputs* on real activations rather than of its weights. Alternating, as above.
"""

from __future__ import annotations

import torch

from .layer import autocast_off

POSITIVE_DEFINITE_FLOOR = 1e-3
"""Smallest eigenvalue, relative to the largest, that `positive_definite` lifts a failing covariance to."""


def positive_definite(covariances: torch.Tensor, floor: float = POSITIVE_DEFINITE_FLOOR) -> torch.Tensor:
    """``(N, d, d)`` covariances in float64 that a Cholesky factorisation accepts.

    Each one already positive definite is returned as it is; any other (a centred covariance of a few
    calibration tokens can be slightly indefinite from float rounding) is symmetrised and its eigenvalues
    raised to `floor` times its largest.

    Example:
        >>> c = torch.tensor([[[1.0, 1.0], [1.0, 1.0 - 1e-9]]])  # indefinite by rounding
        >>> bool(torch.linalg.cholesky_ex(positive_definite(c)).info.eq(0).all())
        True
    """
    covariances = covariances.double()
    failed = torch.linalg.cholesky_ex(covariances).info != 0
    if not failed.any():
        return covariances
    symmetric = (covariances[failed] + covariances[failed].mT) / 2
    values, vectors = torch.linalg.eigh(symmetric)
    values = values.clamp_min(values.amax(-1, keepdim=True).clamp_min(1e-12) * floor)
    covariances = covariances.clone()
    covariances[failed] = (vectors * values[..., None, :]) @ vectors.mT
    return covariances


def decompose(
    weights: torch.Tensor,
    ranks: list[int],
    steps: int = 0,
    input_covariances: torch.Tensor | None = None,
    damping: float = 0.01,
) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Split ``weights`` (N, out, in) into a shared ``(out, in)`` weight and N factors ``(B_i, A_i)``.

    Args:
        weights: the dense weights of the N layers, ``nn.Linear`` convention.
        ranks: private rank of each layer.
        steps: rounds of alternating refinement after the first solution (0 = plain mean + SVD).
        input_covariances: optional (N, in, in) second moments of each layer's inputs (data-aware).
        damping: added to the covariances' diagonal, as a fraction of their mean diagonal.

    Returns:
        ``(shared, [(B_i, A_i), ...])`` in float32 on the weights' device; ``B_i`` is (out, r_i),
        ``A_i`` is (r_i, in) and ``B_i @ A_i`` is the best rank-r_i residual for that ``shared``.

    Example:
        >>> w = torch.randn(3, 6, 5)
        >>> shared, factors = decompose(w, [5, 5, 5])
        >>> bool(torch.allclose(shared + factors[0][0] @ factors[0][1], w[0], atol=1e-5))
        True
    """
    with autocast_off(weights.device.type):  # float32 factors inside a caller's autocast block too
        return _decompose(weights, ranks, steps, input_covariances, damping)


def _decompose(weights: torch.Tensor, ranks: list[int], steps: int, input_covariances: torch.Tensor | None,
               damping: float) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """`decompose` with autocast off."""
    weights = weights.detach().float()
    count = weights.shape[0]
    if len(ranks) != count:
        raise ValueError(f"decompose: {len(ranks)} ranks for {count} weights.")
    chol = covariance = total = None
    if input_covariances is not None:
        covariance, chol, total = _damped_covariances(input_covariances.detach(), damping)
        shared = _weighted_mean(weights, covariance, total)
    else:
        shared = weights.mean(0)
    factors = _best_residuals(weights, shared, ranks, chol)
    for _ in range(steps):
        residuals = torch.stack([b @ a for b, a in factors])
        if covariance is None:
            shared = (weights - residuals).mean(0)
        else:
            shared = _weighted_mean(weights - residuals, covariance, total)
        factors = _best_residuals(weights, shared, ranks, chol)
    return shared, factors


def fit_private(
    targets: torch.Tensor,
    shared: torch.Tensor,
    ranks: list[int],
    input_covariances: torch.Tensor | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The private factors alone, for a fixed `shared`: ``argmin ||(T_i - S - B_i A_i) L_i||`` per layer.

    Args:
        targets: (N, out, in) what each layer should equal.
        shared: (out, in) the shared weight, kept as it is.
        ranks: private rank of each layer.
        input_covariances: optional (N, in, in) positive definite (already damped) second moments.

    Example:
        >>> w = torch.randn(2, 6, 5)
        >>> (b, a), _ = fit_private(w, torch.zeros(6, 5), [5, 5])
        >>> bool(torch.allclose(b @ a, w[0], atol=1e-5))
        True
    """
    chol = None if input_covariances is None else _positive_definite_cholesky(input_covariances)[1].float()
    return _best_residuals(targets.detach().float(), shared.detach().float(), ranks, chol)


def _positive_definite_cholesky(covariances: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(positive_definite(covariances), their Cholesky factors)`` for (N, d, d) covariances, float64, with one
    factorisation, not two, where they are positive definite already (then the first is `covariances` itself)."""
    covariances = covariances.double()
    factors, info = torch.linalg.cholesky_ex(covariances)
    if info.ne(0).any():
        covariances = positive_definite(covariances)
        factors = torch.linalg.cholesky(covariances)
    return covariances, factors


def reconstruction_error(
    weights: torch.Tensor,
    shared: torch.Tensor,
    factors: list[tuple[torch.Tensor, torch.Tensor]],
    input_covariances: torch.Tensor | None = None,
) -> float:
    """Relative error ``sum ||(W_i - S - B_i A_i) L_i||^2 / sum ||W_i L_i||^2`` (weights when no covariances)."""
    weights = weights.float()
    error = total = 0.0
    for i, (b, a) in enumerate(factors):
        diff = weights[i] - shared - b @ a
        if input_covariances is None:
            error += diff.pow(2).sum().item()
            total += weights[i].pow(2).sum().item()
        else:
            cov = input_covariances[i].float()
            error += torch.trace(diff @ cov @ diff.T).item()
            total += torch.trace(weights[i] @ cov @ weights[i].T).item()
    return error / max(total, 1e-30)


def _damped_covariances(covariances: torch.Tensor, damping: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The damped, positive definite covariances ``C_i`` (float32), their Cholesky factors (float32) and
    ``sum_i C_i`` (float64), worked out in float64 one layer at a time: for all layers at once the float64
    copies came to about eight times the float32 covariances (SmolLM2-135M's down_proj, 30 x 1536^2, 2.2 GB).

    With ``damping == 0`` a contiguous float32 `covariances` whose layers are all positive definite already
    is returned as ``C_i`` itself, not copied (float32 -> float64 -> float32 is exact; a ``-0.0`` entry stays
    ``-0.0``): data-aware conversion passes covariances damped by `calibrated_targets`. It is never written to:
    a layer that needs lifting gets a copy of the whole first."""
    count, size = covariances.shape[0], covariances.shape[-1]
    alias = damping == 0 and covariances.dtype == torch.float32 and covariances.is_contiguous()
    damped = covariances if alias else torch.empty(covariances.shape, device=covariances.device, dtype=torch.float32)
    # column-major, as torch.linalg.cholesky returns a batch: the same rounding
    chol = torch.empty(covariances.shape, device=covariances.device, dtype=torch.float32).mT
    total = torch.zeros(size, size, device=covariances.device, dtype=torch.float64)
    eye = torch.eye(size, device=covariances.device, dtype=torch.float64)
    for i in range(count):
        covariance = covariances[i].double()
        scale = covariance.diagonal().mean().clamp_min(1e-12)
        unlifted = (covariance + damping * scale * eye)[None]
        lifted, factor = _positive_definite_cholesky(unlifted)
        if lifted is not unlifted and damped is covariances:
            damped = covariances.clone()
        covariance = lifted[0]
        chol[i] = factor[0]
        if damped is not covariances:
            damped[i] = covariance
        total += covariance
    return damped, chol, total


def _weighted_mean(targets: torch.Tensor, covariance: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """argmin_S sum_i ||(T_i - S) L_i||^2  =  (sum_i T_i C_i) (sum_i C_i)^-1, with `total` = sum_i C_i."""
    numerator = torch.einsum("noi,nij->oj", targets, covariance.to(targets.dtype))
    return torch.linalg.solve(total, numerator.T.double()).T.to(targets.dtype)  # C symmetric


def _best_residuals(
    weights: torch.Tensor, shared: torch.Tensor, ranks: list[int], chol: torch.Tensor | None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """For each layer the rank-r_i ``B A`` minimising ``||(W_i - S - B A) L_i||`` (Eckart-Young in the L-metric).

    Solved for all layers at once from the eigendecomposition of the residuals' Gram matrices (on
    their smaller side): about twice as fast as one SVD per layer on a CPU, and exact at full rank.
    """
    residuals = weights - shared
    top = max(ranks)
    if top == 0:
        return [(r.new_zeros(r.shape[0], 0), r.new_zeros(0, r.shape[1])) for r in residuals]
    targets = residuals if chol is None else residuals @ chol
    wide = residuals.shape[1] < residuals.shape[2]  # out < in: decompose T T^T (out x out)
    gram = targets @ targets.mT if wide else targets.mT @ targets
    basis = torch.linalg.eigh(gram)[1].flip(-1)[:, :, :top]  # top left (wide) or right singular vectors
    # The other side, T^T U or T V, has columns of norm s: read s off it (exact, not squared), balance B and A.
    projected = targets.mT @ basis if wide else targets @ basis
    singular = projected.norm(dim=-2)
    root = singular.sqrt()
    inverse_root = torch.where(singular > 0, 1.0 / root.clamp_min(1e-30), torch.zeros_like(root))
    if wide:  # T = U S V^T:  B = U S^1/2,  A = S^-1/2 U^T T
        b_all = basis * root[:, None, :]
        a_all = (projected * inverse_root[:, None, :]).mT
    else:  # B = T V S^-1/2,  A = S^1/2 V^T
        b_all = projected * inverse_root[:, None, :]
        a_all = root[:, :, None] * basis.mT
    if chol is not None:  # a L^-1:  solve  X L = a  for X
        a_all = torch.linalg.solve_triangular(chol, a_all, upper=False, left=False)
    return [(b_all[i, :, :rank].contiguous(), a_all[i, :rank].contiguous()) for i, rank in enumerate(ranks)]
