"""Helpers shared by tests of several folders (never tests themselves): waiting for a condition
(wait.py), a guest's side of a VMBus ring (guest_ring.py), hand-made ELF images (elf.py), the
Testlimit timeline (testlimit.py), any JSON value a hostile peer may send (hostile.py). A test
module imports helpers from here, from tests/guests or from a folder's helper module, never from
another test module (tests/test_layout.py checks)."""
