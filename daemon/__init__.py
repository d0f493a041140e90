"""coleta: collect HTTP APIs on a schedule into PostgreSQL, through NATS JetStream."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("coleta")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"

__all__ = ["__version__"]
