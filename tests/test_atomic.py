"""Atomic writes leave the old file or the new one, never half, and no temporary files."""

from pathlib import Path

import pytest

from finetune.atomic import atomic_write, atomic_write_json


def test_a_failed_write_keeps_the_old_content_and_cleans_up(tmp_path: Path) -> None:
    target = atomic_write_json(tmp_path / "run.json", {"epoch": 1})

    def half_then_crash(file) -> None:
        file.write(b'{"epo')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, half_then_crash)
    assert target.read_text() == '{"epoch": 1}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]


def test_durable_write_replaces_and_creates_folders(tmp_path: Path) -> None:
    target = atomic_write(tmp_path / "a" / "b.bin", lambda f: f.write(b"new"), durable=True)
    assert target.read_bytes() == b"new"
