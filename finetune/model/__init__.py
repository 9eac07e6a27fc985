"""The network: `Backbone` (a torchvision, timm or own model with its head replaced and its
parameter groups declared as data), the architectures' group tables, pretrained weights from
the hub cache or local files, and `build_backbone` (a backbone by name)."""
