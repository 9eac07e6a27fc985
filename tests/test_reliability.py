"""Probes a hostile file or an unlucky user would run: each test here failed before its fix.

docs/reliability.md lists the promise each one backs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from finetune import Backbone, FreezeFraction, FreezeStrategy, LastLayerOnly, TrainConfig, Trainer
from finetune.errors import ArchitectureError
from finetune.model.zoo import build_backbone
from tests.conftest import FAST, TINY, make_tree
from tests.conftest import run_cli as run

HOSTILE = "import pathlib\npathlib.Path({marker!r}).write_text('ran')\ndef make(n):\n    pass\n"


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "data", classes=3, n_train=4, n_test=2, size=40)


def _train(tree: Path, runs: Path, capsys: pytest.CaptureFixture, *extra: str) -> str:
    code, out, err = run(["train", "--data", str(tree), "--backbone", TINY, "--batch-size", "4",
                          "--epochs", "1", "--checkpoint-dir", str(runs), *FAST, *extra], capsys)
    assert code == 0, err
    return out


# -- 1: a run folder is data, never code ----------------------------------------------------
def test_evaluate_never_imports_a_factory_named_in_run_json(tree, tmp_path, capsys, monkeypatch):
    runs = tmp_path / "runs"
    _train(tree, runs, capsys)
    code, _, err = run(["evaluate", "--checkpoint", str(runs), *FAST], capsys)
    assert code == 2 and "never imports code" in err and f"--backbone {TINY}" in err
    code, out, err = run(["evaluate", "--checkpoint", str(runs), "--backbone", TINY, *FAST],
                         capsys)
    assert code == 0 and "test set" in out, err  # named by the user: imported

    marker = tmp_path / "imported"
    (tmp_path / "hostile_factory.py").write_text(HOSTILE.format(marker=str(marker)))
    record = json.loads((runs / "run.json").read_text())
    (runs / "run.json").write_text(json.dumps({**record, "backbone": "hostile_factory:make"}))
    monkeypatch.chdir(tmp_path)  # the hostile module lies in the working directory
    code, _, err = run(["evaluate", "--checkpoint", str(runs), *FAST], capsys)
    assert code == 2 and "--backbone hostile_factory:make" in err
    assert not marker.exists()


def test_factories_are_not_imported_from_the_working_directory(tmp_path, monkeypatch):
    marker = tmp_path / "imported"
    (tmp_path / "hostile_factory.py").write_text(HOSTILE.format(marker=str(marker)))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ArchitectureError, match="PYTHONPATH"):
        build_backbone("hostile_factory:make", 3)
    assert not marker.exists() and str(tmp_path) not in sys.path
    with pytest.raises(ArchitectureError, match="import path"):
        build_backbone(TINY, 3, allow_import=False)


# -- 2: the on-disk activation cache under channels_last ------------------------------------
@pytest.mark.parametrize("strategy", [LastLayerOnly(), FreezeFraction(0.5)],
                         ids=["pooled", "4d-activations"])
def test_spill_to_disk_under_channels_last_trains_as_the_plain_loop(
    strategy: FreezeStrategy, tmp_path: Path
) -> None:
    def fit(**cache: object) -> Trainer:
        torch.manual_seed(0)
        backbone = Backbone.from_torchvision("resnet18", 3, weights=None)
        images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        train = DataLoader(TensorDataset(images, torch.arange(8) % 3), batch_size=4)
        config = TrainConfig(epochs=2, lr=1e-2, seed=0, precision="fp32",
                             channels_last=True, **cache)
        trainer = Trainer(backbone, strategy, config)
        trainer.fit(train)
        return trainer

    plain = fit(feature_cache="off")
    spilled = fit(feature_cache="on", cache_memory_gb=0,
                  activation_cache_dir=str(tmp_path))
    assert spilled.state.channels_last and spilled.state.cached_prefix is not None
    assert list(tmp_path.glob("*.bin")) and list(tmp_path.glob("*.json"))
    for (name, a), b in zip(plain.backbone.state_dict().items(),
                            spilled.backbone.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


# -- 3: images changed in place are not served stale activations ----------------------------
def test_swapped_images_are_not_served_their_old_activations(tmp_path: Path) -> None:
    from finetune import ImageFolderData
    from finetune.cache.plan import plan_cut
    from finetune.cache.store import ActivationCache

    root = make_tree(tmp_path / "data", classes=2, n_train=2, n_test=1, size=32)
    torch.manual_seed(0)
    backbone = Backbone.from_torchvision("resnet18", 2, weights=None)
    LastLayerOnly().apply(backbone)

    def fill() -> torch.Tensor:
        nonlocal paths
        data = ImageFolderData(root, preprocessing=backbone.preprocessing, image_size=32,
                               batch_size=4, val_split=0.0, num_workers=0, progress=False,
                               data_augmentation=False)
        paths = [path for path, _ in data.train_samples]
        cache = ActivationCache(backbone, plan_cut(backbone)[0], memory_budget=0,
                             directory=tmp_path / "cache")
        cache.fill(data.train_loader(), lambda prefix, x: prefix(x), torch.device("cpu"))
        return cache.features.clone()

    paths: list[Path] = []
    before = fill()
    a, b = root / "train/class0/img0.jpg", root / "train/class1/img0.jpg"
    a.rename(tmp_path / "swap.jpg")
    b.rename(a)
    (tmp_path / "swap.jpg").rename(b)  # same names, same sizes and mtimes, other pictures
    after = fill()
    a_index, b_index = paths.index(a), paths.index(b)
    assert not torch.allclose(before[a_index], before[b_index], atol=1e-3)  # they differ
    assert torch.allclose(after[a_index], before[b_index], atol=1e-5)
    assert torch.allclose(after[b_index], before[a_index], atol=1e-5)


# -- 5, 6: extraction is safe under concurrency and never deletes what it did not create ------
def _zip(path: Path, members: dict[str, bytes]) -> Path:
    import zipfile

    with zipfile.ZipFile(path, "w") as handle:
        for name, payload in members.items():
            handle.writestr(name, payload)
    return path


def test_concurrent_extractions_of_one_zip_leave_one_complete_tree(tmp_path, monkeypatch):
    import threading
    import time
    import zipfile

    from finetune.data import safe_extract

    members = {f"tree/train/c{i % 3}/{i}.txt": f"image {i}".encode() for i in range(12)}
    archive = _zip(tmp_path / "a.zip", members)
    extract = zipfile.ZipFile.extract

    def slow_extract(self, member, path=None, pwd=None):  # interleave the two extractions
        time.sleep(0.01)
        return extract(self, member, path, pwd)

    monkeypatch.setattr(zipfile.ZipFile, "extract", slow_extract)
    target, errors = tmp_path / "out", []

    def worker() -> None:
        try:
            safe_extract(archive, target)
        except Exception as error:  # collected: the test reports them
            errors.append(error)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert (target / ".extracted").is_file()
    found = {str(p.relative_to(target)): p.read_bytes() for p in target.rglob("*.txt")}
    assert found == members
    assert not list(target.glob(".staging-*"))


def test_extraction_never_replaces_what_the_archive_did_not_create(tmp_path):
    from finetune.data import safe_extract
    from finetune.errors import DataError

    root = tmp_path / "root"
    (root / "mywork").mkdir(parents=True)
    (root / "mywork" / "important.txt").write_text("keep me")
    archive = _zip(tmp_path / "a.zip", {"mywork/other.txt": b"x", "tree/train/a/1.txt": b"y"})
    with pytest.raises(DataError, match=r"would replace mywork, which the archive did not"):
        safe_extract(archive, root)
    assert (root / "mywork" / "important.txt").read_text() == "keep me"
    assert not (root / "tree").exists() and not (root / ".extracted").exists()


def test_an_extraction_killed_midway_completes_when_run_again(tmp_path, monkeypatch):
    import os

    from finetune.data import download, safe_extract

    archive = _zip(tmp_path / "a.zip", {"one/a.txt": b"1", "two/b.txt": b"2"})
    moves = []

    def dies_on_second_move(source, destination):
        if not Path(destination).name.startswith("."):  # an entry, not a marker file
            moves.append(destination)
        if len(moves) == 2:
            raise KeyboardInterrupt  # killed between the two moves
        os.rename(source, destination)

    monkeypatch.setattr(download.os, "replace", dies_on_second_move)
    with pytest.raises(KeyboardInterrupt):
        safe_extract(archive, tmp_path / "out")
    assert (tmp_path / "out" / "one").is_dir() and not (tmp_path / "out" / "two").exists()
    monkeypatch.undo()
    safe_extract(archive, tmp_path / "out")  # replaces its own half-moved entry, nothing else
    assert (tmp_path / "out" / "two" / "b.txt").read_bytes() == b"2"
    assert (tmp_path / "out" / ".extracted").is_file()


# -- 4: best.pt is never lost to a crash between the two writes -----------------------------
def _fit_checkpointed(folder: Path, epochs: int, resume: Path | None = None,
                      mode: str = "max", **kwargs: object) -> Trainer:
    from finetune.callbacks import Checkpoint
    from tests.conftest import make_tiny_backbone
    from tests.test_trainer import make_loader

    checkpoint = Checkpoint(folder, monitor="epoch", mode=mode, **kwargs)  # max: every epoch
    trainer = Trainer(make_tiny_backbone(), LastLayerOnly(), TrainConfig(
        epochs=epochs, lr=1e-2, seed=0, precision="fp32", device="cpu"), callbacks=[checkpoint])
    trainer.fit(make_loader(n=8), resume=resume)
    return trainer


def test_a_kill_between_the_best_and_last_writes_never_loses_best(tmp_path, monkeypatch):
    from finetune.callbacks import checkpoint as checkpoint_module
    from finetune.callbacks import load_checkpoint

    real_save, saves = checkpoint_module.save_checkpoint, []

    def killed_on_the_fourth_write(state, path):  # epoch 2's second write
        saves.append(path)
        if len(saves) == 4:
            raise KeyboardInterrupt
        return real_save(state, path)

    monkeypatch.setattr(checkpoint_module, "save_checkpoint", killed_on_the_fourth_write)
    with pytest.raises(KeyboardInterrupt):
        _fit_checkpointed(tmp_path, epochs=2)
    recorded = load_checkpoint(tmp_path / "last.pt")["callbacks"]["Checkpoint"]["best_epoch"]
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] >= recorded


def test_resume_rewrites_a_lost_best_and_removes_orphaned_temporaries(tmp_path):
    from finetune.callbacks import load_checkpoint

    _fit_checkpointed(tmp_path, epochs=1, mode="min")  # "epoch" min: only epoch 1 is best
    (tmp_path / "best.pt").unlink()
    (tmp_path / ".last.pt.k1ll3d.tmp").write_bytes(b"half a checkpoint")
    with pytest.warns(RuntimeWarning, match="best.pt is missing"):
        _fit_checkpointed(tmp_path, epochs=2, resume=tmp_path / "last.pt", mode="min")
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]


# -- 8: a folder holding another run is never overwritten by a new one -------------------------
def test_a_new_run_refuses_a_folder_holding_another(tmp_path):
    from finetune.callbacks import load_checkpoint
    from finetune.errors import CheckpointError

    _fit_checkpointed(tmp_path, epochs=2)
    with pytest.raises(CheckpointError, match=r"already holds last.pt and best.pt.*overwrite"):
        _fit_checkpointed(tmp_path, epochs=1)
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 1  # untouched
    _fit_checkpointed(tmp_path, epochs=1, overwrite=True)
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 0


def test_cli_train_refuses_a_folder_holding_another_run(tree, tmp_path, capsys):
    runs = tmp_path / "runs"
    _train(tree, runs, capsys)
    record = (runs / "run.json").read_text()
    code, _, err = run(["train", "--data", str(tree), "--backbone", TINY, "--epochs", "1",
                        "--lr", "0.5", "--checkpoint-dir", str(runs), *FAST], capsys)
    assert code == 2 and "--overwrite" in err and "CheckpointError" in err
    assert (runs / "run.json").read_text() == record
    _train(tree, runs, capsys, "--overwrite", "--lr", "0.5")
    assert json.loads((runs / "run.json").read_text())["cli"]["lr"] == 0.5


# -- 7: the same seed gives the same model, whatever ran before ------------------------------
def test_cli_train_with_one_seed_is_repeatable(tree, tmp_path, capsys):
    from finetune.callbacks import load_checkpoint

    states = []
    for name in ("a", "b"):
        torch.rand(7)  # whatever ran before in the process must not matter
        code, _, err = run(["train", "--data", str(tree), "--backbone", "resnet18", "--weights",
                            "none", "--image-size", "32", "--epochs", "1", "--batch-size", "4",
                            "--strategy", "last-layer", "--seed", "3", "--checkpoint-dir",
                            str(tmp_path / name), *FAST], capsys)
        assert code == 0, err
        states.append(load_checkpoint(tmp_path / name / "last.pt")["model"])
    for key, value in states[0].items():
        assert torch.equal(value, states[1][key]), key


def test_models_built_by_name_depend_on_the_seed_alone():
    from finetune.functional import pretrain_model

    first = pretrain_model(num_classes=3, backbone="lite0", seed=5).head.weight
    torch.rand(11)
    again = pretrain_model(num_classes=3, backbone="lite0", seed=5).head.weight
    other = pretrain_model(num_classes=3, backbone="lite0", seed=6).head.weight
    assert torch.equal(first, again) and not torch.equal(first, other)
    state = torch.random.get_rng_state()
    build_backbone("resnet18", 3, weights=None, seed=1)
    assert torch.equal(state, torch.random.get_rng_state())  # the caller's RNG is left alone


# -- 8: resume refuses other data and says when settings changed -------------------------------
def test_cli_resume_refuses_other_classes_and_leaves_the_run_alone(tree, tmp_path, capsys):
    runs = tmp_path / "runs"
    _train(tree, runs, capsys)
    before = {name: (runs / name).read_bytes() for name in ("last.pt", "run.json")}
    other = tmp_path / "other"
    for split in ("train", "val"):
        for index, folder in enumerate(sorted((tree / split).iterdir())):
            (other / split).mkdir(parents=True, exist_ok=True)
            folder.rename(other / split / f"kind{index}")  # same images, other class names
    code, _, err = run(["train", "--data", str(other), "--backbone", TINY, "--batch-size", "4",
                        "--epochs", "2", "--resume", str(runs / "last.pt"), *FAST], capsys)
    assert code == 2 and "trained on the classes ['class0'" in err and "kind0" in err
    assert {name: (runs / name).read_bytes() for name in before} == before


def test_resume_refuses_other_images_and_warns_about_changed_settings(tmp_path):
    from finetune import ImageFolderData
    from finetune.callbacks import Checkpoint
    from finetune.errors import CheckpointError
    from tests.conftest import make_tiny_backbone

    root = make_tree(tmp_path / "data", classes=3, n_train=6, n_test=1, size=32)

    def fit(val_split: float, lr: float, resume: Path | None = None) -> None:
        backbone = make_tiny_backbone()
        data = ImageFolderData(root, preprocessing=backbone.preprocessing, val_split=val_split,
                               batch_size=4, num_workers=0, progress=False)
        config = TrainConfig(epochs=2 if resume else 1, lr=lr, seed=0, precision="fp32")
        Trainer(backbone, LastLayerOnly(), config,
                callbacks=[Checkpoint(tmp_path / "run", monitor="train_loss", mode="min")]
                ).fit(data.train_loader(), resume=resume)

    fit(val_split=0.0, lr=1e-2)
    last = tmp_path / "run" / "last.pt"
    with pytest.raises(CheckpointError, match=r"trained on 18 other images than the 15"):
        fit(val_split=0.2, lr=1e-2, resume=last)
    with pytest.warns(RuntimeWarning, match=r"lr 0.1 \(was 0.01\)"):
        fit(val_split=0.0, lr=0.1, resume=last)


# -- 9: finetune compare checks its numbers and never shrinks or mixes results -----------------
@pytest.mark.parametrize("option, value", [
    ("--epochs", "0"), ("--lr", "-1"), ("--batch-size", "0"), ("--image-size", "0"),
    ("--train-per-class", "0"), ("--val-split", "0"), ("--val-split", "1.5"), ("--workers", "-1"),
    ("--seeds", "0"), ("--lr", "fast"),
])
def test_compare_refuses_out_of_range_numbers(tree, tmp_path, capsys, option, value):
    from benchmarks import compare
    from tests.test_compare import Factory, argv

    with pytest.raises(SystemExit) as exit_:
        compare.main([*argv(tree, tmp_path / "out"), option, value], backbone_factory=Factory())
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}: expected" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "results.json").exists()


def test_compare_never_shrinks_earlier_results(tree, tmp_path):
    from benchmarks import compare
    from tests.test_compare import Factory, argv, read_results

    output = tmp_path / "out"
    assert compare.main(argv(tree, output, "--strategies", "last-layer,bitfit"),
                        backbone_factory=Factory()) == 0
    before = (output / "results.json").read_text()
    failing = Factory(fail_on_call=2, error=RuntimeError("boom"))
    with pytest.raises(SystemExit, match=r"holds the results of an earlier comparison.*--resume"):
        compare.main(argv(tree, output, "--strategies", "last-layer"), backbone_factory=failing)
    assert (output / "results.json").read_text() == before
    assert compare.main(argv(tree, output, "--strategies", "last-layer,bitfit", "--resume"),
                        backbone_factory=failing) == 0  # both rows kept, nothing rerun
    assert len(read_results(output)["rows"]) == 2


def test_two_compares_never_write_one_output_at_once(tree, tmp_path):
    from benchmarks import compare
    from finetune.atomic import exclusive_lock
    from finetune.compare.run import LOCK_FILE
    from tests.test_compare import Factory, argv

    output = tmp_path / "out"
    with exclusive_lock(output / LOCK_FILE), pytest.raises(
            SystemExit, match=r"another finetune compare is writing to"):
        compare.main(argv(tree, output, "--strategies", "last-layer"),
                     backbone_factory=Factory())
    assert not (output / "results.json").exists()


# -- 10: downloads stop at the expected size; ~ expands; zip bombs are refused -----------------
def test_a_download_stops_once_it_exceeds_the_expected_size(tmp_path, monkeypatch):
    import contextlib

    from finetune.data import download
    from finetune.errors import DataError

    served = []

    class Endless:  # a server that never stops sending
        def read(self, size: int = -1) -> bytes:
            if len(served) >= 64:
                return b""
            served.append(size)
            return b"\0" * size

    @contextlib.contextmanager
    def endless(url, offset, timeout):
        yield Endless(), 0, None

    monkeypatch.setattr(download, "_open_remote", endless)
    with pytest.raises(DataError, match=r"sent more than the expected 1,000 bytes"):
        download.download_file("https://example.org/a.zip", tmp_path / "a.zip",
                               expected_size=1000, progress=False)
    assert len(served) == 1  # stopped after the first chunk, not after 64 MiB
    assert list(tmp_path.iterdir()) == []


def test_download_expands_the_home_folder(tmp_path, monkeypatch):
    from finetune.data import INaturalist12K
    from tests.test_data_download import build_archive

    archive = build_archive(tmp_path / "nature_12K.zip")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    folder = INaturalist12K.download("~/data", url=archive.as_uri(), progress=False)
    assert folder == tmp_path / "home" / "data" / "inaturalist_12K" and folder.is_dir()
    assert not (tmp_path / "~").exists()


def test_zip_bombs_are_refused_before_anything_is_written(tmp_path):
    import zipfile

    from finetune.data import safe_extract
    from finetune.errors import DataError

    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as handle, \
            handle.open("tree/train/a/zeros.jpg", "w") as member:
        for _ in range(80):
            member.write(bytes(1 << 20))  # 80 MiB of zeros: ~80 KB packed
    with pytest.raises(DataError, match="zip bomb"):
        safe_extract(bomb, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    small = _zip(tmp_path / "small.zip", {"tree/a.txt": b"x" * 100})
    with pytest.raises(DataError, match=r"limit 10 bytes"):
        safe_extract(small, tmp_path / "out", max_bytes=10)


# -- 11: hidden folders and __MACOSX inside class folders are skipped -----------------------
def test_hidden_folders_inside_class_folders_are_not_images(tmp_path):
    import shutil

    from finetune import ImageFolderData

    root = make_tree(tmp_path / "data", classes=2, n_train=2, n_test=1, size=16)
    image = root / "train" / "class0" / "img0.jpg"
    for junk in (".thumbnails/img0.jpg", "__MACOSX/img0.jpg", "sub/.cache/img0.jpg"):
        (root / "train" / "class0" / junk).parent.mkdir(parents=True)
        shutil.copy(image, root / "train" / "class0" / junk)
    shutil.copy(image, root / "train" / "class0" / "sub" / "kept.jpg")
    data = ImageFolderData(root, val_split=0.0, image_size=16, num_workers=0, progress=False)
    names = sorted(str(p.relative_to(root / "train")) for p, _ in data.train_samples)
    assert names == ["class0/img0.jpg", "class0/img1.jpg", "class0/sub/kept.jpg",
                     "class1/img0.jpg", "class1/img1.jpg"]


# -- 12: a class name the terminal cannot encode does not fail the run --------------------------
@pytest.mark.subprocess
def test_train_and_evaluate_survive_an_ascii_stdout(tmp_path):
    import os
    import subprocess

    root = make_tree(tmp_path / "data", classes=2, n_train=2, n_test=1, size=16)
    for split in ("train", "val"):
        (root / split / "class1").rename(root / split / "café")
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONIOENCODING": "ascii", "PYTHONPATH": str(repo)}
    for command in (["train", "--data", str(root), "--backbone", TINY, "--epochs", "1",
                     "--batch-size", "2", "--checkpoint-dir", str(tmp_path / "run"), *FAST],
                    ["evaluate", "--checkpoint", str(tmp_path / "run"), "--backbone", TINY,
                     *FAST]):
        result = subprocess.run([sys.executable, "-m", "finetune", *command], cwd=repo, env=env,
                                capture_output=True, timeout=300)
        assert result.returncode == 0, result.stderr.decode(errors="replace")[-2000:]
        assert b"caf\\xe9" in result.stdout  # the table's row, escaped


# -- 13: clear device and weights errors; credentials never shown -------------------------------
def test_a_missing_cuda_device_is_a_one_line_error(tree, tmp_path, capsys):
    code, _, err = run(["train", "--data", str(tree), "--backbone", TINY, "--epochs", "1",
                        "--device", f"cuda:{torch.cuda.device_count()}", "--workers", "0"],
                       capsys)
    assert code == 2 and "DeviceError" in err and "--device cpu" in err
    assert "Traceback" not in err


def test_a_corrupt_hub_cache_file_gets_the_local_files_message(tmp_path, monkeypatch):
    from finetune.errors import WeightsUnavailableError
    from finetune.model.weights import hub_checkpoint_path

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    import torchvision

    cached = hub_checkpoint_path(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url)
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"<html>captive portal</html>")
    with pytest.raises(WeightsUnavailableError, match=r"cannot read weights file .*delete it"):
        Backbone.from_torchvision("resnet18", 3, weights="IMAGENET1K_V1")
    local = tmp_path / "mine.pth"
    local.write_bytes(b"garbage")
    with pytest.raises(WeightsUnavailableError, match=r"cannot read weights file .*mine\.pth"):
        Backbone.from_torchvision("resnet18", 3, weights=str(local))


def test_credentials_in_urls_are_redacted_from_messages(tmp_path, monkeypatch):
    from finetune.data import download_file
    from finetune.errors import DataError, WeightsUnavailableError, redact

    assert redact("https://ann:hunter2@host/a.zip?dl=1&X-Amz-Signature=abc123&token=t0k") == (
        "https://***@host/a.zip?dl=1&X-Amz-Signature=***&token=***")
    with pytest.raises(DataError) as caught:
        download_file("http://ann:hunter2@127.0.0.1:9/a.zip?sig=s3cr3t", tmp_path / "a.zip",
                      progress=False, timeout=2)
    assert "hunter2" not in str(caught.value) and "s3cr3t" not in str(caught.value)
    assert "http://***@127.0.0.1:9/a.zip?sig=***" in str(caught.value)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("FINETUNE_WEIGHTS_MIRROR", "http://bob:pa55@127.0.0.1:9/mirror")
    with pytest.raises(WeightsUnavailableError) as caught:
        Backbone.from_torchvision("resnet18", 3)
    assert "pa55" not in str(caught.value) and "http://***@127.0.0.1:9/mirror" in str(caught.value)
