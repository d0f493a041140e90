"""What every stage uses, and no stage owns: the bus, the database, the dead-letter office,
telemetry, logging, redaction, retries, and the process's own plumbing.

Import the module you need (``from daemon.platform import bus, metrics``); each keeps a small
public surface in its ``__all__``. Nothing here imports a stage or the settings.
"""

__all__ = [
    "bus",
    "clock",
    "db",
    "dead_letters",
    "embedded",
    "logs",
    "meter",
    "metrics",
    "migrate",
    "nats_auth",
    "phase",
    "prometheus",
    "redact",
    "retry",
    "spans",
    "systemd",
    "tracing",
]
