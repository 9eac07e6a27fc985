"""Never train on data you were not given: every store derived from an image file — the
resized copy, the decoded pixels, the on-disk activation cache — notices any change of the
file's bytes, even one that keeps its size, inode and mtime (an in-place rewrite followed by
`os.utime`, `touch -r`, `cp -p`, `tar x` or `rsync --inplace`)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from finetune import Backbone, ImageFolderData, LastLayerOnly
from finetune.cache.plan import plan_cut
from finetune.cache.store import ActivationCache, dataset_key
from finetune.data import DecodedImages
from finetune.data.images import file_key

SIZE = 32


def _bmp(colour: tuple[int, int, int]) -> bytes:
    """A BMP's byte size depends on its pixel size alone: two colours, one size."""
    buffer = io.BytesIO()
    Image.new("RGB", (SIZE, SIZE), colour).save(buffer, format="BMP")
    return buffer.getvalue()


RED, BLUE = _bmp((220, 20, 20)), _bmp((20, 20, 220))


def _tree(root: Path) -> Path:
    for split, count in (("train", 3), ("val", 1)):
        for c, payload in enumerate((RED, BLUE)):
            for i in range(count):
                path = root / split / f"class{c}" / f"img{i}.bmp"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(payload)
    return root


def rewrite_in_place(path: Path, payload: bytes) -> None:
    """Overwrite the bytes through the same inode and set atime/mtime back, as a restore
    tool does: size, inode and mtime all stay as they were."""
    before = path.stat()
    assert len(payload) == before.st_size
    with open(path, "r+b") as handle:
        handle.write(payload)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_ino, after.st_mtime_ns) == (
        before.st_size, before.st_ino, before.st_mtime_ns)


def _data(root: Path, **kwargs) -> ImageFolderData:
    return ImageFolderData(root, image_size=SIZE, batch_size=4, val_split=0.0, num_workers=0,
                           progress=False, data_augmentation=False, **kwargs)


def _train_pixels(data: ImageFolderData) -> torch.Tensor:
    loader = data.train_loader()
    return torch.stack([loader.dataset[i][0] for i in range(len(loader.dataset))])


def _positions(data: ImageFolderData, name: str) -> tuple[int, int, int]:
    """Where the train split holds class0/`name`, another class0 image, and a class1 one."""
    names = [(path.parent.name, path.name) for path, _ in data.train_samples]
    index = names.index(("class0", name))
    other = next(i for i, n in enumerate(names) if n[0] == "class0" and i != index)
    blue = next(i for i, n in enumerate(names) if n[0] == "class1")
    return index, other, blue


def test_file_key_follows_the_bytes_not_the_stat(tmp_path: Path) -> None:
    path = tmp_path / "a.bmp"
    path.write_bytes(RED)
    red_key = file_key(path)
    rewrite_in_place(path, BLUE)
    assert file_key(path) != red_key
    rewrite_in_place(path, RED)
    assert file_key(path) == red_key  # the same bytes are the same image
    copy = tmp_path / "copy.bmp"
    copy.write_bytes(RED)
    assert file_key(copy) == red_key  # a copy elsewhere is still the same image
    assert file_key(tmp_path / "missing.bmp") == "missing"


def test_a_rewritten_image_is_not_served_its_old_resized_copy(tmp_path: Path) -> None:
    root = _tree(tmp_path / "data")
    cache = tmp_path / "cache"
    before = _train_pixels(_data(root, pre_resize=SIZE, cache_dir=cache, keep_decoded=False))
    rewrite_in_place(root / "train" / "class0" / "img0.bmp", BLUE)
    data = _data(root, pre_resize=SIZE, cache_dir=cache, keep_decoded=False)
    after = _train_pixels(data)
    index, other, blue = _positions(data, "img0.bmp.jpg")
    assert torch.equal(after[other], before[other])  # the copy was reused...
    assert not torch.allclose(after[index], before[index], atol=0.1)  # ...but not for img0
    assert torch.allclose(after[index], before[blue], atol=0.1)  # now blue, like class1


def test_a_shared_decoded_store_never_serves_a_rewritten_image_its_old_pixels(tmp_path):
    root = _tree(tmp_path / "data")
    store = DecodedImages()
    before = _train_pixels(_data(root, keep_decoded=store))
    rewrite_in_place(root / "train" / "class0" / "img0.bmp", BLUE)
    data = _data(root, keep_decoded=store)
    after = _train_pixels(data)
    index, other, blue = _positions(data, "img0.bmp")
    assert torch.equal(after[index], before[blue])  # decoded anew: blue
    assert torch.equal(after[other], before[other])


def test_a_rewritten_image_is_not_served_its_old_cached_activations(tmp_path: Path) -> None:
    root = _tree(tmp_path / "data")
    torch.manual_seed(0)
    backbone = Backbone.from_torchvision("resnet18", 2, weights=None)
    LastLayerOnly().apply(backbone)

    rewritten = root / "train" / "class0" / "img0.bmp"

    def fill() -> tuple[torch.Tensor, str, int, int]:
        data = _data(root, keep_decoded=False)
        loader = data.train_loader()
        cache = ActivationCache(backbone, plan_cut(backbone)[0], memory_budget=0,
                                directory=tmp_path / "activations")
        cache.fill(loader, lambda prefix, x: prefix(x), torch.device("cpu"))
        paths = loader.dataset.paths
        blue = next(i for i, (_, label) in enumerate(loader.dataset.samples) if label == 1)
        return (cache.features.clone(), dataset_key(loader.dataset),
                paths.index(rewritten), blue)

    before, key_before, index, blue = fill()
    rewrite_in_place(rewritten, BLUE)
    after, key_after, _, _ = fill()
    assert key_after != key_before
    assert torch.allclose(after[index], before[blue], atol=1e-5)  # now computed as blue
    assert not torch.allclose(after[index], before[index], atol=1e-3)


@pytest.mark.parametrize("touch", ["chmod", "rename-back"])
def test_metadata_changes_alone_keep_the_key(tmp_path: Path, touch: str) -> None:
    """ctime moves on chmod or a rename; the key, being the content's, does not: a copied
    or re-permissioned tree is not re-cached."""
    path = tmp_path / "a.bmp"
    path.write_bytes(RED)
    key = file_key(path)
    if touch == "chmod":
        path.chmod(0o600)
    else:
        path.rename(tmp_path / "b.bmp")
        (tmp_path / "b.bmp").rename(path)
    assert file_key(path) == key
