"""Joule: a Kubernetes operator for elastic, energy-aware multi-GPU PyTorch training."""

__version__ = "0.1.0"
