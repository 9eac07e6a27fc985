"""Reliability round 3, items 3-14: a killed comparison worker, a full disk, outputs in the
wrong place, refused checkpoints, absurd numbers, half-written or edited run folders, resumes
that would do nothing, and file modes — each with one clear message and nothing lost."""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import warnings
from pathlib import Path

import pytest
import torch

import finetune.compare as compare
from finetune import LastLayerOnly, TrainConfig, Trainer
from finetune.atomic import atomic_write, current_umask
from finetune.cache.store import reserve_disk
from finetune.callbacks import Checkpoint
from finetune.errors import CheckpointError, DiskFullError
from finetune.train.checkpoint import load_checkpoint
from tests.conftest import FAST, TINY, make_loader, make_tiny_backbone, make_tree, run_cli
from tests.test_compare import argv, read_results


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tree(tmp_path_factory.mktemp("data"), classes=3, n_train=4, n_test=2, size=32)


def _train(tree: Path, run: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(tree), "--backbone", TINY, "--weights", "none",
            "--epochs", "1", "--batch-size", "4", "--checkpoint-dir", str(run), *FAST, *extra]


# -- 3: a killed worker fails its own run only ---------------------------------------------------
class KillingFactory:
    """A tiny backbone; the from-scratch run's worker SIGKILLs itself (as the OOM killer
    would) the first `times` times it builds one."""

    def __init__(self, folder: Path, times: int) -> None:
        self.folder, self.times = folder, times

    def __call__(self, name: str, num_classes: int, pretrained: bool):
        if not pretrained:
            deaths = len(list(self.folder.iterdir()))
            if deaths < self.times:
                (self.folder / f"death{deaths}").touch()
                os.kill(os.getpid(), signal.SIGKILL)
        return make_tiny_backbone(num_classes=num_classes)


@pytest.mark.subprocess
@pytest.mark.parametrize(("times", "from_scratch_finishes"), [(1, True), (9, False)])
def test_a_killed_worker_is_retried_once_and_never_fails_the_others(
        tree, tmp_path, capsys, times, from_scratch_finishes) -> None:
    deaths = tmp_path / "deaths"
    deaths.mkdir()
    args = argv(tree, tmp_path / "out", "--strategies", "last-layer,from-scratch,full-unfreeze")
    args[args.index("--jobs") + 1] = "2"
    code = compare.main(args, backbone_factory=KillingFactory(deaths, times))
    results = read_results(tmp_path / "out")
    strategies = [r["strategy"] for r in results["rows"]]
    assert {"last-layer", "full-unfreeze"} <= set(strategies)
    if from_scratch_finishes:
        assert code == 0 and "from-scratch" in strategies and len(list(deaths.iterdir())) == 1
    else:
        assert code == 1 and "from-scratch" not in strategies
        assert len(list(deaths.iterdir())) == 2  # tried, and tried once more on its own
        assert [f["strategy"] for f in results["failed"]] == ["from-scratch"]
        assert "also when run alone" in results["failed"][0]["error"]
        assert "also when run alone" in capsys.readouterr().err


# -- 4: a full disk ------------------------------------------------------------------------------
def test_a_full_disk_is_one_clear_error_and_leaves_no_partial_file(tmp_path: Path) -> None:
    target = tmp_path / "last.pt"
    target.write_bytes(b"the previous checkpoint")

    def write(file) -> None:
        file.write(b"x" * (3 << 20))
        file.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DiskFullError) as caught:
        atomic_write(target, write)
    message = str(caught.value)
    assert str(target) in message and "3.0 MiB" in message and "free" in message
    assert "FINETUNE_CACHE" in message and "--checkpoint-dir" in message
    assert target.read_bytes() == b"the previous checkpoint"
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary left


def test_a_full_disk_during_a_checkpoint_stops_training_with_one_line(tree, tmp_path, capsys,
                                                                      monkeypatch) -> None:
    def full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter "
                           "failed writing file data/0: file write failed") from OSError(
            errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    code, _, err = run_cli(_train(tree, tmp_path / "run"), capsys)
    assert code == 2 and "DiskFullError" in err and "no space left to write" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not list((tmp_path / "run").glob("*.pt")) and not list((tmp_path / "run").glob(".*"))


def test_a_spilled_activation_cache_is_refused_up_front_on_a_full_disk(tmp_path, monkeypatch):
    def no_room(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_room)
    with pytest.raises(DiskFullError, match=r"activations\.bin: it needed more than 64\.0 MiB"):
        reserve_disk(tmp_path / "activations.bin", 64 << 20)
    assert not (tmp_path / "activations.bin").exists()


# -- 5: compare --output naming a file -----------------------------------------------------------
def test_compare_output_naming_a_file_is_refused_and_the_file_kept(tree, tmp_path, capsys):
    existing = tmp_path / "notes.txt"
    existing.write_text("mine")
    with pytest.raises(SystemExit) as exit_:
        compare.main(argv(tree, existing))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"--output {existing} is a file, not a folder" in err and "Traceback" not in err
    assert existing.read_text() == "mine"


# -- 6: a refused checkpoint never suggests running pickled code ---------------------------------
class Payload:
    def __reduce__(self):
        return (print, ("this would have run",))


def test_a_refused_checkpoint_says_why_and_never_advises_weights_only_false(tmp_path):
    path = tmp_path / "last.pt"
    torch.save({"format": 1, "payload": Payload()}, path)
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(path)
    message = str(caught.value)
    assert str(path) in message and "could run code" in message
    assert "weights_only=False" not in message and "weights_only" not in message.lower()


# -- 7: absurd learning rates --------------------------------------------------------------------
@pytest.mark.parametrize("value", [float("inf"), float("nan"), -1.0, 0.0])
def test_a_learning_rate_that_is_not_a_finite_positive_number_is_refused(value: float) -> None:
    with pytest.raises(ValueError, match="lr must be a finite number > 0"):
        TrainConfig(lr=value)


def test_an_absurd_learning_rate_is_warned_about() -> None:
    with pytest.warns(RuntimeWarning, match="far above any learning rate that trains"):
        TrainConfig(lr=1e30)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TrainConfig(lr=0.5)  # high, but SGD uses such rates


# -- 8: a run killed between best.pt and last.pt in epoch 1 --------------------------------------
def test_a_folder_with_best_but_no_last_says_what_is_there_and_how_to_go_on(tmp_path):
    folder = tmp_path / "run"
    Trainer(make_tiny_backbone(), LastLayerOnly(), TrainConfig(epochs=1, precision="fp32"),
            callbacks=[Checkpoint(folder, monitor="train_loss", mode="min")]).fit(make_loader())
    (folder / "last.pt").unlink()  # killed after best.pt, before last.pt
    again = Trainer(make_tiny_backbone(), LastLayerOnly(),
                    TrainConfig(epochs=2, precision="fp32"),
                    callbacks=[Checkpoint(folder, monitor="train_loss", mode="min")])
    with pytest.raises(CheckpointError, match=r"holds best\.pt but no last\.pt") as caught:
        again.fit(make_loader())
    assert "resume from it" in str(caught.value) and "overwrite" in str(caught.value)
    again.fit(make_loader(), resume=folder / "best.pt")  # the advice works
    assert (folder / "last.pt").is_file()


# -- 9: an edited run.json -----------------------------------------------------------------------
@pytest.mark.parametrize(("edit", "expected"), [
    (lambda r: r.pop("classes"), "lacks the field 'classes'"),
    (lambda r: r.update(val_split="0.2"), "field 'val_split' should be a number in [0, 1), "
                                          "found '0.2'"),
    (lambda r: r.update(num_classes=-3), "field 'num_classes' should be a whole number of "
                                         "classes ≥ 1, found -3"),
])
def test_an_edited_run_file_names_the_field_what_was_expected_and_what_was_found(
        tree, tmp_path, capsys, edit, expected) -> None:
    run = tmp_path / "run"
    assert run_cli(_train(tree, run), capsys)[0] == 0
    record = json.loads((run / "run.json").read_text())
    edit(record)
    (run / "run.json").write_text(json.dumps(record))
    code, _, err = run_cli(["evaluate", "--checkpoint", str(run), "--backbone", TINY,
                            "--workers", "0"], capsys)
    assert code == 2 and expected in err and "Traceback" not in err, err


# -- 10: a resume with no epochs left ------------------------------------------------------------
def test_a_resume_with_no_epochs_left_is_refused_and_the_folder_left_alone(tree, tmp_path,
                                                                           capsys) -> None:
    run = tmp_path / "run"
    assert run_cli(_train(tree, run, "--epochs", "2"), capsys)[0] == 0
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    code, _, err = run_cli(_train(tree, run, "--epochs", "1", "--resume", str(run)), capsys)
    assert code == 2 and "has already trained 2 epochs" in err and "--epochs 3" in err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


# -- 11: an image size that cannot fit -----------------------------------------------------------
def test_an_image_size_that_cannot_fit_is_refused_before_anything_loads(tmp_path, capsys):
    code, _, err = run_cli(["train", "--data", str(tmp_path / "nowhere"), "--image-size",
                            "100000", *FAST], capsys)
    assert code == 2 and "--image-size 100000 with --batch-size 32 needs at least" in err
    assert "GiB" in err and "does not exist" not in err  # refused before the data was read


# -- 12: outputs follow the umask ----------------------------------------------------------------
@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_outputs_follow_the_umask(tree, tmp_path, capsys, mask) -> None:
    previous = os.umask(mask)
    try:
        assert current_umask() == mask
        assert run_cli(_train(tree, tmp_path / "run"), capsys)[0] == 0
    finally:
        os.umask(previous)
    for name in ("run.json", "last.pt", "best.pt"):
        assert stat.S_IMODE((tmp_path / "run" / name).stat().st_mode) == 0o666 & ~mask, name


# -- 13: resume from the run folder, with the run's own settings ---------------------------------
def test_resume_takes_the_run_folder_and_the_runs_own_settings(tree, tmp_path, capsys):
    run = tmp_path / "run"
    assert run_cli(_train(tree, run, "--strategy", "last-layer", "--seed", "3",
                          "--val-split", "0.25"), capsys)[0] == 0
    first = json.loads((run / "run.json").read_text())
    code, _, err = run_cli(["train", "--resume", str(run), "--epochs", "2"], capsys)
    assert code == 2 and "never imports code named in a data file" in err  # TINY is code
    code, _, err = run_cli(["train", "--resume", str(run), "--backbone", TINY, "--epochs", "2",
                            *FAST], capsys)
    assert code == 0, err
    again = json.loads((run / "run.json").read_text())
    for field in ("strategy", "seed", "val_split", "data", "classes"):
        assert again[field] == first[field], field
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 1


def test_the_users_probe_script_runs_its_probes(tmp_path: Path) -> None:
    from benchmarks import reliability_probes

    held, seen = reliability_probes.rewritten_image_is_not_stale(tmp_path, tmp_path)
    assert held and "content key changed" in seen
    assert set(reliability_probes.PROBES) >= {"a seed fixes the result",
                                              "outputs follow the umask"}
