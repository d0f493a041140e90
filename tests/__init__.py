"""coleta's tests: one folder per package of the daemon, fixtures once in ``fix_*.py``."""

from pathlib import Path

#: The repository's root: the README, the examples, ``ops/``.
ROOT = Path(__file__).resolve().parents[1]
