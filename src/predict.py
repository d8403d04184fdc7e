"""predict.py's logic: classify image files with a checkpoint or an exported MINDIR.

Images go through the evaluation ops (src/data/pipeline.py ``eval_ops``: decode, resize, centre
crop, CHW) one by one, eagerly, so the probabilities are those eval.py's top-1 is computed from;
they are then batched through the network. Input contract, checkpoint and MINDIR alike: uint8 RGB
images (N, 3, S, S) on the 0-255 scale; the model normalises them with the run's mean/std itself. A file the pipeline's checks refuse or the
decoder cannot read is skipped and listed. Settings: with no --config_path, the run's own
config.yaml (beside the model file, or in its ckpt/ folder) is the YAML layer, so image size,
normalisation and network match the training run; the command line still overrides it.
"""
import csv
import glob
import json
import os
import sys

import numpy as np

from src.config import load_checkpoint_config, model_file, run_file
from src.errors import CheckpointError, ConfigError, DataError, first_line, name_list


def load_predict_config(argv):
    """(cfg, line naming the configuration): the run's saved config unless --config_path is given
    (src.config.load_checkpoint_config). Always one process on one device."""
    cfg, note = load_checkpoint_config(argv)
    cfg.run_distribute, cfg.device_num = False, 1
    return cfg, note


def list_inputs(path):
    """(image files, note on other files or None) for a file, a folder (recursive) or a glob pattern."""
    from src.data import IMAGE_EXTENSIONS
    from src.data.folder import is_image_file
    if not path:
        raise ConfigError("nothing to classify: pass --predict_path=IMAGE, FOLDER or 'PATTERN*.jpg'")
    if os.path.isfile(path):
        return [os.path.abspath(path)], None
    if os.path.isdir(path):
        candidates = []
        for folder, dirs, files in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            candidates += [os.path.join(folder, f) for f in sorted(files) if not f.startswith(".")]
    else:
        candidates = sorted(p for p in glob.glob(path) if os.path.isfile(p))
        if not candidates:
            raise DataError(f"--predict_path={path}: no such file or folder, and no file matches it as a pattern")
    images = [os.path.abspath(p) for p in candidates if is_image_file(p)]
    others = {}
    for p in candidates:
        if not is_image_file(p):
            ext = os.path.splitext(p)[1].lower() or "(no extension)"
            others[ext] = others.get(ext, 0) + 1
    note = None
    if others:
        note = (f"{sum(others.values())} other file(s) not read ({', '.join(f'{e} {n}' for e, n in sorted(others.items()))}"
                f"; formats read: {' '.join(IMAGE_EXTENSIONS)})")
    if not images:
        raise DataError(f"no image files under {path} (formats read: {' '.join(IMAGE_EXTENSIONS)}"
                        f"{'; found ' + note.split(' not read')[0] if note else ''})")
    return images, note


def _decoder_reason(exc):
    """The informative line of a MindSpore data-engine error ("[ERROR] ..."), else its first line."""
    for line in str(exc).splitlines():
        if line.strip().startswith("[ERROR]"):
            return line.strip()[len("[ERROR]"):].strip()
    return first_line(exc)


def preprocess(files, cfg):
    """Yield (path, CHW uint8 array) or (path, reason) for an unreadable file, in file order."""
    from mindspore.dataset.transforms import Compose
    from src.data import eval_ops, image_problem
    ops = Compose(eval_ops(cfg))
    for path in files:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            yield path, f"cannot read: {exc.strerror}"
            continue
        reason = image_problem(data)  # also keeps GIF/WebP away from the decoder (it would drop copies here)
        if reason is not None:
            yield path, reason
            continue
        try:
            yield path, np.asarray(ops(np.frombuffer(data, np.uint8)), np.uint8)
        except RuntimeError as exc:
            yield path, _decoder_reason(exc)


class CheckpointModel:
    """The configured network with a checkpoint's weights: batch (N, 3, S, S) -> logits (N, classes)."""

    def __init__(self, cfg, path):
        from src.checkpoint import load_network
        from src.distributed import set_device
        from src.evaluate import EvalNet
        from src.factory import build_network
        set_device(cfg.device_target, cfg.device_id, cfg.mode)
        net = build_network(cfg)
        load_network(net, path)
        net.set_train(False)
        self.net = EvalNet(net, cfg.eval_flip_average)
        self.num_classes, self.batch_size = int(cfg.num_classes), int(cfg.batch_size)

    def __call__(self, x):
        import mindspore as ms
        return self.net(ms.Tensor(x)).asnumpy()


class MindirModel:
    """An exported MINDIR (export.py: fixed input uint8 1x3xSxS). Its input shape and type and its
    output shape are read from the file, so a wrong --image_size or class count, or a MINDIR exported
    before the model took uint8 images, is a one-line error; flip averaging, when the config asks for
    it, averages the logits of each batch and its mirror image as EvalNet does."""

    def __init__(self, cfg, path):
        import mindspore as ms
        from mindspore import nn
        from src.distributed import set_device
        if not os.path.isfile(path):
            raise CheckpointError(f"MINDIR file '{path}' does not exist: pass an existing .mindir path")
        set_device(cfg.device_target, cfg.device_id, "GRAPH")  # a loaded graph runs in GRAPH mode only
        try:
            self.net = nn.GraphCell(ms.load(path))
        except (RuntimeError, ValueError) as exc:
            raise CheckpointError(f"cannot load MINDIR '{path}' ({first_line(exc)})") from None
        in_shape, out_shape, in_type = _mindir_shapes(path)
        if in_type not in (None, "UINT8"):
            raise CheckpointError(f"MINDIR '{path}' takes {in_type} input: it was exported before models took uint8 "
                                  "images and normalised them themselves; export it again with export.py")
        side = int(cfg.image_size)
        if in_shape and list(in_shape[1:]) != [3, side, side]:
            raise CheckpointError(f"MINDIR '{path}' takes input {in_shape}, not N x 3 x {side} x {side}: "
                                  f"set --image_size={in_shape[-1]} (and its eval_resize)")
        self.num_classes = int(out_shape[-1]) if out_shape else int(cfg.num_classes)
        self.batch_size = int(in_shape[0]) if in_shape and in_shape[0] > 0 else 1
        self.flip = bool(cfg.eval_flip_average)

    def __call__(self, x):
        import mindspore as ms
        out = []
        for i in range(0, len(x), self.batch_size):
            chunk = x[i:i + self.batch_size]
            logits = self.net(ms.Tensor(chunk)).asnumpy()
            if self.flip:
                logits = 0.5 * (logits + self.net(ms.Tensor(np.ascontiguousarray(chunk[..., ::-1]))).asnumpy())
            out.append(logits)
        return np.concatenate(out)


def _mindir_shapes(path):
    """(input dims, output dims, input type name) recorded in a MINDIR file, or Nones if they cannot be read."""
    try:
        from mindspore.train import mind_ir_pb2
        model = mind_ir_pb2.ModelProto()
        with open(path, "rb") as f:
            model.ParseFromString(f.read())
        tensor = model.graph.input[0].tensor[0]
        return (list(tensor.dims), list(model.graph.output[0].tensor[0].dims),
                mind_ir_pb2.TensorProto.DataType.Name(tensor.data_type))
    except Exception:  # a layout this version does not know: shapes are then checked at the first call
        return None, None, None


def class_names(model, num_classes):
    """Names from the run's class_names.json (beside the model, or in its ckpt/), else the indices."""
    path = run_file(model, "class_names.json")
    if path is None:
        return [str(i) for i in range(num_classes)], None
    with open(path) as f:
        names = json.load(f)
    if len(names) != num_classes:
        raise CheckpointError(f"{path} lists {len(names)} classes but the model has {num_classes}: "
                              "use the class_names.json of the run that wrote this model")
    return [str(n) for n in names], path


def softmax(logits):
    """Row-wise softmax in float64 (N, C) -> (N, C)."""
    z = logits.astype(np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def predict(model, files, cfg, names, top_k):
    """([{'path', 'top': [(class, index, probability), ...]}], [(path, reason)]) for every file."""
    k = min(int(top_k), len(names))
    rows, skipped, batch, paths = [], [], [], []

    def flush():
        if not batch:
            return
        probs = softmax(model(np.stack(batch)))
        for path, p in zip(paths, probs):
            order = np.argsort(-p, kind="stable")[:k]
            rows.append({"path": path, "top": [(names[i], int(i), float(p[i])) for i in order]})
        batch.clear()
        paths.clear()
    for path, item in preprocess(files, cfg):
        if isinstance(item, str):
            skipped.append((path, item))
            continue
        batch.append(item)
        paths.append(path)
        if len(batch) == model.batch_size:
            flush()
    flush()
    return rows, skipped


def _output_kind(path):
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".csv", ".json"):
        raise ConfigError(f"--predict_output must end in .csv or .json, got '{path}'")
    return ext


def write_output(path, rows, skipped, k, info):
    """CSV (path, class_1, prob_1, ..., class_k, prob_k; skipped files not included) or JSON
    ({info..., predictions: [...], skipped: [...]}), chosen by the extension."""
    from src.run_log import write_json
    ext = _output_kind(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if ext == ".json":
        write_json(path, dict(info, top_k=k, predictions=[
            {"path": r["path"], "top": [{"class": c, "index": i, "probability": p} for c, i, p in r["top"]]}
            for r in rows], skipped=[{"path": p, "reason": why} for p, why in skipped]))
        return
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["path"] + [h for r in range(1, k + 1) for h in (f"class_{r}", f"prob_{r}")])
        for r in rows:
            out.writerow([r["path"]] + [v for c, _, p in r["top"] for v in (c, f"{p:.6f}")])


def format_table(rows, limit=None, width=3):
    """Lines 'file  class (prob)  class (prob) ...' (paths relative to their common folder), at most
    ``limit`` rows and ``width`` classes."""
    shown = rows if limit is None else rows[:limit]
    root = os.path.commonpath([os.path.dirname(r["path"]) for r in rows])
    rel = [os.path.relpath(r["path"], root) for r in shown]
    w = max([len(p) for p in rel] + [4])
    lines = [f"{'file':<{w}}  top-{min(width, len(rows[0]['top'])) if rows else width} (probability)"]
    for p, r in zip(rel, shown):
        lines.append(f"{p:<{w}}  " + "  ".join(f"{c} ({q:.3f})" for c, _, q in r["top"][:width]))
    if len(rows) > len(shown):
        lines.append(f"... and {len(rows) - len(shown)} more")
    return lines


def main(argv):
    cfg, config_note = load_predict_config(argv)
    if cfg.predict_output:
        _output_kind(cfg.predict_output)
    files, note = list_inputs(cfg.predict_path)
    model_path = os.path.abspath(model_file(cfg.to_dict()))
    model = MindirModel(cfg, model_path) if cfg.mindir else CheckpointModel(cfg, model_path)
    names, names_file = class_names(model_path, model.num_classes)
    print(f"{len(files)} image(s) from {cfg.predict_path}; model {model_path}; {config_note}", file=sys.stderr)
    if note:
        print(f"note: {note}", file=sys.stderr)
    if names_file is None:
        print(f"note: no class_names.json beside {model_path}: classes are shown as indices", file=sys.stderr)
    rows, skipped = predict(model, files, cfg, names, cfg.top_k)
    for path, why in skipped:
        print(f"skipped {path}: {why}", file=sys.stderr)
    if not rows:
        raise DataError(f"none of the {len(files)} image(s) could be read ({name_list(sorted(set(w for _, w in skipped)), 3)})")
    if cfg.predict_output:
        write_output(cfg.predict_output, rows, skipped, min(cfg.top_k, len(names)),
                     {"model": model_path, "class_names": names_file, "image_size": int(cfg.image_size)})
    for line in format_table(rows, limit=10 if cfg.predict_output else None):
        print(line)
    done = f"{len(rows)} image(s) classified" + (f", {len(skipped)} skipped" if skipped else "")
    print(done + (f"; all top-{min(cfg.top_k, len(names))} in {cfg.predict_output}" if cfg.predict_output else ""))
    return 0
