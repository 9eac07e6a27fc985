"""finetune: fine-tune pretrained image classifiers with interchangeable freezing strategies."""

from finetune.backbone import Architecture, Backbone, ParameterGroup, Preprocessing
from finetune.config import TrainConfig
from finetune.data import ImageFolderData, INaturalist12K
from finetune.errors import (
    ArchitectureError,
    CheckpointError,
    DataError,
    FinetuneError,
    WeightsUnavailableError,
)
from finetune.metrics import EvaluationReport
from finetune.strategies import (
    STRATEGIES,
    BitFit,
    DiscriminativeLR,
    FreezeAllBut,
    FreezeFraction,
    FreezeHeadOnly,
    FreezeReport,
    FreezeStrategy,
    FullUnfreeze,
    GradualUnfreeze,
    LastLayerOnly,
    LinearProbeThenFinetune,
    LoRA,
    build_strategy,
    parse_strategy,
    register,
)
from finetune.trainer import History, NonFiniteLossError, Trainer, TrainState

__all__ = [
    "STRATEGIES",
    "Architecture",
    "ArchitectureError",
    "Backbone",
    "BitFit",
    "CheckpointError",
    "DataError",
    "DiscriminativeLR",
    "EvaluationReport",
    "FinetuneError",
    "FreezeAllBut",
    "FreezeFraction",
    "FreezeHeadOnly",
    "FreezeReport",
    "FreezeStrategy",
    "FullUnfreeze",
    "GradualUnfreeze",
    "History",
    "INaturalist12K",
    "ImageFolderData",
    "LastLayerOnly",
    "LinearProbeThenFinetune",
    "LoRA",
    "NonFiniteLossError",
    "ParameterGroup",
    "Preprocessing",
    "TrainConfig",
    "TrainState",
    "Trainer",
    "WeightsUnavailableError",
    "build_strategy",
    "parse_strategy",
    "register",
]
