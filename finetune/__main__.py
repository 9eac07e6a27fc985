"""`python -m finetune …`: the same commands as the `finetune` console script."""

import sys

from finetune.cli import main

if __name__ == "__main__":
    sys.exit(main())
