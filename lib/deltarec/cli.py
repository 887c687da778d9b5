"""`deltarec …` subcommands. jobs/*.py call the same functions.

Every subcommand takes ``--conf FILE`` (default: conf/local.yaml when it
exists) and repeated ``--set section.key=value`` overrides. Over 300 lines:
each subcommand's arguments, help and printed output live here; the work is
in the modules they call.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable

from . import jsonout
from .config import DEFAULT_CONF, Config, ConfigError, find_config_file, load_config

log = logging.getLogger("deltarec")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--conf", metavar="FILE", default=os.environ.get("DELTAREC_CONF"),
                   help=f"YAML config (default: $DELTAREC_CONF, else ./{DEFAULT_CONF}; neither: an error)")
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
    p = sub.add_parser("config", help="print the resolved config, one value (--get) or what a key means (--explain)",
                       description="Print the resolved config as YAML. --get KEY: one value (a section, list or "
                                   "mapping as YAML). --explain KEY: its description, what it allows, its default "
                                   "and current value (a section: each of its keys; no KEY: the sections).")
    _common(p)
    what = p.add_mutually_exclusive_group()
    what.add_argument("--get", metavar="KEY", help="print one dotted key, e.g. spark.master or source.columns")
    what.add_argument("--explain", metavar="KEY", nargs="?", const="",
                      help="describe a key or section, e.g. train.accumulation_steps or train")
    p.add_argument("--json", action="store_true", help="print JSON instead of YAML")
    _registry_parser(sub)
    p = sub.add_parser("skip", help="record source versions as consumed with no training (a bad upstream load)",
                       description="Record VERSIONS (FIRST..LAST, starting right after the watermark) in the run "
                                   "ledger as consumed with no training; the next night starts after them.")
    _common(p)
    p.add_argument("versions", metavar="VERSIONS", help="FIRST..LAST (e.g. 12..14) or one version")
    p.add_argument("--reason", required=True, help="why (recorded in the ledger, shown by status)")
    p.add_argument("--by", default=None, help="who (default: the OS user)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = sub.add_parser("recommend", help="refresh the recommendations table, or show one user's top-k",
                       description="Without --user: score every user with the champion on the Spark executors "
                                   "and commit the recommendations table (one Delta commit). With --user: that "
                                   "user's top-k from the current table (popularity when the table does not "
                                   "know them), without Spark.")
    _common(p)
    p.add_argument("--user", metavar="ID", help="a raw user id (e.g. an Online Retail CustomerID)")
    p.add_argument("--k", type=int, default=None, help="how many items (default recommend.k; at most recommend.max_k)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = sub.add_parser("serve", help="HTTP service: recommendations, live scoring, health; follows the champion",
                       description="FastAPI + uvicorn on serve.host:serve.port (127.0.0.1 by default): "
                                   "GET /recommendations/{user_id}?k=, POST /score, GET /health. Polls the "
                                   "ledger every serve.poll_seconds and swaps in a new champion with its "
                                   "recommendations once both are loaded.")
    _common(p)
    p.add_argument("--host", default=None, help="bind address (default serve.host)")
    p.add_argument("--port", type=int, default=None, help="port (default serve.port)")
    p = sub.add_parser("maintain", help="OPTIMIZE / VACUUM deltarec's tables, drop uncommitted checkpoints",
                       description="Lake upkeep: compact the tables deltarec grows by small appends and MERGEs, "
                                   "VACUUM them (and the examples table) with maintain.retention_hours, and remove "
                                   "checkpoint attempts no run committed. The source and items tables are never "
                                   "touched. Safe beside a running night: a compaction loses to its MERGE.")
    _common(p)
    p.add_argument("--no-optimize", dest="optimize", action="store_false", help="skip OPTIMIZE")
    p.add_argument("--no-vacuum", dest="vacuum", action="store_false", help="skip VACUUM")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = sub.add_parser("report", help="PNG + HTML of metrics over nights (champion, candidates, baselines)",
                       description="Write metrics_over_nights.png and index.html from the lake's metrics table.")
    _common(p)
    p.add_argument("--out", metavar="DIR", default="report", help="output directory (default: ./report)")
    p.add_argument("--json", action="store_true", help="print what was written as JSON")
    from .privacy.cli import add_parser as add_forget_parser

    add_forget_parser(sub, _common)
    return ap


def _registry_parser(sub) -> None:
    reg = sub.add_parser("registry", help="champion/candidate registry: list, show, promote, rollback, reproduce, "
                                          "exclude, include",
                         description="The registry lives in the run ledger (lake.runs_table); every change of "
                                     "the champion is one Delta commit, audited in lake.registry_events_table.")
    rs = reg.add_subparsers(dest="registry_command", required=True, metavar="ACTION")
    for name, help_ in (("list", "every run with its status (champion / candidate / retired) and parent"),
                        ("show", "lineage of one run: parent chain, input versions, config, code, metrics"),
                        ("promote", "make a run the champion (one commit; recorded with who and why)"),
                        ("rollback", "make the previous champion the champion again (recorded)"),
                        ("reproduce", "retrain a run from its lineage by time travel and compare metrics"),
                        ("exclude", "never train on a run's examples again (incremental and full; recorded)"),
                        ("include", "undo exclude: train on a run's examples again (recorded)")):
        p = rs.add_parser(name, help=help_, description=help_)
        _common(p)
        p.add_argument("--json", action="store_true", help="machine-readable output")
        if name in ("show", "promote", "reproduce", "exclude", "include"):
            p.add_argument("id", metavar="ID", help="run id (see `deltarec registry list`)")
        if name in ("promote", "rollback", "exclude", "include"):
            p.add_argument("--by", default=None, help="who (default: the OS user)")
            p.add_argument("--reason", default=None, required=name == "exclude",
                           help="why (recorded in the registry)")
        if name == "reproduce":
            p.add_argument("--tolerance", type=float, default=1e-4,
                           help="largest absolute metric difference that still counts as reproduced")
            p.add_argument("--keep", metavar="DIR", default=None, help="keep the rebuilt checkpoint under DIR")


def resolve_config(args: argparse.Namespace) -> Config:
    return load_config(find_config_file(args.conf), args.overrides)


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
        "registry": cmd_registry, "report": cmd_report, "recommend": cmd_recommend, "serve": cmd_serve,
        "forget": cmd_forget, "maintain": cmd_maintain, "skip": cmd_skip,
    }
    return commands[args.command](args, cfg)


# ------------------------------------------------------------ commands
def cmd_config(args, cfg: Config) -> int:
    from .config import explain_text, value_text

    try:
        if args.explain is not None:
            print(explain_text(args.explain, cfg))
        else:
            print(value_text(cfg.get(args.get) if args.get else cfg, as_json=args.json))
    except ConfigError as e:
        print(f"deltarec: {e}", file=sys.stderr)
        return 2
    return 0


def cmd_nightly(args, cfg: Config) -> int:
    return run_nightly_job(cfg)


def run_nightly_job(cfg: Config) -> int:
    """parse → config → session → one library call → exit code (shared with jobs/nightly.py)."""
    from .pipeline.nightly import run_configured
    from .spark import build_spark

    log.debug("config: %s", cfg.to_json())  # the whole tree: one long line, for -v
    spark = build_spark(cfg)
    try:
        run_configured(spark, cfg)
    except Exception as e:  # one readable line, then the traceback in debug
        if isinstance(e, BrokenPipeError) and stdout_is_closed():
            raise  # not a failed night: entry() says the output's reader went away
        log.debug("nightly failed", exc_info=True)
        print(f"deltarec nightly: FAILED: {type(e).__name__}: {e}", file=sys.stderr)
        from .lake.diagnose import explain

        if hint := explain(e, cfg):  # a damaged or full lake: the table and the fix
            print(f"deltarec nightly: {hint}", file=sys.stderr)
        return 1
    finally:
        spark.stop()
    return 0


def cmd_plan(args, cfg: Config) -> int:
    from .pipeline.plan import describe_plan, plan
    from .spark import build_spark

    p = plan(build_spark(cfg), cfg)
    print(jsonout.dumps(p, indent=1) if args.json else describe_plan(p))
    return 0


def cmd_status(args, cfg: Config) -> int:
    from .lake.ledger import Ledger
    from .maintain import owned_tables, table_sizes
    from .pipeline.console import status_header, status_line
    from .train.checkpoint import CheckpointError, verify_checkpoint

    lake = _lake(cfg)
    ledger = Ledger(lake, cfg.lake.runs_table)
    model = None if args.all_models else cfg.model.name
    runs = ledger.runs(model)
    watermark = ledger.watermark(cfg.model.name)
    latest_source = lake.version(cfg.lake.events_table)
    entries = []
    for r in runs:
        d = r.to_json_dict()
        if args.verify and not r.checkpoint_path:  # deleted by privacy.keep_checkpoints (a registry event says so)
            d["checkpoint"]["deleted"] = True
        elif args.verify:
            try:
                verify_checkpoint(r.checkpoint_path, r.checkpoint_sha256)
                d["checkpoint"]["verified"] = True
            except CheckpointError as e:
                d["checkpoint"]["verified"] = False
                d["checkpoint"]["error"] = str(e)
        entries.append(d)
    current = ledger.champion(cfg.model.name)  # what serves, not merely the newest run
    from .registry.skip import describe_recovery, recovery_status

    recovery = recovery_status(ledger, lake, cfg)  # skipped version ranges, excluded runs
    if args.json:
        print(jsonout.dumps({"model": cfg.model.name, "watermark": watermark,
                          "source_table": cfg.lake.events_table, "source_latest_version": latest_source,
                          "lake": lake.root, "engine": lake.name,
                          "current_checkpoint": current.to_json_dict()["checkpoint"] if current else None,
                          "tables": table_sizes(lake, owned_tables(cfg)), "runs": entries, **recovery}, indent=1))
    else:
        print(f"lake {lake.root} ({lake.name}); model {cfg.model.name!r}")
        print(f"watermark: {watermark}   {cfg.lake.events_table} latest version: {latest_source}"
              + ("   (up to date)" if latest_source is not None and latest_source <= watermark else ""))
        print(status_header())
        for r, d in list(zip(runs, entries))[-15:]:
            print(status_line(r, d["committed_at"], verified=d["checkpoint"].get("verified", True)))
        print("\n".join(describe_recovery(recovery)) or "skipped versions: none; excluded runs: none")
        if current:
            print(f"current checkpoint: {current.checkpoint_path}\n  sha256 {current.checkpoint_sha256}")
        else:
            print("no checkpoint yet: run `deltarec nightly`")
        print("tables: " + ", ".join(f"{t} {s['files']} files {s['bytes'] / 1e6:.1f} MB"
                                     for t, s in table_sizes(lake, owned_tables(cfg)).items()))
    bad = [d for d in entries if d["checkpoint"].get("verified") is False]
    orphans = _verify_orphans(cfg, ledger) if args.verify else {}
    ahead = _verify_state(cfg, ledger) if args.verify else {}
    return 1 if bad or orphans or ahead else 0


def _verify_state(cfg: Config, ledger) -> dict[str, dict[str, int]]:
    """State rows of source versions the ledger never recorded, printed to stderr (#21)."""
    lk = cfg.lake
    ahead = ledger.state_ahead([lk.event_index_table, lk.user_state_table, lk.item_stats_table])
    for table, a in ahead.items():
        print(f"deltarec status --verify: {table} holds {a['rows']} row(s) of source versions up to "
              f"{a['max_version']}, but the ledger's runs consumed only up to {a['ledger_last']}: the state of "
              "an attempt that never committed (killed, or lost a race); the next `deltarec nightly` over "
              "that range rewrites it", file=sys.stderr)
    return ahead


def _verify_orphans(cfg: Config, ledger) -> dict[str, list[str]]:
    """Rows under run ids the ledger does not have, printed to stderr (#21)."""
    from .pipeline.publish import attempt_tables

    orphans = ledger.orphan_run_ids(attempt_tables(cfg))
    for table, ids in orphans.items():
        print(f"deltarec status --verify: {table} holds rows of {len(ids)} run id(s) no committed run has "
              f"({', '.join(ids[:5])}{' ...' if len(ids) > 5 else ''}): a killed attempt's; the next commit of "
              f"that range removes them, or delete them with `run_id = '<id>'`", file=sys.stderr)
    return orphans


def _lake(cfg: Config, spark: bool = False):
    from .lake import open_lake

    return _spark_lake(cfg) if spark or cfg.lake.engine == "delta-spark" else open_lake(cfg.lake, None)


def cmd_registry(args, cfg: Config) -> int:
    from . import registry
    from .lake.engine import LakeError
    from .lake.ledger import Ledger
    from .train.checkpoint import CheckpointError

    action = args.registry_command
    lake = _lake(cfg, spark=action == "reproduce")
    ledger = Ledger(lake, cfg.lake.runs_table)
    try:
        if action == "list":
            out = registry.list_entries(ledger, cfg.model.name)
        elif action == "show":
            out = registry.show(ledger, lake, cfg, args.id)
        elif action == "promote":
            out = registry.promote(ledger, lake, cfg, args.id, by=args.by,
                                   reason=args.reason or "manual promote")
        elif action == "rollback":
            out = registry.rollback(ledger, lake, cfg, by=args.by, reason=args.reason or "manual rollback")
        elif action in ("exclude", "include"):
            from .registry import exclusions

            out = getattr(exclusions, action)(ledger, lake, cfg, args.id, by=args.by,
                                              reason=args.reason or "manual include")
        else:
            from .registry.reproduce import reproduce

            out = reproduce(lake.spark, cfg, lake, args.id, tolerance=args.tolerance, keep=args.keep)
    except (LakeError, CheckpointError) as e:
        print(f"deltarec registry {action}: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(jsonout.dumps(out, indent=1, default=str))
    elif action in ("exclude", "include"):
        v = out["source_versions"]
        print(f"{action}: the examples of run {out['run_id']} (versions {v[0]}..{v[1]}) are "
              f"{'never' if action == 'exclude' else 'again'} trained on; by {out['by']}: {out['reason']}")
    else:
        print(registry.describe(action, out, cfg.model.name))
    return 0 if action != "reproduce" or out["passed"] else 1


def cmd_skip(args, cfg: Config) -> int:
    from .lake.engine import LakeError
    from .lake.ledger import Ledger
    from .registry.skip import skip

    lake = _lake(cfg)
    try:
        out = skip(Ledger(lake, cfg.lake.runs_table), lake, cfg, args.versions, reason=args.reason, by=args.by)
    except LakeError as e:
        print(f"deltarec skip: {e}", file=sys.stderr)
        return 1
    v = out["source_versions"]
    print(jsonout.dumps(out, indent=1) if args.json else
          f"skipped {cfg.lake.events_table} versions {v[0]}..{v[1]} with no training (watermark "
          f"{out['watermark_before']} -> {out['watermark']}); by {out['by']}: {out['reason']}")
    return 0


def cmd_maintain(args, cfg: Config) -> int:
    from .maintain import describe, maintain

    out = maintain(cfg, _lake(cfg), optimize=args.optimize, vacuum=args.vacuum)
    print(jsonout.dumps(out, indent=1) if args.json else describe(out))
    return 0


def cmd_report(args, cfg: Config) -> int:
    from .evaluation.report import write_report

    out = write_report(_lake(cfg), cfg, args.out)
    print(jsonout.dumps(out, indent=1) if args.json else f"wrote {out['png']} and {out['html']}")
    return 0


def cmd_recommend(args, cfg: Config) -> int:
    if args.user is None:
        from .pipeline.recommend import refresh_recommendations
        from .registry.core import current_user
        from .spark import build_spark

        try:
            out = refresh_recommendations(build_spark(cfg), cfg, reason="deltarec recommend", by=current_user())
        except Exception as e:
            log.debug("recommend failed", exc_info=True)
            print(f"deltarec recommend: FAILED: {type(e).__name__}: {e}", file=sys.stderr)
            return 1
        print(jsonout.dumps(out, indent=1) if args.json else
              f"{cfg.recommend.table} version {out.get('version')}: top {cfg.recommend.k} for {out.get('users')} "
              f"users from champion {out['run_id']} in {out['seconds']:.1f}s" if "version" in out else
              f"not written: {out.get('skipped')}")
        return 0 if "version" in out else 1
    from .serving.holder import answer_user

    k = cfg.recommend.k if args.k is None else args.k
    if not 1 <= k <= cfg.recommend.max_k:
        print(f"deltarec recommend: --k {k} is out of range: 1..{cfg.recommend.max_k} (recommend.max_k)",
              file=sys.stderr)
        return 2
    try:
        out = answer_user(cfg, args.user, k)
    except LookupError as e:
        print(f"deltarec recommend: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(jsonout.dumps(out, indent=1))
        return 0
    how = " (popularity: the table has no history for this user)" if out["fallback"] else ""
    print(f"user {args.user}: top {k} from champion {out['run_id']}, {cfg.recommend.table} version "
          f"{out['table_version']}{how}")
    for e in out["items"]:
        print(f"  {e['rank']:>3}. {e['item_id']:<14} {e['score']:.4f}")
    return 0


def cmd_serve(args, cfg: Config) -> int:
    from .serving.app import run_server

    try:  # validated like any other value (a port outside 1..65535 is a config error)
        if args.host:
            cfg.serve.host = args.host
        if args.port is not None:
            cfg.serve.port = args.port
    except ConfigError as e:
        print(f"deltarec serve: {e}", file=sys.stderr)
        return 2
    return run_server(cfg)


def cmd_forget(args, cfg: Config) -> int:
    from .privacy.cli import run

    return run(args, cfg, lambda spark: _lake(cfg, spark=spark))


def _spark_lake(cfg: Config):
    from .lake import open_lake
    from .spark import build_spark

    return open_lake(cfg.lake, build_spark(cfg))


def _stopped_by_signal(signum, frame) -> None:
    """Every exit says why: a SIGTERM (a scheduler's timeout, a drain) ends
    the process at once, as before, but with one line on stderr."""
    import signal

    name = signal.Signals(signum).name
    try:
        print(f"deltarec: stopped by {name}: nothing after the last ledger commit was recorded; run the same "
              "command again to resume from the watermark", file=sys.stderr, flush=True)
    finally:
        os._exit(128 + signum)


def entry(argv: list[str] | None = None) -> None:
    """Console-script / job entry: exit with main()'s code without running
    native-library teardown, which can abort a finished process (seen with
    deltalake 1.6.6 + pyarrow: "terminate called without an active exception")."""
    import signal

    args = sys.argv[1:] if argv is None else argv
    # Every exit says why: a closed stdout (`| head`, a dead log reader) is a
    # BrokenPipeError with a message, never a silent death by SIGPIPE.
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _stopped_by_signal)
    try:
        rc = main(argv)
        sys.stdout.flush()
    except BrokenPipeError:
        rc = _stdout_closed(args[:1])
    sys.stderr.flush()
    os._exit(rc)


def stdout_is_closed() -> bool:
    """Whether stdout is a pipe whose reader is gone (poll reports an error on it)."""
    import select

    try:
        p = select.poll()
        p.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & select.POLLERR for _, ev in p.poll(0))
    except (OSError, ValueError):
        return False


def _stdout_closed(command: list[str]) -> int:
    """Say why the output stopped; exit status 141 (128 + SIGPIPE), as a shell reports it."""
    import signal

    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the rest of the output goes nowhere
    what = " ".join(["deltarec", *command])
    print(f"{what}: standard output was closed by its reader (broken pipe, e.g. `| head`): output stopped "
          "there. Nothing else failed: what the command committed stands (see `deltarec status`); run it "
          "again with its output to a file to see all of it", file=sys.stderr, flush=True)
    return 128 + signal.SIGPIPE


if __name__ == "__main__":
    entry()
