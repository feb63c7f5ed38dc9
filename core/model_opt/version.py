"""model-opt's version (a leaf module: anything may import it without importing the package's face)."""

__version__ = "0.1.0"
