"""ResNet backbones (torchvision v1.5 layout) as MindSpore Cells.

The layout and attribute names are those of torchvision's / fast-MPN-COV's ResNet (conv1, bn1,
layer1..layer4, blocks conv1/bn1/..., downsample.0 / .1) so that PyTorch checkpoints map one to
one. The stride of a bottleneck sits on its 3x3 conv (v1.5), padding is explicit and symmetric
(pad_mode="pad") as in PyTorch, because MindSpore's "same" pads stride-2 layers asymmetrically
and would shift every feature map by a pixel against the PyTorch weights.
"""
from mindspore import nn
from mindspore.common.initializer import HeNormal

# PyTorch's BatchNorm2d defaults: momentum 0.1 of the new statistic = MindSpore's 0.9 of the old.
BN_MOMENTUM = 0.9
BN_EPS = 1e-5


def conv(in_channels, out_channels, kernel_size, stride=1):
    """Bias-free conv, "same" for odd kernels at stride 1, Kaiming normal (fan_out, relu) as the reference."""
    return nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, pad_mode="pad",
                     padding=kernel_size // 2, has_bias=False,
                     weight_init=HeNormal(mode="fan_out", nonlinearity="relu"))


def batch_norm(channels):
    """BatchNorm with gamma 1, beta 0 and PyTorch's momentum/eps."""
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class BasicBlock(nn.Cell):
    """Two 3x3 convs (ResNet-18/34)."""
    expansion = 1

    def __init__(self, in_channels, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = conv(in_channels, planes, 3, stride)
        self.bn1 = batch_norm(planes)
        self.conv2 = conv(planes, planes, 3)
        self.bn2 = batch_norm(planes)
        self.relu = nn.ReLU()
        self.downsample = downsample

    def construct(self, x):
        identity = x
        if self.downsample is not None:
            identity = self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Cell):
    """1x1 -> 3x3 (carries the stride, v1.5) -> 1x1 expanding by 4 (ResNet-50/101/152)."""
    expansion = 4

    def __init__(self, in_channels, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = conv(in_channels, planes, 1)
        self.bn1 = batch_norm(planes)
        self.conv2 = conv(planes, planes, 3, stride)
        self.bn2 = batch_norm(planes)
        self.conv3 = conv(planes, planes * self.expansion, 1)
        self.bn3 = batch_norm(planes * self.expansion)
        self.relu = nn.ReLU()
        self.downsample = downsample

    def construct(self, x):
        identity = x
        if self.downsample is not None:
            identity = self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


# arch -> (block, blocks per layer)
RESNETS = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
    "resnet152": (Bottleneck, (3, 8, 36, 3)),
}


class ResNetBackbone(nn.Cell):
    """conv1/bn1/relu/maxpool + layer1..layer4; ``last_stride`` is layer4's stride (1 for
    iSQRT-COV, which keeps 14x14 features at 224 input, 2 for the standard ResNet).
    ``out_channels`` is the channel count of the returned feature map."""

    def __init__(self, block, layers, last_stride=2):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, pad_mode="pad", padding=3, has_bias=False,
                               weight_init=HeNormal(mode="fan_out", nonlinearity="relu"))
        self.bn1 = batch_norm(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, pad_mode="pad", padding=1)
        self._in_channels = 64
        self.layer1 = self._make_layer(block, 64, layers[0], 1)
        self.layer2 = self._make_layer(block, 128, layers[1], 2)
        self.layer3 = self._make_layer(block, 256, layers[2], 2)
        self.layer4 = self._make_layer(block, 512, layers[3], last_stride)
        self.out_channels = 512 * block.expansion

    def _make_layer(self, block, planes, blocks, stride):
        downsample = None
        if stride != 1 or self._in_channels != planes * block.expansion:
            downsample = nn.SequentialCell([conv(self._in_channels, planes * block.expansion, 1, stride),
                                            batch_norm(planes * block.expansion)])
        cells = [block(self._in_channels, planes, stride, downsample)]
        self._in_channels = planes * block.expansion
        cells += [block(self._in_channels, planes) for _ in range(1, blocks)]
        return nn.SequentialCell(cells)

    def construct(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)
