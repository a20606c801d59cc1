"""Selection during training (public API).

- `base`: the protocol (Selector, Batch, ModelView) and `Static` (a fixed set).
- `per_batch`: per-mini-batch selectors (big_loss, small_loss, grad_norm, ...) and AdaSelection.
- `adaptive`: GRAD-MATCH / CRAIG re-selected from the current model every few epochs.
- `crest`: CREST's mini-batch coresets with a quadratic model to decide when to re-select.

`make_selector(method, fraction, **opts)` builds any of them by its config name.
"""

from __future__ import annotations

from pipeline.methods import ONLINE, ONLINE_METHODS, online_methods

from stages.learn.online.base import Batch, ModelView, Probe, Selector, Static

PER_BATCH = online_methods("adaselection", "per_batch")


def make_selector(method: str, fraction: float, **opts) -> Selector:
    """A selector by config name: craig / gradmatch (adaptive), crest, adaselection or a per-batch baseline."""
    selector = ONLINE[method].selector if method in ONLINE else None
    if selector == "adaptive":
        from stages.learn.online.adaptive import AdaptiveCoreset

        return AdaptiveCoreset(method, fraction, **opts)
    if selector == "crest":
        from stages.learn.online.crest import Crest

        return Crest(fraction, **opts)
    if method in PER_BATCH:
        from stages.learn.online.per_batch import make_per_batch

        return make_per_batch(method, fraction, **opts)
    raise ValueError(f"online method {method!r} is unknown (have: {', '.join(ONLINE_METHODS)})")


__all__ = ["Batch", "ModelView", "Probe", "Selector", "Static", "make_selector", "PER_BATCH"]
