"""tick → command: each source's schedule becomes collect commands on the bus.

The ticker publishes one command per due slot, at its instant (``Ticker``); at start-up it
catches up the slots missed while no daemon ran (``catch_up``). ``queue_run`` queues one run
now: the service's triggers and backfills go through it too, so every run's command and trace
are made the same way.
"""

from daemon.ticker._catchup import CATCHUP_LIMIT, CatchupPlan, plan_catchup
from daemon.ticker._queue import queue_run
from daemon.ticker._ticker import PREPARE_AHEAD_S, Ticker, jitter_offset

__all__ = [
    "CATCHUP_LIMIT",
    "PREPARE_AHEAD_S",
    "CatchupPlan",
    "Ticker",
    "jitter_offset",
    "plan_catchup",
    "queue_run",
]
