"""The knobs people bring from timm and Lightning: the optimizer (Adam, AdamW, SGD with
momentum) and its weight decay, which spares frozen tensors, biases and norm layers; early
stopping from the config; the same metrics in wandb, TensorBoard and CSV."""

from __future__ import annotations

import csv
import glob
import json
from pathlib import Path

import attrs
import pytest
import torch
import wandb

from finetune import FreezeFraction, FullUnfreeze, LastLayerOnly, TrainConfig, Trainer
from finetune.callbacks import Checkpoint, CSVLogger, TensorBoardLogger, WandbLogger
from finetune.callbacks.early_stopping import early_stopping
from finetune.cli import main
from tests.conftest import TINY, make_loader, make_tiny_backbone, make_tree
from tests.test_callbacks import read_complete_run
from tests.test_recipe import StopAfter, assert_same_weights, weights

FP32 = TrainConfig(epochs=3, lr=1e-2, precision="fp32", device="cpu", channels_last=False,
                   seed=0)
OPTIMIZERS = {
    "adam": {"optimizer": "adam", "weight_decay": 1e-2},
    "adamw": {"optimizer": "adamw", "weight_decay": 5e-2},
    "sgd": {"optimizer": "sgd", "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3},
}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_resume_mid_run_equals_an_uninterrupted_run_for_each_optimizer(
        name: str, tmp_path: Path) -> None:
    config = attrs.evolve(FP32, **OPTIMIZERS[name])
    straight = make_tiny_backbone()
    trainer = Trainer(straight, FreezeFraction(fraction=0.5), config)
    trainer.fit(make_loader())
    assert type(trainer.optimizer).__name__.lower() == name

    checkpoint = Checkpoint(tmp_path, monitor="train_loss", mode="min")
    Trainer(make_tiny_backbone(), FreezeFraction(fraction=0.5), config,
            callbacks=[checkpoint, StopAfter(epoch=0)]).fit(make_loader())
    resumed = make_tiny_backbone(seed=7)
    Trainer(resumed, FreezeFraction(fraction=0.5), config).fit(
        make_loader(), resume=checkpoint.last_path)
    assert_same_weights(weights(straight), weights(resumed))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_weight_decay_spares_frozen_tensors_biases_and_norms(name: str) -> None:
    """With a loss whose gradient is zero only the decay moves a weight: the decayed matrices
    shrink; frozen tensors, biases and BatchNorm's scale and shift stay as they were."""
    # seed None: the fit does not draw the head anew, so `before` is what it starts from
    config = attrs.evolve(FP32, epochs=1, seed=None, **{**OPTIMIZERS[name], "weight_decay": 0.5})
    backbone = make_tiny_backbone()
    before = weights(backbone)
    trainer = Trainer(backbone, FreezeFraction(fraction=0.5), config,
                      loss=lambda logits, labels: logits.sum() * 0.0)
    trainer.fit(make_loader())
    parameters = dict(backbone.model.named_parameters())
    trainable = {n for n, p in parameters.items() if p.requires_grad}
    frozen = set(parameters) - trainable
    assert frozen and all(torch.equal(before[n], weights(backbone)[n]) for n in frozen)
    spared = {n for n in trainable if n.endswith(".bias") or before[n].ndim <= 1}
    decayed = trainable - spared
    assert spared and decayed
    after = weights(backbone)
    assert all(torch.equal(before[n], after[n]) for n in spared)
    assert all(after[n].norm() < before[n].norm() for n in decayed)
    groups = {g["name"]: g["weight_decay"] for g in trainer.optimizer.param_groups}
    assert any(k.endswith(".no_decay") and v == 0.0 for k, v in groups.items())


def test_asked_to_the_decay_reaches_biases_and_norms_and_lr_multipliers_hold() -> None:
    from finetune import DiscriminativeLR

    config = attrs.evolve(FP32, epochs=1, optimizer="adamw", weight_decay=0.1,
                          decay_norm_and_bias=True)
    trainer = Trainer(make_tiny_backbone(), DiscriminativeLR(), config)
    trainer.fit(make_loader())
    groups = trainer.optimizer.param_groups
    assert all(g["weight_decay"] == 0.1 and not g["name"].endswith(".no_decay") for g in groups)
    split = Trainer(make_tiny_backbone(), DiscriminativeLR(), attrs.evolve(
        config, decay_norm_and_bias=False))
    split.fit(make_loader())
    multipliers = {g["name"].removesuffix(".no_decay"): g["lr_multiplier"]
                   for g in split.optimizer.param_groups}
    assert multipliers == {g["name"]: g["lr_multiplier"] for g in groups}


def test_nesterov_needs_sgd_with_momentum() -> None:
    with pytest.raises(ValueError, match="nesterov"):
        TrainConfig(optimizer="adam", nesterov=True)
    with pytest.raises(ValueError, match="nesterov"):
        TrainConfig(optimizer="sgd", momentum=0.0, nesterov=True)


def test_patience_from_the_config_stops_and_a_resume_keeps_it(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = attrs.evolve(FP32, epochs=8, lr=1e-12, patience=1)  # too small to improve
    stopper = early_stopping(config)
    assert [type(c).__name__ for c in stopper] == ["EarlyStopping"]
    assert early_stopping(FP32) == []
    history = Trainer(make_tiny_backbone(), LastLayerOnly(), config,
                      callbacks=stopper).fit(make_loader(), make_loader(seed=1))
    assert history.stopped_early and len(history) < 8
    data, run = make_tree(tmp_path / "data"), tmp_path / "run"
    argv = ["train", "--data", str(data), "--backbone", TINY, "--epochs", "2", "--batch-size",
            "4", "--image-size", "32", "--workers", "0", "--device", "cpu", "--precision",
            "fp32", "--strategy", "last-layer"]
    assert main([*argv, "--patience", "3", "--monitor", "val_accuracy",
                 "--checkpoint-dir", str(run)]) == 0
    cli = json.loads((run / "run.json").read_text())["cli"]
    assert (cli["patience"], cli["monitor"]) == (3, "val_accuracy")
    from finetune.cli import build_parser
    from finetune.cli.main import take_run_settings

    args = build_parser().parse_args(["train", "--resume", str(run), "--backbone", TINY])
    take_run_settings(args)
    assert (args.patience, args.monitor) == (3, "val_accuracy")
    with pytest.raises(SystemExit):
        main([*argv, "--patience", "2", "--val-split", "0"])
    assert "--patience stops on the validation split" in capsys.readouterr().err


def test_every_logger_holds_the_same_metrics_at_the_same_steps(
        offline_wandb: Path, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    settings = wandb.Settings(x_disable_stats=True, x_disable_meta=True, console="off")
    loggers = [WandbLogger(project="tests", name="same", settings=settings),
               CSVLogger(tmp_path / "csv"), TensorBoardLogger(tmp_path / "tb")]
    trainer = Trainer(make_tiny_backbone(), FullUnfreeze(), FP32, callbacks=loggers)
    trainer.fit(make_loader(), make_loader(seed=1))

    with (tmp_path / "csv" / "metrics.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    from_csv = {(int(row["epoch"]), key): float(value) for row in rows
                for key, value in row.items() if key != "epoch" and value}
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    from_tensorboard = {(event.step, tag): event.value for tag in events.Tags()["scalars"]
                        for event in events.Scalars(tag)}
    files = glob.glob(str(offline_wandb / "wandb" / "offline-run-*" / "run-*.wandb"))
    records = read_complete_run(Path(files[0]))
    from_wandb = {}
    for record in records:
        if record.WhichOneof("record_type") != "history":
            continue
        row = {"/".join(i.nested_key) or i.key: json.loads(i.value_json)
               for i in record.history.item}
        if "train/loss" in row:
            from_wandb.update({(row["epoch"], key): value for key, value in row.items()
                               if key != "epoch" and not key.startswith("_")})
    assert set(from_csv) == set(from_tensorboard) == set(from_wandb)
    assert {key for _, key in from_csv} >= {"train/loss", "train/accuracy", "val/loss",
                                            "val/accuracy", "lr/head", "epoch_seconds"}
    assert sorted({step for step, _ in from_csv}) == [0, 1, 2]
    for key, value in from_csv.items():
        assert from_tensorboard[key] == pytest.approx(value, rel=1e-6)
        assert from_wandb[key] == pytest.approx(value, rel=1e-9)
    assert [from_csv[(e, "train/loss")] for e in range(3)] == pytest.approx(
        trainer.history["train_loss"])


def test_the_cli_logs_csv_and_tensorboard_beside_the_checkpoints(tmp_path: Path) -> None:
    data, run = make_tree(tmp_path / "data"), tmp_path / "runs" / "a"
    assert main(["train", "--data", str(data), "--backbone", TINY, "--epochs", "2",
                 "--batch-size", "4", "--image-size", "32", "--workers", "0", "--device",
                 "cpu", "--precision", "fp32", "--strategy", "last-layer",
                 "--logger", "csv,tensorboard", "--checkpoint-dir", str(run)]) == 0
    assert (run / "metrics.csv").read_text().count("\n") == 3  # header + 2 epochs
    assert glob.glob(str(run / "tensorboard" / "events.out.tfevents.*"))
    with pytest.raises(SystemExit):
        main(["train", "--logger", "mlflow"])


@pytest.mark.slow
def test_a_compiled_run_matches_eager_within_rounding() -> None:
    """torch.compile reorders float arithmetic, nothing more: with SGD (which does not
    normalise a gradient of rounding noise into a full step, as Adam does for a conv bias
    ahead of BatchNorm) every weight and loss of a compiled fit is eager's within 1e-5."""
    config = attrs.evolve(FP32, epochs=2, optimizer="sgd", momentum=0.9)
    runs = {}
    for compiled in (False, True):
        backbone = make_tiny_backbone()
        trainer = Trainer(backbone, FullUnfreeze(), attrs.evolve(config, compile=compiled))
        trainer.fit(make_loader(), make_loader(seed=1))
        runs[compiled] = (weights(backbone), trainer.history)
    (eager, eager_history), (fast, fast_history) = runs[False], runs[True]
    for name, tensor in eager.items():
        assert torch.allclose(tensor.float(), fast[name].float(), atol=1e-5), name
    assert fast_history["train_loss"] == pytest.approx(eager_history["train_loss"], abs=1e-5)
    assert fast_history["val_loss"] == pytest.approx(eager_history["val_loss"], abs=1e-5)
