"""freeze_layers: the first N backbone stages are not trained (fast-MPN-COV's ``--freezed-layer``).

Stages, in order: for ResNets the stem (conv1, bn1) then layer1..layer4 (5 stages); for VGG the
conv blocks ending at each max pool (5 stages for VGG-16, the last without its pool). A frozen
parameter gets ``requires_grad = False``: it is left out of ``net.trainable_params()``, so of the
optimizer's weights, and so gets no gradient and no update (nor weight decay or momentum).
As in fast-MPN-COV, which only sets ``requires_grad = False``, frozen BatchNorm layers stay in
training mode: their moving mean/variance still follow the batches (they are statistics, not
trained parameters).
"""
from mindspore import nn

from src.errors import ConfigError


def backbone_stages(net):
    """Lists of the backbone's parameters, one per stage, in forward order."""
    features = net.features
    if hasattr(features, "layer1"):  # ResNet
        stem = list(features.conv1.get_parameters()) + list(features.bn1.get_parameters())
        return [stem] + [list(getattr(features, f"layer{i}").get_parameters()) for i in range(1, 5)]
    stages, current = [], []
    for cell in features.features.cell_list if hasattr(features.features, "cell_list") else features.features:
        current += list(cell.get_parameters())
        if isinstance(cell, nn.MaxPool2d):
            stages.append(current)
            current = []
    return stages + ([current] if current else [])


def freeze_layers(net, count):
    """Set requires_grad False on the parameters of the first ``count`` backbone stages.
    Returns the line to log (empty when ``count`` is 0)."""
    if count <= 0:
        return ""
    stages = backbone_stages(net)
    if count > len(stages):
        raise ConfigError(f"freeze_layers={count} but {net.arch} has {len(stages)} backbone stages: "
                          f"use 0..{len(stages)}")
    frozen = [p for stage in stages[:count] for p in stage]
    for p in frozen:
        p.requires_grad = False
    return f"freeze_layers={count}: {len(frozen)} parameters of the first {count} backbone stages not trained"
