"""Builds the optional C kernels of the codecs; everything else is configured in pyproject.toml.

The extension is optional: if it cannot be compiled, ckptstore falls back to the (byte-identical, slower) numpy
implementations.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "ckptstore.codecs._kernels",
            ["src/ckptstore/codecs/_kernels.c"],
            extra_compile_args=["-O3", "-ffp-contract=off"],
            optional=True,
        )
    ]
)
