"""The reference API (`finetune.functional`): the reference snippet runs as written with wandb
offline, the freezing means what the reference meant, and the default backbone is real."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import wandb

import finetune.functional as functional
import finetune.model.zoo as zoo
from finetune.data.preprocessing import Preprocessing
from finetune.errors import DataError
from finetune.functional import (
    data_load,
    model_train_val,
    pretrain_model,
    test_data_load,
    test_evaluation_model,
)
from finetune.model.backbone import Backbone
from tests.conftest import make_tiny_backbone, make_tree
from tests.test_callbacks import read_complete_run

TINY_PREPROCESSING = Preprocessing(resize_size=32, crop_size=32)


@pytest.fixture
def tiny_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the tiny CPU network the default backbone (and its preprocessing the default)."""
    monkeypatch.setattr(functional, "default_backbone", lambda n: make_tiny_backbone(n))
    monkeypatch.setattr(functional, "default_preprocessing", lambda: TINY_PREPROCESSING)


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_reference_snippet_runs_as_written(tmp_path, monkeypatch, offline_wandb, tiny_default):
    monkeypatch.setenv("FINETUNE_DATA", str(make_tree(tmp_path / "data", classes=10)))
    train_loader, val_loader = data_load(num_workers=0)

    # -- the reference snippet, verbatim ----------------------------------------------------
    wandb.init(project="DL_Assignment_2", name="pre_trainedmodel_rs_net")
    model = pretrain_model(freeze_percent=0.8, num_classes=10)
    before = snapshot(model)
    trained_model = model_train_val(model, train_loader, val_loader, epochs=5)
    run_dir = Path(wandb.run.settings.sync_dir)
    wandb.finish()
    # ----------------------------------------------------------------------------------------

    assert trained_model is model and isinstance(model, Backbone)
    names = list(before)
    frozen = names[: int(0.8 * len(names))]
    after = snapshot(trained_model)
    assert all(torch.equal(before[n], after[n]) for n in frozen)
    assert any(not torch.equal(before[n], after[n]) for n in names[len(frozen):])

    records = read_complete_run(next(run_dir.glob("run-*.wandb")))
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run.project == "DL_Assignment_2" and run.display_name == "pre_trainedmodel_rs_net"
    rows = [{"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item}
            for r in records if r.WhichOneof("record_type") == "history"]
    epochs = [row for row in rows if "val/accuracy" in row]
    assert [row["epoch"] for row in epochs] == [0, 1, 2, 3, 4]
    configs = [json.loads(item.value_json) for r in records
               if r.WhichOneof("record_type") == "config" for item in r.config.update
               if item.key == "strategy"]
    assert configs and configs[-1]["options"]["fraction"] == 0.8
    assert configs[-1]["class"] == "FreezeFraction"


def test_freezing_follows_the_reference(tiny_default):
    # freeze_percent: the first int(p * n) tensors of list(model.parameters()) are frozen
    model = pretrain_model(freeze_percent=0.5, num_classes=4)
    flags = [p.requires_grad for p in model.parameters()]
    cut = int(0.5 * len(flags))
    assert flags == [False] * cut + [True] * (len(flags) - cut)
    assert model.num_classes == 4 and model.head.out_features == 4

    everything = pretrain_model(freeze_percent=0, num_classes=4)
    assert all(p.requires_grad for p in everything.parameters())

    head_only = pretrain_model(freeze_percent=0.3, freeze_all_except_last_layer=True,
                               num_classes=4)
    trainable = [n for n, p in head_only.model.named_parameters() if p.requires_grad]
    assert trainable == ["fc.weight", "fc.bias"]


def test_backbone_keyword_takes_an_instance_and_checks_its_head():
    tiny = make_tiny_backbone(num_classes=3)
    assert pretrain_model(0.0, num_classes=3, backbone=tiny) is tiny
    with pytest.raises(ValueError, match="3-class head but num_classes is 5"):
        pretrain_model(0.0, num_classes=5, backbone=tiny)
    with pytest.raises(ValueError, match="fraction must be between 0 and 1"):
        pretrain_model(80, num_classes=3, backbone=make_tiny_backbone(3))


def test_data_load_defaults_split_and_preprocessing(tmp_path, monkeypatch, tiny_default):
    root = make_tree(tmp_path / "data", classes=3, n_train=10, n_test=2)
    monkeypatch.setenv("FINETUNE_DATA", str(root))
    train_loader, val_loader = data_load(num_workers=0)
    assert train_loader.batch_size == 32
    assert len(train_loader.dataset) == 24 and len(val_loader.dataset) == 6  # 20% of each class
    assert train_loader.dataset.classes == ["class0", "class1", "class2"]
    images, _ = next(iter(val_loader))
    assert images.shape[1:] == (3, 32, 32)  # the (patched) default backbone's preprocessing

    # model= wins over the default, and root= over $FINETUNE_DATA
    other = Backbone.from_module(make_tiny_backbone(3).model, head="fc", num_classes=3,
                                 groups=[("all", r"^(stem|block1|block2)\.")],
                                 preprocessing=Preprocessing(resize_size=20, crop_size=16))
    monkeypatch.setenv("FINETUNE_DATA", str(tmp_path / "nowhere"))
    test_loader = test_data_load(batch_size=4, root=root, model=other, num_workers=0)
    images, _ = next(iter(test_loader))
    assert images.shape == (4, 3, 16, 16) and len(test_loader.dataset) == 6


def test_data_load_without_a_root_says_how_to_give_one(monkeypatch):
    monkeypatch.delenv("FINETUNE_DATA", raising=False)
    with pytest.raises(DataError, match=r"pass root=.*or set \$FINETUNE_DATA"):
        data_load()
    with pytest.raises(DataError, match="FINETUNE_DATA"):
        test_data_load()


def test_test_evaluation_model_matches_a_direct_computation(tmp_path, tiny_default):
    root = make_tree(tmp_path / "data", classes=3, n_train=6, n_test=3)
    model = pretrain_model(freeze_percent=0.0, num_classes=3)
    train_loader, val_loader = data_load(batch_size=6, root=root, num_workers=0)
    model_train_val(model, train_loader, val_loader, epochs=2, lr=1e-2, precision="fp32")
    test_loader = test_data_load(batch_size=4, root=root, num_workers=0)
    flags = [p.requires_grad for p in model.parameters()]

    accuracy, report = test_evaluation_model(model, test_loader, precision="fp32")

    model.eval()
    with torch.no_grad():
        pairs = [(model(x).argmax(1), y) for x, y in test_loader]
    predicted = torch.cat([p for p, _ in pairs])
    labels = torch.cat([y for _, y in pairs])
    assert accuracy == pytest.approx((predicted == labels).float().mean().item())
    per_class = report.to_dict()["per_class"]
    assert list(per_class) == ["class0", "class1", "class2"]
    for c, name in enumerate(per_class):
        expected = (predicted[labels == c] == c).float().mean().item()
        assert per_class[name]["accuracy"] == pytest.approx(expected)
    assert [p.requires_grad for p in model.parameters()] == flags  # evaluation froze nothing


def test_a_model_not_from_pretrain_model_keeps_its_freezing(tmp_path):
    root = make_tree(tmp_path / "data", classes=3, n_train=4, n_test=1)
    model = make_tiny_backbone(3)
    for name, parameter in model.model.named_parameters():
        parameter.requires_grad_(not name.startswith("stem."))
    before = snapshot(model)
    train_loader, val_loader = data_load(batch_size=4, root=root, model=model, num_workers=0)
    model_train_val(model, train_loader, val_loader, epochs=1, lr=1e-2, precision="fp32")
    after = snapshot(model)
    assert all(torch.equal(before[n], after[n]) for n in before if n.startswith("model.stem."))
    assert not torch.equal(before["model.fc.weight"], after["model.fc.weight"])


def test_too_small_a_head_is_refused_before_training(tmp_path):
    root = make_tree(tmp_path / "data", classes=3, n_train=3, n_test=1)
    model = pretrain_model(0.0, num_classes=2, backbone=make_tiny_backbone(2))
    train_loader, val_loader = data_load(batch_size=4, root=root, model=model, num_workers=0)
    with pytest.raises(DataError, match=r"data has 3 classes .*head has 2 outputs.*num_classes=3"):
        model_train_val(model, train_loader, val_loader, epochs=1)
    with pytest.raises(TypeError, match="must be a finetune Backbone"):
        model_train_val(torch.nn.Linear(2, 2), train_loader, val_loader)


def test_the_real_default_backbone_trains_an_epoch(tmp_path, monkeypatch, capsys):
    """No patching: ResNet50 if its weights are cached, else EfficientNet-Lite0 with the
    packaged ImageNet weights; loaders made first get that backbone's preprocessing."""
    monkeypatch.setenv("FINETUNE_DATA", str(make_tree(tmp_path / "data", classes=2,
                                                      n_train=4, n_test=1, size=40)))
    train_loader, val_loader = data_load(batch_size=8, image_size=32, num_workers=0)
    model = pretrain_model(freeze_percent=0.8, num_classes=2)
    expected = zoo.default_backbone_name()
    assert model.name == expected and f"using {expected}" in capsys.readouterr().out
    assert model.preprocessing.mean == functional.default_preprocessing().mean
    head = model.head.weight.detach().clone()
    model_train_val(model, train_loader, val_loader, epochs=1, precision="fp32")
    assert not torch.equal(head, model.head.weight)
    accuracy, report = test_evaluation_model(model, test_data_load(image_size=32, num_workers=0),
                                             precision="fp32", verbose=False)
    assert report.num_samples == 2
    assert accuracy == report.accuracy == float(report.confusion_matrix.trace()) / 2
