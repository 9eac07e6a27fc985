"""Probes of what finetune promises a user, run against the real command line in a scratch
folder — the checks of docs/reliability.md that a user can rerun on their own machine:

    python -m benchmarks.reliability_probes            # the packaged sample, a few minutes

Each probe prints HELD or BROKEN and what it saw; the exit code is the number broken. They
use the packaged sample and a random-init tiny backbone, so they need no download and no GPU.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image

from finetune.data import sample_dataset

BACKBONE = "resnet18"
COMMON = ["--backbone", BACKBONE, "--weights", "none", "--epochs", "1", "--batch-size", "8",
          "--image-size", "64", "--train-per-class", "4", "--workers", "0"]


def finetune(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "finetune", *args], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=600)


def weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "last.pt", weights_only=True)["model"]


# -- the probes ------------------------------------------------------------------------------------
def same_seed_same_weights(work: Path, data: Path) -> tuple[bool, str]:
    """Three runs with one seed and default flags give bit-identical weights."""
    runs = [work / f"seed{i}" for i in range(3)]
    for run in runs:
        result = finetune("train", "--data", str(data), *COMMON, "--seed", "3",
                          "--checkpoint-dir", str(run))
        if result.returncode:
            return False, result.stderr.strip()[-300:]
    first = weights(runs[0])
    same = all(all(torch.equal(first[k], weights(r)[k]) for k in first) for r in runs[1:])
    chosen = json.loads((runs[0] / "run.json").read_text())["chosen"]
    return same, f"3 runs, weights {'identical' if same else 'DIFFER'}; chose {chosen}"


def rewritten_image_is_not_stale(work: Path, data: Path) -> tuple[bool, str]:
    """An image rewritten in place (same size, inode and mtime) gets a new content key."""
    from finetune.data.images import file_key

    path = work / "image.bmp"
    red, blue = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (16, 16), (200, 0, 0)).save(red, format="BMP")
    Image.new("RGB", (16, 16), (0, 0, 200)).save(blue, format="BMP")
    path.write_bytes(red.getvalue())
    before, stat = file_key(path), path.stat()
    with open(path, "r+b") as handle:
        handle.write(blue.getvalue())
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    kept = path.stat()
    disguised = (kept.st_size, kept.st_ino, kept.st_mtime_ns) == (
        stat.st_size, stat.st_ino, stat.st_mtime_ns)
    changed = file_key(path) != before
    return changed, (f"size/inode/mtime unchanged: {disguised}; content key "
                     f"{'changed' if changed else 'UNCHANGED'}")


def one_line_errors(work: Path, data: Path) -> tuple[bool, str]:
    """Bad values are refused at once, in one line, before any data or model loads."""
    cases = {
        "--lr inf": ["train", "--data", str(data), "--lr", "inf"],
        "--image-size 100000": ["train", "--data", str(data), "--image-size", "100000"],
        "--resume of an empty folder": ["train", "--data", str(data), "--resume", str(work)],
    }
    seen = []
    for name, argv in cases.items():
        result = finetune(*argv)
        lines = result.stderr.strip().splitlines()
        ok = result.returncode == 2 and "Traceback" not in result.stderr and (
            name == "--lr inf" or len(lines) == 1)
        seen.append(f"{name}: {'one clear error' if ok else 'UNCLEAR: ' + result.stderr[-200:]}")
        if not ok:
            return False, "; ".join(seen)
    return True, "; ".join(seen)


def resume_needs_no_repeated_flags(work: Path, data: Path) -> tuple[bool, str]:
    """`--resume RUN_DIR` continues with the run's own settings; a resume with no epochs left
    changes nothing."""
    run = work / "resume"
    first = finetune("train", "--data", str(data), *COMMON, "--strategy", "last-layer",
                     "--checkpoint-dir", str(run))
    if first.returncode:
        return False, first.stderr.strip()[-300:]
    again = finetune("train", "--resume", str(run), "--epochs", "2", "--workers", "0")
    if again.returncode:
        return False, again.stderr.strip()[-300:]
    record = json.loads((run / "run.json").read_text())
    before = (run / "last.pt").read_bytes()
    nothing = finetune("train", "--resume", str(run), "--epochs", "1", "--workers", "0")
    untouched = nothing.returncode == 2 and (run / "last.pt").read_bytes() == before
    ok = record["strategy"]["class"] == "LastLayerOnly" and untouched
    return ok, (f"resumed as {record['strategy']['class']}; no-epochs-left resume "
                f"{'refused, folder untouched' if untouched else 'CHANGED THE FOLDER'}")


def outputs_follow_the_umask(work: Path, data: Path) -> tuple[bool, str]:
    """Files a run writes follow the user's umask, as open() would."""
    run = work / "umask"
    previous = os.umask(0o027)
    try:
        result = finetune("train", "--data", str(data), *COMMON, "--checkpoint-dir", str(run))
    finally:
        os.umask(previous)
    if result.returncode:
        return False, result.stderr.strip()[-300:]
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in run.iterdir()}
    return all(mode == oct(0o640) for mode in modes.values()), f"umask 027 -> {modes}"


PROBES: dict[str, Callable[[Path, Path], tuple[bool, str]]] = {
    "a seed fixes the result": same_seed_same_weights,
    "no stale pixels after an in-place rewrite": rewritten_image_is_not_stale,
    "bad input is one clear line": one_line_errors,
    "resume from the run folder": resume_needs_no_repeated_flags,
    "outputs follow the umask": outputs_follow_the_umask,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=None,
                        help="an image tree to probe with (default: the packaged sample)")
    args = parser.parse_args(argv)
    data = args.data or sample_dataset()
    work = Path(tempfile.mkdtemp(prefix="finetune-probes-"))
    os.environ.setdefault("FINETUNE_CACHE", str(work / "cache"))
    broken = 0
    try:
        for name, probe in PROBES.items():
            folder = work / name.replace(" ", "-")
            folder.mkdir()
            held, seen = probe(folder, data)
            broken += not held
            print(f"{'HELD  ' if held else 'BROKEN'} {name}: {seen}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{len(PROBES) - broken} of {len(PROBES)} held")
    return broken


if __name__ == "__main__":
    sys.exit(main())
