"""The operator's node agent: engines, GPU metrics, the node link client, receipts, CLI."""

__version__ = "0.1.0"
