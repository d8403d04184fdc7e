"""Parameter count and multiply-add count of a built network.

FLOPs here are multiply-adds (one multiply + one add = 1), the convention of torchvision's model
table (ResNet-50: 4.09 G at 224x224). The iSQRT-COV paper's table lists 3.86 G (ResNet-50) and
6.19 G (iSQRT-COV ResNet-50) under another convention; the ratio, about 1.6, is the same.
"""
import mindspore as ms
from mindspore import nn, ops


def count_params(net):
    """Number of trainable parameters (BN moving statistics excluded)."""
    return int(sum(p.size for p in net.trainable_params()))


def _pair(size):
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def count_flops(net, image_size=224):
    """Multiply-adds for one image of ``image_size`` (int or (H, W)), measured on the network.

    Runs one forward pass of a zero image in PYNATIVE mode (the previous mode and train/eval
    state are restored; eval mode keeps the BN statistics untouched) with forward hooks that
    record the input and output shapes of every Conv2d and Dense cell, and the feature-map size
    entering ``net.representation``. Returns a dict:
      "conv_fc": convolutions and fully connected layers (incl. iSQRT-COV's 1x1 reduction conv);
      "meta": matrix products of the representation, from ``representation.matmul_flops``:
              iSQRT-COV's covariance and Newton-Schulz products, X X^T of B-CNN and of CBP's
              "gram" method (CBP "fft": its FFTs are not counted); 0 for GAP;
      "total": their sum.
    Element-wise work (BN, ReLU, pooling, additions) is not counted, as in torchvision's figure.
    """
    h, w = _pair(image_size)
    conv_fc = [0]
    feature_hw = []

    def on_conv(cell, args, output):
        kh, kw = cell.kernel_size
        conv_fc[0] += output.size * (cell.in_channels // cell.group) * kh * kw

    def on_dense(cell, args, output):
        conv_fc[0] += output.size * cell.in_channels

    def on_representation(cell, args, output):
        feature_hw.append(tuple(args[0].shape[2:]))

    handles = []
    for _, cell in net.cells_and_names():
        if isinstance(cell, nn.Conv2d):
            handles.append(cell.register_forward_hook(on_conv))
        elif isinstance(cell, nn.Dense):
            handles.append(cell.register_forward_hook(on_dense))
    representation = getattr(net, "representation", None)
    if representation is not None:
        handles.append(representation.register_forward_hook(on_representation))

    mode = ms.get_context("mode")
    was_training = net.training
    try:
        ms.set_context(mode=ms.PYNATIVE_MODE)
        net.set_train(False)
        net(ops.zeros((1, 3, h, w), ms.float32))
    finally:
        for handle in handles:
            handle.remove()
        net.set_train(was_training)
        ms.set_context(mode=mode)

    meta = 0
    if feature_hw and hasattr(representation, "matmul_flops"):
        meta = int(representation.matmul_flops(*feature_hw[0]))
    return {"conv_fc": int(conv_fc[0]), "meta": meta, "total": int(conv_fc[0]) + meta}
