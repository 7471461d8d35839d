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


class _StopMatcher:
    """Knuth-Morris-Pratt over characters for one stop string: how much of it the text
    so far ends with, updated in amortised constant time per character (a stop string
    of hundreds of characters costs no more per token than a short one)."""

    def __init__(self, stop: str) -> None:
        self.stop = stop
        self.state = 0  # the longest prefix of ``stop`` the text ends with
        self._fail = [0] * len(stop)
        k = 0
        for i in range(1, len(stop)):
            while k and stop[i] != stop[k]:
                k = self._fail[k - 1]
            if stop[i] == stop[k]:
                k += 1
            self._fail[i] = k

    def feed(self, char: str) -> bool:
        """Advance by one character; True when the stop string is complete."""
        stop, state = self.stop, self.state
        while state and stop[state] != char:
            state = self._fail[state - 1]
        if stop[state] == char:
            state += 1
        if state == len(stop):
            self.state = self._fail[state - 1]
            return True
        self.state = state
        return False


class TextStream:
    """Turns per-token byte pieces into text deltas, honouring stop strings.

    ``push`` returns (text to emit now, whether a stop string was hit). A stop string
    ends the text where it starts (the earliest start among those found in the text not
    yet released); text that may be the start of one is held until it is known not to
    be.
    """

    def __init__(self, stop: Iterable[str]) -> None:
        self.stop = [s for s in stop if s]
        self._matchers = [_StopMatcher(s) for s in self.stop]
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._held = ""

    def prime(self, pieces: Iterable[bytes]) -> None:
        """Replay output an earlier node already streamed (a continuation): its text was
        released by that node, except what it still held, which stays held here, so a
        stop string split across the two nodes is still seen."""
        for piece in pieces:
            self.push(piece)

    def push(self, piece: bytes) -> tuple[str, bool]:
        new = self._decoder.decode(piece)
        buffer = self._held + new
        if not self.stop:
            self._held = ""
            return buffer, False
        base, hit = len(self._held), -1
        for offset, char in enumerate(new):
            for matcher in self._matchers:
                if matcher.feed(char):
                    start = base + offset + 1 - len(matcher.stop)
                    hit = start if hit < 0 else min(hit, start)
        if hit >= 0:
            self._held = ""
            return buffer[:hit], True
        keep = max(matcher.state for matcher in self._matchers)
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
    release under the protocol's rule. The node's own text must agree: it may lag the
    replay (an engine that holds text back longer) by at most ``MAX_LAG_CHARS``, or run
    ahead of it only into text the ids already decode to but the replay still holds;
    at the end the two are equal. A chunk without ids is the final release of held text
    and may come once, last. Work per chunk is bounded by the chunk and the lag, never
    by the length of the output. Raises :class:`TextMismatch`.
    """

    MAX_LAG_CHARS = 4096

    def __init__(self, piece: Piece, stop: Iterable[str], continuation_ids: Iterable[int] = ()):
        self._piece = piece
        self._stream = TextStream(stop)
        self._stream.prime(piece(t) for t in continuation_ids)
        self.stopped = False
        self.flushed = False
        self.parts: list[str] = []  # what the replay released, chunk by chunk
        self._owed = ""  # released by the replay, not yet sent by the node
        self._early = ""  # sent by the node, still held by the replay

    @property
    def text(self) -> str:
        return "".join(self.parts)

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
        self.parts.append(delta)
        self._agree(delta, text)
        if self.flushed and (self._owed or self._early):
            raise TextMismatch("the node's final text is not what its token ids decode to")
        return delta

    def _agree(self, released: str, claimed: str) -> None:
        sent, due = self._early + claimed, self._owed + released
        common = min(len(sent), len(due))
        if sent[:common] != due[:common]:
            raise TextMismatch(f"the node's text {sent[:40]!r} is not what its token ids "
                               f"decode to ({due[:40]!r})")
        self._early, self._owed = sent[common:], due[common:]
        if self._early and not self._stream.held.startswith(self._early):
            raise TextMismatch(f"the node sent text {self._early[:40]!r} its token ids do not "
                               "decode to")
        if len(self._owed) > self.MAX_LAG_CHARS:
            raise TextMismatch(f"the node's text lags its token ids by more than "
                               f"{self.MAX_LAG_CHARS} characters")

    def finish(self) -> None:
        """The segment ended: the node's text and the ids' text must be equal."""
        if not self.flushed and not self.stopped:
            rest = self._stream.flush()
            self.flushed = True
            self.parts.append(rest)
            self._owed += rest
            if self._early.startswith(rest) or rest.startswith(self._early):
                common = min(len(rest), len(self._early))
                self._early, self._owed = self._early[common:], self._owed[common:]
        if self._owed or self._early:
            raise TextMismatch(
                f"the node's text ends otherwise than its token ids (owed {self._owed[:40]!r}, "
                f"sent early {self._early[:40]!r})")
