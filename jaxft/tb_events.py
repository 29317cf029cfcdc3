"""TensorBoard event files, written directly: scalars and text, nothing imported.

An event file is a TFRecord stream of `Event` protocol buffers (TensorBoard's
tensorboard/compat/proto/event.proto and summary.proto). Each record is
  uint64 length | uint32 masked CRC-32C of the length | data | uint32 masked CRC-32C of the data
(little-endian). Writing the few message fields jaxft logs by hand keeps `train.loggers=tensorboard`
free of tensorboardX (one dependency less; its import also pulls in torch where torch is installed)
and of TensorFlow. TensorBoard's own reader reads the files (tests/test_trackers.py).
"""

from __future__ import annotations

import os
import re
import socket
import struct
import time

# field numbers of the messages written (event.proto, summary.proto, tensor.proto)
_EVENT_WALL_TIME, _EVENT_STEP, _EVENT_FILE_VERSION, _EVENT_SUMMARY = 1, 2, 3, 5
_VALUE_TAG, _VALUE_SIMPLE, _VALUE_TENSOR, _VALUE_METADATA = 1, 2, 8, 9
_DT_STRING = 7
_INVALID_TAG = re.compile(r"[^-/\w.]")


def _crc32c_table() -> list[int]:
  table = []
  for i in range(256):
    c = i
    for _ in range(8):
      c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1  # Castagnoli, reflected
    table.append(c)
  return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli) of `data`, as TFRecord frames use it."""
  c = 0xFFFFFFFF
  for b in data:
    c = _TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
  return c ^ 0xFFFFFFFF


def _masked(data: bytes) -> bytes:
  c = crc32c(data)
  return struct.pack("<I", (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


def record(data: bytes) -> bytes:
  """`data` framed as one TFRecord."""
  n = struct.pack("<Q", len(data))
  return n + _masked(n) + data + _masked(data)


def _varint(n: int) -> bytes:
  n &= (1 << 64) - 1  # negative int64s as protobuf writes them: ten bytes
  out = bytearray()
  while True:
    b, n = n & 0x7F, n >> 7
    out.append(b | 0x80 if n else b)
    if not n:
      return bytes(out)


def _field(number: int, wire: int, payload: bytes) -> bytes:
  return _varint(number << 3 | wire) + payload


def _bytes_field(number: int, data: bytes) -> bytes:
  return _field(number, 2, _varint(len(data)) + data)


def clean_tag(tag: str) -> str:
  """`tag` as TensorBoard names expect: characters outside [-/\\w.] become "_"; no leading "/"."""
  return _INVALID_TAG.sub("_", tag).lstrip("/") or "_"


def _event(step: int, body: bytes) -> bytes:
  return (_field(_EVENT_WALL_TIME, 1, struct.pack("<d", time.time())) +
          _field(_EVENT_STEP, 0, _varint(int(step))) + body)


def scalars_event(step: int, values: dict[str, float]) -> bytes:
  """An Event holding one simple_value per tag."""
  summary = b"".join(
      _bytes_field(1, _bytes_field(_VALUE_TAG, clean_tag(k).encode()) +
                   _field(_VALUE_SIMPLE, 5, struct.pack("<f", float(v))))
      for k, v in values.items())
  return _event(step, _bytes_field(_EVENT_SUMMARY, summary))


def text_event(step: int, tag: str, text: str) -> bytes:
  """An Event holding `text` for TensorBoard's text plugin (a scalar string tensor)."""
  metadata = _bytes_field(1, _bytes_field(1, b"text"))  # plugin_data { plugin_name: "text" }
  shape = _bytes_field(2, _bytes_field(2, _field(1, 0, _varint(1))))  # dim { size: 1 }
  tensor = _field(1, 0, _varint(_DT_STRING)) + shape + _bytes_field(8, text.encode())
  value = (_bytes_field(_VALUE_TAG, clean_tag(tag).encode()) +
           _bytes_field(_VALUE_METADATA, metadata) + _bytes_field(_VALUE_TENSOR, tensor))
  return _event(step, _bytes_field(_EVENT_SUMMARY, _bytes_field(1, value)))


class EventWriter:
  """An events.out.tfevents.* file in `logdir` (a new file per writer, as TensorBoard expects of
  each run start); every write is flushed, so a killed run keeps the curves it logged."""
  _opened = 0

  def __init__(self, logdir: str):
    os.makedirs(logdir, exist_ok=True)
    EventWriter._opened += 1  # (two writers in one process and second stay two files)
    # TensorBoard reads a directory's files in name order: the count is zero-padded, so that the
    # 10th writer of a second sorts after the 9th
    name = (f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}."
            f"{EventWriter._opened:06d}")
    self.path = os.path.join(logdir, name)
    self._f = open(self.path, "ab")  # pylint: disable=consider-using-with  (closed by close())
    self._write(_event(0, _bytes_field(_EVENT_FILE_VERSION, b"brain.Event:2")))

  def _write(self, event: bytes) -> None:
    self._f.write(record(event))
    self._f.flush()

  def scalars(self, step: int, values: dict[str, float]) -> None:
    if values:
      self._write(scalars_event(step, values))

  def text(self, step: int, tag: str, text: str) -> None:
    self._write(text_event(step, tag, text))

  def close(self) -> None:
    self._f.close()
