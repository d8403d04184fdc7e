"""MTP-Lya and MPA-Lya (Song, Sebe, Wang, "Fast Differentiable Matrix Square Root", ICLR 2022).

Forward, per sample, on the Frobenius-normalised input Ahat = A / ||A||_F (eigenvalues in [0, 1] for
SPD A) with X = I - Ahat:
  MTP: S = sum_{k=0..K} a_k X^k, the degree-K Taylor polynomial of sqrt(1 - z) (K = 10);
  MPA: S = Q^-1 P with P = sum_m p_m X^m, Q = sum_n q_n X^n, the [5/5] Pade approximant of sqrt(1 - z)
       built from that Taylor series;
then the post-compensation A^1/2 ~ sqrt(||A||_F) S. Both normalisations are the authors'
(KingJamesSong/FastDifferentiableMatSqrt, torch_utils.py), not iSQRT-COV's trace.
The coefficients are derived here, at first use, with mpmath's ``taylor`` and ``pade`` at 32 digits
as the authors' code does (``sqrt_coefficients``); none is typed in.

Backward (both): dl/dA solves the Lyapunov equation A^1/2 X + X A^1/2 = dl/dA^1/2, by the coupled
matrix-sign iteration of the authors' code, 8 steps: B_0 = S (the forward's output / sqrt(||A||_F)),
C_0 = G / sqrt(||A||_F); B <- B(3I - B^2)/2, C <- (C(3I - B^2) - B^2 C + B C B)/2 with the old B;
dl/dA = C_8 / 2. Where this differs from the exact derivative of the forward, it does so as the
authors' code does: (1) it is the derivative of the exact square root, not of the truncated series
or approximant the forward computes; (2) no gradient flows through ||A||_F (for the exact root the
normalisation cancels); (3) 8 sign steps leave the equation solved approximately where A^1/2 has
eigenvalues near 0 (rank-deficient covariances: the sign iteration does not converge on a null
space, there C grows by 1.5 per step). tests/test_sqrt_methods.py measures the distance to the
true gradient. The backward assumes a symmetric input (a covariance).

Q is SPD for SPD A (q(z) > 0 on [0, 1]: its roots are all > 1), so Q^-1 P is a Cholesky solve:
MindSpore 2.8's ``Cholesky`` has GPU and CPU kernels, not Ascend ("Supported Platforms"), and
``MatrixSolve`` has no GPU kernel, hence the registry refuses mpa_lya on Ascend. A non-finite
sample is given Q = I before the factorisation (MindSpore's CPU Cholesky raises on NaN), and its
output stays non-finite through the norm, so the training step skips it as it does for ns.

Every Cell computes in float32 and returns its input's dtype.
"""
import functools

import mindspore as ms
from mindspore import nn, ops

from src.matrix_functions.common import TRACE_EPS, check_square, frobenius, restore, to_float32

TAYLOR_DEGREE = 10  # K of the authors' code
PADE_ORDER = 5  # [5/5]
LYAPUNOV_STEPS = 8


@functools.lru_cache(maxsize=None)
def sqrt_coefficients(degree=TAYLOR_DEGREE, pade_order=PADE_ORDER, digits=32):
    """(a, p, q): Taylor coefficients a_0..a_degree of sqrt(1 - z) at 0 and the numerator p_0..p_m and
    denominator q_0..q_m (q_0 = 1) of its [m/m] Pade approximant, as float tuples, derived with mpmath."""
    import mpmath  # pylint: disable=import-outside-toplevel
    with mpmath.workdps(digits):
        a = mpmath.taylor(lambda z: mpmath.sqrt(1 - z), 0, degree)
        p, q = mpmath.pade(a, pade_order, pade_order)
        return tuple(float(v) for v in a), tuple(float(v) for v in p), tuple(float(v) for v in q)


def num_products(pade, degree=TAYLOR_DEGREE, pade_order=PADE_ORDER, steps=LYAPUNOV_STEPS):
    """(forward, backward) d x d x d products: the powers X^2..X^K (MTP) or X^2..X^m (MPA; its
    Cholesky factorisation and solve are not products), and 6 per Lyapunov step but the last (5)."""
    forward = (pade_order if pade else degree) - 1
    return forward, 6 * steps - 1


def lyapunov_backward(b, c, steps, mm, eye3):
    """The authors' coupled sign iteration: returns C_steps / 2 from B_0 = b, C_0 = c (B, d, d)."""
    for i in range(steps):
        b2 = mm(b, b)
        t = eye3 - b2
        c = (mm(c, t) - mm(b2, c) + mm(mm(b, c), b)) * 0.5
        if i < steps - 1:  # the last B is never read
            b = mm(b, t) * 0.5
    return c * 0.5


class _TaylorPadeLyaFn(nn.Cell):
    """Frobenius normalisation, Taylor polynomial (``pade`` False) or Pade approximant, post-
    compensation; Lyapunov backward. Returns (sqrt(norm) S, norm) with norm = ||A||_F + eps."""

    def __init__(self, pade, eps=TRACE_EPS, steps=LYAPUNOV_STEPS):
        super().__init__()
        self.pade = bool(pade)
        self.eps = eps
        self.steps = steps
        a, p, q = sqrt_coefficients()
        self.a, self.p, self.q = a, p, q
        self.mm = ops.BatchMatMul()
        self.eye = ops.Eye()
        self.cholesky = ops.Cholesky()
        self.cholesky_solve = ops.CholeskySolve()

    def construct(self, a):
        b, d, _ = a.shape
        eye = ops.broadcast_to(self.eye(d, d, ms.float32), (b, d, d))
        norm = ops.sqrt(frobenius(a, a)) + self.eps
        x = eye - a / norm
        xk = x
        if self.pade:
            pm = eye * self.p[0] + x * self.p[1]
            qm = eye * self.q[0] + x * self.q[1]
            for k in range(2, len(self.p)):
                xk = self.mm(xk, x)
                pm = pm + xk * self.p[k]
                qm = qm + xk * self.q[k]
            # Cholesky raises on NaN (CPU): a non-finite sample factorises I instead; its norm keeps it non-finite.
            finite = ops.isfinite(qm.reshape(b, -1).sum(axis=1)).reshape(b, 1, 1)
            qm = ops.where(finite, qm, eye)
            s = self.cholesky_solve(pm, self.cholesky(qm))
        else:
            s = eye * self.a[0] + x * self.a[1]
            for k in range(2, len(self.a)):
                xk = self.mm(xk, x)
                s = s + xk * self.a[k]
        return s * ops.sqrt(norm), norm

    def bprop(self, a, out, dout):
        b, d, _ = a.shape
        eye3 = ops.broadcast_to(self.eye(d, d, ms.float32) * 3.0, (b, d, d))
        root = ops.sqrt(out[1])
        return (lyapunov_backward(out[0] / root, dout[0] / root, self.steps, self.mm, eye3),)


class _LyaSqrtm(nn.Cell):
    def __init__(self, pade):
        super().__init__()
        self.fn = _TaylorPadeLyaFn(pade)
        self.label = type(self).__name__

    def construct(self, x):
        check_square(self.label, x)
        return restore(self.fn(to_float32(x))[0], x.dtype)


class MTPLya(_LyaSqrtm):
    """Matrix square root of (B, d, d) SPD matrices by MTP-Lya (Song et al., ICLR 2022): degree-10
    Taylor polynomial of sqrt(1 - z) on A / ||A||_F, times sqrt(||A||_F); Lyapunov backward."""

    def __init__(self):
        super().__init__(pade=False)


class MPALya(_LyaSqrtm):
    """Matrix square root of (B, d, d) SPD matrices by MPA-Lya (Song et al., ICLR 2022): [5/5] Pade
    approximant of sqrt(1 - z) on A / ||A||_F (a Cholesky solve), times sqrt(||A||_F); Lyapunov backward."""

    def __init__(self):
        super().__init__(pade=True)
