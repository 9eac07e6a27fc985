"""Architectures as data: where each model's head lives and which regexes select its groups.

Adding a torchvision model is adding an entry to `TORCHVISION_ARCHITECTURES` (timm models get
theirs from timm's own `group_matcher`, see `Backbone.from_timm`).
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs


@attrs.frozen
class Architecture:
    """How to find an architecture's classifier and split it into groups (forward order).

    `groups` maps a group name to a regex matched against parameter names of the wrapped
    model; the head group is always added last and matches `head` exactly. (Where a frozen
    prefix can be cut off and cached is found by tracing: `finetune.cache.cut`.)
    """

    head: str
    groups: tuple[tuple[str, str], ...]


def _resnet() -> Architecture:
    return Architecture(
        head="fc",
        groups=(("stem", r"^(conv1|bn1)\."),)
        + tuple((f"layer{i}", rf"^layer{i}\.") for i in range(1, 5)),
    )


def _features(
    stages: Sequence[tuple[str, Sequence[int]]], extra: Sequence[tuple[str, str]] = ()
) -> tuple[tuple[str, str], ...]:
    """Groups over `features.<i>` indices, e.g. ("stage1", [1, 2])."""
    return tuple(
        (name, rf"^features\.({'|'.join(str(i) for i in indices)})\.") for name, indices in stages
    ) + tuple(extra)


TORCHVISION_ARCHITECTURES: dict[str, Architecture] = {
    **{name: _resnet() for name in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")},
    "efficientnet_b0": Architecture(
        head="classifier.1",
        groups=_features(
            [("stem", [0])] + [(f"stage{i}", [i]) for i in range(1, 8)] + [("top", [8])]
        ),
    ),
    "mobilenet_v3_large": Architecture(
        head="classifier.3",
        groups=_features(
            [
                ("stem", [0]),
                ("stage1", [1]),
                ("stage2", [2, 3]),
                ("stage3", [4, 5, 6]),
                ("stage4", [7, 8, 9, 10]),
                ("stage5", [11, 12]),
                ("stage6", [13, 14, 15]),
                ("top", [16]),
            ],
            extra=[("pre_logits", r"^classifier\.0\.")],
        ),
    ),
    "convnext_tiny": Architecture(
        head="classifier.2",
        groups=_features(
            [("stem", [0]), ("stage1", [1]), ("stage2", [2, 3]), ("stage3", [4, 5]),
             ("stage4", [6, 7])],
            extra=[("norm", r"^classifier\.0\.")],
        ),
    ),
    "vit_b_16": Architecture(
        head="heads.head",
        groups=(("embed", r"^(conv_proj\.|class_token$|encoder\.pos_embedding$)"),)
        + tuple((f"block{i}", rf"^encoder\.layers\.encoder_layer_{i}\.") for i in range(12))
        + (("norm", r"^encoder\.ln\."),),
    ),
}

LITE0_ARCHITECTURE = Architecture(
    head="_fc",
    groups=(("stem", r"^(_conv_stem|_bn0)\."),)
    + tuple(
        (f"stage{i + 1}", rf"^_blocks\.({'|'.join(map(str, blocks))})\.")
        for i, blocks in enumerate(
            [[0], [1, 2], [3, 4], [5, 6, 7], [8, 9, 10], [11, 12, 13, 14], [15]]
        )
    )
    + (("top", r"^(_conv_head|_bn1)\."),),
)
