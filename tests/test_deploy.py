"""Use a trained run: `finetune predict`, `finetune export` (verified ONNX, TorchScript,
safetensors), `finetune.load` in a fresh process, and the model card, on a tiny trained run."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import finetune
from finetune.deploy import export as export_module
from finetune.deploy.export import ExportError, export
from finetune.deploy.inference import find_images, load_run
from finetune.train.config import TrainConfig
from finetune.train.trainer import Trainer
from tests.conftest import FAST, make_tree, run_cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A Lite0 run at 32 px, one epoch, with its run folder and data tree."""
    base = tmp_path_factory.mktemp("deploy")
    tree = make_tree(base / "data", classes=3, n_train=6, n_test=3, size=40)
    run = base / "run"
    from finetune.cli import main

    code = main(["train", "--data", str(tree), "--backbone", "lite0", "--image-size", "32",
                 "--epochs", "1", "--batch-size", "8", "--val-split", "0.25", "--strategy",
                 "freeze-80", "--checkpoint-dir", str(run), *FAST])
    assert code == 0
    return {"tree": tree, "run": run, "base": base}


def test_predict_top1_equals_the_trainers_predictions_and_a_bad_file_gets_a_reason(
        trained, tmp_path, capsys) -> None:
    tree, run = trained["tree"], trained["run"]
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    output = tmp_path / "predictions.csv"
    code, _, err = run_cli(["predict", str(run), str(tree / "val"), str(bad), "--top-k", "2",
                            "--output", str(output), "--batch-size", "4"], capsys)
    assert code == 0, err
    assert "1 unreadable" in err
    rows = list(csv.DictReader(output.open()))
    assert next(r for r in rows if r["path"] == str(bad))["error"].startswith("unreadable image")
    top1 = {r["path"]: r["class"] for r in rows if r["rank"] == "1"}
    assert all(float(r["probability"]) <= 1 for r in rows if r["probability"])
    # the same images through the Trainer's own predict, with the run's preprocessing
    model = load_run(run)
    paths = find_images([tree / "val"])
    batch = torch.stack([finetune.load(run).preprocess(p) for p in paths])
    loader = [(batch, torch.zeros(len(paths), dtype=torch.long))]
    trainer = Trainer(model.backbone, None, TrainConfig(precision="fp32", device="cpu",
                                                        channels_last=False))
    expected = trainer.predict(loader).tolist()
    assert [top1[str(p)] for p in paths] == [model.classes[i] for i in expected]


@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "safetensors"])
def test_exports_reproduce_the_model_and_carry_classes_and_preprocessing(
        trained, tmp_path, fmt, capsys) -> None:
    output = tmp_path / f"model.{fmt}"
    code, out, err = run_cli(["export", str(trained["run"]), "--format", fmt, "--output",
                              str(output)], capsys)
    assert code == 0, err
    assert "verified on 8 real images" in out
    classifier = finetune.load(trained["run"], device="cpu")
    images = torch.stack([classifier.preprocess(p)
                          for p in find_images([trained["tree"] / "val"])])
    expected = classifier.logits(images)
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(output), providers=["CPUExecutionProvider"])
        meta = session.get_modelmeta().custom_metadata_map
        assert json.loads(meta["classes"]) == classifier.classes
        assert json.loads(meta["preprocessing"])["crop_size"] == 32
        got = torch.from_numpy(session.run(None, {"images": images.numpy()})[0])
    elif fmt == "torchscript":
        files = {"finetune.json": ""}
        module = torch.jit.load(str(output), _extra_files=files)
        assert json.loads(files["finetune.json"])["classes"] == classifier.classes
        got = module(images)
    else:
        loaded = finetune.load(output, device="cpu")
        assert loaded.classes == classifier.classes
        got = loaded.logits(images)
    assert (got - expected).abs().max() <= 1e-4


def test_a_tampered_export_fails_verification_and_leaves_no_file(
        trained, tmp_path, monkeypatch) -> None:
    write, check = export_module.WRITERS["torchscript"]

    def tampered(model, images, path, description):
        changed = model.model
        with torch.no_grad():
            head = changed._fc
            head.bias.add_(1.0)
            try:
                write(model, images, path, description)
            finally:
                head.bias.sub_(1.0)

    monkeypatch.setitem(export_module.WRITERS, "torchscript", (tampered, check))
    output = tmp_path / "model.pt"
    with pytest.raises(ExportError, match="away from the PyTorch model's"):
        export(load_run(trained["run"]), "torchscript", output)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.subprocess
def test_load_works_in_a_fresh_process_without_the_data(trained, tmp_path) -> None:
    moved = tmp_path / "run"
    shutil.copytree(trained["run"], moved)
    image = tmp_path / "one.jpg"
    shutil.copy(find_images([trained["tree"] / "val"])[0], image)
    hidden = tmp_path / "elsewhere"
    shutil.move(str(trained["tree"]), hidden)  # the run's recorded data folder is gone
    try:
        script = (f"import finetune; c = finetune.load({str(moved)!r}, device='cpu'); "
                  f"top = c.predict([{str(image)!r}], top_k=2)[0]; "
                  "print(c.classes, c.preprocessing.crop_size, top[0][0], len(top))")
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                             cwd=ROOT, check=True).stdout
    finally:
        shutil.move(str(hidden), trained["tree"])
    assert "['class0', 'class1', 'class2'] 32 class" in out and out.strip().endswith(" 2")


def test_the_model_card_holds_the_runs_real_figures(trained) -> None:
    import yaml

    text = (trained["run"] / "MODEL_CARD.md").read_text()
    _, front, body = text.split("---\n", 2)
    meta = yaml.safe_load(front)
    accuracy = meta["model-index"][0]["results"][0]["metrics"][0]["value"]
    run = load_run(trained["run"])
    trainer = Trainer(run.backbone, None,
                      TrainConfig(precision="fp32", device="cpu", channels_last=False))
    data = finetune.ImageFolderData(trained["tree"], preprocessing=run.preprocessing,
                                    num_workers=0, progress=False, val_split=0.25, seed=0)
    assert accuracy == pytest.approx(trainer.evaluate(data.test_loader()).accuracy, abs=1e-4)
    assert f"Test accuracy **{100 * accuracy:.1f}%**" in body
    for name in ("class0", "class1", "class2"):
        assert f"| {name} |" in body
    assert f"Trained on {len(data.train_samples)} images" in body
    assert "FreezeFraction" in body and "lr 0.0001" in body


def test_the_predict_speed_benchmark_runs_and_reports_its_ratio(trained, capsys) -> None:
    from benchmarks import predict_speed

    assert predict_speed.main(["--model", str(trained["run"]), "--images",
                               str(trained["tree"] / "val"), "--batch-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "9 images at 32 px" in out and "ratio" in out


def test_flip_tta_averages_the_probabilities_of_each_image_and_its_mirror(trained) -> None:
    from finetune.train.trainer import average_probabilities

    a, b = torch.randn(5, 3), torch.randn(5, 3)
    expected = (a.softmax(1) + b.softmax(1)) / 2
    assert torch.allclose(average_probabilities(a, b).exp(), expected, atol=1e-6)
    run = load_run(trained["run"])
    images = torch.stack([finetune.load(trained["run"]).preprocess(p)
                          for p in find_images([trained["tree"] / "val"])])
    labels = torch.arange(len(images)) % 3
    trainer = Trainer(run.backbone, None, TrainConfig(precision="fp32", device="cpu",
                                                      channels_last=False))
    report = trainer.evaluate([(images, labels)], tta="flip")
    with torch.inference_mode():
        run.backbone.eval()
        by_hand = ((run.backbone(images).softmax(1) + run.backbone(images.flip(3)).softmax(1))
                   / 2).argmax(1)
    assert report.predictions.tolist() == by_hand.tolist()
    assert trainer.predict([(images, labels)], tta="flip").tolist() == by_hand.tolist()
    with pytest.raises(ValueError, match="tta must be one of none, flip"):
        trainer.evaluate([(images, labels)], tta="rotate")


def test_evaluate_command_takes_tta(trained, capsys) -> None:
    code, out, err = run_cli(["evaluate", "--checkpoint", str(trained["run"]), "--tta", "flip",
                              *FAST], capsys)
    assert code == 0, err
    assert "with flip test-time augmentation" in out
