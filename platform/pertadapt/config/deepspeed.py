"""DeepSpeed JSON files: found by name among the shipped ones or as a path, and checked before any run.

The JSON holds parallelism and precision knobs only (ZeRO stage, offload, bf16/autocast); batch sizes,
accumulation and clipping come from the run config, so a swept value has one source of truth.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pertadapt.config.errors import ConfigError
from pertadapt.files import package_data

__all__ = ["ALLOWED_DEEPSPEED_KEYS", "find_deepspeed_json", "read_deepspeed_json"]

#: Top-level keys a DeepSpeed JSON of ours may hold.
ALLOWED_DEEPSPEED_KEYS = frozenset({
    "zero_optimization", "bf16", "fp16", "torch_autocast", "zero_force_ds_cpu_optimizer",
    "zero_allow_untested_optimizer", "steps_per_print", "wall_clock_breakdown", "communication_data_type",
    "activation_checkpointing",
})


def find_deepspeed_json(name: str) -> Path:
    """Resolve ``engine.deepspeed_config``: an existing path, or a file name among the shipped JSONs."""
    given = Path(name)
    if given.is_file():
        return given
    shipped = package_data("deepspeed", given.name)
    if len(given.parts) == 1 and shipped.is_file():
        return Path(str(shipped))
    names = sorted(p.name for p in package_data("deepspeed").iterdir() if p.name.endswith(".json"))
    raise ConfigError(f"engine.deepspeed_config: {name!r} is neither a file nor a shipped DeepSpeed JSON "
                      f"({', '.join(names)})")


def read_deepspeed_json(name: str) -> dict[str, Any]:
    """The parsed, checked DeepSpeed JSON named by ``engine.deepspeed_config``.

    Raises
    ------
    ConfigError
        Not found, not valid JSON, not an object, or keys that belong in the run config.
    """
    path = find_deepspeed_json(name)
    try:
        ds = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(ds, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(ds).__name__}")
    ds.pop("_comment", None)  # the file's "when to use" note; not a DeepSpeed key
    if isinstance(ds.get("checkpoint"), dict) and ds["checkpoint"].get("load_universal"):
        raise ConfigError(f"{path}: checkpoint.load_universal: DeepSpeed's universal-checkpoint loader unpickles "
                          "files (code could run on resume); it is not supported")
    extra = set(ds) - ALLOWED_DEEPSPEED_KEYS
    if extra:
        raise ConfigError(f"{path}: keys {sorted(extra)} belong in the run config (optim.*), not the DeepSpeed "
                          f"JSON; allowed: {sorted(ALLOWED_DEEPSPEED_KEYS)}")
    return ds
