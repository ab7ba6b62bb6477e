"""``python -m dualpipe``: the command line of :mod:`dualpipe.cli`."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
