"""scripts/prepare_dataset.py (issue 19 item 1) on small archives in each dataset's published layout."""
import errno
import filecmp
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from src.data import prepare as prepare_module
from src.errors import DataError
from tests.archives import make_aircraft, make_cars, make_cub, make_imagenet_val
from tests.helpers import run_script


def _prepare(tmp_path, *args, check=True):
    return run_script("scripts/prepare_dataset.py", list(args), cwd=tmp_path, check=check)


def _files(dst):
    """{(split, class, file): path} of everything under dst/train and dst/val."""
    out = {}
    for split in ("train", "val"):
        top = os.path.join(dst, split)
        for folder, _, files in os.walk(top):
            for f in files:
                out[(split, os.path.relpath(folder, top), f)] = os.path.join(folder, f)
    return out


def _assert_lands(dst, where, same_inode=True):
    got = _files(dst)
    assert sorted(got) == sorted(where)
    for key, src in where.items():
        assert filecmp.cmp(got[key], src, shallow=False), key
        assert os.path.samefile(got[key], src) == same_inode, key


@pytest.mark.parametrize("dataset, make, summary", [
    ("cub200", make_cub, ["  train/ 9 images, 3 classes", "  val/ 6 images, 3 classes"]),
    ("aircraft", make_aircraft, ["  train/ 6 images, 3 classes", "  val/ 6 images, 3 classes"]),
    ("cars", make_cars, ["  train/ 6 images, 3 classes", "  val/ 6 images, 3 classes"]),
    ("imagenet", make_imagenet_val, ["  val/ 6 images, 3 classes"]),
])
def test_every_image_lands_in_its_split_and_class_once(tmp_path, dataset, make, summary):
    where = make(str(tmp_path / "archive"))
    dst = str(tmp_path / "data")
    out = _prepare(tmp_path, "--dataset", dataset, "--src", str(tmp_path / "archive"), "--dst", dst).stdout
    lines = out.splitlines()
    assert lines[0].endswith(f"-> {dst}, {len(where)} file(s) written (hard links)"), out
    assert lines[1:1 + len(summary)] == summary
    assert "this archive is a different or partial one" in out  # 3 classes, not the published count
    _assert_lands(dst, where)
    stamp = {k: os.lstat(p).st_ctime_ns for k, p in _files(dst).items()}
    again = _prepare(tmp_path, "--dataset", dataset, "--src", str(tmp_path / "archive"), "--dst", dst).stdout
    assert again.splitlines()[0].startswith(f"nothing to do: {dst} already holds ")
    assert {k: os.lstat(p).st_ctime_ns for k, p in _files(dst).items()} == stamp


def test_class_folder_names_follow_the_class_lists(tmp_path):
    """'/' in a class name becomes '_'; the 1-based index keeps the official order; spaces stay."""
    make_aircraft(str(tmp_path / "a"))
    make_cars(str(tmp_path / "c"))
    _prepare(tmp_path, "--dataset", "aircraft", "--src", str(tmp_path / "a"), "--dst", str(tmp_path / "A"))
    _prepare(tmp_path, "--dataset", "cars", "--src", str(tmp_path / "c"), "--dst", str(tmp_path / "C"))
    assert sorted(os.listdir(tmp_path / "A" / "val")) == ["001.707-320", "002.F-16A_B", "003.Falcon 2000"]
    assert sorted(os.listdir(tmp_path / "C" / "train")) == [
        "001.AM General Hummer SUV 2000", "002.Acura RL Sedan 2012", "003.Ram C_V Cargo Van Minivan 2012"]


def test_aircraft_banner_kept_by_default_and_cropped_when_asked(tmp_path):
    where = make_aircraft(str(tmp_path / "a"))
    _prepare(tmp_path, "--dataset", "aircraft", "--src", str(tmp_path / "a"), "--dst", str(tmp_path / "whole"))
    out = _prepare(tmp_path, "--dataset", "aircraft", "--src", str(tmp_path / "a"), "--dst", str(tmp_path / "cut"),
                   "--crop_banner").stdout
    assert "cropped JPEG copies" in out and "banner (bottom 20 px) cropped" in out
    for key, src in where.items():
        whole = np.asarray(Image.open(_files(str(tmp_path / "whole"))[key]))
        cut = np.asarray(Image.open(_files(str(tmp_path / "cut"))[key]))
        assert whole.shape == (44, 30, 3) and cut.shape == (24, 30, 3)
        assert whole[24:].mean() > 245 and cut[-4:].mean() < 150  # the white banner rows, gone from cut
        original = np.asarray(Image.open(src)).astype(int)
        assert np.abs(cut.astype(int) - original[:24]).mean() < 8  # the picture rows, re-encoded (quality 95)
    again = _prepare(tmp_path, "--dataset", "aircraft", "--src", str(tmp_path / "a"), "--dst", str(tmp_path / "cut"),
                     check=False)
    assert again.returncode == 2 and again.stderr.startswith("error: ") and "crop_banner=True" in again.stderr


@pytest.mark.parametrize("link, check", [("copy", lambda d, s: not os.path.samefile(d, s) and not os.path.islink(d)),
                                         ("symlink", lambda d, s: os.readlink(d) == s)])
def test_link_modes(tmp_path, link, check):
    where = make_cub(str(tmp_path / "a"))
    dst = str(tmp_path / "d")
    _prepare(tmp_path, "--dataset", "cub200", "--src", str(tmp_path / "a"), "--dst", dst, "--link", link)
    got = _files(dst)
    assert sorted(got) == sorted(where)
    for key, src in where.items():
        assert check(got[key], src) and filecmp.cmp(got[key], src, shallow=False), key


def test_auto_falls_back_to_symlinks_where_hard_links_fail(tmp_path, monkeypatch):
    where = make_cub(str(tmp_path / "a"))

    def no_link(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link")
    monkeypatch.setattr(os, "link", no_link)
    lines = prepare_module.prepare("cub200", str(tmp_path / "a"), str(tmp_path / "d"), log=lambda line: None)
    assert "hard links impossible here (Invalid cross-device link): symbolic links" in lines[0]
    got = _files(str(tmp_path / "d"))
    assert all(os.readlink(got[k]) == s for k, s in where.items())
    with pytest.raises(DataError, match="cannot hard-link .* use --link symlink or --link copy"):
        prepare_module.prepare("cub200", str(tmp_path / "a"), str(tmp_path / "e"), link="hardlink")


def test_an_interrupted_run_is_completed(tmp_path):
    where = make_cars(str(tmp_path / "a"))
    dst = tmp_path / "d"
    _prepare(tmp_path, "--dataset", "cars", "--src", str(tmp_path / "a"), "--dst", str(dst))
    os.remove(dst / ".prepare_dataset.json")
    shutil.rmtree(dst / "val" / "002.Acura RL Sedan 2012")
    out = _prepare(tmp_path, "--dataset", "cars", "--src", str(tmp_path / "a"), "--dst", str(dst)).stdout
    assert "2 file(s) written (hard links), 10 already there" in out
    _assert_lands(str(dst), where)


def _one_line_error(tmp_path, *args):
    proc = _prepare(tmp_path, *args, check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    return proc.stderr


def test_wrong_or_incomplete_archives_stop_with_one_line(tmp_path):
    cub = tmp_path / "cub"
    make_cub(str(cub))
    args = ["--dataset", "cub200", "--src", str(cub), "--dst", str(tmp_path / "d")]
    os.rename(cub / "CUB_200_2011" / "train_test_split.txt", tmp_path / "split.txt")
    assert "incomplete: train_test_split.txt missing" in _one_line_error(tmp_path, *args)
    os.rename(tmp_path / "split.txt", cub / "CUB_200_2011" / "train_test_split.txt")
    with open(cub / "CUB_200_2011" / "classes.txt", "a") as f:
        f.write("4 004.Groove_billed_Ani\n")
    assert "classes.txt lists 4 classes but images.txt gives train images of 3 (none of 004.Groove_billed_Ani)" \
        in _one_line_error(tmp_path, *args)
    make_cub(str(tmp_path / "cub2"))
    gone = tmp_path / "cub2" / "CUB_200_2011" / "images" / "002.Laysan_Albatross" / "Laysan_Albatross_0003_9.jpg"
    os.remove(gone)
    assert f"{gone}, named in images.txt, absent" in _one_line_error(
        tmp_path, "--dataset", "cub200", "--src", str(tmp_path / "cub2"), "--dst", str(tmp_path / "d"))
    assert "is not a FGVC-Aircraft 2013b archive" in _one_line_error(
        tmp_path, "--dataset", "aircraft", "--src", str(cub), "--dst", str(tmp_path / "d"))

    air = tmp_path / "air"
    make_aircraft(str(air))
    with open(air / "fgvc-aircraft-2013b" / "data" / "images_variant_test.txt", "a") as f:
        f.write("1099999 Spitfire\n")
    assert "variant 'Spitfire' is not among the 3 of variants.txt" in _one_line_error(
        tmp_path, "--dataset", "aircraft", "--src", str(air), "--dst", str(tmp_path / "d"))

    cars = tmp_path / "cars"
    make_cars(str(cars))
    os.remove(cars / "cars_test_annos_withlabels.mat")
    assert "cars_test_annos_withlabels.mat missing" in _one_line_error(
        tmp_path, "--dataset", "cars", "--src", str(cars), "--dst", str(tmp_path / "d"))

    assert not os.path.exists(tmp_path / "d")  # nothing written by any of them


def test_imagenet_val_must_match_the_train_class_folders(tmp_path):
    where = make_imagenet_val(str(tmp_path / "a"))
    dst = tmp_path / "d"
    for wnid in ("n02100735", "n02110185", "n01440764"):  # one of the devkit's is missing, another is extra
        os.makedirs(dst / "train" / wnid)
    err = _one_line_error(tmp_path, "--dataset", "imagenet", "--src", str(tmp_path / "a"), "--dst", str(dst))
    assert "has 3 class folders but the devkit has 3 classes (2 differ, e.g. n01440764)" in err
    os.rename(dst / "train" / "n01440764", dst / "train" / "n02119789")
    out = _prepare(tmp_path, "--dataset", "imagenet", "--src", str(tmp_path / "a"), "--dst", str(dst)).stdout
    assert "val/<wnid>/ as train/ has them" in out
    _assert_lands(str(dst), where)
    assert json.load(open(dst / ".prepare_dataset.json"))["counts"] == {"val": 6}


def test_a_destination_with_other_files_is_refused(tmp_path):
    make_cub(str(tmp_path / "a"))
    os.makedirs(tmp_path / "d" / "train" / "cats")
    (tmp_path / "d" / "train" / "cats" / "x.jpg").write_bytes(b"not ours")
    err = _one_line_error(tmp_path, "--dataset", "cub200", "--src", str(tmp_path / "a"), "--dst", str(tmp_path / "d"))
    assert "holds 1 file(s) that the CUB-200-2011 lists do not name" in err
