"""Where a host's VMMS keeps its state and its socket (light: the client imports it)."""

from __future__ import annotations

import os
from pathlib import Path


def default_state_dir() -> Path:
    """``$PYHV_STATE_DIR``, else ``$XDG_STATE_HOME/pyhv``, else ``~/.local/state/pyhv``."""
    env = os.environ.get("PYHV_STATE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local/state")
    return Path(base) / "pyhv"
