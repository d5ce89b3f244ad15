"""Tiny models built offline and the demo job, for tests, bench and `agentd demo` (the dev entry points); may import any layer, and production code never imports it."""
