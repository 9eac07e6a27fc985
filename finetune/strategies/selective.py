"""Static strategies that pick parameters more finely than a prefix: layer-wise lr decay,
bias-only tuning and surgical fine-tuning of chosen groups."""

from __future__ import annotations

from collections.abc import Mapping

import attrs
from torch import nn

from finetune.model.backbone import Backbone
from finetune.strategies.base import FreezeStrategy, as_names, check_groups, register

NORM_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


@register("discriminative-lr")
@attrs.frozen
class DiscriminativeLR(FreezeStrategy):
    """Every group trains, its lr decaying geometrically from head to stem: the head gets
    lr, the group below it `decay` × lr, the next `decay`² × lr, and so on (layer-wise lr decay;
    timm's `layer_decay`, fastai's ``slice(lo, hi)`` with ``decay = (lo / hi) ** (1 / (n - 1))``).

    Early layers hold generic features worth keeping; later ones need to move more. Groups
    named in `frozen` (e.g. ``("stem",)``) do not train; the others keep the multiplier of their
    position, so freezing a group never shifts the lr of the rest.
    """

    decay: float = attrs.field(default=0.5)
    frozen: tuple[str, ...] = attrs.field(default=(), converter=as_names)

    @decay.validator
    def _check_decay(self, _: attrs.Attribute, value: float) -> None:
        if not 0.0 < value <= 1.0:
            raise ValueError(
                f"decay must be in (0, 1] (got {value!r}); 1.0 is plain full fine-tuning, "
                "0.5 halves the lr at each group towards the stem."
            )

    def multipliers(self, backbone: Backbone) -> dict[str, float]:
        """lr multiplier per group, head = 1.0 (frozen groups included, for reporting)."""
        names = backbone.group_names
        return {g: self.decay ** (len(names) - 1 - i) for i, g in enumerate(names)}

    def trainable(self, backbone: Backbone, epoch: int) -> Mapping[str, float]:
        check_groups(self, backbone, self.frozen)
        per_group = self.multipliers(backbone)
        return {
            name: per_group[backbone.group_of(name)]
            for name, _ in backbone.model.named_parameters()
            if backbone.group_of(name) not in self.frozen
        }


@register("bitfit")
@attrs.frozen
class BitFit(FreezeStrategy):
    """Only biases, normalisation-layer affine parameters (BatchNorm, LayerNorm, GroupNorm) and
    the head train (BitFit, Ben Zaken et al. 2022; "BN-only" tuning for CNNs).

    A fraction of a percent of the parameters, yet enough to re-centre and re-scale every
    feature — a cheap, memory-light adaptation when the data is small. Trainable BatchNorm
    layers also update their running statistics.
    """

    def trainable(self, backbone: Backbone, epoch: int) -> Mapping[str, float]:
        norms = {
            name for name, module in backbone.model.named_modules()
            if isinstance(module, NORM_LAYERS)
        }
        head = {name for name, _ in backbone.named_parameters_in("head")}
        plan = {}
        for name, _ in backbone.model.named_parameters():
            module, _, leaf = name.rpartition(".")
            if name in head or leaf == "bias" or module in norms:
                plan[name] = 1.0
        return plan


@register("freeze-all-but")
@attrs.frozen
class FreezeAllBut(FreezeStrategy):
    """Surgical fine-tuning (Lee et al., 2023): only the named `groups` train, plus the head
    unless `train_head=False`.

    Which block to tune depends on the shift: input-level shifts (colour, blur, sensor) are
    best served by the first blocks, output-level shifts (new labels) by the last.
    """

    groups: tuple[str, ...] = attrs.field(converter=as_names)
    train_head: bool = True

    @groups.validator
    def _check_nonempty(self, _: attrs.Attribute, value: tuple[str, ...]) -> None:
        if not value:
            raise ValueError("groups must name at least one group, e.g. groups=('layer1',)")

    def trainable(self, backbone: Backbone, epoch: int) -> Mapping[str, float]:
        check_groups(self, backbone, self.groups)
        chosen = set(self.groups) | ({"head"} if self.train_head else set())
        return {name: 1.0 for name, _ in backbone.named_parameters_in(*chosen)}
