"""Synthetic storage: the storage VSP, its protocol and the disk behind it (a host file)."""
