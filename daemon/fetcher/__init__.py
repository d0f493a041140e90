"""command → fetch → raw payload: collect commands become HTTP requests, and what the API
said becomes run events on the bus.

The fetcher (``Fetcher``) takes commands and runs them: templated requests through one shared
client (``open_client``) with each source's credentials kept to its origins, paced per host,
bodies read within their limits, pages followed, progress kept, one run per source at a time.
"""

from daemon.fetcher._auth import Credentials
from daemon.fetcher._client import ERROR_BODY_BYTES, USER_AGENT, open_client
from daemon.fetcher._fetcher import Fetcher, fetch_max_deliver
from daemon.fetcher._send import Fetched, send

__all__ = [
    "ERROR_BODY_BYTES",
    "USER_AGENT",
    "Credentials",
    "Fetched",
    "Fetcher",
    "fetch_max_deliver",
    "open_client",
    "send",
]
