"""A table unlike the demo's, built here (#18): explicit 0..10 ratings with the
user's own column names (viewer, film, score, rated_at, kind), a composite
natural key (viewer, film), change feed on, one commit per day, and a separate
items table (film_code, title, genre). Real Spark, real Delta tables."""
import datetime as dt
import json
import re
from pathlib import Path

import pyarrow as pa
import pytest
import yaml
from conftest import ROOT, make_config
from deltalake import DeltaTable

from deltarec.config import load_config
from deltarec.features import validate as V
from deltarec.features.changes import ChangeFractionExceeded
from deltarec.features.items import ItemsTableError
from deltarec.lake import open_lake
from deltarec.pipeline import delta_job as J

DAY0 = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=5)).replace(hour=12, minute=0, second=0, microsecond=0)
EXAMPLES = sorted((ROOT / "conf" / "examples").glob("*.yaml"))
TEST_SETTINGS = ["train.backend=local", "train.num_proc=1", "features.user_buckets=512", "features.item_buckets=256",
                 "features.holdout_fraction=0.0", "spark.shuffle_partitions=2"]

RATINGS = ["demo.enabled=false", "lake.events_table=film_ratings", "lake.items_table=films",
           "source.columns={user_id: viewer, item_id: film, event_time: rated_at, rating: score, event_type: kind}",
           "source.key=[viewer, film]", "source.event_types={rated: rating, bought: purchase}",
           "source.items={id: film_code, text: [title], categories: [genre]}",
           "features.rating.min=0", "features.rating.max=10", "features.negatives=0"]


def setup(spark, lake_root, *overrides):
    cfg = make_config(lake_root, *RATINGS, *TEST_SETTINGS, *overrides)
    return cfg, open_lake(cfg.lake, spark)


def ratings(rows):
    """(viewer, film, score, day, kind) rows in the user's own schema."""
    return pa.table({
        "viewer": pa.array([r[0] for r in rows], pa.int64()),
        "film": pa.array([r[1] for r in rows], pa.string()),
        "score": pa.array([r[2] for r in rows], pa.float64()),
        "rated_at": pa.array([DAY0 + dt.timedelta(days=r[3]) for r in rows], pa.timestamp("us", "UTC")),
        "kind": pa.array([r[4] if len(r) > 4 else "rated" for r in rows], pa.string())})


def films(lake, cfg):
    lake.write(cfg.lake.items_table, pa.table({
        "film_code": ["f1", "f2", "f3", "f4"], "title": ["Alien", "Brazil", "Cube", None],
        "genre": ["horror", "comedy", "scifi", "drama"]}))


def examples(night, *cols):
    return sorted(tuple(r[c] for c in cols) for r in night.examples_df.collect())


def quarantined(lake, run_id):
    q = lake.read("quarantine_events").where(f"run_id = '{run_id}'").collect()
    return sorted(((r["user_id"], r["item_id"], r["reason"], r["detail"]) for r in q), key=str)


# ---------------------------------------------------------------- item 1
def test_example_configs_load_and_run_on_a_table_built_from_them(spark, tmp_path):
    """Each conf/examples/*.yaml loads as written and reads a table with the
    columns it names: one night, every row accepted, examples written."""
    assert {p.stem for p in EXAMPLES} == {"purchases", "clicks", "ratings"}
    for path in EXAMPLES:
        root = tmp_path / path.stem
        cfg = load_config(path, [f"lake.root={root}", *TEST_SETTINGS], environ={})
        assert cfg.demo.enabled is False and cfg.source.columns is not None and cfg.source.items is not None
        m, lake = cfg.source.columns, open_lake(cfg.lake, spark)
        t = DAY0
        values = {m.user_id: ["u1", "u2"], m.item_id: ["i1", "i2"], m.event_time: [t, t + dt.timedelta(hours=1)]}
        if m.event_id:
            values[m.event_id] = ["e1", "e2"]
        if m.order_id:
            values[m.order_id] = ["o1", "o2"]
        if m.quantity:
            values[m.quantity] = [1, 2]
        if m.price:
            values[m.price] = [2.5, 3.0]
        if m.rating:
            r = cfg.features.rating
            values[m.rating] = [r.max, r.min]
        if m.event_type:  # the user's own values, through source.event_types
            values[m.event_type] = sorted(cfg.source.event_types)[:1] * 2
        lake.write(cfg.lake.events_table, pa.table(values), enable_cdf=True)
        it = cfg.source.items
        lake.write(cfg.lake.items_table, pa.table(
            {name: ["i1", "i2", "i3"] if name == it.id else ["x", "y", "z"]
             for name in dict.fromkeys([it.id, *it.text, *it.categories])}))
        night = J.prepare_night(spark, cfg, lake, 0, 0, f"{path.stem}-0")
        assert (night.consumed, night.quarantined) == (2, 0), (path.name, night.reasons)
        assert night.examples >= 2, path.name
        assert sorted(r["item_id"] for r in night.items.collect()) == ["i1", "i2", "i3"]


def test_readme_own_table_example_is_the_ratings_example():
    """The README's "Use your own table" config is conf/examples/ratings.yaml,
    which the test above runs."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Use your own table", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    assert yaml.safe_load(block) == yaml.safe_load((ROOT / "conf" / "examples" / "ratings.yaml").read_text())


# ---------------------------------------------------------------- item 2
def test_items_table_through_source_items(spark, lake_root):
    cfg, lake = setup(spark, lake_root, "features.negatives=3")
    films(lake, cfg)
    lake.write(cfg.lake.events_table, ratings([(1, "f1", 9, 0), (2, "f2", 8, 0)]), enable_cdf=True)
    night = J.prepare_night(spark, cfg, lake, 0, 0, "r0")
    text = {r["item_id"]: r["text"] for r in night.items.collect()}
    assert text == {"f1": "Alien | horror", "f2": "Brazil | comedy", "f3": "Cube | scifi", "f4": "drama"}
    negs = {r["item_id"] for r in night.examples_df.where("kind = 'negative'").collect()}
    assert negs and negs <= set(text)  # negatives drawn from the mapped catalogue


def test_items_table_error_names_the_key_and_the_columns(spark, lake_root):
    cfg, lake = setup(spark, lake_root, "source.items={id: film_code, text: [name], categories: [genre]}")
    films(lake, cfg)
    lake.write(cfg.lake.events_table, ratings([(1, "f1", 9, 0)]), enable_cdf=True)
    with pytest.raises(ItemsTableError) as e:
        J.prepare_night(spark, cfg, lake, 0, 0, "r0")
    assert "source.items.text='name'" in str(e.value) and "film_code, title, genre" in str(e.value)
    cfg2, _ = setup(spark, lake_root, "source.items=null")  # deltarec's names expected, the user's found
    with pytest.raises(ItemsTableError) as e:
        J.prepare_night(spark, cfg2, lake, 0, 0, "r0")
    assert "'item_id', 'text'" in str(e.value) and "lake.items_table" in str(e.value) \
        and "source.items" in str(e.value)


# ---------------------------------------------------------------- item 3 (and 11)
def test_rating_scale_threshold_out_of_range_and_event_types(spark, lake_root):
    cfg, lake = setup(spark, lake_root)
    assert cfg.features.rating.cut == 5.0  # the midpoint of 0..10
    rows = [(1, "f1", 4, 0), (1, "f2", 6, 0), (2, "f1", 10, 0, "bought"), (2, "f3", 11, 0), (3, "f2", -1, 0),
            (3, "f3", 7, 0, "liked")]
    lake.write(cfg.lake.events_table, ratings(rows), enable_cdf=True)
    lake.write(cfg.lake.events_table, ratings([(None, "f4", 8, 1)]), mode="append")
    night = J.prepare_night(spark, cfg, lake, 0, 1, "r0")
    # 4 of 10 is a poor rating: a negative (the old fixed threshold 4.0 made it positive)
    assert examples(night, "user_id", "item_id", "label", "weight") == [
        ("1", "f1", 0.0, 1.0), ("1", "f2", 1.0, 1.0), ("2", "f1", 1.0, 1.0)]
    assert quarantined(lake, "r0") == [
        ("2", "f3", V.RATING_OUT_OF_RANGE, "rating=11.0 is outside features.rating [min=0.0, max=10.0]"),
        ("3", "f2", V.RATING_OUT_OF_RANGE, "rating=-1.0 is outside features.rating [min=0.0, max=10.0]"),
        ("3", "f3", V.UNKNOWN_EVENT_TYPE, "event_type=liked is not in validation.allowed_event_types "
                                          "['purchase', 'click', 'rating'] (map yours with source.event_types)"),
        (None, "f4", V.NULL_USER_ID, "user_id is null or blank")]


def test_graded_labels_and_rating_weights(spark, lake_root):
    cfg, lake = setup(spark, lake_root, "features.rating.label=graded", "features.rating.weight=rating",
                      "features.negatives=2")
    lake.write(cfg.lake.events_table, ratings([(1, "f1", 9, 0), (1, "f2", 2, 0), (2, "f3", 5, 0)]),
               enable_cdf=True)
    films(lake, cfg)
    night = J.prepare_night(spark, cfg, lake, 0, 0, "r0")
    got = {(r["user_id"], r["item_id"]): (round(r["label"], 4), round(r["weight"], 4))
           for r in night.examples_df.where("kind = 'event'").collect()}
    assert got == {("1", "f1"): (0.9, 0.9), ("1", "f2"): (0.2, 0.8), ("2", "f3"): (0.5, 0.5)}
    negs = night.examples_df.where("kind = 'negative'").collect()
    # negatives for the ratings at or above the threshold (9 and 5), none for the 2
    assert sorted({r["event_id"].rsplit(":n", 1)[0] for r in negs}) == sorted(
        r["event_id"] for r in night.examples_df.where("kind = 'event' AND label >= 0.5").collect())


# ---------------------------------------------------------------- item 4
def test_rerating_at_a_new_time_retracts_the_old_rating_by_the_composite_key(spark, lake_root):
    cfg, lake = setup(spark, lake_root)
    lake.write(cfg.lake.events_table, ratings([(1, "f1", 9, 0), (1, "f2", 8, 0)]), enable_cdf=True)
    J.prepare_night(spark, cfg, lake, 0, 0, "r0")
    later = (DAY0 + dt.timedelta(days=1)).strftime("%Y-%m-%d %H:%M:%S")
    DeltaTable(lake.uri(cfg.lake.events_table)).update(
        predicate="viewer = 1 AND film = 'f1'", updates={"score": "2.0", "rated_at": f"TIMESTAMP '{later}'"})
    night = J.prepare_night(spark, cfg, lake, 1, 1, "r1")
    assert examples(night, "user_id", "item_id", "label", "kind") == [
        ("1", "f1", 0.0, "event"), ("1", "f1", 0.0, "retraction")]
    assert night.stats["retractions"] == {"update": 1}
    # a second re-rating at yet another time: the key still finds the event
    DeltaTable(lake.uri(cfg.lake.events_table)).update(
        predicate="viewer = 1 AND film = 'f1'", updates={"score": "10.0", "rated_at": "rated_at + INTERVAL '1 hour'"})
    night = J.prepare_night(spark, cfg, lake, 2, 2, "r2")
    assert night.stats["retractions"] == {"update": 1} and night.quarantined == 0


def test_without_a_key_an_update_pairs_with_its_preimage(spark, lake_root):
    cfg, lake = setup(spark, lake_root, "source.key=[]")
    lake.write(cfg.lake.events_table, ratings([(1, "f1", 9, 0), (2, "f2", 8, 0)]), enable_cdf=True)
    J.prepare_night(spark, cfg, lake, 0, 0, "r0")
    DeltaTable(lake.uri(cfg.lake.events_table)).update(
        predicate="viewer = 1", updates={"score": "1.0", "rated_at": "rated_at + INTERVAL '2 hours'"})
    night = J.prepare_night(spark, cfg, lake, 1, 1, "r1")
    assert examples(night, "user_id", "item_id", "label", "kind") == [
        ("1", "f1", 0.0, "event"), ("1", "f1", 0.0, "retraction")]


# ---------------------------------------------------------------- item 5
def test_an_unchanged_overwrite_cancels_out_and_a_mass_delete_stops(spark, lake_root):
    cfg, lake = setup(spark, lake_root)
    rows = [(1, "f1", 9, 0), (1, "f2", 3, 0), (2, "f1", 7, 0), (2, "f3", 6, 0)]
    lake.write(cfg.lake.events_table, ratings(rows), enable_cdf=True)
    J.prepare_night(spark, cfg, lake, 0, 0, "r0")
    lake.write(cfg.lake.events_table, ratings(rows), mode="overwrite")  # the change feed: 4 deletes, 4 inserts
    night = J.prepare_night(spark, cfg, lake, 1, 1, "r1")
    assert night.stats["rewrites_cancelled"] == 4
    assert (night.consumed, night.quarantined, night.examples) == (0, 0, 0)
    DeltaTable(lake.uri(cfg.lake.events_table)).delete("viewer = 1 OR film = 'f3'")  # 3 of 4 rows
    with pytest.raises(ChangeFractionExceeded) as e:
        J.prepare_night(spark, cfg, lake, 2, 2, "r2")
    assert "delete 3 and update 0 rows" in str(e.value) and "75.0% of its 4 rows" in str(e.value) \
        and "validation.max_change_fraction=50%" in str(e.value)
    cfg = cfg.replace(validation=cfg.validation.replace(max_change_fraction=1.0))
    night = J.prepare_night(spark, cfg, lake, 2, 2, "r2")
    assert night.stats["retractions"] == {"delete": 3} and night.quarantined == 0


# ---------------------------------------------------------------- item 8
def test_status_json_has_null_where_a_metric_is_nan(lake_root, capsys):
    """A gate metric that could not be computed (NaN) is stored and printed as
    null: a strict parser reads `deltarec status --json`."""
    from deltarec.cli import main
    from deltarec.lake.ledger import CHAMPION, Ledger, RunRecord

    cfg = make_config(lake_root)
    ledger = Ledger(open_lake(cfg.lake, None), cfg.lake.runs_table)
    ledger.commit(RunRecord(
        run_id="ranking-0", model="ranking", source_table="film_ratings", source_first=0, source_last=0,
        checkpoint_path="/nowhere/0", checkpoint_sha256="0" * 64, checkpoint_files={}, config={},
        code_version="test", metrics={"gate": {"candidate": {"auc": float("nan"), "ndcg@10": float("inf")},
                                               "n": 3}},
        started_at=dt.datetime.now(dt.timezone.utc), status=CHAMPION, status_reason="test"))
    assert main(["status", "--json", "--conf", str(ROOT / "conf" / "local.yaml"), "--set",
                 f"lake.root={lake_root}"]) == 0

    def refuse(constant):
        raise ValueError(f"bare {constant} in JSON")

    out = json.loads(capsys.readouterr().out, parse_constant=refuse)
    assert out["runs"][0]["metrics"]["gate"] == {"candidate": {"auc": None, "ndcg@10": None}, "n": 3}


# ---------------------------------------------------------------- item 7 (NaN only)
def test_gate_never_passes_or_fails_on_nan_without_a_reason():
    from deltarec.config import GateConfig
    from deltarec.evaluation.gate import decide

    g = GateConfig(metrics=["ndcg@10", "auc"])
    nan = float("nan")
    both = decide({"ndcg@10": nan, "auc": nan}, {"ndcg@10": nan, "auc": nan}, g)
    assert not both.passed and "nan not" not in both.reason
    assert "no metric decided" in both.reason and "auc cannot be computed on tonight's holdout for both" in both.reason
    assert [c["passed"] for c in both.checks] == [None, None]
    one = decide({"ndcg@10": nan, "auc": 0.7}, {"ndcg@10": nan, "auc": 0.69}, g)
    assert one.passed and "undecided: ndcg@10 cannot be computed" in one.reason
    lost = decide({"ndcg@10": 0.2, "auc": nan}, {"ndcg@10": 0.1, "auc": 0.69}, g)
    assert not lost.passed and "auc cannot be computed for the candidate" in lost.reason


# ---------------------------------------------------------------- item 9 (and the README example, end to end)
def test_every_night_prints_and_stores_its_summary(spark, lake_root):
    """Two nights of the README's ratings config on a table built here: each
    prints the summary (quarantine by reason, examples by kind, stage seconds,
    next-day metrics, the gate) and the ledger keeps the same lines."""
    from deltarec.lake.ledger import Ledger
    from deltarec.pipeline.nightly import run_configured

    cfg = make_config(lake_root, "demo.enabled=false", *TEST_SETTINGS, "features.holdout_fraction=0.3",
                      "train.epochs=1", "train.full_epochs=1", "validation.max_quarantine_fraction=0.2",
                      "eval.k=3", "gate.metrics=[ndcg@3, auc]",  # a catalogue of 4 films
                      conf=str(ROOT / "conf" / "examples" / "ratings.yaml"))
    lake = open_lake(cfg.lake, spark)
    films(lake, cfg)
    films_ = ["f1", "f2", "f3", "f4"]
    for day in range(3):  # one commit per day
        rows = [(v, films_[(v + day) % 4], float((v * 3 + day) % 11), day) for v in range(8)]
        lake.write(cfg.lake.events_table, ratings(rows), enable_cdf=day == 0, mode="append")
    printed: list[str] = []
    run_configured(spark, cfg, out=printed.append)
    lake.write(cfg.lake.events_table, ratings([(v, films_[(v + 3) % 4], 8.0, 3) for v in range(8)]
                                              + [(9, "f1", 12.0, 3)]), mode="append")
    run_configured(spark, cfg, out=printed.append)
    assert len(printed) == 2
    for text, run in zip(printed, Ledger(lake, cfg.lake.runs_table).runs(cfg.model.name)):
        lines = run.metrics["summary"]
        assert text.splitlines()[1:] == lines
        for part in ("quarantined by reason", "examples by kind", "seconds per stage", "gate: "):
            assert any(part in ln for ln in lines), (part, lines)
    assert "rating_out_of_range=1" in printed[1] and "next-day (before training on it)" in printed[1]


# ---------------------------------------------------------------- item 10 (widening only)
def test_a_lossless_widening_is_accepted_and_a_narrowing_stops(spark, lake_root):
    from deltalake import write_deltalake

    from deltarec.features.changes import SchemaDriftError

    cfg, lake = setup(spark, lake_root)
    t = ratings([(1, "f1", 9, 0), (2, "f2", 3, 0)])
    narrow = t.set_column(0, "viewer", t["viewer"].cast(pa.int32())).set_column(2, "score", t["score"].cast(pa.float32()))
    lake.write(cfg.lake.events_table, narrow, enable_cdf=True)
    J.prepare_night(spark, cfg, lake, 0, 0, "r0")
    uri = lake.uri(cfg.lake.events_table)
    write_deltalake(uri, t, mode="overwrite", schema_mode="overwrite")  # int -> bigint, float -> double
    night = J.prepare_night(spark, cfg, lake, 1, 1, "r1")  # the same rows, widened: nothing to learn
    assert night.stats["rewrites_cancelled"] == 2 and night.quarantined == 0
    write_deltalake(uri, t.set_column(2, "score", t["score"].cast(pa.string())), mode="overwrite",
                    schema_mode="overwrite")
    with pytest.raises(SchemaDriftError, match="'score' was double and is now string"):
        J.prepare_night(spark, cfg, lake, 2, 2, "r2")
    from deltarec.lake.ledger import CHAMPION, Ledger, RunRecord
    from deltarec.pipeline.plan import plan

    Ledger(lake, cfg.lake.runs_table).commit(RunRecord(  # versions 0..1 consumed, as the two nights above
        run_id="r1", model=cfg.model.name, source_table=cfg.lake.events_table, source_first=0, source_last=1,
        checkpoint_path="/nowhere", checkpoint_sha256="0" * 64, checkpoint_files={}, config={}, code_version="test",
        metrics={}, started_at=dt.datetime.now(dt.timezone.utc), status=CHAMPION, status_reason="test"))
    p = plan(spark, cfg, lake=lake)  # plan says what the next night would hit
    assert "'score' was double and is now string" in p["drift"] and "would fail" in p["note"]
