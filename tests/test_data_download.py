"""INaturalist12K.download end to end against a small zip in the real archive's layout,
served from file:// and from an HTTP server on 127.0.0.1 that honours byte Ranges."""

from __future__ import annotations

import hashlib
import io
import threading
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
from PIL import Image

from finetune.data import ImageFolderData, INaturalist12K, download_file, safe_extract
from finetune.errors import DataError

CLASSES = ("Amphibia", "Aves", "Fungi")


def jpeg_bytes(shade: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (24, 24), (shade, 255 - shade, 90)).save(buffer, format="JPEG")
    return buffer.getvalue()


def build_archive(path: Path, top: str = "inaturalist_12K") -> Path:
    with zipfile.ZipFile(path, "w") as handle:
        for split, count in (("train", 4), ("val", 2)):
            for c, name in enumerate(CLASSES):
                for i in range(count):
                    handle.writestr(f"{top}/{split}/{name}/{i}.jpg", jpeg_bytes(40 * c + i))
        handle.writestr("__MACOSX/inaturalist_12K/._junk", b"resource fork")
    return path


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_archive(tmp_path_factory.mktemp("src") / "nature_12K.zip")


class Server(HTTPServer):
    payload: bytes = b""
    honour_range: bool = True
    cut_after: int | None = None  # promise the whole file, send only this many bytes
    ranges: list[str | None]


class RangeHandler(BaseHTTPRequestHandler):
    """SimpleHTTPRequestHandler without Range support would defeat resuming; this one has it."""

    server: Server

    def do_GET(self) -> None:
        payload, requested = self.server.payload, self.headers.get("Range")
        self.server.ranges.append(requested)
        if self.path != "/nature_12K.zip":
            self.send_error(404)
            return
        start = 0
        if requested and self.server.honour_range:
            start = int(requested.removeprefix("bytes=").split("-")[0])
            if start >= len(payload):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(payload)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(payload) - 1}/{len(payload)}")
        else:
            self.send_response(200)
        body = payload[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.server.cut_after is not None:
            body = body[: self.server.cut_after]
            self.close_connection = True
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server(archive: Path) -> Iterator[Server]:
    httpd = Server(("127.0.0.1", 0), RangeHandler)
    httpd.payload, httpd.ranges = archive.read_bytes(), []
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def url_of(server: Server) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}/nature_12K.zip"


def test_file_url_download_extracts_and_is_idempotent(archive: Path, tmp_path: Path) -> None:
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    folder = INaturalist12K.download(
        tmp_path, url=archive.as_uri(), sha256=digest, expected_size=archive.stat().st_size,
        progress=False,
    )
    assert folder == tmp_path / "inaturalist_12K"
    assert sorted(p.name for p in (folder / "train").iterdir()) == list(CLASSES)
    assert not (tmp_path / "__MACOSX").exists()
    assert (tmp_path / "nature_12K.zip").read_bytes() == archive.read_bytes()
    # a second call must not fetch anything: the URL no longer resolves, yet it succeeds
    assert INaturalist12K.download(tmp_path, url="file:///nonexistent.zip") == folder
    d = ImageFolderData(folder, num_workers=0, batch_size=4, image_size=16, progress=False)
    assert d.classes == list(CLASSES) and len(d.test_samples) == 6


def test_http_download(server: Server, archive: Path, tmp_path: Path) -> None:
    folder = INaturalist12K.download(tmp_path, url=url_of(server), progress=False)
    assert (tmp_path / "nature_12K.zip").read_bytes() == archive.read_bytes()
    assert len(list((folder / "val").rglob("*.jpg"))) == 6
    assert server.ranges == [None]


def test_interrupted_download_is_kept_and_resumed(server: Server, archive: Path,
                                                   tmp_path: Path) -> None:
    server.cut_after = 1000
    with pytest.raises(DataError, match="call again to resume"):
        INaturalist12K.download(tmp_path, url=url_of(server), progress=False)
    partial = tmp_path / "nature_12K.zip.part"
    assert partial.stat().st_size == 1000 and not (tmp_path / "inaturalist_12K").exists()
    server.cut_after = None
    INaturalist12K.download(tmp_path, url=url_of(server), progress=False)
    assert server.ranges == [None, "bytes=1000-"]
    assert (tmp_path / "nature_12K.zip").read_bytes() == archive.read_bytes()
    assert not partial.exists() and (tmp_path / "inaturalist_12K" / "train" / "Aves").is_dir()


def test_complete_partial_file_gets_416_and_finishes(server: Server, archive: Path,
                                                     tmp_path: Path) -> None:
    (tmp_path / "nature_12K.zip.part").write_bytes(archive.read_bytes())
    download_file(url_of(server), tmp_path / "nature_12K.zip", progress=False)
    assert (tmp_path / "nature_12K.zip").read_bytes() == archive.read_bytes()


def test_server_without_range_support_restarts(server: Server, archive: Path,
                                               tmp_path: Path) -> None:
    server.honour_range = False
    (tmp_path / "nature_12K.zip.part").write_bytes(b"stale bytes from elsewhere")
    download_file(url_of(server), tmp_path / "nature_12K.zip", progress=False)
    assert (tmp_path / "nature_12K.zip").read_bytes() == archive.read_bytes()


def test_file_url_resumes_too(archive: Path, tmp_path: Path) -> None:
    (tmp_path / "a.zip.part").write_bytes(archive.read_bytes()[:500])
    download_file(archive.as_uri(), tmp_path / "a.zip", progress=False)
    assert (tmp_path / "a.zip").read_bytes() == archive.read_bytes()


def test_checksum_and_size_mismatch(server: Server, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"expected 0{64}"):
        download_file(url_of(server), tmp_path / "x.zip", sha256="0" * 64, progress=False)
    assert not (tmp_path / "x.zip").exists() and not (tmp_path / "x.zip.part").exists()
    with pytest.raises(DataError, match="expected 12"):
        download_file(url_of(server), tmp_path / "y.zip", expected_size=12, progress=False)


def test_http_errors_are_clear(server: Server, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="HTTP 404"):
        download_file(url_of(server).replace("nature", "other"), tmp_path / "x", progress=False)
    with pytest.raises(DataError, match="no such file"):
        download_file("file:///no/such/archive.zip", tmp_path / "x", progress=False)


def test_corrupt_archive_is_refused(archive: Path, tmp_path: Path) -> None:
    corrupt = tmp_path / "nature_12K.zip"
    corrupt.write_bytes(archive.read_bytes()[:-300])  # the central directory is cut off
    with pytest.raises(DataError, match="not a readable zip"):
        INaturalist12K.download(tmp_path, url="file:///unused.zip", progress=False)
    flipped = bytearray(archive.read_bytes())
    offset = flipped.index(b"\xff\xd8") + 200  # inside the first member's data
    flipped[offset] ^= 0xFF
    corrupt.write_bytes(bytes(flipped))
    with pytest.raises(DataError, match="damaged"):
        INaturalist12K.extract(corrupt, tmp_path / "out")
    assert not (tmp_path / "out" / "inaturalist_12K").exists()


def test_wrong_layout_is_refused(tmp_path: Path) -> None:
    other = build_archive(tmp_path / "other.zip", top="flowers")
    with pytest.raises(DataError, match="not the iNaturalist 12K archive"):
        INaturalist12K.download(tmp_path / "root", url=other.as_uri(), progress=False)


@pytest.mark.parametrize("member", ["../escape.txt", "/abs.txt", "a/../../escape.txt",
                                    "..\\escape.txt", "C:/escape.txt"])
def test_extraction_refuses_members_outside_the_target(tmp_path: Path, member: str) -> None:
    crafted = tmp_path / "crafted.zip"
    with zipfile.ZipFile(crafted, "w") as handle:
        handle.writestr("inaturalist_12K/train/Aves/ok.txt", b"fine")
        handle.writestr(zipfile.ZipInfo(member), b"evil")
    target = tmp_path / "deep" / "target"
    with pytest.raises(DataError, match="outside the target"):
        safe_extract(crafted, target)
    assert not (tmp_path / "escape.txt").exists()
    assert not (tmp_path / "deep" / "escape.txt").exists()
    assert not (target / "inaturalist_12K").exists()
