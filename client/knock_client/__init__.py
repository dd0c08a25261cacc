"""knock-client: the pure-Python client of knockd-fast. The wire format lives in ``protocol``."""

__version__ = "0.1.0"
