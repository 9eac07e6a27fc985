"""One seed, one result on one machine: fits in one process and runs in separate processes
agree bit for bit, whatever timed probes (precision, memory layout) would say this time."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import attrs
import pytest
import torch

from finetune import Backbone, ImageFolderData, TrainConfig, Trainer, build_strategy
from finetune.runtime import precision as precision_module
from finetune.train.events import Callback
from tests.conftest import TINY, TINY_GROUPS, TinyNet, make_tree, run_cli

ROOT = Path(__file__).resolve().parents[1]


def _weights(backbone: Backbone) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in backbone.model.parameters()])


def _toy_fit(data: ImageFolderData, **config) -> tuple[Trainer, torch.Tensor]:
    """The report's case: a two-class toy, a random-init ResNet18, fp32, no activation cache,
    no resized copies, un-augmented images."""
    torch.manual_seed(0)
    backbone = Backbone.from_torchvision("resnet18", 2, weights=None)
    settings = {"epochs": 2, "lr": 1e-3, "seed": 0, "precision": "fp32",
                "feature_cache": "off", **config}
    trainer = Trainer(backbone, build_strategy("full-unfreeze"), TrainConfig(**settings))
    trainer.fit(data.train_loader(), data.val_loader())
    return trainer, _weights(backbone)


@pytest.fixture
def toy_data(tmp_path: Path) -> ImageFolderData:
    root = make_tree(tmp_path / "data", classes=2, n_train=8, n_test=2, size=40)
    return ImageFolderData(root, image_size=32, batch_size=4, val_split=0.25, seed=0,
                           data_augmentation=False, progress=False)


def test_three_fits_in_one_process_agree_bit_for_bit(toy_data: ImageFolderData) -> None:
    (_, first), (_, second), (_, third) = (_toy_fit(toy_data) for _ in range(3))
    assert torch.equal(first, second)
    assert torch.equal(second, third)


def test_one_seed_covers_a_backbone_built_after_any_draws(toy_data: ImageFolderData) -> None:
    """A random-init ResNet18 built after 0, 7 and 100 draws of the process's RNG (so its
    weights and new head differ as built): TrainConfig.seed draws them again at fit, and
    the three fits agree bit for bit."""
    fits, built = [], []
    for draws in (0, 7, 100):
        torch.rand(draws)
        backbone = Backbone.from_torchvision("resnet18", 2, weights=None)
        built.append(_weights(backbone))
        trainer = Trainer(backbone, build_strategy("full-unfreeze"), TrainConfig(
            epochs=1, lr=1e-3, seed=0, precision="fp32", feature_cache="off"))
        trainer.fit(toy_data.train_loader(), toy_data.val_loader())
        fits.append(_weights(backbone))
    assert not torch.equal(built[0], built[1])  # the process's RNG did make them differ
    assert torch.equal(fits[0], fits[1]) and torch.equal(fits[1], fits[2])


class HeadAtStart(Callback):
    def __init__(self) -> None:
        self.heads: list[torch.Tensor] = []

    def on_fit_start(self, trainer: Trainer) -> None:
        self.heads.append(trainer.backbone.head.weight.detach().clone())


def test_the_seed_draws_the_new_head_and_never_redraws_a_trained_one(
        toy_data: ImageFolderData) -> None:
    """A pretrained body keeps its weights; only the new head is the seed's. A backbone that
    has trained (or whose weights were loaded) is never drawn again; seed=None leaves the
    head as built."""
    def pretrained_body(draws: int = 0) -> Backbone:
        with torch.random.fork_rng():
            torch.manual_seed(1)  # the same "pretrained" body each time
            body = TinyNet()
        torch.rand(draws)  # and whatever the process drew before the new head
        return Backbone.from_module(body, head="fc", groups=TINY_GROUPS, num_classes=2)

    first, second = pretrained_body(), pretrained_body(13)
    assert not torch.equal(first.head.weight, second.head.weight)
    torch.manual_seed(5)
    other = Backbone.from_module(TinyNet(), head="fc", groups=TINY_GROUPS, num_classes=2)
    assert first.draw_fresh(0) and second.draw_fresh(0) and other.draw_fresh(0)
    assert torch.equal(first.head.weight, second.head.weight)
    assert torch.equal(first.head.weight, other.head.weight)  # the head is the seed's alone
    assert not torch.equal(first.model.stem[0].weight, other.model.stem[0].weight)

    recorder = HeadAtStart()
    config = TrainConfig(epochs=1, lr=1e-2, seed=3, precision="fp32", feature_cache="off")
    trainer = Trainer(first, build_strategy("full-unfreeze"), config, [recorder])
    trainer.fit(toy_data.train_loader(), toy_data.val_loader())
    trained = first.head.weight.detach().clone()
    assert not first.is_as_drawn() and not first.draw_fresh(3)
    trainer.fit(toy_data.train_loader(), toy_data.val_loader())  # a second fit goes on
    assert torch.equal(recorder.heads[1], trained)

    loaded = pretrained_body()
    loaded.model.load_state_dict(first.model.state_dict())
    assert not loaded.draw_fresh(3) and torch.equal(loaded.head.weight, first.head.weight)

    unseeded = pretrained_body()
    as_built = unseeded.head.weight.detach().clone()
    Trainer(unseeded, build_strategy("last-layer"), attrs.evolve(config, seed=None, epochs=1),
            [recorder]).fit(toy_data.train_loader())
    assert torch.equal(recorder.heads[-1], as_built)


@pytest.fixture
def flapping_probe(monkeypatch: pytest.MonkeyPatch) -> list[list[bool]]:
    """A layout probe whose timings flip every call, as a busy machine's can, and a fresh
    process's empty in-memory verdicts: only a stored verdict keeps runs alike."""
    winner = itertools.cycle([True, False])
    calls: list[list[bool]] = []

    def least_step_seconds(model, images, variants, steps=2, warmup=1):
        nhwc_wins = next(winner)
        calls.append([channels_last for _, channels_last in variants])
        return [1.0 if channels_last == nhwc_wins else 2.0 for _, channels_last in variants]

    monkeypatch.setattr(precision_module, "least_step_seconds", least_step_seconds)
    return calls


def test_a_timed_layout_is_decided_once_per_machine(toy_data, flapping_probe, monkeypatch):
    results = []
    for _ in range(3):  # each a new process as far as the verdicts go
        monkeypatch.setattr(precision_module, "_LAYOUTS", {})
        trainer, weights = _toy_fit(toy_data, channels_last="auto")
        results.append((trainer.state.channels_last, weights))
    assert len(flapping_probe) == 1  # timed once, then read from the machine's store
    assert results[0][0] == results[1][0] == results[2][0]
    assert torch.equal(results[0][1], results[1][1]) and torch.equal(results[1][1],
                                                                     results[2][1])


def test_the_verdict_store_keeps_the_first_decision(tmp_path: Path) -> None:
    store = precision_module.VerdictStore(tmp_path / "verdicts.json")
    assert store.decide("channels_last", ("model", "cpu"), None) is None  # nothing to read
    assert store.decide("channels_last", ("model", "cpu"), lambda: False) is False
    assert store.decide("channels_last", ("model", "cpu"), lambda: True) is False
    assert store.decide("channels_last", ("other", "cpu"), lambda: True) is True
    other_process = precision_module.VerdictStore(tmp_path / "verdicts.json")
    assert other_process.decide("channels_last", ("model", "cpu"), None) is False


def test_an_unwritable_cache_root_keeps_the_verdict_for_the_process(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    store = precision_module.VerdictStore(blocker / "verdicts.json")
    assert store.decide("precision", ("model",), lambda: "bf16") == "bf16"


def test_a_resume_computes_with_the_choices_its_run_made(toy_data, tmp_path, monkeypatch):
    from finetune.callbacks import Checkpoint

    torch.manual_seed(0)
    backbone = Backbone.from_torchvision("resnet18", 2, weights=None)
    config = TrainConfig(epochs=1, lr=1e-3, precision="fp32", channels_last="auto",
                         feature_cache="off")
    trainer = Trainer(backbone, build_strategy("full-unfreeze"), config,
                      callbacks=[Checkpoint(tmp_path / "run")])
    trainer.fit(toy_data.train_loader(), toy_data.val_loader())
    chosen = trainer.state.channels_last
    # the machine's store now says otherwise (deleted, re-probed on a busy machine)
    monkeypatch.setattr(precision_module, "_LAYOUTS", {})
    monkeypatch.setattr(precision_module, "resolve_channels_last",
                        lambda requested, *args, **kwargs: (not chosen) if requested == "auto"
                        else bool(requested))
    monkeypatch.setattr("finetune.train.trainer.resolve_channels_last",
                        precision_module.resolve_channels_last)
    resumed = Trainer(backbone, build_strategy("full-unfreeze"),
                      TrainConfig(epochs=2, lr=1e-3, precision="fp32", feature_cache="off"),
                      callbacks=[Checkpoint(tmp_path / "run")])
    resumed.fit(toy_data.train_loader(), toy_data.val_loader(), resume=tmp_path / "run" / "last.pt")
    assert resumed.state.channels_last == chosen
    pinned = Trainer(backbone, build_strategy("full-unfreeze"),
                     TrainConfig(epochs=3, lr=1e-3, precision="fp32", feature_cache="off",
                                 channels_last=not chosen),
                     callbacks=[Checkpoint(tmp_path / "run")])
    pinned.fit(toy_data.train_loader(), toy_data.val_loader(), resume=tmp_path / "run" / "last.pt")
    assert pinned.state.channels_last == (not chosen)  # a pinned setting still wins


def _cli_train(tree: Path, run: Path, cache: Path) -> dict:
    env = {**os.environ, "FINETUNE_CACHE": str(cache), "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "finetune", "train", "--data", str(tree), "--backbone", TINY,
         "--weights", "none", "--strategy", "full-unfreeze", "--epochs", "1",
         "--batch-size", "4", "--seed", "3", "--workers", "0", "--checkpoint-dir", str(run)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads((run / "run.json").read_text())


@pytest.mark.subprocess
def test_three_cli_runs_with_one_seed_agree_bit_for_bit(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "data", n_train=6, n_test=2, size=32)
    records = [_cli_train(tree, tmp_path / f"run{i}", tmp_path / "cache") for i in range(3)]
    states = [torch.load(tmp_path / f"run{i}" / "last.pt", weights_only=True)["model"]
              for i in range(3)]
    for other in states[1:]:
        assert all(torch.equal(states[0][k], other[k]) for k in states[0])
    chosen = records[0]["chosen"]
    assert chosen["precision"] in ("fp32", "bf16") and isinstance(chosen["channels_last"], bool)
    assert all(record["chosen"] == chosen for record in records)
    assert (tmp_path / "cache" / "verdicts.json").is_file()


def test_channels_last_can_be_pinned_on_the_command_line(tmp_path, capsys) -> None:
    tree = make_tree(tmp_path / "data", n_train=4, n_test=2, size=32)
    common = ["train", "--data", str(tree), "--backbone", TINY, "--weights", "none",
              "--epochs", "1", "--batch-size", "4", "--workers", "0", "--precision", "fp32"]
    for flag, expected in (("on", True), ("off", False)):
        run = tmp_path / f"run-{flag}"
        code, _, err = run_cli([*common, "--channels-last", flag, "--checkpoint-dir", str(run)],
                               capsys)
        assert code == 0, err
        assert json.loads((run / "run.json").read_text())["chosen"]["channels_last"] is expected
    code, _, err = run_cli([*common, "--channels-last", "maybe"], capsys)
    assert code == 2 and "expected auto, on or off, got 'maybe'" in err
