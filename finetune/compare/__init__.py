"""Compare freezing strategies on one dataset and backbone — the same data split, epochs and
seeds for all, each at its own lr — as tables, files and plots: `finetune compare` (and
`python -m benchmarks.compare` in a source checkout). How to call it, and how a strategy is
named: `finetune compare --help` (`finetune.compare.settings.USAGE`).
"""

from finetune.compare.report import markdown_table, summarize, write_outputs
from finetune.compare.row import Row
from finetune.compare.run import main, make_backbone, run_one
from finetune.compare.settings import (
    COMPARE_PRESETS,
    DEFAULT_STRATEGIES,
    RunSpec,
    Settings,
    parse_run,
)
from finetune.runtime.memory import PeakMemory

__all__ = [
    "COMPARE_PRESETS",
    "DEFAULT_STRATEGIES",
    "PeakMemory",
    "Row",
    "RunSpec",
    "Settings",
    "main",
    "make_backbone",
    "markdown_table",
    "parse_run",
    "run_one",
    "summarize",
    "write_outputs",
]
