"""The fused CPU kernels of ``cpu_fused.c``, compiled on first use and cached; None where they cannot be.

A C compiler is enough (no torch headers, so the build takes about a second, not a minute); the
library lands in ``$TUNEVAL_NATIVE_CACHE`` (default ``~/.cache/tuneval/native``) under a name that
hashes the source and flags, written atomically, so concurrent first runs and edits are safe. It
links libgomp, which the dynamic loader resolves to the copy torch has already loaded: the
kernels run on torch's own OpenMP threads. ``TUNEVAL_NATIVE=0`` turns the kernels off.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from functools import cache
from pathlib import Path

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_fused.c")
FLAGS = ["-O3", "-std=gnu11", "-mavx2", "-mfma", "-fopenmp", "-fPIC", "-shared"]

_P, _I64, _F, _U64, _U32, _INT = (
    ctypes.c_void_p,
    ctypes.c_long,
    ctypes.c_float,
    ctypes.c_uint64,
    ctypes.c_uint32,
    ctypes.c_int,
)
_SIGNATURES = {
    "dal_forward": [_P] * 8 + [_I64, _I64, _F, _U64, _U32, _F, _INT],
    "dal_backward": [_P] * 5 + [_F] + [_P] * 4 + [_I64, _I64, _INT],
    "attn_forward": [_P, _I64, _P, _P, _I64] + [_P] * 5 + [_I64, _INT, _INT, _F, _P, _P, _P, _U64, _U32, _F, _INT],
    "gelu_forward": [_P, _P, _P, _I64, _INT],
    "gelu_backward": [_P, _P, _P, _P, _I64, _I64, _INT],
    "sumsq_many": [_P, _P, _I64, _INT],
    "adamw_rows": [_P] * 5 + [_I64, _I64] + [_F] * 7 + [_P, _INT],
    "attn_backward": [_P, _I64, _P, _P, _I64] + [_P] * 5 + [_I64, _INT, _INT, _F, _P, _P, _F, _P, _P, _P, _P, _INT],
}

_RESTYPES = {"sumsq_many": ctypes.c_double}


def _supported_cpu() -> bool:
    import torch

    return (
        sys.platform == "linux"
        and platform.machine() in ("x86_64", "AMD64")
        and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    )


def cache_dir() -> Path:
    return Path(os.environ.get("TUNEVAL_NATIVE_CACHE") or Path.home() / ".cache" / "tuneval" / "native")


def build(compiler: str | None = None) -> Path:
    """Compile ``cpu_fused.c`` unless a library of this exact source and flags is cached; its path."""
    cc = compiler or os.environ.get("CC") or "cc"
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join([cc, *FLAGS]).encode()).hexdigest()[:16]
    target = cache_dir() / f"cpu_fused-{key}.so"
    if target.exists():
        return target
    if shutil.which(cc) is None:
        raise OSError(f"no C compiler ({cc!r}) on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        done = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True)
        if done.returncode != 0:
            raise OSError(f"{cc} failed: {done.stderr.strip()[-500:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@cache
def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None (switched off, not an AVX2 x86-64 Linux, or no compiler)."""
    if os.environ.get("TUNEVAL_NATIVE", "1") == "0" or not _supported_cpu():
        return None
    import torch  # noqa: F401  (torch's libgomp must be loaded first, for the kernels to share it)

    try:
        lib = ctypes.CDLL(str(build()))
    except OSError as e:
        log.warning("fused CPU kernels unavailable, using torch ops instead: %s", e)
        return None
    for name, argtypes in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, _RESTYPES.get(name)
    return lib
