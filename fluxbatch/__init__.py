"""fluxbatch: a declarative, make-style batch renderer for the Flux image APIs."""

from __future__ import annotations

__version__ = "0.1.0"
