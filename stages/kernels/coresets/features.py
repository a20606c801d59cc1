"""Feature spaces that coreset kernels measure similarity in, without materialising
more than they must.

`Plain` holds vectors as they are (embeddings, or bias gradients p - y).
`LastLayerGradients` holds the last layer's per-sample gradient g_i = e_i (x) [h_i, 1]
(e = p - onehot(y), h = penultimate features) in factored form: its inner products are
<g_i, g_j> = <e_i, e_j> * (<h_i, h_j> + 1), so a Gram block costs O(C + D) per pair
instead of O(C * D), and the C * (D + 1)-wide matrix is only built where a kernel
needs the vectors themselves.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Plain:
    x: torch.Tensor  # [n, D]

    def __len__(self) -> int:
        return len(self.x)

    def take(self, rows) -> "Plain":
        return Plain(self.x[torch.as_tensor(rows, device=self.x.device)])

    def gram(self, a: slice, other: "Plain | None" = None) -> torch.Tensor:
        """Inner products of rows `a` with every row of `other` (default: self)."""
        return self.x[a] @ (self if other is None else other).x.T

    def sqnorms(self) -> torch.Tensor:
        return (self.x * self.x).sum(1)

    def dense(self) -> torch.Tensor:
        return self.x


@dataclass
class LastLayerGradients:
    e: torch.Tensor  # [n, C]  p - onehot(y)
    h1: torch.Tensor  # [n, D + 1]  penultimate features with a 1 appended (the bias)

    def __len__(self) -> int:
        return len(self.e)

    def take(self, rows) -> "LastLayerGradients":
        idx = torch.as_tensor(rows, device=self.e.device)
        return LastLayerGradients(self.e[idx], self.h1[idx])

    def gram(self, a: slice, other: "LastLayerGradients | None" = None) -> torch.Tensor:
        """Inner products of rows `a` with every row of `other` (default: self)."""
        o = self if other is None else other
        return (self.e[a] @ o.e.T) * (self.h1[a] @ o.h1.T)

    def sqnorms(self) -> torch.Tensor:
        return (self.e * self.e).sum(1) * (self.h1 * self.h1).sum(1)

    def dense(self) -> torch.Tensor:
        """The gradients as [n, C * (D + 1)] vectors."""
        return (self.e[:, :, None] * self.h1[:, None, :]).reshape(len(self.e), -1)


def last_layer(err: np.ndarray, feats: np.ndarray, device="cpu") -> LastLayerGradients:
    e = torch.as_tensor(np.asarray(err, np.float32), device=device)
    h = torch.as_tensor(np.asarray(feats, np.float32), device=device)
    return LastLayerGradients(e, torch.cat([h, torch.ones(len(h), 1, device=device)], 1))


def plain(x: np.ndarray, device="cpu") -> Plain:
    return Plain(torch.as_tensor(np.asarray(x, np.float32), device=device))
