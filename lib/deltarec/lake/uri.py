"""Lake paths and URIs: one place that opens what engines, Spark and the
ledger hand out, and that stores lake paths relative to the lake root.

The forms met in practice:

- plain local paths (``/data/lake/...``) and ``file:`` URIs in Hadoop's form
  (``file:/data/...``, what Spark's ``inputFiles()`` returns) or RFC 8089's
  (``file:///data/...``); ``file:`` URIs are percent-decoded;
- object stores through ``pyarrow.fs``: ``s3://`` (and Hadoop's ``s3a://`` /
  ``s3n://``, the same buckets), ``gs://`` / ``gcs://``, ``abfs://`` /
  ``abfss://`` (Azure Data Lake Gen2), ``hdfs://`` (needs libhdfs);
- ``dbfs:/x``: Databricks' FUSE mount ``/dbfs/x`` (``dbfs:/Volumes/...``:
  ``/Volumes/...``), on the cluster's nodes.

Local paths are opened with plain Python file IO (pyarrow's LocalFileSystem
after a delta-rs read aborts the interpreter at exit here: "terminate called
without an active exception"); everything else through pyarrow. Unsupported
schemes (``wasb://``: Azure's legacy blob driver) are refused naming the URI.
"""
from __future__ import annotations

import os
import re
from urllib.parse import unquote

from .engine import LakeError

# Hadoop's scheme -> pyarrow's (same storage, another client)
_ALIASES = {"s3a": "s3", "s3n": "s3", "gcs": "gs"}
_PYARROW = {"s3", "gs", "abfs", "abfss", "hdfs", "viewfs"}
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):(.*)$")


def scheme(uri: str) -> str | None:
    """The URI's scheme in lower case, or None for a plain path."""
    m = _SCHEME.match(uri)
    if not m or len(m.group(1)) == 1:  # 'C:' is a Windows drive, not a scheme
        return None
    return m.group(1).lower()


def local_path(uri: str) -> str | None:
    """The local file-system path ``uri`` names (plain paths, ``file:``,
    ``dbfs:`` through its FUSE mount), or None for a remote URI."""
    s = scheme(uri)
    if s is None:
        return uri
    rest = _SCHEME.match(uri).group(2)
    if s == "file":
        if rest.startswith("//"):  # file://host/path: only an empty host or localhost is this machine
            host, _, path = rest[2:].partition("/")
            if host not in ("", "localhost"):
                raise LakeError(f"{uri!r} names a file on host {host!r}: use a path this machine can open")
            rest = "/" + path
        return unquote(rest)
    if s == "dbfs":  # Unity Catalog volumes are mounted at /Volumes, the rest of DBFS at /dbfs
        rest = "/" + rest.lstrip("/")
        return rest if rest.startswith("/Volumes/") else "/dbfs" + rest
    return None


def is_local(uri: str) -> bool:
    return local_path(uri) is not None


def filesystem(uri: str):
    """(pyarrow FileSystem, path inside it) for a remote URI; (None, local
    path) for a local one, which callers open with plain file IO."""
    path = local_path(uri)
    if path is not None:
        return None, path
    s = scheme(uri)
    s2 = _ALIASES.get(s, s)
    if s2 not in _PYARROW:
        raise LakeError(f"cannot open {uri!r}: scheme {s}:// is not supported (use a local path, file:, dbfs:, "
                        "s3://, s3a://, gs://, abfss:// or hdfs://)")
    from pyarrow import fs as pafs

    if s2 != s:
        uri = s2 + uri[len(s):]
    try:
        return pafs.FileSystem.from_uri(uri)
    except Exception as e:  # credentials, region, libhdfs: say which URI and why
        raise LakeError(f"cannot open {uri!r} with pyarrow ({type(e).__name__}: {e})") from e


def delta_rs_uri(uri: str) -> str:
    """``uri`` as delta-rs (object_store) takes it: local forms become plain
    paths, Hadoop's s3a/s3n become s3."""
    path = local_path(uri)
    if path is not None:
        return path
    s = scheme(uri)
    return _ALIASES.get(s, s) + uri[len(s):]


def join(root: str, relative: str) -> str:
    return f"{root.rstrip('/')}/{relative.lstrip('/')}"


def is_absolute(path: str) -> bool:
    """A URI with a scheme, or an absolute local path."""
    return scheme(path) is not None or os.path.isabs(path)


def relative_to(root: str, path: str) -> str | None:
    """``path`` relative to the lake ``root`` when it lies under it (in any of
    the forms that name the same place), else None."""
    for r, p in ((root, path), (_comparable(root), _comparable(path))):
        if r is None or p is None:
            continue
        r = r.rstrip("/") + "/"
        if p.startswith(r) and len(p) > len(r):
            return p[len(r):]
    return None


def resolve(root: str, path: str) -> str:
    """A path as stored (relative to the lake root, or absolute) → a path or
    URI to open."""
    return path if not path or is_absolute(path) else join(root, path)


def _comparable(uri: str) -> str | None:
    try:
        path = local_path(uri)
    except LakeError:
        return None
    return os.path.normpath(path) if path is not None else delta_rs_uri(uri)
