"""Closed-form gradients of the softmax cross-entropy.

The gradient of CE(softmax(z), y) with respect to the logits z is p - onehot(y): the
softmax output with 1 taken off at the label. It is also the gradient with respect to the
last linear layer's bias, and the weight gradient is its outer product with the
penultimate features h, (p - y) h^T. Scores (EL2N, GraNd, influence), the proxy's
`grads.npy` and the gradient-based selectors all start from it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


def bias_gradients(probs, labels, dtype=None) -> np.ndarray:
    """p - onehot(y) for softmax outputs probs [..., N, C] (e.g. [S, N, C] over seeds) and
    labels [N]: a new array, in `dtype` (default: probs' dtype, at least float32)."""
    probs = np.asarray(probs)
    e = np.array(probs, dtype or np.promote_types(probs.dtype, np.float32))
    e[..., np.arange(e.shape[-2]), np.asarray(labels)] -= 1.0
    return e


def bias_gradients_torch(probs: "torch.Tensor", labels) -> "torch.Tensor":
    """bias_gradients for a tensor [..., N, C]: a new tensor of probs' dtype, on probs' device."""
    import torch

    e = probs.clone()
    dev = e.device
    e[..., torch.arange(e.shape[-2], device=dev), torch.as_tensor(labels, device=dev)] -= 1.0
    return e
