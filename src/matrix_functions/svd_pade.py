"""SVD-Pade (Song, Sebe, Wang, "Why Approximate Matrix Square Root Outperforms Accurate SVD in Global
Covariance Pooling?", ICCV 2021), as the authors' code computes it (KingJamesSong/DifferentiableSVD,
src/representation/SVD_Pade.py).

Forward, in float64 from the features on (the authors' point is the data precision): the covariance
Sigma = X Ihat X^T, its eigendecomposition Sigma = V diag(lambda) V^T, the singular values
s = max(|lambda|, eps64) (the authors clamp torch.svd's singular values at float64's eps; for a
symmetric matrix they are |lambda| with the same V), and V diag(s)^1/2 V^T, returned in float32. No
trace or Frobenius pre-normalisation and no post-compensation: the root is exact.

Backward, in float64: the eigendecomposition's backward V (K^T o (V^T dl/dV) + diag(dl/ds)) V^T,
where K_ij = 1/(s_i - s_j) is computed as (1/max(s_i, s_j)) f(min(s_i/s_j, s_j/s_i)) with f the
[50/50] Pade approximant of the geometric series 1/(1 - x) built from its degree-100 Taylor series
(mpmath ``taylor`` and ``pade`` at 20 digits, derived here at first use as the authors' code does).
Non-finite entries are clamped as theirs are: +Inf to the largest finite value of the batch, -Inf
to the smallest, in K, in the product before V.V^T and after it, and in dl/dX (where NaN becomes 0).

A finding worth knowing: 1/(1 - x) is itself rational, so its [50/50] Pade approximant is exactly
1/(1 - x); mpmath returns one of the degenerate solutions P = R, Q = (1 - x) R. In float64 it
equals 1/(1 - x) to 4e-10 relative on [0, 1) and keeps the pole at x = 1 (equal singular values,
e.g. several clamped at eps), where the Inf clamping takes over. So SVD-Pade's K is the exact
1/(s_i - s_j) up to that clamping; tests/test_sqrt_methods.py measures both facts.

The decomposition is MindSpore's ``Eigh`` (the primitive of mindspore.scipy.linalg.eigh, "Supported
Platforms: GPU, CPU"; the GPU plugin registers EighGpuKernelMod for float and double, not run here),
one call per sample: it takes 2-D input only, and it is about 6x faster than the batched ``ops.svd``
(Ascend, GPU, CPU) in float64 on CPU. No Ascend kernel: the registry refuses svd_pade there. A
non-finite sample is decomposed as I (eigensolvers may fail on NaN) and returns NaN, so the training
step skips it as it does for ns.

The Cell takes the (B, C, H, W) feature map (the covariance must be formed in float64 inside the one
Cell: mixed precision casts float64 inputs of float32-flagged cells down) and returns the (B, C, C)
square root in float32 (its input's dtype).
"""
import functools

import numpy as np
import mindspore as ms
from mindspore import nn, ops, Tensor
from mindspore.ops.operations.linalg_ops import Eigh

from src.matrix_functions.common import (centred, centred_covariance, check_feature_map, covariance_backward,
                                         restore, to_float32)

PADE_ORDER = 50  # [50/50], from the degree-100 Taylor series of 1/(1 - x)
EPS64 = float(np.finfo(np.float64).eps)  # the authors' clamp: torch.finfo(float64).eps


@functools.lru_cache(maxsize=None)
def geometric_pade_coefficients(order=PADE_ORDER, digits=20):
    """(p, q): the [order/order] Pade approximant of 1/(1 - x) from its degree-2*order Taylor series,
    as the authors derive it (mpmath at 20 digits); float tuples, q_0 = 1."""
    import mpmath  # pylint: disable=import-outside-toplevel
    with mpmath.workdps(digits):
        a = mpmath.taylor(lambda x: 1 / (1 - x), 0, 2 * order)
        p, q = mpmath.pade(a, order, order)
        return tuple(float(v) for v in p), tuple(float(v) for v in q)


_reduce_max = ops.ReduceMax()  # over all axes; Tensor.max() builds a Tensor inside, which broke TrainStep's graph
_reduce_min = ops.ReduceMin()


def _clamp_inf(x):
    """+Inf -> the largest finite value of the whole tensor, -Inf -> the smallest (the authors' check)."""
    finite = ops.isfinite(x)
    big = _reduce_max(ops.where(finite, x, ops.zeros_like(x) - np.inf))
    small = _reduce_min(ops.where(finite, x, ops.zeros_like(x) + np.inf))
    x = ops.where(x == np.inf, big, x)
    return ops.where(x == -np.inf, small, x)


def _split(t):
    """A float64 tensor as two float32 ones, hi + lo (48 significant bits): under mixed precision a
    custom bprop receives its forward's outputs cast to float32, which must not round V and s."""
    hi = ops.cast(t, ms.float32)
    return hi, ops.cast(t - ops.cast(hi, ms.float64), ms.float32)


def _join(hi, lo):
    return ops.cast(hi, ms.float64) + ops.cast(lo, ms.float64)


class _SvdPadeFn(nn.Cell):
    """(B, C, H, W) float32 -> (root (B, C, C) float32, V and s as float32 pairs (``_split``)) with the
    float64 backward, which centres X again (one matrix-vector product) rather than keep it."""

    def __init__(self):
        super().__init__()
        p, q = geometric_pade_coefficients()
        # (p_k, q_k) as float64 Tensors of shape (2, 1, 1, 1): P and Q are summed together (half the
        # kernels), and MindSpore would round Python float operands to float32, while Q(r) near r = 1 is
        # a sum of terms ~1 cancelling to ~1e-5.
        self.pq = tuple(Tensor(np.array([pk, qk]).reshape(2, 1, 1, 1), ms.float64) for pk, qk in zip(p, q))
        self.mm = ops.BatchMatMul()
        self.mm_ta = ops.BatchMatMul(transpose_a=True)
        self.mm_tb = ops.BatchMatMul(transpose_b=True)
        self.eigh = Eigh()
        self.eye = ops.Eye()

    def construct(self, x):
        sigma, _ = centred_covariance(ops.cast(x, ms.float64), self.mm, self.mm_tb)
        b, d, _ = sigma.shape
        # A non-finite sample is decomposed as I (LAPACK-style solvers may fail on NaN) and returns NaN.
        finite = ops.isfinite(sigma.reshape(b, -1).sum(axis=1)).reshape(b, 1, 1)
        sigma = ops.where(finite, sigma, ops.broadcast_to(self.eye(d, d, ms.float64), (b, d, d)))
        lams = ()
        vecs = ()
        for i in range(b):
            lam, vec = self.eigh(sigma[i])
            lams = lams + (lam,)
            vecs = vecs + (vec,)
        v = ops.stack(vecs)
        s = ops.maximum(ops.abs(ops.stack(lams)), EPS64)
        y = self.mm_tb(v * ops.sqrt(s).expand_dims(1), v)
        y = ops.where(finite, y, y * np.nan)
        return (ops.cast(y, ms.float32),) + _split(v) + _split(s)

    def pade_k(self, s):
        """K_ij ~ 1/(s_i - s_j) (0 on the diagonal) by the authors' Pade approximant, clamped."""
        b, d = s.shape
        si = s.expand_dims(2)
        sj = s.expand_dims(1)
        eye = self.eye(d, d, ms.float64)
        r = si / sj - eye
        r = ops.where(r < 1.0, r, 1.0 / r)
        scale = (1.0 - eye) / ops.where(si >= sj, si, -sj)
        # Power sums in the authors' order: at r = 1 their float64 sum of q is exactly 0 (the pole), which
        # another order (Horner) would round to a tiny number and a huge finite K that escapes the clamp.
        ones = ops.ones_like(r)
        pq = ones * self.pq[0]
        rk = ones
        for k in range(1, len(self.pq)):
            rk = rk * r
            pq = pq + rk * self.pq[k]
        return _clamp_inf(scale * (pq[0] / pq[1]))

    def bprop(self, x, out, dout):
        g = ops.cast(dout[0], ms.float64)
        v, s = _join(out[1], out[2]), _join(out[3], out[4])
        xc = centred(ops.cast(x, ms.float64), self.mm)
        root = ops.sqrt(s)
        # V diag(s)^1/2 V^T: dl/dV = (G + G^T) V diag(s)^1/2, dl/ds = diag(V^T G V) / (2 sqrt(s)).
        gv = self.mm(g, v)
        dv = self.mm(g + g.transpose(0, 2, 1), v) * root.expand_dims(1)
        ds = (v * gv).sum(axis=1) * 0.5 / root
        inner = self.pade_k(s).transpose(0, 2, 1) * self.mm_ta(v, dv) + ops.diag_embed(ds)
        ga = _clamp_inf(self.mm_tb(self.mm(v, _clamp_inf(inner)), v))
        dx = _clamp_inf(covariance_backward(ga, xc, x.shape, self.mm))
        dx = ops.where(ops.isnan(dx), ops.zeros_like(dx), dx)
        return (ops.cast(dx, ms.float32),)


class SvdPade(nn.Cell):
    """Square root of the covariance of a (B, C, H, W) feature map by SVD-Pade (Song et al., ICCV
    2021): float64 covariance and eigendecomposition, Pade-approximated backward. -> (B, C, C)."""

    def __init__(self):
        super().__init__()
        self.fn = _SvdPadeFn()

    def construct(self, x):
        check_feature_map("SvdPade", x)
        return restore(self.fn(to_float32(x))[0], x.dtype)
