"""The item catalogue uniform negatives are drawn from: dense positions in id order."""
from types import SimpleNamespace

from deltarec.features.examples import bucket, catalog


def test_catalog_numbers_distinct_ids_densely_in_id_order(spark):
    from pyspark.sql import functions as F

    ids = ["85123A", "22423", "POST", "85123a", "", "é-mug", "22423", None, "𝄞-bell", "M"]
    items = spark.createDataFrame([(i, "text") for i in ids], "item_id string, text string").repartition(3)
    got = catalog(items, SimpleNamespace(item_buckets=64))
    assert got.columns == ["item_id", "pos", "item_idx"]
    rows = sorted(got.collect(), key=lambda r: r["pos"])
    # a null id first (as an ordered window puts it), then Spark's string order: UTF-8 bytes = code points
    assert [r["item_id"] for r in rows] == [None] + sorted({i for i in ids if i is not None})
    assert [r["pos"] for r in rows] == list(range(len(rows)))
    want = {r["item_id"]: r["b"] for r in items.select("item_id", bucket(F.col("item_id"), 64).alias("b")).collect()}
    assert all(r["item_idx"] == want[r["item_id"]] for r in rows)
