"""Embedded nats-server and PostgreSQL for the no-infrastructure default.

With no NATS_URL / DATABASE_URL configured, ``coleta run`` starts both servers itself, so a
first run needs nothing but Python. Their data lives in a state directory (``./.coleta`` by
default) across restarts, and they stop when the daemon exits::

    <state_dir>/
      nats.url, database.url   where the running daemon's servers listen (read_state_urls)
      nats/                    nats-server: jetstream/ store, nats-server.log, .pid, lock,
                               credentials.json and nats-server.conf (both 0600)
      postgres/                PostgreSQL 16 data directory (pgserver); its log is postgres/log
      postgres.lock

Neither server can collide with a system one: nats-server picks a free port on 127.0.0.1 and
PostgreSQL listens only on a Unix socket. The state directory is private: directories 0700,
files 0600, made so at every start.

The nats-server admits only a user generated at its first start (``_nats``); PostgreSQL
listens on a private Unix socket only, confined again after pgserver opens its directories
when run as root (``_postgres``). An exclusive lock per server keeps two daemons off one store
(``_files``).
"""

from daemon.platform.embedded._nats import (
    EmbeddedNats,
    StateUrls,
    embedded_nats,
    read_state_urls,
    with_password,
)
from daemon.platform.embedded._postgres import embedded_postgres

__all__ = [
    "EmbeddedNats",
    "StateUrls",
    "embedded_nats",
    "embedded_postgres",
    "read_state_urls",
    "with_password",
]
