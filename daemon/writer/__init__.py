"""raw payload → write → PostgreSQL: run events become rows and run records, idempotently,
acked only after commit; retention prunes what is past each source's ``retention_days``."""

from daemon.writer._retention import BATCH_ROWS, PRUNE_EVERY_S, prune, prune_forever
from daemon.writer._writer import BATCH_BYTES, Writer

__all__ = ["BATCH_BYTES", "BATCH_ROWS", "PRUNE_EVERY_S", "Writer", "prune", "prune_forever"]
