"""PyTorch models of the same networks as ``src.models``: the parity reference of the checkpoint
converter's tests and the peer of the training-speed benchmark.

``create_torch_model(arch, head, num_classes, iter_num=5, dimension_reduction=256)``:
- "gap": the torchvision v1.5 ResNet (stride on the bottleneck's 3x3 conv), state_dict keys as
  torchvision's;
- "isqrt_cov": fast-MPN-COV's mpncovresnet (layer4 at stride 1, layer_reduce 1x1 conv + BN + ReLU,
  covariance pooling, Newton-Schulz square root, upper triangle, fc), state_dict keys as
  fast-MPN-COV's.
The meta-layer is the iSQRT-COV forward written with torch ops and differentiated by autograd,
which on CPU is cheaper than fast-MPN-COV's hand-written backward (4 + 10N products). Upper
triangle order: ``triu_order="row"`` is numpy.triu_indices order, the order of fast-MPN-COV's
current Triuvec and of ``src.isqrt_cov.TriuVec``; ``"column"`` is the order of fast-MPN-COV's
earlier Triuvec (lower triangle read row by row), the one its published ResNet-50 weights were
trained with (fast-MPN-COV issue #20).
Initialisation as the reference: conv Kaiming normal (fan_out, relu), BN weight 1 / bias 0, fc
PyTorch's default.
"""
import numpy as np
import torch
from torch import nn

TRACE_EPS = 1e-20
TRIU_ORDERS = ("row", "column")


def conv3x3(in_channels, out_channels, stride=1):
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_channels, out_channels, stride=1):
    return nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_channels, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = conv3x3(in_channels, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_channels, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = conv1x1(in_channels, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


ARCHS = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
    "resnet152": (Bottleneck, (3, 8, 36, 3)),
}


def cov_pool(x):
    """(B, C, H, W) -> (B, C, C): covariance of the H*W spatial features, centred, divided by M."""
    b, c, h, w = x.shape
    xc = x.reshape(b, c, h * w)
    xc = xc - xc.mean(dim=2, keepdim=True)
    return torch.bmm(xc, xc.transpose(1, 2)) / (h * w)


def sqrtm_newton_schulz(a, iter_num=5):
    """Trace pre-normalisation, coupled Newton-Schulz (Z0 = I costs no product), compensation."""
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    norm = a.diagonal(dim1=1, dim2=2).sum(dim=1).view(-1, 1, 1) + TRACE_EPS
    y = a / norm
    z = eye
    for k in range(1, iter_num + 1):
        t = 1.5 * eye - 0.5 * (y if k == 1 else torch.bmm(z, y))
        if k < iter_num:
            y, z = torch.bmm(y, t), (t if k == 1 else torch.bmm(t, z))
        else:
            y = torch.bmm(y, t)
    return y * torch.sqrt(norm)


def triu_index(d, order="row"):
    """Flat positions gathered from a d x d matrix: "row" = numpy.triu_indices order; "column" =
    the lower triangle row by row (for a symmetric matrix: the upper triangle column by column)."""
    if order not in TRIU_ORDERS:
        raise ValueError(f"triu_order must be one of {TRIU_ORDERS}, got {order!r}")
    rows, cols = np.triu_indices(d) if order == "row" else np.tril_indices(d)
    return torch.from_numpy((rows * d + cols).astype(np.int64))


class ISqrtCovHead(nn.Module):
    """CovPool -> Newton-Schulz square root -> upper triangle (the reduction conv sits on the
    network itself, as in fast-MPN-COV, so the state_dict keys match)."""

    def __init__(self, dim, iter_num=5, triu_order="row"):
        super().__init__()
        self.iter_num = iter_num
        self.register_buffer("index", triu_index(dim, triu_order), persistent=False)

    def forward(self, x):
        y = sqrtm_newton_schulz(cov_pool(x), self.iter_num)
        return y.reshape(y.shape[0], -1)[:, self.index]


class TorchResNet(nn.Module):
    def __init__(self, block, layers, num_classes=1000, head="gap", iter_num=5,
                 dimension_reduction=256, triu_order="row"):
        super().__init__()
        if head not in ("gap", "isqrt_cov"):
            raise ValueError(f"unknown head {head!r}: choose gap or isqrt_cov")
        self.head = head
        self.in_channels = 64
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0], 1)
        self.layer2 = self._make_layer(block, 128, layers[1], 2)
        self.layer3 = self._make_layer(block, 256, layers[2], 2)
        self.layer4 = self._make_layer(block, 512, layers[3], 1 if head == "isqrt_cov" else 2)
        channels = 512 * block.expansion
        if head == "isqrt_cov":
            self.reduce = bool(dimension_reduction)
            if self.reduce:
                self.layer_reduce = nn.Conv2d(channels, dimension_reduction, 1, bias=False)
                self.layer_reduce_bn = nn.BatchNorm2d(dimension_reduction)
                self.layer_reduce_relu = nn.ReLU(inplace=True)
                channels = dimension_reduction
            self.representation = ISqrtCovHead(channels, iter_num, triu_order)
            features = channels * (channels + 1) // 2
        else:
            self.representation = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
            features = channels
        self.fc = nn.Linear(features, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, block, planes, blocks, stride):
        downsample = None
        if stride != 1 or self.in_channels != planes * block.expansion:
            downsample = nn.Sequential(conv1x1(self.in_channels, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        mods = [block(self.in_channels, planes, stride, downsample)]
        self.in_channels = planes * block.expansion
        mods += [block(self.in_channels, planes) for _ in range(1, blocks)]
        return nn.Sequential(*mods)

    def forward_features(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x):
        x = self.forward_features(x)
        if self.head == "isqrt_cov" and self.reduce:
            x = self.layer_reduce_relu(self.layer_reduce_bn(self.layer_reduce(x)))
        return self.fc(self.representation(x))


def create_torch_model(arch, head, num_classes, iter_num=5, dimension_reduction=256, triu_order="row"):
    """The PyTorch twin of ``src.models.create_model(arch, head, num_classes, ...)``."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}: choose one of {', '.join(ARCHS)}")
    block, layers = ARCHS[arch]
    return TorchResNet(block, layers, num_classes, head, iter_num, dimension_reduction, triu_order)


def randomize_(model, seed=0):
    """Random weights and non-trivial BN statistics (so eval-mode BN matters), in place.

    Conv weights Kaiming normal (fan_out) as fast-MPN-COV's ResNets and VGG (PyTorch's default would
    shrink VGG's features layer after layer until the logits are the classifier's bias), conv biases
    (VGG) small and random, fc weights their reference initialisation, all drawn from ``seed``; BN
    weight, bias, running mean and running variance are drawn away from 1/0/0/1."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    m.bias.copy_(0.1 * torch.randn(m.out_channels, generator=gen))
            elif isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(0.5 + torch.rand(n, generator=gen))
                m.bias.copy_(0.1 * torch.randn(n, generator=gen))
                m.running_mean.copy_(0.1 * torch.randn(n, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(n, generator=gen))
            elif isinstance(m, nn.Linear):
                m.reset_parameters()
    return model
