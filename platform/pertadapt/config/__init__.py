"""Typed run configuration (schema) and its YAML loader; imports nothing heavy."""

from pertadapt.config.load import config_from_dict, config_hash, config_to_dict, load_run_config, read_yaml
from pertadapt.config.schema import ConfigError, RunConfig

__all__ = ["ConfigError", "RunConfig", "config_from_dict", "config_hash", "config_to_dict", "load_run_config",
           "read_yaml"]
