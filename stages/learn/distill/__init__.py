"""Dataset distillation: learn a few synthetic images per class that train a model like the full set.

Modules:
    zca      ZCA whitening (fit, apply, invert) for distilling in a whitened pixel space.
    dm       Distribution Matching: match mean embeddings of real and synthetic images per class
             under randomly initialised networks.
    experts  Expert training trajectories recorded for trajectory matching.
    mtt      Matching Training Trajectories: unroll a student on the synthetic set and match an
             expert's parameter trajectory.

Differentiable Siamese Augmentation (one random transform applied alike to real and synthetic
batches, with gradients flowing to the synthetic pixels) lives in stages.learn.augment, beside
the trainers' crop: dm uses it, and experts and mtt take it as their `augment`.
"""
