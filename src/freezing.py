"""freeze_layers: the first N backbone stages are not trained (fast-MPN-COV's ``--freezed-layer``, which
counts the children of its ``features`` instead: conv1, bn1, relu, maxpool, layer1.. for a ResNet, single
layers for a VGG; its 5 on a ResNet is freeze_layers=2 here, its 30 on VGG-16, all features, is 5);
freeze_backbone_epochs: only the head (representation + classifier) is trained for the first N epochs.

Stages, in order: for ResNets the stem (conv1, bn1) then layer1..layer4 (5 stages); for VGG the
conv blocks ending at each max pool (5 stages for VGG-16, the last without its pool). A frozen
parameter gets ``requires_grad = False``: it is left out of ``net.trainable_params()``, so of the
optimizer's weights, and so gets no gradient and no update (nor weight decay or momentum).
As in fast-MPN-COV, which only sets ``requires_grad = False``, frozen BatchNorm layers stay in
training mode: their moving mean/variance still follow the batches (they are statistics, not
trained parameters).
"""
import mindspore as ms
import numpy as np
from mindspore import nn, ops

from src.checkpoint import head_parameter_names
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


# ----------------------------------------------------------------- freeze_backbone_epochs
# The two-stage recipe (fast-MPN-COV's two_stage_finetune.sh: first only the head, then everything)
# in one run with one optimizer, so that latest.ckpt has the same training state in either stage
# and --resume_ckpt works across the change: during the first N epochs the backbone's parameter
# groups have a zero learning rate (Momentum's update lr * moment leaves them exactly unchanged),
# and at the start of epoch N their momentum buffers are zeroed, as the authors' second run starts
# a fresh optimizer (otherwise N epochs of gradients accumulated at lr 0 would land in one step).
# The backbone's gradients are still computed in the first stage (the authors' frozen layers need
# none): the head-only stage costs as much per step as the second.

def backbone_lr(cfg, lr_per_step):
    """The backbone groups' per-step lr: ``lr_per_step`` (numpy, one value per step of the run)
    with the steps of the first cfg.freeze_backbone_epochs epochs at 0."""
    epochs = cfg.freeze_backbone_epochs
    steps = len(lr_per_step) * min(epochs, cfg.epoch_size) // cfg.epoch_size
    out = lr_per_step.copy()
    out[:steps] = 0
    return out


def start_epoch_stage(cfg, net, optimizer, epoch, first_step):
    """At the first step of epoch cfg.freeze_backbone_epochs, zero the backbone's momentum buffers.
    Returns the line to log ('' when nothing changes)."""
    if cfg.freeze_backbone_epochs <= 0 or epoch != cfg.freeze_backbone_epochs or first_step:
        return ""
    head = head_parameter_names(net)
    count = 0
    for param, moment in zip(optimizer.parameters, optimizer.moments):
        if param.name not in head:
            # in place: set_data would swap the tensor and leave the compiled step on the old buffer
            ops.assign(moment, ms.Tensor(np.zeros(moment.shape), moment.dtype))
            count += 1
    return (f"freeze_backbone_epochs={cfg.freeze_backbone_epochs}: epoch {epoch + 1} trains the backbone too "
            f"({count} parameters, their momentum started afresh)")
