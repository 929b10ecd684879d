"""HGAD: hierarchical Gaussian mixture normalizing flows for unified anomaly detection."""

from .lightning_model import Hgad

__all__ = ["Hgad"]
