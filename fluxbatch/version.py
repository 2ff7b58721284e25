"""The version of fluxbatch: one line that any module may import (it imports nothing)."""

__version__ = "0.1.0"
