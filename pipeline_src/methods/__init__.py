"""Certified training methods; importing this package registers them all."""
from . import bcp, lmt, localbcp  # noqa: F401  (registration)
from .base import METHODS, CertifiedMethod, StepBounds, build_method

__all__ = ["METHODS", "CertifiedMethod", "StepBounds", "build_method"]
