"""handsynth: synthesise in-the-wild 3D hand training data with AttentionHand (ECCV 2024)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("handsynth")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
