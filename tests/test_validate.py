"""Validation on a sample of the real Online Retail data: every row is accepted
or quarantined with the right reason; the expected counts come from an
independent pandas reading of the raw rows."""
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from deltarec.config import DemoConfig, LakeConfig, ValidationConfig
from deltarec.demo.source import map_columns
from deltarec.features import validate as V
from deltarec.lake import open_lake, schemas


@pytest.fixture(scope="module")
def sample(real_data_path):
    raw = pq.read_table(real_data_path).slice(0, 60000).to_pandas()
    cancelled = raw["InvoiceNo"].str.startswith("C")
    picks = pd.concat([
        raw.iloc[:1500],
        raw[cancelled].head(40),
        raw[~cancelled & (raw["Quantity"] <= 0)].head(20),  # adjustments (all without a customer)
        raw[raw["UnitPrice"] <= 0].head(10),
        raw.iloc[100:110],  # exact duplicates of lines already picked
    ])
    return picks.reset_index(drop=True)


def expected_reasons(df: pd.DataFrame) -> tuple[dict[str, int], int]:
    """The validation rules, written again in pandas, first matching rule wins;
    then each cancellation takes the latest accepted purchase of its customer
    and item at or before it (one purchase per cancellation, the earliest
    cancellation first). Returns (reason counts, matched cancellations)."""
    reason = pd.Series([None] * len(df), dtype=object)
    cancel = df["InvoiceNo"].str.startswith("C")
    rules = [
        (V.NON_POSITIVE_QUANTITY, ~cancel & (df["Quantity"] <= 0)),
        (V.NON_POSITIVE_PRICE, df["UnitPrice"] <= 0),
        (V.NULL_USER_ID, df["CustomerID"].isna()),
    ]
    for code, mask in rules:
        reason[reason.isna() & mask.to_numpy()] = code
    valid = reason.isna()
    dup = df[valid.to_numpy()].duplicated(keep="first")
    reason[dup[dup].index] = V.DUPLICATE_EVENT_ID
    ok = reason.isna().to_numpy()
    purchases = df[ok & ~cancel.to_numpy()]
    best = {}
    for i, row in df[ok & cancel.to_numpy()].iterrows():
        cand = purchases[(purchases["CustomerID"] == row["CustomerID"]) & (purchases["StockCode"] == row["StockCode"])
                         & (purchases["InvoiceDate"] <= row["InvoiceDate"])]
        if len(cand):
            best[i] = (cand["InvoiceDate"].max(), cand["InvoiceDate"].idxmax())
    claimed, matched = set(), 0  # a purchase already claimed leaves the later cancellation unmatched
    for i in sorted(best, key=lambda i: df.loc[i, "InvoiceDate"]):
        if best[i][1] in claimed:
            continue
        claimed.add(best[i][1])
        matched += 1
    for i in df[ok & cancel.to_numpy()].index:
        if i not in best:
            reason[i] = V.UNMATCHED_CANCELLATION
    unmatched_claims = len(best) - matched
    counts = reason.value_counts().to_dict()
    if unmatched_claims:
        counts[V.UNMATCHED_CANCELLATION] = counts.get(V.UNMATCHED_CANCELLATION, 0) + unmatched_claims
    return counts, matched


def test_quarantine_counts_on_real_sample(spark, lake_root, sample):
    lake = open_lake(LakeConfig(root=str(lake_root), engine="delta-rs"), spark)
    events = map_columns(pa.Table.from_pandas(sample, preserve_index=False), DemoConfig().columns)
    lake.write("behavior_events", events, enable_cdf=True, schema=schemas.BEHAVIOR_EVENTS)
    checked = V.validate(lake.read_changes("behavior_events", 0, 0), ValidationConfig(), "run-x")
    got = {r["reason"]: r["count"] for r in checked.quarantined.groupBy("reason").count().collect()}
    want, matched = expected_reasons(sample)
    assert got == want
    # the kinds the issue names are all present in the sample
    assert got[V.NULL_USER_ID] > 0 and got[V.NON_POSITIVE_QUANTITY] > 0 and got[V.DUPLICATE_EVENT_ID] > 0
    assert matched > 0 and checked.retractions.count() == matched  # cancellations retract, never purchase
    assert checked.events.where("event_type = 'cancel'").count() == 0
    accepted = checked.accepted.count()
    assert accepted + sum(got.values()) == len(sample)  # nothing silently dropped
    assert {r["run_id"] for r in checked.quarantined.select("run_id").distinct().collect()} == {"run-x"}


def test_future_late_and_deleted_rows(spark, lake_root):
    import datetime as dt

    from deltalake import DeltaTable

    now = dt.datetime.now(dt.timezone.utc)
    lake = open_lake(LakeConfig(root=str(lake_root), engine="delta-rs"), spark)
    times = [now, now + dt.timedelta(days=2), now - dt.timedelta(days=40), now]
    t = pa.table({
        "event_id": ["ok", "future", "old", "gone"], "user_id": ["u"] * 4, "item_id": ["i"] * 4,
        "event_time": pa.array(times, schemas.TS), "event_type": ["purchase", "purchase", "purchase", "bogus"],
        "order_id": ["o"] * 4, "quantity": pa.array([1] * 4, pa.int64()), "price": [1.0] * 4,
        "rating": pa.nulls(4, pa.float64())}, schema=schemas.BEHAVIOR_EVENTS)
    lake.write("behavior_events", t, enable_cdf=True)
    DeltaTable(lake.uri("behavior_events")).delete("event_id = 'gone'")
    checked = V.validate(lake.read_changes("behavior_events", 0, 1), ValidationConfig(horizon_days=30), "r")
    got = {r["event_id"] + "/" + r["change_type"]: r["reason"] for r in checked.quarantined.collect()}
    # "gone" was quarantined when inserted: its delete has nothing to retract
    assert got == {"future/insert": V.FUTURE_TIMESTAMP, "old/insert": V.TOO_LATE,
                   "gone/insert": V.UNKNOWN_EVENT_TYPE, "gone/delete": V.UNMATCHED_RETRACTION}
    assert [r["event_id"] for r in checked.accepted.collect()] == ["ok"]


def test_threshold_message_lists_counts_per_reason():
    with pytest.raises(V.QuarantineThresholdExceeded) as e:
        V.check_threshold({"null_user_id": 6, "unmatched_cancellation": 2}, consumed=10, max_fraction=0.5)
    msg = str(e.value)
    assert "8 of 10 rows (80.0%)" in msg and "null_user_id=6" in msg and "unmatched_cancellation=2" in msg
    V.check_threshold({"null_user_id": 5}, consumed=10, max_fraction=0.5)  # at the limit: passes
