"""The deterministic engine (``inference.fake``) under the names tests use, and
``collect``, the one way tests read an engine's event stream."""

from inference.base import Engine, GenerationEnd, GenerationRequest, TokenDelta
from inference.fake import EOS, VOCAB, DeterministicEngine, fake_sha256, next_token

__all__ = ["EOS", "VOCAB", "DeterministicEngine", "collect", "fake_sha256", "next_token"]


async def collect(engine: Engine, request: GenerationRequest
                  ) -> tuple[str, list[int], GenerationEnd | None]:
    """Run one generation to the end: its text, token ids and end event.

    Every engine test compares these three, so they are gathered in one place; a
    second end event (which no engine may emit) fails here.
    """
    text: list[str] = []
    ids: list[int] = []
    end: GenerationEnd | None = None
    async for event in engine.generate(request):
        if isinstance(event, TokenDelta):
            text.append(event.text)
            ids.extend(event.token_ids)
        else:
            assert isinstance(event, GenerationEnd) and end is None
            end = event
    return "".join(text), ids, end
