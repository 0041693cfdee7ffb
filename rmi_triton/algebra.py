"""The d x d float64 algebra shared by both engines.

Engines reduce the full-resolution maps to per-(n, c) statistics of the region
vectors; everything after that is tiny (d = R*R <= 100) and lives here, in
float64 PyTorch, differentiable (a closed-form gradient):

    half_logdet_posterior:  Sy, Sp, Syp -> h = sum_i log(diag chol(V + aI)_i + 1e-8),
                     V = Sy - Syp (Sp + aI)^-1 Syp^T
"""

from __future__ import annotations

import functools
import math

import torch

from . import capture
from .differentiable import once
from .options import LOG_EPS, RIDGE

# A failed factorisation is retried with ridge * RETRY_GROWTH**k, k = 1, 2, ...
RETRY_GROWTH = 10.0
MAX_RETRIES = 12
# Without host checks (torch.compile, CUDA graph capture) every retry always runs, on every
# matrix: the ridge 10a and 100a (what rounding in the statistics needs), then the rung of the
# ladder where the matrix is diagonally dominant, which no finite matrix fails
COMPILED_RETRIES = 3


def split_blocks(joint: torch.Tensor, d: int):
    """Split the joint [y; p] covariance [..., 2d, 2d] into Sy, Sp, Syp."""
    return joint[..., :d, :d], joint[..., d:, d:], joint[..., :d, d:]


class CholeskyReport:
    """How many matrices needed a larger ridge; read by the loss front.

    Eager code adds Python ints; under torch.compile the count stays a tensor
    (reading it would break the graph) until someone reads `retried`.
    """

    __slots__ = ("_count",)

    def __init__(self):
        self._count = 0

    def add(self, count) -> None:
        self._count = self._count + count

    @property
    def retried(self) -> int:
        return int(self._count)


def repaired_cholesky(matrix: torch.Tensor):
    """-> (lower Cholesky factor of symmetric PSD matrices [..., k, k], how many of them were
    retried: an int, or where the host must not read values (`capture.host_reads_forbidden`)
    a 0-d tensor).

    `cholesky_ex` never raises; matrices whose factorisation failed (info != 0, e.g.
    rounding pushed an eigenvalue below zero) are retried with a ridge that grows tenfold
    each time, from 10 * a. Only the failed ones change, so every healthy matrix gets
    exactly the published value. Eager code retries while any fails (up to MAX_RETRIES,
    checked on the host); under torch.compile or CUDA graph capture COMPILED_RETRIES
    retries always run, without a check (the last with a ridge that cannot fail).
    """
    if capture.host_reads_forbidden(matrix.device):
        return _cholesky_fixed_retries(matrix)
    factor, info = torch.linalg.cholesky_ex(matrix)
    failed = info != 0
    if not bool(failed.any()):
        return factor, 0
    eye = torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
    ridge = torch.zeros(matrix.shape[:-2], dtype=matrix.dtype, device=matrix.device)
    ridge = torch.where(failed, RIDGE, ridge)
    for _ in range(MAX_RETRIES):
        ridge = torch.where(failed, ridge * RETRY_GROWTH, ridge)
        factor, info = torch.linalg.cholesky_ex(matrix + ridge[..., None, None] * eye)
        failed = info != 0
        if not bool(failed.any()):
            break
    # Still failing: non-finite statistics (non-finite logits with validate=False), which no
    # ridge repairs. Their factors are NaN, so the loss is NaN as any loss of NaN input is
    # (and as under torch.compile); they are not counted as repairs.
    factor = factor.masked_fill(failed[..., None, None], float("nan"))
    return factor, int(((ridge > 0) & ~failed).sum())


def _cholesky_fixed_retries(matrix: torch.Tensor):
    """The same repair without data-dependent branches, for torch.compile and CUDA graphs: a fixed
    number of retries, each replacing only the factors that have failed so far. The last one
    takes the ridge up the same ladder, a * 10^k, to at least the matrix's largest absolute row
    sum plus a: the matrix is then strictly diagonally dominant with a positive diagonal
    (eigenvalues >= a), so every finite one factorises, where eager code would go on growing
    the ridge. (A ridge on the ladder is piecewise constant in the matrix: the closed-form
    gradient, which holds it constant, stays the derivative.)
    -> (factor, retried count as a 0-d tensor)."""
    eye = torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
    factor, info = torch.linalg.cholesky_ex(matrix)
    ridge = torch.zeros(matrix.shape[:-2], dtype=matrix.dtype, device=matrix.device)
    for retry_number in range(1, COMPILED_RETRIES + 1):
        failed = info != 0
        grown = torch.where(ridge > 0, ridge, RIDGE) * RETRY_GROWTH
        if retry_number == COMPILED_RETRIES:
            grown = torch.maximum(grown, _dominating_ridge(matrix))
        ridge = torch.where(failed, grown, ridge)
        retry, retry_info = torch.linalg.cholesky_ex(matrix + ridge[..., None, None] * eye)
        factor = torch.where(failed[..., None, None], retry, factor)
        info = torch.where(failed, retry_info, info)
    return factor, (ridge > 0).sum()


def _dominating_ridge(matrix: torch.Tensor) -> torch.Tensor:
    """[...]: the smallest ridge a * RETRY_GROWTH^k at least each matrix's largest absolute row
    sum plus a."""
    rungs = torch.ceil(torch.log((matrix.abs().sum(-1).amax(-1) + RIDGE) / RIDGE) / math.log(RETRY_GROWTH))
    return RIDGE * torch.pow(RETRY_GROWTH, rungs)


def half_logdet_posterior(sy: torch.Tensor, sp: torch.Tensor, syp: torch.Tensor,
                          report: CholeskyReport | None = None, then=None, joint: torch.Tensor | None = None):
    """h = sum_i log(diag(chol(V + aI))_i + 1e-8), V = Sy - Syp (Sp + aI)^-1 Syp^T.

    sy, sp, syp: [..., d, d] float64 centred sums (not divided by the count)
    then:        optional function of h, whose result is returned instead of h. In eager
                 mode its ops are queued before the factorisation is checked (the step's one
                 host sync), so that the host does not queue them while the device waits; if
                 the factorisation failed, it is called again on the repaired h.
    joint:       optional [..., 2d, 2d] float64 [[Sp + aI, Syp^T], [Syp, Sy + aI]] with the
                 same values (an engine that writes it with the statistics saves the ops
                 that build it here); not differentiated
    returns:     [...] float64 (or then(h)), differentiable with respect to sy, sp and syp

    One factorisation of the joint matrix [[Sp + aI, Syp^T], [Syp, Sy + aI]] gives both
    factors: its first d columns are chol(Sp + aI) and Z^T = (L^-1 Syp^T)^T, its last block
    chol(Sy + aI - Z^T Z) = chol(V + aI). It is a Gram matrix plus aI, so it fails only where
    rounding of the statistics exceeds the ridge; those joint matrices are factorised again
    with `repaired_cholesky`'s growing ridge (on the whole diagonal: Sp's ridge grows with
    V's). The gradient is the closed form of `_HalfLogdetPosterior` (a handful of batched
    d x d products, where autograd would run the backward of every factorisation), in eager
    mode, under torch.compile and in a captured CUDA graph alike; in the last two the
    repair's retries run without a check (and a captured graph counts none).
    """
    if then is None:
        then = _same
    if joint is None:
        joint = joint_matrix(sy.detach(), sp.detach(), syp.detach())
    if capture.host_reads_forbidden(joint.device):
        h, retried = _posterior(sy, sp, syp, joint, repaired_cholesky)
        if report is not None and not capture.capturing(joint.device):
            report.add(retried)
        return then(h)
    h, info = _posterior(sy, sp, syp, joint, torch.linalg.cholesky_ex)
    out = then(h)
    if _all_factored(info):
        return out
    h, retried = _posterior(sy, sp, syp, joint, repaired_cholesky)  # rare: the repairs
    if report is not None:
        report.add(retried)
    return then(h)


def _same(h):
    return h


def _all_factored(info) -> bool:
    """Whether every factorisation succeeded: the step's one host sync (eager mode)."""
    return not bool(info.any())


def _posterior(sy, sp, syp, joint, factorise):
    """-> (h, what factorise(joint) returned beside the factor: cholesky_ex's info, or the
    retried count), differentiable with respect to sy, sp and syp where grad mode needs it."""
    if torch.is_grad_enabled() and (sy.requires_grad or sp.requires_grad or syp.requires_grad):
        return _HalfLogdetPosterior.apply(sy, sp, syp, joint, factorise)
    factor, aside = factorise(joint)
    return _half_logdet(*_blocks(factor, sy.shape[-1]))[0], aside


def _blocks(factor, d: int):
    """The joint matrix's factor -> (chol(Sp + aI), Z = L^-1 Syp^T, chol(V + aI))."""
    return factor[..., :d, :d], factor[..., d:, :d].transpose(-1, -2), factor[..., d:, d:]


def _half_logdet(chol_p, z, chol_v, extra=None):
    """-> (h, extra(chol_p, z, chol_v, shifted) or None), shifted = diag(chol_v) + eps (h's
    terms before the log, which the closed-form gradient shares)."""
    shifted = torch.diagonal(chol_v, dim1=-2, dim2=-1) + LOG_EPS
    return torch.log(shifted).sum(-1), (extra(chol_p, z, chol_v, shifted) if extra is not None else None)


def joint_matrix(sy, sp, syp):
    """[[Sp + aI, Syp^T], [Syp, Sy + aI]] [..., 2d, 2d], the matrix `half_logdet_posterior`
    factorises (an engine may write it with the statistics and pass it as `joint`)."""
    joint = torch.cat([torch.cat([sp, syp.transpose(-1, -2)], -1), torch.cat([syp, sy], -1)], -2)
    joint.diagonal(dim1=-2, dim2=-1).add_(RIDGE)
    return joint


class _HalfLogdetPosterior(torch.autograd.Function):
    """h's gradient in closed form. With L = chol(V + aI), dh/dL is diagonal, 1 / (L_ii + eps),
    so the Cholesky backward gives dh/dV = L^-T diag(q) L^-1, q_i = L_ii / (2 (L_ii + eps)):
    symmetric, and so dh/dSy. With Y = (Sp + aI)^-1 Syp^T, V = Sy - Syp Y gives
    dh/dSyp = -2 dh/dV Y^T and dh/d(Sp + aI) = Y dh/dV Y^T. Where a factorisation needed a
    larger ridge, the factors are those of the repaired matrix (its ridge a constant), as
    autograd would see. The gradients of h itself are formed in the forward, before the
    factorisation's check, so that their ops queue behind the engine's kernels; the backward
    scales them by dL/dh (and by `_UNIT_FACTORS`, in the same op).
    -> (h, what factorise(joint) returned beside the factor; not differentiable)."""

    @staticmethod
    def forward(ctx, sy, sp, syp, joint, factorise):
        needs = ctx.needs_input_grad[:3]
        factor, aside = factorise(joint)
        unit = (lambda *factors: _unit_gradients(*factors, needs)) if any(needs) else None
        h, grads = _half_logdet(*_blocks(factor, sy.shape[-1]), unit)
        if isinstance(aside, torch.Tensor):  # eager repairs count in an int
            ctx.mark_non_differentiable(aside)
        ctx.save_for_backward(*(grads or ()))
        ctx.set_materialize_grads(False)  # no zeros made for the (absent) gradient of `aside`
        return h, aside

    @staticmethod
    @once  # a second derivative raises instead of coming out partial
    def backward(ctx, grad, _grad_aside):
        if grad is None:
            return (None,) * 5
        scale, zero = grad[..., None, None], _constant(_zero, grad.dtype, grad.device)
        return tuple(None if g is None else torch.addcmul(zero, scale, g, value=factor)
                     for g, factor in zip(ctx.saved_tensors, _UNIT_FACTORS)) + (None, None)


# `_unit_gradients` forms 2 dh/dSy, 2 dh/dSp and -dh/dSyp (two ops fewer than the gradients
# themselves); the backward's scaling by dL/dh multiplies by these factors in the same op
_UNIT_FACTORS = (0.5, 0.5, -1.0)


def _unit_gradients(chol_p, z, chol_v, shifted, needs):
    """2 dh/dSy, 2 dh/dSp and -dh/dSyp (None where `needs` is false), from the factors and
    shifted = diag(chol(V + aI)) + eps."""
    diag = torch.diagonal(chol_v, dim1=-2, dim2=-1)
    inverse = torch.linalg.solve_triangular(chol_v, _constant(_identity, diag.shape[-1], diag.dtype,
                                                               diag.device).expand_as(chol_v), upper=False)  # L^-1
    g_v2 = inverse.transpose(-1, -2) @ ((diag / shifted).unsqueeze(-1) * inverse)  # 2 dh/dV: 2 q = L_ii / (L_ii + eps)
    if not (needs[1] or needs[2]):
        return g_v2, None, None
    y = torch.linalg.solve_triangular(chol_p.transpose(-1, -2), z, upper=True)  # (Sp + aI)^-1 Syp^T
    g_syp_neg = g_v2 @ y.transpose(-1, -2)  # 2 dh/dV Y^T = -dh/dSyp
    g_sp2 = y @ g_syp_neg if needs[1] else None  # 2 Y dh/dV Y^T
    return g_v2 if needs[0] else None, g_sp2, g_syp_neg if needs[2] else None


def _constant(make, *args) -> torch.Tensor:
    """make(*args) (its last argument a device) from its cache; under torch.compile or CUDA
    graph capture made in the graph: the compiler would trace through the cache, and a tensor
    first made in a capture holds its values only once the graph is replayed."""
    return make.__wrapped__(*args) if capture.host_reads_forbidden(args[-1]) else make(*args)


@functools.lru_cache(maxsize=32)
def _identity(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The n x n identity, made once per size, dtype and device (read only: one op a step fewer)."""
    return torch.eye(n, dtype=dtype, device=device)


@functools.lru_cache(maxsize=32)
def _zero(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A 0-d zero, made once per dtype and device (read only): addcmul's addend."""
    return torch.zeros((), dtype=dtype, device=device)
