"""Locate the onnxopt custom-op library (``libonnxopt_kernels``) and report its ISA dispatch.

The library is built from ``kernels/`` by the package build (scikit-build-core) and installed
as ``onnxopt/_lib/libonnxopt_kernels.so``. ``ONNXOPT_KERNELS_LIB`` overrides the location (used
by the sanitizer build). ``ONNXOPT_ISA=scalar|avx2|avx512`` forces an ISA level for sessions
created afterwards (read when a kernel is created); unset or ``auto`` picks the best the CPU has.
"""

from __future__ import annotations

import ctypes
import os
import pathlib
import sys
import sysconfig
from functools import lru_cache

__all__ = ["library_path", "latency_tool_path", "isa_level", "available_isa", "ISA_LEVELS", "LIB_ENV", "ISA_ENV"]

LIB_ENV = "ONNXOPT_KERNELS_LIB"
ISA_ENV = "ONNXOPT_ISA"
ISA_LEVELS = ("scalar", "avx2", "avx512")

if sys.platform == "darwin":
    _LIB_NAMES = ("libonnxopt_kernels.dylib",)
elif sys.platform == "win32":
    _LIB_NAMES = ("onnxopt_kernels.dll",)
else:
    _LIB_NAMES = ("libonnxopt_kernels.so",)


def _candidate_dirs() -> list[pathlib.Path]:
    dirs: list[pathlib.Path] = []
    here = pathlib.Path(__file__).resolve().parent
    dirs.append(here / "_lib")
    # the package's __path__ entries (editable installs may map several directories)
    pkg = sys.modules.get(__package__ or "onnxopt")
    for p in getattr(pkg, "__path__", []) or []:
        dirs.append(pathlib.Path(p) / "_lib")
    try:
        from importlib.resources import files

        dirs.append(pathlib.Path(str(files("onnxopt") / "_lib")))
    except Exception:  # pragma: no cover - resources not resolvable (e.g. odd loaders)
        pass
    # site-packages: scikit-build-core editable (redirect) installs put built files there
    for key in ("platlib", "purelib"):
        try:
            dirs.append(pathlib.Path(sysconfig.get_paths()[key]) / "onnxopt" / "_lib")
        except KeyError:  # pragma: no cover
            pass
    try:
        import site

        for sp in [*site.getsitepackages(), site.getusersitepackages()]:
            dirs.append(pathlib.Path(sp) / "onnxopt" / "_lib")
    except Exception:  # pragma: no cover
        pass
    seen: set[str] = set()
    out = []
    for d in dirs:
        k = str(d)
        if k not in seen:
            seen.add(k)
            out.append(d)
    return out


def library_path() -> pathlib.Path:
    """Path of the built custom-op library.

    Raises ``FileNotFoundError`` (with where it looked and how to build it) when not found.
    """
    env = os.environ.get(LIB_ENV)
    if env:
        p = pathlib.Path(env)
        if not p.is_file():
            raise FileNotFoundError(f"{LIB_ENV}={env} does not name an existing file")
        return p.resolve()
    looked = _candidate_dirs()
    for d in looked:
        for name in _LIB_NAMES:
            p = d / name
            if p.is_file():
                return p.resolve()
    raise FileNotFoundError(
        "onnxopt kernels library (" + "/".join(_LIB_NAMES) + ") not found; build it with "
        "`pip install -e . --no-build-isolation` (or `pip install .`) from the onnxopt source tree, "
        f"or set {LIB_ENV}. Looked in: " + ", ".join(str(d) for d in looked)
    )


def latency_tool_path() -> pathlib.Path:
    """Path of ``onnxopt_latency`` (kernels/tools/latency.cpp), built and installed beside the library.

    Raises ``FileNotFoundError`` when the build has no such tool.
    """
    tool = library_path().parent / ("onnxopt_latency.exe" if sys.platform == "win32" else "onnxopt_latency")
    if not tool.is_file():
        raise FileNotFoundError(f"onnxopt_latency is not built beside {library_path()}; reinstall onnxopt from its source tree")
    return tool


@lru_cache(maxsize=None)
def _cdll(path: str) -> ctypes.CDLL:
    lib = ctypes.CDLL(path)
    lib.onnxopt_isa.restype = ctypes.c_char_p
    lib.onnxopt_isa.argtypes = []
    lib.onnxopt_isa_supported.restype = ctypes.c_int
    lib.onnxopt_isa_supported.argtypes = [ctypes.c_char_p]
    return lib


def _lib() -> ctypes.CDLL:
    return _cdll(str(library_path()))


def isa_level() -> str:
    """ISA level sessions created now will dispatch to (honours ``ONNXOPT_ISA``).

    Returns ``"scalar"``, ``"avx2"`` or ``"avx512"``; ``"invalid"`` when ``ONNXOPT_ISA`` names a
    level this CPU/build lacks (session creation then fails with a clear error).
    """
    return _lib().onnxopt_isa().decode()


def available_isa() -> list[str]:
    """ISA levels this CPU and build support, best last."""
    lib = _lib()
    return [name for name in ISA_LEVELS if lib.onnxopt_isa_supported(name.encode())]
