"""The `FreezeStrategy` base class, its report and the registry of strategies by name.

A subclass answers one question in `trainable(backbone, epoch)`; the base class does the
rest — `requires_grad`, the BatchNorm policy, optimizer parameter groups and a report — so a
user strategy is about ten lines::

    @attrs.frozen
    class Layer4AndHead(FreezeStrategy):
        def trainable(self, backbone, epoch):
            return {name: 1.0 for name, _ in backbone.named_parameters_in("layer4", "head")}
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, TypeVar

import attrs
from torch import nn

from finetune.errors import CheckpointError
from finetune.model.backbone import Backbone
from finetune.settings import default_of

STRATEGIES: dict[str, type[FreezeStrategy]] = {}
# Named settings of a registered strategy: name -> (registered name, its options).
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {}

S = TypeVar("S", bound="type[FreezeStrategy]")


def register(name: str) -> Callable[[S], S]:
    """Add a strategy class to `STRATEGIES` under a short CLI-friendly name."""

    def decorate(cls: S) -> S:
        if name in STRATEGIES and STRATEGIES[name] is not cls:
            raise ValueError(f"a strategy is already registered as '{name}'")
        STRATEGIES[name] = cls
        cls.registry_name = name
        return cls

    return decorate


def register_preset(name: str, strategy: str, **options: Any) -> None:
    """Name a setting of a registered strategy (`freeze-80` is `freeze-fraction` with
    fraction=0.8); options given when it is built override the preset's."""
    if name in STRATEGIES or (name in PRESETS and PRESETS[name] != (strategy, options)):
        raise ValueError(f"a strategy or preset is already registered as '{name}'")
    if strategy not in STRATEGIES:
        raise ValueError(f"preset '{name}' names unregistered strategy '{strategy}'")
    PRESETS[name] = (strategy, dict(options))


def _known_names() -> str:
    return ", ".join(sorted([*STRATEGIES, *PRESETS]))


def _resolve(name: str) -> tuple[type[FreezeStrategy], dict[str, Any]]:
    """The class and default options behind a registered name or preset."""
    if name in PRESETS:
        base, options = PRESETS[name]
        return STRATEGIES[base], dict(options)
    if name in STRATEGIES:
        return STRATEGIES[name], {}
    raise KeyError(name)


def build_strategy(name: str, **options: Any) -> FreezeStrategy:
    """Instantiate a registered strategy (or preset) by its short name."""
    try:
        cls, defaults = _resolve(name)
    except KeyError:
        raise KeyError(f"unknown strategy '{name}'; registered: {_known_names()}") from None
    return cls(**{**defaults, **options})


def parse_strategy(spec: str) -> FreezeStrategy:
    """A strategy from its command-line spelling: `NAME[:key=value]...`.

    Options are separated by ":" (or ","); `+` joins the items of a tuple
    (`freeze-all-but:groups=layer3+layer4`); values are read as int, float,
    true/false/none, else text. Errors name the valid strategies or options.
    """
    name, *items = re.split(r"[:,]", spec.strip())
    try:
        cls, options = _resolve(name)
    except KeyError:
        raise ValueError(f"unknown strategy '{name}'; registered: {_known_names()}") from None
    fields = {f.name: f for f in attrs.fields(cls)}
    for item in filter(None, items):
        key, equals, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not equals or key not in fields:
            raise ValueError(f"bad option '{item}' in '{spec}'; write key=value with a key "
                             f"from {', '.join(fields)}")
        value = _option_value(raw.strip())
        if isinstance(fields[key].default, tuple) and not isinstance(value, tuple):
            value = (value,)
        options[key] = value
    try:
        return cls(**options)
    except (TypeError, ValueError) as error:
        raise ValueError(f"cannot build strategy '{spec}': {error}") from error


def exempt_from_decay(name: str, parameter: nn.Parameter) -> bool:
    """timm's rule: biases and 1-D tensors (norm layers' scale and shift) are not decayed."""
    return parameter.ndim <= 1 or name.endswith(".bias")


def _option_text(value: Any) -> str:
    """`_option_value`'s inverse: tuples joined by "+", booleans and None in lower case."""
    if isinstance(value, tuple):
        return "+".join(_option_text(item) for item in value)
    if value is None or isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _option_value(text: str) -> Any:
    if "+" in text:
        return tuple(_option_value(part) for part in text.split("+") if part)
    named = {"true": True, "false": False, "none": None}
    if text.lower() in named:
        return named[text.lower()]
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


@attrs.frozen
class FreezeReport:
    """What a strategy left trainable, in tensors and in parameters."""

    trainable_tensors: int
    total_tensors: int
    trainable_params: int
    total_params: int
    trainable_groups: tuple[str, ...]
    frozen_norm_layers: int

    @property
    def trainable_fraction(self) -> float:
        return self.trainable_params / self.total_params if self.total_params else 0.0

    def __str__(self) -> str:
        return (
            f"{self.trainable_params:,} of {self.total_params:,} parameters train "
            f"({100 * self.trainable_fraction:.2f}%; {self.trainable_tensors}/"
            f"{self.total_tensors} tensors); groups training: "
            f"{', '.join(self.trainable_groups) or 'none'}; "
            f"{self.frozen_norm_layers} BatchNorm layers frozen in eval mode"
        )


@attrs.frozen(eq=False)
class FreezeState:
    """A strategy's decision for one epoch, and the one record of what is frozen: which
    parameters train at what lr multiplier (`trainable`), and which modules stay in inference
    mode through `train()` — BatchNorm layers whose statistics must not move, and frozen parts
    whose dropout and stochastic depth stay off. The Trainer holds it (`trainer.freeze`);
    `apply` sets `requires_grad` and hands it to the backbone, whose `train()` honours it in
    any loop; the optimizer's groups come from it."""

    trainable: Mapping[str, float]
    frozen_norm_layers: frozenset[str] = frozenset()
    inference_modules: frozenset[str] = frozenset()

    @property
    def eval_modules(self) -> frozenset[str]:
        """What stays in inference mode when the backbone trains."""
        return self.frozen_norm_layers | self.inference_modules

    def apply(self, backbone: Backbone) -> FreezeReport:
        """Set `requires_grad` and the mode policy on `backbone`; return what trains."""
        for name, parameter in backbone.model.named_parameters():
            parameter.requires_grad_(name in self.trainable)
        backbone.freeze_state = self
        backbone.train(backbone.training)
        return self.report(backbone)

    def param_groups(self, backbone: Backbone, lr: float, weight_decay: float = 0.0,
                     decay_norm_and_bias: bool = False) -> list[dict[str, Any]]:
        """Optimizer parameter groups: one per (backbone group, lr multiplier), holding only
        the parameters that train, so no optimizer state ever touches frozen ones. With
        `weight_decay`, each is split in two as timm's `param_groups_weight_decay` does:
        biases and one-dimensional tensors (norm scales and shifts) are not decayed unless
        `decay_norm_and_bias` (their halves are named `<group>.no_decay`)."""
        buckets: dict[tuple[str, float, bool], list[nn.Parameter]] = {}
        for name, parameter in backbone.model.named_parameters():
            if name in self.trainable:
                decays = bool(weight_decay) and (decay_norm_and_bias or not exempt_from_decay(
                    name, parameter))
                key = (backbone.group_of(name), float(self.trainable[name]), decays)
                buckets.setdefault(key, []).append(parameter)
        groups = []
        for (group, multiplier, decays), params in buckets.items():
            entry = {"params": params, "lr": lr * multiplier, "lr_multiplier": multiplier,
                     "name": group if decays or not weight_decay else f"{group}.no_decay"}
            if weight_decay:
                entry["weight_decay"] = weight_decay if decays else 0.0
            groups.append(entry)
        return groups

    def report(self, backbone: Backbone) -> FreezeReport:
        parameters = list(backbone.model.named_parameters())
        trainable = [(n, p) for n, p in parameters if n in self.trainable]
        groups = [g.name for g in backbone.groups
                  if any(n in self.trainable for n, _ in g.parameters)]
        return FreezeReport(
            trainable_tensors=len(trainable),
            total_tensors=len(parameters),
            trainable_params=sum(p.numel() for _, p in trainable),
            total_params=sum(p.numel() for _, p in parameters),
            trainable_groups=tuple(groups),
            frozen_norm_layers=len(self.frozen_norm_layers),
        )


@attrs.frozen
class FreezeStrategy:
    """Base class. Subclasses implement `trainable`; everything else is shared.

    `train_bn=True` lets BatchNorm layers whose parameters are frozen keep updating their
    running statistics (fastai's and Lightning's `train_bn`); by default they stay in eval mode.
    `frozen_eval=True` (the default) runs every module whose parameters are all frozen in
    inference mode during training, as Keras runs a frozen base with `training=False`: its
    dropout, stochastic depth and drop-connect are off, so a frozen feature extractor computes
    a fixed function of the image (and its activations can be cached). `frozen_eval=False`
    keeps them random in training, as a plain `requires_grad=False` loop does.
    """

    registry_name: ClassVar[str] = ""
    train_bn: bool = attrs.field(default=False, kw_only=True)
    frozen_eval: bool = attrs.field(default=True, kw_only=True)

    def trainable(self, backbone: Backbone, epoch: int) -> Mapping[str, float]:
        """Parameter name (as in `backbone.model.named_parameters()`) → lr multiplier, for
        the parameters that train at `epoch`. Names left out are frozen."""
        raise NotImplementedError

    # -- shared machinery ---------------------------------------------------------------------
    def decide(self, backbone: Backbone, epoch: int = 0) -> FreezeState:
        """What trains at `epoch`, at what lr, and what stays in inference mode — decided,
        not yet applied (the backbone is left as it is)."""
        plan = self._plan(backbone, epoch)
        trainable = set(plan)
        return FreezeState(
            trainable=plan,
            frozen_norm_layers=frozenset() if self.train_bn else _frozen_norms(backbone,
                                                                               trainable),
            inference_modules=(_frozen_modules(backbone, trainable, self.train_bn)
                               if self.frozen_eval else frozenset()),
        )

    def apply(self, backbone: Backbone, epoch: int = 0) -> FreezeReport:
        """Decide for `epoch` and apply it: `requires_grad` and the mode policy; return what
        trains. For a plain loop: `apply`, then `param_groups` for the optimizer."""
        return self.decide(backbone, epoch).apply(backbone)

    def param_groups(
        self, backbone: Backbone, lr: float, epoch: int = 0, weight_decay: float = 0.0,
        decay_norm_and_bias: bool = False,
    ) -> list[dict[str, Any]]:
        """Optimizer parameter groups for `epoch` (see `FreezeState.param_groups`)."""
        return self.decide(backbone, epoch).param_groups(backbone, lr, weight_decay,
                                                         decay_norm_and_bias)

    def changes_at(self, epoch: int) -> bool:
        """Whether what trains may differ at `epoch` from `epoch - 1` (scheduled strategies
        override this so the Trainer rebuilds its optimizer only when needed)."""
        return False

    def describe(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in attrs.asdict(self).items())
        return f"{type(self).__name__}({fields})"

    def spec(self) -> str:
        """This strategy as `parse_strategy` reads it back: its registered name and every
        option that differs from the class default (`freeze-fraction:fraction=0.5`)."""
        names = [name for name, cls in STRATEGIES.items() if cls is type(self)]
        if not names:
            raise ValueError(f"{type(self).__name__} is not registered, so it has no spec; "
                             "register it (`finetune.register`) to name it on a command line")
        options = [f"{field.name}={_option_text(getattr(self, field.name))}"
                   for field in attrs.fields(type(self)) if field.init
                   and getattr(self, field.name) != default_of(field)]
        return ":".join([names[0], *options])

    def state_dict(self) -> dict[str, Any]:
        """Plain data that rebuilds this strategy (for checkpoints and results files)."""
        return {"class": type(self).__name__, "options": attrs.asdict(self)}

    @staticmethod
    def from_state_dict(state: dict[str, Any]) -> FreezeStrategy:
        """The strategy `state_dict()` described; its class must be registered."""
        classes = {cls.__name__: cls for cls in STRATEGIES.values()}
        name = state.get("class")
        if name not in classes:
            raise CheckpointError(
                f"the checkpoint was trained with strategy {name!r}, which is not registered; "
                "import the module that registers it."
            )
        return classes[name](**state.get("options", {}))

    def _plan(self, backbone: Backbone, epoch: int) -> dict[str, float]:
        plan = dict(self.trainable(backbone, epoch))
        known = {name for name, _ in backbone.model.named_parameters()}
        unknown = sorted(set(plan) - known)
        if unknown:
            raise KeyError(
                f"{type(self).__name__} names parameters that {backbone.name} lacks: "
                f"{unknown[:5]}; use names from backbone.model.named_parameters()."
            )
        bad = {n: m for n, m in plan.items() if not m > 0}
        if bad:
            raise ValueError(
                f"{type(self).__name__} gave non-positive lr multipliers "
                f"{dict(list(bad.items())[:3])}; leave a parameter out of trainable() to freeze it."
            )
        return plan


def as_names(value: Sequence[str] | str) -> tuple[str, ...]:
    """attrs converter: one group name or several → a tuple of names."""
    return (value,) if isinstance(value, str) else tuple(value)


def check_groups(strategy: FreezeStrategy, backbone: Backbone, names: Sequence[str]) -> None:
    """Refuse group names the backbone lacks, listing the ones it has."""
    unknown = [n for n in names if n not in backbone.group_names]
    if unknown:
        raise ValueError(
            f"{type(strategy).__name__}: {backbone.name} has no group(s) {unknown}; "
            f"valid groups are {backbone.group_names}"
        )


def _frozen_norms(backbone: Backbone, trainable: set[str]) -> frozenset[str]:
    """BatchNorm layers none of whose affine parameters is in `trainable`."""
    names = []
    for name, module in backbone.model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            params = [n for n, _ in module.named_parameters(prefix=name, recurse=False)]
            if params and not any(n in trainable for n in params):
                names.append(name)
    return frozenset(names)


def _frozen_modules(backbone: Backbone, trainable: set[str],
                    keep_norms_training: bool) -> frozenset[str]:
    """Every module inside a subtree whose parameters are all frozen (a subtree holding at
    least one parameter), BatchNorm layers left out when their statistics should still move.
    Parameter-free layers outside such subtrees (a dropout before the head) keep training."""
    names: list[str] = []
    for root, module in backbone.model.named_modules():
        if names and _inside(root, names[-1]):
            continue  # inside the subtree found last (named_modules walks depth first)
        parameters = [n for n, _ in module.named_parameters(prefix=root)]
        if parameters and not any(n in trainable for n in parameters):
            names.append(root)
    result = set()
    for root in names:
        for name, module in backbone.model.get_submodule(root).named_modules():
            if not (keep_norms_training and isinstance(module, nn.modules.batchnorm._BatchNorm)):
                result.add(f"{root}.{name}".strip(".") if name else root)
    return frozenset(result)


def _inside(path: str, root: str) -> bool:
    return root == "" or path == root or path.startswith(f"{root}.")
