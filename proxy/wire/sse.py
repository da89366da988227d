"""Server-sent events: an incremental parser for backend streams and the writer side.

Backends' bytes arrive in arbitrary pieces (a TCP read can end inside a line or inside
a UTF-8 character), so the parser buffers until a full event is there. It enforces a
size limit so a backend that never sends a newline cannot grow memory without bound.
"""

from __future__ import annotations

DONE = b"[DONE]"
DONE_EVENT = b"data: [DONE]\n\n"


class SSEProtocolError(Exception):
    """The backend's stream is not well-formed SSE."""


class SSEParser:
    """Feed bytes, get the ``data`` payload of each complete event (as bytes).

    Only ``data:`` fields matter for OpenAI streams; comments and other fields are
    skipped. Multi-line data is joined with ``\\n`` as the SSE spec says.
    """

    def __init__(self, max_event_bytes: int = 16 * 1024 * 1024) -> None:
        self._buffer = bytearray()
        self._data: list[bytes] = []
        self._data_size = 0
        self._max = max_event_bytes

    def feed(self, chunk: bytes) -> list[bytes]:
        """The data of every event completed by ``chunk``."""
        if (
            not self._buffer
            and not self._data
            and chunk.startswith(b"data: ")
            and chunk.endswith(b"\n\n")
        ):
            # Fastest path: a read of whole one-line events and nothing else, which is
            # what vLLM's one write per chunk arrives as: split it, no buffer copies.
            # Every newline ends an event exactly when there are two per event.
            events = chunk[6:-2].split(b"\n\ndata: ")
            if (
                chunk.count(b"\n") == 2 * len(events)
                and b"\r" not in chunk
                and len(chunk) <= self._max
            ):
                return events
        self._buffer += chunk
        buffer = self._buffer
        events: list[bytes] = []
        start = 0
        while True:
            if not self._data:
                # Fast path: a whole "data: ...\n\n" event, the only framing vLLM sends.
                end = buffer.find(b"\n\n", start)
                if end >= 0 and buffer.startswith(b"data: ", start):
                    block = bytes(buffer[start + 6 : end])
                    if b"\n" not in block and b"\r" not in block:
                        if len(block) > self._max:
                            raise SSEProtocolError(f"stream event larger than {self._max} bytes")
                        events.append(block)
                        start = end + 2
                        continue
            end = buffer.find(b"\n", start)
            if end < 0:
                break
            line = bytes(buffer[start:end])
            start = end + 1
            if line.endswith(b"\r"):
                line = line[:-1]
            event = self._line(line)
            if event is not None:
                events.append(event)
        if start:
            del buffer[:start]
        if len(buffer) > self._max:
            raise SSEProtocolError(f"stream line longer than {self._max} bytes")
        return events

    def _line(self, line: bytes) -> bytes | None:
        if not line:
            if not self._data:
                return None
            data = b"\n".join(self._data)
            self._data = []
            self._data_size = 0
            return data
        if line.startswith(b"data:"):
            value = line[5:]
            if value.startswith(b" "):
                value = value[1:]
            self._data_size += len(value)
            if self._data_size > self._max:
                raise SSEProtocolError(f"stream event larger than {self._max} bytes")
            self._data.append(value)
        # Comments (":...") and other fields (event:, id:, retry:) carry nothing we use.
        return None

    def close(self) -> bytes | None:
        """End of stream: return an event left without its blank line, if any."""
        if self._buffer:
            line = bytes(self._buffer).rstrip(b"\r")
            self._buffer.clear()
            self._line(line)
        if self._data:
            data = b"\n".join(self._data)
            self._data = []
            return data
        return None


def event(payload: bytes) -> bytes:
    return b"data: " + payload + b"\n\n"
