"""Typed config: files, env overlay, --set overrides, and errors that name the key."""
from pathlib import Path

import pytest

from deltarec.cli import main
from deltarec.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_configs_load():
    local = load_config(ROOT / "conf" / "local.yaml", environ={})
    assert (local.spark.master, local.lake.engine, local.train.backend, local.train.num_proc) == (
        "local[2]", "delta-rs", "horovod", 2)
    assert local.demo.enabled
    cluster = load_config(ROOT / "conf" / "cluster.yaml", environ={})
    assert cluster.lake.engine == "delta-spark" and cluster.train.use_gpu and cluster.spark.master is None


def test_overrides_env_then_set_win(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: 0.5\n  epochs: 3\n")
    cfg = load_config(f, ["train.epochs=7", "model.hidden=[8, 4]"], environ={"DELTAREC__TRAIN__LR": "0.25"})
    assert cfg.train.lr == 0.25 and cfg.train.epochs == 7 and cfg.model.hidden == [8, 4]


@pytest.mark.parametrize("override, needle", [
    ("train.foo=1", "unknown config key 'train.foo'"),
    ("trian.lr=1", "unknown config key 'trian'"),
    ("train.lr=abc", "train.lr must be a number, got 'abc'"),
    ("train.epochs=1.5", "train.epochs must be an integer"),
    ("lake.engine=parquet", "lake.engine must be one of auto, delta-rs, delta-spark; got 'parquet'"),
    ("train.backend=mpi", "train.backend must be one of horovod, torch, local"),
    ("train.batch_size=1001", "divide evenly across train.num_proc=2"),
    ("validation.max_quarantine_fraction=2", "max_quarantine_fraction = 2.0 is invalid"),
    ("demo.enabled=maybe", "demo.enabled must be true or false"),
    ("train.lr", "must look like section.key=value"),
])
def test_bad_values_name_the_key(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "conf" / "local.yaml", [override], environ={})
    assert needle in str(e.value)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_cli_reports_config_errors_with_exit_2(capsys):
    assert main(["config", "--conf", str(ROOT / "conf" / "local.yaml"), "--set", "train.nope=1"]) == 2
    assert "unknown config key 'train.nope'" in capsys.readouterr().err
    assert main(["config", "--conf", str(ROOT / "conf" / "local.yaml"), "--get", "train.num_proc"]) == 0
    assert capsys.readouterr().out.strip() == "2"
