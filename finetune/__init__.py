"""finetune: fine-tune pretrained image classifiers with interchangeable freezing strategies."""

from finetune.data import ImageFolderData, INaturalist12K
from finetune.data.preprocessing import Preprocessing
from finetune.deploy.inference import Classifier, load
from finetune.errors import (
    ArchitectureError,
    CheckpointError,
    DataError,
    DeviceError,
    FinetuneError,
    WeightsUnavailableError,
)
from finetune.model.architectures import Architecture
from finetune.model.backbone import Backbone, ParameterGroup
from finetune.stats.metrics import EvaluationReport
from finetune.strategies import (
    PRESETS,
    STRATEGIES,
    BitFit,
    DiscriminativeLR,
    FreezeAllBut,
    FreezeFraction,
    FreezeHeadOnly,
    FreezeReport,
    FreezeState,
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
from finetune.train.config import TrainConfig
from finetune.train.range_test import LrFinding
from finetune.train.recipes import BatchMixing, WeightAverage
from finetune.train.step import NonFiniteLossError
from finetune.train.trainer import History, Trainer, TrainState
from finetune.tuning.advisor import Advice, Advisor, advise

__all__ = [
    "PRESETS",
    "STRATEGIES",
    "Advice",
    "Advisor",
    "Architecture",
    "ArchitectureError",
    "Backbone",
    "BatchMixing",
    "BitFit",
    "CheckpointError",
    "Classifier",
    "DataError",
    "DeviceError",
    "DiscriminativeLR",
    "EvaluationReport",
    "FinetuneError",
    "FreezeAllBut",
    "FreezeFraction",
    "FreezeHeadOnly",
    "FreezeReport",
    "FreezeState",
    "FreezeStrategy",
    "FullUnfreeze",
    "GradualUnfreeze",
    "History",
    "INaturalist12K",
    "ImageFolderData",
    "LastLayerOnly",
    "LinearProbeThenFinetune",
    "LoRA",
    "LrFinding",
    "NonFiniteLossError",
    "ParameterGroup",
    "Preprocessing",
    "TrainConfig",
    "TrainState",
    "Trainer",
    "WeightAverage",
    "WeightsUnavailableError",
    "advise",
    "build_strategy",
    "load",
    "parse_strategy",
    "register",
    "register_preset",
]
