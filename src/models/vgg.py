"""VGG-16 with batch normalisation (torchvision's ``vgg16_bn`` features) as a MindSpore backbone,
and the VGG classifier (two hidden layers of 4096 with ReLU and dropout).

Parameter names are torchvision's / fast-MPN-COV's: ``features.<index>.weight`` with the index of
the module in ``nn.Sequential`` (conv at 0, its BN at 1, ReLU 2, conv 3, ..., max-pools between
stages), ``classifier.0/3/6`` for the three fully connected layers. So torchvision's and
fast-MPN-COV's state_dicts map one to one.

fast-MPN-COV drops VGG's last max-pool for every representation (``Basemodel._reconstruct_vgg``
keeps ``features[:-1]``; ``mpncovvgg16_bn`` does the same): the features leave at stride 16
(14x14 at 224, 28x28 at 448), 512 channels. This backbone does the same.
"""
from mindspore import nn
from mindspore.common.initializer import HeNormal, Normal, Zero

from src.models.resnet import batch_norm

# torchvision's configuration "D" (VGG-16): output channels of each 3x3 conv, "M" a 2x2 max-pool.
VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
MLP_HIDDEN = 4096
MLP_DROPOUT = 0.5


def vgg_layers(cfg, drop_last_pool=True):
    """conv 3x3 (bias) + BN + ReLU per number, 2x2 max-pool per "M"; the last pool left out."""
    cells, in_channels = [], 3
    items = list(cfg[:-1]) if drop_last_pool and cfg[-1] == "M" else list(cfg)
    for v in items:
        if v == "M":
            cells.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        cells += [nn.Conv2d(in_channels, v, 3, pad_mode="pad", padding=1, has_bias=True,
                            weight_init=HeNormal(mode="fan_out", nonlinearity="relu"), bias_init=Zero()),
                  batch_norm(v), nn.ReLU()]
        in_channels = v
    return nn.SequentialCell(cells), in_channels


class VGGBackbone(nn.Cell):
    """VGG-BN convolutional features without the last max-pool (fast-MPN-COV's layout).

    (B, 3, H, W) -> (B, 512, H/16, W/16). ``last_stride`` is accepted for the common backbone
    interface and must be 1 or 2: the ResNets' layer4 stride has no VGG counterpart, and every
    fast-MPN-COV representation sees VGG features at stride 16."""

    def __init__(self, cfg=VGG16_CFG, last_stride=1):
        super().__init__()
        if last_stride not in (1, 2):
            raise ValueError(f"last_stride must be 1 or 2, got {last_stride!r}")
        self.features, self.out_channels = vgg_layers(cfg)

    def construct(self, x):
        return self.features(x)


def vgg16_bn(last_stride=1):
    return VGGBackbone(VGG16_CFG, last_stride)


class MLPClassifier(nn.Cell):
    """in -> 4096 -> ReLU -> dropout -> 4096 -> ReLU -> dropout -> classes, named classifier.0/3/6
    as torchvision's VGG and mpncovvgg16_bn. Weights N(0, 0.01), biases 0 (their initialisation)."""

    prefix = "classifier."
    input_weight = "classifier.0.weight"
    output_weight = "classifier.6.weight"

    def __init__(self, in_features, num_classes, hidden=MLP_HIDDEN, dropout=MLP_DROPOUT):
        super().__init__()

        def dense(i, o):
            return nn.Dense(i, o, weight_init=Normal(0.01), bias_init=Zero())

        self.classifier = nn.SequentialCell([dense(in_features, hidden), nn.ReLU(), nn.Dropout(p=dropout),
                                             dense(hidden, hidden), nn.ReLU(), nn.Dropout(p=dropout),
                                             dense(hidden, num_classes)])

    def construct(self, x):
        return self.classifier(x)
