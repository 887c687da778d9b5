"""Why a night failed, in the operator's terms: the table and the fix.

The engines' own errors for a damaged lake name no table (delta-rs: "Json
error: Truncated record" for a torn log file), or only a file path (a data
file removed by a VACUUM past the watermark), or only an errno (a full disk).
:func:`explain` turns such an exception into one line that names the table
(found from the path, or by checking the tables' newest log files) and what to
do; ``None`` when it does not recognise the failure. ``deltarec nightly``
prints it under the error. Reads: the lake's ``_delta_log`` files (local
lakes only), on failure only. Writes: nothing.
"""
from __future__ import annotations

import errno
import json
import os
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config import Config

# the newest log files read per table when looking for a torn one (a torn file is a recent write)
LOG_FILES_CHECKED = 20
_DATA_FILE = re.compile(r"(/[^\s'\"]*/part-[^\s'\":]+)")  # a data file's absolute path in an error


def tables_of(cfg: "Config") -> list[str]:
    """Every table name of ``lake.*`` (the fields ending in ``_table``)."""
    lk = cfg.lake
    return [v for k, v in vars(lk).items() if k.endswith("_table") and isinstance(v, str)]


def torn_log_files(root: str, tables: list[str]) -> list[tuple[str, str]]:
    """(table, log file) of each of the newest log files that is not valid JSON lines."""
    out = []
    for table in tables:
        log_dir = os.path.join(root, table, "_delta_log")
        if not os.path.isdir(log_dir):
            continue
        names = sorted(n for n in os.listdir(log_dir) if n.endswith(".json"))[-LOG_FILES_CHECKED:]
        for name in names:
            path = os.path.join(log_dir, name)
            try:
                with open(path, encoding="utf-8") as f:
                    for line in f:
                        if line.strip():
                            json.loads(line)
            except (ValueError, UnicodeDecodeError):
                out.append((table, path))
    return out


def _table_of(path: str, root: str, tables: list[str]) -> str | None:
    rel = os.path.relpath(path, root)
    head = rel.split(os.sep)[0]
    return head if head in tables else None


def explain(e: BaseException, cfg: "Config") -> str | None:
    """One line naming the table and the fix for a damaged or full lake; None otherwise."""
    text = f"{type(e).__name__}: {e}"
    root = cfg.lake.root.removeprefix("file://").removeprefix("file:")
    tables = tables_of(cfg)
    if isinstance(e, OSError) and e.errno == errno.ENOSPC or "No space left on device" in text \
            or "os error 28" in text:
        where = getattr(e, "filename", None) or root
        return (f"the disk is full (ENOSPC, errno 28) writing under {where}: free space on the volume of "
                f"lake.root ({cfg.lake.root}; checkpoints go to {cfg.lake.checkpoints_dir} under it) or move "
                "lake.root, then run again: nothing after the last ledger commit was recorded")
    if re.search(r"json|Truncated record|EOF while parsing|expected value", text, re.I) and os.path.isdir(root):
        torn = torn_log_files(root, tables)
        if torn:
            table, path = torn[0]
            return (f"the Delta log of table {table!r} is damaged: {path} is not valid JSON (a write cut off "
                    "or the file was edited). Restore that file from a backup (or the table from one); if "
                    "it is the newest log file and its write never finished, moving it away returns the "
                    "table to the version before it. Nothing after the last ledger commit was recorded")
    m = _DATA_FILE.search(text)
    if m and re.search(r"not found|No such file", text, re.I):
        table = _table_of(m.group(1), root, tables)
        if table == cfg.lake.events_table:
            return (f"source table {table!r} no longer has the data files of the versions after the "
                    f"watermark (missing: {m.group(1)}): it was VACUUMed (or files were removed) before "
                    "this model consumed them. Restore the files from a backup, or start the model over on "
                    "the current snapshot (a new lake.runs_table); and keep the source's VACUUM retention "
                    "(delta.deletedFileRetentionDuration) longer than the time between nights")
        if table is not None:
            return (f"table {table!r} is missing a data file its log still lists ({m.group(1)}): it was "
                    "VACUUMed too early or files were deleted by hand. Restore the file from a backup, or "
                    "restore the table to a version whose files exist (Delta RESTORE)")
    return None
