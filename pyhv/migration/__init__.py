"""Live migration (pre-copy over TCP between two hosts' workers); see docs/migration.md."""

from pyhv.migration.stream import MigrationError

__all__ = ["MigrationError"]
