"""Dynamic vocabularies: admission, eviction, growth keeping old rows bit-identical, save/load."""
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from deltarec.models.vocab import Vocabulary, vocabs_from_bytes, vocabs_to_bytes
from deltarec.train.backends import LocalBackend
from deltarec.train.checkpoint import load_checkpoint
from deltarec.train.loop import VOCAB_FILE, TrainSpec


def ids(*xs):
    return pa.array(list(xs), pa.string())


def hashed(n, base=100):
    return pa.array(np.arange(base, base + n), pa.int64())


def test_admission_after_min_count_and_oov_before():
    v = Vocabulary("item", min_count=2, oov_buckets=4)
    v1 = v.update(ids("a", "a", "b"), hashed(3))
    assert v1.rows_for(ids("a"), hashed(1)).tolist() == [4]  # first own row after the 4 shared ones
    assert v1.rows_for(ids("b"), pa.array([7])).tolist() == [7 % 4]  # seen once: shared OOV row
    assert v1.rows_for(ids("zzz"), pa.array([9])).tolist() == [9 % 4]  # never seen: OOV
    v2 = v1.update(ids("b", "c"), hashed(2))
    assert v2.rows_for(ids("a", "b", "c"), hashed(3)).tolist() == [4, 5, 102 % 4]  # b admitted now, c not yet
    assert v2.num_rows == 6 and v2.fresh == [5] and len(v2) == 2
    assert len(v) == 0 and v.num_rows == 4  # update returns a new vocabulary


def test_eviction_after_ttl_frees_rows_for_reuse_and_keeps_the_rest():
    v = Vocabulary("user", min_count=1, ttl_nights=2, oov_buckets=1)
    v = v.update(ids("a", "b", "c"), hashed(3))  # night 1: a=1, b=2, c=3
    rows = dict(zip("abc", v.rows_for(ids("a", "b", "c"), hashed(3)).tolist()))
    assert sorted(rows.values()) == [1, 2, 3]
    v = v.update(ids("a"), hashed(1))  # night 2: b, c unseen for 1 night: kept
    assert len(v) == 3
    v = v.update(ids("a", "d"), hashed(2, 200))  # night 3: b, c unseen for 2 nights: evicted
    got = dict(zip("abcd", v.rows_for(ids("a", "b", "c", "d"), pa.array([100, 101, 102, 200])).tolist()))
    assert got["a"] == rows["a"]  # a survivor keeps its row
    assert got["b"] == got["c"] == 0  # evicted: back to the shared row
    assert got["d"] == min(rows["b"], rows["c"])  # the lowest freed row is reused first
    assert v.num_rows == 4 and v.fresh == [got["d"]] and v.free == [max(rows["b"], rows["c"])]


def test_assignment_does_not_depend_on_arrival_order():
    a = Vocabulary("item").update(ids("x", "y", "z"), hashed(3))
    b = Vocabulary("item").update(ids("z", "y", "x"), pa.array([102, 101, 100]))
    assert a.rows_for(ids("x", "y", "z"), hashed(3)).tolist() == b.rows_for(ids("x", "y", "z"), hashed(3)).tolist()


def test_save_load_roundtrip():
    v = Vocabulary("item", min_count=2, ttl_nights=3, oov_buckets=5).update(ids("a", "a", "b", "c", "c"), hashed(5))
    u = Vocabulary("user").update(ids("u1"), hashed(1))
    back = vocabs_from_bytes(vocabs_to_bytes({"item": v, "user": u}))
    for orig, got in ((v, back["item"]), (u, back["user"])):
        assert got.ids.to_pylist() == orig.ids.to_pylist()
        for f in ("rows", "counts", "last_seen", "hashed"):
            assert np.array_equal(getattr(got, f), getattr(orig, f))
        assert (got.night, got.num_rows, got.free, got.min_count, got.ttl_nights, got.oov_buckets) == \
               (orig.night, orig.num_rows, orig.free, orig.min_count, orig.ttl_nights, orig.oov_buckets)
    probe = ids("a", "b", "c", "q")
    assert back["item"].rows_for(probe, hashed(4)).tolist() == v.rows_for(probe, hashed(4)).tolist()


def _night(tmp_path, name, users, items, seed=0):
    rng = np.random.default_rng(seed)
    n = len(users)
    t = pa.table({"user_id": pa.array(users), "item_id": pa.array(items),
                  "user_idx": pa.array([hash(u) % 97 for u in users], pa.int64()),
                  "item_idx": pa.array([hash(i) % 89 for i in items], pa.int64()),
                  "label": pa.array(np.ones(n, np.float32)), "weight": pa.array(np.ones(n, np.float32)),
                  "history_idx": pa.array([[]] * n, pa.list_(pa.int64())),
                  "history_ids": pa.array([[]] * n, pa.list_(pa.string()))})
    neg = t.set_column(t.column_names.index("label"), "label", pa.array(np.zeros(n, np.float32)))
    pq.write_table(pa.concat_tables([t, neg]).take(pa.array(rng.permutation(2 * n))), tmp_path / f"{name}.parquet")
    return str(tmp_path / f"{name}.parquet")


def _spec(files, out, model="ranking", parent=None, **kw):
    p = {"user_buckets": 97, "item_buckets": 89, "embedding_dim": 4, "hidden": [8], "embedding": "dynamic"}
    if model == "sequential":
        p.update(history_length=3, heads=2, layers=1)
    base = dict(run_id=out.name, files=files, model_name=model, model_params=p, optimizer="adam", lr=0.01,
                weight_decay=0.0, batch_size=16, epochs=1, seed=5, checkpoint_dir=str(out), progress=False,
                parent_path=parent["path"] if parent else None, vocab_oov_buckets=3,
                history_length=3 if model == "sequential" else 0)
    return TrainSpec(**{**base, **kw})


def test_growth_keeps_old_rows_bit_identical_and_new_rows_get_the_defined_init(tmp_path):
    users = [f"u{i}" for i in range(20)]
    first = LocalBackend().run(_spec([_night(tmp_path, "n1", users, [f"i{i % 7}" for i in range(20)])], tmp_path / "a"))
    a = load_checkpoint(first["checkpoint"]["path"])
    assert VOCAB_FILE in first["checkpoint"]["files"]  # in the manifest, with its sha256
    va = vocabs_from_bytes(a.extras[VOCAB_FILE])["user"]
    assert a.model_state["user_emb.weight"].shape[0] == va.num_rows == 3 + 20
    assert a.meta["model_params"]["user_rows"] == 23
    # night 2 brings 5 new users: the warm-started model carries the 23 old rows over bit
    # for bit; the new users get rows 23.. with the defined init
    second_spec = _spec([_night(tmp_path, "n2", [f"new{i}" for i in range(5)], ["i0"] * 5, 1)], tmp_path / "b",
                        parent=first["checkpoint"])
    from deltarec.train.loop import build, update_vocabs

    vocabs = update_vocabs(second_spec)
    model, _, _ = build(second_spec, vocabs=vocabs)
    grown = model.state_dict()["user_emb.weight"]
    assert grown.shape[0] == 28
    assert torch.equal(grown[:23], a.model_state["user_emb.weight"])  # bit-identical
    from deltarec.models.common import INIT_STD, init_rows

    expect = torch.zeros_like(grown)
    init_rows(expect, list(range(23, 28)), second_spec.seed + vocabs["user"].night, "user_emb.weight")
    assert torch.equal(grown[23:], expect[23:])
    assert 0.2 * INIT_STD < float(grown[23:].std()) < 5 * INIT_STD
    # and the trainer runs it end to end, saving the grown vocabulary
    second = LocalBackend().run(second_spec)
    b = load_checkpoint(second["checkpoint"]["path"])
    assert vocabs_from_bytes(b.extras[VOCAB_FILE])["user"].num_rows == 28
    buckets = [hash(u) % 97 for u in users + [f"new{i}" for i in range(5)]]  # as _night hashes them
    shared = sum(buckets.count(h) > 1 for h in buckets)
    assert second["vocab"]["user"] == {"ids": 25, "rows": 28, "new_rows": 5, "evicted": 0, "free_rows": 0,
                                       "shared_hash": shared}
    assert second["ids"] == second["vocab"]  # what the run metrics report


def test_sequential_model_with_dynamic_vocabulary_trains(tmp_path):
    users = [f"u{i % 4}" for i in range(24)]
    res = LocalBackend().run(_spec([_night(tmp_path, "s", users, [f"i{i % 9}" for i in range(24)])], tmp_path / "s1",
                                   model="sequential"))
    ck = load_checkpoint(res["checkpoint"]["path"])
    assert ck.model_state["item_emb.weight"].shape[0] == 3 + 9 and res["train_loss"] > 0


def test_two_horovod_workers_share_one_vocabulary_and_match_one_worker(spark, tmp_path):
    """The vocabulary is decided once (rank 0) from all of the run's files, so
    two workers map ids like one worker and the averaged update is the same."""
    from deltarec.train.backends import HorovodBackend

    B, STEPS = 16, 4
    rng = np.random.default_rng(3)
    n = B * STEPS
    users = [f"u{i}" for i in rng.integers(0, 30, n)]
    items = [f"i{i}" for i in rng.integers(0, 12, n)]
    t = pa.table({"user_id": users, "item_id": items,
                  "user_idx": pa.array([int(u[1:]) % 97 for u in users], pa.int64()),
                  "item_idx": pa.array([int(i[1:]) % 89 for i in items], pa.int64()),
                  "label": pa.array((rng.random(n) < 0.5).astype(np.float32)),
                  "weight": pa.array(np.ones(n, np.float32))})
    half, b = n // 2, B // 2  # one worker's batch s = the two workers' step-s rows
    order = [r * half + s * b + j for s in range(STEPS) for r in range(2) for j in range(b)]
    pq.write_table(t, tmp_path / "two.parquet")
    pq.write_table(t.take(pa.array(order)), tmp_path / "one.parquet")
    kw = dict(optimizer="sgd", lr=0.5, batch_size=B, shuffle=False)
    one = LocalBackend().run(_spec([str(tmp_path / "one.parquet")], tmp_path / "c1", **kw))
    two = HorovodBackend(spark, 2).run(_spec([str(tmp_path / "two.parquet")], tmp_path / "c2", **kw))
    a = load_checkpoint(one["checkpoint"]["path"])
    c = load_checkpoint(two["checkpoint"]["path"])
    assert a.extras[VOCAB_FILE] == c.extras[VOCAB_FILE]
    for k in a.model_state:
        torch.testing.assert_close(c.model_state[k], a.model_state[k], rtol=1e-5, atol=1e-6, msg=k)


def test_vocabulary_file_does_not_depend_on_arrival_order():
    a = Vocabulary("item", min_count=2).update(ids("x", "y", "x", "z", "y"), hashed(5))
    b = Vocabulary("item", min_count=2).update(ids("y", "z", "y", "x", "x"), pa.array([101, 103, 101, 100, 100]))
    assert vocabs_to_bytes({"item": a}) == vocabs_to_bytes({"item": b}) and a.ids.to_pylist() == ["x", "y", "z"]
    assert a.rows.tolist() == b.rows.tolist() and a.counts.tolist() == b.counts.tolist()
