"""The activation cache: where a network is cut into a frozen prefix and a trained suffix
(`cut`), the stored prefix outputs (`store`), and which of a fit's loaders are cached (`plan`)."""
