"""The deployment surfaces under bad input (predict, export, load, resume, lr-find, the model
card): each promise of docs/reliability.md's fourth round, on a tiny run trained once."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import finetune
from finetune.data.preprocessing import Preprocessing
from finetune.deploy.inference import Classifier, find_images, load_run
from finetune.deploy.model_card import markdown_text
from finetune.errors import CheckpointError
from finetune.runtime.precision import VerdictStore
from finetune.train.checkpoint import load_checkpoint
from tests.conftest import FAST, TINY, make_tiny_backbone, make_tree, run_cli

TRAINED_SIZE = 20  # the run trains at 20 px; the tiny backbone's own default is 32


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny run at 20 px, one epoch at lr 3e-3, its folder and its data tree."""
    from finetune.cli import main

    base = tmp_path_factory.mktemp("round4")
    tree = make_tree(base / "data", classes=3, n_train=6, n_test=2, size=28)
    folder = base / "run"
    code = main(["train", "--data", str(tree), "--backbone", TINY, "--image-size",
                 str(TRAINED_SIZE), "--epochs", "1", "--batch-size", "6", "--lr", "3e-3",
                 "--strategy", "last-layer", "--checkpoint-dir", str(folder), *FAST])
    assert code == 0
    return {"tree": tree, "run": folder, "base": base}


def classifier(size: int = 24) -> Classifier:
    return Classifier(make_tiny_backbone(), ["a", "b", "c"],
                      Preprocessing(resize_size=size, crop_size=size), device="cpu")


# -- 1: a PIL image is prepared as its file is -----------------------------------------------
def write_hostile_images(folder: Path) -> list[Path]:
    """A transparent PNG, a 16-bit grayscale PNG and a JPEG whose EXIF says "rotate"."""
    folder.mkdir(parents=True, exist_ok=True)
    rgba = Image.new("RGBA", (30, 24), (0, 0, 0, 0))
    for x in range(15):
        for y in range(24):
            rgba.putpixel((x, y), (200, 40, 40, 255))
    rgba.save(folder / "transparent.png")
    ramp = (np.arange(30 * 24, dtype=np.uint16).reshape(24, 30) * 90)
    Image.fromarray(ramp).save(folder / "deep.png")  # 16-bit ("I;16")
    photo = Image.new("RGB", (36, 20), (20, 120, 220))
    for x in range(12):
        photo.putpixel((x, 3), (255, 255, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    photo.save(folder / "rotated.jpg", exif=exif)
    return [folder / "transparent.png", folder / "deep.png", folder / "rotated.jpg"]


def test_a_pil_image_is_prepared_exactly_as_its_file(tmp_path: Path) -> None:
    model = classifier()
    for path in write_hostile_images(tmp_path):
        with Image.open(path) as opened:
            from_pil = model.preprocess(opened)
            naive = model.transform(opened.convert("RGB"))
        assert torch.equal(model.preprocess(path), from_pil), path.name
        assert not torch.equal(from_pil, naive), path.name  # the old route differed
        assert model.predict([path]) == model.predict([Image.open(path)])


# -- 2: a checkpoint alone keeps its preprocessing ------------------------------------------------
def test_a_checkpoint_without_its_run_file_predicts_at_the_size_it_trained_at(
        run, tmp_path, capsys) -> None:
    alone = tmp_path / "copied.pt"
    shutil.copy(run["run"] / "best.pt", alone)
    assert load_run(alone, TINY).preprocessing.crop_size == TRAINED_SIZE
    assert load_run(run["run"], TINY).preprocessing == load_run(alone, TINY).preprocessing
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        finetune.load(alone, backbone=TINY)  # nothing assumed: nothing said
    assert not [w for w in caught if "preprocessing" in str(w.message)]
    # a checkpoint from before checkpoints carried it: said, by load, evaluate and export
    older = tmp_path / "older.pt"
    state = load_checkpoint(alone)
    del state["preprocessing"]
    torch.save(state, older)
    with pytest.warns(UserWarning, match=r"older.pt records no preprocessing .* run.json"):
        finetune.load(older, backbone=TINY)
    code, _, err = run_cli(["export", str(older), "--backbone", TINY, "--format",
                            "safetensors", "--output", str(tmp_path / "o.safetensors")], capsys)
    assert code == 0 and "records no preprocessing" in err and "embeds" in err


# -- 3: a resume keeps the run's lr, and how it was chosen -----------------------------------------
def test_a_resume_without_lr_trains_at_the_runs_own_lr(run, tmp_path, capsys) -> None:
    folder = tmp_path / "run"
    shutil.copytree(run["run"], folder)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, _, err = run_cli(["train", "--resume", str(folder), "--backbone", TINY,
                                "--epochs", "2", *FAST], capsys)
    assert code == 0, err
    assert load_checkpoint(folder / "last.pt")["config"]["lr"] == 3e-3
    assert not [w for w in caught if "other settings" in str(w.message)]  # lr unchanged


def test_an_lr_auto_run_keeps_its_lr_and_its_tuning_record_over_two_resumes(
        run, tmp_path, capsys) -> None:
    folder = tmp_path / "auto"
    common = ["train", "--data", str(run["tree"]), "--backbone", TINY, "--image-size",
              str(TRAINED_SIZE), "--batch-size", "6", "--strategy", "last-layer", *FAST]
    code, _, err = run_cli([*common, "--epochs", "1", "--lr", "auto", "--lr-grid",
                            "1e-3,1e-2", "--checkpoint-dir", str(folder)], capsys)
    assert code == 0, err
    chosen = json.loads((folder / "run.json").read_text())["tuning"]["chosen"]
    for epochs in ("2", "3"):
        code, _, err = run_cli(["train", "--resume", str(folder), "--backbone", TINY,
                                "--epochs", epochs, *FAST], capsys)
        assert code == 0, err
        record = json.loads((folder / "run.json").read_text())
        assert record["tuning"]["chosen"] == chosen
        assert load_checkpoint(folder / "last.pt")["config"]["lr"] == chosen
    assert "(chosen on the validation split)" in (folder / "MODEL_CARD.md").read_text()


def test_an_edited_run_file_flag_names_the_field(run, tmp_path, capsys) -> None:
    folder = tmp_path / "edited"
    shutil.copytree(run["run"], folder)
    record = json.loads((folder / "run.json").read_text())
    record["cli"]["batch_size"] = "eight"
    (folder / "run.json").write_text(json.dumps(record))
    code, _, err = run_cli(["train", "--resume", str(folder), "--backbone", TINY, "--epochs",
                            "2", *FAST], capsys)
    assert code == 2 and "cli.batch_size holds 'eight'" in err and "--batch-size" in err
    record["cli"]["batch_size"], record["preprocessing"]["crop_size"] = 6, 100000
    (folder / "run.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"run.json: preprocessing 'crop_size' must be <= 4096"):
        load_run(folder, TINY)  # refused before a 100000 px image is allocated
    record["preprocessing"]["crop_size"] = "20"
    (folder / "run.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"run.json: preprocessing 'crop_size' must be <class"):
        finetune.load(folder, backbone=TINY)


# -- 5, 6: files that are not checkpoints say what they are --------------------------------------
def test_files_that_are_not_checkpoints_are_named_for_what_they_are(run, tmp_path, capsys):
    script = tmp_path / "model.pt"
    code, _, err = run_cli(["export", str(run["run"]), "--backbone", TINY, "--format",
                            "torchscript", "--output", str(script)], capsys)
    assert code == 0, err
    photo = tmp_path / "photo.jpg"
    Image.new("RGB", (8, 8)).save(photo)
    described = tmp_path / "run.json"
    described.write_text("{}")
    expected = {script: "is a TorchScript export", photo: "is a JPEG image, not a checkpoint",
                described: "is a JSON file, not a checkpoint"}
    for path, message in expected.items():
        with pytest.raises(CheckpointError, match=message) as raised:
            finetune.load(path, backbone=TINY)
        assert "weights_only" not in str(raised.value)
        assert "pickled" not in str(raised.value)  # no false security alarm
    code, _, err = run_cli(["predict", str(script), str(photo)], capsys)
    assert code == 2 and "TorchScript" in err and len(err.strip().splitlines()) == 1


def test_safetensors_weights_under_any_name_load_as_an_export(run, tmp_path, capsys) -> None:
    weights = tmp_path / "weights.bin"
    code, _, err = run_cli(["export", str(run["run"]), "--backbone", TINY, "--format",
                            "safetensors", "--output", str(weights)], capsys)
    assert code == 0, err
    loaded = finetune.load(weights, device="cpu", backbone=TINY)
    original = finetune.load(run["run"], device="cpu", backbone=TINY)
    images = find_images([run["tree"] / "val"])
    assert loaded.predict(images) == original.predict(images)


# -- 7: an export description that cannot name the outputs --------------------------------------
@pytest.mark.parametrize(("classes", "message"), [
    (["class0", "class1"], "2 class names for a model with 3 outputs"),
    ({"0": "class0", "1": "class1", "2": "class2"}, "classes must be a list of names"),
])
def test_an_export_description_must_name_every_output(run, tmp_path, capsys, classes,
                                                        message) -> None:
    weights = tmp_path / "model.safetensors"
    assert run_cli(["export", str(run["run"]), "--backbone", TINY, "--format", "safetensors",
                    "--output", str(weights)], capsys)[0] == 0
    description = json.loads(weights.with_suffix(".json").read_text())
    description["classes"] = classes
    weights.with_suffix(".json").write_text(json.dumps(description))
    with pytest.raises(CheckpointError, match=message):
        finetune.load(weights, backbone=TINY)


# -- 8: a from_module run exports as safetensors with --backbone -----------------------------------
def test_a_run_of_your_own_backbone_exports_every_format(run, tmp_path, capsys) -> None:
    """The run's backbone is an import path: named with --backbone, the safetensors export
    verifies as ONNX and TorchScript do (it reloads with the same backbone)."""
    output = tmp_path / "missing" / "folder" / "model.safetensors"  # folders are made
    code, out, err = run_cli(["export", str(run["run"]), "--backbone", TINY, "--format",
                              "safetensors", "--output", str(output)], capsys)
    assert code == 0, err
    assert "verified on" in out and output.is_file()
    assert finetune.load(output, backbone=TINY).classes == ["class0", "class1", "class2"]


# -- 9: the range test with adapters ---------------------------------------------------------------
def test_lr_find_with_lora_leaves_the_model_as_it_was(run, tmp_path, capsys) -> None:
    pytest.importorskip("peft", reason="LoRA needs peft (the [lora] extra)")
    code, out, err = run_cli(["lr-find", "--data", str(run["tree"]), "--backbone", TINY,
                              "--strategy", "lora", "--steps", "6", "--batch-size", "6",
                              "--output", str(tmp_path / "lrf"), *FAST], capsys)
    assert code == 0, err
    assert "suggested lr" in out
    code, _, err = run_cli(["lr-find", "--data", str(run["tree"]), "--backbone", TINY,
                            "--steps", "2", "--output", str(tmp_path / "two"), *FAST], capsys)
    assert code == 2 and "expected an integer ≥ 3" in err
    assert not (tmp_path / "two").exists()


# -- 11: a decompression bomb among the images an export is checked on -----------------------------
def test_a_decompression_bomb_is_an_unreadable_image_everywhere(run, tmp_path, capsys,
                                                                monkeypatch) -> None:
    bomb = tmp_path / "check" / "bomb.png"
    bomb.parent.mkdir()
    Image.new("RGB", (64, 64), (10, 200, 10)).save(bomb)
    shutil.copy(find_images([run["tree"] / "val"])[0], bomb.parent / "fine.jpg")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64 // 4)  # 64x64 is over 2x that
    code, out, err = run_cli(["export", str(run["run"]), "--backbone", TINY, "--format", "onnx",
                              "--output", str(tmp_path / "m.onnx"), "--check", str(bomb.parent)],
                             capsys)
    assert code == 0, err
    assert "verified on 1 real images" in out  # the bomb was skipped as unreadable
    code, _, err = run_cli(["predict", str(run["run"]), "--backbone", TINY, str(bomb)], capsys)
    assert code == 0 and "1 unreadable" in err


# -- 13, 15: what predict is given -----------------------------------------------------------------
def test_a_glob_matching_folders_finds_their_images_and_a_file_counts_once(
        run, monkeypatch) -> None:
    monkeypatch.chdir(run["tree"])
    by_glob = find_images(["val/*"])  # as quoted on the command line: matches folders
    assert len(by_glob) == 6 and all(p.suffix == ".jpg" for p in by_glob)
    one = Path("val/class0/img0.jpg")
    assert find_images([one, one.resolve(), "val/class0/img0.jpg"]) == [one]


def test_predict_refuses_what_it_cannot_write_or_rank_before_any_work(run, tmp_path,
                                                                       capsys) -> None:
    code, out, err = run_cli(["predict", str(run["run"]), "--backbone", TINY,
                              str(run["tree"] / "val"), "--output", str(tmp_path)], capsys)
    assert code == 2 and "is a folder" in err and out == ""
    model = classifier()
    with pytest.raises(ValueError, match="top_k must be a whole number >= 1"):
        model.predict(torch.zeros(1, 3, 24, 24), top_k=-1)
    assert model.predict([]) == []
    with pytest.raises(ValueError, match=r"must be \(N, 3, H, W\)"):
        model.predict(torch.zeros(3, 24, 24))


def test_advise_refuses_an_output_that_is_a_file_before_measuring(run, tmp_path,
                                                                  capsys) -> None:
    taken = tmp_path / "advice"
    taken.write_text("mine")
    code, out, err = run_cli(["advise", "--data", str(run["tree"]), "--backbone", TINY,
                              "--output", str(taken), *FAST], capsys)
    assert code == 2 and "is a file" in err and "measur" not in out
    assert taken.read_text() == "mine"


def test_a_stored_verdict_that_no_version_makes_is_decided_again(tmp_path: Path) -> None:
    store = VerdictStore(tmp_path / "verdicts.json")
    assert store.decide("precision", ("k",), lambda: "bf16") == "bf16"
    stored = json.loads(store.path.read_text())
    store.path.write_text(json.dumps({name: "banana" for name in stored}))
    with pytest.warns(RuntimeWarning, match="'banana' is not one this version makes"):
        assert store.decide("precision", ("k",), lambda: "fp32") == "fp32"
    assert set(json.loads(store.path.read_text()).values()) == {"fp32"}


# -- 14: class names in the model card ------------------------------------------------------------
def test_class_names_cannot_break_the_model_card() -> None:
    assert markdown_text("a|b") == "a\\|b"
    assert markdown_text("two\nlines") == "two lines"
    assert markdown_text("<img src=x onerror=alert(1)>") == (
        "&lt;img src=x onerror=alert\\(1\\)&gt;")
    row = f"| {markdown_text('cats | dogs')} | 90.0 | 3 |"
    assert row.count(" | ") == 2  # three cells: the escaped bar does not split the first

