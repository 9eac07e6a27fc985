"""CI step: the documentation site builds in strict mode, with the API reference.

A broken page link, a missing anchor, a page left out of the navigation or an API reference
that no longer resolves fails the build. Run from the repository root:
`python docs/mkdocs/check_site.py`."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "docs" / "mkdocs" / "mkdocs.yml"
API_NAMES = ("FreezeStrategyCallback", "ImageFolderData", "sample_dataset", "Trainer")


def main() -> int:
    with tempfile.TemporaryDirectory() as folder:
        site = Path(folder) / "site"
        # never -q: it silences the warnings that --strict counts, and the build passes anyway
        env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": str(ROOT)}
        result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f",
                                 str(CONFIG), "-d", str(site)], capture_output=True, text=True,
                                env=env, cwd=ROOT, timeout=300)
        if result.returncode != 0:
            print("mkdocs build --strict failed (a new page must also be listed under nav: in "
                  "docs/mkdocs/mkdocs.yml):\n" + result.stderr[-3000:], file=sys.stderr)
            return 1
        api = (site / "api" / "index.html").read_text()
        missing = [name for name in API_NAMES if name not in api]
        if missing or not (site / "integrations" / "index.html").is_file():
            print(f"the site lacks API entries {missing} or the integrations page",
                  file=sys.stderr)
            return 1
    print("docs: the site builds strictly with the API reference")
    return 0


if __name__ == "__main__":
    sys.exit(main())
