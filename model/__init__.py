"""RICE model: encoders, clip embedding, losses, training and evaluation (pure PyTorch)."""
