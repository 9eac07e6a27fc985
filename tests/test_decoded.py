"""DecodedImages: un-augmented images decoded once, kept as pixels, bit-identical to streaming."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import pytest
import torch

import finetune.data.datasets as datasets_module
from finetune.data import DecodedImages, ImageFolderData
from finetune.errors import DataError
from tests.conftest import make_named_tree


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return make_named_tree(tmp_path / "data", n_train=6, n_test=3, size=(52, 44))


def data(root: Path, **kwargs) -> ImageFolderData:
    kwargs.setdefault("num_workers", 0)
    return ImageFolderData(root, batch_size=4, image_size=32, val_split=0.34, progress=False,
                           **kwargs)


def batches(loader: torch.utils.data.DataLoader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(loader)


def same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) and torch.equal(i, j)
                                    for (x, i), (y, j) in zip(a, b, strict=True))


@pytest.fixture
def decode_count(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every file the data layer decodes, in order."""
    calls: list[Path] = []
    real = datasets_module.load_rgb

    def counting(path, *args, **kwargs):
        calls.append(Path(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(datasets_module, "load_rgb", counting)
    return calls


def test_kept_images_are_bit_identical_to_streamed_ones(tree: Path) -> None:
    kept, streamed = data(tree), data(tree, keep_decoded=False)
    for make in ("val_loader", "test_loader"):
        assert same(batches(getattr(kept, make)()), batches(getattr(streamed, make)()))
    kept_train = data(tree, data_augmentation=False).train_loader(shuffle_seed=3)
    streamed_train = data(tree, data_augmentation=False,
                          keep_decoded=False).train_loader(shuffle_seed=3)
    for _ in range(2):  # two epochs: the second reads the store
        assert same(batches(kept_train), batches(streamed_train))
    assert kept_train.dataset.decoded is not None and streamed_train.dataset.decoded is None


def test_each_image_is_decoded_once_across_epochs_and_shared_stores(
        tree: Path, decode_count: list[Path]) -> None:
    store = DecodedImages()
    first = data(tree, data_augmentation=False, keep_decoded=store)
    for _ in range(3):
        batches(first.train_loader())
        batches(first.val_loader())
    second = data(tree, data_augmentation=False, keep_decoded=store)  # another run, same split
    batches(second.train_loader(shuffle_seed=5))
    batches(second.test_loader())
    everything = [p for p, _ in first.train_samples + first.val_samples + first.test_samples]
    assert sorted(decode_count) == sorted(everything)  # each file once
    assert len(store) == len(everything)


def test_augmented_training_streams_and_uses_its_workers(tree: Path,
                                                         decode_count: list[Path]) -> None:
    loader = data(tree, num_workers=2, data_augmentation=True).train_loader()
    assert loader.dataset.decoded is None and loader.num_workers == 2
    augmented = data(tree, data_augmentation=True)  # no workers: every decode counted
    batches(augmented.train_loader(shuffle_seed=1))  # two epochs decode every image twice...
    batches(augmented.train_loader(shuffle_seed=2))
    assert len(decode_count) == 2 * len(augmented.train_samples)
    val = augmented.val_loader()  # ...while val is kept, in the main process
    assert val.dataset.decoded is not None and val.num_workers == 0


def test_a_split_over_the_budget_streams(tree: Path) -> None:
    one_image = 3 * 32 * 32
    store = DecodedImages(budget_bytes=5 * one_image)
    small = data(tree, keep_decoded=store, num_workers=1)
    assert len(small.val_samples) == 6 and len(small.test_samples) == 9
    for loader in (small.val_loader(), small.test_loader()):
        assert loader.dataset.decoded is None and loader.num_workers == 1
    assert store.reserved_bytes == 0
    store = DecodedImages(budget_bytes=6 * one_image)
    fits = data(tree, keep_decoded=store, num_workers=1)
    assert fits.val_loader().dataset.decoded is store and fits.val_loader().num_workers == 0
    assert store.reserved_bytes == 6 * one_image  # asked twice, reserved once
    streamed = fits.test_loader()
    assert streamed.dataset.decoded is None and streamed.num_workers == 1
    with pytest.raises(ValueError, match="budget_bytes"):
        DecodedImages(budget_bytes=-1)


def test_a_file_broken_after_the_scan_is_skipped_as_when_streaming(tree: Path) -> None:
    kept, streamed, strict = data(tree), data(tree, keep_decoded=False), data(tree, strict=True)
    broken = kept.val_samples[1][0]
    broken.write_bytes(b"not an image any more")  # after the scan, which would skip it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kept_batches = batches(kept.val_loader())
        streamed_batches = batches(streamed.val_loader())
    assert same(kept_batches, streamed_batches)
    assert any(str(broken) in str(w.message) for w in caught)
    with pytest.raises(DataError, match="remove or replace the file"):
        batches(strict.val_loader())


def test_a_kept_dataset_pickles_for_spawned_workers(tree: Path) -> None:
    loader = data(tree).val_loader()
    expected = batches(loader)
    dataset = pickle.loads(pickle.dumps(loader.dataset))
    assert torch.equal(dataset[0][0], expected[0][0][0])
    assert dataset.decoded is not None and len(dataset.decoded) == len(dataset)
