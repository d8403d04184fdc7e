"""iSQRT-COV meta-layer (Li et al., CVPR 2018) as MindSpore Cells with hand-written backward passes.

Pipeline: ``CovPool`` (B, C, H, W) -> (B, C, C); a matrix square root (``sqrt_method``: by default
``Sqrtm``, trace pre-normalisation, coupled Newton-Schulz iteration and post-compensation; the others
in src/matrix_functions); ``TriuVec`` upper triangle -> (B, C(C+1)/2).

Why explicit ``bprop``: the forwards return, besides their result, what their backward reads (the
centred features for CovPool), so the backward performs only the products it needs and never
recomputes the forward. ``Sqrtm``, ``InvSqrtm`` and ``num_products`` live in
src/matrix_functions/newton_schulz.py with the other matrix functions and are importable from here.

Every Cell computes in float32 and returns its input's dtype (mixed precision keeps the
meta-layer in float32).
"""
import numpy as np
from mindspore import nn, ops, Tensor
from mindspore.common.initializer import HeNormal

from src.matrix_functions import InvSqrtm, Sqrtm, get_sqrt_method, num_products  # noqa: F401 (re-exported)
from src.matrix_functions.common import (TRACE_EPS, centred_covariance, check_feature_map,  # noqa: F401
                                         check_square, covariance_backward, restore, to_float32)


class _CovPoolFn(nn.Cell):
    """Sigma = X Ihat X^T with Ihat = (I - 11^T/M)/M, on float32 (B, C, H, W).

    Returns (Sigma, centred X): the backward reuses the centred X instead of recomputing it."""

    def __init__(self):
        super().__init__()
        self.mm_tb = ops.BatchMatMul(transpose_b=True)
        self.mm = ops.BatchMatMul()

    def construct(self, x):
        return centred_covariance(x, self.mm, self.mm_tb)

    def bprop(self, x, out, dout):
        return (covariance_backward(dout[0], out[1], x.shape, self.mm),)


class CovPool(nn.Cell):
    """Global covariance pooling: (B, C, H, W) -> (B, C, C), centred and divided by M = H*W."""

    def __init__(self):
        super().__init__()
        self.fn = _CovPoolFn()

    def construct(self, x):
        check_feature_map("CovPool", x)
        return restore(self.fn(to_float32(x))[0], x.dtype)


def triu_indices_flat(d):
    """Flat (row-major) positions of the upper triangle of a d x d matrix, numpy.triu_indices order."""
    rows, cols = np.triu_indices(d)
    return (rows * d + cols).astype(np.int32)


def triu_scatter_index(d):
    """For every flat position of a d x d matrix, its index in the triu vector, or d(d+1)/2 (a
    padding zero) below the diagonal: the backward is then one gather instead of a scatter."""
    inv = np.full(d * d, d * (d + 1) // 2, dtype=np.int32)
    inv[triu_indices_flat(d)] = np.arange(d * (d + 1) // 2, dtype=np.int32)
    return inv


class _TriuVecFn(nn.Cell):
    def construct(self, x):
        b, d, _ = x.shape
        idx = Tensor(triu_indices_flat(d))
        return ops.gather(x.reshape(b, d * d), idx, 1)

    def bprop(self, x, out, dout):
        b, d, _ = x.shape
        inv = Tensor(triu_scatter_index(d))
        padded = ops.concat((dout, ops.zeros((b, 1), dout.dtype)), axis=1)
        return (ops.gather(padded, inv, 1).reshape(b, d, d),)


class TriuVec(nn.Cell):
    """Upper triangle, diagonal included, row-major (numpy.triu_indices order): (B, d, d) -> (B, d(d+1)/2)."""

    def __init__(self):
        super().__init__()
        self.fn = _TriuVecFn()

    def construct(self, x):
        check_square("TriuVec", x)
        return restore(self.fn(to_float32(x)), x.dtype)


class ISqrtCov(nn.Cell):
    """The iSQRT-COV representation: [1x1 conv + BN + ReLU] -> CovPool -> square root -> TriuVec.

    ``sqrt_method`` (src/matrix_functions, SQRT_METHODS): "ns" (Newton-Schulz with ``iter_num`` steps,
    the paper's), "mtp_lya", "mpa_lya" or "svd_pade" (these ignore ``iter_num``; svd_pade forms the
    covariance itself, in float64). A method that cannot run on the current device raises
    DeviceError here. Parameter names (layer_reduce, layer_reduce_bn) are those of fast-MPN-COV's
    mpncovresnet, so its checkpoints map one to one, whatever the method. ``output_dim`` is the
    length of the returned vector (or d*d when ``is_vec`` is False).
    """

    def __init__(self, in_channels, dimension_reduction=256, iter_num=5, is_sqrt=True, is_vec=True,
                 sqrt_method="ns"):
        super().__init__()
        method = get_sqrt_method(sqrt_method) if is_sqrt else None
        self.reduce = bool(dimension_reduction)
        if self.reduce:
            self.layer_reduce = nn.Conv2d(in_channels, dimension_reduction, 1, has_bias=False,
                                          weight_init=HeNormal(mode="fan_out", nonlinearity="relu"))
            self.layer_reduce_bn = nn.BatchNorm2d(dimension_reduction, momentum=0.9, eps=1e-5)
            self.layer_reduce_relu = nn.ReLU()
            dim = dimension_reduction
        else:
            dim = in_channels
        self.dim = dim
        self.is_sqrt = is_sqrt
        self.is_vec = is_vec
        self.sqrt_method = sqrt_method
        self.iter_num = iter_num
        # A method that pools (svd_pade) takes the feature map; the others the float32 covariance.
        self.pools = bool(method and method.pools)
        self.cov = None if self.pools else CovPool()
        self.sqrtm = method.build(iter_num) if method else None
        self.forward_products = method.products(iter_num)[0] if method else 0
        self.triu = TriuVec() if is_vec else None
        self.output_dim = dim * (dim + 1) // 2 if is_vec else dim * dim

    def construct(self, x):
        if self.reduce:
            x = self.layer_reduce_relu(self.layer_reduce_bn(self.layer_reduce(x)))
        dtype = x.dtype
        x = to_float32(x)
        if self.pools:
            y = self.sqrtm(x)
        else:
            y = self.cov(x)
            if self.is_sqrt:
                y = self.sqrtm(y)
        if self.is_vec:
            y = self.triu(y)
        else:
            y = y.reshape(y.shape[0], -1)
        return restore(y, dtype)

    def matmul_flops(self, height, width):
        """Multiply-adds of the covariance and the square root's forward matrix products for one image
        (svd_pade: its eigendecomposition is not counted)."""
        return self.dim * self.dim * height * width + self.forward_products * self.dim ** 3
