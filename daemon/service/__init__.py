"""The request-reply service beside the pipeline: status, runs, trigger, health, dead-letter
replay, backfill and its progress, as NATS micro endpoints (``contracts.ENDPOINTS``)."""

from daemon.service._service import Service

__all__ = ["Service"]
