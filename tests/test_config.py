"""Typed config: one set of defaults (= conf/local.yaml), files, env overlay,
--set overrides, errors that name the key, its value, its source and what is
allowed, and `deltarec config --get / --explain`."""
import json
from pathlib import Path

import pytest
import yaml

from deltarec.cli import main
from deltarec.config import ColumnMapping, Config, ConfigError, explain, find_config_file, load_config

ROOT = Path(__file__).resolve().parents[1]
LOCAL = ROOT / "conf" / "local.yaml"


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v and k != "conf":  # spark.conf's names are whole keys
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def all_keys(key: str = ""):
    for k in explain(key).keys:
        yield from all_keys(k.key) if k.is_section else [k]


def test_shipped_configs_load():
    local = load_config(LOCAL, environ={})
    assert (local.spark.master, local.lake.engine, local.train.backend, local.train.num_proc) == (
        "local[2]", "delta-rs", "auto", 2)
    assert local.demo.enabled
    cluster = load_config(ROOT / "conf" / "cluster.yaml", environ={})
    assert cluster.lake.engine == "delta-spark" and cluster.train.use_gpu and cluster.spark.master is None


def test_local_yaml_agrees_with_the_defaults():
    """What conf/local.yaml says is what the built-in defaults say, key by key."""
    written = flat(yaml.safe_load(LOCAL.read_text()))
    assert len(written) > 50  # the file really writes the main keys out
    from_file, defaults = flat(load_config(LOCAL, environ={}).to_dict()), flat(Config().to_dict())
    differ = {k: (from_file[k], defaults[k]) for k in defaults if from_file[k] != defaults[k]}
    assert differ == {}, f"conf/local.yaml (left) and the defaults in config/schema.py (right) disagree: {differ}"
    assert set(written) <= set(defaults), f"keys the schema does not have: {set(written) - set(defaults)}"


def test_source_columns_example_in_local_yaml_is_valid():
    lines = LOCAL.read_text().splitlines()
    start = lines.index("  # columns:") + 1
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith("  #   "))
    example = yaml.safe_load("\n".join(ln[len("  #   "):] for ln in lines[start:end]))
    assert {"user_id", "item_id", "event_time", "rating"} <= set(example)
    cfg = load_config(LOCAL, [f"source.columns={json.dumps(example)}"], environ={})
    assert cfg.source.columns.rating == "stars" and cfg.source.columns.default_event_type == "rating"


def test_every_key_is_documented_and_every_number_has_a_range():
    keys = list(all_keys())
    assert len(keys) > 100
    assert [k.key for k in keys if len(k.description) < 10] == []
    unbounded = [k.key for k in keys if k.allowed.startswith(("an integer", "a number", "null or an integer",
                                                               "null or a number"))
                 and not any(b in k.allowed for b in (">", "<", " in [", " in ("))]
    assert sorted(unbounded) == ["features.rating.max", "features.rating.min", "features.rating.threshold"]  # any scale


def test_overrides_env_then_set_win(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: 0.5\n  epochs: 3\n")
    cfg = load_config(f, ["train.epochs=7", "model.hidden=[8, 4]"], environ={"DELTAREC__TRAIN__LR": "0.25"})
    assert cfg.train.lr == 0.25 and cfg.train.epochs == 7 and cfg.model.hidden == [8, 4]
    assert cfg.origin("train.lr") == "environment variable DELTAREC__TRAIN__LR"
    assert cfg.origin("train.epochs") == "--set train.epochs=7"
    assert cfg.origin("model.hidden") == "--set model.hidden=[8, 4]"
    assert cfg.origin("train.batch_size") == "default"


@pytest.mark.parametrize("override, message", [
    # crashed later with ZeroDivisionError before
    ("train.accumulation_steps=0",
     "train.accumulation_steps = 0 (--set train.accumulation_steps=0): must be an integer >= 1"),
    ("train.lr=abc", "train.lr = 'abc' (--set train.lr=abc): must be a number > 0"),
    ("train.lr=.nan", "train.lr = nan (--set train.lr=.nan): must be a number > 0"),
    ("train.epochs=1.5", "train.epochs = 1.5 (--set train.epochs=1.5): must be an integer >= 1"),
    ("lake.engine=parquet",
     "lake.engine = 'parquet' (--set lake.engine=parquet): must be one of auto, delta-rs, delta-spark"),
    ("train.backend=mpi", "train.backend = 'mpi' (--set train.backend=mpi): must be one of auto, horovod, torch, local"),
    ("train.batch_size=1001", "train.batch_size = 1001 (--set train.batch_size=1001) is invalid: the global "
                              "batch must divide evenly across train.num_proc=2 workers"),
    ("validation.max_quarantine_fraction=2",
     "validation.max_quarantine_fraction = 2 (--set validation.max_quarantine_fraction=2): must be a number in [0, 1]"),
    ("demo.enabled=maybe", "demo.enabled = 'maybe' (--set demo.enabled=maybe): must be true or false"),
    # ranges the old code did not check at all
    ("model.hidden=[16, 0]", "model.hidden[1] = 0 (--set model.hidden=[16, 0]): must be an integer >= 1"),
    ("model.dropout=1.5", "model.dropout = 1.5 (--set model.dropout=1.5): must be a number in [0, 1)"),
    ("eval.popularity_days=0", "eval.popularity_days = 0 (--set eval.popularity_days=0): must be an integer >= 1"),
    ("spark.shuffle_partitions=0", "spark.shuffle_partitions = 0 (--set spark.shuffle_partitions=0): must be an "
                                   "integer >= 1"),
    ("train.grad_clip=-1", "train.grad_clip = -1 (--set train.grad_clip=-1): must be a number >= 0"),
    ("train.checkpoint_every_steps=-5", "train.checkpoint_every_steps = -5 (--set train.checkpoint_every_steps=-5): "
                                        "must be an integer >= 0"),
    ("validation.future_tolerance_minutes=-1", "validation.future_tolerance_minutes = -1"),
    ("model.text.lora_alpha=0", "model.text.lora_alpha = 0 (--set model.text.lora_alpha=0): must be a number > 0"),
    # a nested mapping used to be stringified into one value
    ("spark.conf={spark: {sql: 1}}", "spark.conf.spark = {'sql': 1} (--set spark.conf={spark: {sql: 1}}): must be "
                                     "a string (a name in spark.conf is one key with its dots"),
    ("source.columns=5", "source.columns = 5 (--set source.columns=5): must be a section"),
    ("gate.metrics=[1]", "gate.metrics[0] = 1 (--set gate.metrics=[1]): must be a string"),
    ("train.lr.step=1", "--set train.lr.step=1: train.lr is a value, not a section"),
    ("model.hidden=[16", "--set model.hidden=[16: the value is not valid YAML"),
    ("train.lr", "must look like section.key=value"),
])
def test_bad_values_name_key_value_source_and_what_is_allowed(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(LOCAL, [override], environ={})
    assert message in str(e.value)


@pytest.mark.parametrize("override, message", [
    ("train.foo=1", "unknown config key 'train.foo' (--set train.foo=1); keys allowed in train: accumulation_steps,"),
    ("trian.lr=1", "unknown config key 'trian' (--set trian.lr=1) (did you mean 'train'?)"),
    ("source.columns.user=u", "unknown config key 'source.columns.user' (--set source.columns.user=u) (did you mean "
                              "'source.columns.user_id'?)"),
])
def test_unknown_keys_say_what_is_allowed(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(LOCAL, [override], environ={})
    assert message in str(e.value)


def test_errors_name_the_file_or_env_var_and_all_errors_come_at_once(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("features:\n  salt: 2024\ntrain:\n  lr: 0\n")
    with pytest.raises(ConfigError) as e:
        load_config(f, ["model.dropout=2"], environ={"DELTAREC__TRAIN__EPOCHS": "0"})
    msg = str(e.value)
    assert msg.startswith("4 config errors:")
    assert f"features.salt = 2024 ({f}): must be a string (YAML read it as int: write it in quotes, '2024')" in msg
    assert f"train.lr = 0 ({f}): must be a number > 0" in msg
    assert "train.epochs = 0 (environment variable DELTAREC__TRAIN__EPOCHS): must be an integer >= 1" in msg
    assert "model.dropout = 2 (--set model.dropout=2)" in msg


def test_override_values_are_typed_by_the_key():
    cfg = load_config(LOCAL, [
        "features.salt=0123",  # YAML would read 83 (octal)
        "validation.id_pattern=[A-Z]+",  # YAML would read a list
        "lake.runs_table='runs_x'", 'mlflow.experiment="/Shared/x"',  # quoted as in YAML: the quotes go
        "train.lr=1e-3",  # YAML 1.1 reads text
        "spark.conf.spark.sql.adaptive.enabled=true",  # one Spark setting, not nested sections
        "source.columns.user_id=user", "source.columns.order_id=null", "mlflow.tracking_uri=",
    ], environ={"DELTAREC__SPARK__CONF__SPARK.EXECUTOR.CORES": "4"})
    assert cfg.features.salt == "0123" and cfg.validation.id_pattern == "[A-Z]+" and cfg.train.lr == 0.001
    assert (cfg.lake.runs_table, cfg.mlflow.experiment) == ("runs_x", "/Shared/x")
    assert cfg.spark.conf == {"spark.sql.adaptive.enabled": "true", "spark.executor.cores": "4"}
    assert cfg.source.columns.user_id == "user" and cfg.source.columns.order_id is None
    assert cfg.mlflow.tracking_uri is None
    assert load_config(ROOT / "conf" / "cluster.yaml", environ={}).spark.conf["spark.task.resource.gpu.amount"] == "1"


def test_copies_are_validated():
    cfg = load_config(LOCAL, environ={})
    full = cfg.replace(train=cfg.train.replace(strategy="full"), lake=cfg.lake.replace(root="/tmp/x"))
    assert (full.train.strategy, full.lake.root) == ("full", "/tmp/x")
    assert (cfg.train.strategy, cfg.lake.root) == ("auto", "./lake")  # the original is unchanged
    with pytest.raises(ConfigError, match=r"TrainConfig: accumulation_steps = 0: must be an integer >= 1"):
        cfg.train.replace(accumulation_steps=0)
    with pytest.raises(ConfigError, match=r"LakeConfig: engine = 'parquet': must be one of"):
        cfg.lake.engine = "parquet"


def test_missing_file_bad_yaml_and_no_config_found(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    assert find_config_file("x.yaml", environ={"DELTAREC_CONF": "y.yaml"}) == Path("x.yaml")
    assert find_config_file(None, environ={"DELTAREC_CONF": "y.yaml"}) == Path("y.yaml")
    assert find_config_file(None, environ={}, cwd=ROOT) == ROOT / "conf" / "local.yaml"
    with pytest.raises(ConfigError, match=r"no config file: .*Pass --conf FILE.*DELTAREC_CONF"):
        find_config_file(None, environ={}, cwd=tmp_path)


def test_cli_outside_the_repository_stops_without_a_config(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DELTAREC_CONF", raising=False)
    assert main(["config", "--get", "train.lr"]) == 2
    assert "no config file" in capsys.readouterr().err
    assert main(["config", "--conf", str(LOCAL), "--get", "train.lr"]) == 0
    assert capsys.readouterr().out.strip() == "0.003"


def cli(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(["config", "--conf", str(LOCAL), *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_get_prints_yaml_json_and_plain_scalars(capsys):
    rc, out, err = cli(capsys, "--set", "train.nope=1")
    assert rc == 2 and "unknown config key 'train.nope'" in err
    assert cli(capsys, "--get", "train.num_proc")[1] == "2\n"
    assert cli(capsys, "--get", "demo.enabled")[1] == "true\n"
    assert cli(capsys, "--get", "spark.master", "--set", "spark.master=null")[1] == "null\n"
    rc, out, _ = cli(capsys, "--get", "source.columns", "--set", "source.columns.user_id=user")
    assert rc == 0 and yaml.safe_load(out) == ColumnMapping(user_id="user").model_dump()
    rc, out, _ = cli(capsys, "--get", "demo.columns", "--json")
    assert json.loads(out) == Config().demo.columns.model_dump()
    assert yaml.safe_load(cli(capsys, "--get", "model")[1]) == Config().model.model_dump()
    assert cli(capsys, "--get", "model.hidden")[1] == "[64, 32]\n"
    assert yaml.safe_load(cli(capsys)[1]) == Config().to_dict()
    rc, _, err = cli(capsys, "--get", "train.nope")
    assert rc == 2 and "unknown config key 'train.nope'" in err


def test_cli_explain_a_key_a_section_and_the_top(capsys):
    rc, out, _ = cli(capsys, "--explain", "train.accumulation_steps", "--set", "train.accumulation_steps=2")
    assert rc == 0
    assert out.splitlines() == [
        f"train.accumulation_steps: {explain('train.accumulation_steps').description}",
        "  allowed: an integer >= 1",
        "  default: 1",
        "  current: 2  (--set train.accumulation_steps=2)",
    ]
    assert "Micro-batches per optimizer step" in out
    rc, out, _ = cli(capsys, "--explain", "lake")
    keys = [ln.split(" =")[0].strip() for ln in out.splitlines() if ln.startswith("  lake.")]
    assert rc == 0 and keys == [f"lake.{k}" for k in Config().lake.model_dump()]
    assert "lake.engine = delta-rs   [one of auto, delta-rs, delta-spark]" in out
    rc, out, _ = cli(capsys, "--explain", "source.columns")
    assert "current: null" in out and "source.columns.user_id = user_id   [a string]" in out
    rc, out, _ = cli(capsys, "--explain")
    assert rc == 0 and "train: section, see `deltarec config --explain train`" in out
    rc, _, err = cli(capsys, "--explain", "train.speed")
    assert rc == 2 and "unknown config key 'train.speed'; keys in train:" in err
