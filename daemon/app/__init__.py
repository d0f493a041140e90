"""The root: the daemon's task group, its roles, its signals and its one shutdown deadline.

``open_daemon`` opens what the stages need and starts them (``_daemon``); ``run`` is ``coleta
run`` (``_run``): the daemon under signals, SIGHUP reloading its config (``_reload``).
"""

from daemon.app._daemon import (
    Daemon,
    Infrastructure,
    mask_secrets,
    open_daemon,
    open_infrastructure,
)
from daemon.app._reload import Reloadable, reload_config
from daemon.app._run import daemon_problem, run

__all__ = [
    "Daemon",
    "Infrastructure",
    "Reloadable",
    "daemon_problem",
    "mask_secrets",
    "open_daemon",
    "open_infrastructure",
    "reload_config",
    "run",
]
