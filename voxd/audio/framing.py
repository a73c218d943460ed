"""Re-chunking of a byte stream into fixed-size frames (e.g. 160-byte 20 ms mu-law frames)."""

from __future__ import annotations

__all__ = ["FrameCutter"]


class FrameCutter:
    """Cuts an arbitrarily chunked byte stream into frames of exactly frame_bytes bytes."""

    __slots__ = ("_rem", "frame_bytes", "pad")

    def __init__(self, frame_bytes: int = 160, pad: int = 0xFF) -> None:
        if frame_bytes <= 0:
            raise ValueError(f"frame_bytes must be positive, got {frame_bytes}")
        if not 0 <= pad <= 0xFF:
            raise ValueError(f"pad must be a byte value 0..255, got {pad}")
        self.frame_bytes = frame_bytes
        self.pad = pad
        self._rem = b""

    @property
    def pending(self) -> int:
        """Number of bytes held back (always < frame_bytes)."""
        return len(self._rem)

    def push(self, data: bytes) -> list[bytes]:
        """Append data; return the complete frames now available, in order."""
        fb = self.frame_bytes
        rem = self._rem
        if not rem:
            if len(data) == fb:  # the common case: one whole frame, nothing held
                return [data if type(data) is bytes else bytes(data)]
            buf = bytes(data)
        else:
            buf = rem + data
        n = len(buf)
        if n < fb:
            self._rem = buf
            return []
        end = n - n % fb
        self._rem = buf[end:]
        if end == fb:
            return [buf[:fb]]
        return [buf[i : i + fb] for i in range(0, end, fb)]

    def flush(self) -> bytes | None:
        """Return the held bytes padded with pad to one full frame (None if nothing is held)."""
        rem = self._rem
        if not rem:
            return None
        self._rem = b""
        return rem + bytes((self.pad,)) * (self.frame_bytes - len(rem))

    def clear(self) -> None:
        """Drop the held bytes."""
        self._rem = b""
