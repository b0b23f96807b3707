"""Build script for the compiled hot path: every native/gateway/*.pyx becomes gateway.<name>.

The Cython sources live under native/ mirroring the package path, so that a .pyx that cimports another
module's .pxd finds it by its dotted name (DESIGN.md §2).
"""

import os
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

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
# `make` installs the project with JMAP_GATEWAY_SKIP_NATIVE=1 and then compiles the modules in place itself
# (`make native`, one line per module), instead of compiling them twice, the first time silently inside pip.
if cythonize is not None and os.environ.get("JMAP_GATEWAY_SKIP_NATIVE") != "1":
    ext_modules = cythonize(
        native_extensions(),
        include_path=["native"],
        language_level=3,
        quiet=True,
        compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True},
    )



class BuildExt(build_ext):
    """build_ext that says which native module it compiles (one line each, even under `setup.py -q`)."""

    def build_extension(self, ext: Extension) -> None:
        target = self.get_ext_fullpath(ext.name)
        if self.force or not Path(target).exists() or any(
                Path(src).stat().st_mtime > Path(target).stat().st_mtime for src in [*ext.sources, *ext.depends]):
            print(f"native: compiling {ext.name}", flush=True)
        super().build_extension(ext)


setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildExt})
