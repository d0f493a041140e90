"""``python -m daemon`` is ``coleta``."""

from daemon.cli import main

raise SystemExit(main())
