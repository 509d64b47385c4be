"""cdi: copyrighted data identification in diffusion models (CDI, Dubinski et al., CVPR 2025)."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
