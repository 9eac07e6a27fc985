import sys

from finetune.compare.run import main

sys.exit(main(prog="python -m benchmarks.compare"))
