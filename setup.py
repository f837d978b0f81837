"""Builds the optional compiled cores (tokenizer, decode GEMV); the pure-Python/torch paths are used when absent."""
from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "lmforge.tokenizer._bpe",
            sources=["lmforge/tokenizer/_bpe.c"],
            extra_compile_args=["-O3", "-std=c11", "-pthread"],
            extra_link_args=["-pthread"],
            optional=True,
        ),
        Extension(
            "lmforge.model._cpu",
            sources=["lmforge/model/_cpu.c"],
            extra_compile_args=["-O3", "-std=c11", "-pthread"],
            extra_link_args=["-pthread"],
            optional=True,
        ),
    ]
)
