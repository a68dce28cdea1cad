"""The VMMS's images directory: a VM's `image` is a name looked up in it, never a host path
(issue 11, finding 10). `pyhv vmms serve --images DIR`, default ``STATE/images``; the bundled
reference guest answers to BUNDLED whether or not the directory holds it."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

#: The bundled reference guest's name (also what a VM without an `image` boots).
BUNDLED = "pyhv-guest"
#: A file name: no directory part, no "..", nothing hidden.
IMAGE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")


class ImageError(ValueError):
    """An image name that is refused or names no image; the message says what to do."""


def check_image_name(name: str) -> str:
    """`name`, or ImageError: absolute paths, directories and ".." are refused."""
    if not IMAGE_NAME_RE.match(name) or ".." in name:
        raise ImageError(
            f"image {name!r} is not an image name: give the name of a file in the VMMS's images "
            f"directory (`pyhv vmms serve --images DIR`), or {BUNDLED!r} for the bundled guest; "
            "host paths are refused"
        )
    return name


class ImageDirectory:
    """Resolves image names to files of `root` (made on first use, 0700) or to the bundled
    guest through `bundled` (which may build it first)."""

    def __init__(self, root: Path, bundled: Callable[[], str]) -> None:
        self.root = Path(root)
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._bundled = bundled

    def resolve(self, name: str | None) -> str:
        """The host path of image `name` (None: the bundled guest); ImageError if there is no
        such file in the directory."""
        if name is None or name == BUNDLED:
            return self._bundled()
        path = self.root / check_image_name(name)
        if not path.is_file():
            raise ImageError(
                f"there is no image {name!r} in {self.root}: copy the guest image there, or use "
                f"{BUNDLED!r}"
            )
        return str(path)
