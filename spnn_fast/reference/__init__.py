"""Pure-PyTorch / numpy definitions of every op.

Each is at once the CPU fallback (``backend="torch"``), the oracle the tests hold the fast paths
to, and the baseline the benchmarks measure against. Written once, imported by all three.
"""
