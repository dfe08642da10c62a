"""Triton kernels of spnn_fast, installed as ``spnn_fast.kernels``.

Imported lazily by ``spnn_fast.ops`` on the first Triton call, so that importing spnn_fast never
needs Triton, and so that ``TRITON_INTERPRET=1`` set before that call takes effect.
"""
