"""Verified downloads and safe archive extraction for the real datasets.

A download streams into a temporary ``<dest>.part-<random>`` file next to ``dest``, hashing as it
writes, and only an fsynced file whose byte count and checksum have been checked is renamed onto
``dest``. Any failure removes the temporary file, so ``dest`` is either absent or complete.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import posixpath
import stat
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import BinaryIO

from tqdm.auto import tqdm


class DownloadError(RuntimeError):
    """A download or extraction failed; the message names the URL or archive and what went wrong."""


def sha256sum(path: str | Path, chunk: int = 1 << 20) -> str:
    """Return the hex SHA-256 digest of the file at ``path``.

    Args:
        path: file to hash.
        chunk: read size in bytes.

    Returns:
        The lowercase hex digest (64 characters), as printed by ``sha256sum``.
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _content_length(response: http.client.HTTPResponse) -> int | None:
    value = response.headers.get("Content-Length")
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return None


def download(
    url: str,
    dest: str | Path,
    sha256: str | None = None,
    size: int | None = None,
    timeout: float = 60,
    chunk: int = 1 << 20,
    progress: bool = True,
) -> Path:
    """Download ``url`` to ``dest``, verifying its length and (optionally) its SHA-256.

    If ``dest`` already exists and ``sha256`` is given and matches, nothing is downloaded. Without
    ``sha256`` an existing file cannot be trusted, so it is downloaded again and replaced.

    Args:
        url: http(s) or file URL.
        dest: final file path; its folder is created if needed.
        sha256: expected hex SHA-256 of the file, or None to skip the check.
        size: expected size in bytes, or None; checked in addition to the server's Content-Length.
        timeout: socket timeout in seconds for connecting and for each read.
        chunk: read size in bytes.
        progress: show a tqdm progress bar.

    Returns:
        ``dest`` as a Path.

    Raises:
        DownloadError: on an HTTP error, a connection failure or timeout, a body shorter than its
            Content-Length or not of ``size`` bytes, or a checksum mismatch. The temporary file is removed and ``dest`` is left untouched.
    """
    dest = Path(dest)
    expected_sha = sha256.lower() if sha256 is not None else None
    if expected_sha is not None and dest.is_file() and sha256sum(dest, chunk) == expected_sha:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=dest.name + ".part-", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            got, digest, advertised = _stream(url, out, timeout, chunk, progress, dest.name)
            out.flush()
            # fsync before the rename so a crash cannot leave a dest whose name says "complete"
            # but whose blocks never reached the disk.
            os.fsync(out.fileno())
        if advertised is not None and got != advertised:
            raise DownloadError(
                f"download of {url} is incomplete: the server announced {advertised} bytes "
                f"(Content-Length) but sent {got}"
            )
        if size is not None and got != size:
            raise DownloadError(
                f"download of {url} has the wrong size: expected {size} bytes, got {got}"
            )
        if expected_sha is not None and digest != expected_sha:
            raise DownloadError(
                f"checksum mismatch for {url}: expected sha256 {expected_sha}, got {digest} "
                f"({got} bytes); the file was discarded"
            )
        os.replace(tmp, dest)
    except BaseException as e:
        # BaseException so that Ctrl-C also removes the partial file.
        tmp.unlink(missing_ok=True)
        if isinstance(e, DownloadError) or not isinstance(e, Exception):
            raise
        raise DownloadError(f"download of {url} failed: {type(e).__name__}: {e}") from e
    return dest


def _stream(
    url: str, out: BinaryIO, timeout: float, chunk: int, progress: bool, label: str
) -> tuple[int, str, int | None]:
    """Copy the body of ``url`` into ``out``; return (bytes written, sha256 hex, Content-Length)."""
    request = urllib.request.Request(url, headers={"User-Agent": "ctxseg-downloader"})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        raise DownloadError(f"download of {url} failed: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", e)
        raise DownloadError(f"download of {url} failed: cannot connect ({reason})") from None
    h = hashlib.sha256()
    got = 0
    advertised = _content_length(response)
    bar = tqdm(
        total=advertised, unit="B", unit_scale=True, unit_divisor=1024, desc=label,
        disable=not progress,
    )
    with response, bar:
        try:
            while block := response.read(chunk):
                out.write(block)
                h.update(block)
                got += len(block)
                bar.update(len(block))
        except (OSError, http.client.HTTPException) as e:
            expected = f" of {advertised}" if advertised is not None else ""
            raise DownloadError(
                f"download of {url} was interrupted after {got}{expected} bytes: "
                f"{type(e).__name__}: {e}"
            ) from None
    return got, h.hexdigest(), advertised


def _check_member_path(name: str, archive: Path) -> None:
    """Reject member names that would land outside the extraction folder."""
    norm = posixpath.normpath(name.replace("\\", "/"))
    # A drive letter ("C:...") is absolute on Windows even without a leading slash.
    if norm.startswith("/") or norm == ".." or norm.startswith("../") or ":" in norm.split("/")[0]:
        raise DownloadError(
            f"refusing to extract {archive}: member {name!r} would escape the target folder"
        )


def extract_archive(archive: str | Path, dest_dir: str | Path) -> Path:
    """Extract a zip or tar (``.tar``, ``.tar.gz``, ``.tgz``, ``.tar.bz2``, ``.tar.xz``) archive.

    Every member is checked before anything is written: a member or link whose path would leave
    ``dest_dir`` (absolute, or climbing out with ``..``), a symlink inside a zip, or a device file
    makes the whole archive rejected.

    Args:
        archive: path of the archive; the format is detected from its content, not its name.
        dest_dir: folder to extract into; created if needed.

    Returns:
        ``dest_dir`` as a Path.

    Raises:
        DownloadError: the archive is not a zip or tar file, is corrupt, or has an unsafe member.
    """
    archive, dest_dir = Path(archive), Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                for info in zf.infolist():
                    _check_member_path(info.filename, archive)
                    if stat.S_ISLNK(info.external_attr >> 16):
                        raise DownloadError(
                            f"refusing to extract {archive}: member {info.filename!r} is a symlink"
                        )
                zf.extractall(dest_dir)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tf:
                members = tf.getmembers()
                for m in members:
                    _check_member_path(m.name, archive)
                    if m.islnk() or m.issym():
                        # Hard links name an archive member; symlinks are relative to their folder.
                        base = "" if m.islnk() else posixpath.dirname(m.name)
                        _check_member_path(posixpath.join(base, m.linkname), archive)
                    elif not (m.isfile() or m.isdir()):
                        raise DownloadError(
                            f"refusing to extract {archive}: member {m.name!r} is not a regular "
                            "file or folder"
                        )
                # The "data" filter (Python >= 3.11.4) re-checks the same rules inside tarfile.
                kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                tf.extractall(dest_dir, members=members, **kwargs)
        else:
            raise DownloadError(f"cannot extract {archive}: not a zip or tar archive")
    except (zipfile.BadZipFile, tarfile.TarError, EOFError) as e:
        raise DownloadError(f"cannot extract {archive}: corrupt archive ({e})") from None
    return dest_dir
