"""`python -m finetune.compare …`: the same as `finetune compare …` (and the
`python -m benchmarks.compare …` of a source checkout)."""

import sys

from finetune.compare.run import main

if __name__ == "__main__":
    sys.exit(main())
