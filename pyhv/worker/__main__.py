"""``python -m pyhv.worker --fd N``: a worker process serving one VM over the socket at fd N."""

from __future__ import annotations

import sys

from pyhv.worker.server import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
