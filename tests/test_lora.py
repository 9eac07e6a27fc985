"""LoRA through peft: what trains, parameter counts, groups of adapters, save / reload."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import attrs
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from finetune.callbacks import Checkpoint
from finetune.model.backbone import Backbone
from finetune.strategies import STRATEGIES, LoRA
from finetune.train.config import TrainConfig
from finetune.train.trainer import Trainer
from tests.conftest import TINY_GROUPS, TinyNet, make_tiny_backbone
from tests.test_strategies_advanced import assert_contract, train_steps

pytest.importorskip("peft", reason="LoRA needs the optional extra: pip install 'finetune[lora]'")

TINY_CONVS = {"stem.0": (3, 8), "block1.0": (8, 16), "block2.0": (16, 16)}  # (in, out), 3x3


def adapter_names(modules: list[str]) -> set[str]:
    return {f"{m}.lora_{ab}.default.weight" for m in modules for ab in "AB"}


def test_lora_contract(random_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Adapters and head train, base weights and BN buffers stay bit-identical."""
    assert STRATEGIES["lora"] is LoRA
    expected = adapter_names(list(TINY_CONVS)) | {"fc.weight", "fc.bias"}
    assert_contract(make_tiny_backbone(), LoRA(r=2, alpha=4), 0, expected, random_batches)


def test_lora_parameter_count_and_groups() -> None:
    backbone = make_tiny_backbone()
    total_before = sum(p.numel() for p in backbone.parameters())
    report = LoRA(r=2).apply(backbone)
    adapters = sum(2 * cin * 9 + cout * 2 for cin, cout in TINY_CONVS.values())  # A: r·in·3·3
    head = 16 * 3 + 3
    assert report.trainable_params == adapters + head
    assert report.total_params == total_before + adapters
    assert backbone.group_of("block1.0.lora_A.default.weight") == "block1"
    assert backbone.group_of("stem.0.base_layer.weight") == "stem"
    assert [g.numel for g in backbone.groups][-1] == head  # the head got no adapter
    assert not any("lora" in name for name, _ in backbone.named_parameters_in("head"))


def test_lora_groups_option_limits_adapters() -> None:
    backbone = make_tiny_backbone()
    LoRA(r=2, groups=("block2",)).apply(backbone)
    trains = {n for n, p in backbone.model.named_parameters() if p.requires_grad}
    assert trains == adapter_names(["block2.0"]) | {"fc.weight", "fc.bias"}
    with pytest.raises(ValueError, match="valid groups are"):
        LoRA(groups=("layer4",)).apply(make_tiny_backbone())


def test_lora_apply_twice_does_not_inject_twice(
    random_batches: list[tuple[torch.Tensor, torch.Tensor]],
) -> None:
    backbone = make_tiny_backbone()
    strategy = LoRA(r=2)
    strategy.apply(backbone)
    names = [n for n, _ in backbone.model.named_parameters()]
    modules = len(list(backbone.model.modules()))
    assert strategy.inject(backbone) == 0
    strategy.apply(backbone, epoch=3)
    assert [n for n, _ in backbone.model.named_parameters()] == names
    assert len(list(backbone.model.modules())) == modules
    train_steps(backbone, strategy, random_batches[:1])  # still trains after re-apply


def test_lora_checkpoint_restores_adapters_and_head_together(
    random_batches: list[tuple[torch.Tensor, torch.Tensor]], tmp_path: object
) -> None:
    strategy = LoRA(r=2, alpha=4)
    trained = make_tiny_backbone(seed=0)
    strategy.apply(trained)
    train_steps(trained, strategy, random_batches)
    path = f"{tmp_path}/lora.pt"
    torch.save(trained.state_dict(), path)
    images = random_batches[0][0]
    trained.eval()
    expected = trained(images)

    fresh = make_tiny_backbone(seed=1)  # different init: nothing may come from it
    strategy.apply(fresh)
    fresh.load_state_dict(torch.load(path, weights_only=True))
    fresh.eval()
    assert torch.equal(fresh(images), expected)
    assert torch.equal(fresh.head.weight, trained.head.weight)

    plain = make_tiny_backbone(seed=1)  # forgetting to apply LoRA first fails loudly
    with pytest.raises(RuntimeError, match="lora_A"):
        plain.load_state_dict(torch.load(path, weights_only=True))


def test_lora_adapts_resnet_layers_into_their_groups() -> None:
    backbone = Backbone.from_torchvision("resnet18", num_classes=5, weights=None)
    convs = [n for n, m in backbone.model.named_modules() if isinstance(m, nn.Conv2d)]
    report = LoRA(r=4).apply(backbone)
    assert report.trainable_tensors == 2 * len(convs) + 2
    assert backbone.group_of("layer3.1.conv2.lora_B.default.weight") == "layer3"
    assert backbone.group_of("conv1.lora_A.default.weight") == "stem"
    assert backbone(torch.randn(1, 3, 64, 64)).shape == (1, 5)


def test_refresh_groups_falls_back_to_the_enclosing_module() -> None:
    """With exact-name group patterns (as Backbone.from_timm builds) wrapped layers' renamed
    parameters match no pattern; they join the group of the layer they wrap."""
    torch.manual_seed(0)
    model = TinyNet()
    exact = []
    for group, prefix in TINY_GROUPS:
        names = [n for n, _ in model.named_parameters() if re.search(prefix, n)]
        exact.append((group, "^(" + "|".join(re.escape(n) for n in names) + ")$"))
    backbone = Backbone.from_module(model, head="fc", groups=exact, num_classes=3)
    LoRA(r=2).apply(backbone)
    assert backbone.group_of("block2.0.base_layer.weight") == "block2"
    assert backbone.group_of("block2.0.lora_B.default.weight") == "block2"
    assert backbone.group_of("block2.1.weight") == "block2"


def test_lora_without_peft_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(ImportError, match=re.escape("pip install 'finetune[lora]'")):
        LoRA().apply(make_tiny_backbone())


def test_lora_trainable_before_apply_says_what_to_do() -> None:
    with pytest.raises(RuntimeError, match=r"call strategy\.apply"):
        LoRA().param_groups(make_tiny_backbone(), 0.1)


def test_lora_trains_and_resumes_through_the_trainer(tmp_path: Path) -> None:
    """A LoRA run checkpointed by the Trainer resumes exactly: adapters, head and optimizer."""
    config = TrainConfig(epochs=2, lr=1e-2, seed=0, precision="fp32", device="cpu")
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (16,), generator=generator)
    data = TensorDataset(torch.randn(16, 3, 32, 32, generator=generator), labels)

    straight = make_tiny_backbone()
    Trainer(straight, LoRA(r=2), config).fit(DataLoader(data, batch_size=8))

    checkpoint = Checkpoint(tmp_path, monitor="train_loss", mode="min")
    first = make_tiny_backbone()
    Trainer(first, LoRA(r=2), attrs.evolve(config, epochs=1), callbacks=[checkpoint]).fit(
        DataLoader(data, batch_size=8))
    resumed = make_tiny_backbone(seed=3)  # a plain backbone: the Trainer adds the adapters
    Trainer(resumed, LoRA(r=2), config).fit(DataLoader(data, batch_size=8),
                                             resume=checkpoint.last_path)
    for name, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name


def test_lora_on_layers_peft_cannot_wrap_is_a_clear_error() -> None:
    pytest.importorskip("peft", reason="peft is the optional [lora] extra")
    from finetune import Backbone

    backbone = Backbone.efficientnet_lite0(num_classes=3, pretrained=False)
    with pytest.raises(ValueError, match=r"Conv2dStaticSamePadding, which peft cannot wrap"):
        LoRA().apply(backbone)
    assert not any(".lora_" in name for name, _ in backbone.model.named_parameters())
