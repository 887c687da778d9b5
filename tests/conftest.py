"""Shared fixtures: one local[2] SparkSession for the whole run (a JVM takes
~15 s to start here), a fresh lake directory per test, small real data."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lib"))
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)

REAL_DATA = (ROOT / ".." / "shared" / "data" / "online_retail" / "online_retail.parquet").resolve()


def make_config(lake_root, *overrides: str, conf: str | None = None):
    from deltarec.config import load_config

    base = [
        f"lake.root={lake_root}", "lake.engine=delta-rs", "train.backend=local", "train.num_proc=1",
        "train.progress=false", "train.batch_size=256", "features.user_buckets=2048",
        "features.item_buckets=1024", "model.embedding_dim=8", "model.hidden=[16]",
        "spark.shuffle_partitions=2", "demo.enabled=true", "demo.max_days=5", "demo.nights=2",
        f"demo.data_path={REAL_DATA}",
        "recommend.enabled=false",  # a table refresh per night costs seconds; its own tests turn it on
    ]
    return load_config(conf or ROOT / "conf" / "local.yaml", base + list(overrides), environ={})


@pytest.fixture(scope="session")
def spark():
    from deltarec.spark import build_spark

    cfg = make_config("/tmp/unused", "spark.master=local[2]")
    # Where Delta's jars are configured the one session gets them (one SparkContext per
    # process), so the delta-spark engine's tests can run in it (test_lake_contract.py).
    session = build_spark(cfg, delta_jars=os.environ.get("DELTAREC_DELTA_JARS") or None)
    yield session


@pytest.fixture(autouse=True)
def _release_cached_data():
    """One JVM serves the whole run: drop each test's cached DataFrames so the
    driver heap does not fill up over 300+ tests (per module was not enough:
    test_delta_job's history tests ran out of heap in the full suite)."""
    yield
    if "pyspark" not in sys.modules:  # no Spark in this run (e.g. the GPU tests on a torch-only machine)
        return
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        active.catalog.clearCache()
        import gc

        gc.collect()  # Python-side DataFrame handles pin JVM objects until collected


@pytest.fixture(scope="module", autouse=True)
def _close_worker_pools():
    """Warm worker pools (train/pool.py) live as long as the driver, here the
    whole run: close them after each module so none idles under the next
    modules' tests (idle Horovod ranks kept a core busy)."""
    yield
    if "deltarec.train.pool" in sys.modules:
        sys.modules["deltarec.train.pool"].close_pools()


@pytest.fixture
def lake_root(tmp_path):
    return tmp_path / "lake"


@pytest.fixture(scope="session")
def real_data_path():
    if not REAL_DATA.is_file():
        pytest.skip(f"real Online Retail data not found at {REAL_DATA}")
    return REAL_DATA


def pytest_sessionfinish(session, exitstatus):
    # pytest's exit code 5 ("no tests ran") must fail CI, never pass it.
    if exitstatus == 5:
        session.exitstatus = 1


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    """A random-weight 2-layer BERT and a word-level tokenizer saved like a real model directory."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    d = tmp_path_factory.mktemp("tiny_bert")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + "red blue white heart candle mug bag set of lights".split()
    BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}).save_pretrained(d)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=64)).save_pretrained(d)
    return str(d)


_DEMO_LAKES: dict[tuple[str, ...], tuple] = {}


@pytest.fixture(scope="session")
def demo_lake(spark, tmp_path_factory, real_data_path):
    """``demo_lake(dest, *overrides) -> (results, printed)``: a demo lake with
    ``make_config``'s settings plus ``overrides``, built once per session for
    each set of overrides and copied to ``dest`` for each caller (the ledger
    stores lake paths relative to the root, so a copy is a lake of its own
    and a module may change it freely)."""
    import shutil

    from deltarec.pipeline.demo import run_demo

    def build(dest, *overrides: str):
        key = tuple(overrides)
        if key not in _DEMO_LAKES:
            root = tmp_path_factory.mktemp("demo-template") / "lake"
            printed: list[str] = []
            results = run_demo(spark, make_config(root, *overrides), out=printed.append)
            _DEMO_LAKES[key] = (root, results, printed)
        root, results, printed = _DEMO_LAKES[key]
        shutil.copytree(root, dest)
        return results, list(printed)

    return build
