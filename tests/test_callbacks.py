"""Callbacks: checkpoints (atomic, safe to load), early stopping, progress bars, per-class
evaluation and the wandb logger (a real offline run read back, and a mocked run)."""

from __future__ import annotations

import glob
import io
import json
import struct
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from unittest.mock import MagicMock

import attrs
import pytest
import torch
import wandb
from sklearn.metrics import precision_recall_fscore_support
from wandb.proto import wandb_internal_pb2

import finetune.train.checkpoint as checkpoint_module
from finetune.callbacks import (
    Checkpoint,
    EarlyStopping,
    PerClassEvaluation,
    ProgressBar,
    WandbLogger,
    load_checkpoint,
    save_checkpoint,
)
from finetune.errors import CheckpointError
from finetune.strategies import LastLayerOnly
from finetune.train.config import TrainConfig
from finetune.train.step import NonFiniteLossError
from finetune.train.trainer import Trainer, TrainState
from tests.conftest import make_loader, make_tiny_backbone

CONFIG = TrainConfig(epochs=2, lr=1e-2, seed=0, precision="fp32", device="cpu")
CLASSES = ["ant", "bee", "wasp"]


def fit(callbacks, epochs: int = 2, val: bool = True, **kwargs) -> Trainer:
    trainer = Trainer(make_tiny_backbone(), LastLayerOnly(), attrs.evolve(CONFIG, epochs=epochs),
                      callbacks=callbacks, classes=CLASSES, **kwargs)
    trainer.fit(make_loader(n=24), make_loader(n=24, seed=1) if val else None)
    return trainer


# -- Checkpoint ---------------------------------------------------------------------------------
def test_checkpoint_writes_last_and_best_by_the_monitored_metric(tmp_path: Path):
    checkpoint = Checkpoint(tmp_path, monitor="val_loss", mode="min")
    trainer = fit([checkpoint], epochs=3)
    losses = trainer.history["val_loss"]
    best_epoch = min(range(3), key=losses.__getitem__)
    assert checkpoint.best_epoch == best_epoch and checkpoint.best == losses[best_epoch]
    best, last = load_checkpoint(checkpoint.best_path), load_checkpoint(checkpoint.last_path)
    assert (best["epoch"], last["epoch"]) == (best_epoch, 2)
    for key, value in trainer.backbone.model.state_dict().items():
        assert torch.equal(last["model"][key], value)
    assert last["strategy"] == LastLayerOnly().state_dict()
    assert last["callbacks"]["Checkpoint"] == {"best": checkpoint.best, "best_epoch": best_epoch}
    assert set(last["rng"]) >= {"torch", "numpy", "python"} and last["optimizer"]["state"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]


def test_a_failure_mid_save_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"format": 1, "epoch": 0, "weights": torch.arange(5.0)}, path)
    real_save = torch.save

    def crash_after_partial_write(obj, file, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(obj, buffer)
        file.write(buffer.getvalue()[:100])  # half a file on disk, then the process "dies"
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module.torch, "save", crash_after_partial_write)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"format": 1, "epoch": 1, "weights": torch.zeros(5)}, path)
    state = load_checkpoint(path)
    assert state["epoch"] == 0 and torch.equal(state["weights"], torch.arange(5.0))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind


def test_load_never_unpickles_arbitrary_objects(tmp_path: Path):
    path = tmp_path / "evil.pt"
    torch.save({"format": 1, "payload": SimpleNamespace(x=1)}, path)
    with pytest.raises(CheckpointError, match=r"refused to load .*evil\.pt: it holds pickled"):
        load_checkpoint(path)
    torch.save({"weights": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match="is not a finetune checkpoint"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "missing.pt")


def test_checkpoint_reports_a_missing_monitored_metric(tmp_path: Path):
    with pytest.raises(KeyError, match=r"Checkpoint monitors 'val_accuracy'.*validation loader"):
        fit([Checkpoint(tmp_path)], val=False)


# -- EarlyStopping --------------------------------------------------------------------------
def test_early_stopping_counts_patience_and_keeps_state():
    stopper = EarlyStopping(monitor="val_loss", mode="min", patience=2, min_delta=0.01)
    trainer = SimpleNamespace(state=TrainState())
    for epoch, loss in enumerate([1.0, 0.9, 0.895, 0.95]):
        trainer.state.epoch = epoch
        stopper.on_epoch_end(trainer, {"val_loss": loss})
        assert trainer.state.should_stop == (epoch == 3)
    assert stopper.state_dict() == {"best": 0.9, "wait": 2, "stopped_epoch": 3}
    fresh = EarlyStopping()
    fresh.load_state_dict(stopper.state_dict())
    assert (fresh.best, fresh.wait) == (0.9, 2)
    with pytest.raises(ValueError, match="patience must be an integer ≥ 1"):
        EarlyStopping(patience=0)


def test_early_stopping_ends_fit_and_marks_history():
    trainer = fit([EarlyStopping(monitor="epoch", mode="min", patience=1)], epochs=5, val=False)
    assert len(trainer.history) == 2 and trainer.history.stopped_early


# -- ProgressBar ----------------------------------------------------------------------------
def test_progress_bar_shows_epochs_and_loss(capsys):
    fit([ProgressBar()])
    err = capsys.readouterr().err
    assert "epochs" in err and "epoch 2/2" in err
    assert "loss=" in err and "acc=" in err and "val_acc=" in err
    assert "2/2" in err


def test_progress_bar_is_quiet_when_not_a_tty_if_asked(capsys):
    assert not sys.stderr.isatty()
    fit([ProgressBar(quiet_if_not_tty=True)])
    assert capsys.readouterr().err == ""


# -- PerClassEvaluation ---------------------------------------------------------------------
def test_per_class_evaluation_matches_sklearn_and_writes_table_png_json(tmp_path: Path):
    stream = io.StringIO()
    callback = PerClassEvaluation(tmp_path, every_epoch=True, stream=stream)
    trainer = fit([callback])
    report = callback.report
    assert report is trainer.state.val_report and len(callback.epoch_reports) == 2
    _, labels = make_loader(n=24, seed=1).dataset.tensors
    predicted = trainer.predict(make_loader(n=24, seed=1, shuffle=False))
    precision, recall, f1, support = precision_recall_fscore_support(
        labels.numpy(), predicted.numpy(), labels=[0, 1, 2], zero_division=0)
    assert report.precision.tolist() == pytest.approx(precision.tolist())
    assert report.recall.tolist() == pytest.approx(recall.tolist())
    assert report.f1.tolist() == pytest.approx(f1.tolist())
    assert report.support.tolist() == support.tolist()
    text = stream.getvalue()
    assert text.count("per-class validation metrics") == 3 and all(c in text for c in CLASSES)
    assert (tmp_path / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "confusion_matrix_epoch1.png").is_file()
    saved = json.loads((tmp_path / "per_class.json").read_text())
    assert saved["per_class"]["bee"]["recall"] == pytest.approx(recall[1])


# -- WandbLogger ----------------------------------------------------------------------------


def read_wandb_records(path: Path) -> list[wandb_internal_pb2.Record]:
    """Parse a .wandb transaction log (LevelDB log format: 32 KiB blocks of 7-byte-headed
    chunks) into protobuf records."""
    data, block, records, pending = path.read_bytes(), 32768, [], b""
    assert data[:4] == b":W&B"
    position = 7
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if position + 7 + length > len(data):
            break  # a record still being written
        chunk = data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 2):  # full, first
            pending = chunk
        elif kind in (3, 4):  # middle, last
            pending += chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def read_complete_run(path: Path, timeout: float = 30.0) -> list[wandb_internal_pb2.Record]:
    """The run's records once its `exit` record is on disk: wandb's writer process may
    still be flushing the log for a moment after `finish()` returns."""
    deadline = time.monotonic() + timeout
    while True:
        records = read_wandb_records(path)
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} has no exit record after {timeout} s")
        time.sleep(0.1)


def test_wandb_offline_run_is_written_and_holds_config_metrics_and_tables(offline_wandb, capsys):
    settings = wandb.Settings(x_disable_stats=True, x_disable_meta=True, console="off")
    logger = WandbLogger(project="tests", name="tiny-run", settings=settings)
    trainer = fit([logger])
    assert logger.run is None  # finished
    files = glob.glob(str(offline_wandb / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1 and logger.run_dir and Path(files[0]).parent == Path(logger.run_dir)
    assert f"wandb sync {logger.run_dir}" in capsys.readouterr().err

    records = read_complete_run(Path(files[0]))
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run.project == "tests" and run.display_name == "tiny-run"
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["strategy"]["class"] == "LastLayerOnly"
    assert config["backbone"]["name"] == "tinynet" and config["backbone"]["num_classes"] == 3
    assert config["train"]["epochs"] == 2 and config["train"]["lr"] == 1e-2
    rows = [{"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item}
            for r in records if r.WhichOneof("record_type") == "history"]
    epochs = [row for row in rows if "train/loss" in row]
    assert [row["train/loss"] for row in epochs] == pytest.approx(trainer.history["train_loss"])
    assert [row["val/accuracy"] for row in epochs] == pytest.approx(
        trainer.history["val_accuracy"])
    assert all(row["lr/head"] == pytest.approx(1e-2) for row in epochs)
    final = rows[-1]
    assert final["per_class/_type"] == "table-file" and final["per_class/nrows"] == 3
    table = json.loads((Path(logger.run_dir) / "files" / final["per_class/path"]).read_text())
    assert [row[0] for row in table["data"]] == CLASSES
    assert table["columns"] == ["class", "accuracy", "precision", "recall", "f1", "support"]
    assert any(key.startswith("confusion_matrix") for key in final)


def test_wandb_logger_makes_the_exact_calls(monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", "/nonexistent/netrc")
    run = MagicMock(spec=wandb.sdk.wandb_run.Run)
    run.summary = MagicMock()  # an instance attribute of Run, so not in the class spec
    init = MagicMock(return_value=run)
    monkeypatch.setattr(wandb, "init", init)
    trainer = fit([WandbLogger(project="p", name="n", config={"note": "x"})])

    init.assert_called_once()
    kwargs = init.call_args.kwargs
    assert (kwargs["project"], kwargs["name"], kwargs["mode"]) == ("p", "n", "offline")
    assert kwargs["config"]["note"] == "x" and kwargs["config"]["train"] == attrs.asdict(
        trainer.config)
    assert kwargs["config"]["strategy"]["class"] == "LastLayerOnly"
    assert run.log.call_count == 3  # two epochs, then the final tables
    first = run.log.call_args_list[0].args[0]
    assert first["epoch"] == 0 and first["train/loss"] == trainer.history["train_loss"][0]
    assert first["val/accuracy"] == trainer.history["val_accuracy"][0]
    assert first["lr/head"] == pytest.approx(1e-2)
    final = run.log.call_args_list[2].args[0]
    assert set(final) == {"per_class", "confusion_matrix"}
    assert isinstance(final["per_class"], wandb.Table)
    run.summary.update.assert_called_once_with(
        {"final/val_accuracy": trainer.state.val_report.accuracy,
         "final/val_macro_f1": trainer.state.val_report.macro_f1})
    run.finish.assert_called_once_with(exit_code=0)


def test_wandb_failures_never_stop_training(monkeypatch):
    monkeypatch.setattr(wandb, "init", MagicMock(side_effect=RuntimeError("network down")))
    with pytest.warns(RuntimeWarning, match="network down"):
        trainer = fit([WandbLogger(mode="online")])
    assert len(trainer.history) == 2

    run = MagicMock(spec=wandb.sdk.wandb_run.Run)
    run.log.side_effect = ConnectionError("unreachable")
    monkeypatch.setattr(wandb, "init", MagicMock(return_value=run))
    with pytest.warns(RuntimeWarning, match="wandb log failed"):
        trainer = fit([WandbLogger(mode="offline")])
    assert len(trainer.history) == 2
    run.finish.assert_called_once_with(exit_code=0)


def test_wandb_run_is_finished_with_an_error_code_when_training_fails(monkeypatch):
    run = MagicMock(spec=wandb.sdk.wandb_run.Run)
    monkeypatch.setattr(wandb, "init", MagicMock(return_value=run))
    with pytest.raises(NonFiniteLossError):
        fit([WandbLogger(mode="offline")], loss=lambda logits, labels: logits.sum() * torch.nan)
    run.finish.assert_called_once_with(exit_code=1)


def test_wandb_logger_attaches_to_the_callers_run_and_leaves_it_open(monkeypatch) -> None:
    run = MagicMock(spec=wandb.sdk.wandb_run.Run)
    run.summary, run.config = MagicMock(), MagicMock()
    init = MagicMock()
    monkeypatch.setattr(wandb, "init", init)
    fit([WandbLogger(run=run)])
    init.assert_not_called()
    run.config.update.assert_called_once()
    assert run.config.update.call_args.args[0]["strategy"]["class"] == "LastLayerOnly"
    assert run.log.call_count == 3
    run.finish.assert_not_called()  # the caller started it, the caller finishes it
