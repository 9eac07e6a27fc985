"""What `Checkpoint` and `EarlyStopping` share: reading the monitored metric, judging a gain."""

from __future__ import annotations


def monitored_value(metrics: dict[str, float], monitor: str, owner: str) -> float:
    """The monitored metric from an epoch's row, or an error that lists what is there."""
    if monitor not in metrics:
        raise KeyError(
            f"{owner} monitors '{monitor}', which this run does not produce; available: "
            f"{', '.join(sorted(metrics))}. Pass a validation loader for val_* metrics."
        )
    return float(metrics[monitor])


def is_improvement(value: float, best: float | None, mode: str, min_delta: float = 0.0) -> bool:
    if best is None:
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta
