"""PyTorch networks with exactly the module names of DropCov's and iSICE's code, the references of
the converter's tests for the "dropcov" and "isice" heads (written from their code's semantics).

- ``ResNetACD``: DropCov's ``ResNet_ACD`` (mingzeG/DropCov, ``CNNs/models/ResNet_ACD.py``): torchvision
  ResNet names, layer4 at stride 1, ``eca_layer`` (``conv``: Conv1d(1, 1, 3, bias=False)),
  ``layer_reduce`` / ``layer_reduce_bn`` / ``layer_reduce_relu``, ``fc``. Training adds ECA and
  Dropout2d with the rate read by ``.item()``, as theirs; evaluation is covariance, triu, fc.
- ``SICE`` inside fast-MPN-COV's ``Basemodel`` (tests/fast_mpn_cov_models.py), as iSICE's main.py
  builds it: ``features`` (torchvision ResNet children up to layer4, at stride 2; or VGG-16-BN's
  features without the last pool), ``representation`` = SICE with ``conv_dr_block`` (1x1 conv, BN,
  ReLU), ``classifier`` = one nn.Linear (``--pretrained``, as their finetuning scripts). The SICE
  forward is their algorithm with torch autograd; the ridge is the head's deterministic 1e-9 I
  instead of their per-call random draw (tests/test_isice.py measures the two within 1e-6).
"""
import math

import torch
from torch import nn

from bench.peers.torch_resnet import ARCHS, TorchResNet, cov_pool, create_torch_model, triu_index
from tests import fast_mpn_cov_models as fm

ISICE_EPS = 1e-9


class EcaLayer(nn.Module):
    def __init__(self, channel, k_size=3):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.conv = nn.Conv1d(1, 1, kernel_size=k_size, padding=(k_size - 1) // 2, bias=False)
        self.softmax = nn.Softmax(dim=1)

    def forward(self, x):
        y = self.avg_pool(x)
        y = self.conv(y.squeeze(-1).transpose(-1, -2)).transpose(-1, -2).unsqueeze(-1)
        y = self.softmax(y)
        return x * y.expand_as(x) + x, y


class ResNetACD(TorchResNet):
    """fast-MPN-COV's mpncovresnet layout (bench/peers/torch_resnet.py: layer4 at stride 1, layer_reduce,
    fc on the upper triangle) plus DropCov's eca_layer, as resnet*_ACD."""

    def __init__(self, block, layers, num_classes=1000, dim=256):
        super().__init__(block, layers, num_classes, head="isqrt_cov", dimension_reduction=dim)
        self.eca_layer = EcaLayer(dim)
        self.register_buffer("index", triu_index(dim), persistent=False)

    @staticmethod
    def rate(x, y):
        """DropCov's adaptive rate: 1 - 10 / log2(d) * mean cos(y, row sums of Cov(x)), clamped to [0, 1]."""
        y = torch.flatten(y, 1)
        cor = cov_pool(x).sum(dim=2)
        cos = (y * cor).sum(dim=1) / (y.norm(dim=1) * cor.norm(dim=1))
        return torch.clamp(1 - (10 / math.log2(x.shape[1])) * cos.mean(), 0, 1)

    def balance_rate(self, x, y):
        return nn.Dropout2d(self.rate(x, y).item())(x)

    def forward(self, x):
        x = self.layer_reduce_relu(self.layer_reduce_bn(self.layer_reduce(self.forward_features(x))))
        if self.training:
            x, y = self.eca_layer(x)
            x = self.balance_rate(x, y)
        y = cov_pool(x)
        return self.fc(y.reshape(y.shape[0], -1)[:, self.index])


def resnet_acd(arch, num_classes, dim=256):
    block, layers = ARCHS[arch]
    return ResNetACD(block, layers, num_classes, dim)


def dropcov_main_py_checkpoint(model, arch):
    """What DropCov's main.py saves: the whole model in DataParallel ('module.'), best_acc1 a tensor."""
    state = {"module." + k: v for k, v in model.state_dict().items()}
    return {"epoch": 100, "arch": arch, "state_dict": state, "best_acc1": torch.tensor(78.19), "optimizer": {}}


def _inv(a, n, eye):
    """(a + eps I)^-1 as Z Z, Z the authors' n-step Newton-Schulz inverse square root."""
    a = a + ISICE_EPS * eye
    tr = a.diagonal(dim1=1, dim2=2).sum(dim=1).view(-1, 1, 1)
    an = a / tr
    zy = 0.5 * (3 * eye - an)
    y, z = an.bmm(zy), zy
    for _ in range(n - 2):
        zy = 0.5 * (3 * eye - z.bmm(y))
        y, z = y.bmm(zy), zy.bmm(z)
    z = 0.5 * (3 * eye - z.bmm(y)).bmm(z) / torch.sqrt(tr)
    return z.bmm(z)


class SICE(nn.Module):
    def __init__(self, iterNum=5, input_dim=2048, dimension_reduction=256, sparsity_val=0.01,  # noqa: N803
                 sice_lrate=1.0):
        super().__init__()
        self.iterNum, self.sparsity, self.learingRate = iterNum, sparsity_val, sice_lrate
        self.conv_dr_block = nn.Sequential(nn.Conv2d(input_dim, dimension_reduction, 1, bias=False),
                                           nn.BatchNorm2d(dimension_reduction), nn.ReLU(inplace=True))
        self.output_dim = dimension_reduction * (dimension_reduction + 1) // 2
        self.register_buffer("index", triu_index(dimension_reduction), persistent=False)

    def forward(self, x):
        c = cov_pool(self.conv_dr_block(x))
        c = c / c.diagonal(dim1=1, dim2=2).sum(-1).view(-1, 1, 1)
        eye = torch.eye(c.shape[-1], dtype=c.dtype)
        p = _inv(c, 7, eye)
        for i in range(self.iterNum):
            g = -_inv(p, 7, eye) + 0.5 * (c.transpose(1, 2) + c)
            dec = 1 - i / (self.iterNum - 1.0)
            plus = torch.relu(torch.relu(p) - self.learingRate * dec * (g + self.sparsity))
            minus = torch.relu(torch.relu(-p) - self.learingRate * dec * (-g + self.sparsity))
            p = plus - minus
            p = 0.5 * (p + p.transpose(1, 2))
        p = p / torch.sqrt(p.diagonal(dim1=1, dim2=2).sum(-1)).view(-1, 1, 1)
        return p.reshape(p.shape[0], -1)[:, self.index]


def isice_main_py(arch, num_classes, dim=256):
    """iSICE main.py -a ARCH --representation SICE --pretrained: Basemodel(features, SICE, nn.Linear)."""
    if arch == "vgg16_bn":
        features, channels = fm.vgg_features()[:-1], 512
    else:
        net = create_torch_model(arch, "gap", num_classes)  # torchvision names, layer4 at stride 2
        features = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3,
                                 net.layer4)
        channels = net.fc.in_features
    rep = SICE(5, channels, dim, 0.01, 1.0)
    return fm.Basemodel(features, rep, nn.Linear(rep.output_dim, num_classes))


def isice_main_py_checkpoint(model, arch, size=64):
    """What iSICE's main.py saves after a step of its AdamW (lr 0: the weights stay as they are, the
    BN statistics move), model.features in DataParallel (main.py without --gpu)."""
    opt = torch.optim.AdamW(model.parameters(), lr=0.0, weight_decay=0.05)
    model.train()
    model(torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))).sum().backward()
    opt.step()
    model.eval()
    model.features = nn.DataParallel(model.features)
    return {"epoch": 100, "arch": arch, "state_dict": model.state_dict(), "best_prec1": 85.9,
            "optimizer": opt.state_dict()}
