"""The VM inventory on disk: one JSON file per VM under the state directory
(pyhv.vmms.paths.default_state_dir), written atomically so a crash never leaves
half a configuration."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from pyhv.vmms.config import VmSettings, VmSettingsError, check_name, settings_from_dict
from pyhv.vmms.paths import default_state_dir as default_state_dir

log = logging.getLogger(__name__)


def write_atomically(path: Path, text: str, mode: int = 0o600, *, sync: bool = True) -> None:
    """`path` holds `text` after a crash at any point, or its old content: a temporary file in
    the same directory, fsync'd, renamed over `path`, then the directory fsync'd so the rename
    itself is on disk. On an OSError the temporary file goes and `path` is untouched. Without
    `sync`, atomic against the writer's own death only (not the host's): no fsync."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            if sync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if not sync:
        return
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class ConfigStore:
    """``<state>/vms/<name>.json`` for each VM. The directory is private to its user (0700)."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self.vm_dir = self.state_dir / "vms"
        self.vm_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.state_dir, 0o700)
        #: Files that could not be read back, with why (shown by `pyhv vmms serve`).
        self.broken: dict[str, str] = {}

    def _path(self, name: str) -> Path:
        return self.vm_dir / f"{check_name(name)}.json"

    def load_all(self) -> dict[str, VmSettings]:
        vms: dict[str, VmSettings] = {}
        self.broken.clear()
        for path in sorted(self.vm_dir.glob("*.json")):
            try:
                settings = settings_from_dict(json.loads(path.read_text()))
                if settings.name != path.stem:
                    raise VmSettingsError(f"it names VM {settings.name!r}, not {path.stem!r}")
            except (OSError, ValueError) as e:
                self.broken[path.name] = str(e)
                log.warning("skipping %s: %s (fix or remove the file)", path, e)
                continue
            vms[settings.name] = settings
        return vms

    def save(self, settings: VmSettings) -> None:
        """Stored atomically; an OSError (disk full) leaves the previous file as it was."""
        path = self._path(settings.name)
        write_atomically(path, json.dumps(settings.to_dict(), indent=2) + "\n")

    def delete(self, name: str) -> None:
        self._path(name).unlink(missing_ok=True)
