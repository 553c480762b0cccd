"""The vocabulary engine, router, worker and frontend share about KV blocks: chained block
hashes (block_hash.py) and the KV cache events a worker publishes (events.py).

A leaf: it imports nothing from splitserve, so the engine can name blocks and emit events
without depending on the router that consumes them (tests/test_import_layering.py)."""
