"""The C part of loopguard-asgi (``loopguard_asgi._native``): built by
``pip install`` where a C compiler and the Python headers are found
(Debian: ``gcc`` and ``python3-dev``). It is optional: where it cannot be
built the package installs all the same and runs its pure-Python path,
saying so once when it makes its table. The metadata is in
pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "loopguard_asgi._native",
            ["src/loopguard_asgi/_native.c"],
            extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-missing-field-initializers",
                                "-Wno-unused-parameter", "-Wno-cast-function-type"],
            optional=True,
        )
    ],
)
