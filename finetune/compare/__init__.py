"""Compare freezing strategies on one dataset and backbone, with the same data split, epochs, lr
and seeds for all, and print a Markdown table.

    finetune compare                    # quick preset on the packaged sample, offline
    finetune compare --preset reference --data nature_12K.zip   # ResNet50, GPU
    finetune compare --data DIR --seeds 3 \\
        --strategies last-layer,lp-ft,freeze-fraction:fraction=0.5:count=numel

A strategy is a registered name or preset (`finetune.STRATEGIES`, `finetune.PRESETS`: e.g.
`freeze-80`), optionally followed by `:key=value` options; `+` joins tuple items
(`freeze-all-but:groups=layer4+head`); `:weights=none` trains that row from random init
(`from-scratch` is short for `full-unfreeze:weights=none`).
Rows are written to the output folder as each run finishes, so a crash or Ctrl-C keeps them and
`--resume` skips them. See docs/benchmarks.md for what each column measures. In a source
checkout `python -m benchmarks.compare` is the same command.
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
