"""`finetune train | evaluate | strategies`: a train → evaluate round trip on a generated tree,
resume, and argparse-style errors (exit code 2, message on stderr, no traceback)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from finetune.callbacks import load_checkpoint
from finetune.cli.options import strategy_argument
from finetune.data import ImageFolderData
from finetune.model.backbone import Backbone
from finetune.strategies import PRESETS, STRATEGIES, FreezeFraction, GradualUnfreeze
from tests.conftest import FAST, TINY, make_tree
from tests.conftest import run_cli as run

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["class0", "class1", "class2"]
ROW = re.compile(r"^(class\d)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+(\d+)$", re.M)
@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "data", classes=3, n_train=4, n_test=2, size=40)


def test_train_then_evaluate_round_trip(tree, tmp_path, capsys):
    runs = tmp_path / "runs"
    code, out, err = run(["train", "--data", str(tree), "--backbone", "lite0", "--image-size",
                          "32", "--epochs", "1", "--batch-size", "8", "--val-split", "0.25",
                          "--strategy", "freeze-fraction:fraction=0.8,count=tensors",
                          "--checkpoint-dir", str(runs), *FAST], capsys)
    assert code == 0, err
    assert "FreezeFraction(train_bn=False, frozen_eval=True, fraction=0.8, count='tensors')" in out
    assert "parameters train" in out  # the FreezeReport
    assert re.search(r"epoch 1/1 · train loss [\d.]+ acc [\d.]+ · val loss", out)
    assert "test set" in out and {m[0] for m in ROW.findall(out)} == set(CLASSES)
    assert {p.name for p in runs.iterdir()} == {"best.pt", "last.pt", "run.json", "MODEL_CARD.md"}
    record = json.loads((runs / "run.json").read_text())
    assert record["backbone"] == "lite0" and record["classes"] == CLASSES
    assert record["preprocessing"]["crop_size"] == 32

    report_file = tmp_path / "report.json"
    code, out, err = run(["evaluate", "--checkpoint", str(runs), "--json", str(report_file),
                          *FAST], capsys)
    assert code == 0, err
    rows = {name: float(acc) for name, acc, *_ in ROW.findall(out)}
    assert list(rows) == CLASSES

    # the same numbers, computed directly from best.pt on the test folder
    model = Backbone.efficientnet_lite0(3, pretrained=False)
    model.model.load_state_dict(load_checkpoint(runs / "best.pt")["model"])
    model.eval()
    data = ImageFolderData(tree, preprocessing=model.preprocessing, image_size=32, num_workers=0,
                           progress=False)
    with torch.no_grad():
        pairs = [(model(x).argmax(1), y) for x, y in data.test_loader()]
    predicted, labels = torch.cat([p for p, _ in pairs]), torch.cat([y for _, y in pairs])
    accuracy = (predicted == labels).float().mean().item()
    assert f"accuracy {accuracy:.4f} on 6 images" in out
    saved = json.loads(report_file.read_text())
    assert saved["accuracy"] == pytest.approx(accuracy)
    for c, name in enumerate(CLASSES):
        expected = (predicted[labels == c] == c).float().mean().item()
        assert rows[name] == pytest.approx(expected, abs=5e-4)
        assert saved["per_class"][name]["accuracy"] == pytest.approx(expected)


def test_resume_continues_and_wandb_writes_offline(tree, tmp_path, capsys, offline_wandb):
    runs = tmp_path / "runs"
    common = ["--data", str(tree), "--backbone", TINY, "--batch-size", "4",
              "--strategy", "gradual-unfreeze:every=1", "--lr", "0.01", *FAST]
    code, out, err = run(["train", *common, "--epochs", "1", "--checkpoint-dir", str(runs),
                          "--wandb-project", "cli-test"], capsys)
    assert code == 0, err
    assert list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
    assert load_checkpoint(runs / "last.pt")["epoch"] == 0
    record = (runs / "run.json").read_text()

    mismatched = [a if a != "gradual-unfreeze:every=1" else "last-layer" for a in common]
    code, _, err = run(["train", *mismatched, "--epochs", "2", "--resume",
                        str(runs / "last.pt")], capsys)
    assert code == 2 and "CheckpointError" in err and "resume with the same strategy" in err
    assert (runs / "run.json").read_text() == record  # a refused resume leaves it alone

    code, out, err = run(["train", *common, "--epochs", "3", "--resume", str(runs / "last.pt")],
                         capsys)
    assert code == 0, err
    assert "epoch 1/3" not in out and "epoch 2/3 ·" in out and "epoch 3/3 ·" in out
    assert re.search(r"epoch 2: .* groups training: block2, head", out)  # schedule moved on
    state = load_checkpoint(runs / "last.pt")  # written beside the checkpoint resumed
    assert state["epoch"] == 2 and len(state["history"]["records"]) == 3


def test_strategies_lists_the_registry_and_presets_one_line_each(capsys):
    code, out, _ = run(["strategies"], capsys)
    lines = out.strip().splitlines()
    names = {**{name: cls.__name__ for name, cls in STRATEGIES.items()},
             **{name: STRATEGIES[base].__name__ for name, (base, _) in PRESETS.items()}}
    assert code == 0 and len(lines) == len(names)
    for line, (name, class_name) in zip(lines, sorted(names.items()), strict=True):
        assert line.split()[:2] == [name, class_name]
    assert "Train only the new head" in out
    assert re.search(r"^freeze-80 +FreezeFraction +preset: freeze-fraction with fraction=0.8$",
                     out, re.MULTILINE)


def test_strategy_options_are_parsed_and_validated():
    assert strategy_argument("freeze-fraction:fraction=0.5,count=numel") == FreezeFraction(
        fraction=0.5, count="numel")
    assert strategy_argument("gradual-unfreeze:at=2+4,depth=none") == GradualUnfreeze(at=(2, 4))
    assert strategy_argument("freeze-80:count=numel") == FreezeFraction(0.8, count="numel")


@pytest.mark.parametrize("command", [[], ["train"], ["evaluate"], ["strategies"]])
def test_every_command_has_help(command, capsys):
    code, out, _ = run([*command, "--help"], capsys)
    assert code == 0 and out.startswith(f"usage: finetune {' '.join(command)}".rstrip())


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--strategy", "nope"], "unknown strategy 'nope'; registered: bitfit, "),
        (["train", "--strategy", "freeze-fraction:fraction=2"],
         "cannot build strategy 'freeze-fraction:fraction=2': fraction must be between 0 and 1"),
        (["train", "--strategy", "freeze-fraction:oops"],
         "bad option 'oops' in 'freeze-fraction:oops'; write key=value with a key from "
         "train_bn, frozen_eval, fraction, count"),
        (["train", "--strategy", "last-layer:colour=red"],
         "bad option 'colour=red' in 'last-layer:colour=red'; write key=value with a key from "
         "train_bn, frozen_eval"),
        (["train", "--epochs", "0"], "expected a positive integer, got 0"),
        (["train", "--val-split", "1.5"], "expected a number in [0, 1), got 1.5"),
        (["train", "--lr", "-1"], "expected a finite number > 0"),
        (["train", "--lr", "inf"], "expected a finite number > 0, got inf"),
        (["train", "--lr", "nan"], "expected a finite number > 0, got nan"),
        (["train", "--backbone", "resnet51"], "unknown backbone 'resnet51'"),
        (["train", "--device", "gpu"], "device must be 'auto', 'cpu'"),
        (["train", "--precision", "fp8"], "invalid choice: 'fp8'"),
        (["train", "--schedule", "steps"], "invalid choice: 'steps'"),
        (["train", "--warmup", "1.5"], "expected optimizer steps (an integer >= 0) or a share"),
        (["train", "--accumulate", "0"], "expected a positive integer, got 0"),
        (["train", "--label-smoothing", "1"], "expected a number in [0, 1), got 1.0"),
        (["evaluate"], "the following arguments are required: --checkpoint"),
        (["fly"], "invalid choice: 'fly'"),
        ([], "the following arguments are required: COMMAND"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(argv, message, capsys):
    code, _, err = run(argv, capsys)
    assert code == 2 and message in err and "Traceback" not in err
    assert err.startswith("usage: finetune")


def test_library_errors_become_messages_not_tracebacks(tree, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("FINETUNE_DATA", raising=False)
    cases = [
        (["train"], "DataError", "or set $FINETUNE_DATA"),
        (["train", "--data", str(tmp_path / "missing")], "DataError", "does not exist"),
        (["train", "--data", str(tree), "--backbone", "resnet18", "--weights",
          str(tmp_path / "nothing.pth")], "WeightsUnavailableError", "does not exist"),
        (["train", "--data", str(tree), "--backbone", "lite0", "--weights", "IMAGENET1K_V1"],
         "WeightsUnavailableError", "takes weights DEFAULT"),
        (["evaluate", "--checkpoint", str(tmp_path / "none.pt")], "CheckpointError",
         "no checkpoint at"),
        (["evaluate", "--checkpoint", str(tmp_path)], "CheckpointError",
         "neither best.pt nor last.pt"),
    ]
    for argv, kind, message in cases:
        code, _, err = run(argv, capsys)
        assert code == 2, argv
        assert message in err and kind in err and "Traceback" not in err, err
        # the arguments parsed: one line saying what failed, no usage block
        assert err.startswith(f"finetune {argv[0]}: error: ") and "usage:" not in err, err
        assert len(err.strip().splitlines()) == 1, err


@pytest.mark.subprocess
def test_python_dash_m_finetune_reports_errors_with_exit_code_2():
    result = subprocess.run([sys.executable, "-m", "finetune", "train", "--strategy", "nope"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "unknown strategy 'nope'" in result.stderr and "Traceback" not in result.stderr


def test_lr_auto_chooses_on_validation_then_trains_and_a_resume_keeps_its_lr(
        tree, tmp_path, capsys):
    runs = tmp_path / "runs"
    common = ["--data", str(tree), "--backbone", TINY, "--batch-size", "4",
              "--strategy", "last-layer", *FAST]
    code, out, err = run(["train", *common, "--epochs", "1", "--lr", "auto", "--lr-grid",
                          "1e-3,1e-2", "--select", "accuracy", "--checkpoint-dir", str(runs)],
                         capsys)
    assert code == 0, err
    assert "--lr auto: trying 0.001, 0.01 on the validation split" in out
    record = json.loads((runs / "run.json").read_text())
    chosen = record["tuning"]["chosen"]
    assert f"lr {chosen:g}, chosen on validation by accuracy" in out
    assert record["tuning"]["select"] == "accuracy"
    assert {c["lr"] for c in record["tuning"]["candidates"]} >= {1e-3, 1e-2}
    state = load_checkpoint(runs / "last.pt")
    assert state["config"]["lr"] == chosen  # the run itself trained at the chosen lr
    code, out, err = run(["train", *common, "--epochs", "2", "--resume", str(runs)], capsys)
    assert code == 0, err
    assert load_checkpoint(runs / "last.pt")["config"]["lr"] == chosen
    code, _, err = run(["train", *common, "--lr", "auto", "--val-split", "0"], capsys)
    assert code == 2 and "give --val-split above 0" in err
    code, _, err = run(["train", *common, "--select", "loss"], capsys)
    assert code == 2 and "--select is how --lr auto chooses" in err
    code, out, err = run(["train", *common, "--lr", "auto", "--checkpoint-dir", str(runs)],
                         capsys)
    assert code == 2 and "already holds" in err and "--lr auto: trying" not in out


def test_train_spills_activations_over_the_budget_to_the_folder_given(tree, tmp_path, capsys):
    spill = tmp_path / "spill"
    code, _, err = run(["train", "--data", str(tree), "--backbone", TINY, "--strategy",
                          "last-layer", "--epochs", "1", "--batch-size", "4",
                          "--cache-memory-gb", "0", "--activation-cache-dir", str(spill),
                          "--checkpoint-dir", str(tmp_path / "run"), *FAST], capsys)
    assert code == 0, err
    files = list(spill.glob("*.bin"))
    assert len(files) == 2 and all(f.stat().st_size > 0 for f in files)  # train and val
