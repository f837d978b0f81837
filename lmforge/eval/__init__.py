"""Evaluation: perplexity and bits per byte (more metrics join as their stages land)."""

from lmforge.eval.perplexity import perplexity

__all__ = ["perplexity"]
