"""Where fttrain keeps what it builds once and reuses (tiny model, generated data)."""

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = REPO_ROOT / "conf"


def cache_dir() -> Path:
    # FTTRAIN_CACHE lets tests and clusters point at a shared or scratch disk.
    root = os.environ.get("FTTRAIN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "fttrain"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path
