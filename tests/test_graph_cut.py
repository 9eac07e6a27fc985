"""Graph cuts of arbitrary models and the inference-mode policy for frozen parts."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from finetune import (
    Backbone,
    FreezeFraction,
    FreezeStrategy,
    FullUnfreeze,
    LastLayerOnly,
    TrainConfig,
    Trainer,
)
from finetune.cache.cut import UncacheableError, split_graph


class Branchy(nn.Module):
    """A forward that is not a chain of children: two branches summed, a skip over them,
    the batch size read from the input, dropout inside a block and before the head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Dropout(0.3))
        self.left = nn.Conv2d(8, 8, 3, padding=1)
        self.right = nn.Conv2d(8, 8, 1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.size(0)
        y = self.stem(x)
        y = y + self.left(y) + self.right(y)
        return self.fc(self.drop(self.pool(y).view(batch, -1)))


class DataDependent(nn.Module):
    """Control flow on a tensor's value in the model's own forward: fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x).mean((2, 3))
        return self.fc(y if y.sum() > 0 else -y)


def branchy_backbone(seed: int = 0) -> Backbone:
    torch.manual_seed(seed)
    return Backbone.from_module(Branchy(), head="fc", groups=(("stem", r"^stem\."),
                                ("branches", r"^(left|right)\.")), num_classes=3, name="branchy")


def lite0() -> Backbone:
    pytest.importorskip("efficientnet_lite_pytorch", reason="optional [lite] extra")
    torch.manual_seed(0)
    return Backbone.efficientnet_lite0(3, pretrained=False)


def _fit(backbone: Backbone, strategy: FreezeStrategy, size: int, feature_cache: str = "auto",
         epochs: int = 1) -> Trainer:
    """Train on 8 fixed random images (a deterministic loader), batch 4, fp32, NCHW."""
    images = torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(1))
    loader = DataLoader(TensorDataset(images, torch.arange(8) % 3), batch_size=4,
                        shuffle=True, generator=torch.Generator())
    trainer = Trainer(backbone, strategy, TrainConfig(
        epochs=epochs, lr=1e-2, seed=0, precision="fp32", channels_last=False,
        feature_cache=feature_cache))
    trainer.fit(loader, loader)
    return trainer


def _split(backbone: Backbone):
    return split_graph(backbone.model, lambda: backbone.train())


def _same_in_training(backbone: Backbone, cut, images: torch.Tensor) -> None:
    """In training mode, prefix then suffix gives the model's output and draws the same
    random numbers (the head's dropout): the frozen prefix draws none."""
    backbone.train()
    with torch.no_grad():
        torch.manual_seed(3)
        whole = backbone(images)
        torch.manual_seed(3)
        halves = cut.suffix(cut.prefix(images))
    assert torch.allclose(whole, halves, atol=1e-6)


@pytest.mark.parametrize(("name", "label"), [
    ("mobilenet_v3_large", "classifier.1"),  # the frozen Linear + Hardswish before dropout
    ("efficientnet_b0", "avgpool"),
    ("convnext_tiny", "classifier.1"),  # LayerNorm2d and Flatten before the head
])
def test_torchvision_models_are_cut_before_what_trains(name: str, label: str) -> None:
    backbone = Backbone.from_torchvision(name, 3, weights=None)
    LastLayerOnly().apply(backbone)
    cut = _split(backbone)
    assert cut.label == label
    _same_in_training(backbone, cut, torch.randn(2, 3, 32, 32))
    trainer = _fit(backbone, LastLayerOnly(), size=32)
    assert (trainer.state.cached_prefix, trainer.state.uncached_reason) == (label, None)


def test_lite0_is_cut_at_its_pooling_and_its_drop_connect_stays_off() -> None:
    backbone = lite0()
    LastLayerOnly().apply(backbone)
    cut = _split(backbone)
    assert cut.label == "_avg_pooling"
    _same_in_training(backbone, cut, torch.randn(2, 3, 64, 64))


@pytest.mark.parametrize("make", [lite0, branchy_backbone], ids=["lite0", "branchy"])
def test_cached_training_matches_uncached_training_in_fp32(make) -> None:
    size = 8 if make is branchy_backbone else 32
    plain = _fit(make(), LastLayerOnly(), size, feature_cache="off", epochs=2)
    cached = _fit(make(), LastLayerOnly(), size, feature_cache="on", epochs=2)
    assert plain.state.cached_prefix is None and cached.state.cached_prefix is not None
    for (name, a), b in zip(plain.backbone.state_dict().items(),
                            cached.backbone.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-5), name
    assert plain.history["train_loss"] == pytest.approx(cached.history["train_loss"], abs=1e-5)
    assert plain.history["val_loss"] == pytest.approx(cached.history["val_loss"], abs=1e-5)


def test_a_non_chain_forward_is_cut_where_one_activation_crosses() -> None:
    backbone = branchy_backbone()
    LastLayerOnly().apply(backbone)
    cut = _split(backbone)
    assert cut.label == "pool"  # the view reading x.size(0) moves to the suffix
    _same_in_training(backbone, cut, torch.randn(3, 3, 8, 8))
    backbone.eval()
    images = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(cut.suffix(cut.prefix(images)), backbone(images))


def test_the_suffix_trains_the_models_own_parameters() -> None:
    backbone = branchy_backbone()
    FreezeFraction(0.5, count="groups").apply(backbone)  # stem frozen, branches and head train
    cut = _split(backbone)
    assert cut.label == "stem.3"
    cut.suffix(cut.prefix(torch.randn(2, 3, 8, 8))).sum().backward()
    assert backbone.model.left.weight.grad is not None and backbone.head.weight.grad is not None
    assert backbone.model.stem[0].weight.grad is None


def test_unsplittable_models_say_why() -> None:
    backbone = Backbone.from_module(DataDependent(), head="fc", groups=(("conv", "^conv"),),
                                    num_classes=3)
    LastLayerOnly().apply(backbone)
    with pytest.raises(UncacheableError, match=r"cannot trace DataDependent\.forward"):
        _split(backbone)
    trainer = _fit(backbone, LastLayerOnly(), size=8)  # trains, uncached, and says why
    assert len(trainer.history) == 1 and trainer.state.cached_prefix is None
    assert "cannot trace DataDependent.forward" in trainer.state.uncached_reason
    chain = branchy_backbone()
    FullUnfreeze().apply(chain)
    with pytest.raises(UncacheableError, match=r"stem\.0: it has trainable parameters"):
        _split(chain)
    LastLayerOnly(frozen_eval=False).apply(chain)  # the stem's dropout stays random
    assert _split(chain).label == "stem.2"


# -- the inference-mode policy ----------------------------------------------------------------
def test_frozen_modules_run_in_inference_mode_and_the_head_dropout_does_not() -> None:
    backbone = branchy_backbone()
    LastLayerOnly().apply(backbone)
    backbone.train()
    model = backbone.model
    assert not model.stem.training and not model.stem[3].training and not model.left.training
    assert model.drop.training and model.fc.training and model.training
    backbone.eval().train()  # re-applied after every .train()
    assert not model.stem[3].training
    LastLayerOnly(frozen_eval=False).apply(backbone)
    assert model.stem[3].training and not model.stem[1].training  # frozen BN stays in eval
    LastLayerOnly(train_bn=True).apply(backbone)
    assert model.stem[1].training and not model.stem[3].training


def test_frozen_stochastic_layers_draw_no_random_numbers() -> None:
    backbone = lite0()
    LastLayerOnly().apply(backbone)
    backbone.train()
    images = torch.randn(2, 3, 32, 32)
    before = torch.get_rng_state()
    with torch.no_grad():
        backbone.model.extract_features(images)  # drop-connect in every block
    assert torch.equal(torch.get_rng_state(), before)
    LastLayerOnly(frozen_eval=False).apply(backbone)
    with torch.no_grad():
        backbone.model.extract_features(images)
    assert not torch.equal(torch.get_rng_state(), before)


def test_several_cut_points_from_one_pass_equal_each_single_cut() -> None:
    from finetune.cache.cut import find_cuts, multi_prefix

    torch.manual_seed(0)
    backbone = Backbone.from_torchvision("resnet18", 3, weights=None)
    LastLayerOnly().apply(backbone)
    traces = find_cuts(backbone.model, lambda: backbone.train())
    labels = [point.label for point in traces.points]
    ends = ["maxpool", "layer1.1.relu", "layer2.1.relu", "layer3.1.relu", "layer4.1.relu",
            "avgpool"]  # every group boundary is a cut point
    assert all(end in labels for end in ends) and labels[-1] == "avgpool"
    assert [labels.index(end) for end in ends] == sorted(labels.index(end) for end in ends)
    images = torch.randn(4, 3, 64, 64)
    backbone.eval()
    with torch.no_grad():
        together = multi_prefix(backbone.model, traces, ends)(images)
        assert len(together) == len(ends)
        for label, activation in zip(ends, together, strict=True):
            alone = split_graph(backbone.model, lambda: None, at=label, traces=traces)
            assert torch.equal(activation, alone.prefix(images)), label
    with pytest.raises(UncacheableError, match="no cut point named 'fc'"):
        traces.point("fc")
