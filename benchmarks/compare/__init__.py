"""`python -m benchmarks.compare …`: a source checkout's entry into the library's comparison,
`finetune.compare` (`finetune compare …` once installed) — the same flags and outputs."""

from finetune.compare import *  # noqa: F403
from finetune.compare import __all__  # noqa: F401
