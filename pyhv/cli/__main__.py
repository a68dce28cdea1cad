"""`python -m pyhv.cli ...`, the same as the `pyhv` command."""

from pyhv.cli import main

if __name__ == "__main__":
    main()
