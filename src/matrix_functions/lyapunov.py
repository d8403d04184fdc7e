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


def _blocks(coeffs, size=3):
    return [coeffs[i:i + size] for i in range(0, len(coeffs), size)]


def num_products(pade, degree=TAYLOR_DEGREE, pade_order=PADE_ORDER, steps=LYAPUNOV_STEPS):
    """(forward, backward) d x d x d products: X^2 and X^3, then Horner in X^3 over blocks of three
    coefficients (Paterson-Stockmeyer: 5 for MTP's degree 10 where the authors' power sums take 9; 2 + 1
    + 1 for MPA's P and Q, as theirs; the Cholesky factorisation and solve are not products); 6 per
    Lyapunov step but the last (5)."""
    per_poly = len(_blocks(range(pade_order + 1 if pade else degree + 1))) - 1
    return 2 + (2 if pade else 1) * per_poly, 6 * steps - 1


def lyapunov_backward(r, c, steps, mm, eye15):
    """The authors' coupled sign iteration on R = B / sqrt(2) and C / 2 (the same iterates, fewer
    element-wise kernels): T = 1.5I - R^2, C <- C T + R (C R - R C), R <- R T. Returns C_steps / 2 from
    R_0 = B_0 / sqrt(2) and C_0 / 2, (B, d, d) each."""
    for i in range(steps):
        t = eye15 - mm(r, r)
        c = mm(c, t) + mm(r, mm(c, r) - mm(r, c))
        if i < steps - 1:  # the last R is never read
            r = mm(r, t)
    return c


class _TaylorPadeLyaFn(nn.Cell):
    """Frobenius normalisation, Taylor polynomial (``pade`` False) or Pade approximant, post-
    compensation; Lyapunov backward. Returns (sqrt(norm) S, norm) with norm = ||A||_F + eps.

    Polynomials are evaluated by Paterson-Stockmeyer (X^2, X^3, then Horner in X^3 over blocks
    c_0 I + c_1 X + c_2 X^2): the authors' polynomials, in fewer products (MTP: 5 instead of 9)."""

    def __init__(self, pade, eps=TRACE_EPS, steps=LYAPUNOV_STEPS):
        super().__init__()
        self.pade = bool(pade)
        self.eps = eps
        self.steps = steps
        a, p, q = sqrt_coefficients()
        self.a, self.p, self.q = _blocks(a), _blocks(p), _blocks(q)
        self.mm = ops.BatchMatMul()
        self.eye = ops.Eye()
        self.cholesky = ops.Cholesky()
        self.cholesky_solve = ops.CholeskySolve()

    def poly(self, blocks, eye, x, x2, x3):
        """sum_k c_k X^k from its coefficients in blocks of three (Paterson-Stockmeyer)."""
        out = None
        for block in blocks[::-1]:
            term = eye * block[0]
            if len(block) > 1:
                term = term + x * block[1]
            if len(block) > 2:
                term = term + x2 * block[2]
            out = term if out is None else term + self.mm(x3, out)
        return out

    def construct(self, a):
        b, d, _ = a.shape
        eye = ops.broadcast_to(self.eye(d, d, ms.float32), (b, d, d))
        norm = ops.sqrt(frobenius(a, a)) + self.eps
        x = eye - a * (1.0 / norm)
        x2 = self.mm(x, x)
        x3 = self.mm(x2, x)
        if self.pade:
            pm = self.poly(self.p, eye, x, x2, x3)
            qm = self.poly(self.q, eye, x, x2, x3)
            # Cholesky raises on NaN (CPU): a non-finite sample factorises I instead; its norm keeps it non-finite.
            finite = ops.isfinite(qm.reshape(b, -1).sum(axis=1)).reshape(b, 1, 1)
            qm = ops.where(finite, qm, eye)
            s = self.cholesky_solve(pm, self.cholesky(qm))
        else:
            s = self.poly(self.a, eye, x, x2, x3)
        return s * ops.sqrt(norm), norm

    def bprop(self, a, out, dout):
        b, d, _ = a.shape
        eye15 = ops.broadcast_to(self.eye(d, d, ms.float32) * 1.5, (b, d, d))
        inv_root = 1.0 / ops.sqrt(out[1])
        # B_0 = out / sqrt(norm), C_0 = dout / sqrt(norm), scaled for lyapunov_backward.
        r = out[0] * (inv_root * 0.7071067811865476)
        c = dout[0] * (inv_root * 0.5)
        return (lyapunov_backward(r, c, self.steps, self.mm, eye15),)


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
