"""ResNet and VGG-16-BN backbones with iSQRT-COV or GAP heads, their complexity, and PyTorch checkpoint import.

    from src.models import create_model, count_params, count_flops
    net = create_model("resnet50", "isqrt_cov", 1000, iter_num=5)
"""
from src.models.complexity import count_flops, count_params
from src.models.network import ARCHS, CLASSIFIERS, HEADS, ClassificationNet, create_model

__all__ = ["create_model", "count_params", "count_flops", "ARCHS", "HEADS", "CLASSIFIERS", "ClassificationNet"]
