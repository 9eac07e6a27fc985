"""The sample dataset shipped with the package: 10 UC Merced Land Use classes, 28 train and 8
test aerial images each, 160 px. It lets a first run, a test or a tutorial train on real photos
offline, in minutes, with nothing but the installed package.

UC Merced Land Use (Yang & Newsam, ACM SIGSPATIAL GIS 2010) is cut from USGS National Map
orthoimagery, which is in the public domain; see `ATTRIBUTION.md` beside the images.
`python -m benchmarks.make_sample SOURCE` rebuilds it from a UC Merced copy.
"""

from __future__ import annotations

from pathlib import Path

from finetune.errors import DataError

SAMPLE_ROOT = Path(__file__).with_name("sample")
SAMPLE_NAME = "sample"
ATTRIBUTION = "ATTRIBUTION.md"
SAMPLE_CLASSES = ("agricultural", "airplane", "baseballdiamond", "beach", "chaparral",
                  "denseresidential", "forest", "freeway", "golfcourse", "harbor")


def sample_dataset() -> Path:
    """The folder of the packaged sample (`train/<class>/`, `test/<class>/`), ready for
    `ImageFolderData(sample_dataset(), ...)`."""
    if not (SAMPLE_ROOT / "train").is_dir() or not (SAMPLE_ROOT / "test").is_dir():
        raise DataError(
            f"the sample dataset is missing from {SAMPLE_ROOT} (an install without package "
            "data?). Fix: reinstall with `pip install finetune` from a wheel or the source "
            "tree, or rebuild it with `python -m benchmarks.make_sample UCMERCED_FOLDER`."
        )
    return SAMPLE_ROOT


def resolve_named_data(data: str | Path) -> Path:
    """`data` as a path, except the name "sample", which is the packaged sample dataset
    (a folder of that name in the working directory wins, so no one's data is shadowed)."""
    if str(data) == SAMPLE_NAME and not Path(data).exists():
        return sample_dataset()
    return Path(data)
