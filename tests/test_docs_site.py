"""The documentation site builds in strict mode: a broken page link, a missing anchor, a page
left out of the navigation or an API reference that no longer resolves fails the build."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "docs" / "mkdocs" / "mkdocs.yml"


def build(config: Path, site: Path) -> subprocess.CompletedProcess[str]:
    # Never -q: it silences the warnings that --strict counts, and the build passes anyway.
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f",
                           str(config), "-d", str(site)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)


def test_the_site_builds_strictly_with_the_api_reference(tmp_path: Path) -> None:
    result = build(CONFIG, tmp_path / "site")
    assert result.returncode == 0, ("mkdocs build --strict failed (a new page must also be "
                                    "listed under nav: in docs/mkdocs/mkdocs.yml):\n"
                                    + result.stderr[-3000:])
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    for name in ("FreezeStrategyCallback", "ImageFolderData", "sample_dataset", "Trainer"):
        assert name in api, name
    assert (tmp_path / "site" / "integrations" / "index.html").is_file()
