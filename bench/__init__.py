"""Benchmarks for clustercert (``make bench``, ``make bench-quick``): see docs/benchmarks.md.

Every figure is measured against baselines taken in the same run, on the same redis-servers:
the *floor* (a bare script doing each node's work for all nodes in parallel) and *node by node*
(the same work sequentially, as an operator's script would).
"""
