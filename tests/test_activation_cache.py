"""Frozen-prefix activation cache: where it cuts, that it is exact, when it is stale."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from finetune import (
    Backbone,
    FreezeFraction,
    FreezeStrategy,
    FullUnfreeze,
    History,
    LastLayerOnly,
    TrainConfig,
    Trainer,
)
from finetune.cache.plan import plan_cut
from finetune.cache.store import ActivationCache, cache_key, split


@pytest.fixture(scope="module")
def resnet18() -> Backbone:
    torch.manual_seed(0)
    return Backbone.from_torchvision("resnet18", 3, weights=None)


def _fp32(prefix, images):  # the trainer's forward hook: precision, memory format
    return prefix(images)


def find_cut(backbone: Backbone):
    return plan_cut(backbone)[0]


def test_cut_finds_the_last_fully_frozen_block_inside_resnet50() -> None:
    backbone = Backbone.resnet50(10, weights=None)
    FreezeFraction(0.8).apply(backbone)  # layer3.5.bn3.bias trains: layer3.5 is not frozen
    assert find_cut(backbone).label == "layer3.4.relu"  # the block's output, after its add
    FreezeFraction(0.8, count="groups").apply(backbone)
    assert find_cut(backbone).label == "layer3.5.relu"
    LastLayerOnly().apply(backbone)
    assert find_cut(backbone).label == "avgpool"
    FullUnfreeze().apply(backbone)
    assert find_cut(backbone) is None


def test_train_bn_stops_the_cut_at_the_first_batchnorm(resnet18: Backbone) -> None:
    LastLayerOnly(train_bn=True).apply(resnet18)
    assert find_cut(resnet18).label == "conv1"  # bn1's statistics move under training


def test_every_architecture_is_cut_by_tracing(resnet18: Backbone) -> None:
    from tests.conftest import make_tiny_backbone

    tiny = make_tiny_backbone()
    LastLayerOnly().apply(tiny)
    cut, reason = plan_cut(tiny)
    assert (cut.label, reason) == ("pool", "") and cut.graph is not None
    LastLayerOnly().apply(resnet18)
    assert plan_cut(resnet18)[0].graph is not None  # the ResNet family too: one mechanism


def test_prefix_then_suffix_equals_the_full_forward(resnet18: Backbone) -> None:
    FreezeFraction(0.5).apply(resnet18)
    prefix, suffix = split(resnet18, find_cut(resnet18))
    images = torch.randn(2, 3, 64, 64)
    resnet18.eval()
    with torch.no_grad():
        assert torch.equal(suffix(prefix(images)), resnet18(images))


def test_batches_follow_the_loaders_own_shuffling(resnet18: Backbone) -> None:
    LastLayerOnly().apply(resnet18)
    images = torch.randn(10, 3, 32, 32)
    labels = torch.arange(10) % 3
    loader = DataLoader(TensorDataset(images, labels), batch_size=4, shuffle=True,
                        generator=torch.Generator().manual_seed(5))
    cache = ActivationCache(resnet18, find_cut(resnet18))
    cache.fill(loader, _fp32, torch.device("cpu"))
    loader.generator.manual_seed(7)
    cached = list(cache.batches(loader))
    loader.generator.manual_seed(7)
    direct = list(loader)
    assert [len(b) for b, _ in cached] == [4, 4, 2]
    resnet18.eval()
    with torch.no_grad():
        for (features, cached_labels), (batch, batch_labels) in zip(cached, direct, strict=True):
            assert torch.equal(cached_labels, batch_labels)
            assert torch.allclose(cache.suffix(features), resnet18(batch), atol=1e-5)


def test_memory_budget_spills_to_disk_and_a_second_fill_reuses_it(
    resnet18: Backbone, tmp_path: Path
) -> None:
    LastLayerOnly().apply(resnet18)
    dataset = TensorDataset(torch.randn(6, 3, 32, 32), torch.arange(6) % 3)
    loader = DataLoader(dataset, batch_size=4)
    first = ActivationCache(resnet18, find_cut(resnet18), memory_budget=0, directory=tmp_path)
    first.fill(loader, _fp32, torch.device("cpu"))
    assert first.on_disk is not None and first.on_disk.stat().st_size == first.nbytes
    second = ActivationCache(resnet18, find_cut(resnet18), memory_budget=0, directory=tmp_path)
    calls = []
    second.fill(loader, lambda p, x: calls.append(1) or p(x), torch.device("cpu"))
    assert len(calls) == 1  # only the probe batch that sizes the store: the rest was reused
    assert torch.equal(second.features, first.features)
    assert torch.equal(second.labels, first.labels)


def test_bf16_activations_are_stored_in_bf16(resnet18: Backbone) -> None:
    LastLayerOnly().apply(resnet18)
    loader = DataLoader(TensorDataset(torch.randn(4, 3, 32, 32), torch.zeros(4).long()),
                        batch_size=2)

    def bf16(prefix, images):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return prefix(images)

    cache = ActivationCache(resnet18, find_cut(resnet18))
    cache.fill(loader, bf16, torch.device("cpu"))
    assert cache.features.dtype == torch.bfloat16
    assert cache.nbytes == 4 * 512 * 2  # four images of 512 pooled bf16 values


def test_budget_without_a_directory_is_a_clear_error(resnet18: Backbone) -> None:
    LastLayerOnly().apply(resnet18)
    loader = DataLoader(TensorDataset(torch.randn(4, 3, 32, 32), torch.zeros(4).long()))
    cache = ActivationCache(resnet18, find_cut(resnet18), memory_budget=16)
    with pytest.raises(MemoryError, match=r"over the 0.00 GiB budget.*activation_cache_dir"):
        cache.fill(loader, _fp32, torch.device("cpu"))


def test_key_changes_with_weights_preprocessing_cut_and_data(resnet18: Backbone) -> None:
    import attrs

    LastLayerOnly().apply(resnet18)
    cut = find_cut(resnet18)
    data = TensorDataset(torch.randn(4, 3, 8, 8), torch.zeros(4).long())
    base = cache_key(resnet18, cut, data, "torch.bfloat16")
    assert base == cache_key(resnet18, cut, data, "torch.bfloat16")
    other_data = TensorDataset(torch.randn(4, 3, 8, 8), torch.zeros(4).long())
    assert cache_key(resnet18, cut, other_data, "torch.bfloat16") != base
    assert cache_key(resnet18, attrs.evolve(cut, index=3, label="layer1"), data,
                     "torch.bfloat16") != base
    assert cache_key(resnet18, cut, data, "torch.float32") != base
    original = resnet18.preprocessing
    resnet18.preprocessing = attrs.evolve(original, crop_size=160)
    try:
        assert cache_key(resnet18, cut, data, "torch.bfloat16") != base
    finally:
        resnet18.preprocessing = original
    with torch.no_grad():
        resnet18.model.layer1[0].conv1.weight[0, 0, 0, 0] += 1.0
    assert cache_key(resnet18, cut, data, "torch.bfloat16") != base


# -- through the Trainer --------------------------------------------------------------------
def _fit(strategy: FreezeStrategy, feature_cache: str, precision: str = "fp32",
         epochs: int = 2) -> tuple[Trainer, History, DataLoader]:

    torch.manual_seed(0)
    backbone = Backbone.from_torchvision("resnet18", 3, weights=None)
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(16, 3, 32, 32, generator=generator)
    labels = torch.arange(16) % 3
    train = DataLoader(TensorDataset(images, labels), batch_size=4, shuffle=True,
                       generator=torch.Generator())
    val = DataLoader(TensorDataset(images[:8], labels[:8]), batch_size=4)
    config = TrainConfig(epochs=epochs, lr=1e-2, seed=0, precision=precision,
                         channels_last=False, feature_cache=feature_cache)
    trainer = Trainer(backbone, strategy, config)
    history = trainer.fit(train, val)
    return trainer, history, train


@pytest.mark.parametrize("strategy", [LastLayerOnly(), FreezeFraction(0.8)],
                         ids=["last-layer", "freeze-80"])
def test_cached_training_is_bit_exact_in_fp32(strategy: FreezeStrategy) -> None:
    plain, plain_history, _ = _fit(strategy, "off")
    cached, cached_history, train = _fit(strategy, "auto")
    assert plain.state.cached_prefix is None and cached.state.cached_prefix is not None
    assert plain.state.uncached_reason == "feature_cache='off'"
    assert len(cached.activations) == 0  # released when fit returns
    assert cached.activations.batches(train, cached.backbone, None, None) == (
        train, cached.backbone)
    for (name, a), b in zip(plain.backbone.state_dict().items(),
                            cached.backbone.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert plain_history["train_loss"] == cached_history["train_loss"]
    assert plain_history["val_loss"] == cached_history["val_loss"]


def test_cached_training_matches_within_bf16_tolerance() -> None:
    plain, plain_history, _ = _fit(LastLayerOnly(), "off", precision="bf16")
    cached, cached_history, _ = _fit(LastLayerOnly(), "auto", precision="bf16")
    assert cached.state.cached_prefix == "avgpool"
    assert torch.allclose(plain.backbone.head.weight, cached.backbone.head.weight, atol=2e-2)
    assert plain_history["train_loss"] == pytest.approx(cached_history["train_loss"], rel=2e-2)


def test_augmented_data_is_not_cached_in_auto_mode() -> None:

    class Augmented(TensorDataset):
        deterministic = False

    backbone = Backbone.from_torchvision("resnet18", 3, weights=None)
    data = Augmented(torch.randn(8, 3, 32, 32), torch.arange(8) % 3)
    trainer = Trainer(backbone, LastLayerOnly(),
                      TrainConfig(epochs=1, precision="fp32", feature_cache="auto"))
    trainer.fit(DataLoader(data, batch_size=4))
    assert trainer.activations.cut is not None and trainer.state.cached_prefix is None
    assert "does not declare itself deterministic" in trainer.state.uncached_reason


@pytest.mark.parametrize("augment", [False, True])
def test_image_folder_loaders_are_cached_only_without_augmentation(
    tmp_path: Path, augment: bool
) -> None:
    from finetune import ImageFolderData
    from tests.conftest import make_named_tree as make_tree

    root = make_tree(tmp_path / "tree", n_train=4, n_test=1)
    backbone = Backbone.from_torchvision("resnet18", 3, weights=None)
    data = ImageFolderData(root, preprocessing=backbone.preprocessing, image_size=32,
                           batch_size=4, val_split=0.25,
                           data_augmentation=augment, num_workers=0, progress=False)
    trainer = Trainer(backbone, LastLayerOnly(), TrainConfig(epochs=2, precision="fp32"))
    history = trainer.fit(data.train_loader(), data.val_loader())
    assert len(history) == 2
    assert trainer.state.cached_prefix == (None if augment else "avgpool")
    assert trainer.classes == ["cat", "dog", "owl"]


class OneMachineShard:
    """The parts of a RowShard `machine_memory` asks, for one process that leads a machine
    of two (the collectives answer as everywhere agreed)."""

    machines_shared, machine_leader, machine = True, True, [0, 1]

    def token(self) -> str:
        return "test"

    def agree(self, flag: bool) -> bool:
        return flag


def test_machine_memory_maps_an_unlinked_file_or_says_why_each_process_keeps_a_copy(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from finetune.cache import store

    monkeypatch.setattr(store, "SHARED_MEMORY", tmp_path)
    mapped = store.machine_memory((4, 3), torch.float32, OneMachineShard())
    assert mapped is not None and mapped.shape == (4, 3)
    mapped[:] = 7.0  # writable, and backed by a file nobody can open any more
    assert list(tmp_path.iterdir()) == []  # unlinked once mapped: gone with the last process

    def full(path: Path, nbytes: int) -> None:
        raise store.disk_full(path, nbytes)

    monkeypatch.setattr(store, "reserve_disk", full)
    with pytest.warns(RuntimeWarning, match="each process keeps its own activation cache"):
        assert store.machine_memory((4, 3), torch.float32, OneMachineShard()) is None
    assert list(tmp_path.iterdir()) == []
