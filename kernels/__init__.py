"""Triton kernels of fused_xent (installed as ``fused_xent.kernels``). Imports Triton."""
