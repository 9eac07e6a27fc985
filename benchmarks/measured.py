"""What a benchmark leaves behind: its table in Markdown, headed or ended by the CPU it was
measured on and the command that reproduces it, and the same figures as JSON."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from finetune.atomic import atomic_write_text
from finetune.runtime.precision import machine


def cpu_label() -> str:
    """The CPU a figure was measured on: model, threads, the flags that decide precision,
    and the ISA cap when one emulates a smaller CPU."""
    box = machine()
    return (f"{box['cpu']}, {box['threads']} threads, {', '.join(box['flags'])}"
            + (f", ISA capped at {box['isa_cap']}" if box["isa_cap"] else ""))


def write_measurement(folder: Path, name: str, text: str, figures: Any, module: str,
                      argv: Sequence[str] | None) -> str:
    """`text` with the reproducing command appended, as `folder/name.md`, and `figures` as
    `folder/name.json`; printed, and returned."""
    command = " ".join(argv if argv is not None else sys.argv[1:])
    text += f"\n\nCommand: `python -m {module} {command}`\n"
    atomic_write_text(folder / f"{name}.md", text)
    atomic_write_text(folder / f"{name}.json", json.dumps(figures, indent=2))
    print(text)
    return text
