"""``deltarec forget USER_ID... [--reason TEXT] [--apply] [--status] [--json]``."""
from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import argparse

    from ..config import Config

HELP = "erase users from every table, file, the model and its checkpoints (right to be forgotten)"
DESCRIPTION = (
    "File forget requests for USER_IDs (raw ids, as the source table has them) into privacy.requests_table. "
    "The next nightly run carries out every pending request, or --apply does it now: every derived table keyed "
    "by user (one commit each), the champion and every retained checkpoint (the user's rows reset or re-trained "
    "from other users only), MLflow artifacts; then, privacy.retention_hours later, VACUUM. --status shows "
    "pending and done requests (exit 1 when one is older than privacy.deadline_days). Unknown ids are recorded as "
    "done with zero rows; empty or malformed ids are refused. A source-table DELETE of a user's rows is a "
    "correction, not a forget.")


def add_parser(sub, common: Callable[["argparse.ArgumentParser"], None]) -> None:
    p = sub.add_parser("forget", help=HELP, description=DESCRIPTION)
    common(p)
    p.add_argument("user_ids", nargs="*", metavar="USER_ID", help="raw user ids to forget")
    p.add_argument("--reason", default=None, help="why (kept in forget_log; no personal data, please)")
    p.add_argument("--by", default=None, help="who asks (default: the OS user)")
    p.add_argument("--apply", action="store_true", help="carry out pending requests now, then VACUUM what is due")
    p.add_argument("--status", action="store_true", help="pending and done requests, overdue flags")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def run(args: "argparse.Namespace", cfg: "Config", lake_for: Callable[..., object]) -> int:
    """``lake_for(spark: bool)`` opens the configured lake (Spark only for delta-spark)."""
    from ..lake.engine import LakeError
    from ..registry.core import current_user
    from . import apply_pending, describe_status, file_requests, status
    from .keys import PrivacyError

    if not (args.user_ids or args.apply or args.status):
        print("deltarec forget: name USER_IDs to forget, or --apply / --status", file=sys.stderr)
        return 2
    out: dict = {}
    try:
        lake = lake_for(cfg.lake.engine == "delta-spark")
        if args.user_ids:
            out["filed"] = file_requests(cfg, lake, list(args.user_ids), by=args.by or current_user(),
                                         reason=args.reason)
            if not args.json:
                print(f"filed {len(out['filed'])} forget request(s): "
                      + ", ".join(r["request_id"] for r in out["filed"])
                      + ("" if args.apply else "; the next nightly run carries them out (or run --apply)"))
        if args.apply:
            out["applied"] = apply_pending(cfg, lake)
            if not args.json:
                e, v = out["applied"].get("erased"), out["applied"].get("vacuumed")
                print(f"erased batch {e['batch']}: {e['requests']} request(s); rows {e['rows_removed']}; "
                      f"checkpoints {e['checkpoints']}" if e else "no pending requests")
                if v.get("batches"):
                    print(f"VACUUMed batches {v['batches']}: {v['files_vacuumed']} files deleted")
                elif v.get("waiting_for"):
                    print(f"VACUUM waits for model(s) {v['waiting_for']} to consume the source table's erase")
        if args.status:
            out["status"] = status(cfg, lake)
            if not args.json:
                print(describe_status(out["status"]))
    except (PrivacyError, LakeError) as e:
        print(f"deltarec forget: {e}", file=sys.stderr)
        return 2 if isinstance(e, PrivacyError) else 1
    if args.json:
        print(json.dumps(out, indent=1, default=str))
    return 1 if args.status and out["status"]["overdue"] else 0
