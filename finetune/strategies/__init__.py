"""Freezing strategies: which parameters train, and at what learning-rate multiplier.

`FreezeStrategy` is the base class; `STRATEGIES` maps short names to classes for CLIs and
benchmarks. See docs/strategies.md.
"""

from finetune.strategies.base import (
    PRESETS,
    STRATEGIES,
    FreezeReport,
    FreezeState,
    FreezeStrategy,
    build_strategy,
    parse_strategy,
    register,
    register_preset,
)
from finetune.strategies.builtin import (
    FreezeFraction,
    FreezeHeadOnly,
    FullUnfreeze,
    LastLayerOnly,
)
from finetune.strategies.lora import LoRA
from finetune.strategies.scheduled import GradualUnfreeze, LinearProbeThenFinetune
from finetune.strategies.selective import BitFit, DiscriminativeLR, FreezeAllBut

__all__ = [
    "PRESETS",
    "STRATEGIES",
    "BitFit",
    "DiscriminativeLR",
    "FreezeAllBut",
    "FreezeFraction",
    "FreezeHeadOnly",
    "FreezeReport",
    "FreezeState",
    "FreezeStrategy",
    "FullUnfreeze",
    "GradualUnfreeze",
    "LastLayerOnly",
    "LinearProbeThenFinetune",
    "LoRA",
    "build_strategy",
    "parse_strategy",
    "register",
    "register_preset",
]
