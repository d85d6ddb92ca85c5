"""Which GPU architectures a CUDA library carries code for, read from its embedded fat binaries (the
`.nv_fatbin` containers nvcc writes), without cuobjdump (an nvcc-only CUDA install, as on the CPU machines here,
has none). Used by the tests to check the build targets every architecture the Makefile names.

Layout (as nvcc 11-13 write it): a container header {u32 magic 0xBA55ED50, u16 version 1, u16 header size 16,
u64 size of what follows}, then entries {u16 kind (1 PTX, 2 ELF), u16, u32 entry header size, u64 payload size,
..., u32 arch at byte 28 (e.g. 90 for sm_90)}, each followed by its payload."""
from __future__ import annotations

import struct
from pathlib import Path

MAGIC = struct.pack("<I", 0xBA55ED50)
KINDS = {1: "ptx", 2: "sass"}


def embedded_architectures(path: str | Path) -> set[tuple[str, int]]:
    """{("sass", 90), ("ptx", 120), ...}: the machine code (SASS in ELF) and PTX entries of every fat binary in
    the file; empty for a file without any."""
    data = Path(path).read_bytes()
    found: set[tuple[str, int]] = set()
    i = data.find(MAGIC)
    while i >= 0:
        version, header, size = struct.unpack_from("<HHQ", data, i + 4)
        end = i + 16 + size
        if version != 1 or header != 16 or end > len(data):
            i = data.find(MAGIC, i + 4)  # the magic's bytes elsewhere in the file, not a container
            continue
        j = i + 16
        while j + 32 <= end:
            kind, _, entry_header, payload = struct.unpack_from("<HHIQ", data, j)
            (arch,) = struct.unpack_from("<I", data, j + 28)
            if entry_header == 0:
                break
            found.add((KINDS.get(kind, str(kind)), arch))
            j += entry_header + payload
        i = data.find(MAGIC, end)
    return found
