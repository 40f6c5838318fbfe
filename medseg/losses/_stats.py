"""Fused per-(batch item, channel) sums behind the focal, Dice and cross-entropy losses.

Each loss of this package reduces a full-size ``(B, C, N)`` tensor to a few numbers per (item, channel):
the focal sums, and the Dice intersection / prediction / target sums. :func:`region_stats` computes all of
them from ONE activation (log-sigmoid or log-softmax) in a single pass, and its backward recomputes the
activation and writes the gradient from closed-form expressions, so that:

- no intermediate full-size tensor is kept for backward (only the logits and the target, which exist
  anyway; int64 class indices in softmax mode), and the temporaries live for one chunk of the volume at a
  time: peak memory is the gradient plus a few MB;
- the arithmetic is float32 (float64 for float64 logits) whatever the logits' dtype, chunk by chunk, so
  bf16 logits are never copied whole to float32.

The losses then form focal, Dice, balanced CE ... from the ``(B, C)`` sums with ordinary autograd, where
weights (alpha, lambdas), background exclusion and batch Dice are cheap and easy to read.

Per voxel, with logit ``x``, target ``t``, ``p = sigmoid(x)`` (or ``p_c = softmax(x)_c``) and ``q = 1 - p``:

================  =================================================  ===================================
sum               sigmoid                                            softmax
================  =================================================  ===================================
``focal_pos``     ``t * q**gamma * -log(p)``                         ``t_c * q_c**gamma * -log(p_c)``
``focal_neg``     ``(1 - t) * p**gamma * -log(1 - p)``               (none)
``intersection``  ``p * t``                                          ``p_c * t_c``
``pred_sum``      ``p`` (``p**2`` if squared)                        ``p_c`` (``p_c**2``)
``target_sum``    ``t`` (``t**2`` if squared)                        ``t_c`` (``t_c**2``)
================  =================================================  ===================================

Gradients (derived by hand, checked with ``torch.autograd.gradcheck`` in the tests), per voxel:

- sigmoid: ``d focal_pos/dx = -t q**gamma (gamma p (-log p) + q)``,
  ``d focal_neg/dx = (1 - t) p**gamma (p + gamma q (-log q))``, ``d p/dx = p q``.
- softmax: with ``u_c = p_c * dL/dp_c``, ``dL/dx_k = u_k - p_k sum_c u_c``, and for the focal term
  ``u_c = -g t_c q_c**gamma (1 - gamma p_c log(p_c) / q_c)``, where ``p log(p) / q -> -1`` as ``q -> 0``
  (handled explicitly, so logits of magnitude 100 give finite gradients for every gamma >= 0).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from medseg.losses._inputs import Batch, Mode, compute_dtype

# Elements per chunk (B * C * chunk length): a trade-off between memory (temporaries of one chunk), cache
# reuse (small chunks) and the number of ops (each multi-threaded op on a CPU shared with other processes
# may wait milliseconds for a descheduled worker thread). Measured for (2, 4, 128^3) softmax on 2 busy
# cores, forward + backward: 1 thread 0.44 s at 2^19, 0.74 s at 2^22; 2 threads 7.0 s at 2^19, 1.1-2.0 s
# at 2^22 (MONAI DiceFocalLoss: 2.6 s). GPU: large enough to fill the device, launches negligible.
_CHUNK_ELEMENTS = {"cpu": 1 << 22, "cuda": 1 << 23}
_DEFAULT_CHUNK = 1 << 20


@dataclass(frozen=True)
class RegionStats:
    """Per-(batch item, channel) sums, each ``(B, C)`` in the compute dtype (see the module docstring).

    Attributes:
        focal_pos: focal sum over the positive part (softmax: the whole focal sum per class), or None.
        focal_neg: sigmoid focal sum over the negative part; None in softmax mode or when not computed.
        intersection: ``sum p t``, or None when Dice was not requested.
        pred_sum: ``sum p`` (``sum p**2`` if squared), or None.
        target_sum: ``sum t`` (``sum t**2`` if squared), never None (also used by balanced CE).
        num_voxels: ``N``, the number of voxels per (item, channel).
    """

    focal_pos: Tensor | None
    focal_neg: Tensor | None
    intersection: Tensor | None
    pred_sum: Tensor | None
    target_sum: Tensor
    num_voxels: int


def region_stats(batch: Batch, mode: Mode, gamma: float = 0.0, focal: bool = True, dice: bool = True, squared: bool = False) -> RegionStats:
    """The fused sums for a prepared batch.

    Args:
        batch: logits and target from :func:`medseg.losses._inputs.prepare`.
        mode: ``"sigmoid"`` or ``"softmax"``.
        gamma: focal exponent (0 gives the cross-entropy sums).
        focal: compute ``focal_pos`` / ``focal_neg``.
        dice: compute ``intersection`` and ``pred_sum``.
        squared: ``pred_sum`` / ``target_sum`` of squares (the V-Net Dice denominator).

    Returns:
        The :class:`RegionStats`, differentiable with respect to ``batch.logits``.
    """
    if mode == "sigmoid":
        fpos, fneg, inter, psum, tsum = _SigmoidSums.apply(batch.logits, batch.target, gamma, focal, dice, squared)
    elif batch.indices:
        fpos, inter, psum, tsum = _SoftmaxIndexSums.apply(batch.logits, batch.target, gamma, focal, dice, squared)
        fneg = None
    else:
        fpos, inter, psum, tsum = _SoftmaxDenseSums.apply(batch.logits, batch.target, gamma, focal, dice, squared)
        fneg = None
    return RegionStats(
        focal_pos=fpos if focal else None,
        focal_neg=fneg if focal else None,
        intersection=inter if dice else None,
        pred_sum=psum if dice else None,
        target_sum=tsum,
        num_voxels=batch.logits.shape[-1],
    )


def _chunks(logits: Tensor) -> Iterator[slice]:
    """Slices of the voxel axis of ``(B, C, N)`` logits, about ``_CHUNK_ELEMENTS`` elements each."""
    rows, length = logits.shape[0] * logits.shape[1], logits.shape[-1]
    step = max(1, _CHUNK_ELEMENTS.get(logits.device.type, _DEFAULT_CHUNK) // max(rows, 1))
    for start in range(0, length, step):
        yield slice(start, min(start + step, length))


def _pow(base: Tensor, gamma: float) -> Tensor:
    """``base ** gamma`` as a new tensor; gamma = 0 gives 1 even where base is 0."""
    return torch.ones_like(base) if gamma == 0 else base.pow(gamma)  # pow special-cases 0.5, 2, 3


def _pow_(fresh: Tensor, gamma: float) -> Tensor:
    """``fresh ** gamma`` in place, for a temporary that is not needed afterwards."""
    return fresh.fill_(1) if gamma == 0 else fresh.pow_(gamma)


def _neg_log_sigmoids(x: Tensor) -> tuple[Tensor, Tensor]:
    """``(-log p, -log(1 - p))`` for ``p = sigmoid(x)``, both without cancellation for any ``x``."""
    shared = x.abs().neg_().exp_().log1p_()  # log(1 + exp(-|x|))
    return shared - x.clamp(max=0), shared + x.clamp(min=0)


def _grad(grad: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """An upstream ``(B, C)`` gradient as ``(B, C, 1)`` for broadcasting over voxels."""
    return None if grad is None else grad.to(dtype).unsqueeze(-1)


def _finish(ctx, sums: Tensor, dtype: torch.dtype) -> tuple[Tensor, ...]:
    out = tuple(s.to(dtype) for s in sums.unbind(0))
    ctx.mark_non_differentiable(out[-1])  # target_sum
    ctx.set_materialize_grads(False)
    return out


def _chunked_forward(ctx, sums_fn, n_sums: int, logits: Tensor, target: Tensor, cast_target: bool, gamma: float, focal: bool, dice: bool, squared: bool) -> tuple[Tensor, ...]:
    """Accumulate ``sums_fn`` over chunks of the volume into ``(n_sums, B, C)`` float64 sums; keep only the
    logits and the target for backward. ``cast_target``: the target is converted to the compute dtype per
    chunk (dense targets); class indices stay integers."""
    dtype = compute_dtype(logits.dtype)
    sums = logits.new_zeros((n_sums, *logits.shape[:2]), dtype=torch.float64)  # accumulators
    for sl in _chunks(logits):
        chunk = target[..., sl].to(dtype) if cast_target else target[..., sl]
        sums += sums_fn(logits[..., sl].to(dtype), chunk, gamma, focal, dice, squared)
    ctx.save_for_backward(logits, target)
    ctx.options = (gamma, focal, dice, squared, cast_target)
    return _finish(ctx, sums, dtype)


def _chunked_backward(ctx, grad_fn, focal_grads: tuple, dice_grads: tuple) -> tuple:
    """The logits' gradient chunk by chunk from the upstream gradients of the sums (``None`` when unused)."""
    logits, target = ctx.saved_tensors
    gamma, focal, dice, squared, cast_target = ctx.options
    dtype = compute_dtype(logits.dtype)
    focal_grads = tuple(_grad(g, dtype) if focal else None for g in focal_grads)  # (B, C, 1) or None
    dice_grads = tuple(_grad(g, dtype) if dice else None for g in dice_grads)
    grad = torch.empty_like(logits)
    for sl in _chunks(logits):
        chunk = target[..., sl].to(dtype) if cast_target else target[..., sl]
        grad[..., sl] = grad_fn(logits[..., sl].to(dtype), chunk, gamma, squared, *focal_grads, *dice_grads)
    return grad, None, None, None, None, None


class _SigmoidSums(torch.autograd.Function):
    """(focal_pos, focal_neg, intersection, pred_sum, target_sum) for sigmoid logits ``(B, C, N)``."""

    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, gamma: float, focal: bool, dice: bool, squared: bool):
        return _chunked_forward(ctx, _sigmoid_sums, 5, logits, target, True, gamma, focal, dice, squared)

    @staticmethod
    @once_differentiable
    def backward(ctx, g_pos, g_neg, g_inter, g_pred, _g_tsum):
        return _chunked_backward(ctx, _sigmoid_grad, (g_pos, g_neg), (g_inter, g_pred))


def _sigmoid_sums(x: Tensor, t: Tensor, gamma: float, focal: bool, dice: bool, squared: bool) -> Tensor:
    """The five sums ``(5, B, C)`` of one chunk ``(B, C, n)`` (zeros for those not requested)."""
    sums = x.new_zeros((5, *x.shape[:2]))
    p = torch.sigmoid(x)  # (B, C, n)
    if focal:
        nlp, sp = _neg_log_sigmoids(x)  # -log p, -log(1 - p)
        pos = _pow_(1 - p, gamma).mul_(nlp)  # q**gamma * -log p
        sums[0] = pos.mul_(t).sum(-1)
        del pos, nlp
        neg = _pow(p, gamma).mul_(sp)  # p**gamma * -log(1 - p)
        sums[1] = neg.sum(-1) - neg.mul_(t).sum(-1)
        del neg, sp
    if dice:
        sums[2] = (p * t).sum(-1)
        sums[3] = (p * p).sum(-1) if squared else p.sum(-1)
    sums[4] = (t * t).sum(-1) if squared else t.sum(-1)
    return sums


def _sigmoid_grad(x: Tensor, t: Tensor, gamma: float, squared: bool, g_pos, g_neg, g_inter, g_pred) -> Tensor:
    """d(loss)/dx for one chunk ``(B, C, n)`` from the upstream ``(B, C, 1)`` gradients of the sums."""
    p = torch.sigmoid(x)
    q = 1 - p
    dp = p * q  # dp/dx
    nlp, sp = _neg_log_sigmoids(x) if g_pos is not None or g_neg is not None else (None, None)
    # d/dx = t * on_pos + (1 - t) * on_neg + base, each (B, C, n) or None
    on_pos = on_neg = base = None
    if g_pos is not None:  # -g q**gamma (gamma p (-log p) + q)
        on_pos = _pow(q, gamma).mul_(torch.addcmul(q, p, nlp, value=gamma)).mul_(-g_pos)
    del nlp
    if g_inter is not None:
        on_pos = dp * g_inter if on_pos is None else on_pos.addcmul_(dp, g_inter)
    if g_neg is not None:  # g p**gamma (p + gamma q (-log q))
        on_neg = _pow(p, gamma).mul_(torch.addcmul(p, q, sp, value=gamma)).mul_(g_neg)
    del sp, q
    if g_pred is not None:
        base = dp.mul_(p).mul_(2 * g_pred) if squared else dp.mul_(g_pred)
    del dp, p
    if on_neg is not None:
        total = (on_neg.neg() if on_pos is None else on_pos.sub_(on_neg)).mul_(t).add_(on_neg)
    else:
        total = None if on_pos is None else on_pos.mul_(t)
    if base is not None:
        total = base if total is None else total.add_(base)
    return torch.zeros_like(x) if total is None else total


class _SoftmaxIndexSums(torch.autograd.Function):
    """(focal, intersection, pred_sum, target_sum) for softmax logits ``(B, C, N)``, indices ``(B, 1, N)``."""

    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, gamma: float, focal: bool, dice: bool, squared: bool):
        return _chunked_forward(ctx, _softmax_index_sums, 4, logits, target, False, gamma, focal, dice, squared)

    @staticmethod
    @once_differentiable
    def backward(ctx, g_focal, g_inter, g_pred, _g_tsum):
        return _chunked_backward(ctx, _softmax_index_grad, (g_focal,), (g_inter, g_pred))


def _softmax_index_sums(x: Tensor, y: Tensor, gamma: float, focal: bool, dice: bool, squared: bool) -> Tensor:
    """The four sums ``(4, B, C)`` of one chunk: logits ``(B, C, n)``, class indices ``(B, 1, n)``."""
    sums = x.new_zeros((4, *x.shape[:2]))
    logp = torch.log_softmax(x, dim=1)  # (B, C, n)
    onehot = y == torch.arange(x.shape[1], device=x.device).view(1, -1, 1)  # (B, C, n) bool
    if focal:
        logp_y = logp.gather(1, y)  # (B, 1, n)
        f = _pow_(-torch.expm1(logp_y), gamma).mul_(logp_y)  # -(q_y**gamma * -log p_y)
        sums[0] = -(onehot * f).sum(-1)
        del f, logp_y
    if dice:
        p = logp.exp_()  # (B, C, n)
        sums[1] = (onehot * p).sum(-1)
        sums[2] = (p * p).sum(-1) if squared else p.sum(-1)
    sums[3] = onehot.sum(-1)
    return sums


def _softmax_index_grad(x: Tensor, y: Tensor, gamma: float, squared: bool, g_focal, g_inter, g_pred) -> Tensor:
    """d(loss)/dx for one chunk ``(B, C, n)`` with class indices ``(B, 1, n)``."""
    logp = torch.log_softmax(x, dim=1)  # (B, C, n)
    logp_y = logp.gather(1, y)  # (B, 1, n)
    p = logp.exp_()  # (B, C, n)
    p_y = logp_y.exp()  # (B, 1, n)
    # u_c = p_c dL/dp_c = v_c + [c == y] s, then dL/dx = u - p * sum_c u_c
    s = torch.zeros_like(p_y)  # (B, 1, n)
    if g_focal is not None:
        q_y = -torch.expm1(logp_y)
        s -= _at(g_focal, y) * _pow(q_y, gamma) * (1 - gamma * _plogp_over_q(p_y, logp_y, q_y))
    if g_inter is not None:
        s += _at(g_inter, y) * p_y
    if g_pred is not None:
        v = p * p * (2 * g_pred) if squared else p * g_pred  # (B, C, n)
        g = v.addcmul_(p, s + v.sum(1, keepdim=True), value=-1)
    else:
        g = p.mul_(-s)
    return g.scatter_add_(1, y, s)


class _SoftmaxDenseSums(torch.autograd.Function):
    """(focal, intersection, pred_sum, target_sum) for softmax logits and a one-hot/soft target ``(B, C, N)``."""

    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, gamma: float, focal: bool, dice: bool, squared: bool):
        return _chunked_forward(ctx, _softmax_dense_sums, 4, logits, target, True, gamma, focal, dice, squared)

    @staticmethod
    @once_differentiable
    def backward(ctx, g_focal, g_inter, g_pred, _g_tsum):
        return _chunked_backward(ctx, _softmax_dense_grad, (g_focal,), (g_inter, g_pred))


def _softmax_dense_sums(x: Tensor, t: Tensor, gamma: float, focal: bool, dice: bool, squared: bool) -> Tensor:
    """The four sums ``(4, B, C)`` of one chunk: logits and one-hot/soft target ``(B, C, n)``."""
    sums = x.new_zeros((4, *x.shape[:2]))
    logp = torch.log_softmax(x, dim=1)  # (B, C, n)
    if focal:
        f = _pow_(-torch.expm1(logp), gamma).mul_(logp)  # -(q**gamma * -log p)
        sums[0] = -f.mul_(t).sum(-1)
        del f
    if dice:
        p = logp.exp_()
        sums[1] = (p * t).sum(-1)
        sums[2] = (p * p).sum(-1) if squared else p.sum(-1)
    sums[3] = (t * t).sum(-1) if squared else t.sum(-1)
    return sums


def _softmax_dense_grad(x: Tensor, t: Tensor, gamma: float, squared: bool, g_focal, g_inter, g_pred) -> Tensor:
    """d(loss)/dx for one chunk: logits and one-hot/soft target ``(B, C, n)``."""
    logp = torch.log_softmax(x, dim=1)  # (B, C, n)
    p = logp.exp()  # (B, C, n)
    u = torch.zeros_like(p)  # u_c = p_c dL/dp_c, then dL/dx = u - p * sum_c u_c
    if g_focal is not None:
        q = -torch.expm1(logp)
        u -= g_focal * t * _pow(q, gamma) * (1 - gamma * _plogp_over_q(p, logp, q))
    if g_inter is not None:
        u += g_inter * t * p
    if g_pred is not None:
        u += g_pred * (2 * p * p if squared else p)
    return u.addcmul_(p, u.sum(1, keepdim=True), value=-1)


def _at(per_class: Tensor, index: Tensor) -> Tensor:
    """``per_class[b, index[b, 0, n]]`` for a ``(B, C, 1)`` tensor and indices ``(B, 1, n)``: ``(B, 1, n)``."""
    return per_class.squeeze(-1).gather(1, index.squeeze(1)).unsqueeze(1)


def _plogp_over_q(p: Tensor, logp: Tensor, q: Tensor) -> Tensor:
    """``p log(p) / q``, which tends to -1 as ``q = 1 - p`` tends to 0 (where it would be 0 / 0)."""
    safe_q = torch.where(q > 0, q, torch.ones_like(q))
    return torch.where(q > 0, p * logp / safe_q, -torch.ones_like(q))
