"""TrainConfig refuses a bad value when it is built, naming what it expected."""

from __future__ import annotations

import pytest

from finetune.train.config import TrainConfig


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"epochs": 0}, "'epochs' must be >= 1"),
        ({"epochs": 1.5}, "'epochs' must be <class 'int'>"),
        ({"lr": 0}, "lr must be a finite number > 0"),
        ({"weight_decay": -1}, "'weight_decay' must be >= 0"),
        ({"precision": "fp8"}, "'precision' must be in"),
        ({"schedule": "step"}, "'schedule' must be in"),
        ({"warmup": 1.0}, "warmup must be a number of optimizer steps"),
        ({"warmup": -1}, "warmup must be a number of optimizer steps"),
        ({"warmup": True}, "warmup must be a number of optimizer steps"),
        ({"accumulate_steps": 0}, "'accumulate_steps' must be >= 1"),
        ({"label_smoothing": 1.0}, "'label_smoothing' must be < 1"),
        ({"device": "gpu"}, "device must be 'auto', 'cpu', 'cuda' or 'cuda:N'"),
        ({"channels_last": "yes"}, "channels_last must be 'auto', True or False"),
        ({"max_grad_norm": 0}, "max_grad_norm must be a positive number or None"),
        ({"seed": "1"}, "'seed' must be"),
    ],
)
def test_invalid_values_are_refused_with_a_message(options, message):
    with pytest.raises((ValueError, TypeError), match=message):
        TrainConfig(**options)


def test_valid_devices_and_converters():
    assert TrainConfig(device="cuda:1").device == "cuda:1"
    assert TrainConfig(lr="0.01").lr == 0.01  # type: ignore[arg-type]
    assert TrainConfig(channels_last=False, seed=None).seed is None
