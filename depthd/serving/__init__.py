"""Serving: the pool of warm models, their batching workers, queues and byte budgets; the only package with threads."""
