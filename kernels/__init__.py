"""Triton kernels for MoE routing and dispatch, each beside its torch reference (installed as blues.kernels)."""
