"""``coleta``: the daemon (``run``), its database (``migrate``), its config (``check-config``),
and client commands that ask a running daemon (``status``, ``runs``, ``trigger``, ``health``,
``backfill``): argv (``_main``), the service client (``_client``), the commands
(``_commands``) and what they print (``_render``)."""

from daemon.cli._main import main

__all__ = ["main"]
