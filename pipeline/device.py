"""Device choice in one place: 'auto' means CUDA when present, else CPU."""

from __future__ import annotations


def resolve_device(spec: str = "auto"):
    """The torch device for a config's `device`; on CUDA, deterministic kernels are switched on
    (same seed, same bytes) at some cost in speed."""
    import torch

    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if spec == "auto" else spec)
    if dev.type == "cuda" and torch.cuda.is_available():
        import os

        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True, warn_only=True)
        return dev
    if dev.type == "cuda" and not torch.cuda.is_available():
        from .errors import CurateError

        raise CurateError(f"device '{spec}' requested but CUDA is not available (use device: auto or cpu)")
    return dev
