"""``paca_hpu.cli``: the ``run_paca_clm`` recipe's public names where they were before (the recipe lives in
:mod:`paca_hpu.recipe`), so ``scripts/run_paca_clm.py`` and ``from paca_hpu.cli import main, run, parse_args`` keep
working."""

import sys

from .recipe import *  # noqa: F401,F403  (every name of paca_hpu.recipe.__all__)
from .recipe import __all__, main  # noqa: F401

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
