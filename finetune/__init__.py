"""finetune: fine-tune pretrained image classifiers with interchangeable freezing strategies."""

from finetune.core.architectures import Architecture
from finetune.core.backbone import Backbone, ParameterGroup
from finetune.core.config import TrainConfig
from finetune.core.metrics import EvaluationReport
from finetune.core.stepping import NonFiniteLossError
from finetune.core.strategies import (
    PRESETS,
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
    register_preset,
)
from finetune.core.trainer import History, Trainer, TrainState
from finetune.data import ImageFolderData, INaturalist12K
from finetune.data.preprocessing import Preprocessing
from finetune.errors import (
    ArchitectureError,
    CheckpointError,
    DataError,
    DeviceError,
    FinetuneError,
    WeightsUnavailableError,
)

__all__ = [
    "PRESETS",
    "STRATEGIES",
    "Architecture",
    "ArchitectureError",
    "Backbone",
    "BitFit",
    "CheckpointError",
    "DataError",
    "DeviceError",
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
    "register_preset",
]
