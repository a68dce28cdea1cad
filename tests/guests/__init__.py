"""Every test guest of the suite, in one folder: their sources (*.S, kernel32.c, guest.h,
link.ld), the one build helper (build.py) and the harness that runs a flat guest in a partition
(harness.py). Not tests: the tests of the reference guest (guest/) are in tests/guest/."""
