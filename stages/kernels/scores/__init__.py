"""Score kernels: plain functions of arrays (numpy/torch in, numpy out)."""
