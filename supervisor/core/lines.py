"""Bounded views of a byte stream that arrives in arbitrary chunks.

A child's output (a program's, a build's, a validator's) comes in whatever
pieces the pipe hands over, and may never stop. Three small helpers cover
every use, each with a fixed memory bound:

- ``LineSplitter``: whole lines out of the chunks (terminal echo, log records);
  a "line" with no end in sight is passed on once it reaches ``max_line``.
- ``Tail``: the last ``size`` bytes (a crash's last words, a failed build's or
  validator's output).
- ``Head``: the first ``size`` bytes, and whether more came (a SIGQUIT dump).
"""

from __future__ import annotations


class LineSplitter:
    """Cuts chunks into lines (without their newline); keeps the partial last one."""

    def __init__(self, max_line: int) -> None:
        self.max_line = max_line
        self._partial = b""

    def feed(self, data: bytes) -> list[bytes]:
        """The lines ``data`` completes; a partial line over ``max_line`` counts as one."""
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        if len(self._partial) > self.max_line:
            lines.append(self._partial)
            self._partial = b""
        return lines

    def flush(self) -> list[bytes]:
        """The partial line, if any, as a last line (the stream ended)."""
        partial, self._partial = self._partial, b""
        return [partial] if partial else []


class Tail:
    """The last ``size`` bytes of a stream.

    Trimmed only when twice the size has piled up, so a stream of small
    chunks costs an amortised copy, not one per chunk.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._data = bytearray()

    def feed(self, data: bytes) -> None:
        self._data += data
        if len(self._data) > 2 * self.size:
            del self._data[: -self.size]

    def clear(self) -> None:
        self._data.clear()

    def bytes(self) -> bytes:
        return bytes(self._data[-self.size :])

    def text(self) -> str:
        """The tail decoded as UTF-8 (a character cut at the start is replaced)."""
        return self.bytes().decode("utf-8", "replace")


class Head:
    """The first ``size`` bytes of a stream; ``truncated`` once more arrived."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.data = bytearray()
        self.truncated = False

    def feed(self, data: bytes) -> None:
        room = self.size - len(self.data)
        self.data += data[: max(room, 0)]
        self.truncated |= len(data) > room
