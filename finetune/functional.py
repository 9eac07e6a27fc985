"""The reference work's functions, as thin wrappers over the object API.

Code written against the reference runs unchanged::

    train_loader, val_loader = data_load(batch_size=32, val_split=0.2)
    wandb.init(project="DL_Assignment_2", name="pre_trainedmodel_rs_net")
    model = pretrain_model(freeze_percent=0.8, num_classes=10)
    trained_model = model_train_val(model, train_loader, val_loader, epochs=5)
    accuracy, report = test_evaluation_model(trained_model, test_data_load())
    wandb.finish()

Each function does what the object API does (`Backbone`, `FreezeFraction` / `LastLayerOnly`,
`ImageFolderData`, `Trainer`); nothing here has a training loop of its own. See
docs/reference_api.md for the semantics and the choices made where the reference left them
open.
"""

from __future__ import annotations

import os
import sys
import warnings
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs
from torch.utils.data import DataLoader

from finetune.callbacks import Callback, WandbLogger
from finetune.callbacks.console import EpochLines, FreezeReportLines, progress_callback
from finetune.data import DATA_ENV, ImageFolderData, defaults, resolve_data_root
from finetune.model.backbone import Backbone
from finetune.model.zoo import build_backbone, default_backbone, default_preprocessing, seeded
from finetune.stats.metrics import EvaluationReport
from finetune.strategies import FreezeFraction, FreezeStrategy, LastLayerOnly
from finetune.train.config import TrainConfig
from finetune.train.trainer import Trainer

__all__ = [
    "DATA_ENV",
    "EpochLines",
    "FreezeReportLines",
    "KeepTrainable",
    "build_backbone",
    "data_load",
    "default_backbone",
    "default_preprocessing",
    "model_train_val",
    "pretrain_model",
    "resolve_data_root",
    "strategy_of",
    "test_data_load",
    "test_evaluation_model",
]

# The strategy pretrain_model applied to each model it returned, so model_train_val can keep
# applying it (scheduled strategies change with the epoch) without the caller passing it on.
_STRATEGIES: weakref.WeakKeyDictionary[Backbone, FreezeStrategy] = weakref.WeakKeyDictionary()


def _resolve_backbone(backbone: Backbone | str | None, num_classes: int) -> Backbone:
    if backbone is None:
        return default_backbone(num_classes)
    if isinstance(backbone, Backbone):
        if backbone.num_classes != num_classes:
            raise ValueError(
                f"the backbone given has a {backbone.num_classes}-class head but num_classes is "
                f"{num_classes}; build it with num_classes={num_classes}."
            )
        return backbone
    if isinstance(backbone, str):
        return build_backbone(backbone, num_classes)
    raise TypeError(f"backbone must be a Backbone, a name or None, not {type(backbone).__name__}")


@attrs.frozen
class KeepTrainable(FreezeStrategy):
    """Train exactly the parameters listed in `names` (those trainable when it was made): how a
    model that did not come from `pretrain_model` keeps the freezing its owner gave it."""

    names: tuple[str, ...] = attrs.field(converter=tuple)

    @classmethod
    def current(cls, backbone: Backbone) -> KeepTrainable:
        return cls(n for n, p in backbone.model.named_parameters() if p.requires_grad)

    def trainable(self, backbone: Backbone, epoch: int) -> Mapping[str, float]:
        return dict.fromkeys(self.names, 1.0)


def strategy_of(model: Backbone) -> FreezeStrategy:
    """The strategy `pretrain_model` applied to `model`; for any other Backbone, one that keeps
    its current `requires_grad` flags."""
    return _STRATEGIES.get(model) or KeepTrainable.current(model)


# -- the reference functions ----------------------------------------------------------------
def pretrain_model(
    freeze_percent: float = 0.8,
    freeze_all_except_last_layer: bool = False,
    num_classes: int = 10,
    *,
    backbone: Backbone | str | None = None,
    count: str = "tensors",
    seed: int | None = 0,
) -> Backbone:
    """A pretrained classifier with a fresh `num_classes` head and the reference's freezing.

    `freeze_all_except_last_layer=True` trains the head alone (`LastLayerOnly`); otherwise the
    first `freeze_percent` of `list(model.parameters())` is frozen (`FreezeFraction`, counting
    tensors as the reference did; `count="numel"` or `"groups"` count otherwise), so 0 trains
    everything. `backbone`: a Backbone, a name for `build_backbone`, or None for
    `default_backbone` (ResNet50 when its weights are cached, else EfficientNet-Lite0), built
    under `seed` so the fresh head is the same every time (None: from the global RNG).
    Prints what trains. Returns the Backbone (an nn.Module).
    """
    strategy: FreezeStrategy = (LastLayerOnly() if freeze_all_except_last_layer
                                else FreezeFraction(fraction=freeze_percent, count=count))
    with seeded(seed):
        model = _resolve_backbone(backbone, num_classes)
    print(f"finetune: {strategy.describe()}: {strategy.apply(model)}")
    _STRATEGIES[model] = strategy
    return model


def _data(
    root: str | os.PathLike | None, model: Backbone | None, batch_size: int, **kwargs: Any
) -> ImageFolderData:
    kwargs.setdefault("progress", False)
    data = ImageFolderData(
        resolve_data_root(root),
        batch_size=batch_size,
        preprocessing=model.preprocessing if model is not None else default_preprocessing(),
        **kwargs,
    )
    return data


def data_load(
    batch_size: int = 32,
    val_split: float = defaults.VAL_SPLIT,
    data_augmentation: bool | str = defaults.AUGMENT,
    *,
    root: str | os.PathLike | None = None,
    model: Backbone | None = None,
    image_size: int | None = None,
    seed: int = 0,
    num_workers: int | None = None,
    train_per_class: int | None = None,
) -> tuple[DataLoader, DataLoader]:
    """Train and validation loaders; `val_split` of each class's training images is held out
    (stratified, seeded by `seed`).

    Data from `root` or `$FINETUNE_DATA`. Images are preprocessed for `model` when given,
    else for the default backbone (`default_preprocessing`) — so loaders made before
    `pretrain_model(backbone=...)` picks another architecture normalise for the wrong one:
    pass `model=` then. `data_augmentation` is off by default (True: random resized crops and
    flips; or a policy name, `finetune.data.transforms.AUGMENTATIONS`): short runs compare
    strategies on the images the weights were trained to see.
    """
    data = _data(root, model, batch_size, val_split=val_split, seed=seed,
                 data_augmentation=data_augmentation, image_size=image_size,
                 num_workers=num_workers, train_per_class=train_per_class)
    return data.train_loader(), data.val_loader()


def test_data_load(
    batch_size: int = 32,
    *,
    root: str | os.PathLike | None = None,
    model: Backbone | None = None,
    image_size: int | None = None,
    num_workers: int | None = None,
) -> DataLoader:
    """The test loader: the dataset's test/ folder (val/ for iNaturalist 12K), never split."""
    data = _data(root, model, batch_size, val_split=0.0, image_size=image_size,
                 num_workers=num_workers)
    return data.test_loader()


test_data_load.__test__ = False  # type: ignore[attr-defined]  # not a pytest test


def active_wandb_run() -> Any:
    """`wandb.run` if the caller started one. wandb is not imported here when the caller never
    imported it: then there can be no run, and the import costs seconds."""
    wandb = sys.modules.get("wandb")
    return getattr(wandb, "run", None) if wandb is not None else None


def _check_preprocessing(model: Backbone, loader: Iterable[Any]) -> None:
    """Warn when loaders normalise for another backbone than the one being trained."""
    wanted = model.preprocessing
    got = getattr(getattr(loader.dataset, "transform", None), "preprocessing", None)
    if got is not None and (got.mean, got.std) != (wanted.mean, wanted.std):
        warnings.warn(
            f"the loader normalises with mean {got.mean} / std {got.std} but {model.name} "
            f"expects {wanted.mean} / {wanted.std}; make the loaders with data_load(model=model).",
            stacklevel=3,
        )


def _require_backbone(model: Any) -> Backbone:
    if not isinstance(model, Backbone):
        raise TypeError(
            f"model must be a finetune Backbone (from pretrain_model or Backbone.*), not "
            f"{type(model).__name__}; wrap your own with Backbone.from_module(...)."
        )
    return model


def model_train_val(
    model: Backbone,
    train_loader: Iterable[Any],
    val_loader: Iterable[Any] | None = None,
    epochs: int = 5,
    lr: float = 1e-4,
    *,
    seed: int | None = 0,
    precision: str = "auto",
    device: str = "auto",
    callbacks: Sequence[Callback] = (),
) -> Backbone:
    """Train `model` (Adam at `lr`, cross-entropy) under the strategy `pretrain_model` gave it,
    validating after each epoch; returns the same model, trained.

    When a wandb run is active (`wandb.init` was called) each epoch's train/val loss and
    accuracy, the learning rates and at the end a per-class table and confusion matrix are
    logged to it; the run stays open for the caller's `wandb.finish()`.
    """
    model = _require_backbone(model)
    _check_preprocessing(model, train_loader)
    config = TrainConfig(epochs=epochs, lr=lr, seed=seed, precision=precision, device=device)
    observers = [FreezeReportLines(at_start=False), progress_callback(), *callbacks]
    run = active_wandb_run()
    if run is not None:
        observers.append(WandbLogger(run=run))
    Trainer(model, strategy_of(model), config, observers).fit(train_loader, val_loader)
    return model


def test_evaluation_model(
    model: Backbone,
    test_loader: Iterable[Any],
    *,
    precision: str = "auto",
    device: str = "auto",
    verbose: bool = True,
) -> tuple[float, EvaluationReport]:
    """Test accuracy and the class-wise report (`report.table()`, `report.to_dict()
    ["per_class"]`: accuracy, precision, recall, F1 and support per class, and the confusion
    matrix). Prints the table when `verbose`; adds test accuracy and macro F1 to the active
    wandb run's summary, if there is one. What trains is left as it was.
    """
    model = _require_backbone(model)
    config = TrainConfig(epochs=1, precision=precision, device=device)
    report = Trainer(model, None, config).evaluate(test_loader)  # the model as it is
    if verbose:
        print(f"test set:\n{report.table()}")
    run = active_wandb_run()
    if run is not None:
        try:
            run.summary.update({"test/accuracy": report.accuracy,
                                "test/macro_f1": report.macro_f1})
        except Exception as error:
            warnings.warn(f"wandb summary update failed ({error})", RuntimeWarning, stacklevel=2)
    return report.accuracy, report


test_evaluation_model.__test__ = False  # type: ignore[attr-defined]  # not a pytest test
