"""coleta: collect HTTP APIs on a schedule into PostgreSQL, through NATS JetStream."""

#: The one place the version is written: pyproject.toml reads it from here (setuptools'
#: ``attr:``), so it needs no ``importlib.metadata`` look-up (about 50 ms per process).
__version__ = "0.1.0"

__all__ = ["__version__"]
