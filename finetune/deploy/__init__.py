"""Using a model after training: `load` a run as a `Classifier` (inference), write it as
ONNX / TorchScript / safetensors checked against PyTorch (export), and describe it in
MODEL_CARD.md (model_card)."""

from finetune.deploy.inference import Classifier, Prediction, load

__all__ = ["Classifier", "Prediction", "load"]
