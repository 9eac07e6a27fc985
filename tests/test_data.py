"""ImageFolderData on generated trees (every odd file real folders hold) and on the real
photos in ../shared/data."""

from __future__ import annotations

import os
import random
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from finetune.data import (
    EvalTransform,
    ImageFolderData,
    ImageSplits,
    TrainTransform,
    load_rgb,
    stratified_split,
)
from finetune.data.preprocessing import Preprocessing
from finetune.errors import DataError
from finetune.model.backbone import LITE0_PREPROCESSING
from tests.conftest import COLOURS, write_image
from tests.conftest import make_named_tree as make_tree

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "data")


def data(root: Path, **kwargs) -> ImageFolderData:
    kwargs.setdefault("num_workers", 0)
    kwargs.setdefault("batch_size", 4)
    kwargs.setdefault("image_size", 32)
    kwargs.setdefault("progress", False)
    return ImageFolderData(root, **kwargs)


# -- splitting ----------------------------------------------------------------------------------
def test_split_seed_and_shuffle_seed_are_separate(tree: Path) -> None:
    def order(loader: torch.utils.data.DataLoader) -> list[int]:
        return [index for index, _ in loader.sampler]

    base = data(tree, val_split=0.3, seed=1)
    reshuffled = data(tree, val_split=0.3, split_seed=1, shuffle_seed=7)
    assert reshuffled.val_samples == base.val_samples and reshuffled.split_seed == 1
    assert order(reshuffled.train_loader()) != order(base.train_loader())
    assert order(base.train_loader(shuffle_seed=7)) == order(reshuffled.train_loader())
    assert base.shuffle_seed == base.seed == 1  # train_loader(shuffle_seed=) changed nothing
    resplit = data(tree, val_split=0.3, split_seed=2, shuffle_seed=1)
    assert resplit.val_samples != base.val_samples
    assert order(resplit.train_loader()) == order(base.train_loader())  # same size and seed


def test_a_scanned_split_serves_loaders_for_any_preprocessing(tree: Path) -> None:
    splits = ImageSplits.scan(tree, val_split=0.3, split_seed=1, progress=False)
    assert splits.classes == ("cat", "dog", "owl") and len(splits.val) == 9
    lite = ImageFolderData(splits, preprocessing=LITE0_PREPROCESSING, num_workers=0)
    imagenet = ImageFolderData(splits, num_workers=0)
    assert lite.val_samples == imagenet.val_samples == data(tree, val_split=0.3,
                                                             seed=1).val_samples
    assert lite.preprocessing.mean == (0.5, 0.5, 0.5) != imagenet.preprocessing.mean


def test_split_is_stratified_seeded_and_disjoint(tree: Path) -> None:
    a, b = data(tree, val_split=0.3, seed=1), data(tree, val_split=0.3, seed=1)
    assert a.classes == ["cat", "dog", "owl"]
    assert a.train_samples == b.train_samples and a.val_samples == b.val_samples
    assert not {p for p, _ in a.train_samples} & {p for p, _ in a.val_samples}
    counts = a.summary().counts
    assert counts["val"] == {"cat": 3, "dog": 3, "owl": 3}
    assert counts["train"] == {"cat": 7, "dog": 7, "owl": 7}
    assert counts["test"] == {"cat": 3, "dog": 3, "owl": 3}
    other = data(tree, val_split=0.3, seed=2)
    assert {p for p, _ in other.val_samples} != {p for p, _ in a.val_samples}


def test_labels_follow_folders(tree: Path) -> None:
    d = data(tree)
    for path, label in d.train_samples + d.val_samples + d.test_samples:
        assert path.parent.name == d.classes[label]


def test_stratified_split_keeps_each_class_share() -> None:
    samples = [(Path(f"c{c}/{i}.jpg"), c) for c in range(3) for i in range(20 * (c + 1))]
    train, val = stratified_split(samples, 0.25, seed=0)
    for c in range(3):
        assert sum(label == c for _, label in val) == 5 * (c + 1)
    assert sorted(train + val) == sorted(samples)
    one_each = [(Path("a.jpg"), 0), (Path("b.jpg"), 0), (Path("c.jpg"), 1), (Path("d.jpg"), 1)]
    _, val = stratified_split(one_each, 0.05, seed=0)  # rounds to 0, but each class gets one
    assert sorted(label for _, label in val) == [0, 1]


def test_train_per_class_subsets_before_split(tree: Path) -> None:
    d = data(tree, train_per_class=4, val_split=0.25)
    counts = d.summary().counts
    assert counts["train"] == {"cat": 3, "dog": 3, "owl": 3}
    assert counts["val"] == {"cat": 1, "dog": 1, "owl": 1}
    assert counts["test"]["cat"] == 3  # the test set is never subset
    full = data(tree, val_split=0.25)
    assert {p for p, _ in d.train_samples} <= {p for p, _ in full.train_samples + full.val_samples}


# -- loaders and preprocessing ------------------------------------------------------------------
def test_batches_are_normalised_float_nchw(tree: Path) -> None:
    d = data(tree, batch_size=5)
    images, labels = next(iter(d.train_loader()))
    assert images.shape == (5, 3, 32, 32) and images.dtype == torch.float32
    assert labels.dtype == torch.int64
    assert sum(len(y) for _, y in d.test_loader()) == 9


def test_backbone_preprocessing_is_wired_through(tmp_path: Path) -> None:
    root = tmp_path / "white"
    for split in ("train", "val"):
        for name in ("a", "b"):
            for i in range(3):
                path = root / split / name / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (40, 40), (255, 255, 255)).save(path)
    images, _ = next(iter(data(root, preprocessing=LITE0_PREPROCESSING).test_loader()))
    assert torch.allclose(images, torch.ones_like(images))  # (1 - 0.5) / 0.5
    images, _ = next(iter(data(root).test_loader()))  # ImageNet mean/std by default
    expected = (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    assert torch.allclose(images[0, :, 0, 0], expected, atol=1e-5)


def test_image_size_scales_the_resize() -> None:
    d_pre = Preprocessing(resize_size=256, crop_size=224)
    transform = EvalTransform(d_pre)
    assert transform(Image.new("RGB", (300, 300))).shape == (3, 224, 224)
    from finetune.data.transforms import sized

    small = sized(d_pre, 160)
    assert (small.resize_size, small.crop_size) == (183, 160)
    with pytest.raises(DataError, match="image_size"):
        sized(d_pre, 0)


def test_augmentation_is_seeded_and_independent_of_workers(tree: Path) -> None:
    def first_epoch(seed: int, workers: int = 0) -> list[torch.Tensor]:
        return [x for x, _ in data(tree, seed=seed, num_workers=workers).train_loader()]

    a, b, c = first_epoch(3), first_epoch(3, workers=2), first_epoch(4)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))
    loader = data(tree, seed=3).train_loader()
    epoch1, epoch2 = [x for x, _ in loader], [x for x, _ in loader]
    assert not all(torch.equal(x, y) for x, y in zip(epoch1, epoch2, strict=True))
    resumed = data(tree, seed=3).train_loader()
    resumed.sampler.set_epoch(1)
    assert all(torch.equal(x, y) for (x, _), y in zip(resumed, epoch2, strict=True))


def test_augmentation_off_gives_resize_and_centre_crop(tree: Path) -> None:
    d = data(tree, data_augmentation=False, val_split=0.0, batch_size=30)
    transform = EvalTransform(d.preprocessing)
    expected = [(transform(load_rgb(p)), label) for p, label in d.train_samples]
    images, labels = next(iter(d.train_loader()))
    assert len(labels) == 30
    for image, label in zip(images, labels.tolist(), strict=True):
        assert any(torch.equal(image, e) and label == y for e, y in expected)
    augmented = data(tree, val_split=0.0, batch_size=30, data_augmentation=True)
    images, _ = next(iter(augmented.train_loader()))
    assert sum(any(torch.equal(image, e) for e, _ in expected) for image in images) < 30


def test_train_transform_crops_inside_the_image_and_flips() -> None:
    transform = TrainTransform(Preprocessing(resize_size=36, crop_size=32))
    rng = random.Random(0)
    for width, height in [(48, 40), (300, 20), (20, 300), (33, 33)]:
        for _ in range(200):
            top, left, h, w = transform.crop_box(width, height, rng)
            assert top >= 0 and left >= 0 and top + h <= height and left + w <= width
            assert h > 0 and w > 0
    image = Image.new("RGB", (40, 40))
    image.paste((255, 255, 255), (0, 0, 20, 40))  # left half white
    outs = [transform(image, random.Random(s)) for s in range(20)]
    assert all(o.shape == (3, 32, 32) for o in outs)
    assert len({bool(o[0, :, 0].mean() > o[0, :, -1].mean()) for o in outs}) == 2


def test_single_image_last_batch_is_dropped(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "d", n_train=3, n_test=1, classes=("cat", "dog", "owl"))
    d = data(root, val_split=0.0, batch_size=4)  # 9 images: 4 + 4 + 1
    assert [len(y) for _, y in d.train_loader()] == [4, 4]
    assert [len(y) for _, y in d.test_loader()] == [3]


def test_val_split_zero_has_no_val_loader(tree: Path) -> None:
    with pytest.raises(DataError, match="val_split"):
        data(tree, val_split=0.0).val_loader()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"val_split": 1.0}, "val_split"), ({"batch_size": 0}, "batch_size"),
     ({"num_workers": -1}, "num_workers"), ({"train_per_class": 0}, "train_per_class")],
)
def test_bad_arguments(tree: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(DataError, match=match):
        data(tree, **kwargs)


# -- what real photo folders hold ---------------------------------------------------------------
def test_odd_modes_become_rgb(tmp_path: Path) -> None:
    gray = write_image(tmp_path / "gray.jpg", (90, 90, 90), mode="L")
    cmyk = write_image(tmp_path / "cmyk.jpg", (200, 30, 30), mode="CMYK")
    palette = write_image(tmp_path / "palette.png", (30, 200, 30), mode="P")
    rgba_path = tmp_path / "rgba.png"
    Image.new("RGBA", (10, 10), (0, 0, 0, 0)).save(rgba_path)
    for path in (gray, cmyk, palette, rgba_path):
        assert load_rgb(path).mode == "RGB"
    assert load_rgb(rgba_path).getpixel((5, 5)) == (255, 255, 255)  # transparent → white
    assert load_rgb(cmyk).getpixel((0, 1))[0] > 150


def test_jpeg_decodes_at_reduced_scale(tmp_path: Path) -> None:
    path = write_image(tmp_path / "big.jpg", size=(800, 600))
    assert load_rgb(path).size == (800, 600)
    assert load_rgb(path, min_size=256).size == (400, 300)  # shorter side still >= 256


def test_odd_modes_and_non_images_in_a_tree(tree: Path) -> None:
    write_image(tree / "train" / "cat" / "gray.jpg", mode="L")
    write_image(tree / "train" / "cat" / "cmyk.jpg", mode="CMYK")
    write_image(tree / "train" / "dog" / "rgba.png", mode="RGBA")
    write_image(tree / "train" / "dog" / "palette.png", mode="P")
    (tree / "train" / "dog" / "README.txt").write_text("not an image")
    (tree / "train" / "owl" / ".DS_Store").write_bytes(b"\0\1")
    d = data(tree, val_split=0.0, batch_size=64)
    assert d.summary().counts["train"] == {"cat": 12, "dog": 12, "owl": 10}
    images, _ = next(iter(d.train_loader()))
    assert images.shape == (34, 3, 32, 32)


def truncate(path: Path) -> Path:
    payload = path.read_bytes()
    path.write_bytes(payload[: len(payload) // 2])
    return path


def test_truncated_file_is_skipped_once_and_counted(tree: Path) -> None:
    bad = truncate(write_image(tree / "train" / "cat" / "broken.jpg", size=(64, 64)))
    (tree / "val" / "dog" / "garbage.png").write_bytes(b"definitely not a png")
    with pytest.warns(UserWarning) as record:
        d = data(tree)
    assert len(record) == 1
    assert str(bad) in str(record[0].message) and "garbage.png" in str(record[0].message)
    summary = d.summary()
    assert {p.name for p, _ in summary.skipped} == {"broken.jpg", "garbage.png"}
    assert "skipped files: 2" in str(summary) and str(bad) in str(summary)
    assert bad not in {p for p, _ in d.train_samples + d.val_samples}


def test_data_after_the_end_marker_is_not_truncation(tree: Path) -> None:
    path = write_image(tree / "train" / "cat" / "motion.jpg", size=(64, 64))
    path.write_bytes(path.read_bytes() + bytes(range(256)) * 40)  # e.g. a phone's video
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        d = data(tree)
    assert not d.skipped and d.summary().counts["train"]["cat"] + d.summary().counts["val"][
        "cat"] == 11


def test_strict_raises_on_unreadable_file(tree: Path) -> None:
    bad = truncate(write_image(tree / "train" / "cat" / "broken.jpg", size=(64, 64)))
    with pytest.raises(DataError, match="strict=False") as error:
        data(tree, strict=True)
    assert str(bad) in str(error.value)


def test_class_with_only_unreadable_files_is_an_error(tree: Path) -> None:
    (tree / "train" / "fox").mkdir()
    (tree / "val" / "fox").mkdir()
    (tree / "train" / "fox" / "a.jpg").write_bytes(b"junk")
    write_image(tree / "val" / "fox" / "b.jpg")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DataError, match=r"no readable images left in class\(es\) \['fox'\]"):
            data(tree)


# -- clear errors for broken layouts ------------------------------------------------------------
def test_empty_class_folder(tree: Path) -> None:
    (tree / "train" / "fox").mkdir()
    (tree / "train" / "fox" / "notes.txt").write_text("")
    with pytest.raises(DataError, match="holds no images") as error:
        data(tree)
    assert str(tree / "train" / "fox") in str(error.value)
    assert "delete the empty folder" in str(error.value)


def test_missing_test_folder(tree: Path) -> None:
    (tree / "val").rename(tree / "holdout")
    with pytest.raises(DataError, match=r"no test/ or val/ test folder") as error:
        data(tree)
    assert str(tree) in str(error.value)
    assert len(data(tree, test_dir="holdout").test_samples) == 9


def test_missing_train_folder(tmp_path: Path) -> None:
    (tmp_path / "photos" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match="missing train folder") as error:
        data(tmp_path / "photos")
    assert "train/<class>" in str(error.value)
    with pytest.raises(DataError, match="does not exist"):
        data(tmp_path / "nowhere")


def test_test_classes_must_match_train(tree: Path) -> None:
    (tree / "val" / "owl").rename(tree / "val" / "hawk")
    with pytest.raises(DataError, match=r"only in train \['owl'\], only in test \['hawk'\]"):
        data(tree)


def test_test_folder_is_preferred_over_val(tree: Path) -> None:
    for name in ("cat", "dog", "owl"):
        write_image(tree / "test" / name / "x.jpg", COLOURS[name])
    d = data(tree)
    assert len(d.test_samples) == 3 and all(p.parts[-3] == "test" for p, _ in d.test_samples)


# -- roots: a folder holding the tree, a zip --------------------------------------------------
def test_folder_holding_one_tree(tmp_path: Path) -> None:
    make_tree(tmp_path / "nature" / "inaturalist_12K")
    d = data(tmp_path / "nature")
    assert d.root == tmp_path / "nature" / "inaturalist_12K" and len(d.test_samples) == 9


def test_zip_root_is_extracted_once(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "src" / "inaturalist_12K", n_train=4, n_test=2)
    archive = tmp_path / "nature_12K.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        for path in sorted(tree.rglob("*.jpg")):
            handle.write(path, path.relative_to(tmp_path / "src").as_posix())
    d = data(archive)
    assert d.root == tmp_path / "nature_12K" / "inaturalist_12K"
    assert sum(d.summary().counts["test"].values()) == 6
    stamp = (d.root / "val" / "cat" / "cat000.jpg").stat().st_mtime_ns
    data(archive)
    assert (d.root / "val" / "cat" / "cat000.jpg").stat().st_mtime_ns == stamp
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="not a zip"):
        data(tmp_path / "notes.txt")


# -- pre-resize cache ---------------------------------------------------------------------------
def test_pre_resize_cache(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "big", n_train=3, n_test=1, size=(600, 400), classes=("cat", "dog"))
    write_image(tree / "train" / "dog" / "alpha.png", size=(500, 300), mode="RGBA")
    bad = truncate(write_image(tree / "train" / "cat" / "broken.jpg", size=(300, 300)))
    cache = tmp_path / "cache"
    with pytest.warns(UserWarning, match="broken.jpg"):
        d = data(tree, pre_resize=True, cache_dir=cache, val_split=0.0, batch_size=16)
    assert d.resized_copy is not None and d.resized_copy.is_relative_to(cache)
    cached = [p for p, _ in d.train_samples + d.test_samples]
    assert all(p.is_relative_to(d.resized_copy) for p in cached)
    assert {min(Image.open(p).size) for p in cached} == {256}
    assert (d.resized_copy / "train" / "dog" / "alpha.png.jpg").is_file()
    assert [p for p, _ in d.skipped] == [bad]
    images, _ = next(iter(d.train_loader()))
    assert images.shape == (7, 3, 32, 32)
    stamps = {p: p.stat().st_mtime_ns for p in cached}
    with pytest.warns(UserWarning, match="broken.jpg"):
        again = data(tree, pre_resize=True, cache_dir=cache, val_split=0.0)
    assert again.resized_copy == d.resized_copy
    assert {p: p.stat().st_mtime_ns for p in cached} == stamps  # reused, not rebuilt
    with pytest.warns(UserWarning):
        other = data(tree, pre_resize=300, cache_dir=cache, val_split=0.0)
    assert other.resized_copy != d.resized_copy  # keyed by the settings


# -- the real photos ----------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "n_classes"), [("hymenoptera", 2), ("ucmerced", 21)])
def test_real_photos_load_split_and_iterate(name: str, n_classes: int) -> None:
    root = SHARED_DATA / name
    if not root.is_dir():
        pytest.skip(f"{root} is absent (real photos are not part of the repository)")
    d = ImageFolderData(root, val_split=0.2, seed=0, batch_size=8, image_size=64,
                        num_workers=0, progress=False)
    assert len(d.classes) == n_classes and not d.skipped
    summary = d.summary()
    for name_ in d.classes:
        total = summary.counts["train"][name_] + summary.counts["val"][name_]
        assert summary.counts["val"][name_] == round(0.2 * total)
    images, labels = next(iter(d.train_loader()))
    assert images.shape == (8, 3, 64, 64) and labels.max() < n_classes
    assert -3 < images.mean() < 3 and images.std() > 0.1


def test_resized_copy_is_redone_for_images_swapped_under_the_same_names(tmp_path):
    """Two same-size files renamed onto each other keep their sizes and mtimes; the resized
    copy must still notice (the file's inode changed) and not serve the other image."""
    from finetune.data.resized import resize_tree

    source = tmp_path / "src"
    red, blue = source / "red.bmp", source / "blue.bmp"
    source.mkdir()
    Image.new("RGB", (300, 300), (255, 0, 0)).save(red)
    Image.new("RGB", (300, 300), (0, 0, 255)).save(blue)
    os.utime(blue, ns=(red.stat().st_atime_ns, red.stat().st_mtime_ns))  # same second, same mtime
    assert (red.stat().st_size, red.stat().st_mtime_ns) == (blue.stat().st_size,
                                                           blue.stat().st_mtime_ns)
    folder, _ = resize_tree(source, [red, blue], cache_root=tmp_path / "cache", progress=False)
    swap = source / "swap.bmp"
    red.rename(swap)
    blue.rename(red)
    swap.rename(blue)
    folder, _ = resize_tree(source, [red, blue], cache_root=tmp_path / "cache", progress=False)
    assert Image.open(folder / "red.bmp.jpg").getpixel((10, 10))[2] > 200  # now blue
    assert Image.open(folder / "blue.bmp.jpg").getpixel((10, 10))[0] > 200  # now red


def test_the_api_and_the_cli_share_one_set_of_data_defaults(tree: Path) -> None:
    import inspect

    from finetune.cli import build_parser
    from finetune.data import defaults
    from finetune.data.tree import ImageSplits
    from finetune.functional import data_load

    d = data(tree)
    assert (d.val_split, d.data_augmentation) == (defaults.VAL_SPLIT, defaults.AUGMENT)
    assert (inspect.signature(ImageSplits.scan).parameters["val_split"].default
            == defaults.VAL_SPLIT)
    load = inspect.signature(data_load).parameters
    assert (load["val_split"].default, load["data_augmentation"].default) == (
        defaults.VAL_SPLIT, defaults.AUGMENT)
    args = build_parser().parse_args(["train", "--data", str(tree)])
    assert (args.val_split, args.augment) == (defaults.VAL_SPLIT, defaults.AUGMENT)
