"""Anti-replay window (RFC 4303 §3.4.3, RFC 4302 §3.4.3) and ESN inference (RFC 4303 Appendix A).

Theory of operation
-------------------
The window remembers which of the last ``size`` sequence numbers up to ``top`` (the highest
authenticated one) were received. It is a ring of 64-bit words as in RFC 6479: sequence number ``s``
lives at bit ``s & 63`` of word ``(s >> 6) & (nwords - 1)``. Advancing the window clears only the
words it moves over, so a check and an update cost O(1) whatever the window size (64 to many
thousands); the ring has one spare word so the word holding ``top`` never overlaps the oldest one
still inside the window.

Processing order (RFC 4303 §3.4.3): ``check()`` before the ICV is verified, so duplicates are
rejected cheaply; ``update()`` only after the ICV verified, so forged packets never move the window.

With ESN only the low 32 bits travel; :meth:`ReplayWindow.infer` reconstructs the high half from the
window position (Appendix A2.2) before the ICV check, which covers the high bits and so confirms the
guess.
"""

from __future__ import annotations

from typing import Final

from ipsecstack.errors import ConfigError, Reason

DEFAULT_WINDOW: Final = 64
MAX_WINDOW: Final = 1 << 20
_M32: Final = 0xFFFFFFFF


class ReplayWindow:
    __slots__ = ("_mask", "_words", "size", "top")

    def __init__(self, size: int = DEFAULT_WINDOW) -> None:
        if not 0 <= size <= MAX_WINDOW:
            raise ConfigError(
                "replay_window", size, f"use 0 (disabled, manual keying only) or 32..{MAX_WINDOW}; default is 64"
            )
        if 0 < size < 32:
            raise ConfigError("replay_window", size, "RFC 4303 §3.4.3 requires at least 32; the default is 64")
        self.size = size
        self.top = 0
        nwords = 1
        while nwords * 64 < size + 64:
            nwords <<= 1
        self._words = [0] * nwords
        self._mask = nwords - 1

    def check(self, seq: int) -> str | None:
        """``None`` if ``seq`` may be accepted, else the drop reason (``replay`` or ``too_old``)."""
        if seq > self.top:
            return None
        if seq == 0:
            return Reason.TOO_OLD
        if self.size == 0:
            return None
        if self.top - seq >= self.size:
            return Reason.TOO_OLD
        if (self._words[(seq >> 6) & self._mask] >> (seq & 63)) & 1:
            return Reason.REPLAY
        return None

    def update(self, seq: int) -> None:
        """Record an authenticated ``seq`` (call only after the ICV verified)."""
        if self.size == 0:
            if seq > self.top:
                self.top = seq
            return
        words = self._words
        mask = self._mask
        if seq > self.top:
            old_word = self.top >> 6
            new_word = seq >> 6
            gap = new_word - old_word
            if gap > mask:
                for i in range(mask + 1):
                    words[i] = 0
            else:
                for w in range(old_word + 1, new_word + 1):
                    words[w & mask] = 0
            self.top = seq
        words[(seq >> 6) & mask] |= 1 << (seq & 63)

    def infer(self, seq_low: int) -> int:
        """The full 64-bit sequence number for a received low half (RFC 4303 Appendix A2.2).

        Returns -1 when the inferred high half would be negative (a packet from before the SA began).
        """
        top = self.top
        tl = top & _M32
        th = top >> 32
        w = self.size if self.size else DEFAULT_WINDOW
        if tl >= w - 1:
            # Case A: the window lies within one 2^32 sub-space.
            th_packet = th if seq_low >= tl - w + 1 else th + 1
        else:
            # Case B: the window spans two sub-spaces.
            th_packet = th - 1 if seq_low >= ((tl - w + 1) & _M32) else th
        if th_packet < 0:
            return -1
        return (th_packet << 32) | seq_low

    def snapshot(self) -> list[int]:
        """The sequence numbers currently marked received (for tests and debugging), ascending."""
        lo = max(1, self.top - self.size + 1) if self.size else self.top
        return [s for s in range(lo, self.top + 1) if (self._words[(s >> 6) & self._mask] >> (s & 63)) & 1]
