"""lmforge: the whole life of a language model in one PyTorch codebase."""

__version__ = "0.1.0"
