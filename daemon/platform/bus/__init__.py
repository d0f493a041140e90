"""The bus: NATS JetStream as coleta uses it (connect, streams, publish, pull, buckets)."""

from nats.aio.subscription import Subscription

from daemon.platform.bus._burst import header_block
from daemon.platform.bus._bus import FETCH_WAIT_S, Bus
from daemon.platform.bus._declare import REDECLARE_EVERY_S, BusOptions
from daemon.platform.bus._messages import (
    Msg,
    Original,
    Pending,
    PubAck,
    PullSubscription,
    deliveries,
    message_size,
    message_trace_id,
    settle,
    trace_headers,
)

__all__ = [
    "FETCH_WAIT_S",
    "REDECLARE_EVERY_S",
    "Bus",
    "BusOptions",
    "Msg",
    "Original",
    "Pending",
    "PubAck",
    "PullSubscription",
    "Subscription",
    "deliveries",
    "header_block",
    "message_size",
    "message_trace_id",
    "settle",
    "trace_headers",
]
