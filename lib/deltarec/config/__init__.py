"""One typed config tree: ``conf/*.yaml`` + environment overlay + ``--set`` overrides.

Load order (later wins):
  1. the defaults of :mod:`deltarec.config.schema` (= what ``conf/local.yaml`` says),
  2. the YAML file given with ``--conf`` (else ``$DELTAREC_CONF``, else
     ``conf/local.yaml`` in the working directory; none: an error, see
     :func:`find_config_file`),
  3. environment variables ``DELTAREC__SECTION__KEY=value`` (double underscores),
  4. ``--set section.key=value`` on the command line.

Unknown keys, badly typed and out-of-range values fail with a
:class:`ConfigError` that names the dotted key, the bad value, where it came
from and what is allowed. ``deltarec config --explain KEY`` prints a key's
description (:func:`explain`).

Modules: ``base`` (ConfigError, the Section base class, the key walk, error
words), ``schema`` (the sections and their keys), ``load`` (file, env, --set),
``explain`` (--explain / --get text).
"""
from .base import ConfigError, Section, invalid
from .explain import KeyDoc, explain, explain_text, value_text
from .load import DEFAULT_CONF, ENV_PREFIX, find_config_file, load_config
from .schema import (
    GATE_METRICS, ColumnMapping, Config, DemoConfig, EvalConfig, FeaturesConfig, ForgettingConfig, GateConfig,
    LakeConfig, MaintainConfig, MlflowConfig, ModelConfig, PrivacyConfig, RecommendConfig, ServeConfig,
    SourceConfig, SparkConfig, TextConfig, TrainConfig, ValidationConfig, VocabConfig,
)

__all__ = [
    "ConfigError", "Section", "invalid", "KeyDoc", "explain", "explain_text", "value_text", "DEFAULT_CONF",
    "ENV_PREFIX", "find_config_file", "load_config", "GATE_METRICS", "ColumnMapping", "Config", "DemoConfig",
    "EvalConfig", "FeaturesConfig", "ForgettingConfig", "GateConfig", "LakeConfig", "MaintainConfig", "MlflowConfig",
    "ModelConfig", "PrivacyConfig", "RecommendConfig", "ServeConfig", "SourceConfig", "SparkConfig", "TextConfig",
    "TrainConfig", "ValidationConfig", "VocabConfig",
]
