"""siglip: language-image pre-training with the sigmoid loss (SigLIP) and the softmax (CLIP) loss."""

__version__ = "0.1.0"
