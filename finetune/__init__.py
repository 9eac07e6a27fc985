"""finetune: fine-tune pretrained image classifiers with interchangeable freezing strategies."""

from finetune.backbone import Architecture, Backbone, ParameterGroup, Preprocessing
from finetune.errors import (
    ArchitectureError,
    CheckpointError,
    DataError,
    FinetuneError,
    WeightsUnavailableError,
)

__all__ = [
    "Architecture",
    "ArchitectureError",
    "Backbone",
    "CheckpointError",
    "DataError",
    "FinetuneError",
    "ParameterGroup",
    "Preprocessing",
    "WeightsUnavailableError",
]
