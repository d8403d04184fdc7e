"""DropCov: adaptive channel dropout before global covariance pooling (Wang, Gao, Zhang, Xie, Li, Hu,
"A Simple yet Effective Method for Improving Deep Architectures", NeurIPS 2022; authors' code
mingzeG/DropCov, ``CNNs/models/ResNet_ACD.py`` with ``CNNs/representation/{covariance,eca_layer}.py``).

Per sample, X the (d, M) features after a 1x1 conv to d = 256 channels + BN + ReLU, M = H*W:

- training only (adaptive channel dropout, ACD):
  1. ECA weights y = softmax over the d channels of a 1-D convolution (kernel k = 3, zero padding,
     no bias) of the channels' global averages; X <- X * y + X (``eca_layer``).
  2. the rate p = clamp(1 - (10 / log2 d) * mean_b cos(y_b, r_b), 0, 1), r_b the row sums of
     Cov(X_b) (``balance_rate``); no gradient flows through p.
  3. Dropout2d(p): every (sample, channel) is zeroed with probability p, survivors scaled by 1/(1 - p).
- always: Sigma = X Ihat X^T (mean removed, 1/M), its upper triangle (d(d+1)/2 = 32,896 values).
  Evaluation skips 1-3, so its output is deterministic and costs the covariance only.

No host read per step: the reference reads p with ``.item()`` to build an ``nn.Dropout2d(p)`` every
step; here p stays a device tensor and the channel mask is drawn on the device, keep = (u >= p) with
u ~ U[0, 1) per (sample, channel) (probability 1 - p, as torch's bernoulli(1 - p)), scaled by
1 / (1 - p); p = 1 drops every channel (as torch). ``ops.UniformReal`` (Ascend, GPU, CPU) takes its
seeds from the global seed when the Cell is built, as ``nn.Dropout`` does: ``ms.set_seed`` (the
Trainer's ``cfg.seed``) fixes the masks (on GPU and CPU; MindSpore documents Ascend's random ops as
not reproducible).

One covariance, not two: dropping scales channel i of X by s_i (0 or 1/(1-p)), and centring commutes
with that, so Cov(dropped X) = S Cov(X) S with S = diag(s). The training path computes Cov(X) once,
takes the rate from its row sums and returns Cov(X) * s s^T: the reference's numbers at the cost of
the evaluation path.

Guard: an all-zero feature map has r = 0 and the reference's cosine is 0/0 = NaN (its ``.item()``
then fails); here the cosine's denominator is floored at 1e-20, so such a sample has cosine 0.

Parameter names are the reference's (``layer_reduce``, ``layer_reduce_bn``, ``eca_layer.conv.weight``
of shape (1, 1, k) as torch's Conv1d), so its resnet*_ACD checkpoints map one to one. Every Cell
computes in float32 and returns its input's dtype.
"""
import math

import mindspore as ms
from mindspore import nn, ops, Parameter
from mindspore.common.initializer import Uniform, initializer
from mindspore.common.seed import _get_graph_seed

from src.bilinear import _Reduction
from src.isqrt_cov import CovPool, TriuVec

RATE_SCALE = 10.0  # the reference's constant in 1 - (10 / log2 d) * mean cos
ECA_KERNEL = 3
COS_EPS = 1e-20


def _to_float32(x):
    return x if x.dtype == ms.float32 else ops.cast(x, ms.float32)


class EcaConv(nn.Cell):
    """ECA's 1-D convolution across channels, torch.nn.Conv1d(1, 1, k, padding=(k-1)/2, bias=False):
    (B, C) -> (B, C), out_c = sum_j w_j in_{c+j-(k-1)/2} (zeros outside). ``weight`` has torch's shape
    (1, 1, k) and its default initialisation, uniform in +-1/sqrt(k) (the reference's init loop only
    touches Conv2d). Computed as k shifted products: no Conv1d layout to convert, GPU-agnostic."""

    def __init__(self, kernel_size=ECA_KERNEL):
        super().__init__()
        if int(kernel_size) != kernel_size or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"ECA kernel size must be an odd integer >= 1, got {kernel_size!r}")
        self.k = int(kernel_size)
        self.pad = (self.k - 1) // 2
        self.weight = Parameter(initializer(Uniform(1.0 / math.sqrt(self.k)), (1, 1, self.k), ms.float32),
                                name="weight")

    def construct(self, s):
        b, c = s.shape
        w = self.weight.reshape(-1)
        if self.pad:
            z = ops.zeros((b, self.pad), s.dtype)
            s = ops.concat((z, s, z), axis=1)
        out = s[:, 0:c] * w[0]
        for j in range(1, self.k):
            out = out + s[:, j:j + c] * w[j]
        return out


class ECALayer(nn.Cell):
    """The reference's ``eca_layer``: channel weights y = softmax_c(conv(mean_{h,w} x)), (B, C, H, W) -> (B, C)."""

    def __init__(self, kernel_size=ECA_KERNEL):
        super().__init__()
        self.conv = EcaConv(kernel_size)

    def construct(self, x):
        b, c, h, w = x.shape
        return ops.softmax(self.conv(x.reshape(b, c, h * w).mean(axis=2)), axis=1)


def adaptive_rate(y, cov, coef):
    """p = clamp(1 - coef * mean_b cos(y_b, cov_b 1), 0, 1) as a (1,) float32 tensor, no gradient.
    y: (B, C) ECA weights; cov: (B, C, C); coef = 10 / log2(C) in DropCov."""
    y = ops.stop_gradient(y)
    r = ops.stop_gradient(cov).sum(axis=2)
    dot = (y * r).sum(axis=1)
    norms = ops.sqrt((y * y).sum(axis=1)) * ops.sqrt((r * r).sum(axis=1))
    cos = dot / ops.maximum(norms, COS_EPS)
    return ops.clamp(1.0 - cos.mean() * coef, 0.0, 1.0).reshape(1)


def channel_scale(u, p):
    """Dropout2d's per-(sample, channel) factor from uniform draws u in [0, 1): 1/(1-p) where u >= p
    (probability 1 - p), else 0; all zero for p = 1."""
    keep = ops.cast(u >= p, ms.float32)
    return keep / ops.maximum(1.0 - p, 1e-12)


class DropCov(nn.Cell):
    """DropCov representation: [1x1 conv + BN + ReLU] -> (training: ECA, adaptive channel dropout)
    -> covariance -> upper triangle. (B, C_in, H, W) -> (B, d(d+1)/2), ``output_dim`` = d(d+1)/2.

    ``dimension_reduction`` d (256; 0 keeps the backbone's channels), ``eca_kernel`` (3, odd),
    ``rate_scale`` (10: p = 1 - rate_scale / log2(d) * mean cos). ``set_train(False)`` skips ECA and
    dropout. ``draw`` (a Cell mapping a (B, d) shape tuple to U[0, 1) draws) is where the masks come
    from; tests may swap it for fixed draws.
    """

    def __init__(self, in_channels, dimension_reduction=256, eca_kernel=ECA_KERNEL, rate_scale=RATE_SCALE):
        super().__init__(auto_prefix=False)
        self.reduce = _Reduction(in_channels, dimension_reduction)  # layer_reduce, layer_reduce_bn
        self.dim = self.reduce.dim
        if self.dim < 2:
            raise ValueError(f"DropCov needs at least 2 channels (its rate divides by log2 d), got {self.dim}")
        self.eca_layer = ECALayer(eca_kernel)
        self.eca_layer.update_parameters_name("eca_layer.")  # the reference's name: eca_layer.conv.weight
        self.rate_coef = float(rate_scale) / math.log2(self.dim)
        self.cov = CovPool()
        self.triu = TriuVec()
        self.draw = UniformDraw()
        self.output_dim = self.dim * (self.dim + 1) // 2

    def acd_cov(self, x, u):
        """Training path on float32 (B, d, H, W) features and U[0, 1) draws u (B, d): (B, d, d) covariance
        of the ECA-weighted, channel-dropped features (see the module docstring)."""
        y = self.eca_layer(x)
        b, c = y.shape
        x = x * y.reshape(b, c, 1, 1) + x
        sigma = self.cov(x)
        s = channel_scale(u, adaptive_rate(y, sigma, self.rate_coef))
        return sigma * (s.reshape(b, c, 1) * s.reshape(b, 1, c))

    def construct(self, x):
        x = self.reduce(x)
        dtype = x.dtype
        x = _to_float32(x)
        if self.training:
            y = self.triu(self.acd_cov(x, self.draw((x.shape[0], x.shape[1]))))
        else:
            y = self.triu(self.cov(x))
        return y if dtype == ms.float32 else ops.cast(y, dtype)

    def matmul_flops(self, height, width):
        """Multiply-adds of the covariance for one image (the training path adds O(d^2) more)."""
        return self.dim * self.dim * height * width


class UniformDraw(nn.Cell):
    """U[0, 1) float32 draws of a given shape on the device, seeded from the global seed at build time."""

    def __init__(self):
        super().__init__()
        seed0, seed1 = _get_graph_seed(0, "dropcov")
        self.uniform = ops.UniformReal(seed=seed0, seed2=seed1)

    def construct(self, shape):
        return self.uniform(shape)
