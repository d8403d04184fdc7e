"""Parameter names of MindSpore-native ResNet checkpoints and their renaming to this project's.

A MindSpore user's ImageNet ResNet weights come in one of these layouts (``detect_ms_layout``
tells which from the names alone):

- "mindcv-resnet": mindcv's ``resnet18/34/50/101/152`` (mindcv 0.3.0): conv1, bn1, layer1-4 with
  blocks conv1/bn1/conv2/bn2(/conv3/bn3), the shortcut ``down_sample.0`` (conv) / ``.1`` (BN), and
  ``classifier`` (Dense).
- "modelzoo-resnet": the MindSpore model zoo's ``official/cv/ResNet/src/resnet.py``: conv1, bn1,
  layer1-4, the shortcut ``down_sample_layer.0`` / ``.1``, basic blocks (resnet18/34) with their
  BNs named ``bn1d`` / ``bn2d``, bottlenecks (resnet50/101/152) with bn1/bn2/bn3, and ``end_point``
  (Dense). Its resnet50/101/152 use pad_mode="same" for the 7x7 stem, the max pool and the stride-2
  3x3 convolutions (padding bottom/right only; torchvision and this project pad symmetrically) and
  BatchNorm eps 1e-4, so its weights load exactly but features can differ slightly at the borders;
  its resnet18/34 (``res_base``) pad as torchvision does. Names checked against that file at commit
  eab643f (tests/data/modelzoo_resnet_names.json).

Both already use MindSpore's BN field names (gamma/beta/moving_mean/moving_variance); only the
cell names differ. The ImageNet classifier is renamed to ``fc`` so that a finetuning with the same
number of classes keeps it; with another number it is left at initialisation (src/checkpoint.py).
Training-state entries (optimizer moments ``moments.<name>``, step counters) are left as they are.
"""
import re

# (pattern, replacement) applied in order to each parameter name of the layout
_RULES = {
    "mindcv-resnet": ((r"\.down_sample\.", ".downsample."), (r"^classifier\.", "fc.")),
    "modelzoo-resnet": ((r"\.down_sample_layer\.", ".downsample."), (r"\.bn1d\.", ".bn1."),
                        (r"\.bn2d\.", ".bn2."), (r"^end_point\.", "fc.")),
}


def detect_ms_layout(names):
    """"mindcv-resnet", "modelzoo-resnet" or None (this project's own names, or another network)."""
    names = [n for n in names if n.startswith(("conv1.", "bn1.", "layer", "classifier.", "end_point."))]
    if any(n.startswith("end_point.") or ".down_sample_layer." in n or re.search(r"\.bn[12]d\.", n)
           for n in names):
        return "modelzoo-resnet"
    if any(".down_sample." in n for n in names) or (
            any(n.startswith("classifier.") for n in names) and any(n.startswith("layer1.") for n in names)
            and not any(n.startswith("fc.") for n in names)):
        return "mindcv-resnet"
    return None


def ms_to_project_name(name, layout):
    """This project's name for the checkpoint parameter ``name`` of ``layout``."""
    for pattern, replacement in _RULES[layout]:
        name = re.sub(pattern, replacement, name)
    return name


def rename_ms_params(params):
    """(layout or None, params renamed to this project's names): {name: Parameter} as
    mindspore.load_checkpoint returns it. Names the layout does not know stay as they are."""
    layout = detect_ms_layout(list(params))
    if layout is None:
        return None, params
    renamed = {}
    for name, value in params.items():
        new = ms_to_project_name(name, layout)
        renamed[new] = value
    return layout, renamed
