"""Certificates for TLS tests: a CA and hosts' certificates (each good as a server's and as a
client's, for 127.0.0.1 and localhost), made by what `pyhv cluster init` / `add-host` use
(pyhv.cluster.pki)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pyhv.cluster import pki


@dataclass
class Ca:
    cert: Path
    dir: Path

    def issue(self, name: str) -> tuple[Path, Path]:
        """A certificate for host `name` (127.0.0.1, localhost) and its key: (cert, key); the
        same files when asked again (a test's clients may ask once each)."""
        cert, key = self.dir / f"{name}.pem", self.dir / f"{name}.key"
        if cert.exists() and key.exists():
            return cert, key
        return pki.add_host(self.dir, name)


def make_ca(directory: Path, name: str = "pyhv test CA") -> Ca:
    """A self-signed CA in `directory` (ca.pem, ca.key)."""
    return Ca(pki.init(directory, name), directory)
