"""One run of a comparison as a typed record: the table, results.csv (one fixed header),
results.json and the store all read `Row`. A failed run is a `Row` too (`failed`, `error`);
the advised row fills `advice` and `advise_seconds`, which other rows leave empty.

A `Row` reads as a mapping as well (`row["test_accuracy"]`, `row.get("tuning")`), so code
written against results.json's rows reads it alike."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import attrs

# a field that holds lists or mappings: in results.json, not a results.csv column
NESTED = {"csv": False}


@attrs.frozen(kw_only=True)
class Row(Mapping):
    strategy: str
    seed: int
    failed: bool = False
    error: str | None = None
    # what trained
    backbone: str | None = None
    weights: str | None = None
    pretrained: bool | None = None
    strategy_state: dict[str, Any] | None = attrs.field(default=None, metadata=NESTED)
    trainable_params: int | None = None
    total_params: int | None = None
    trainable_pct: float | None = None
    lr: float | None = None
    # what it scored (the test set once, for the trained run)
    val_accuracy: float | None = None
    best_val_accuracy: float | None = None
    test_accuracy: float | None = None
    test_macro_f1: float | None = None
    test_accuracy_ci95: list[float] | None = attrs.field(default=None, metadata=NESTED)
    test_macro_f1_ci95: list[float] | None = attrs.field(default=None, metadata=NESTED)
    # what it cost
    epochs: int | None = None
    seconds_per_epoch: float | None = None
    train_seconds_per_epoch: float | None = None
    images_per_second: float | None = None
    peak_memory_mib: float | None = None
    memory_measure: str | None = None
    precision: str | None = None
    device: str | None = None
    world_size: int | None = None
    jobs: int | None = None
    train_uncached_reason: str | None = None
    advise_seconds: float | None = None  # the advised row: the advice's time, in its cost
    train_images: int | None = None
    val_images: int | None = None
    test_images: int | None = None
    # how its lr was chosen, and (advised row) what the advisor chose
    tuning: dict[str, Any] | None = attrs.field(default=None, metadata=NESTED)
    lr_find: dict[str, Any] | None = attrs.field(default=None, metadata=NESTED)
    advice: dict[str, Any] | None = attrs.field(default=None, metadata=NESTED)
    test_losses: list[float] | None = attrs.field(  # each test image's, for top losses
        default=None, metadata=NESTED)
    test_confidences: list[float] | None = attrs.field(default=None, metadata=NESTED)
    test_predictions: list[int] | None = attrs.field(default=None, metadata=NESTED)
    per_class_test_accuracy: dict[str, float] | None = attrs.field(default=None, metadata=NESTED)
    history: list[dict[str, Any]] | None = attrs.field(default=None, metadata=NESTED)
    config: dict[str, Any] | None = attrs.field(default=None, metadata=NESTED)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Row:
        """A row from results.json or the store; keys of no field (older or newer files)
        are left out."""
        names = attrs.fields_dict(cls)
        return cls(**{key: value for key, value in values.items() if key in names})

    @classmethod
    def failure(cls, strategy: str, seed: int, error: str) -> Row:
        return cls(strategy=strategy, seed=seed, failed=True, error=error)

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self, recurse=False)

    def evolve(self, **changes: Any) -> Row:
        return attrs.evolve(self, **changes)

    @classmethod
    def csv_columns(cls) -> list[str]:
        """results.csv's columns, the same for every row."""
        return [f.name for f in attrs.fields(cls) if f.metadata.get("csv", True)]

    def csv_values(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.csv_columns()}

    # -- read as a mapping --------------------------------------------------------------------
    def __getitem__(self, key: str) -> Any:
        if key not in attrs.fields_dict(type(self)):
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(attrs.fields_dict(type(self)))

    def __len__(self) -> int:
        return len(attrs.fields(type(self)))
