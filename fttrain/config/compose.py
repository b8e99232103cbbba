"""Compose a run's config outside ``hydra.main`` (numerics check, tests)."""

from __future__ import annotations

from typing import Sequence


def compose_config(overrides: Sequence[str] = (), return_hydra_config: bool = False, config_dirs: Sequence[str] = ()):
    """The run's config as ``python -m fttrain [--config-dir D ...] OVERRIDES`` composes it:
    fttrain's groups first, then the user's folders (Hydra's search path)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from fttrain.config.schema import register_configs
    from fttrain.paths import CONF_DIR

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose("config", overrides=[*overrides, *searchpath_override(config_dirs)],
                       return_hydra_config=return_hydra_config)


def searchpath_override(config_dirs: Sequence[str]) -> list:
    """--config-dir folders as the Hydra override that adds them to the search path."""
    from pathlib import Path

    if not config_dirs:
        return []
    # Quoted: a path may hold ',', '=', brackets, quotes or non-ASCII letters, which the override grammar splits on.
    quoted = [str(Path(d).resolve()).replace("\\", "\\\\").replace("'", "\\'") for d in config_dirs]
    return ["hydra.searchpath=[" + ",".join(f"'file://{q}'" for q in quoted) + "]"]
