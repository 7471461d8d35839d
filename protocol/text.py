"""The text a sequence of token ids stands for: one definition shared by node and market.

A node streams token ids and text; the text is not free: it is what the ids' byte
pieces decode to as UTF-8, with a stop string (and anything after it) cut. Bytes of a
multi-byte character split across tokens are held until complete, and text that
might be the start of a stop string is held until it is known not to be. Engines
produce their text with :class:`TextStream`; the market replays the same stream
(:class:`ExpectedText`) over the ids a node sends and refuses any chunk whose text
disagrees, and relays the replay's text, so a buyer never receives text that the ids do
not decode to.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable, Iterable

Piece = Callable[[int], bytes]


class TextStream:
    """Turns per-token byte pieces into text deltas, honouring stop strings.

    ``push`` returns (text to emit now, whether a stop string was hit).
    """

    def __init__(self, stop: Iterable[str]) -> None:
        self.stop = [s for s in stop if s]
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._held = ""

    def prime(self, pieces: Iterable[bytes]) -> None:
        """Feed bytes already streamed by an earlier node (continuation); emit nothing."""
        for piece in pieces:
            self._decoder.decode(piece)

    def push(self, piece: bytes) -> tuple[str, bool]:
        buffer = self._held + self._decoder.decode(piece)
        if not self.stop:
            self._held = ""
            return buffer, False
        hit = min((i for i in (buffer.find(s) for s in self.stop) if i >= 0), default=-1)
        if hit >= 0:
            self._held = ""
            return buffer[:hit], True
        keep = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(buffer)), keep, -1):
                if buffer.endswith(s[:k]):
                    keep = k
                    break
        self._held = buffer[len(buffer) - keep :]
        return buffer[: len(buffer) - keep], False

    def flush(self) -> str:
        text = self._held + self._decoder.decode(b"", final=True)
        self._held = ""
        return text

    @property
    def held(self) -> str:
        """Text decoded but not released yet (it may start a stop string)."""
        return self._held


class TextMismatch(ValueError):
    """A chunk's text is not what its token ids decode to, or ids follow a stop."""


class ExpectedText:
    """The market's replay of a node's :class:`TextStream` for one segment.

    The text relayed to the buyer is the replay's, never the node's: what the ids
    release under the protocol's rule. The node's own text must agree: at every chunk,
    everything it sent so far and everything its ids decode to so far must be one a
    prefix of the other (an engine may release held-back text a chunk earlier or later,
    never other text), and at the end they must be equal. A chunk without ids is the
    final release of held text and may come once, last. Raises :class:`TextMismatch`.
    """

    def __init__(self, piece: Piece, stop: Iterable[str], continuation_ids: Iterable[int] = ()):
        self._piece = piece
        self._stream = TextStream(stop)
        self._stream.prime(piece(t) for t in continuation_ids)
        self.stopped = False
        self.flushed = False
        self.parts: list[str] = []  # what the replay released, chunk by chunk
        self._released = ""
        self._claimed = ""  # what the node sent

    @property
    def text(self) -> str:
        return self._released

    def chunk(self, token_ids: list[int], text: str) -> str:
        """Check one streamed chunk; returns the text to relay for it."""
        if self.flushed:
            raise TextMismatch("a chunk arrived after the final text")
        if token_ids:
            if self.stopped:
                raise TextMismatch("token ids arrived after a stop string ended the output")
            released = []
            for position, token in enumerate(token_ids):
                delta, stopped = self._stream.push(self._piece(token))
                released.append(delta)
                if stopped:
                    self.stopped = True
                    if position != len(token_ids) - 1:
                        raise TextMismatch("token ids follow a stop string in one chunk")
            delta = "".join(released)
        else:
            delta = "" if self.stopped else self._stream.flush()
            self.flushed = True
        self._released += delta
        self._claimed += text
        decodable = self._released + self._stream.held
        if not (decodable.startswith(self._claimed) or self._claimed.startswith(decodable)):
            raise TextMismatch(
                f"the node's text {self._claimed[-40:]!r} is not what its token ids decode "
                f"to ({decodable[-40:]!r})")
        if self.flushed and self._claimed != self._released:
            raise TextMismatch("the node's final text is not what its token ids decode to")
        self.parts.append(delta)
        return delta

    def finish(self) -> None:
        """The segment ended: the node's text and the ids' text must be equal."""
        if not self.flushed and not self.stopped:
            self._released += self._stream.flush()
            self.flushed = True
        if self._claimed != self._released:
            raise TextMismatch(
                f"the node's text ends {self._claimed[-40:]!r}, its token ids "
                f"{self._released[-40:]!r}")
