"""The training library the stages use: data, models, KD losses, augmentation and the training loop."""
