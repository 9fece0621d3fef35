"""Writing a thickness map: a full-grid NIfTI file (``.nii.gz``, float32 mm, 0 outside cartilage) streamed
from the map's cropped box, so the empty bulk of the grid is never built nor compressed byte by byte.

The file is what :func:`bml_pipeline.io.write_nifti` writes for the full-grid map (the same header
bytes, the same voxel values and geometry; only the deflate encoding differs): the gzip stream is one
member whose data is deflated in pieces. A run of zeros longer than :data:`ZERO_BLOCK` is written as
copies of one precomputed deflate segment of :data:`ZERO_BLOCK` zero bytes: every piece ends with a
full flush (byte-aligned, no back-references across it), so the segments are valid anywhere in the
stream. The CRC-32 of those zeros comes from a precomputed linear map (appending zeros to a message
changes its CRC by a fixed GF(2)-linear map plus a constant), so the zeros are not read either.
On a 160 x 384 x 384 knee this writes a map in a few milliseconds instead of about 0.4 s of CPU.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from bml_pipeline.volume import Volume

ZERO_BLOCK = 1 << 16  # bytes of zeros per precomputed deflate segment
LEVEL = 1  # zlib level of the non-zero pieces (nibabel's default for .nii.gz)


def write_cropped_map(path: str | Path, crop: np.ndarray, box: tuple[slice, slice, slice], grid: Volume) -> Path:
    """Write the float32 map that is ``crop`` on the index box ``box`` of ``grid`` (shape, affine) and 0
    elsewhere as a NIfTI file at ``path`` (``.nii.gz``), atomically. Returns the path."""
    from bml_pipeline.io import atomic_path

    path = Path(path)
    n0, n1, n2 = (int(n) for n in grid.shape)
    shape = (n0, n1, n2)
    header = nifti_header_bytes(shape, grid.affine)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        writer = _GzipPieces(f)
        writer.data(header)
        for kind, piece in _fortran_pieces(np.asarray(crop, dtype=np.float32), box, shape):
            if kind == "zeros":
                writer.zeros(piece)
            else:
                writer.data(piece)
        writer.close()
    return path


def nifti_header_bytes(shape: tuple[int, ...], affine: np.ndarray) -> bytes:
    """The 352 bytes (header and the empty-extension flag) ``nibabel.save`` writes before the voxels of
    a float32 image of ``shape`` set up as :func:`bml_pipeline.io.write_nifti` sets it (units mm, sform and
    qform from ``affine`` with code 1, no scaling)."""
    import io

    import nibabel as nib
    from nibabel.arraywriters import get_slope_inter, make_array_writer

    dtype = np.dtype(np.float32)
    image = nib.Nifti1Image(np.broadcast_to(np.zeros((), dtype), shape), affine)  # no voxel memory
    image.header.set_xyzt_units("mm", "sec")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    # As Nifti1Image.to_file_map: the header is finalised, its scaling set by the array writer for the
    # data type (float32 into float32: no scaling), then written.
    image.get_data_dtype(finalize=True)
    image.update_header()
    header = image.header
    header.set_data_dtype(dtype)
    header.set_slope_inter(*get_slope_inter(make_array_writer(np.zeros(1, dtype), dtype, True, True)))
    buffer = io.BytesIO()
    header.write_to(buffer)
    out = buffer.getvalue()
    offset = int(header.get_data_offset())
    return out + b"\x00" * (offset - len(out))


def _fortran_pieces(crop: np.ndarray, box: tuple[slice, slice, slice],
                    shape: tuple[int, int, int]) -> Iterator[tuple[str, Any]]:
    """The voxel bytes of the full array (NIfTI order: first index fastest) as ("zeros", n bytes) and
    ("data", bytes) pieces, in order. Only the rows of the box that hold a non-zero value are built
    (per plane, from its first to its last such row); everything else is a run of zeros."""
    n0, n1, n2 = shape
    item = 4
    total = n0 * n1 * n2 * item
    s0, s1, s2 = (slice(int(s.start), int(s.stop)) for s in box)
    if crop.size == 0:
        yield "zeros", total
        return
    used = np.any(crop.view(np.uint32) != 0, axis=0)  # bitwise (-0.0 is data): (rows, planes) of the box
    written = 0  # bytes of the full array covered so far
    for k in np.flatnonzero(used.any(axis=0)):
        rows = np.flatnonzero(used[:, k])
        j0, j1 = int(rows[0]), int(rows[-1]) + 1
        start = ((s2.start + int(k)) * n1 + s1.start + j0) * n0 * item
        block = np.zeros((j1 - j0, n0), dtype=np.float32)  # rows j0..j1 of the plane, first index fastest
        block[:, s0] = crop[:, j0:j1, k].T
        yield "zeros", start - written
        yield "data", block.tobytes()
        written = start + block.nbytes
    yield "zeros", total - written


class _GzipPieces:
    """One gzip member written from data pieces and runs of zeros (see the module doc)."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self._crc = 0
        self._size = 0
        self._pending = 0  # zeros not yet written (adjacent runs are merged)
        self._deflate = zlib.compressobj(LEVEL, zlib.DEFLATED, -zlib.MAX_WBITS, 9, zlib.Z_RLE)
        f.write(b"\x1f\x8b\x08\x00" + struct.pack("<I", 0) + b"\x04\xff")  # no name, mtime 0, fastest

    def data(self, data: bytes) -> None:
        self._flush_zeros()
        if data:
            self._crc = zlib.crc32(data, self._crc)
            self._size += len(data)
            self._f.write(self._deflate.compress(data))

    def zeros(self, count: int) -> None:
        self._pending += int(count)

    def close(self) -> None:
        self._flush_zeros()
        self._f.write(self._deflate.flush(zlib.Z_FINISH))
        self._f.write(struct.pack("<II", self._crc & 0xFFFFFFFF, self._size & 0xFFFFFFFF))

    def _flush_zeros(self) -> None:
        count, self._pending = self._pending, 0
        blocks, rest = divmod(count, ZERO_BLOCK)
        if blocks:
            segment, crc_map = _zero_block()
            self._f.write(self._deflate.flush(zlib.Z_FULL_FLUSH))  # byte-aligned, history dropped
            for _ in range(blocks):
                self._f.write(segment)
                self._crc = crc_map(self._crc)
            self._size += blocks * ZERO_BLOCK
        if rest:
            zeros = _zeros()[:rest]
            self._crc = zlib.crc32(zeros, self._crc)
            self._size += rest
            self._f.write(self._deflate.compress(zeros))


@lru_cache(maxsize=1)
def _zeros() -> memoryview:
    return memoryview(bytes(ZERO_BLOCK))


@lru_cache(maxsize=1)
def _zero_block() -> tuple[bytes, Callable[[int], int]]:
    """(deflate segment of ZERO_BLOCK zero bytes ending in a full flush, CRC-32 update for them)."""
    zeros = _zeros()
    deflate = zlib.compressobj(LEVEL, zlib.DEFLATED, -zlib.MAX_WBITS, 9, zlib.Z_RLE)
    segment = deflate.compress(zeros) + deflate.flush(zlib.Z_FULL_FLUSH)
    # crc32(zeros, c) = L(c) ^ crc32(zeros, 0) with L linear over GF(2): its columns from the unit states.
    base = zlib.crc32(zeros, 0)
    columns = [zlib.crc32(zeros, 1 << i) ^ base for i in range(32)]

    def crc_map(crc: int) -> int:
        out = base
        i = 0
        while crc:
            if crc & 1:
                out ^= columns[i]
            crc >>= 1
            i += 1
        return out

    return segment, crc_map
