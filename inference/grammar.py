"""Constrained decoding: which tokens keep the output inside a job's constraint.

A job's ``protocol.job.OutputConstraint`` (OpenAI's ``response_format``) compiles into
an llguidance grammar (Microsoft's ``llguidance``, the library behind vLLM's and
SGLang's structured outputs). At every output position the matcher gives the set of
tokens that keep the output a prefix of a valid document; masking the rest before the
protocol sampler makes the output valid by construction, not by hope.

The mask is a deterministic function of (grammar, token table, output prefix), so the
node that generates, the market that relays and the verifier that re-executes all
compute the same one from the same GGUF vocabulary: a node that ignored the constraint
emits a token the mask forbids, which the market refuses as it relays it and the
verifier scores as impossible. That holds only when every party compiles the grammar
the same way: the options are fixed here (:data:`GRAMMAR_ENGINE` names library and
version, and nodes declare it in their capabilities).
"""

from __future__ import annotations

import importlib.metadata
import json
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from protocol.job import OutputConstraint

try:  # the market and CPU nodes install it; a node without it serves no constraint
    import llguidance
    import llguidance.numpy as llg_numpy
except ImportError:  # pragma: no cover - exercised only on installs without it
    llguidance = None
    llg_numpy = None

GRAMMAR_ENGINE = (f"llguidance/{importlib.metadata.version('llguidance')}" if llguidance
                  else None)

# Compact JSON only: a small model given free whitespace can fill its budget with it,
# and one spelling per document keeps every party's mask identical.
_JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False}
_ANY_OBJECT: dict[str, Any] = {"type": "object"}


class InvalidConstraint(ValueError):
    """A constraint no grammar can be built from (a 400 at the market)."""


def grammar_text(constraint: OutputConstraint) -> str:
    """The llguidance grammar of ``constraint`` (raises :class:`InvalidConstraint`)."""
    if llguidance is None:
        raise InvalidConstraint("constrained decoding needs the llguidance package")
    schema = constraint.json_schema if constraint.type == "json_schema" else _ANY_OBJECT
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            json.dumps(schema), overrides=_JSON_OPTIONS)
    except ValueError as exc:
        raise InvalidConstraint(f"response_format schema: {exc}") from None
    return str(grammar)


class GrammarTokenizer:
    """A model's token table as llguidance reads it, built once per vocabulary (a
    second or so for 50k tokens) from the same pieces every party has.

    ``pieces[i]``: the bytes token i adds to the output (b"" for control tokens, which
    become special tokens no JSON grammar allows); ``eog_ids``: the ids that end
    generation (allowed where the document is complete)."""

    def __init__(self, pieces: Sequence[bytes], eog_ids: Sequence[int]) -> None:
        if llguidance is None:
            raise InvalidConstraint("constrained decoding needs the llguidance package")
        eog = sorted(set(eog_ids))
        if not eog:
            raise InvalidConstraint("a vocabulary without an end-of-generation token")
        self.vocab_size = len(pieces)
        tokens = [
            piece if piece else b"\xff<special_%d>" % i for i, piece in enumerate(pieces)
        ]
        self._by_piece = {piece: i for i, piece in reversed(list(enumerate(tokens)))}
        self._longest = max(len(p) for p in tokens)
        wrapper = _Wrapper(tokens, eog[0], [i for i, p in enumerate(pieces) if not p],
                           self._greedy)
        self.lltokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(wrapper),
                                                  eos_token=eog)

    def _greedy(self, data: bytes) -> list[int]:
        """Longest-match tokenization (llguidance asks only for forced text; byte-level
        vocabularies hold every single byte, anything else is skipped)."""
        out: list[int] = []
        i = 0
        while i < len(data):
            for size in range(min(self._longest, len(data) - i), 0, -1):
                token = self._by_piece.get(data[i:i + size])
                if token is not None:
                    out.append(token)
                    i += size
                    break
            else:
                i += 1
        return out


class _Wrapper:
    """What ``llguidance.TokenizerWrapper`` reads from a tokenizer."""

    def __init__(self, tokens: list[bytes], eos: int, special: list[int], encode: Any) -> None:
        self.eos_token_id = eos
        self.bos_token_id = None
        self.tokens = tokens
        self.special_token_ids = special
        self._encode = encode

    def __call__(self, text: bytes | str) -> list[int]:
        return list(self._encode(text.encode() if isinstance(text, str) else text))


class GrammarMatcher:
    """One output's position in its grammar: the allowed tokens, then the token taken."""

    def __init__(self, tokenizer: GrammarTokenizer, constraint: OutputConstraint) -> None:
        self._size = tokenizer.vocab_size
        self._matcher = llguidance.LLMatcher(tokenizer.lltokenizer, grammar_text(constraint),
                                             log_level=0)
        if self._matcher.is_error():
            raise InvalidConstraint(
                f"response_format schema is not supported: {self._matcher.get_error()}")
        self._bitmask = llg_numpy.allocate_token_bitmask(1, self._size)
        self.violated_at: int | None = None  # the first output position outside the grammar
        self.position = 0

    def allowed(self) -> np.ndarray | None:
        """Which ids may come next (a bool per id), or None once the output has left the
        grammar (nothing is masked then: the violation is already on record)."""
        if self.violated_at is not None:
            return None
        llg_numpy.fill_next_token_bitmask(self._matcher, self._bitmask, 0)
        bits = np.unpackbits(self._bitmask.view(np.uint8), bitorder="little")
        return bits[: self._size].astype(bool)

    def accept(self, token: int) -> bool:
        """Take ``token``; False (and ``violated_at`` set) when the grammar forbids it."""
        position, self.position = self.position, self.position + 1
        if self.violated_at is not None:
            return False
        if not self._matcher.consume_token(int(token)):
            self.violated_at = position
            return False
        return True

    def take(self, tokens: Sequence[int]) -> int | None:
        """Take all of ``tokens`` or none (the market checks a relayed chunk): None when
        all fit the grammar, else the index of the first that does not."""
        if self.violated_at is not None:
            return 0
        taken = self._matcher.try_consume_tokens([int(t) for t in tokens])
        if taken < len(tokens):
            self._matcher.rollback(taken)
            return taken
        self.position += len(tokens)
        return None

    @property
    def complete(self) -> bool:
        """The output so far is a whole document (ending here is allowed)."""
        return self.violated_at is None and self._matcher.is_accepting()


_TOKENIZERS_LOCK = threading.Lock()


def tokenizer_for(owner: object,
                  table: Callable[[], tuple[Sequence[bytes], Sequence[int]]]) -> GrammarTokenizer:
    """The grammar tokenizer of ``owner`` (an engine or a vocabulary), built on first use
    from ``table()`` (its pieces and end-of-generation ids) and kept for the owner's
    lifetime: later calls read no table."""
    cached = getattr(owner, "_grammar_tokenizer", None)
    if cached is not None:
        return cached
    with _TOKENIZERS_LOCK:
        cached = getattr(owner, "_grammar_tokenizer", None)
        if cached is None:
            cached = GrammarTokenizer(*table())
            owner._grammar_tokenizer = cached  # type: ignore[attr-defined]
        return cached


def vocabulary_tokenizer(vocabulary: Any) -> GrammarTokenizer:
    """The grammar tokenizer of a market's listed vocabulary (``inference.vocab``)."""
    return tokenizer_for(vocabulary, lambda: (
        [vocabulary.piece(t) for t in range(vocabulary.size)], vocabulary.eog_token_ids))
