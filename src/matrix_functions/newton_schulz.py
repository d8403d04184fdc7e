"""Coupled Newton-Schulz iteration for the matrix square root and its inverse, hand-written backward.

``Sqrtm``: iSQRT-COV (Li, Xie, Wang, Gao, CVPR 2018): trace pre-normalisation, coupled Newton-Schulz
iteration, post-compensation by sqrt(trace). ``InvSqrtm``: the same iteration's Z_N / sqrt(trace), as
iSICE (Rahman et al., CVPR 2023) computes its inverse square root.

Why explicit ``bprop``: the forward returns, besides its result, what its backward reads (A, T_1 and,
for every later step, Y_{k-1}, Z_{k-1}, T_k), so the backward performs only matrix products, 2 per
forward product (24 for iter_num=5, after the forward's 12: Z_0 = I is never multiplied), and never
recomputes the iteration. The backward is the exact reverse of the forward, transposes included, so
it is also correct for non-symmetric inputs and for iter_num=1 (both were bugs of the PyTorch
reference).

Speed on CPU (bench/meta_layer.py): the iteration runs on (-Y/2, Z) so that every T costs one add and
no scalar multiply; backward gradients are kept transposed so that nearly all products are plain
BatchMatMuls (transpose_b is ~10% slower); traces and inner products avoid MindSpore's slow
multi-axis reductions and broadcast ops.

Every Cell computes in float32 and returns its input's dtype.
"""
import mindspore as ms
from mindspore import nn, ops

from src.matrix_functions.common import (TRACE_EPS, check_iter_num, check_square, frobenius, restore,
                                         to_float32)


def num_products(iter_num, inverse=False):
    """Matrix products (d x d x d) of the forward Newton-Schulz iteration: 1 + 3(N-2) + 2 (square
    root and inverse alike; N = 1 costs 1 product for the square root, none for the inverse)."""
    if iter_num == 1:
        return 0 if inverse else 1
    return 3 * iter_num - 3


class _NewtonSchulzFn(nn.Cell):
    """Pre-normalisation, coupled Newton-Schulz iteration and post-compensation.

    Computed on Yh = -Y/2 and Z: then T = (3I - ZY)/2 = 1.5I + Z Yh, Yh_k = Yh T, Z_k = T Z, and the
    first step is Yh_1 = Ah T_1, Z_1 = T_1 = 1.5I + Ah with Ah = -A/2. Every step forms T with one
    add and the backward needs no scalar multiplies.

    ``inverse`` False (square root): the last step computes only Yh_N, C = -2 sqrt(norm) Yh_N.
    ``inverse`` True (inverse square root): the last step computes only Z_N, C = Z_N / sqrt(norm).

    Returns (C, norm, Ah, T_1, [Yh_1, Z_1, T_2, Yh_2, Z_2, T_3, ...]): the result first, then what
    the backward reads (Yh_{k-1}, Z_{k-1}, T_k for every step k >= 2).
    """

    def __init__(self, iter_num, eps=TRACE_EPS, inverse=False):
        super().__init__()
        self.iter_num = iter_num
        self.eps = eps
        self.inverse = bool(inverse)
        # C = scale * norm^power * (Yh_N or Z_N)
        self.power = -0.5 if self.inverse else 0.5
        self.mm = ops.BatchMatMul()
        self.mm_ta = ops.BatchMatMul(transpose_a=True)
        self.mm_tb = ops.BatchMatMul(transpose_b=True)
        self.mm_tatb = ops.BatchMatMul(transpose_a=True, transpose_b=True)
        self.eye = ops.Eye()

    def construct(self, a):
        b, d, _ = a.shape
        # A (B, d, d) identity: adding a broadcast (d, d) one is 3x slower on CPU.
        eye15 = ops.broadcast_to(self.eye(d, d, ms.float32) * 1.5, (b, d, d))
        norm = ops.diagonal(a, 0, 1, 2).sum(axis=1).reshape(b, 1, 1) + self.eps
        ah = a * (-0.5 / norm)
        t = ah + eye15
        z = t
        y = z if self.inverse and self.iter_num == 1 else self.mm(ah, t)
        saved = (ah, t)
        for k in range(2, self.iter_num + 1):
            t = self.mm(z, y) + eye15
            saved = saved + (y, z, t)
            if k < self.iter_num:
                y, z = self.mm(y, t), self.mm(t, z)
            elif self.inverse:
                z = self.mm(t, z)
            else:
                y = self.mm(y, t)
        if self.inverse:
            c = z * ops.rsqrt(norm)
        else:
            c = y * (-2.0 * ops.sqrt(norm))
        return (c, norm) + saved

    def bprop(self, a, out, dout):
        # Exact reverse mode of construct. Gradients named g* are held transposed (g = dl/dX^T):
        # then every product of steps N-1..2 is a plain BatchMatMul, while D-form gradients would
        # need transpose_b, which is about 10% slower on CPU. The first product switches to the
        # transposed form and the last four switch back (dl/da is returned untransposed).
        b, d, _ = a.shape
        n = self.iter_num
        dc = dout[0]
        norm = out[1]
        ah = out[2]
        t1 = out[3]
        # Post-compensation C = s norm^p W (W = Yh_N or Z_N): dl/dnorm = p <dC, C> / norm.
        dnorm = frobenius(dc, out[0]) * (self.power / norm)
        if self.inverse:
            dw = dc * ops.rsqrt(norm)
        else:
            dw = dc * (-2.0 * ops.sqrt(norm))
        if n == 1:
            if self.inverse:
                d_ah = dw  # Z_1 = T_1 = 1.5I + Ah
            else:
                d_ah = self.mm_tb(dw, t1) + self.mm_ta(ah, dw)  # Yh_1 = Ah T_1
        else:
            # Reverse of steps N..2: T = 1.5I + Z Y, Y' = Y T, Z' = T Z with (Y, Z) = (Yh_{k-1}, Z_{k-1}):
            # dT = Y^T dY' + dZ' Z^T, dY = dY' T^T + Z^T dT, dZ = T^T dZ' + dT Y^T (transpose these).
            gy = None
            gz = None  # dl/dZ_k^T; at the last step the transposed dZ_N (inverse) or none (square root)
            dz1 = None
            for k in range(n, 1, -1):
                base = 4 + 3 * (k - 2)
                y = out[base]
                z = out[base + 1]
                t = out[base + 2]
                if k < n:
                    gt = self.mm(gy, y) + self.mm(z, gz)
                    gy_prev = self.mm(t, gy) + self.mm(gt, z)
                elif self.inverse:
                    # Only Z_N = T Z: dT = dZ' Z^T, dY = Z^T dT.
                    gt = self.mm_tb(z, dw)
                    gy_prev = self.mm(gt, z)
                else:
                    # Only Yh_N = Y T: dT = Y^T dY', dY = dY' T^T + Z^T dT.
                    gt = self.mm_ta(dw, y)
                    gy_prev = self.mm_tb(t, dw) + self.mm(gt, z)
                # dZ = T^T dZ' + dT Y^T; dZ' is gz^T for k < N, dw (inverse) or 0 (square root) at N.
                if k > 2:
                    if k < n:
                        gz = self.mm(gz, t) + self.mm(y, gt)
                    elif self.inverse:
                        gz = self.mm_ta(dw, t) + self.mm(y, gt)
                    else:
                        gz = self.mm(y, gt)
                elif k < n:
                    dz1 = self.mm_tatb(t, gz) + self.mm_tatb(gt, y)
                elif self.inverse:
                    dz1 = self.mm_ta(t, dw) + self.mm_tatb(gt, y)
                else:
                    dz1 = self.mm_tatb(gt, y)
                gy = gy_prev
            # Step 1: Yh_1 = Ah T_1, Z_1 = T_1, T_1 = 1.5I + Ah; dY_1 = gy^T.
            d_ah = self.mm_tatb(gy, t1) + (self.mm_tatb(ah, gy) + dz1)
        # Pre-normalisation Ah = -a / (2 norm), norm = tr(a) + eps: dAh/dnorm = -Ah / norm.
        dnorm = dnorm - frobenius(d_ah, ah) / norm
        da = d_ah * (-0.5 / norm) + self.eye(d, d, ms.float32) * dnorm
        return (da,)


class _NewtonSchulzRoot(nn.Cell):
    """(B, d, d) -> (B, d, d) in the input's dtype, float32 inside; ``inverse`` set by the subclass."""

    inverse = False

    def __init__(self, iter_num=5, eps=TRACE_EPS):
        super().__init__()
        self.label = type(self).__name__
        self.iter_num = check_iter_num(self.label, iter_num)
        self.fn = _NewtonSchulzFn(self.iter_num, eps, inverse=self.inverse)

    def construct(self, x):
        check_square(self.label, x)
        return restore(self.fn(to_float32(x))[0], x.dtype)


class Sqrtm(_NewtonSchulzRoot):
    """Matrix square root of (B, d, d) SPD matrices by iSQRT: trace pre-normalisation,
    ``iter_num`` coupled Newton-Schulz steps, post-compensation by sqrt(trace)."""


class InvSqrtm(_NewtonSchulzRoot):
    """Inverse matrix square root of (B, d, d) SPD matrices by the same coupled Newton-Schulz
    iteration: A -> Z_N / sqrt(tr A), with Y_0 = A / tr(A), Z_0 = I, the last step computing only
    Z_N = T_N Z_{N-1} (iSICE's ``Sqrtm``, Rahman et al., CVPR 2023; iter_num = 1 gives
    (3I - A / tr A) / (2 sqrt(tr A))). (B, d, d) -> (B, d, d), in the input's dtype.

    ``eps`` (1e-20) is added to the trace: an all-zero input gives a finite (huge) result, not
    Inf; callers that want a usable inverse add a ridge first, as iSICE does."""

    inverse = True
