"""Classification networks = backbone (``features``) -> ``representation`` -> ``classifier``.

``create_model(arch, head, num_classes, classifier="auto", **head_kwargs)`` builds them from small
registries (ARCHS, HEADS, CLASSIFIERS), so a new backbone, representation or classifier is one
registry entry, not a new branch.

Parameter names follow torchvision / fast-MPN-COV exactly (conv1.weight, layer4.2.bn3.gamma,
layer1.0.downsample.0.weight, features.0.weight for VGG, layer_reduce.weight, fc.weight,
classifier.0.weight, ...): the top network Cell does not prefix its children's names
(``auto_prefix=False``), so ``features``, ``representation`` and ``classifier`` are structure only
and PyTorch checkpoints map one to one.
"""
import functools
import math
from typing import Callable, NamedTuple

from mindspore import nn
from mindspore.common.initializer import Uniform

from src.bilinear import BCNN, CBP
from src.dropcov import DropCov
from src.isice import ISICE
from src.isqrt_cov import ISqrtCov
from src.models.preprocess import InputNormalize
from src.models.resnet import RESNETS, ResNetBackbone
from src.models.vgg import MLPClassifier, vgg16_bn


class Backbone(NamedTuple):
    """A registry entry: ``build(last_stride)`` returns a Cell with ``out_channels`` mapping
    (B, 3, H, W) images to (B, out_channels, h, w) features. ``mlp_heads`` are the heads whose
    default classifier is the three-layer MLP (fast-MPN-COV's mpncovvgg16_bn), not one linear layer."""
    build: Callable
    mlp_heads: tuple = ()


ARCHS = {name: Backbone(functools.partial(ResNetBackbone, block, layers))
         for name, (block, layers) in RESNETS.items()}
ARCHS["vgg16_bn"] = Backbone(vgg16_bn, mlp_heads=("isqrt_cov",))


class GlobalAvgPool(nn.Cell):
    """Global average pooling: (B, C, H, W) -> (B, C), the standard ResNet representation."""

    def __init__(self, in_channels):
        super().__init__()
        self.output_dim = in_channels

    def construct(self, x):
        return x.mean(axis=(2, 3))


class Classifier(nn.Cell):
    """The FC layer, wrapped so that its parameters are named ``fc.weight`` / ``fc.bias``.

    Initialised as PyTorch's nn.Linear (weight and bias uniform in +-1/sqrt(in)), which is what
    fast-MPN-COV leaves it at."""

    prefix = "fc."
    input_weight = output_weight = "fc.weight"

    def __init__(self, in_features, num_classes):
        super().__init__()
        bound = 1.0 / math.sqrt(in_features)
        self.fc = nn.Dense(in_features, num_classes, weight_init=Uniform(bound), bias_init=Uniform(bound))

    def construct(self, x):
        return self.fc(x)


def _isqrt_cov(in_channels, iter_num=5, dimension_reduction=256, is_sqrt=True, is_vec=True, sqrt_method="ns"):
    return ISqrtCov(in_channels, dimension_reduction=dimension_reduction, iter_num=iter_num,
                    is_sqrt=is_sqrt, is_vec=is_vec, sqrt_method=sqrt_method)


def _gap(in_channels):
    return GlobalAvgPool(in_channels)


def _bcnn(in_channels, dimension_reduction=0):
    return BCNN(in_channels, dimension_reduction=dimension_reduction)


def _cbp(in_channels, proj_dim=8192, dimension_reduction=0, cbp_method="gram"):
    return CBP(in_channels, proj_dim=proj_dim, dimension_reduction=dimension_reduction, method=cbp_method)


def _dropcov(in_channels, dimension_reduction=256, dropcov_eca_kernel=3, dropcov_rate_scale=10.0):
    return DropCov(in_channels, dimension_reduction=dimension_reduction, eca_kernel=dropcov_eca_kernel,
                   rate_scale=dropcov_rate_scale)


def _isice(in_channels, dimension_reduction=256, isice_steps=5, isice_sparsity=0.01, isice_step_size=1.0,
           isice_ns_iter=7):
    return ISICE(in_channels, dimension_reduction=dimension_reduction, steps=isice_steps, sparsity=isice_sparsity,
                 step_size=isice_step_size, ns_iter=isice_ns_iter)


# head -> (representation builder, its keyword arguments with defaults, layer4 stride)
HEADS = {
    "isqrt_cov": (_isqrt_cov, {"iter_num": 5, "dimension_reduction": 256, "is_sqrt": True, "is_vec": True,
                               "sqrt_method": "ns"}, 1),
    "gap": (_gap, {}, 2),
    # fast-MPN-COV's BCNN and CBP: the backbone unchanged (layer4 at stride 2), no reduction.
    "bcnn": (_bcnn, {"dimension_reduction": 0}, 2),
    "cbp": (_cbp, {"proj_dim": 8192, "dimension_reduction": 0, "cbp_method": "gram"}, 2),
    # DropCov's resnet*_ACD: layer4 at stride 1, 1x1 conv to 256 + BN + ReLU (src/dropcov.py).
    "dropcov": (_dropcov, {"dimension_reduction": 256, "dropcov_eca_kernel": 3, "dropcov_rate_scale": 10.0}, 1),
    # iSICE's main.py: torchvision backbones unchanged (layer4 at stride 2), 1x1 conv to 256 (src/isice.py).
    "isice": (_isice, {"dimension_reduction": 256, "isice_steps": 5, "isice_sparsity": 0.01, "isice_step_size": 1.0,
                       "isice_ns_iter": 7}, 2),
}


# classifier kind -> Cell(in_features, num_classes); each names its parameters under its ``prefix``
CLASSIFIERS = {"linear": Classifier, "mlp": MLPClassifier}
CLASSIFIER_CHOICES = ("auto",) + tuple(CLASSIFIERS)


class ClassificationNet(nn.Cell):
    """features -> representation -> classifier.

    Attributes: ``arch``, ``head``, ``num_classes``, ``classifier_kind`` ("linear" or "mlp");
    ``classifier_prefix`` ("fc." or "classifier.") is the name prefix of the classifier's parameters
    (its own learning rate in finetuning, or skipped when loading weights for another number of
    classes). ``input_norm``: an InputNormalize the images pass first (build_network's networks take
    uint8 images), or None for inputs normalised already."""

    def __init__(self, features, representation, num_classes, arch="", head="", classifier="linear",
                 input_norm=None):
        super().__init__(auto_prefix=False)
        self.input_norm = input_norm if input_norm is not None else nn.Identity()
        self.features = features
        self.representation = representation
        self.classifier = CLASSIFIERS[classifier](representation.output_dim, num_classes)
        self.classifier_kind = classifier
        self.classifier_prefix = self.classifier.prefix
        self.arch = arch
        self.head = head
        self.num_classes = num_classes

    def forward_features(self, x):
        return self.features(self.input_norm(x))

    def forward_head(self, f):
        return self.classifier(self.representation(f))

    def construct(self, x):
        return self.forward_head(self.forward_features(x))


def _choices(names):
    return ", ".join(sorted(names))


def resolve_classifier(arch, head, classifier="auto"):
    """The classifier kind: "auto" is fast-MPN-COV's choice for the network (the MLP for
    vgg16_bn + isqrt_cov as mpncovvgg16_bn, one linear layer otherwise)."""
    if classifier not in CLASSIFIER_CHOICES:
        raise ValueError(f"unknown classifier {classifier!r}: choose one of {', '.join(CLASSIFIER_CHOICES)}")
    if classifier != "auto":
        return classifier
    return "mlp" if head in ARCHS[arch].mlp_heads else "linear"


def create_model(arch, head, num_classes, classifier="auto", mean=None, std=None, **head_kwargs):
    """Build ``arch`` (resnet18/34/50/101/152, vgg16_bn) with ``head`` (a HEADS key) and a
    ``classifier`` ("auto", "linear" or "mlp", see resolve_classifier).

    head_kwargs of "isqrt_cov": iter_num (5), dimension_reduction (256; 0/None keeps the backbone
    channels), is_sqrt (True), is_vec (True), sqrt_method ("ns", "mtp_lya", "mpa_lya", "svd_pade":
    src/matrix_functions). "gap" takes none. "bcnn": dimension_reduction (0).
    "cbp": proj_dim (8192), dimension_reduction (0), cbp_method ("gram" or "fft": the same result,
    src/bilinear.py). The "isqrt_cov" ResNet is
    fast-MPN-COV's mpncovresnet: layer4 at stride 1, 1x1 conv to 256 + BN + ReLU, CovPool,
    Newton-Schulz square root, upper triangle, FC; "vgg16_bn" + "isqrt_cov" is its mpncovvgg16_bn
    (VGG-16-BN features without the last max-pool, the same head, classifier 32896 -> 4096 ->
    4096 -> classes). "dropcov" (src/dropcov.py): dimension_reduction (256), dropcov_eca_kernel (3),
    dropcov_rate_scale (10); DropCov's resnet*_ACD, layer4 at stride 1, ECA and adaptive channel
    dropout in training only, covariance, upper triangle, FC. "isice" (src/isice.py):
    dimension_reduction (256), isice_steps (5), isice_sparsity (0.01), isice_step_size (1.0),
    isice_ns_iter (7); iSICE's main.py networks, backbone unchanged (layer4 at stride 2). Both take one
    linear classifier on every backbone (their authors' finetuned VGG has one). The config keys of
    the same names (src/config_schema.py) reach them through src.factory.head_kwargs; iter_num stays
    iSQRT-COV's (iSICE's inverse square roots have their own count, isice_ns_iter).
    ``mean``/``std`` (0-255 scale): the network takes 0-255 images (uint8) and normalises them first
    (InputNormalize); None: it takes normalised float images. Unknown names raise ValueError listing
    the valid ones.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}: choose one of {_choices(ARCHS)}")
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}: choose one of {_choices(HEADS)}")
    build, defaults, last_stride = HEADS[head]
    unknown = set(head_kwargs) - set(defaults)
    if unknown:
        valid = _choices(defaults) if defaults else "none"
        raise ValueError(f"unknown argument(s) {_choices(unknown)} for head {head!r}: valid ones are {valid}")
    if int(num_classes) != num_classes or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    kind = resolve_classifier(arch, head, classifier)
    features = ARCHS[arch].build(last_stride=last_stride)
    representation = build(features.out_channels, **{**defaults, **head_kwargs})
    norm = InputNormalize(mean, std) if mean is not None or std is not None else None
    return ClassificationNet(features, representation, int(num_classes), arch=arch, head=head, classifier=kind,
                             input_norm=norm)
