"""Dense vs p-MoD benchmarks (prefill, decode, training step, KV cache, layer and attention micro-benchmarks).

Run ``python -m benchmarks.run --help``; results and their interpretation live in ``docs/benchmarks.md``.
"""
