"""Atomic file/directory writes, safe loads (no pickled code is ever executed), and reading files
that live inside tar shards."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

# "<shard>.tar#<member>" names a file inside a tar shard (blip2.data.shards).
MEMBER_SEP = "#"


def split_member(path: str | Path) -> tuple[str, str] | None:
    """(tar path, member name) for a tar-member path, None for an ordinary file."""
    tar, sep, member = str(path).rpartition(MEMBER_SEP)
    return (tar, member) if sep and tar.endswith(".tar") else None


@functools.lru_cache(maxsize=32)
def _open_tar(path: str, pid: int, mtime_ns: int) -> tarfile.TarFile:
    """One open TarFile per shard, process and version: its member index is scanned once, and a
    forked DataLoader worker never shares a file offset with its parent."""
    return tarfile.open(path)


def _member(path: str) -> tuple[tarfile.TarFile, tarfile.TarInfo]:
    tar, member = split_member(path)  # type: ignore[misc]
    st = os.stat(tar)  # FileNotFoundError for a missing shard
    try:
        archive = _open_tar(tar, os.getpid(), st.st_mtime_ns)
        return archive, archive.getmember(member)
    except KeyError:
        raise FileNotFoundError(f"{member} is not in the shard {tar}") from None
    except tarfile.TarError as e:  # callers skip unreadable images on OSError
        raise OSError(f"shard {tar} is unreadable ({e})") from e


def open_binary(path: str | Path) -> BinaryIO:
    """Open a file, or a member of a tar shard, for reading bytes."""
    if split_member(path) is None:
        return open(path, "rb")
    archive, info = _member(str(path))
    try:
        f = archive.extractfile(info)
    except tarfile.TarError as e:
        raise OSError(f"{path}: {e}") from e
    if f is None:
        raise FileNotFoundError(f"{path} is not a regular file in its shard")
    return io.BytesIO(f.read())


def source_stat(path: str | Path) -> tuple[int, int] | None:
    """(size, mtime_ns) of a file, or of a tar member (the member's size, the shard's mtime); None
    when it cannot be read. Caches use it to notice changed inputs."""
    member = split_member(path)
    try:
        if member is None:
            st = os.stat(path)
            return st.st_size, st.st_mtime_ns
        _, info = _member(str(path))
        return info.size, os.stat(member[0]).st_mtime_ns
    except OSError:
        return None


def _fsync_tree(path: Path) -> None:
    for p in [path, *path.rglob("*")]:
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_dir(dest: str | Path) -> Iterator[Path]:
    """Write a directory under a temporary name, then swap it into place.

    A crash at any point leaves either the old complete directory or the new complete one (a stale
    `*.tmp-*` sibling may remain and is ignored by readers).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".tmp-", dir=dest.parent))
    try:
        yield tmp
        _fsync_tree(tmp)
        old = None
        if dest.exists():
            old = dest.with_name(dest.name + ".old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(dest, old)
        os.replace(tmp, dest)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".tmp-", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path) -> Any:
    with open(path) as f:
        return json.load(f)
