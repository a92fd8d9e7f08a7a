"""The compiled token loops of ``_kernels.c``, built on first use with the system C compiler, or ``None``.

The fused gate (:mod:`fiberpo_theory.core.fused`) and the sorted-id indexing
(:mod:`fiberpo_theory.core.segments`) run one C loop per token pass on CPU
tensors when the library is available, and their chains of torch ops
otherwise; both give the same values (``tests/test_native.py``).  The shared
library is compiled once per source, compiler and CPU into a cache folder
(``$FIBERPO_THEORY_CACHE``, else ``$XDG_CACHE_HOME/fiberpo_theory``, else
``~/.cache/fiberpo_theory``; the temporary folder when that cannot be
written) and loaded with :mod:`ctypes`: no build step at install time and no
Python headers.  A compiler that refuses ``-march=native`` gets the
portable flags.  ``FIBERPO_THEORY_NATIVE=0`` turns it off;
:func:`status` says which path runs and why.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("_kernels.c")
# no -ffast-math and no contraction into FMAs: the loops must round exactly as the torch ops they replace
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-shared", "-fPIC"]
_TYPES = {torch.float32: (ctypes.c_float, "f32"), torch.float64: (ctypes.c_double, "f64")}
_reason = "not loaded yet"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cache_dir() -> Path:
    root = os.environ.get("FIBERPO_THEORY_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fiberpo_theory"


def _cpu_name() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    flags = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return platform.machine() + flags  # -march=native: a library built for one CPU may not run on another


class BuildError(OSError):
    """The compiler rejected the kernels (as opposed to a cache folder that cannot be written)."""


def _build(cc: str, folder: Path, flags: list[str]) -> Path:
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=False).stdout
    digest = hashlib.sha256("\0".join([SOURCE.read_text(), " ".join(flags), version, _cpu_name()]).encode())
    target = folder / f"kernels-{digest.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as work:  # built aside, then renamed: safe for racing processes
        built = Path(work) / "kernels.so"
        run = subprocess.run([cc, *flags, str(SOURCE), "-o", str(built)], capture_output=True, text=True, check=False)
        if run.returncode:
            raise BuildError(f"{cc} failed: {run.stderr.strip()[:400]}")
        os.replace(built, target)
    return target


def _build_somewhere(cc: str) -> tuple[Path, list[str]]:
    """Build into the cache (else the temporary folder), with -march=native (else without it)."""
    folders = [_cache_dir(), Path(tempfile.gettempdir()) / f"fiberpo_theory-{os.getuid()}"]
    portable = [flag for flag in FLAGS if flag != "-march=native"]
    last: OSError = OSError(f"no writable folder among {[str(f) for f in folders]}")
    for flags in (FLAGS, portable):
        for folder in folders:
            try:
                return _build(cc, folder, flags), flags
            except BuildError as error:
                last = error
                break  # the compiler's verdict does not depend on the folder: try the portable flags
            except OSError as error:
                last = error
                continue  # a folder we cannot write: the next one
    raise last


def _declare(lib: ctypes.CDLL) -> None:
    i64, p = ctypes.c_int64, ctypes.c_void_p
    for real, suffix in _TYPES.values():
        getattr(lib, f"channel_sums_{suffix}").argtypes = [i64, p, p, p, p]
        getattr(lib, f"gate_tokens_{suffix}").argtypes = [i64, p, p, p, p, real, p, p, p]
        getattr(lib, f"reduce_tokens_{suffix}").argtypes = [i64, p, p, p, p, p, p, p]
        getattr(lib, f"add_channel_{suffix}").argtypes = [i64, p, p, p]
        getattr(lib, f"channel_sums_runs_{suffix}").argtypes = [i64, p, p, p, p]
        getattr(lib, f"gate_runs_{suffix}").argtypes = [i64, p, p, p, p, real, p, p]
        getattr(lib, f"reduce_runs_{suffix}").argtypes = [i64, p, p, p, p, p, p, p]
        getattr(lib, f"add_channel_runs_{suffix}").argtypes = [i64, p, p, p, p]
        getattr(lib, f"gather_runs_{suffix}").argtypes = [i64, p, p, p]
        getattr(lib, f"tally_runs_{suffix}").argtypes = [i64, p, p, p, p, real, p, p]
        getattr(lib, f"tally_flags_runs_{suffix}").argtypes = [i64, p, p, p, p, p, real, p, p]
        getattr(lib, f"weigh_runs_{suffix}").argtypes = [i64, p, p, p, p, p, p, p, p]
        getattr(lib, f"objective_grad_runs_{suffix}").argtypes = [i64, p, p, p, p, p, real, p]
        getattr(lib, f"fiber_objective_chain_{suffix}").argtypes = [i64, p, p, real, real, real, p]
        getattr(lib, f"fiber_objective_grad_{suffix}").argtypes = [i64, p, p, real, p, p, p, real, p]
        getattr(lib, f"fiber_chain_{suffix}").argtypes = [i64, p, p, p, real, real, real, p, p, p, p, p]
        getattr(lib, f"fiber_chain_grad_{suffix}").argtypes = [i64, p, p, p, p, p, real, p]
        getattr(lib, f"domain_chain_{suffix}").argtypes = [i64, i64, i64, p, p, p, p, real, real, real, p, p, p, p, p,
                                                           p]
        getattr(lib, f"domain_chain_grad_{suffix}").argtypes = [i64, i64, i64, p, p, p, p, p, p, real, p, p]
        getattr(lib, f"label_counts_{suffix}").argtypes = [i64, p, i64, p, i64, p, p, ctypes.c_double,
                                                           ctypes.c_double, ctypes.c_double, p]
        getattr(lib, f"summarize_counts_{suffix}").argtypes = [i64, p, i64, p, i64, p, p, p, ctypes.c_double,
                                                               ctypes.c_double, ctypes.c_double, p]
    lib.mask_positions.argtypes = [i64, i64, p, p, p, p, p, i64]
    lib.mask_positions.restype = i64
    lib.gather_blocks.argtypes = [i64, i64, i64, p, p, p, p]
    for suffix in ("f32", "f64"):
        getattr(lib, f"scatter_blocks_{suffix}").argtypes = [i64, i64, p, p, p, p]
        getattr(lib, f"gather_blocks_difference_{suffix}").argtypes = [i64, i64, p, p, p, p, p]
    for suffix in ("i64", "i32"):
        getattr(lib, f"sorted_runs_{suffix}").argtypes = [i64, p, p, p, p, p, i64]
        getattr(lib, f"sorted_runs_{suffix}").restype = i64
        getattr(lib, f"carried_runs_{suffix}").argtypes = [i64, p, i64, p, p]
        getattr(lib, f"carried_runs_{suffix}").restype = ctypes.c_int


@lru_cache(maxsize=None)
def library() -> ctypes.CDLL | None:
    """The loaded kernels, or ``None`` (then :func:`status` gives the reason)."""
    global _reason
    if os.environ.get("FIBERPO_THEORY_NATIVE", "1") == "0":
        _reason = "off: FIBERPO_THEORY_NATIVE=0"
        return None
    cc = _compiler()
    if cc is None:
        _reason = "off: no C compiler (cc, gcc or clang) on PATH"
        return None
    try:
        built, flags = _build_somewhere(cc)
        lib = ctypes.CDLL(str(built))
        _declare(lib)
    except (OSError, AttributeError) as error:
        _reason = f"off: {error}"
        return None
    _reason = f"on: {cc} {' '.join(flags[:3])}"
    return lib


def status() -> str:
    """One line: whether the compiled token loops run, and why not when they do not."""
    library()
    return _reason


def kernels_for(*tensors: torch.Tensor) -> tuple[ctypes.CDLL, type, str] | None:
    """``(library, ctypes real type, suffix)`` when every tensor is a contiguous CPU tensor the loops take."""
    if tensors[0].dtype not in _TYPES or torch._C._functorch.peek_interpreter_stack() is not None:
        return None
    for tensor in tensors:  # checked first: a CUDA-only run never builds the library
        if not (tensor.is_cpu and tensor.is_contiguous()) or _wrapped(tensor):
            return None
    lib = library()
    if lib is None:
        return None
    real, suffix = _TYPES[tensors[0].dtype]
    return lib, real, suffix


def loops(dtype: torch.dtype) -> tuple[ctypes.CDLL, type, str]:
    """:func:`kernels_for`'s triple without the checks, for tensors a caller has already passed through it."""
    real, suffix = _TYPES[dtype]
    return library(), real, suffix


def plain_cpu(tensor: torch.Tensor) -> bool:
    """A CPU tensor with storage of its own (not vmap-batched, functionalised or a subclass), any strides,
    outside torch.func transforms (under one, even the buffers made for the loops have no plain storage)."""
    return tensor.is_cpu and not _wrapped(tensor) and torch._C._functorch.peek_interpreter_stack() is None


def _wrapped(tensor: torch.Tensor) -> bool:
    """vmap-batched or otherwise wrapped tensors have no plain storage to hand to C."""
    functorch = torch._C._functorch
    return bool(functorch.is_functorch_wrapped_tensor(tensor) or functorch.is_legacy_batchedtensor(tensor)
                or functorch.is_functionaltensor(tensor)) or tensor.is_meta or type(tensor) is not torch.Tensor


def ptr(tensor: torch.Tensor, start: int = 0) -> int:
    """Address of element ``start`` of a contiguous tensor."""
    return tensor.data_ptr() + start * tensor.element_size() if start else tensor.data_ptr()
