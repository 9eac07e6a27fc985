"""Strategies whose answer changes with the epoch: gradual unfreezing and LP-FT.

Both are pure functions of the epoch — no state is kept between calls — so a run resumed at
epoch `e` applies the strategy for `e` and gets exactly what an uninterrupted run had, with
the same optimizer parameter groups (no `add_param_group` bookkeeping to replay).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import attrs

from finetune.model.backbone import Backbone
from finetune.strategies.base import FreezeStrategy, register


def _positive(_: object, attribute: attrs.Attribute, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{attribute.name} must be > 0 (got {value!r})")


def _epochs(value: Sequence[int] | None) -> tuple[int, ...]:
    return tuple(int(v) for v in value) if value is not None else ()


@register("gradual-unfreeze")
@attrs.frozen
class GradualUnfreeze(FreezeStrategy):
    """Start with the head alone; unfreeze one more group, top down, at each step of a schedule
    (ULMFiT's gradual unfreezing, Lightning's `BackboneFinetuning`).

    The schedule is `at` (the epochs at which the next group unfreezes, e.g. ``(2, 4, 7)``) or,
    when `at` is empty, every `every` epochs. `depth` caps how many backbone groups ever unfreeze
    (``None``: all) — with `every` it also tells `changes_at` when the schedule is over, so the
    optimizer is not rebuilt needlessly afterwards. A newly unfrozen group trains at
    `lr_multiplier` × lr, ramped linearly over `warmup_epochs` epochs
    (``(i + 1) / (warmup_epochs + 1)`` of it in its i-th epoch) so pretrained features are not
    hit by a full-size step computed against a still-random head.
    """

    every: int = attrs.field(default=1, validator=attrs.validators.ge(1))
    at: tuple[int, ...] = attrs.field(default=(), converter=_epochs)
    depth: int | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.ge(0))
    )
    lr_multiplier: float = attrs.field(default=1.0, validator=_positive)
    warmup_epochs: int = attrs.field(default=0, validator=attrs.validators.ge(0))

    @at.validator
    def _check_at(self, _: attrs.Attribute, value: tuple[int, ...]) -> None:
        if any(e < 1 for e in value) or list(value) != sorted(set(value)):
            raise ValueError(
                f"at must be strictly increasing epochs ≥ 1 (got {value!r}); epoch 0 always "
                "trains the head alone, e.g. at=(2, 4, 7)."
            )

    def unfreeze_epochs(self, limit: int) -> list[int]:
        """Epochs at which backbone groups 1, 2, … (counted from the head down) unfreeze, for
        at most `limit` groups."""
        limit = limit if self.depth is None else min(limit, self.depth)
        if self.at:
            return list(self.at[:limit])
        return [self.every * (k + 1) for k in range(limit)]

    def trainable(self, backbone: Backbone, epoch: int) -> Mapping[str, float]:
        body = backbone.group_names[:-1]
        plan = {name: 1.0 for name, _ in backbone.named_parameters_in("head")}
        for group, start in zip(reversed(body), self.unfreeze_epochs(len(body)), strict=False):
            if start > epoch:
                break
            multiplier = self._multiplier(epoch - start)
            plan.update({name: multiplier for name, _ in backbone.named_parameters_in(group)})
        return plan

    def changes_at(self, epoch: int) -> bool:
        if self.at:
            starts = self.unfreeze_epochs(len(self.at))
        elif self.depth is not None:
            starts = self.unfreeze_epochs(self.depth)
        else:  # open-ended: every multiple of `every` may unfreeze another group
            since = epoch % self.every
            return epoch >= self.every and since <= self.warmup_epochs
        return any(0 <= epoch - start <= self.warmup_epochs for start in starts)

    def _multiplier(self, epochs_since_unfreeze: int) -> float:
        ramp = min(1.0, (epochs_since_unfreeze + 1) / (self.warmup_epochs + 1))
        return self.lr_multiplier * ramp


@register("lp-ft")
@attrs.frozen
class LinearProbeThenFinetune(FreezeStrategy):
    """LP-FT (Kumar et al., 2022): a linear probe for `probe_epochs` epochs — everything but the
    head frozen — then everything trains at `finetune_lr_multiplier` × lr.

    Fine-tuning from a random head distorts pretrained features; probing first gives the head
    sensible weights so the later full fine-tune moves the backbone less, which helps most out of
    distribution. The probe phase is exactly "head only", so an activation cache of the frozen
    backbone can serve it.
    """

    probe_epochs: int = attrs.field(default=1, validator=attrs.validators.ge(1))
    finetune_lr_multiplier: float = attrs.field(default=0.1, validator=_positive)

    def trainable(self, backbone: Backbone, epoch: int) -> Mapping[str, float]:
        if epoch < self.probe_epochs:
            return {name: 1.0 for name, _ in backbone.named_parameters_in("head")}
        return {name: self.finetune_lr_multiplier for name, _ in backbone.model.named_parameters()}

    def changes_at(self, epoch: int) -> bool:
        return epoch == self.probe_epochs
