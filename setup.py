"""Build script for the compiled hot path: every native/gateway/*.pyx becomes gateway.<name>.

The Cython sources live under native/ mirroring the package path, so that a .pyx that cimports another
module's .pxd finds it by its dotted name (DESIGN.md §2).
"""

from pathlib import Path

from setuptools import Extension, setup

try:
    from Cython.Build import cythonize
except ImportError:  # pragma: no cover - only without the build dependency
    cythonize = None

HERE = Path(__file__).parent

# C libraries a native module links against, by dotted name (the rest link none).
LIBRARIES = {"gateway._deflate": ["z"]}


def native_extensions() -> list[Extension]:
    exts = []
    for pyx in sorted((HERE / "native").rglob("*.pyx")):
        rel = pyx.relative_to(HERE / "native").with_suffix("")
        name = ".".join(rel.parts)
        exts.append(Extension(name, [str(pyx.relative_to(HERE))], extra_compile_args=["-O3"],
                              libraries=LIBRARIES.get(name, [])))
    return exts


ext_modules = []
if cythonize is not None:
    ext_modules = cythonize(
        native_extensions(),
        include_path=["native"],
        language_level=3,
        compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True},
    )

setup(ext_modules=ext_modules)
