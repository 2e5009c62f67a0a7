"""Local paths and remote URLs (`s3://`, and any other fsspec protocol) behind one small interface.

Remote files go through fsspec (s3fs for `s3://`). Credentials and endpoints come from the usual places of the
protocol's library: for S3, the AWS environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_ENDPOINT_URL`
for an S3-compatible server) or fsspec's configuration (`FSSPEC_S3_ENDPOINT_URL`, ~/.config/fsspec).
"""

from __future__ import annotations

import os
from typing import IO


def is_url(path: str) -> bool:
    return "://" in str(path)


def join(root: str, name: str) -> str:
    """`name` under `root`; an absolute path or URL in `name` is used as is."""
    if is_url(name) or os.path.isabs(name):
        return name
    if is_url(root):
        return root.rstrip("/") + "/" + name
    return os.path.join(root, name)


def parent(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[0] if is_url(path) else os.path.dirname(os.path.abspath(path))


def _fs(path: str):
    import fsspec

    return fsspec.core.url_to_fs(path)


def read_bytes(path: str) -> bytes:
    if not is_url(path):
        with open(path, "rb") as f:
            return f.read()
    fs, p = _fs(path)
    return fs.cat_file(p)


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


def exists(path: str) -> bool:
    if not is_url(path):
        return os.path.exists(path)
    fs, p = _fs(path)
    return fs.exists(p)


def is_dir(path: str) -> bool:
    if not is_url(path):
        return os.path.isdir(path)
    fs, p = _fs(path)
    return fs.isdir(p)


def listdir(path: str) -> list[str]:
    """Names (not paths) of the entries of a folder."""
    if not is_url(path):
        return os.listdir(path)
    fs, p = _fs(path)
    return [e.rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(p, detail=False)]


def open_binary(path: str, mode: str = "rb") -> IO[bytes]:
    """An open binary file ("rb" or "wb"); the caller closes it."""
    if not is_url(path):
        return open(path, mode)
    fs, p = _fs(path)
    return fs.open(p, mode)


def makedirs(path: str) -> None:
    if not is_url(path):
        os.makedirs(path, exist_ok=True)
    # object stores have no folders: writing a key creates its "folder"


def size(path: str) -> int:
    if not is_url(path):
        return os.path.getsize(path)
    fs, p = _fs(path)
    return int(fs.size(p))
