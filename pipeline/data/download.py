"""The one download-and-verify path every dataset module uses.

:func:`fetch` streams a URL (trying mirrors in order) to a temporary sibling
of ``dest``, hashes it on the way, and renames it into place only when the
checksum matches. :func:`extract_archive` unpacks into a temporary sibling and
renames the finished tree into place. Either way a failure leaves nothing
behind but the error: no ``.part`` file, no half-extracted directory. A transfer
is bounded by :class:`Limits` (params.yaml ``data.download``): a timeout per socket
operation, a deadline for the whole fetch, and a minimum rate over a window, so a
server that trickles bytes cannot hang a job. ``python -m pipeline`` turns SIGTERM
(SLURM's ``scancel``) into an exception, so the same cleanup runs; what a SIGKILL
leaves is removed by :func:`remove_leftovers` on the next start.

>>> fetch(["https://example.org/a.tar.gz", "https://mirror.example/a.tar.gz"],
...       "data/a.tar.gz", ("md5", "0123..."))                      # doctest: +SKIP
PosixPath('data/a.tar.gz')
"""
from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import tarfile
import tempfile
import time
import urllib.request
import zipfile
import zlib
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from pipeline.progress import progress

CHUNK = 1 << 20  # 1 MiB: progress granularity


class DataError(RuntimeError):
    """A dataset could not be obtained or is malformed; the message says what to do."""


@dataclass(frozen=True)
class Limits:
    """How long a download may take; the defaults are params.yaml's ``data.download``.

    A read blocks for at most ``timeout_s``, so the deadline and the rate are
    checked at least that often."""

    timeout_s: float = 60.0              # per socket operation (connect, each read)
    deadline_s: float = 7200.0           # the whole fetch, every mirror together
    min_rate_bytes_per_s: float = 20000.0
    rate_window_s: float = 120.0         # the rate is the mean over the last window


def file_digest(path: str | Path, algo: str) -> str:
    """Hex digest of a file, read in chunks (``algo`` is any hashlib name: md5, sha256...)."""
    digest = hashlib.new(algo)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_checksum(path: str | Path, checksum: tuple[str, str]) -> None:
    """Raise DataError unless ``path`` exists and has digest ``checksum = (algo, hex)``."""
    algo, expected = checksum
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    actual = file_digest(path, algo)
    if actual != expected.lower():
        raise DataError(f"{path}: {algo} is {actual}, expected {expected} "
                        "(corrupted, truncated, or a different file)")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def temp_sibling(dest: Path, *, directory: bool) -> Iterator[Path]:
    """A temporary file or folder next to ``dest`` (same filesystem, so rename is atomic).

    Removed on exit unless the body renamed it away.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{dest.name}."
    if directory:
        tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=prefix, suffix=".tmp"))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; the result is renamed, not copied
    else:
        fd, name = tempfile.mkstemp(dir=dest.parent, prefix=prefix, suffix=".part")
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def replace_dir(src: Path, dest: Path) -> None:
    """Move the finished folder ``src`` to ``dest``, replacing what was there.

    ``rename`` cannot replace a non-empty folder, so an old ``dest`` is first
    renamed aside and deleted only after the new one is in place.
    """
    old = None
    if dest.exists():
        old = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".old"))
        os.replace(dest, old / "x")
    os.replace(src, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_leftovers(dest: str | Path) -> list[Path]:
    """Remove what a killed run left next to ``dest``: ``.<name>.*.part`` files and
    ``.<name>.*.tmp`` / ``.old`` folders (only Snakemake's lock keeps a second job off
    the same output, so no live writer can own them). Returns what was removed."""
    dest = Path(dest)
    if not dest.parent.is_dir():
        return []
    found = [p for suffix in (".part", ".tmp", ".old")
             for p in dest.parent.glob(f".{dest.name}.*{suffix}")]
    for path in found:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    return found


def _pieces(response, limits: Limits, deadline: float) -> Iterator[bytes]:
    """The body in pieces of at most CHUNK bytes, checking the deadline and the rate
    after every read (``read1`` returns as soon as any bytes arrive)."""
    read = getattr(response, "read1", response.read)
    start = time.monotonic()
    window = deque([(start, 0)])  # (time, bytes received so far)
    received, buffer = 0, bytearray()
    while True:
        data = read(CHUNK - len(buffer))
        now = time.monotonic()
        received += len(data)
        buffer += data
        if not data or len(buffer) >= CHUNK:
            if buffer:
                yield bytes(buffer)
            buffer.clear()
            if not data:
                return
        if now > deadline:
            raise DataError(f"deadline of {limits.deadline_s:g} s passed after {received} bytes "
                            "(data.download.deadline_s)")
        window.append((now, received))
        while len(window) > 1 and window[1][0] <= now - limits.rate_window_s:
            window.popleft()
        t0, r0 = window[0]
        if now - start >= limits.rate_window_s and now > t0:
            rate = (received - r0) / (now - t0)
            if rate < limits.min_rate_bytes_per_s:
                raise DataError(f"{rate:.0f} bytes/s over the last {now - t0:.0f} s, below "
                                f"{limits.min_rate_bytes_per_s:g} (data.download."
                                "min_rate_bytes_per_s)")


def _stream(url: str, out: Path, digest, limits: Limits, deadline: float) -> None:
    request = urllib.request.Request(url, headers={"User-Agent": "phantom-grad-pipeline"})
    timeout = max(1e-3, min(limits.timeout_s, deadline - time.monotonic()))
    with urllib.request.urlopen(request, timeout=timeout) as response, open(out, "wb") as sink:
        length = response.headers.get("Content-Length")
        expected = int(length) if length and length.isdigit() else None
        total = -(-expected // CHUNK) if expected else None
        received = 0
        for chunk in progress(_pieces(response, limits, deadline), total=total,
                              desc=f"{Path(url).name} (MiB)"):
            sink.write(chunk)
            digest.update(chunk)
            received += len(chunk)
    if expected is not None and received != expected:
        raise DataError(f"connection closed after {received} of {expected} bytes")


def fetch(urls: str | Sequence[str], dest: str | Path, checksum: tuple[str, str] | None,
          *, limits: Limits = Limits()) -> Path:
    """Download the first URL of ``urls`` that yields a file with the right checksum.

    Args:
        urls: one URL or several (primary first, then mirrors); http(s):// or file://.
            Empty entries are skipped.
        dest: final path; written only once a download verified.
        checksum: ``(algo, hex digest)``, e.g. ``("md5", "c58f...")``; None skips the
            check (only for files that carry no published checksum).
        limits: timeout per socket operation, deadline of the whole fetch, minimum rate.

    Returns:
        ``dest``.

    Raises:
        DataError: every URL failed (unreachable, HTTP error, short read, wrong
            checksum, too slow, past the deadline); the message lists each URL with
            its reason.
    """
    dest = Path(dest)
    deadline = time.monotonic() + limits.deadline_s
    urls = [u for u in ([urls] if isinstance(urls, str) else urls) if u]
    if not urls:
        raise DataError(f"no URL to download {dest.name} from")
    remove_leftovers(dest)
    failures = []
    for url in urls:
        if time.monotonic() > deadline:
            failures.append(f"{url}: not tried, the deadline of {limits.deadline_s:g} s passed")
            continue
        with temp_sibling(dest, directory=False) as part:
            digest = hashlib.new(checksum[0] if checksum else "sha256")
            try:
                _stream(url, part, digest, limits, deadline)
            except (OSError, http.client.HTTPException, ValueError, DataError) as err:
                # OSError covers URLError/HTTPError, refused and reset connections and
                # timeouts; HTTPException covers IncompleteRead; ValueError bad URLs.
                failures.append(f"{url}: {getattr(err, 'reason', None) or err}")
                continue
            if checksum and digest.hexdigest() != checksum[1].lower():
                failures.append(f"{url}: {checksum[0]} is {digest.hexdigest()}, expected "
                                f"{checksum[1]} (corrupted or truncated download)")
                continue
            os.replace(part, dest)
            print(f"downloaded {url} -> {dest}", flush=True)
            return dest
    raise DataError(f"could not download {dest.name}:\n  " + "\n  ".join(failures))


def extract_archive(archive: str | Path, dest: str | Path) -> Path:
    """Unpack a .tar(.gz|.bz2|.xz) or .zip into ``dest``, atomically.

    The archive is unpacked into a temporary folder next to ``dest`` and renamed
    into place only once every member is out; an existing ``dest`` is replaced.
    Tar members are extracted with the ``data`` filter (no absolute paths, no
    ``..``, no devices); zipfile sanitises member names by itself.

    Raises:
        DataError: the archive is missing, truncated or not an archive.
    """
    archive, dest = Path(archive), Path(dest)
    if not archive.is_file():
        raise DataError(f"{archive}: no such archive")
    with temp_sibling(dest, directory=True) as tmp:
        try:
            if zipfile.is_zipfile(archive):
                with zipfile.ZipFile(archive) as zf:
                    zf.extractall(tmp)  # drops absolute paths and ".." by itself
            else:
                with tarfile.open(archive) as tf:
                    tf.extractall(tmp, filter="data")
        except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError, zlib.error) as err:
            # A truncated gzip stream surfaces as EOFError or zlib.error, a damaged
            # header as tarfile.ReadError or gzip.BadGzipFile (an OSError).
            raise DataError(f"{archive}: cannot extract ({type(err).__name__}: {err}); "
                            "the archive is truncated or corrupted") from err
        replace_dir(tmp, dest)
    return dest
