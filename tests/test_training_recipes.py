"""The training recipes: EMA of the weights, MixUp/CutMix, augmentation policies, balanced
sampling and class-weighted loss — each against a hand computation."""

from __future__ import annotations

import math
import random
from collections import Counter
from pathlib import Path

import attrs
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from finetune.callbacks import Callback, Checkpoint
from finetune.data.datasets import ImageFolderData, SeededShuffle, balanced_weights
from finetune.data.preprocessing import Preprocessing
from finetune.data.sharding import ShardedSeededShuffle
from finetune.data.transforms import AUGMENTATIONS, EvalTransform, TrainTransform, train_transform
from finetune.errors import DataError
from finetune.strategies import FullUnfreeze, LastLayerOnly
from finetune.train.checkpoint import deployed_weights, load_checkpoint
from finetune.train.config import TrainConfig
from finetune.train.range_test import ramp, smooth, suggest
from finetune.train.recipes import BatchMixing, WeightAverage, class_weights
from finetune.train.step import OptimizerStep
from finetune.train.trainer import MIXED_IMAGES, Trainer
from tests.conftest import (
    FAST,
    TINY,
    make_loader,
    make_tiny_backbone,
    make_tree,
    run_cli,
    write_image,
)
from tests.test_trainer import FP32, HeadThenAll, assert_same_weights, weights


class TrainedWeights(Callback):
    """The trainable weights and BN statistics after every optimizer step (the raw ones)."""

    def __init__(self) -> None:
        self.seen: list[dict[str, torch.Tensor]] = []

    def on_optimizer_step(self, trainer, step: int) -> None:
        model = trainer.backbone.model
        self.seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})


# -- EMA ---------------------------------------------------------------------------------------
def test_ema_equals_a_hand_computed_average_and_validation_uses_it() -> None:
    decay = 0.9
    backbone, seen = make_tiny_backbone(), TrainedWeights()
    config = attrs.evolve(FP32, epochs=1, lr=1e-2, ema_decay=decay)
    trainer = Trainer(backbone, FullUnfreeze(), config, callbacks=[seen])
    history = trainer.fit(make_loader(), make_loader(shuffle=False))

    assert len(seen.seen) == 4  # 32 images, batches of 8
    expected = {}
    for update, state in enumerate(seen.seen, start=1):
        d = 0.0 if update == 1 else min(decay, 1 - update ** (-2 / 3))
        for name, value in state.items():
            if value.is_floating_point():
                expected[name] = value if update == 1 else d * expected[name] + (1 - d) * value
    final = backbone.model.state_dict()
    for name, value in expected.items():  # the backbone holds the average after fit
        torch.testing.assert_close(final[name], value, rtol=0, atol=1e-6, msg=name)
    assert not torch.equal(final["fc.weight"], seen.seen[-1]["fc.weight"])
    # validation measured the average: evaluating the final weights gives the same loss
    report = trainer.evaluate(make_loader(shuffle=False))
    assert report.loss == pytest.approx(history["val_loss"][-1], abs=1e-6)


def test_ema_averages_only_what_trains() -> None:
    backbone = make_tiny_backbone()
    frozen = {k: v.clone() for k, v in backbone.model.state_dict().items()
              if not k.startswith("fc.")}
    average = WeightAverage(0.99)
    LastLayerOnly().apply(backbone)
    backbone.train()  # the strategy's policy: frozen BatchNorm stays in eval mode
    average.update(backbone.model)
    assert sorted(average.averages) == ["fc.bias", "fc.weight"]  # frozen BN stays in eval
    Trainer(backbone, LastLayerOnly(), attrs.evolve(FP32, epochs=1, ema_decay=0.99)).fit(
        make_loader())
    after = backbone.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())


def test_ema_resumes_bit_exactly_and_checkpoints_deploy_the_average(tmp_path: Path) -> None:
    """A run that unfreezes everything at the resume point: the average follows it."""
    config = attrs.evolve(FP32, epochs=4, lr=1e-3, ema_decay=0.95)
    straight = make_tiny_backbone()
    Trainer(straight, HeadThenAll(switch=2), config).fit(make_loader())

    checkpoint = Checkpoint(tmp_path, monitor="train_loss", mode="min")
    first_half = make_tiny_backbone()
    Trainer(first_half, HeadThenAll(switch=2), attrs.evolve(config, epochs=2),
            callbacks=[checkpoint]).fit(make_loader())
    saved = load_checkpoint(checkpoint.last_path)
    assert saved["ema"]["updates"] == 8
    # the checkpoint keeps the raw weights for a resume and the average for deployment
    assert not torch.equal(saved["model"]["fc.weight"], first_half.model.state_dict()["fc.weight"])
    assert_same_weights(deployed_weights(saved), weights(first_half))

    resumed = make_tiny_backbone(seed=7)
    Trainer(resumed, HeadThenAll(switch=2), config).fit(make_loader(),
                                                        resume=checkpoint.last_path)
    assert_same_weights(weights(straight), weights(resumed))


def test_ema_decay_is_checked() -> None:
    with pytest.raises(ValueError, match="ema_decay must be in"):
        TrainConfig(ema_decay=1.0)
    assert [round(WeightAverage(0.99).decay_at(t), 3) for t in (1, 2, 10, 1000)] == [
        0.0, 0.37, 0.785, 0.99]
    assert WeightAverage(0.99, warmup=False).decay_at(1) == 0.99


# -- MixUp / CutMix ---------------------------------------------------------------------------
def _batch(n: int = 8, classes: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % classes
    return torch.rand(n, 3, 16, 16, generator=generator), labels


def test_mixup_mixes_images_and_targets_with_one_weight() -> None:
    images, labels = _batch()
    torch.manual_seed(3)
    mixed, targets = BatchMixing(4, mixup=0.4)(images, labels)
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(8))
    # the weight of each image's own content, read off the pixels
    other = images.roll(1, 0)
    lam = float(((mixed - other) * (images - other)).sum() / ((images - other) ** 2).sum())
    torch.testing.assert_close(mixed, lam * images + (1 - lam) * other, rtol=0, atol=1e-5)
    onehot = nn.functional.one_hot(labels, 4).float()
    torch.testing.assert_close(targets, lam * onehot + (1 - lam) * onehot.roll(1, 0),
                               rtol=0, atol=1e-5)
    torch.manual_seed(3)
    again, _ = BatchMixing(4, mixup=0.4)(images, labels)
    assert torch.equal(mixed, again)  # seeded by torch's RNG


def test_cutmix_targets_weigh_each_image_by_its_pixels() -> None:
    images, labels = _batch()
    torch.manual_seed(1)
    mixed, targets = BatchMixing(4, cutmix=1.0)(images, labels)
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(8))
    own = (mixed == images).all(dim=1).float().mean(dim=(1, 2))  # share of own pixels
    onehot = nn.functional.one_hot(labels, 4).float()
    expected = own[:, None] * onehot + (1 - own[:, None]) * onehot.roll(1, 0)
    torch.testing.assert_close(targets, expected, rtol=0, atol=1e-6)


def test_the_step_takes_soft_targets_as_a_hand_computed_cross_entropy() -> None:
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    images, labels = torch.randn(4, 5), torch.tensor([0, 1, 2, 0])
    targets = torch.softmax(torch.randn(4, 3), dim=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    out = OptimizerStep(nn.CrossEntropyLoss())(optimizer, model, images, labels, targets=targets)
    with torch.no_grad():
        by_hand = -(targets * model(images).log_softmax(dim=1)).sum(dim=1).mean()
    assert out.loss == pytest.approx(float(by_hand), abs=1e-6)
    assert out.correct == int((model(images).argmax(dim=1) == labels).sum())


def test_mixing_turns_the_activation_cache_off_for_training_only() -> None:
    val = make_loader(shuffle=False)

    class Reason(Callback):
        def on_epoch_end(self, trainer, metrics) -> None:
            self.reason = trainer.state.uncached_reason
            self.val = trainer.activations.why_uncached(val)

    reason = Reason()
    config = attrs.evolve(FP32, epochs=1, mixup=0.2, feature_cache="on")
    Trainer(make_tiny_backbone(), LastLayerOnly(), config, callbacks=[reason]).fit(
        make_loader(), val)
    assert reason.reason == MIXED_IMAGES
    assert reason.val is None  # validation still runs on stored activations
    with pytest.raises(ValueError, match="mixup and cutmix are Beta alphas"):
        BatchMixing(3)


# -- augmentation policies ---------------------------------------------------------------------
def test_each_policy_makes_valid_seeded_tensors() -> None:
    from PIL import Image

    pixels = torch.randint(0, 256, (60, 80, 3), generator=torch.Generator().manual_seed(0))
    image = Image.fromarray(pixels.to(torch.uint8).numpy())
    preprocessing = Preprocessing(resize_size=40, crop_size=32)
    for policy in AUGMENTATIONS:
        transform = train_transform(preprocessing, policy, scale=0.5)
        assert isinstance(transform, EvalTransform if policy == "none" else TrainTransform)
        a, b = transform(image, random.Random(5)), transform(image, random.Random(5))
        assert a.shape == (3, 32, 32) and a.dtype == torch.float32 and a.isfinite().all()
        assert torch.equal(a, b), policy
        if policy != "none":
            others = [transform(image, random.Random(s)) for s in range(6, 10)]
            assert any(not torch.equal(a, o) for o in others), policy
    with pytest.raises(DataError, match="augmentation must be one of"):
        train_transform(preprocessing, "mixup")
    with pytest.raises(DataError, match="crop scale must satisfy"):
        train_transform(preprocessing, "flip", scale=(0.5, 0.2))


def test_policies_give_the_same_batches_for_a_seed_whatever_the_workers(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "tree", classes=2, n_train=4)
    batches = []
    for workers in (0, 1):
        data = ImageFolderData(root, data_augmentation="randaugment", crop_scale=0.3,
                               batch_size=4, num_workers=workers, val_split=0,
                               preprocessing=Preprocessing(resize_size=32, crop_size=24),
                               progress=False)
        batches.append(torch.cat([images for images, _ in data.train_loader()]))
    assert batches[0].shape[1:] == (3, 24, 24)
    assert torch.equal(batches[0], batches[1])


# -- imbalanced data ---------------------------------------------------------------------------
def test_the_balanced_sampler_draws_each_class_equally_often_and_shards() -> None:
    labels = [0] * 90 + [1] * 10
    sampler = SeededShuffle(100, seed=0, weights=balanced_weights(labels))
    drawn = Counter(labels[i] for _ in range(20) for i, _ in sampler)
    assert abs(drawn[1] / sum(drawn.values()) - 0.5) < 0.03
    sampler.set_epoch(3)
    epoch = [key for key in sampler]
    shards = []
    for rank in (0, 1):
        shard = ShardedSeededShuffle(100, 0, rank, 2, sampler.weights)
        shard.set_epoch(3)
        shards.append(list(shard))
    assert sorted(shards[0] + shards[1]) == sorted(epoch)  # the same draws, split in two
    with pytest.raises(DataError, match="weights must be 3 non-negative"):
        SeededShuffle(3, 0, weights=[1.0, -1.0, 1.0])


def test_balanced_sampling_from_an_image_folder(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    for name, count in (("common", 12), ("rare", 3)):
        for i in range(count):
            write_image(root / "train" / name / f"{i}.png", colour=(40 * i % 255, 90, 20))
        write_image(root / "test" / name / "t.png")
    data = ImageFolderData(root, balanced_sampling=True, batch_size=5, val_split=0,
                           preprocessing=Preprocessing(resize_size=24, crop_size=24),
                           progress=False)
    loader = data.train_loader()
    seen = Counter()
    for epoch in range(30):
        loader.sampler.set_epoch(epoch)
        seen.update(int(label) for _, labels in loader for label in labels)
    assert abs(seen[1] / sum(seen.values()) - 0.5) < 0.07


def test_class_weighted_loss_matches_a_hand_computation() -> None:
    labels = torch.tensor([0, 0, 0, 1])
    weights = class_weights(labels.tolist(), 2)
    torch.testing.assert_close(weights, torch.tensor([4 / 6, 4 / 2]))
    loader = DataLoader(TensorDataset(torch.randn(4, 3, 32, 32), labels), batch_size=4)
    trainer = Trainer(make_tiny_backbone(num_classes=2), LastLayerOnly(),
                      attrs.evolve(FP32, epochs=1, class_weights="balanced",
                                   feature_cache="off"))
    with pytest.raises(DataError, match="needs the training labels"):
        trainer.fit(loader)  # a TensorDataset does not list its labels
    loader.dataset.targets = labels.tolist()
    history = trainer.fit(loader)
    # the loss is of the weights before the single step (the new head the seed drew):
    # recompute
    backbone = make_tiny_backbone(num_classes=2)
    backbone.draw_fresh(FP32.seed)
    backbone.model.eval()
    with torch.no_grad():
        logits_before = backbone(loader.dataset.tensors[0])
    per_image = nn.functional.cross_entropy(logits_before, labels, reduction="none")
    by_hand = (weights[labels] * per_image).sum() / weights[labels].sum()
    assert history["train_loss"][0] == pytest.approx(float(by_hand), abs=1e-5)
    with pytest.raises(ValueError, match="class_weights applies to the default"):
        Trainer(make_tiny_backbone(), LastLayerOnly(),
                TrainConfig(class_weights="balanced"), loss=nn.MSELoss())


# -- the learning-rate range test --------------------------------------------------------------
def test_lr_find_suggestions_on_a_synthetic_loss_curve() -> None:
    lrs = ramp(1e-6, 1.0, 100)
    assert lrs[0] == pytest.approx(1e-6) and lrs[-1] == pytest.approx(1.0)
    # flat, then a cosine-shaped fall from step 30 to step 70 (steepest at 50), then a blow-up
    loss = [2.0 if i < 30 else 1.25 + 0.75 * math.cos(math.pi * (i - 30) / 40) if i <= 70
            else 0.5 + 0.2 * (i - 70) for i in range(100)]
    suggestion, minimum_tenth, steepest = suggest(lrs, loss)
    # the longest fall runs from step 29 (the last flat point) to 70: halfway is
    # 28 + int(42 / 3) + int(42 / 6) = 48, as fastai counts
    assert suggestion == lrs[48]
    assert minimum_tenth == pytest.approx(lrs[70] / 10)
    assert steepest == lrs[50]
    assert smooth([1.0] * 5) == pytest.approx([1.0] * 5)  # bias-corrected: no ramp-up


def test_lr_find_leaves_the_weights_and_rngs_as_they_were(tmp_path: Path) -> None:
    backbone = make_tiny_backbone()
    before = weights(backbone)
    trainer = Trainer(backbone, LastLayerOnly(), FP32)
    torch.manual_seed(11)
    state = torch.get_rng_state()
    finding = trainer.lr_find(make_loader(n=64), start=1e-5, end=10.0, steps=30)
    assert torch.equal(state, torch.get_rng_state())
    assert_same_weights(before, weights(backbone))
    assert 2 < len(finding.lrs) <= 30 and finding.ended in ("end", "diverged")
    assert list(finding.lrs) == ramp(1e-5, 10.0, 30)[:len(finding.lrs)]
    assert finding.lrs[0] <= finding.suggestion <= finding.lrs[-1]
    written = finding.write(tmp_path)
    assert [p.name for p in written] == ["lr_find.json", "lr_find.png"]
    # a fit after the test runs as one without it
    straight = make_tiny_backbone()
    Trainer(straight, LastLayerOnly(), FP32).fit(make_loader())
    trainer.fit(make_loader())
    assert_same_weights(weights(straight), weights(backbone))


def test_lr_find_command_writes_its_files_and_refuses_to_overwrite(tmp_path, capsys) -> None:
    root = make_tree(tmp_path / "tree", classes=2, n_train=6)
    out = tmp_path / "lrf"
    argv = ["lr-find", "--data", str(root), "--backbone", TINY, "--weights", "none",
            "--strategy", "last-layer", "--steps", "12", "--batch-size", "4",
            "--output", str(out), *FAST]
    code, printed, _ = run_cli(argv, capsys)
    assert code == 0 and "suggested lr" in printed
    assert (out / "lr_find.json").is_file()
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and "--overwrite" in err


def test_train_suggests_balancing_a_long_tailed_split() -> None:
    from types import SimpleNamespace

    from finetune.cli.main import imbalance_hint

    tailed = SimpleNamespace(train_samples=[("x", 0)] * 12 + [("y", 1)] * 4)
    assert "--balance loss" in imbalance_hint(tailed, "none")
    assert "12 vs 4" in imbalance_hint(tailed, "none")
    assert imbalance_hint(tailed, "sampler") is None  # already balancing
    even = SimpleNamespace(train_samples=[("x", 0)] * 12 + [("y", 1)] * 5)
    assert imbalance_hint(even, "none") is None
