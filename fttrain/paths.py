"""Where fttrain keeps what it builds once and reuses (tiny model, generated data)."""

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
CONF_DIR = PACKAGE_DIR / "conf"  # shipped in the package: a wheel install composes from any directory
SBATCH_DIR = PACKAGE_DIR / "sbatch"  # the Slurm job templates


def cache_dir() -> Path:
    # FTTRAIN_CACHE lets tests and clusters point at a shared or scratch disk.
    root = os.environ.get("FTTRAIN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "fttrain"
    )
    path = Path(root).resolve()  # absolute: saved adapters name their base model by it
    path.mkdir(parents=True, exist_ok=True)
    return path
