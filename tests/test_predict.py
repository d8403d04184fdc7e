"""predict.py on a tiny trained run: eval.py's top-1, the eval pipeline's probabilities, MINDIR = checkpoint,
the uint8 input contract against a NumPy normalisation of the same pixels, unreadable files skipped and
listed, one-line errors; the run trains on training/ and evaluates test/ (train_split / val_split)."""
import csv
import json
import os
import shutil

import numpy as np
import pytest

from src.config import load_config
from tests.helpers import make_image_folder, run_script, tiny_flags


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 1-epoch run on make_image_folder's data in training/ and test/ (--train_split/--val_split),
    evaluated by eval.py from the run's saved config alone, and exported to MINDIR."""
    base = tmp_path_factory.mktemp("predict")
    data = make_image_folder(str(base / "data"), train_per_class=12, val_per_class=6, seed=3)
    os.rename(os.path.join(data, "train"), os.path.join(data, "training"))
    os.rename(os.path.join(data, "val"), os.path.join(data, "test"))
    out = str(base / "out")
    flags = tiny_flags(data, out, epoch_size=1, train_split="training", val_split="test")
    train = run_script("train.py", flags, cwd=base)
    ckpt = os.path.join(out, "ckpt", "best.ckpt")
    run_script("eval.py", [f"--checkpoint_file_path={ckpt}"], cwd=base)  # data_path and val_split: saved
    with open(os.path.join(out, "eval_metrics.json")) as f:
        metrics = json.load(f)
    run_script("export.py", flags, cwd=base)
    # the images to classify: test's, plus files that cannot be read
    images = base / "images"
    shutil.copytree(os.path.join(data, "test"), images)
    (images / "class_1" / "zero.jpg").write_bytes(b"")
    (images / "class_2" / "notes.jpg").write_text("not an image")
    (images / "readme.txt").write_text("not read")
    return {"base": base, "data": data, "out": out, "top1": metrics["top1"], "metrics": metrics, "log": train.stdout,
            "images": str(images), "ckpt": ckpt, "mindir": os.path.join(out, "resnet18_isqrt_cov.mindir")}


def test_split_keys_train_on_training_and_evaluate_test(run):
    assert "3 classes, 6 steps/epoch" in run["log"]  # 36 images of training/ at batch 6
    assert "epoch 1: val top-1" in run["log"] and "(18 images)" in run["log"]  # test/ evaluated
    assert run["metrics"]["num_images"] == 18
    saved = load_config(["--config_path", os.path.join(run["out"], "ckpt", "config.yaml")])
    assert (saved.train_split, saved.val_split) == ("training", "test")
    missing = run_script("eval.py", [f"--checkpoint_file_path={run['ckpt']}", "--val_split=val"], cwd=run["base"],
                         check=False)
    _one_line_error(missing, f"dataset folder not found: {os.path.join(run['data'], 'val')}", "val_split='val'")
    missing = run_script("train.py", tiny_flags(run["data"], str(run["base"] / "o"), train_split="train"),
                         cwd=run["base"], check=False)
    _one_line_error(missing, "train_split='train'", "--train_split")


def _predict(run, *args, check=True):
    # no --config_path: the run's ckpt/config.yaml must supply image size, normalisation and network
    return run_script("predict.py", [f"--predict_path={run['images']}", *args], cwd=run["base"], check=check)


def _eval_pipeline_probabilities(run):
    """Reference: the checkpoint on eval.py's own pipeline (create_dataset over test/), softmax in float64."""
    from src.checkpoint import load_network
    from src.config import load_config
    from src.data import create_dataset
    from src.factory import build_network
    cfg = load_config(["--config_path", os.path.join(run["out"], "ckpt", "config.yaml")])
    net = build_network(cfg)
    load_network(net, run["ckpt"])
    net.set_train(False)
    logits, labels = [], []
    for x, y in create_dataset(os.path.join(run["data"], "test"), cfg, False).epoch():
        logits.append(net(x).asnumpy().astype(np.float64))
        labels.append(y.asnumpy())
    return _softmax(np.concatenate(logits)), np.concatenate(labels)


def _softmax(z):
    p = np.exp(z - z.max(axis=1, keepdims=True))
    return p / p.sum(axis=1, keepdims=True)


def _numpy_normalised_probabilities(run):
    """Independent of the input normalisation under test: the eval ops' uint8 pixels of each image,
    normalised in NumPy float64, through the checkpoint's network built without its InputNormalize."""
    import mindspore as ms
    from mindspore.dataset.transforms import Compose
    from src.checkpoint import load_network
    from src.data import FileList, eval_ops
    from src.factory import head_kwargs
    from src.models import create_model
    cfg = load_config(["--config_path", os.path.join(run["out"], "ckpt", "config.yaml")])
    ops = Compose(eval_ops(cfg))
    pixels = np.stack([ops(np.fromfile(p, np.uint8)) for p in FileList(os.path.join(run["data"], "test")).paths])
    assert pixels.dtype == np.uint8
    x = (pixels - np.reshape(cfg.mean, (1, 3, 1, 1))) / np.reshape(cfg.std, (1, 3, 1, 1))
    net = create_model(cfg.arch, cfg.head, cfg.num_classes, classifier=cfg.classifier, **head_kwargs(cfg))
    load_network(net, run["ckpt"])
    net.set_train(False)
    return _softmax(net(ms.Tensor(x.astype(np.float32))).asnumpy().astype(np.float64))


def test_predict_matches_eval_and_lists_unreadable_files(run, tmp_path):
    out_json = str(tmp_path / "p.json")
    proc = _predict(run, f"--checkpoint_file_path={run['ckpt']}", "--top_k=3", f"--predict_output={out_json}")
    with open(out_json) as f:
        result = json.load(f)
    rows = result["predictions"]
    names = json.load(open(os.path.join(run["out"], "ckpt", "class_names.json")))
    assert len(rows) == 18 and all(r["path"].startswith(run["images"]) for r in rows)
    truth = [os.path.basename(os.path.dirname(r["path"])) for r in rows]
    top1 = np.mean([r["top"][0]["class"] == t for r, t in zip(rows, truth)])
    assert top1 == pytest.approx(run["top1"], abs=1e-9)
    for r in rows:
        probs = [t["probability"] for t in r["top"]]
        assert sum(probs) == pytest.approx(1.0, abs=1e-6) and probs == sorted(probs, reverse=True)
        assert all(names[t["index"]] == t["class"] for t in r["top"])
    ref, labels = _eval_pipeline_probabilities(run)
    assert [names[i] for i in labels] == truth  # same images in the same order
    got = np.array([[t["probability"] for t in sorted(r["top"], key=lambda t: t["index"])] for r in rows])
    np.testing.assert_allclose(got, ref, atol=1e-5)
    skipped = {os.path.basename(s["path"]): s["reason"] for s in result["skipped"]}
    assert skipped == {"zero.jpg": "empty file (0 bytes)", "notes.jpg": "not a JPEG, PNG, BMP or TIFF image"}
    for s in result["skipped"]:
        assert f"skipped {s['path']}: {s['reason']}" in proc.stderr
    assert "1 other file(s) not read (.txt 1" in proc.stderr
    assert "18 image(s) classified, 2 skipped" in proc.stdout
    table = proc.stdout.splitlines()
    assert table[0].startswith("file") and table[1].startswith(os.path.join("class_0", "000.jpg"))
    assert f"{rows[0]['top'][0]['class']} ({rows[0]['top'][0]['probability']:.3f})" in table[1]


def test_mindir_gives_the_checkpoints_top_k(run, tmp_path):
    results = {}
    for kind, flag in (("ckpt", f"--checkpoint_file_path={run['ckpt']}"), ("mindir", f"--mindir={run['mindir']}")):
        path = str(tmp_path / f"{kind}.csv")
        _predict(run, flag, "--top_k=2", f"--predict_output={path}", "--batch_size=4")
        with open(path, newline="") as f:
            results[kind] = list(csv.reader(f))
    ckpt, mindir = results["ckpt"], results["mindir"]
    assert ckpt[0] == mindir[0] == ["path", "class_1", "prob_1", "class_2", "prob_2"]
    assert len(ckpt) == len(mindir) == 19
    for a, b in zip(ckpt[1:], mindir[1:]):
        assert a[0] == b[0] and (a[1], a[3]) == (b[1], b[3])
        assert float(a[2]) == pytest.approx(float(b[2]), abs=2e-5) and float(a[4]) == pytest.approx(float(b[4]), abs=2e-5)


def test_uint8_input_contract_checkpoint_and_mindir_match_a_numpy_normalisation(run, tmp_path):
    """The models take uint8 0-255 images and normalise them inside: eval's pipeline, predict.py with
    the checkpoint and with the exported MINDIR (whose input is uint8) all give the probabilities of
    NumPy's (x - mean) / std of the same decoded pixels, to float32 precision."""
    from src.predict import _mindir_shapes
    assert _mindir_shapes(run["mindir"])[0::2] == ([1, 3, 32, 32], "UINT8")
    ref = _numpy_normalised_probabilities(run)
    np.testing.assert_allclose(_eval_pipeline_probabilities(run)[0], ref, atol=2e-6)
    for kind, flag in (("ckpt", f"--checkpoint_file_path={run['ckpt']}"), ("mindir", f"--mindir={run['mindir']}")):
        out = str(tmp_path / f"{kind}.json")
        _predict(run, flag, "--top_k=3", f"--predict_output={out}")
        with open(out) as f:
            rows = json.load(f)["predictions"]
        got = np.array([[t["probability"] for t in sorted(r["top"], key=lambda t: t["index"])] for r in rows])
        np.testing.assert_allclose(got, ref, atol=2e-6, err_msg=kind)


def _one_line_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and all(n in last for n in needles), last


def test_folder_without_images_and_mismatched_checkpoint_end_in_one_line(run, tmp_path):
    empty = tmp_path / "empty"
    os.makedirs(empty / "sub")
    (empty / "sub" / "a.gif").write_bytes(b"GIF89a")
    proc = run_script("predict.py", [f"--predict_path={empty}", f"--checkpoint_file_path={run['ckpt']}"],
                      cwd=run["base"], check=False)
    _one_line_error(proc, f"no image files under {empty}", "found 1 other file(s)")
    proc = _predict(run, f"--checkpoint_file_path={run['ckpt']}", "--num_classes=5", check=False)
    _one_line_error(proc, "does not fit the network", "set --num_classes=3")
    proc = _predict(run, f"--mindir={run['mindir']}", "--image_size=48", "--eval_resize=48", check=False)
    _one_line_error(proc, "takes input [1, 3, 32, 32]", "--image_size=32")
