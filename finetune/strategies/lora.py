"""LoRA: low-rank adapters on the backbone's conv and linear layers, through `peft`.

`peft` is an optional extra and is imported only when the strategy is applied.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import attrs
from torch import nn

from finetune.model.backbone import Backbone
from finetune.strategies.base import (
    FreezeState,
    FreezeStrategy,
    as_names,
    check_groups,
    register,
)

ADAPTER_MARKERS = (".lora_A.", ".lora_B.")


def _import_peft() -> Any:
    try:
        import peft
    except ImportError as error:
        raise ImportError(
            "the LoRA strategy needs the peft package: pip install 'finetune[lora]'"
        ) from error
    return peft


def is_adapter(parameter_name: str) -> bool:
    """Whether a parameter (named as in `backbone.model.named_parameters()`) is a LoRA adapter."""
    return any(marker in parameter_name for marker in ADAPTER_MARKERS)


@register("lora")
@attrs.frozen
class LoRA(FreezeStrategy):
    """The pretrained weights stay frozen; every `nn.Conv2d` / `nn.Linear` outside the head gets
    a trainable low-rank update ``W + (alpha / r) · B A`` (Hu et al., 2021), and the head trains
    fully.

    Few trainable parameters and small checkpoints of what changed, with more capacity than
    BitFit. `groups` limits the adapters to some backbone groups (default: all). Applying injects
    the adapters into `backbone.model` once (later applies only re-set what trains), so apply it
    before loading a checkpoint saved from a LoRA-trained backbone: `backbone.state_dict()` then
    holds base weights, adapters and head together and restores all three.
    """

    r: int = attrs.field(default=8, validator=attrs.validators.ge(1))
    alpha: float = attrs.field(default=16.0)
    dropout: float = attrs.field(
        default=0.0, validator=[attrs.validators.ge(0.0), attrs.validators.lt(1.0)]
    )
    groups: tuple[str, ...] = attrs.field(default=(), converter=as_names)

    @alpha.validator
    def _check_alpha(self, _: attrs.Attribute, value: float) -> None:
        if not value > 0:
            raise ValueError(f"alpha must be > 0 (got {value!r}); alpha / r scales the update")

    def target_modules(self, backbone: Backbone) -> list[str]:
        """Names of the conv / linear modules that get adapters (never the head)."""
        check_groups(self, backbone, self.groups)
        chosen = set(self.groups) or set(backbone.group_names)
        chosen.discard("head")
        targets, foreign = [], set()
        for name, module in backbone.model.named_modules():
            weight = getattr(module, "weight", None)
            if not (isinstance(module, (nn.Conv2d, nn.Linear)) and isinstance(weight, nn.Parameter)
                    and backbone.group_of(f"{name}.weight") in chosen):
                continue
            # peft builds each adapter as `type(layer)(in, r, kernel, stride, padding)`, which
            # only the plain torch classes accept (EfficientNet-Lite0's same-padding convs not).
            if type(module) in (nn.Conv2d, nn.Linear):
                targets.append(name)
            else:
                foreign.add(type(module).__name__)
        if not targets and foreign:
            raise ValueError(
                f"LoRA: {backbone.name}'s layers are {', '.join(sorted(foreign))}, which peft "
                "cannot wrap (it rebuilds adapters as plain nn.Conv2d / nn.Linear); use LoRA "
                "with a torchvision or timm backbone, e.g. Backbone.resnet50 or efficientnet_b0."
            )
        return targets

    def inject(self, backbone: Backbone) -> int:
        """Add adapters to `backbone.model` unless it already has them; returns how many
        modules were adapted now (0 on a repeated call)."""
        if any(is_adapter(name) for name, _ in backbone.model.named_parameters()):
            return 0
        peft = _import_peft()
        targets = self.target_modules(backbone)
        if not targets:
            raise ValueError(
                f"LoRA: {backbone.name} has no nn.Conv2d / nn.Linear layers outside the head in "
                f"groups {list(self.groups) or 'all'}; nothing to adapt."
            )
        config = peft.LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules="^(" + "|".join(re.escape(t) for t in targets) + ")$",
            bias="none",
        )
        peft.inject_adapter_in_model(config, backbone.model)
        backbone.refresh_groups()
        return len(targets)

    @staticmethod
    def _require_adapters(backbone: Backbone) -> None:
        if not any(is_adapter(name) for name, _ in backbone.model.named_parameters()):
            raise RuntimeError(
                "LoRA: the backbone has no adapters yet; call strategy.apply(backbone) "
                "before building optimizer groups."
            )

    def decide(self, backbone: Backbone, epoch: int = 0) -> FreezeState:
        """The adapters are part of the decision: they are injected first (once)."""
        self.inject(backbone)
        return super().decide(backbone, epoch)

    def param_groups(self, backbone: Backbone, lr: float, epoch: int = 0
                     ) -> list[dict[str, Any]]:
        """Groups for a plain loop's optimizer, after `apply` gave the model its adapters."""
        self._require_adapters(backbone)
        return super().param_groups(backbone, lr, epoch)

    def trainable(self, backbone: Backbone, epoch: int) -> Mapping[str, float]:
        self._require_adapters(backbone)
        head = {name for name, _ in backbone.named_parameters_in("head")}
        return {
            name: 1.0
            for name, _ in backbone.model.named_parameters()
            if name in head or is_adapter(name)
        }
