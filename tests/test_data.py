"""Data: folder checks, pipelines on tiny generated JPEG folders, sharding, per-epoch orders, seeding, the
start-up check of bad images, worker counts, normalisation on the device, split keys, demo."""
import hashlib
import io
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from src.config import REPO_ROOT, load_config
from src.data import (DatasetError, EpochOrder, FileList, FolderPipeline, bad_files, bad_image_lines,
                      check_class_match, check_files, create_dataset, describe_unread_files, file_problem,
                      find_unreadable_images, image_problem, maybe_prepare_demo, pipeline_errors, prepare_digits,
                      scan_image_folder, unread_files)
from src.data.bad_images import HEAD, BadImageMonitor
from src.data.demo import MARKER, digits_split

CLASSES = ["zebra", "ant", "mole"]  # created unsorted: labels must follow the sorted names
PER_CLASS = 4
MEAN, STD = [120.0, 110.0, 100.0], [60.0, 50.0, 40.0]


def _cfg(*extra, num_classes=3):
    return load_config([f"--num_classes={num_classes}", "--image_size=16", "--eval_resize=20", "--batch_size=5",
                        "--num_parallel_workers=2", "--mean=120,110,100", "--std=60,50,40", "--hflip=True",
                        "--crop_scale=0.3,1.0", *extra])


def _identity_color(k):
    return (10 + 20 * k, 200, 40)


@pytest.fixture(scope="module")
def const_folder(tmp_path_factory):
    """3 classes x 4 JPEGs, image k a flat colour encoding k (any crop/flip/resize keeps it)."""
    root = tmp_path_factory.mktemp("const") / "train"
    k, owner = 0, {}
    for c in CLASSES:
        os.makedirs(root / c)
        for i in range(PER_CLASS):
            Image.new("RGB", (48 + 8 * i, 40), _identity_color(k)).save(root / c / f"img{i}.JPEG", quality=95)
            owner[k] = sorted(CLASSES).index(c)
            k += 1
    os.makedirs(root / ".ipynb_checkpoints")  # hidden folders are not classes
    return str(root), owner


@pytest.fixture(scope="module")
def noise_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("noise") / "train"
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        os.makedirs(root / c)
        for i in range(8):
            Image.fromarray(rng.integers(0, 256, (36, 44, 3), dtype=np.uint8)).save(root / c / f"{i}.jpg")
    return str(root)


def _batches(data, epoch=None):
    return list(data.epoch(epoch, output_numpy=True))


def _identities(images):
    """Recover k from flat-colour uint8 images (red channel)."""
    red = images[:, 0].astype(np.float64)
    assert np.ptp(red, axis=(1, 2)).max() < 3.0, "flat images must stay flat"
    return np.round((red.mean(axis=(1, 2)) - 10) / 20).astype(int)


# --------------------------------------------------------------------------- folder checks
def test_scan_sorted_classes_and_errors(tmp_path, const_folder):
    root, _ = const_folder
    assert scan_image_folder(root) == sorted(CLASSES)
    with pytest.raises(DatasetError, match=r"dataset folder not found: .*nope"):
        scan_image_folder(str(tmp_path / "nope"))
    os.makedirs(tmp_path / "flat")
    Image.new("RGB", (8, 8)).save(tmp_path / "flat" / "x.jpg")
    with pytest.raises(DatasetError, match=r"no class folders in .*flat"):
        scan_image_folder(str(tmp_path / "flat"))
    os.makedirs(tmp_path / "split" / "cat")
    os.makedirs(tmp_path / "split" / "dog")
    Image.new("RGB", (8, 8)).save(tmp_path / "split" / "cat" / "x.jpg")
    (tmp_path / "split" / "dog" / "notes.txt").write_text("no images here")
    with pytest.raises(DatasetError, match=r"class folder without images in .*split: dog") as e:
        scan_image_folder(str(tmp_path / "split"))
    assert "\n" not in str(e.value)


def test_check_class_match_names_the_differences():
    check_class_match(["a", "b"], ["a", "b"])
    with pytest.raises(DatasetError, match=r"only in train: c; only in val: d"):
        check_class_match(["a", "b", "c"], ["a", "b", "d"])
    with pytest.raises(DatasetError, match=r"only in val: e"):
        check_class_match(["a"], ["a", "e"], "train", "val")


def test_class_count_must_match_num_classes(const_folder):
    with pytest.raises(DatasetError, match=r"has 3 class folders but num_classes is 4 \(set --num_classes=3"):
        create_dataset(const_folder[0], _cfg(num_classes=4), training=False)


# --------------------------------------------------------------------------- pipelines
def test_eval_pipeline_shapes_values_and_label_order(const_folder):
    root, owner = const_folder
    batches = _batches(create_dataset(root, _cfg(), training=False))
    assert [b[0].shape for b in batches] == [(5, 3, 16, 16), (5, 3, 16, 16), (2, 3, 16, 16)]  # no sample dropped
    images = np.concatenate([b[0] for b in batches])
    labels = np.concatenate([b[1] for b in batches])
    assert images.dtype == np.uint8 and labels.dtype == np.int32  # normalised on the device, not here
    ids = _identities(images)
    assert sorted(ids) == list(range(12))
    assert [owner[k] for k in ids] == labels.tolist()
    assert labels.tolist() == sorted(labels.tolist())  # file order, classes sorted by name
    assert abs(images[:, 1].mean() - 200) < 3 and abs(images[:, 2].mean() - 40) < 3  # the 0-255 pixels


@pytest.mark.parametrize("transform, resize", [("random_resized_crop", None), ("resize_random_crop", "24"),
                                               ("resize_center_crop", "20,30")])
def test_train_pipeline_transforms(const_folder, transform, resize):
    root, owner = const_folder
    extra = [f"--train_transform={transform}"] + ([f"--train_resize={resize}"] if resize else [])
    batches = _batches(create_dataset(root, _cfg(*extra), training=True, seed=3))
    assert [b[0].shape for b in batches] == [(5, 3, 16, 16)] * 2  # 12 // 5: last partial batch dropped
    ids = np.concatenate([_identities(b[0]) for b in batches])
    labels = np.concatenate([b[1] for b in batches])
    assert len(set(ids.tolist())) == 10 and [owner[k] for k in ids] == labels.tolist()


def test_eval_exact_resize_then_centre_crop(tmp_path):
    """eval_resize [h, w] resizes exactly: a 20x40 image with a 10-pixel red left border keeps it."""
    d = tmp_path / "v" / "c"
    os.makedirs(d)
    img = np.zeros((20, 40, 3), np.uint8)
    img[:, :10, 0] = 255
    Image.fromarray(img).save(d / "x.png")
    cfg = load_config(["--num_classes=1", "--image_size=16", "--eval_resize=16,16", "--batch_size=1",
                       "--mean=0,0,0", "--std=1,1,1", "--num_parallel_workers=1"])
    (x, _), = _batches(create_dataset(str(tmp_path / "v"), cfg, training=False))
    red = x[0, 0]
    assert red[:, :3].mean() > 240 and red[:, 5:].mean() < 15  # exact 16x16: red is the left quarter
    cfg.eval_resize = 16  # shorter side 16 -> 16x32, centre crop 16 cuts the red border off
    (x, _), = _batches(create_dataset(str(tmp_path / "v"), cfg, training=False))
    assert x[0, 0].max() < 15


def test_sharding_splits_the_data(const_folder):
    root, _ = const_folder
    cfg = _cfg("--batch_size=3")
    seen = []
    for shard in range(2):
        ids = np.concatenate([_identities(b[0]) for b in _batches(
            create_dataset(root, cfg, training=False, num_shards=2, shard_id=shard))])
        assert len(ids) == 6
        seen.append(set(ids.tolist()))
    assert seen[0].isdisjoint(seen[1]) and seen[0] | seen[1] == set(range(12))
    train = []
    for shard in range(2):  # training shards use the same seeded permutation on every rank
        ids = np.concatenate([_identities(b[0]) for b in _batches(
            create_dataset(root, cfg, training=True, num_shards=2, shard_id=shard, seed=5))])
        assert len(ids) == 6
        train.append(set(ids.tolist()))
    assert train[0].isdisjoint(train[1]) and train[0] | train[1] == set(range(12))


def _digest(batches):
    h = hashlib.sha256()
    for x, y in batches:
        h.update(x.tobytes())
        h.update(y.tobytes())
    return h.hexdigest()


def test_shuffle_and_augmentation_are_determined_by_the_seed(noise_folder):
    cfg = load_config(["--num_classes=2", "--image_size=16", "--eval_resize=16", "--batch_size=4",
                       "--num_parallel_workers=2", "--hflip=True", "--crop_scale=0.2,1.0"])
    first = _digest(_batches(create_dataset(noise_folder, cfg, training=True, seed=11)))
    other = _digest(_batches(create_dataset(noise_folder, cfg, training=True, seed=12)))
    again = _digest(_batches(create_dataset(noise_folder, cfg, training=True, seed=11)))
    assert first == again and first != other
    # a fresh process building the same pipeline gets the very same batches (crops and flips too)
    script = textwrap.dedent(f"""
        import hashlib, sys
        sys.path.insert(0, {REPO_ROOT!r})
        from src.config import load_config
        from src.data import create_dataset
        cfg = load_config({["--num_classes=2", "--image_size=16", "--eval_resize=16", "--batch_size=4",
                            "--num_parallel_workers=2", "--hflip=True", "--crop_scale=0.2,1.0"]!r})
        h = hashlib.sha256()
        for x, y in create_dataset({noise_folder!r}, cfg, training=True, seed=11).epoch(output_numpy=True):
            h.update(x.tobytes()); h.update(y.tobytes())
        print(h.hexdigest())
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, GLOG_v="3"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == first


def _file_identity(path):
    """k of const_folder's image img{i}.JPEG in class c (created in CLASSES order, PER_CLASS each)."""
    c, name = path.split(os.sep)[-2:]
    return CLASSES.index(c) * PER_CLASS + int(name[3])


def test_one_pipeline_serves_every_epoch_in_its_seeded_order_and_resumes_unread(const_folder):
    """Epoch e reads np.random.default_rng(seed + e).permutation of the files (FileList order, whole
    batches); a pipeline started at epoch 1, batch 1 (a resumed run) reads the rest of that epoch
    and the next ones exactly as the uninterrupted one; a caller leaving an epoch early does not
    shift the next; epochs are served in order only."""
    root, _ = const_folder
    cfg = _cfg()  # batch 5: 2 whole batches of the 12 images per epoch
    paths = FileList(root).paths
    expected = [[_file_identity(paths[j]) for j in np.random.default_rng(7 + e).permutation(12)[:10]]
                for e in range(5)]
    run = create_dataset(root, cfg, True, seed=7)
    assert run.get_dataset_size() == 2 and run.num_samples == 10
    got = [np.concatenate([_identities(x) for x, _ in _batches(run, e)]).tolist() for e in range(3)]
    assert got == expected[:3]
    x, _ = next(run.epoch(3, output_numpy=True))  # leave epoch 3 after one batch
    assert _identities(x).tolist() == expected[3][:5]
    assert np.concatenate([_identities(x) for x, _ in _batches(run, 4)]).tolist() == expected[4]
    with pytest.raises(RuntimeError, match="asked for 7, next is 5"):
        run.epoch(7)
    run.close()
    resumed = create_dataset(root, cfg, True, seed=7)
    tail = [_identities(x).tolist() for x, _ in resumed.epoch(1, first_batch=1, output_numpy=True)]
    assert tail == [expected[1][5:]]
    assert np.concatenate([_identities(x) for x, _ in _batches(resumed, 2)]).tolist() == expected[2]
    short = FolderPipeline(FileList(root), cfg, True, seed=7, max_batches=1)  # max_steps_per_epoch
    assert short.get_dataset_size() == 1
    assert [[_identities(x).tolist() for x, _ in _batches(short, e)] for e in range(2)] == \
        [[expected[0][:5]], [expected[1][:5]]]


def test_epoch_order_fills_or_drops_refused_files_and_deals_equal_shards():
    good = [i for i in range(10) if i not in (2, 5)]
    for shards in (1, 3):
        parts = [EpochOrder(10, seed=4, batch_size=1, num_shards=shards, shard_id=r, bad={2: "x", 5: "y"})
                 for r in range(shards)]
        idx = [p.indices(0) for p in parts]
        assert {len(i) for i in idx} == {-(-10 // shards)}  # replace: the epoch keeps its 10 places
        perm = np.random.default_rng(4).permutation(good)
        dealt = np.resize(perm, len(idx[0]) * shards)  # padded by repeating the permutation's start
        assert all(np.array_equal(i, dealt[r::shards]) for r, i in enumerate(idx))
    skip = EpochOrder(10, seed=4, batch_size=3, bad={2: "x", 5: "y"}, mode="skip")
    assert skip.batches == 2 and np.array_equal(skip.indices(0), np.random.default_rng(4).permutation(good)[:6])
    assert np.array_equal(skip.indices(0, skip_batches=1), skip.indices(0)[3:])
    evals = [EpochOrder(10, training=False, batch_size=4, num_shards=3, shard_id=r, bad={2: "x"}) for r in range(3)]
    assert [e.indices(0).tolist() for e in evals] == [[0, 4, 7], [1, 5, 8], [3, 6, 9]]  # no padding
    assert [e.batches for e in evals] == [1, 1, 1] and sum(e.samples for e in evals) == 9


def test_workers_divide_the_machine_among_its_ranks(monkeypatch):
    from src.data import data_workers
    from src.distributed import local_rank_count
    assert local_rank_count({"OMPI_COMM_WORLD_LOCAL_SIZE": "8", "OMPI_COMM_WORLD_SIZE": "16"}) == 8  # OpenMPI
    assert local_rank_count({"MPI_LOCALNRANKS": "4", "PMI_SIZE": "8"}) == 4  # MPICH
    assert local_rank_count({}) == 1  # one process (msrun's count comes from MindSpore after init)
    assert data_workers(64, 8, cpus=96, machine_cpus=96) == 8  # the configured count divided among 8 ranks
    assert data_workers(64, 8, cpus=32, machine_cpus=32) == 4  # ... never more than a rank's share of cores
    assert data_workers(64, 8, cpus=3, machine_cpus=32) == 3  # pinned by the launcher: its own cores
    assert data_workers(8, 8, cpus=96, machine_cpus=96) == 1
    assert data_workers(2, 1, cpus=2, machine_cpus=2) == 2 and data_workers(1, 4, cpus=2, machine_cpus=2) == 1
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_SIZE", "2")
    cfg = load_config(["--num_classes=3", "--num_parallel_workers=64", "--batch_size=2"])
    files = FileList.__new__(FileList)
    files.split_dir, files.classes, files.paths, files.labels = "x", ["a", "b", "c"], ["p"] * 4, np.zeros(4, np.int32)
    cpus = len(os.sched_getaffinity(0))
    assert FolderPipeline(files, cfg, True, local_ranks=local_rank_count()).workers == max(1, cpus // 2)


def test_normalisation_on_the_device_equals_the_host_pipeline_it_replaces(noise_folder):
    """The network's InputNormalize on the pipeline's uint8 batches gives the numbers the host
    pipeline (vision.Normalize before HWC2CHW) gave, and NumPy's (x - mean) / std, to float32 precision."""
    import mindspore as ms
    import mindspore.dataset as ds
    import mindspore.dataset.vision as vision
    from src.data import eval_ops
    from src.models.preprocess import InputNormalize
    cfg = _cfg(num_classes=2)
    x, _ = _batches(create_dataset(noise_folder, cfg, training=False))[0]
    got = InputNormalize(cfg.mean, cfg.std)(ms.Tensor(x)).asnumpy()
    ref = (x.astype(np.float64) - np.reshape(MEAN, (1, 3, 1, 1))) / np.reshape(STD, (1, 3, 1, 1))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)
    old_ops = eval_ops(cfg)[:-1] + [vision.Normalize(MEAN, STD), vision.HWC2CHW()]  # before this change
    old = ds.ImageFolderDataset(noise_folder, shuffle=False).map(old_ops, input_columns="image").batch(5)
    host = next(old.create_tuple_iterator(num_epochs=1, output_numpy=True))[0]
    np.testing.assert_allclose(got, host, rtol=1e-6, atol=1e-6)


def test_split_keys_name_the_folders_and_a_missing_one_names_its_key(tmp_path, capsys):
    from src.data import split_dir
    for split in ("training", "test"):
        os.makedirs(tmp_path / split / "cat")
        Image.new("RGB", (8, 8)).save(tmp_path / split / "cat" / "a.jpg")
    cfg = load_config([f"--data_path={tmp_path}", "--train_split=training", "--val_split=test", "--demo_dataset="])
    assert split_dir(cfg, "train_split") == str(tmp_path / "training")
    assert split_dir(cfg, "val_split") == str(tmp_path / "test")
    cfg.val_split = "val"
    with pytest.raises(DatasetError, match=r"^dataset folder not found: .*val \(val_split='val' under data_path") as e:
        split_dir(cfg, "val_split")
    assert "\n" not in str(e.value) and "--val_split" in str(e.value)
    sys.path.insert(0, os.path.join(REPO_ROOT, "scripts"))
    try:
        import check_dataset
    finally:
        sys.path.pop(0)
    Image.new("RGB", (8, 8)).save(tmp_path / "test" / "cat" / "b.jpg")
    (tmp_path / "test" / "cat" / "cut.jpg").write_bytes(b"\xff\xd8\xff")
    assert check_dataset.main([str(tmp_path), "--train_split=training", "--val_split=test"]) == 1
    out = capsys.readouterr().out
    assert "training: 1 classes" in out and "test: 1 classes" in out
    assert f"{tmp_path / 'test' / 'cat' / 'cut.jpg'}: JPEG ends before" in out and "1 unreadable of 4" in out
    assert check_dataset.main([str(tmp_path), "--val_split=val"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: dataset folder not found: {tmp_path / 'val'} (--val_split=val)"]


# --------------------------------------------------------------------------- bad images
@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory):
    """Good images plus every kind of trouble issue 6 lists; returns (data_path, undecodable files)."""
    base = tmp_path_factory.mktemp("bad")
    rng = np.random.default_rng(1)
    for c in ("cat", "dog"):
        os.makedirs(base / "train" / c)
        for i in range(6):
            Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(base / "train" / c / f"ok{i}.jpg")
    d = base / "train" / "cat"
    (d / "zero.jpg").write_bytes(b"")
    (d / "text.jpg").write_text("this is not an image\n" * 20)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)).save(buf, "JPEG")
    (d / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).convert("P").save(d / "gif.jpg", "GIF")
    Image.fromarray(rng.integers(0, 256, (30, 40), dtype=np.uint8)).save(d / "gray.jpg")
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).convert("CMYK").save(d / "cmyk.jpg")
    Image.fromarray(rng.integers(0, 256, (30, 40, 4), dtype=np.uint8), "RGBA").save(d / "alpha.png")
    Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)).save(d / "tiny.jpg")  # smaller than the crop
    bad = sorted(str(d / f) for f in ("zero.jpg", "text.jpg", "truncated.jpg", "gif.jpg"))
    return str(base), bad


def test_check_dataset_lists_exactly_the_undecodable_files(bad_folder, capsys):
    root, bad = bad_folder
    found = find_unreadable_images(root)
    assert [f for f, _ in found] == bad
    reasons = dict(found)
    assert "empty" in reasons[bad[3]] and "GIF" in reasons[bad[0]] and "truncated" in reasons[bad[2]]
    sys.path.insert(0, os.path.join(REPO_ROOT, "scripts"))
    try:
        import check_dataset
    finally:
        sys.path.pop(0)
    assert check_dataset.main([root]) == 1
    out = capsys.readouterr().out
    listed = sorted(line.split(": ", 1)[0] for line in out.splitlines() if line.startswith(root))
    assert listed == bad and "4 unreadable of 20 image(s)" in out
    assert check_dataset.main([os.path.join(root, "nope")]) == 2


def test_pipeline_survives_bad_images(bad_folder, tmp_path, monkeypatch):
    """The start-up check keeps refused files from the decoder: training keeps its length (replace)
    or drops them (skip), evaluation leaves them out, and bad_image_mode=error stops before reading."""
    root, bad = bad_folder
    monkeypatch.chdir(tmp_path)  # MindSpore drops a copy of a GIF it is given into the working directory
    split = os.path.join(root, "train")
    n = 20
    cfg = load_config(["--num_classes=2", "--image_size=24", "--eval_resize=24", "--batch_size=4",
                       "--num_parallel_workers=2"])
    for transform in ("random_resized_crop", "resize_random_crop"):
        cfg.train_transform, cfg.train_resize = transform, 28
        batches = _batches(create_dataset(split, cfg, training=True, seed=1))  # replace (default)
        assert len(batches) == n // 4 and all(x.shape == (4, 3, 24, 24) for x, _ in batches)
    assert sum(len(y) for _, y in _batches(create_dataset(split, cfg, training=False))) == n - len(bad)
    cfg.bad_image_mode = "skip"
    assert len(_batches(create_dataset(split, cfg, training=True, seed=1))) == (n - len(bad)) // 4
    cfg.bad_image_mode = "error"
    with pytest.raises(DatasetError, match=r"^undecodable image .*(zero|text|truncated|gif)\.jpg: \w.*"
                                           r"\(bad_image_mode=error; 3 more: python scripts/check_dataset.py lists them\)$"):
        create_dataset(split, cfg, training=False)
    assert os.listdir(tmp_path) == []  # the decoder never saw the GIF


def test_the_start_up_check_names_each_bad_file_once_and_a_count_per_epoch(bad_folder):
    root, bad = bad_folder
    files = FileList(os.path.join(root, "train"))
    halves = [check_files(files.paths, (r, 2)) for r in range(2)]  # two ranks, each its half
    assert not np.logical_and(halves[0], halves[1]).any()
    found = bad_files(files, halves[0] + halves[1])  # what the sum over ranks gives every rank
    assert sorted(files.paths[i] for i in found) == bad
    assert found == bad_files(files, check_files(files.paths))
    reasons = {os.path.basename(files.paths[i]): why for i, why in found.items()}
    assert reasons == {"zero.jpg": "empty file (0 bytes)", "text.jpg": "not a JPEG, PNG, BMP or TIFF image",
                       "gif.jpg": "not a JPEG, PNG, BMP or TIFF image",
                       "truncated.jpg": "JPEG has no end marker (truncated)"}
    lines = bad_image_lines(files, found, "replace")
    assert sorted(lines[:-1]) == sorted(f"undecodable image (replaced): {files.paths[i]} ({why})"
                                        for i, why in found.items())
    assert lines[-1].startswith(f"{files.split_dir}: 4 undecodable image(s) found by the start-up check, "
                                "replaced by other samples in every epoch")
    assert bad_image_lines(files, found, "skip")[0].startswith("undecodable image (skipped): ")
    assert bad_image_lines(files, {}, "error") == []
    assert BadImageMonitor(4).epoch_lines(3, "replace") == [
        "epoch 3: 4 undecodable image(s) replaced; list them all with: python scripts/check_dataset.py DATA_PATH"]
    assert BadImageMonitor(0).epoch_lines(3) == []
    order = EpochOrder(len(files), seed=3, batch_size=4, bad=found)
    assert not set(order.indices(0).tolist()) & set(found) and len(order.indices(0)) == len(files)


def test_a_file_that_passes_the_checks_but_fails_to_decode(tmp_path, monkeypatch):
    """A PNG whose compressed data is corrupt (its IEND intact) reaches MindSpore's decoder: replace
    and skip are MindSpore's, error stops with one line naming the file."""
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(5)
    folder = tmp_path / "train" / "a"
    os.makedirs(folder)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(folder / f"ok{i}.png")
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    at = data.find(b"IDAT")
    data[at + 10:at + 40] = bytes(30)
    (folder / "idat.png").write_bytes(bytes(data))
    assert image_problem(bytes(data)) is None and file_problem(str(folder / "idat.png")) is None
    cfg = load_config(["--num_classes=1", "--image_size=16", "--eval_resize=16", "--batch_size=2",
                       "--num_parallel_workers=1"])
    split = str(tmp_path / "train")
    assert sum(len(y) for _, y in _batches(create_dataset(split, cfg, training=False))) == 6  # replaced
    cfg.bad_image_mode = "skip"
    assert sum(len(y) for _, y in _batches(create_dataset(split, cfg, training=False))) == 5
    cfg.bad_image_mode = "error"
    with pytest.raises(DatasetError, match=r"^undecodable image .*idat\.png: Decode: image decode failed\. "
                                           r"\(bad_image_mode=error\)$"):
        with pipeline_errors():
            _batches(create_dataset(split, cfg, training=False))
    with pytest.raises(RuntimeError, match="not about images"):
        with pipeline_errors():
            raise RuntimeError("not about images")


def _encodings(rng):
    """Every format and mode MindSpore's decoder reads, as (name, bytes, Pillow's RGB image)."""
    rgb = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))
    gray = rgb.convert("L")
    out = []
    for name, img, fmt in (("rgb.png", rgb, "PNG"), ("rgb.bmp", rgb, "BMP"), ("rgb.tiff", rgb, "TIFF"),
                           ("gray.jpg", gray, "JPEG"), ("cmyk.jpg", rgb.convert("CMYK"), "JPEG"),
                           ("rgb.jpg", rgb, "JPEG"), ("gray16.png", Image.fromarray(
                               np.asarray(gray).astype(np.uint16) * 257), "PNG")):
        buf = io.BytesIO()
        img.save(buf, fmt)
        ref = Image.open(io.BytesIO(buf.getvalue()))
        ref = ref.convert("RGB") if ref.mode != "I;16" else gray.convert("RGB")  # Pillow cannot convert I;16
        out.append((name, buf.getvalue(), np.asarray(ref)))
    return out


def test_image_problem_passes_what_the_decoder_reads_and_refuses_cut_files():
    import mindspore.dataset.vision as vision
    for name, data, ref in _encodings(np.random.default_rng(3)):
        assert image_problem(data) is None, name
        assert np.array_equal(vision.Decode()(np.frombuffer(data, np.uint8)), ref), name
        if name.endswith((".jpg", ".png", ".bmp")):
            for frac in (0.1, 0.5, 0.97):
                assert image_problem(data[: int(len(data) * frac)]) is not None, (name, frac)
    assert image_problem(b"") == "empty file (0 bytes)"
    assert image_problem(b"GIF89a" + bytes(100)) == "not a JPEG, PNG, BMP or TIFF image"


def test_the_file_check_reads_head_and_tail_and_agrees_with_the_whole_bytes(tmp_path):
    """file_problem (what the start-up check runs) gives image_problem's verdict on the whole file,
    for small files, files larger than its head read, and a JPEG whose markers run past that head."""
    rng = np.random.default_rng(4)
    big = Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8))
    samples = [(n, d) for n, d, _ in _encodings(rng)]
    for fmt in ("JPEG", "PNG", "BMP"):
        buf = io.BytesIO()
        big.save(buf, fmt)
        samples.append((f"big.{fmt.lower()}", buf.getvalue()))
    buf = io.BytesIO()
    big.save(buf, "JPEG", exif=b"Exif\x00\x00" + bytes(65000), icc_profile=bytes(70000))  # APP segments > HEAD
    samples.append(("markers.jpg", buf.getvalue()))
    assert len(samples[-1][1]) > HEAD and samples[-1][1].find(b"\xff\xda") > HEAD
    checked = 0
    for name, data in samples:
        for cut in sorted({len(data), len(data) - 1, len(data) // 2, HEAD + 100, HEAD - 1, 900, 3, 0}):
            if cut > len(data):
                continue
            path = tmp_path / f"{cut}_{name}"
            path.write_bytes(data[:cut])
            assert file_problem(str(path)) == image_problem(data[:cut]), (name, cut)
            checked += 1
    assert image_problem(samples[-1][1]) is None and image_problem(samples[-1][1][:HEAD + 100]) is not None
    assert checked > 60
    assert file_problem(str(tmp_path / "missing.jpg")) == "cannot be read"


def test_every_format_is_read_or_reported_as_not_read(tmp_path, capsys):
    """Digits as PNG, grey/CMYK JPEG, BMP, TIFF, 16-bit PNG are decoded as Pillow decodes them;
    GIF and WebP (not decodable by MindSpore) are counted by extension and class, not silently lost."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    split = tmp_path / "data" / "train"
    kinds = ["png", "gray_jpg", "cmyk_jpg", "bmp", "tiff", "png16", "gif", "webp"]
    refs = {}
    for i in range(48):
        c, kind = str(digits.target[i] % 2), kinds[i % len(kinds)]
        os.makedirs(split / c, exist_ok=True)
        img = Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8)).resize((16, 16))
        stem = str(split / c / f"{i:02d}_{kind}")
        if kind == "png16":
            Image.fromarray(np.asarray(img).astype(np.uint16) * 257).save(stem + ".png")
        elif kind in ("gray_jpg", "cmyk_jpg"):
            (img if kind == "gray_jpg" else img.convert("CMYK")).save(stem + ".jpg", quality=95)
        else:
            (img.convert("P") if kind == "gif" else img.convert("RGB")).save(f"{stem}.{kind}")
        if kind not in ("gif", "webp"):
            path = next(p for p in os.listdir(split / c) if p.startswith(f"{i:02d}_"))
            refs[(int(c), path)] = np.asarray(Image.open(split / c / path).convert("RGB")
                                              if kind != "png16" else img.convert("RGB"))
    counts = {k: {c: sum(1 for i in range(48) if kinds[i % 8] == k and str(digits.target[i] % 2) == c)
                  for c in "01"} for k in ("gif", "webp")}
    assert unread_files(str(split)) == {f".{k}": {c: n for c, n in v.items() if n} for k, v in counts.items()}
    lines = describe_unread_files(str(split))
    assert len(lines) == 2 and all("not read" in line for line in lines)
    for line, k in zip(lines, ("gif", "webp")):
        assert line.startswith(f"{split}: {sum(counts[k].values())} .{k} file(s) not read")
        assert all(f"{c} ({n})" in line for c, n in counts[k].items() if n)
    cfg = load_config(["--num_classes=2", "--image_size=16", "--eval_resize=16", "--batch_size=8",
                       "--mean=0,0,0", "--std=1,1,1", "--num_parallel_workers=1"])
    assert not check_files(FileList(str(split)).paths).any()  # the start-up check refuses none of them
    images = np.concatenate([x for x, _ in _batches(create_dataset(str(split), cfg, training=False))])
    ordered = [refs[k] for k in sorted(refs)]  # file order: class, then name
    assert images.shape[0] == len(refs) == 36
    assert all(np.array_equal(x.transpose(1, 2, 0), r) for x, r in zip(images, ordered))
    sys.path.insert(0, os.path.join(REPO_ROOT, "scripts"))
    try:
        import check_dataset
    finally:
        sys.path.pop(0)
    assert check_dataset.main([str(tmp_path / "data")]) == 0
    out = capsys.readouterr().out
    assert "0 unreadable of 36 image(s) (12 other file(s) not read, listed above)" in out
    assert all(line in out for line in lines)


# --------------------------------------------------------------------------- demo dataset
def test_prepare_digits_counts_content_and_idempotence(tmp_path):
    root = str(tmp_path / "data" / "digits")
    info = prepare_digits(root)
    assert info == {"root": root, "train": 1437, "val": 360, "created": True}
    assert scan_image_folder(os.path.join(root, "train")) == [str(d) for d in range(10)]
    x_tr, y_tr, x_va, y_va = digits_split()
    for split, labels in (("train", y_tr), ("val", y_va)):
        counts = {c: len(os.listdir(os.path.join(root, split, c))) for c in map(str, range(10))}
        assert counts == {str(c): int((labels == c).sum()) for c in range(10)}
    for c in map(str, range(10)):  # stratified: 20% of every class in val
        n_val, n_tr = (len(os.listdir(os.path.join(root, s, c))) for s in ("val", "train"))
        assert abs(n_val - 0.2 * (n_val + n_tr)) <= 1
    # real digits: each written image, shrunk back to 8x8, matches its source scan
    img = Image.open(os.path.join(root, "val", "7", "7_0003.png"))
    assert img.size == (32, 32) and img.mode == "RGB"
    src = x_va[np.flatnonzero(y_va == 7)[3]]
    back = np.asarray(img.convert("L").resize((8, 8), Image.BOX), np.float64)
    assert np.corrcoef(back.ravel(), src.ravel())[0, 1] > 0.95
    # idempotent: nothing rewritten
    stamp = os.stat(os.path.join(root, "train", "3", "3_0000.png")).st_mtime_ns
    assert prepare_digits(root)["created"] is False
    assert os.stat(os.path.join(root, "train", "3", "3_0000.png")).st_mtime_ns == stamp
    assert sorted(os.listdir(tmp_path / "data")) == [".digits.lock", "digits"]  # no temporary folder left


def test_half_written_demo_is_rebuilt_and_user_data_is_kept(tmp_path):
    root = tmp_path / "digits"
    prepare_digits(str(root))
    os.remove(root / MARKER)  # as if killed before the marker was written
    for f in os.listdir(root / "val" / "4")[:10]:
        os.remove(root / "val" / "4" / f)
    import shutil
    shutil.rmtree(root / "val" / "9")
    assert prepare_digits(str(root))["created"] is True
    assert sum(len(files) for _, _, files in os.walk(root / "val")) == 360
    # a folder of someone's own images is never deleted
    user = tmp_path / "mine"
    os.makedirs(user / "train" / "cat")
    Image.new("RGB", (8, 8)).save(user / "train" / "cat" / "x.jpg")
    with pytest.raises(DatasetError, match="is not a digits demo folder; refusing to overwrite"):
        prepare_digits(str(user))
    cfg = load_config([f"--data_path={user}"])
    assert cfg.demo_dataset == "digits" and maybe_prepare_demo(cfg) is None
    assert os.path.exists(user / "train" / "cat" / "x.jpg")


def test_demo_config_pipeline_builds_batches(tmp_path):
    cfg = load_config([f"--data_path={tmp_path / 'digits'}"])
    assert maybe_prepare_demo(cfg)["created"] is True
    train = create_dataset(os.path.join(cfg.data_path, "train"), cfg, training=True, seed=cfg.seed)
    assert train.get_dataset_size() == 1437 // cfg.batch_size
    x, y = next(train.epoch(output_numpy=True))
    assert x.shape == (cfg.batch_size, 3, cfg.image_size, cfg.image_size) and x.dtype == np.uint8
    z = (x - np.reshape(cfg.mean, (1, 3, 1, 1))) / np.reshape(cfg.std, (1, 3, 1, 1))
    assert abs(float(z.mean())) < 0.5 and 0.5 < float(z.std()) < 1.5  # the demo's own mean/std suit it
    assert set(y.tolist()) <= set(range(10))
    val = create_dataset(os.path.join(cfg.data_path, "val"), cfg, training=False)
    assert sum(len(y) for _, y in val.epoch(output_numpy=True)) == 360
