"""The DropCov and iSICE heads through train.py then eval.py (subprocesses) on real JPEG images."""
import json
import os

import mindspore as ms
import numpy as np
import pytest

from tests.helpers import ROOT, make_image_folder, run_script, tiny_flags


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(str(tmp_path_factory.mktemp("data")))


@pytest.mark.parametrize("head", ["dropcov", "isice"])
def test_train_then_eval(data, tmp_path, head):
    """ResNet-18 at 64 px: DropCov's layer4 at stride 1 (4x4 maps), iSICE's at stride 2 (2x2: a
    rank-deficient covariance, as 7x7 maps with 256 channels are)."""
    out = str(tmp_path / "out")
    flags = tiny_flags(data, out, head=head, image_size=64, eval_resize=64, epoch_size=1)
    run_script("train.py", flags, cwd=tmp_path)
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["epoch"] for r in rows] == [1]
    assert all(np.isfinite(r["train_loss"]) and np.isfinite(r["val_loss"]) for r in rows)
    params = ms.load_checkpoint(os.path.join(out, "ckpt", "latest.ckpt"))
    assert params["layer_reduce.weight"].shape == (16, 512, 1, 1)
    assert ("eca_layer.conv.weight" in params) == (head == "dropcov")
    run_script("eval.py", tiny_flags(data, out, head=head, image_size=64, eval_resize=64), cwd=tmp_path)
    metrics = json.load(open(os.path.join(out, "eval_metrics.json")))
    best = rows[0]  # best.ckpt, evaluated again
    assert metrics["num_images"] == 12
    assert metrics["top1"] == pytest.approx(best["val_top1"], abs=1e-9)  # DropCov's eval is deterministic
    assert metrics["loss"] == pytest.approx(best["val_loss"], rel=1e-4)


def _config(name, *flags):
    from src.config import load_config
    return load_config(["--config_path", os.path.join(ROOT, "config", name)] + list(flags))


def test_recipe_configs():
    """The authors' published recipes (DropCov's main.py for resnet50_ACD, iSICE's train_iSICE_model.sh with
    main.py's AdamW),
    checked against their literal values; the networks they build are the authors' layouts."""
    from src.factory import build_network
    c = _config("resnet50_dropcov_imagenet2012_config.yaml")
    assert (c.arch, c.head, c.dimension_reduction, c.dropcov_eca_kernel, c.dropcov_rate_scale) == \
        ("resnet50", "dropcov", 256, 3, 10.0)
    assert (c.optimizer, c.momentum, c.weight_decay, c.lr, c.lr_base_batch, c.epoch_size, c.lr_milestones,
            c.lr_gamma, c.no_decay_bn_bias) == ("momentum", 0.9, 1e-4, 0.1, 256, 100, [30, 60, 90], 0.1, False)
    assert c.batch_size * 8 == 256 and (c.image_size, c.eval_resize, c.train_transform) == \
        (224, 256, "random_resized_crop")
    assert "78.19" in open(os.path.join(ROOT, "config", "resnet50_dropcov_imagenet2012_config.yaml")).read()
    d = _config("resnet50_dropcov_cub200_config.yaml")
    base = _config("resnet50_cub200_config.yaml")  # the project's CUB protocol, the same for every head
    same = ("batch_size", "lr", "lr_base_batch", "epoch_size", "weight_decay", "classifier_lr_factor", "image_size",
            "train_transform", "train_resize", "eval_resize", "eval_flip_average", "lr_milestones")
    assert d.head == "dropcov" and all(d[k] == base[k] for k in same)
    i = _config("resnet50_isice_cub200_config.yaml")
    assert (i.arch, i.head, i.dimension_reduction, i.isice_steps, i.isice_sparsity, i.isice_step_size,
            i.isice_ns_iter) == ("resnet50", "isice", 256, 5, 0.01, 1.0, 7)
    assert (i.batch_size, i.epoch_size, i.lr_milestones, i.lr_gamma, i.classifier_lr_factor, i.image_size,
            i.train_resize, i.eval_flip_average, i.num_classes) == (50, 100, [15, 30], 0.1, 1.0, 448, 448, True, 200)
    assert (i.optimizer, i.lr, i.lr_base_batch, i.weight_decay) == ("adamw", 5e-5, 50, 0.05)
    assert "85.9" in open(os.path.join(ROOT, "config", "resnet50_isice_cub200_config.yaml")).read()
    for cfg, stride in ((c, 1), (i, 2)):
        net = build_network(cfg)
        assert net.features.layer4[0].conv2.stride == (stride, stride)
        assert net.representation.output_dim == net.classifier.fc.weight.shape[1] == 32896
