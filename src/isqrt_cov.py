"""iSQRT-COV meta-layer (Li et al., CVPR 2018) as MindSpore Cells with hand-written backward passes.

Pipeline: ``CovPool`` (B, C, H, W) -> (B, C, C); ``Sqrtm`` trace pre-normalisation, coupled
Newton-Schulz iteration and post-compensation; ``TriuVec`` upper triangle -> (B, C(C+1)/2).

Why explicit ``bprop``: the Newton-Schulz forward keeps the matrices the backward needs
(A, T_1 and, for every later step, Y_{k-1}, Z_{k-1}, T_k), so the backward performs only matrix
products (2 per forward product, 24 for iter_num=5) and never recomputes the iteration.
The backward is the exact reverse of the forward, transposes included, so it is also correct
for non-symmetric inputs and for iter_num=1 (both were bugs of the PyTorch reference).

Every Cell computes in float32 and returns its input's dtype (mixed precision keeps the
meta-layer in float32).
"""
import numpy as np
import mindspore as ms
from mindspore import nn, ops, Tensor
from mindspore.common.initializer import HeNormal

# Added to the trace before dividing by it: an all-zero map (trace 0) then gives zeros and
# finite gradients. Tiny enough not to bias small but genuine activations (trace ~1e-10).
TRACE_EPS = 1e-20


def num_products(iter_num):
    """Matrix products (d x d x d) of the forward Newton-Schulz iteration: 1 + 3(N-2) + 2."""
    return 1 if iter_num == 1 else 3 * iter_num - 3


def _to_float32(x):
    return x if x.dtype == ms.float32 else ops.cast(x, ms.float32)


def _restore(y, dtype):
    return y if dtype == ms.float32 else ops.cast(y, dtype)


class _CovPoolFn(nn.Cell):
    """Sigma = X Ihat X^T with Ihat = (I - 11^T/M)/M, on float32 (B, C, H, W)."""

    def __init__(self):
        super().__init__()
        self.mm_tb = ops.BatchMatMul(transpose_b=True)
        self.mm = ops.BatchMatMul()

    def construct(self, x):
        b, c, h, w = x.shape
        m = h * w
        xc = x.reshape(b, c, m)
        xc = xc - xc.mean(axis=2, keep_dims=True)
        return self.mm_tb(xc, xc) / m

    def bprop(self, x, out, dout):
        # dl/dX = (G + G^T) X Ihat, and X Ihat is the centred X divided by M.
        b, c, h, w = x.shape
        m = h * w
        xc = x.reshape(b, c, m)
        xc = xc - xc.mean(axis=2, keep_dims=True)
        g = dout + dout.transpose(0, 2, 1)
        dx = self.mm(g, xc) / m
        return (dx.reshape(b, c, h, w),)


class CovPool(nn.Cell):
    """Global covariance pooling: (B, C, H, W) -> (B, C, C), centred and divided by M = H*W."""

    def __init__(self):
        super().__init__()
        self.fn = _CovPoolFn()

    def construct(self, x):
        if x.ndim != 4:
            raise ValueError(f"CovPool expects a (B, C, H, W) feature map, got shape {x.shape}")
        return _restore(self.fn(_to_float32(x)), x.dtype)


class _NewtonSchulzFn(nn.Cell):
    """Pre-normalisation, coupled Newton-Schulz iteration and post-compensation.

    Returns (C, norm, A, T_1, Y_1, T_2, [Z_2, Y_2, T_3, ...], Y_N): the result first, then what
    the backward reads. Z_1 = T_1 because Z_0 = I, so the first step costs one product.
    """

    def __init__(self, iter_num, eps=TRACE_EPS):
        super().__init__()
        self.iter_num = iter_num
        self.eps = eps
        self.mm = ops.BatchMatMul()
        self.mm_ta = ops.BatchMatMul(transpose_a=True)
        self.mm_tb = ops.BatchMatMul(transpose_b=True)
        self.eye = ops.Eye()

    def construct(self, a):
        d = a.shape[-1]
        eye = self.eye(d, d, ms.float32)
        norm = (a * eye).sum(axis=(1, 2), keepdims=True) + self.eps
        an = a / norm
        t = 1.5 * eye - 0.5 * an
        y = self.mm(an, t)
        saved = (an, t)
        z = t
        for k in range(2, self.iter_num + 1):
            t = 1.5 * eye - 0.5 * self.mm(z, y)
            if k < self.iter_num:
                saved = saved + (y, z, t)
                z_next = self.mm(t, z)
                y = self.mm(y, t)
                z = z_next
            else:
                saved = saved + (y, z, t)
                y = self.mm(y, t)
        c = ops.sqrt(norm) * y
        return (c, norm) + saved + (y,)

    def bprop(self, a, out, dout):
        d = a.shape[-1]
        eye = self.eye(d, d, ms.float32)
        dc = dout[0]
        norm = out[1]
        an = out[2]
        t1 = out[3]
        y_n = out[-1]
        sqrt_norm = ops.sqrt(norm)
        # Post-compensation C = sqrt(norm) Y_N.
        dy = dc * sqrt_norm
        dnorm = (dc * y_n).sum(axis=(1, 2), keepdims=True) / (2.0 * sqrt_norm)
        dz = None
        # Reverse of steps N..2: Y_k = Y T, Z_k = T Z, T = (3I - Z Y)/2, (Y, Z) = (Y_{k-1}, Z_{k-1}).
        for k in range(self.iter_num, 1, -1):
            base = 4 + 3 * (k - 2)
            y = out[base]
            z = out[base + 1]
            t = out[base + 2]
            dt = self.mm_ta(y, dy)
            dy_prev = self.mm_tb(dy, t)
            if dz is None:
                dz_prev = None
            else:
                dt = dt + self.mm_tb(dz, z)
                dz_prev = self.mm_ta(t, dz)
            dp = -0.5 * dt
            dy = dy_prev + self.mm_ta(z, dp)
            dz_from_p = self.mm_tb(dp, y)
            dz = dz_from_p if dz_prev is None else dz_prev + dz_from_p
        # Step 1: Y_1 = A T_1, Z_1 = T_1, T_1 = (3I - A)/2.
        dt1 = self.mm_ta(an, dy)
        if dz is not None:
            dt1 = dt1 + dz
        d_an = self.mm_tb(dy, t1) - 0.5 * dt1
        # Pre-normalisation A = a / norm with norm = tr(a) + eps.
        dnorm = dnorm - (d_an * an).sum(axis=(1, 2), keepdims=True) / norm
        da = d_an / norm + dnorm * eye
        return (da,)


class Sqrtm(nn.Cell):
    """Matrix square root of (B, d, d) SPD matrices by iSQRT: trace pre-normalisation,
    ``iter_num`` coupled Newton-Schulz steps, post-compensation by sqrt(trace)."""

    def __init__(self, iter_num=5, eps=TRACE_EPS):
        super().__init__()
        if int(iter_num) != iter_num or iter_num < 1:
            raise ValueError(f"Sqrtm iter_num must be an integer >= 1, got {iter_num!r}")
        self.iter_num = int(iter_num)
        self.fn = _NewtonSchulzFn(self.iter_num, eps)

    def construct(self, x):
        if x.ndim != 3 or x.shape[-1] != x.shape[-2]:
            raise ValueError(f"Sqrtm expects square matrices (B, d, d), got shape {x.shape}")
        return _restore(self.fn(_to_float32(x))[0], x.dtype)


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
        if x.ndim != 3 or x.shape[-1] != x.shape[-2]:
            raise ValueError(f"TriuVec expects square matrices (B, d, d), got shape {x.shape}")
        return _restore(self.fn(_to_float32(x)), x.dtype)


class ISqrtCov(nn.Cell):
    """The iSQRT-COV representation: [1x1 conv + BN + ReLU] -> CovPool -> Sqrtm -> TriuVec.

    Parameter names (layer_reduce, layer_reduce_bn) are those of fast-MPN-COV's mpncovresnet, so
    its checkpoints map one to one. ``output_dim`` is the length of the returned vector (or d*d
    when ``is_vec`` is False).
    """

    def __init__(self, in_channels, dimension_reduction=256, iter_num=5, is_sqrt=True, is_vec=True):
        super().__init__()
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
        self.cov = CovPool()
        self.sqrtm = Sqrtm(iter_num) if is_sqrt else None
        self.triu = TriuVec() if is_vec else None
        self.output_dim = dim * (dim + 1) // 2 if is_vec else dim * dim
        self.iter_num = iter_num

    def construct(self, x):
        if self.reduce:
            x = self.layer_reduce_relu(self.layer_reduce_bn(self.layer_reduce(x)))
        dtype = x.dtype
        y = self.cov(_to_float32(x))
        if self.is_sqrt:
            y = self.sqrtm(y)
        if self.is_vec:
            y = self.triu(y)
        else:
            y = y.reshape(y.shape[0], -1)
        return _restore(y, dtype)

    def matmul_flops(self, height, width):
        """Multiply-adds of the covariance and the Newton-Schulz products for one image."""
        m = height * width
        macs = self.dim * self.dim * m
        if self.is_sqrt:
            macs += num_products(self.iter_num) * self.dim ** 3
        return macs
