"""Key layouts of PyTorch checkpoints and their renaming to this project's parameter names.

A fast-MPN-COV user holds state_dicts in one of these layouts (``detect_layout`` tells which from
the keys alone):

- "resnet": torchvision's ResNet or fast-MPN-COV's own ``mpncovresnet50/101`` (conv1, bn1,
  layer1-4, layer_reduce, layer_reduce_bn, fc): our names already.
- "basemodel-resnet": what fast-MPN-COV's ``main.py`` saves for a ResNet. ``model_init.get_model``
  regroups the network as ``Basemodel``: ``features`` = nn.Sequential of conv1, bn1, relu, maxpool,
  layer1-4 (features.0-7) and, when finetuned from the published mpncovresnet weights
  (``--pretrained``), layer_reduce, its BN and ReLU (features.8-10); ``representation`` = the
  MPNCOV / GAvP / BCNN / CBP module, whose 1x1 reduction conv and BN (trained from scratch) are
  ``representation.conv_dr_block.0/.1``; ``classifier`` = one nn.Linear.
- "vgg": torchvision's ``vgg16_bn``, fast-MPN-COV's ``mpncovvgg16_bn`` and what ``main.py`` saves
  for either: ``features.<index>`` (torchvision's nn.Sequential indices, our names),
  ``representation.conv_dr_block.0/.1`` for the reduction, and a ``classifier`` that is either
  nn.Sequential (classifier.0/3/6, our "mlp") or one nn.Linear (``classifier.weight``, our fc).

Two later GCP codebases save the same layouts (the keys alone cannot tell them apart, so the
description names the source by the target head):

- DropCov (mingzeG/DropCov, ``CNNs/models/ResNet_ACD.py``): ``resnet*_ACD`` is a "resnet" layout
  with layer4 at stride 1, ``layer_reduce`` / ``layer_reduce_bn``, ``eca_layer.conv`` (Conv1d
  weight (1, 1, 3)) and ``fc``; its main.py wraps the whole model in DataParallel (``module.``).
- iSICE (csiro-robotics/iSICE, ``main.py`` / ``model_init.py`` / ``src/network/base.py``): fast-MPN-COV's
  Basemodel, so "basemodel-resnet" (torchvision ResNet children in ``features``, layer4 at stride 2)
  or "vgg" (``features[:-1]``), the SICE representation's reduction in
  ``representation.conv_dr_block.0/.1`` and one nn.Linear ``classifier`` (finetuned with
  ``--pretrained``, as its scripts do; VGG's 4096-4096 MLP otherwise).

DataParallel adds ``module.``: in front of every key (DataParallel / DistributedDataParallel on
the whole model) or after ``features.`` (``main.py`` wraps only ``model.features``); both are
removed. BatchNorm modules are recognised by their ``running_mean`` entry, whatever their name,
and their fields renamed weight/bias/running_mean/running_var -> gamma/beta/moving_mean/
moving_variance; num_batches_tracked has no MindSpore counterpart and is dropped.
"""
import re

_BN_FIELDS = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean", "running_var": "moving_variance"}

# Basemodel's features.<i> for an (mpnconv)ResNet: children of the torchvision-style network in order.
_BASEMODEL_RESNET = {0: "conv1", 1: "bn1", 4: "layer1", 5: "layer2", 6: "layer3", 7: "layer4",
                     8: "layer_reduce", 9: "layer_reduce_bn"}
_REDUCTION = {"representation.conv_dr_block.0.": "layer_reduce.", "representation.conv_dr_block.1.": "layer_reduce_bn."}


def strip_data_parallel(name):
    """Key without DataParallel's 'module.' (leading, or after 'features.' as main.py wraps it)."""
    if name.startswith("module."):
        name = name[len("module."):]
    return name.replace(".module.", ".", 1) if name.startswith("features.module.") else name


def detect_layout(names):
    """"resnet", "basemodel-resnet" or "vgg" from the (DataParallel-stripped) keys; None if none fits."""
    if any(n.startswith(("conv1.", "layer1.")) for n in names):
        return "resnet"
    if any(re.match(r"features\.\d+\.\d+\.conv1\.weight$", n) for n in names):
        return "basemodel-resnet"
    if any(re.match(r"features\.\d+\.weight$", n) for n in names):
        return "vgg"
    return None


def _rename_basemodel_resnet(name):
    m = re.match(r"features\.(\d+)\.(.*)$", name)
    if m and int(m.group(1)) in _BASEMODEL_RESNET:
        return f"{_BASEMODEL_RESNET[int(m.group(1))]}.{m.group(2)}"
    if name.startswith("classifier."):
        return "fc." + name[len("classifier."):]
    return _rename_reduction(name)


def _rename_reduction(name):
    for old, new in _REDUCTION.items():
        if name.startswith(old):
            return new + name[len(old):]
    return name


def _rename_vgg(name):
    if re.match(r"classifier\.(weight|bias)$", name):  # one nn.Linear: our linear classifier
        return "fc." + name[len("classifier."):]
    return _rename_reduction(name)


_RENAME = {"resnet": lambda n: n, "basemodel-resnet": _rename_basemodel_resnet, "vgg": _rename_vgg}


# Basemodel (main.py) checkpoints read into these heads come from these authors' code, not fast-MPN-COV's.
_MAIN_PY_SOURCE = {"isice": "iSICE main.py {} + SICE (reduction conv in representation.conv_dr_block)"}


def describe_layout(layout, names, head=None):
    """One line for the user: the layout, where its reduction sits, its classifier. ``names``:
    the (DataParallel-stripped) state_dict, {torch key: array}; ``head``: the target head, which
    names the source of a Basemodel layout several codebases share (see the module docstring)."""
    source = _MAIN_PY_SOURCE.get(head)
    reduced = any(n.startswith("representation.conv_dr_block.") for n in names)
    if layout == "resnet":
        if any(n.startswith("eca_layer.") for n in names):
            base = "DropCov resnet*_ACD (layer_reduce, eca_layer.conv)"
        else:
            base = ("fast-MPN-COV mpncovresnet" if any(n.startswith("layer_reduce.") for n in names)
                    else "torchvision ResNet")
    elif layout == "basemodel-resnet":
        if source and reduced:
            base = source.format("ResNet")
        elif any(n.startswith("features.8.") for n in names):
            base = ("fast-MPN-COV main.py ResNet finetuned from the published weights (--pretrained: "
                    "reduction conv in features.8/9)")
        elif reduced:
            base = "fast-MPN-COV main.py ResNet trained from scratch (reduction conv in representation.conv_dr_block)"
        else:
            base = "fast-MPN-COV main.py ResNet without reduction conv (GAvP, BCNN, CBP or MPNCOV without one)"
    else:
        first = names.get("classifier.0.weight")
        if first is not None and first.shape[-1] == 512 * 7 * 7:  # after torchvision's 7x7 adaptive pool
            base = "torchvision vgg16_bn"
        elif source and reduced:
            base = source.format("VGG")
        elif reduced:
            base = "fast-MPN-COV mpncovvgg16_bn / VGG + MPNCOV (reduction conv in representation.conv_dr_block)"
        else:
            base = "fast-MPN-COV main.py VGG without reduction conv (GAvP, BCNN, CBP or MPNCOV without one)"
    if any(n.startswith("classifier.0.") for n in names):
        cls = "three-layer classifier (classifier.0/3/6)"
    elif any(n.startswith(("fc.", "classifier.")) for n in names):
        cls = "one linear classifier"
    else:
        cls = "no classifier"
    return f"{base}; {cls}"


def bn_modules(names):
    """Module paths that are BatchNorm layers: those with a running_mean entry."""
    return {n[:-len(".running_mean")] for n in names if n.endswith(".running_mean")}


def rename_state(state, head=None):
    """{torch key: array} -> (layout, description, {MindSpore name: array}); ``head`` (the target's)
    only words the description. Raises ValueError on keys of no known layout."""
    state = {strip_data_parallel(k): v for k, v in state.items()}
    layout = detect_layout(state)
    if layout is None:
        raise ValueError("the keys fit no known layout (torchvision / fast-MPN-COV ResNet or VGG); first keys: "
                         + ", ".join(list(state)[:6]))
    bns = bn_modules(state)
    out = {}
    for name, value in state.items():
        module, _, field = name.rpartition(".")
        if field == "num_batches_tracked":
            continue
        if module in bns and field in _BN_FIELDS:
            name = f"{module}.{_BN_FIELDS[field]}"
        out[_RENAME[layout](name)] = value
    return layout, describe_layout(layout, state, head), out
