"""The command line's own argument types (strategy, backbone, `--lr auto`) and the bridge from
the declared settings (`finetune.settings`: `DataConfig`, `TrainConfig`) to a subcommand's
flags, its configs, and a resume's run.json."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from finetune.data.config import DataConfig
from finetune.errors import ArchitectureError, CheckpointError
from finetune.model.zoo import check_backbone_name
from finetune.settings import (
    NotAFlagValue,
    add_flags,
    argument_type,
    checked_number,
    declared,
    flag_value,
    positive_float,
    recorded,
    values_of,
)
from finetune.strategies import FreezeStrategy, parse_strategy
from finetune.train.config import TrainConfig, setting_classes
from finetune.train.range_test import MIN_STEPS
from finetune.tuning.search import parse_grid


def strategy_argument(spec: str) -> FreezeStrategy:
    """argparse `type` for --strategy: `finetune.parse_strategy`, errors as usage errors."""
    try:
        return parse_strategy(spec)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{error} (see `finetune strategies`)") from None


def backbone_name(text: str) -> str:
    try:
        return check_backbone_name(text)
    except ArchitectureError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


range_test_steps = checked_number(int, lambda v: v >= MIN_STEPS,
                                  f"an integer ≥ {MIN_STEPS} (a suggestion needs a slope on "
                                  "each side of a point)")
lr_grid_argument = argument_type(parse_grid)  # `--lr-grid`: learning rates, comma-separated


def lr_argument(text: str) -> float | str:
    """`--lr`: a positive number, or `auto` (chosen on validation by `finetune.tuning`)."""
    return "auto" if text == "auto" else positive_float(text)


def add_setting_flags(parser: argparse.ArgumentParser, command: str, **options: Any) -> None:
    """Every declared setting `command` takes, as flags (`finetune.settings.add_flags`)."""
    for cls in setting_classes():
        add_flags(parser, cls, command, **options)


def data_config(args: argparse.Namespace) -> DataConfig:
    data, _ = setting_classes()
    return data(**values_of(data, args))


def train_config(args: argparse.Namespace, **chosen: Any) -> TrainConfig:
    """The run's TrainConfig from its flags (those a command lacks keep their defaults);
    `chosen` overrides (the lr `--lr auto` chose)."""
    _, train = setting_classes()
    values = {**values_of(train, args), "class_weights": data_config(args).class_weights}
    return train(**{**values, **chosen})


def resumed_settings(args: argparse.Namespace, record: dict[str, Any], source: Path) -> None:
    """A resume continues the run as it was set up: every declared setting kept on resume and
    left at its default takes the run's own value from run.json, checked as its flag checks
    it (an edited file gets an error naming the field, not a TypeError deep in training)."""
    parser: argparse.ArgumentParser = args.parser
    run = {name: value for cls in setting_classes()
           for name, value in recorded(record.get("cli", {}), cls).items()}
    run.update({
        k: record[k] for k in ("val_split", "seed", "train_per_class") if k in record})
    for cls in setting_classes():
        for field, flag in declared(cls):
            name = field.name
            if (not flag.resume or name == "lr" or name not in run or not hasattr(args, name)
                    or getattr(args, name) != parser.get_default(name)):
                continue
            setattr(args, name, recorded_flag(parser, name, run[name], source))


def recorded_flag(parser: argparse.ArgumentParser, name: str, value: Any, source: Path) -> Any:
    """A flag's value as run.json records it, checked as the command line would check it."""
    action = next((a for a in parser._actions if a.dest == name), None)
    if action is None or value is None or isinstance(value, (dict, bool)):
        return value
    flag = action.option_strings[0] if action.option_strings else name
    try:
        return flag_value(action, value)
    except NotAFlagValue as error:
        raise CheckpointError(f"{source}: cli.{name} holds {value!r}, which {flag} does not "
                              f"take ({error.reason}); restore the value, or give {flag} "
                              "yourself") from None
