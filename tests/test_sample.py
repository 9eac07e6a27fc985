"""The sample dataset shipped in the package: loads with its classes, is reachable by name,
is declared as package data, and is rebuilt deterministically by benchmarks.make_sample."""

from __future__ import annotations

import configparser
import fnmatch
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks import make_sample
from finetune.cli import main
from finetune.data import ImageFolderData, sample_dataset
from finetune.data.sample import ATTRIBUTION, SAMPLE_CLASSES

ROOT = Path(__file__).resolve().parents[1]


def test_the_sample_loads_through_image_folder_data_with_its_classes() -> None:
    data = ImageFolderData(sample_dataset(), val_split=0.25, num_workers=0, image_size=32,
                           full_check=True, strict=True, progress=False)
    assert data.classes == list(SAMPLE_CLASSES)
    summary = data.summary()
    assert set(summary.counts["train"].values()) == {21}  # 28 per class, a quarter to val
    assert set(summary.counts["val"].values()) == {7}
    assert set(summary.counts["test"].values()) == {8}
    assert summary.skipped == ()
    images, labels = next(iter(data.test_loader()))
    assert images.shape[1:] == (3, 32, 32)
    assert labels.tolist() == [0] * 8 + [1] * 8 + [2] * 8 + [3] * 8
    shorter = {min(Image.open(p).size) for p, _ in data.test_samples}
    assert shorter == {160}


def test_the_sample_is_reachable_by_name_unless_a_folder_of_that_name_exists(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert ImageFolderData("sample", num_workers=0, progress=False).root == sample_dataset()
    (tmp_path / "sample" / "train" / "a").mkdir(parents=True)
    (tmp_path / "sample" / "val" / "a").mkdir(parents=True)
    for split in ("train", "val"):
        Image.new("RGB", (8, 8)).save(tmp_path / "sample" / split / "a" / "x.jpg")
    own = ImageFolderData("sample", val_split=0, num_workers=0, progress=False)
    assert own.classes == ["a"]  # the user's folder, not the packaged one


def test_the_cli_trains_on_the_sample_by_name(capsys: pytest.CaptureFixture) -> None:
    code = main(["train", "--data", "sample", "--backbone", "tests.conftest:make_tiny_backbone",
                 "--image-size", "32", "--epochs", "1", "--train-per-class", "4",
                 "--strategy", "last-layer", "--workers", "0", "--precision", "fp32"])
    out = capsys.readouterr().out
    assert code == 0
    assert "data: 10 classes · train 30 · val 10 · test 80 images" in out


def test_every_sample_file_is_declared_as_package_data() -> None:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    patterns = [p.strip() for p in config["options.package_data"]["finetune.data"].split(",")]
    package = ROOT / "finetune" / "data"
    files = [p.relative_to(package).as_posix() for p in sample_dataset().rglob("*")
             if p.is_file()]
    assert f"sample/{ATTRIBUTION}" in files and len(files) == 10 * 36 + 1
    assert [f for f in files if not any(fnmatch.fnmatch(f, p) for p in patterns)] == []
    assert "Yang" in (sample_dataset() / ATTRIBUTION).read_text()


def _source(root: Path, layout: str) -> Path:
    """Two classes of 7 distinct 40x30 images (+ one pixel copy) as `<class>/` TIFFs or as
    `train/<class>/` + `val/<class>/` PNGs."""
    rng = np.random.default_rng(0)
    for name in ("aa", "bb"):
        for i in range(7):
            pixels = rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)
            split = "train" if i < 4 else "val"
            folder = root / name if layout == "flat" else root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            suffix = ".tif" if layout == "flat" else ".png"
            Image.fromarray(pixels).save(folder / f"{name}{i:02d}{suffix}")
            if i == 0:
                Image.fromarray(pixels).save(folder / f"{name}99{suffix}")  # a duplicate
    return root


def test_make_sample_selects_the_same_images_whatever_the_layout(tmp_path: Path) -> None:
    built = {}
    for layout in ("flat", "split"):
        out = tmp_path / f"out-{layout}"
        make_sample.main([str(_source(tmp_path / layout, layout)), "--output", str(out),
                          "--classes", "aa,bb", "--train", "4", "--test", "2", "--size", "20"])
        built[layout] = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.jpg"))
        assert (out / ATTRIBUTION).is_file()
        assert {Image.open(out / f).size for f in built[layout]} == {(27, 20)}
    assert built["flat"] == built["split"]
    assert len(built["flat"]) == 12
    for name in ("aa", "bb"):  # one image and its pixel copy are never both chosen
        stems = {Path(f).stem for f in built["flat"] if f"/{name}/" in f}
        assert not {f"{name}00", f"{name}99"} <= stems


def test_make_sample_says_which_class_is_missing(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="no images of class 'cc'"):
        make_sample.main([str(_source(tmp_path / "src", "flat")), "--output",
                          str(tmp_path / "out"), "--classes", "aa,cc", "--train", "4",
                          "--test", "2"])
