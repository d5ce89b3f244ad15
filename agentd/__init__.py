"""agentd: a GPU training agent for Jenkins."""

__version__ = "0.1.0"
