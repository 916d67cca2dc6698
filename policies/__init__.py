"""Placement and paging policies (numba kernels)."""
