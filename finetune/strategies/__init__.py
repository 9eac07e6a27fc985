"""Freezing strategies: which parameters train, and at what learning-rate multiplier.

`FreezeStrategy` is the base class; `STRATEGIES` maps short names to classes for CLIs and
benchmarks. See docs/strategies.md.
"""

from finetune.strategies.base import (
    STRATEGIES,
    FreezeReport,
    FreezeStrategy,
    build_strategy,
    register,
)
from finetune.strategies.builtin import (
    FreezeFraction,
    FreezeHeadOnly,
    FullUnfreeze,
    LastLayerOnly,
)

__all__ = [
    "STRATEGIES",
    "FreezeFraction",
    "FreezeHeadOnly",
    "FreezeReport",
    "FreezeStrategy",
    "FullUnfreeze",
    "LastLayerOnly",
    "build_strategy",
    "register",
]
