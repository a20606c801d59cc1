"""Array kernels: plain functions of numpy/torch arrays (coresets, scores, clustering, subsets)."""
