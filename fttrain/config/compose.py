"""Compose a run's config outside ``hydra.main`` (numerics check, tests)."""

from __future__ import annotations

from typing import Sequence


def compose_config(overrides: Sequence[str] = (), return_hydra_config: bool = False):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from fttrain.config.schema import register_configs
    from fttrain.paths import CONF_DIR

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose("config", overrides=list(overrides), return_hydra_config=return_hydra_config)
