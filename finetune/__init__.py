"""finetune: fine-tune pretrained image classifiers with interchangeable freezing strategies."""

from finetune.backbone import Architecture, Backbone, ParameterGroup, Preprocessing
from finetune.errors import (
    ArchitectureError,
    CheckpointError,
    DataError,
    FinetuneError,
    WeightsUnavailableError,
)
from finetune.strategies import (
    STRATEGIES,
    FreezeFraction,
    FreezeHeadOnly,
    FreezeReport,
    FreezeStrategy,
    FullUnfreeze,
    LastLayerOnly,
    build_strategy,
    register,
)

__all__ = [
    "STRATEGIES",
    "Architecture",
    "ArchitectureError",
    "Backbone",
    "CheckpointError",
    "DataError",
    "FinetuneError",
    "FreezeFraction",
    "FreezeHeadOnly",
    "FreezeReport",
    "FreezeStrategy",
    "FullUnfreeze",
    "LastLayerOnly",
    "ParameterGroup",
    "Preprocessing",
    "WeightsUnavailableError",
    "build_strategy",
    "register",
]
