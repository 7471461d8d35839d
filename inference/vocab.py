"""A model's vocabulary as the market needs it: prompt tokens and output pieces.

The market does not trust the counts and text a node reports; it tokenizes prompts
itself (the hold is exact and a receipt's ``prompt_tokens`` must equal its count) and
replays the node's text from the token ids (:class:`protocol.text.ExpectedText`).
Both need only this: the rendered prompt's token ids and each id's byte piece. The
vocabulary ships with the weights (the GGUF's own), so market and node tokenize with
the same table and the same chat template.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

from inference.base import GenerationRequest


class Vocabulary(abc.ABC):
    size: int
    eog_token_ids: Sequence[int]

    @abc.abstractmethod
    def prompt_token_ids(self, request: GenerationRequest) -> list[int]:
        """The rendered prompt's token ids (chat template applied), then the continuation."""

    @abc.abstractmethod
    def piece(self, token_id: int) -> bytes:
        """The bytes token ``token_id`` adds to the output text (b"" for control tokens)."""

    def valid(self, token_id: int) -> bool:
        return 0 <= token_id < self.size
