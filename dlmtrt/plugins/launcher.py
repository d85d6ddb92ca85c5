"""ctypes binding of the kernel's C ABI (plugins/cached_attention/cached_attention.cu).

Why ctypes and not a torch C++ extension: the library depends on the CUDA runtime only (linked statically), so
one build serves torch 2.11 and 2.13, the TensorRT plugin and any other caller, and nothing has to be compiled
against a particular torch's headers. Every caller goes through `launch_ptrs`, so what the GPU test measures is
what the plugin runs.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
from pathlib import Path

from dlmtrt.errors import DlmtrtError

LIB_NAME = "libdlmtrt_cached_attention.so"
DTYPE_CODES = {"float32": 0, "float16": 1, "bfloat16": 2}
ABI_VERSION = 4  # 2: query/key positions, mask type and block size (the attention kind); 3: the workspace;
# 4: q and o in [B, A, H, D] memory order too (qo_layout)


class PluginError(DlmtrtError, RuntimeError):
    """The kernel library is missing or refused a launch; the message says what to do."""


def find_library(name: str, env: str, what: str) -> Path:
    """$`env`, else `name` as `make plugin` builds it inside the package; PluginError saying how to build it."""
    value = os.environ.get(env)
    path = Path(value) if value else Path(__file__).resolve().parent / "lib" / name
    if not path.is_file():
        raise PluginError(f"{what} is not built ({path} is missing): run `make plugin` in the repository (needs "
                          f"nvcc), or point {env} at a built {name}")
    return path


def library_path() -> Path:
    """$DLMTRT_PLUGIN_LIB, else the library `make plugin` builds inside the package."""
    return find_library(LIB_NAME, "DLMTRT_PLUGIN_LIB", "the cached-attention kernel library")


def library_built() -> bool:
    """Whether the library is there to load (without reading it)."""
    try:
        library_path()
    except PluginError:
        return False
    return True


def library_sha256() -> str | None:
    """sha256 of the built library (engine manifests record it), None when it is not built."""
    return hashlib.sha256(library_path().read_bytes()).hexdigest() if library_built() else None


def open_library(path: Path, entry: str, argtypes: list, abi_version: int) -> ctypes.CDLL:
    """Load a kernel library whose C ABI is `entry(argtypes) -> int` (0 or an error code), `entry_error()` (why)
    and `entry_abi_version()`; PluginError unless its ABI version is `abi_version`."""
    lib = ctypes.CDLL(str(path))
    fn = getattr(lib, entry)
    fn.restype, fn.argtypes = ctypes.c_int, argtypes
    getattr(lib, f"{entry}_error").restype = ctypes.c_char_p
    version = getattr(lib, f"{entry}_abi_version")
    version.restype = ctypes.c_int
    if version() != abi_version:
        raise PluginError(f"{path} has ABI version {version()}, this package expects {abi_version}: rebuild it "
                          "with `make plugin`")
    return lib


@functools.cache
def _lib() -> ctypes.CDLL:
    lib = open_library(library_path(), "dlmtrt_cached_attention",
                       [ctypes.c_void_p] * 7 + [ctypes.c_int] * 6 + [ctypes.c_float] + [ctypes.c_int] * 3
                       + [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_int],
                       ABI_VERSION)
    lib.dlmtrt_cached_attention_workspace_size.restype = ctypes.c_size_t
    lib.dlmtrt_cached_attention_workspace_size.argtypes = [ctypes.c_int] * 7
    return lib


def workspace_size(B: int, H: int, Hkv: int, A: int, L: int, D: int, dtype_code: int) -> int:
    """Bytes of device workspace a launch of this shape uses (the key splits of few-row fp16/bf16 launches; 0
    when it needs none). With A = 0: the most any launch of head_dim D may use, what a TensorRT plugin reserves."""
    return int(_lib().dlmtrt_cached_attention_workspace_size(B, H, Hkv, A, L, D, dtype_code))


def launch_ptrs(q: int, k: int, v: int, valid: int, q_pos: int, k_pos: int, o: int, B: int, H: int, Hkv: int,
                A: int, L: int, D: int, scale: float, dtype_code: int, mask_type: int, block: int,
                stream: int, workspace: int = 0, workspace_bytes: int = 0, qo_layout: int = 0) -> None:
    """Enqueue the kernel on `stream` with raw device pointers (layouts in the .cu file; `q_pos`/`k_pos` int64
    sequence positions, read for block_causal only, 0 allowed otherwise; `mask_type`/`block` as
    models.attention_kinds.AttentionKind carries them; `workspace` device memory of `workspace_bytes`, as much
    as `workspace_size` says for the full speed of few-row launches, less or none for fewer key splits;
    `qo_layout` 1: q and o hold [B, H, A, D] in [B, A, H, D] memory order); raises PluginError."""
    lib = _lib()
    rc = lib.dlmtrt_cached_attention(q, k, v, valid, q_pos or None, k_pos or None, o, B, H, Hkv, A, L, D, scale,
                                     dtype_code, mask_type, block, workspace or None, workspace_bytes,
                                     stream or None, qo_layout)
    if rc:
        raise PluginError(f"cached attention: {lib.dlmtrt_cached_attention_error().decode()}")
