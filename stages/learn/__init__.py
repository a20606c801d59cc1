"""What trains: models, the trainer, augmentation, online selectors, the CLIP, distillation."""
