"""cvplay: a reproducible DVC pipeline for CIFAR-10 image classification in PyTorch."""

__version__ = "0.1.0"
