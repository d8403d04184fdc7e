"""iSICE: iterative sparse inverse covariance estimation as a representation (Rahman, Koniusz, Wang,
Zhou, Moghadam, Sun, "Learning Partial Correlation based Deep Visual Representation for Image
Classification", CVPR 2023; authors' code csiro-robotics/iSICE, ``src/representation/SICE.py``).

Per sample, X the (d, M) features after a 1x1 conv to d = 256 channels + BN + ReLU:

    C = Sigma / tr(Sigma)                        Sigma = X Ihat X^T (mean removed, 1/M)
    P = inv(C + eps I)                           inv(A) = Z Z, Z = InvSqrtm(A) (7 Newton-Schulz steps)
    for t = 0 .. T-1 (T = 5):                    eta_t = eta (1 - t / (T - 1)), eta = 1
        G  = -inv(P + eps I) + (C + C^T) / 2     gradient of -log det P + tr(C P)
        P+ = relu(relu(P)  - eta_t (G + lambda)) lambda = 0.01 (sparsity)
        P- = relu(relu(-P) - eta_t (-G + lambda))
        P  = sym(P+ - P-)                        sym(A) = (A + A^T) / 2
    output: upper triangle of P / sqrt(tr P)     d(d+1)/2 = 32,896 values

Gradients: MindSpore autodiff through the unrolled steps, as the authors' autograd, with each
inverse square root's own hand-written backward (``src.isqrt_cov.InvSqrtm``, as their ``Sqrtm``).
The last step has eta_{T-1} = 0: its G is multiplied by zero, so it is not computed (the same
output and gradients, one inverse fewer: T inverses in all, the first included). T = 1 uses eta
(the authors' formula divides by T - 1 = 0).

The ridge eps I (eps = 1e-9) is deterministic. The authors add ``1e-10 + 1e-9 * diag(rand)``, a new
draw every call (1e-10 on every entry, U[0, 1e-9) on the diagonal), so their logits are not
reproducible in principle; in practice the draw is below float32 resolution for every eigenvalue
of C above ~1e-2 / d, and on the null space of a rank-deficient C (M < d, as 7x7 or 14x14 maps with
d = 256) the 7-step Newton-Schulz polynomial, not the ridge, bounds the inverse (its value at 0 is
1.5^7): tests/test_isice.py measures the output of every draw of theirs within 1e-6 of this one.
An all-zero map has tr(Sigma) = 0, where the authors divide 0 by 0: the trace here gets the
project's 1e-20 (``TRACE_EPS``), so C = 0 and P = inv(eps I), finite.

ResNets keep layer4 at stride 2 (the authors' torchvision backbones: 14x14 at 448); the reduction
is named ``layer_reduce`` / ``layer_reduce_bn`` (their ``representation.conv_dr_block.0/.1``). Every
Cell computes in float32 and returns its input's dtype.
"""
import numpy as np
import mindspore as ms
from mindspore import nn, ops, Tensor

from src.bilinear import _Reduction
from src.isqrt_cov import TRACE_EPS, CovPool, InvSqrtm, TriuVec, num_products

ISICE_EPS = 1e-9


def _to_float32(x):
    return x if x.dtype == ms.float32 else ops.cast(x, ms.float32)


def step_sizes(steps, step_size):
    """eta_t = step_size (1 - t / (steps - 1)), t = 0 .. steps-1 (the last is 0); [step_size] for one step."""
    if steps == 1:
        return [float(step_size)]
    return [float(step_size) * (1.0 - t / (steps - 1.0)) for t in range(steps)]


class ISICE(nn.Cell):
    """iSICE representation: [1x1 conv + BN + ReLU] -> covariance -> sparse inverse covariance by
    ``steps`` projected-gradient steps -> / sqrt(trace) -> upper triangle.
    (B, C_in, H, W) -> (B, d(d+1)/2), ``output_dim`` = d(d+1)/2.

    ``dimension_reduction`` d (256; 0 keeps the backbone's channels), ``steps`` T (5), ``sparsity``
    lambda (0.01), ``step_size`` eta (1.0), ``ns_iter`` Newton-Schulz iterations of each inverse (7),
    ``eps`` the ridge (1e-9).
    """

    def __init__(self, in_channels, dimension_reduction=256, steps=5, sparsity=0.01, step_size=1.0, ns_iter=7,
                 eps=ISICE_EPS):
        super().__init__(auto_prefix=False)
        if int(steps) != steps or steps < 1:
            raise ValueError(f"iSICE steps must be an integer >= 1, got {steps!r}")
        self.reduce = _Reduction(in_channels, dimension_reduction)
        self.dim = self.reduce.dim
        self.steps, self.sparsity, self.ns_iter, self.eps = int(steps), float(sparsity), int(ns_iter), float(eps)
        self.rates = step_sizes(self.steps, step_size)
        self.cov = CovPool()
        self.inv_sqrtm = InvSqrtm(ns_iter)
        self.triu = TriuVec()
        self.mm = ops.BatchMatMul()
        self.ridge = Tensor(np.eye(self.dim, dtype=np.float32) * self.eps)
        self.eye = Tensor(np.eye(self.dim, dtype=np.float32))
        self.output_dim = self.dim * (self.dim + 1) // 2

    def _trace(self, a):
        b = a.shape[0]
        return (a * self.eye).reshape(b, -1).sum(axis=1).reshape(b, 1, 1)

    def _inverse(self, a):
        """(a + eps I)^-1 as Z Z with Z the Newton-Schulz inverse square root."""
        z = self.inv_sqrtm(a + self.ridge)
        return self.mm(z, z)

    def precision(self, sigma):
        """The iSICE steps on (B, d, d) float32 covariances: P / sqrt(tr P), (B, d, d)."""
        c = sigma / (self._trace(sigma) + TRACE_EPS)
        sym_c = (c + c.transpose(0, 2, 1)) * 0.5
        p = self._inverse(c)
        for eta in self.rates:
            plus = ops.relu(p)
            minus = ops.relu(-p)
            if eta != 0.0:  # a Python constant: the last of several steps has eta 0 and needs no G
                g = sym_c - self._inverse(p)
                plus = plus - eta * (g + self.sparsity)
                minus = minus - eta * (self.sparsity - g)
            p = ops.relu(plus) - ops.relu(minus)
            p = (p + p.transpose(0, 2, 1)) * 0.5
        return p / ops.sqrt(self._trace(p))

    def construct(self, x):
        x = self.reduce(x)
        dtype = x.dtype
        y = self.triu(self.precision(self.cov(_to_float32(x))))
        return y if dtype == ms.float32 else ops.cast(y, dtype)

    def matmul_flops(self, height, width):
        """Multiply-adds of the covariance and of every inverse (Newton-Schulz products + Z Z) for one image."""
        inverses = 1 + sum(1 for eta in self.rates if eta != 0.0)
        return self.dim * self.dim * height * width + inverses * (num_products(self.ns_iter, True) + 1) * self.dim ** 3
