"""pifarm node agent: the one implementation of node-side farm logic."""

__version__ = "0.2.0"
