"""The four strategies of the reference work."""

from __future__ import annotations

from collections.abc import Mapping

import attrs

from finetune.model.backbone import Backbone
from finetune.strategies.base import FreezeStrategy, register, register_preset


def _all(backbone: Backbone) -> dict[str, float]:
    return {name: 1.0 for name, _ in backbone.model.named_parameters()}


@register("last-layer")
@attrs.frozen
class LastLayerOnly(FreezeStrategy):
    """Train only the new head: a linear probe on frozen features. Cheapest; strong when the
    target looks like ImageNet."""

    def trainable(self, backbone: Backbone, epoch: int) -> Mapping[str, float]:
        return {name: 1.0 for name, _ in backbone.named_parameters_in("head")}


@register("full-unfreeze")
@attrs.frozen
class FullUnfreeze(FreezeStrategy):
    """Everything trains. With random weights this is training from scratch."""

    def trainable(self, backbone: Backbone, epoch: int) -> Mapping[str, float]:
        return _all(backbone)


@register("freeze-head-only")
@attrs.frozen
class FreezeHeadOnly(FreezeStrategy):
    """Everything trains except the new, randomly initialised head — a known-bad baseline:
    the backbone must learn to fit a random projection."""

    def trainable(self, backbone: Backbone, epoch: int) -> Mapping[str, float]:
        head = {name for name, _ in backbone.named_parameters_in("head")}
        return {name: 1.0 for name, _ in backbone.model.named_parameters() if name not in head}


COUNT_MODES = ("tensors", "numel", "groups")


@register("freeze-fraction")
@attrs.frozen
class FreezeFraction(FreezeStrategy):
    """Freeze the first `fraction` of the network, in forward (registration) order.

    What "80% of layers" counts, with `count`:

    - ``"tensors"`` (default, as the reference code did): the first ``int(fraction * n)`` of
      ``list(model.parameters())``. ResNet50 has 161 tensors: 0.8 freezes 128 and leaves 33
      trainable (layer3's very last BatchNorm bias, all of layer4, the head) — 63.7% of the
      parameter values, because layer4 is where the weights are.
    - ``"numel"``: the longest prefix of tensors holding at most ``fraction`` of all parameter
      values. ResNet50 at 0.8: 14 of 161 tensors train (the end of layer4 and the head), 23.5%
      of the values.
    - ``"groups"``: the first ``int(fraction * n_groups)`` backbone groups, fastai's
      ``freeze_to``. ResNet50 has 6 groups (stem, layer1–4, head): 0.8 freezes 4, so
      layer4 and the head train: 32 tensors, 63.7% of the values.
    """

    fraction: float = attrs.field(default=0.8)
    count: str = attrs.field(default="tensors", validator=attrs.validators.in_(COUNT_MODES))

    @fraction.validator
    def _check_fraction(self, _: attrs.Attribute, value: float) -> None:
        if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ValueError(
                f"fraction must be between 0 and 1 (got {value!r}); 0.8 freezes the first 80%."
            )

    def trainable(self, backbone: Backbone, epoch: int) -> Mapping[str, float]:
        named = list(backbone.model.named_parameters())
        if self.count == "tensors":
            frozen = int(self.fraction * len(named))
        elif self.count == "numel":
            budget = self.fraction * sum(p.numel() for _, p in named)
            frozen, running = 0, 0
            while frozen < len(named) and running + named[frozen][1].numel() <= budget:
                running += named[frozen][1].numel()
                frozen += 1
        else:
            frozen_groups = set(backbone.group_names[: int(self.fraction * len(backbone.groups))])
            return {n: 1.0 for n, _ in named if backbone.group_of(n) not in frozen_groups}
        return {name: 1.0 for name, _ in named[frozen:]}


# The reference work's setting: freeze the first 80% of the parameter tensors.
register_preset("freeze-80", "freeze-fraction", fraction=0.8)
