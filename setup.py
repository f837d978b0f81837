"""Builds the optional compiled tokenizer core; the pure-Python path is used when it is absent."""
from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "lmforge.tokenizer._bpe",
            sources=["lmforge/tokenizer/_bpe.c"],
            extra_compile_args=["-O3", "-std=c11", "-pthread"],
            extra_link_args=["-pthread"],
            optional=True,
        )
    ]
)
