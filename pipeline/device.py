"""Device choice in one place: 'auto' means CUDA when present, else CPU."""

from __future__ import annotations


def resolve_device(spec: str = "auto"):
    import torch

    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        from .errors import CurateError

        raise CurateError(f"device '{spec}' requested but CUDA is not available (use device: auto or cpu)")
    return dev
