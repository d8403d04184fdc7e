"""PyTorch networks with exactly the module names of fast-MPN-COV (jiangtaoxie/fast-MPN-COV), the
references of the converter's tests.

``Basemodel`` is what ``model_init.get_model`` returns and ``main.py`` saves: ``features`` /
``representation`` / ``classifier``, forward = classifier(flatten(representation(features(x)))).
``MPNCOV`` keeps fast-MPN-COV's ``conv_dr_block`` (1x1 conv, BN, ReLU) and computes the iSQRT-COV
forward with torch ops (bench/peers/torch_resnet.py); ``GAvP`` has no parameters. The builders
regroup a bench/peers/torch_resnet.py ResNet (torchvision / mpncovresnet names) as Basemodel does,
sharing its modules, so the regrouped network computes exactly what the original does.
"""
import torch
from torch import nn

from bench.peers.torch_resnet import cov_pool, sqrtm_newton_schulz, triu_index

VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


class MPNCOV(nn.Module):
    def __init__(self, iterNum=5, input_dim=2048, dimension_reduction=None):  # noqa: N803 (their name)
        super().__init__()
        self.iterNum = iterNum
        self.dr = dimension_reduction
        if dimension_reduction is not None:
            self.conv_dr_block = nn.Sequential(nn.Conv2d(input_dim, dimension_reduction, 1, bias=False),
                                               nn.BatchNorm2d(dimension_reduction), nn.ReLU(inplace=True))
        dim = dimension_reduction or input_dim
        self.output_dim = dim * (dim + 1) // 2
        self.register_buffer("index", triu_index(dim), persistent=False)

    def forward(self, x):
        if self.dr is not None:
            x = self.conv_dr_block(x)
        y = sqrtm_newton_schulz(cov_pool(x), self.iterNum)
        return y.reshape(y.shape[0], -1)[:, self.index]


class GAvP(nn.Module):
    def __init__(self, input_dim=2048):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.output_dim = input_dim

    def forward(self, x):
        return self.avgpool(x)


class Basemodel(nn.Module):
    def __init__(self, features, representation, classifier):
        super().__init__()
        self.features = features
        self.representation = representation
        self.classifier = classifier

    def forward(self, x):
        x = self.representation(self.features(x))
        return self.classifier(x.view(x.size(0), -1))


def vgg_features(cfg=VGG16_CFG):
    """torchvision's make_layers(cfg, batch_norm=True): conv (bias), BN, ReLU; 'M' a 2x2 max-pool."""
    layers, in_channels = [], 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(in_channels, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            in_channels = v
    return nn.Sequential(*layers)


def vgg_mlp(in_features, num_classes):
    """VGG's classifier, initialised as mpncovvgg16_bn / torchvision's VGG: N(0, 0.01), bias 0."""
    mlp = nn.Sequential(nn.Linear(in_features, 4096), nn.ReLU(True), nn.Dropout(),
                        nn.Linear(4096, 4096), nn.ReLU(True), nn.Dropout(), nn.Linear(4096, num_classes))
    for m in mlp:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
    return mlp


def mpncovvgg16_bn(num_classes=1000):
    """fast-MPN-COV's mpncovvgg16_bn: features[:-1], MPNCOV 512 -> 256, classifier 32896-4096-4096."""
    return Basemodel(vgg_features()[:-1], MPNCOV(5, 512, 256), vgg_mlp(32896, num_classes))


def main_py_vgg16_bn(representation, num_classes, pretrained):
    """main.py's -a vgg16_bn (or mpncovvgg16_bn without --representation when pretrained): features[:-1],
    the representation, and one nn.Linear when pretrained, else the 4096-4096 MLP."""
    classifier = (nn.Linear(representation.output_dim, num_classes) if pretrained
                  else vgg_mlp(representation.output_dim, num_classes))
    return Basemodel(vgg_features()[:-1], representation, classifier)


def main_py_resnet(net, layout):
    """Regroup a bench/peers/torch_resnet.py network ``net`` as main.py's Basemodel:
    "scratch": mpncovresnet, pretrained=False (reduction in representation.conv_dr_block);
    "finetuned": mpncovresnet, --pretrained (layer_reduce, its BN and ReLU in features.8-10);
    "gavp": a torchvision ResNet with GAvP."""
    stem = [net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4]
    if layout == "gavp":
        return Basemodel(nn.Sequential(*stem), GAvP(net.fc.in_features), net.fc)
    reduce = [net.layer_reduce, net.layer_reduce_bn, net.layer_reduce_relu]
    if layout == "finetuned":
        dim = net.layer_reduce.out_channels
        return Basemodel(nn.Sequential(*stem, *reduce), MPNCOV(5, dim, None), net.fc)
    rep = MPNCOV(5, net.layer_reduce.in_channels, net.layer_reduce.out_channels)
    rep.conv_dr_block = nn.Sequential(*reduce)
    return Basemodel(nn.Sequential(*stem), rep, net.fc)


def main_py_checkpoint(model, arch, wrap="features"):
    """What main.py's save_checkpoint writes, after one SGD step (so the optimizer holds momenta).
    wrap="features": model.features in nn.DataParallel (main.py without --gpu / distributed);
    "model": 'module.' in front of every key (DistributedDataParallel); None: no wrapper (--gpu)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)  # lr 0: the weights stay as they are
    model.train()
    out = model(torch.randn(2, 3, 32, 32))
    out.sum().backward()
    opt.step()
    model.eval()
    if wrap == "features":
        model.features = nn.DataParallel(model.features)
    state = model.state_dict()
    if wrap == "model":
        state = {"module." + k: v for k, v in state.items()}
    return {"epoch": 3, "arch": arch, "state_dict": state, "best_prec1": 12.5, "optimizer": opt.state_dict()}
