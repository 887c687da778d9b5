"""`deltarec …` subcommands. jobs/*.py call the same functions.

Every subcommand takes ``--conf FILE`` (default: conf/local.yaml when it
exists) and repeated ``--set section.key=value`` overrides.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Callable

from .config import Config, ConfigError, load_config

DEFAULT_CONF = "conf/local.yaml"
log = logging.getLogger("deltarec")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--conf", metavar="FILE", default=os.environ.get("DELTAREC_CONF"),
                   help=f"YAML config (default: $DELTAREC_CONF, else {DEFAULT_CONF} if present)")
    p.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
                   help="override a config value, e.g. --set train.backend=local (repeatable)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="deltarec",
        description="Incremental recommender training on Spark + Delta Lake.",
        epilog="Run `deltarec SUBCOMMAND --help` for each subcommand's options.",
    )
    sub = ap.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")
    p = sub.add_parser("nightly", help="consume new source versions: validate, featurize, train, commit",
                       description="Run one nightly job. With demo.enabled and an empty lake, load the demo "
                                   "history, train the first model, then replay demo.nights days as nights.")
    _common(p)
    p = sub.add_parser("status", help="watermark, recent runs and the current checkpoint",
                       description="Show the run ledger of the configured model.")
    _common(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--all-models", action="store_true", help="runs of every model, not only model.name")
    p.add_argument("--verify", action="store_true", help="re-hash every checkpoint file against the ledger")
    p = sub.add_parser("plan", help="what the next nightly run would consume; writes nothing",
                       description="Show the watermark, the source table's latest version, the version range "
                                   "the next run would consume and its change-feed rows per change type.")
    _common(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = sub.add_parser("config", help="print the resolved config (or one value with --get)")
    _common(p)
    p.add_argument("--get", metavar="KEY", help="print one dotted key, e.g. spark.master")
    return ap


def resolve_config(args: argparse.Namespace) -> Config:
    path = args.conf
    if path is None and Path(DEFAULT_CONF).is_file():
        path = DEFAULT_CONF
    return load_config(path, args.overrides)


def setup_logging(verbose: bool = False) -> None:
    # Our own logs at INFO; py4j/horovod chatter (connection closes in forked
    # workers) only from WARNING up.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    logging.getLogger("deltarec").setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.getLogger("py4j").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    setup_logging(getattr(args, "verbose", False))
    try:
        cfg = resolve_config(args)
    except ConfigError as e:
        print(f"deltarec: config error: {e}", file=sys.stderr)
        return 2
    commands: dict[str, Callable[[argparse.Namespace, Config], int]] = {
        "nightly": cmd_nightly, "status": cmd_status, "config": cmd_config, "plan": cmd_plan,
    }
    return commands[args.command](args, cfg)


# ------------------------------------------------------------ commands
def cmd_config(args, cfg: Config) -> int:
    if args.get:
        try:
            value = cfg.get(args.get)
        except ConfigError as e:
            print(f"deltarec: {e}", file=sys.stderr)
            return 2
        print("" if value is None else (json.dumps(value) if isinstance(value, (dict, list)) else value))
    else:
        import yaml

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    return 0


def cmd_nightly(args, cfg: Config) -> int:
    return run_nightly_job(cfg)


def run_nightly_job(cfg: Config) -> int:
    """parse → config → session → one library call → exit code (shared with jobs/nightly.py)."""
    from .pipeline.demo import run_configured
    from .spark import build_spark

    log.info("config: %s", cfg.to_json())
    spark = build_spark(cfg)
    try:
        run_configured(spark, cfg)
    except Exception as e:  # one readable line, then the traceback in debug
        log.debug("nightly failed", exc_info=True)
        print(f"deltarec nightly: FAILED: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    finally:
        spark.stop()
    return 0


def cmd_plan(args, cfg: Config) -> int:
    from .pipeline.plan import describe_plan, plan
    from .spark import build_spark

    p = plan(build_spark(cfg), cfg)
    print(json.dumps(p, indent=1) if args.json else describe_plan(p))
    return 0


def cmd_status(args, cfg: Config) -> int:
    from .lake import open_lake
    from .lake.ledger import Ledger
    from .train.checkpoint import CheckpointError, verify_checkpoint

    lake = open_lake(cfg.lake, None) if cfg.lake.engine != "delta-spark" else _spark_lake(cfg)
    ledger = Ledger(lake, cfg.lake.runs_table)
    model = None if args.all_models else cfg.model.name
    runs = ledger.runs(model)
    watermark = ledger.watermark(cfg.model.name)
    latest_source = lake.version(cfg.lake.events_table)
    entries = []
    for r in runs:
        d = r.to_json_dict()
        if args.verify:
            try:
                verify_checkpoint(r.checkpoint_path, r.checkpoint_sha256)
                d["checkpoint"]["verified"] = True
            except CheckpointError as e:
                d["checkpoint"]["verified"] = False
                d["checkpoint"]["error"] = str(e)
        entries.append(d)
    current = ledger.latest(cfg.model.name)
    if args.json:
        print(json.dumps({"model": cfg.model.name, "watermark": watermark,
                          "source_table": cfg.lake.events_table, "source_latest_version": latest_source,
                          "lake": lake.root, "engine": lake.name,
                          "current_checkpoint": current.to_json_dict()["checkpoint"] if current else None,
                          "runs": entries}, indent=1))
    else:
        print(f"lake {lake.root} ({lake.name}); model {cfg.model.name!r}")
        print(f"watermark: {watermark}   {cfg.lake.events_table} latest version: {latest_source}"
              + ("   (up to date)" if latest_source is not None and latest_source <= watermark else ""))
        print(f"{'run_id':<24} {'strategy':<11} {'versions':<11} {'status':<10} {'examples':>9} "
              f"{'HR@k':>7} {'NDCG@k':>7}  committed")
        for d in entries[-15:]:
            pre = d["metrics"].get("prequential", {}).get("model", {})
            hr, ndcg = (f"{pre[k]:>7.4f}" if k in pre else f"{'-':>7}" for k in ("hr", "ndcg"))
            v = d["source_versions"]
            flag = "" if d["checkpoint"].get("verified", True) else "  CHECKSUM MISMATCH"
            print(f"{d['run_id']:<24} {d['strategy']:<11} {f'{v[0]}..{v[1]}':<11} {d['status']:<10} "
                  f"{d['metrics'].get('examples', 0):>9} {hr} {ndcg}  {d['committed_at']}{flag}")
        if current:
            print(f"current checkpoint: {current.checkpoint_path}\n  sha256 {current.checkpoint_sha256}")
        else:
            print("no checkpoint yet: run `deltarec nightly`")
    bad = [d for d in entries if d["checkpoint"].get("verified") is False]
    return 1 if bad else 0


def _spark_lake(cfg: Config):
    from .lake import open_lake
    from .spark import build_spark

    return open_lake(cfg.lake, build_spark(cfg))


def entry(argv: list[str] | None = None) -> None:
    """Console-script / job entry: exit with main()'s code without running
    native-library teardown, which can abort a finished process (seen with
    deltalake 1.6.6 + pyarrow: "terminate called without an active exception")."""
    import signal

    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `deltarec status | head` ends quietly
    rc = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


if __name__ == "__main__":
    entry()
