"""Hostile values a source system can hold (#21 §2): each is quarantined with
a reason naming the column and value, or accepted — never a crash, never a
silently dropped row. The example test runs a whole delta job over them; the
property test (hypothesis) fuzzes every column of the change feed through the
validation stage: consumed = accepted + quarantined, no exception."""
import datetime as dt
import unicodedata

import pyarrow as pa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import make_config
from deltarec.features import validate as V
from deltarec.features.validate import CONSUMED_CHANGES, validate
from deltarec.lake import open_lake, schemas
from deltarec.lake.engine import to_arrow
from deltarec.pipeline import delta_job as J

UTC = dt.timezone.utc
NOW = dt.datetime.now(UTC).replace(microsecond=0)


def ev(eid, **kw):
    row = {"event_id": eid, "user_id": "u1", "item_id": "i1", "event_time": NOW - dt.timedelta(hours=1),
           "event_type": "purchase", "order_id": "o", "quantity": 1, "price": 1.0, "rating": None}
    return {**row, **kw}


def write(cfg, lake, rows):
    lake.write(cfg.lake.events_table, pa.Table.from_pylist(rows, schema=schemas.BEHAVIOR_EVENTS),
               enable_cdf=True, schema=schemas.BEHAVIOR_EVENTS)


def test_hostile_timestamps_and_numbers_are_quarantined_with_the_column_and_value(spark, lake_root):
    cfg = make_config(lake_root, "demo.enabled=false", "features.negatives=0", "validation.max_quarantine_fraction=1")
    lake = open_lake(cfg.lake, spark)
    nan, inf = float("nan"), float("inf")
    want = {  # event id -> (reason, start of the detail)
        "t0001": (V.BAD_TIMESTAMP, "event_time=0001-01-01"), "t1900": (V.BAD_TIMESTAMP, "event_time=1900-01-01"),
        "t2262": (V.BAD_TIMESTAMP, "event_time=2262-04-12"), "t9999": (V.BAD_TIMESTAMP, "event_time=9999-12-31"),
        "pnan": (V.NON_FINITE_NUMBER, "price=NaN"), "pinf": (V.NON_FINITE_NUMBER, "price=Infinity"),
        "pbig": (V.OUT_OF_RANGE, "price=1.0E308"), "qmax": (V.OUT_OF_RANGE, f"quantity={2**63 - 1}"),
        "rnan": (V.NON_FINITE_NUMBER, "rating=NaN"), "rinf": (V.NON_FINITE_NUMBER, "rating=Infinity"),
        "rninf": (V.NON_FINITE_NUMBER, "rating=-Infinity"),
    }
    times = {"t0001": dt.datetime(1, 1, 1, tzinfo=UTC), "t1900": dt.datetime(1900, 1, 1, tzinfo=UTC),
             "t2262": dt.datetime(2262, 4, 12, tzinfo=UTC), "t9999": dt.datetime(9999, 12, 31, tzinfo=UTC)}
    rows = [ev(k, event_time=t) for k, t in times.items()] + [
        ev("pnan", price=nan), ev("pinf", price=inf), ev("pbig", price=1e308), ev("qmax", quantity=2**63 - 1),
        ev("rnan", event_type="rating", rating=nan), ev("rinf", event_type="rating", rating=inf),
        ev("rninf", event_type="rating", rating=-inf), ev("good")]
    write(cfg, lake, rows)
    night = J.prepare_night(spark, cfg, lake, 0, 0, "r0")  # before: OverflowError, every night
    q = {r["event_id"]: (r["reason"], r["detail"]) for r in lake.read_arrow(cfg.lake.quarantine_table).to_pylist()}
    assert {k: v[0] for k, v in q.items()} == {k: v[0] for k, v in want.items()}
    for k, (_, detail) in want.items():
        assert q[k][1].startswith(detail), (k, q[k])
    assert (night.accepted, night.quarantined, night.consumed) == (1, len(want), len(rows))
    write(cfg, lake, [ev("next")])  # and the next night goes on
    assert J.prepare_night(spark, cfg, lake, 1, 1, "r1").accepted == 1


def test_ids_that_look_alike_are_one_id_or_quarantined_naming_the_column(spark, lake_root):
    cfg = make_config(lake_root, "demo.enabled=false", "features.negatives=0", "validation.max_quarantine_fraction=1")
    lake = open_lake(cfg.lake, spark)
    write(cfg, lake, [ev("a", user_id="12347", item_id="\u00e9"), ev("b", user_id=" 12347\u00a0", item_id="e\u0301"),
                      ev("c", user_id="\u202e74321"), ev("d", item_id="1\u200b2"), ev("   "), ev("\u3000")])
    night = J.prepare_night(spark, cfg, lake, 0, 0, "r0")
    assert night.accepted == 2
    assert [r["user_id"] for r in lake.read_arrow(cfg.lake.user_state_table).to_pylist()] == ["12347"]
    assert [r["item_id"] for r in lake.read_arrow(cfg.lake.item_stats_table).to_pylist()] == ["\u00e9"]
    rows = lake.read_arrow(cfg.lake.quarantine_table).to_pylist()
    q = {r["event_id"]: (r["reason"], r["detail"]) for r in rows}
    assert q["c"][0] == q["d"][0] == V.MALFORMED_ID
    assert q["c"][1].startswith("user_id") and q["d"][1].startswith("item_id")
    assert sorted(r["reason"] for r in rows if r["event_id"] not in ("c", "d")) == [V.NULL_EVENT_ID] * 2


def ids():
    weird = st.sampled_from(["", "   ", " 12347", "12347 ", "a\x00b", "a\tb", "a\nb", "\x7f", "\u202e12347",
                             "1\u200b2", "e\u0301", "é", "x" * 5000, "'; DROP TABLE x; --", "\ufeff", "🙂"])
    return st.one_of(st.none(), weird, st.text(max_size=40))


def floats():
    special = st.sampled_from([0.0, -0.0, 5e-324, -5e-324, 1e308, -1e308, float("nan"), float("inf"),
                               float("-inf"), 2.2250738585072014e-308])
    return st.one_of(st.none(), special, st.floats(allow_nan=True, allow_infinity=True))


def ints():
    bounds = st.sampled_from([0, -1, 1, 2**31 - 1, -2**31, 2**63 - 1, -2**63])
    return st.one_of(st.none(), bounds, st.integers(min_value=-2**63, max_value=2**63 - 1))


def times():
    special = st.sampled_from([dt.datetime(1, 1, 1), dt.datetime(1900, 1, 1), dt.datetime(1969, 12, 31, 23, 59, 59),
                               dt.datetime(1970, 1, 1), dt.datetime(2038, 1, 19, 3, 14, 8),
                               dt.datetime(2262, 4, 11, 23, 47, 16), dt.datetime(2262, 4, 12),
                               dt.datetime(9999, 12, 31, 23, 59, 59, 999999)])
    any_time = st.datetimes(min_value=dt.datetime(1, 1, 1), max_value=dt.datetime(9999, 12, 31, 23, 59, 59))
    return st.one_of(st.none(), special, any_time).map(lambda t: t and t.replace(tzinfo=UTC))


ROW = st.fixed_dictionaries({
    "event_id": ids(), "user_id": ids(), "item_id": ids(), "event_time": times(),
    "event_type": st.one_of(st.sampled_from(["purchase", "click", "rating", "cancel", "", "PURCHASE"]), ids()),
    "order_id": ids(), "quantity": ints(), "price": floats(), "rating": floats()})


@settings(max_examples=6, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large])
@given(batch=st.lists(ROW, min_size=1, max_size=25))
def test_validation_accounts_for_every_hostile_row(spark, tmp_path_factory, batch):
    root = tmp_path_factory.mktemp("fuzz") / "lake"
    cfg = make_config(root, "demo.enabled=false", "validation.max_quarantine_fraction=1")
    lake = open_lake(cfg.lake, spark)
    write(cfg, lake, batch)
    changes = J.read_source_changes(spark, cfg, lake, 0, 0)
    v = validate(changes, cfg.validation, "fuzz")
    accepted = to_arrow(v.accepted)
    quarantined = to_arrow(v.quarantined, schemas.QUARANTINE_EVENTS)  # as the delta job writes it
    consumed = changes.where(changes["_change_type"].isin(*CONSUMED_CHANGES)).count()
    assert consumed == len(batch) == accepted.num_rows + quarantined.num_rows
    assert quarantined["reason"].null_count == 0
    for r in accepted.to_pylist():  # what is accepted is trainable: finite, in range, in time
        assert r["event_time"] is not None and dt.datetime(1970, 1, 1, tzinfo=UTC) <= r["event_time"]
        for k in ("event_id", "user_id", "item_id"):  # the id policy: trimmed, NFC, nothing invisible
            ends = (r[k][:1], r[k][-1:])
            assert r[k] == unicodedata.normalize("NFC", r[k]) and "\u202e" not in r[k], (k, r)
            assert not any(e and unicodedata.category(e).startswith("Z") for e in ends), (k, r)
        for k in ("price", "rating"):
            assert r[k] is None or abs(r[k]) != float("inf") and r[k] == r[k], (k, r)
