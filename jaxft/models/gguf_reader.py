"""A GGUF file's metadata parsed in seconds' stead in tenths: gguf.GGUFReader, arrays read in bulk.

gguf.GGUFReader parses each element of an array field through two numpy memmap slices (the
string's length, then its bytes): a real vocabulary (SmolLM2's 49,152 tokens, 48,900 merges and
token types) is ~250,000 slices of a memmap, 2 s here, and jaxft reads a file's metadata for its
config, its weights and its tokenizer. `open_reader` returns the same reader with array fields
parsed from a plain ndarray view of the same mapping (no memmap bookkeeping per slice) and numeric
arrays sliced from one view: the same fields, parts, data indices, types and tensors as
gguf.GGUFReader (tests/test_gguf.py compares them on every file it builds), about 10 times faster.
"""

from __future__ import annotations

import functools
import struct

import numpy as np


def open_reader(path: str, mode: str = "r"):
  """gguf.GGUFReader(path, mode), array fields parsed in bulk."""
  import gguf
  return reader_class(gguf.GGUFReader)(path, mode)


@functools.cache
def reader_class(base):
  """The bulk-parsing subclass of gguf.GGUFReader `base` (`base` itself when it is one already).
  Built on first use: the gguf package is imported only by what reads GGUF files."""
  if getattr(base, "bulk_arrays", False):
    return base
  from gguf import GGUFValueType

  class BulkReader(base):
    """gguf.GGUFReader whose array fields are parsed in bulk (see the module's docstring)."""
    bulk_arrays = True

    def _plain(self) -> np.ndarray:
      plain = self.__dict__.get("_plain_view")
      if plain is None:  # self.data (the memmap) is set first thing by GGUFReader.__init__
        plain = self._plain_view = self.data.view(np.ndarray)
      return plain

    def _get(self, offset, dtype, count=1, override_order=None):
      count = int(count)
      dt = np.dtype(dtype)
      arr = self._plain()[offset:offset + dt.itemsize * count].view(dt)[:count]
      return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None
                                             else override_order))

    def _get_field_parts(self, orig_offs, raw_type):
      if GGUFValueType(raw_type) != GGUFValueType.ARRAY or self.byte_order != "I":
        return super()._get_field_parts(orig_offs, raw_type)
      raw_itype = self._get(orig_offs, np.uint32)
      alen = self._get(orig_offs + 4, np.uint64)
      itype, n, offs = GGUFValueType(int(raw_itype[0])), int(alen[0]), orig_offs + 12
      parts = [raw_itype, alen]
      types = [GGUFValueType.ARRAY, itype] if n else [GGUFValueType.ARRAY]  # (as GGUFReader)
      plain = self._plain()
      if itype == GGUFValueType.STRING:
        buf = memoryview(plain)
        for _ in range(n):
          k = struct.unpack_from("<Q", buf, offs)[0]
          parts.append(plain[offs:offs + 8].view(np.uint64))
          parts.append(plain[offs + 8:offs + 8 + k])
          offs += 8 + k
        return offs - orig_offs, parts, list(range(3, 2 + 2 * n, 2)), types
      nptype = self.gguf_scalar_to_np.get(itype)
      if nptype is None:  # arrays of arrays: the element-wise parse
        return super()._get_field_parts(orig_offs, raw_type)
      whole = self._get(offs, nptype, n)
      parts.extend(whole[i:i + 1] for i in range(n))
      return 12 + int(whole.nbytes), parts, list(range(2, 2 + n)), types

  return BulkReader
