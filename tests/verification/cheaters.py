"""Cheating engines for verification tests and bench/verify.py.

Each one is the real llama.cpp engine doing less (or other) work than it attests,
while its receipts name the honest model's sha256 — what a dishonest operator would
run:

* :class:`DifferentModelEngine` — a cheaper model: the SmolLM2 GGUF with most of its
  transformer blocks removed (written with the ``gguf`` package), same tokenizer.
* :class:`EditingEngine` — generates honestly, then edits the output: either the text
  only (token ids kept) or text and ids together.
* :class:`TruncatingEngine` — stops after a fraction of the work and claims a natural
  stop (``finish_reason`` "stop") or ``length``.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

from inference.base import (
    Engine,
    GenerationEnd,
    GenerationEvent,
    GenerationRequest,
    PositionScore,
    TokenDelta,
)
from inference.llamacpp import LlamaCppEngine, default_gguf


def pruned_gguf(keep_blocks: int, target: Path, source: Path | None = None) -> Path:
    """A copy of ``source`` GGUF keeping only its first ``keep_blocks`` blocks."""
    import gguf

    source = source or default_gguf()
    if target.exists():
        return target
    reader = gguf.GGUFReader(str(source))
    arch = reader.fields["general.architecture"].contents()
    tmp = target.with_suffix(f".{os.getpid()}.tmp")
    writer = gguf.GGUFWriter(str(tmp), arch=arch, endianess=reader.endianess)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = field.contents()
        vtype = field.types[0]
        if key == f"{arch}.block_count":
            value = keep_blocks
        if vtype == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(key, value, vtype, sub_type=field.types[-1])
        else:
            writer.add_key_value(key, value, vtype)
    kept = [
        t for t in reader.tensors
        if not (t.name.startswith("blk.") and int(t.name.split(".")[1]) >= keep_blocks)
    ]
    for t in kept:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in kept:
        writer.write_tensor_data(t.data)
    writer.close()
    tmp.replace(target)
    return target


class _Wrapper(Engine):
    """Serves through ``inner`` but attests ``honest``'s model (id and sha256)."""

    def __init__(self, inner: LlamaCppEngine, honest: Engine | None = None) -> None:
        self.inner = inner
        self.honest = honest
        self.name = inner.name
        self.version = inner.version

    async def start(self) -> None:
        await self.inner.start()
        if self.honest is not None:
            await self.honest.start()
        self.model = (self.honest or self.inner).model

    async def close(self) -> None:
        await self.inner.close()

    def count_prompt_tokens(self, request: GenerationRequest) -> int:
        return self.inner.count_prompt_tokens(request)

    def decode(self, token_ids: list[int]) -> str:
        return self.inner.decode(token_ids)

    async def score(
        self, request: GenerationRequest, output_token_ids: list[int], top_k: int = 20,
        *, nucleus_noise: float = 0.0,
    ) -> list[PositionScore]:
        return await self.inner.score(request, output_token_ids, top_k,
                                      nucleus_noise=nucleus_noise)

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        return self.inner.generate(request)


class DifferentModelEngine(_Wrapper):
    """Generates with a pruned (cheaper) model, claims the full model's sha256."""

    def __init__(self, pruned_path: Path, honest: LlamaCppEngine, n_threads: int = 2) -> None:
        super().__init__(
            LlamaCppEngine(pruned_path, model_id=honest.model_id, n_threads=n_threads), honest
        )


class EditingEngine(_Wrapper):
    """Edits the output after generating it.

    ``mode="text"``: the streamed text gets a phrase inserted, ids untouched.
    ``mode="tokens"``: from the middle on, the ids and text of an injected phrase
    replace what the model produced (consistent ids and text).
    ``mode="invalid_ids"``: one token id is swapped for one the vocabulary lacks.
    """

    INVALID_ID = 10**7

    PHRASE = " Visit cheap-tokens.example for a discount!"

    def __init__(self, inner: LlamaCppEngine, mode: str = "text") -> None:
        super().__init__(inner)
        self.mode = mode

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        produced = 0
        injected = False
        events = self.inner.generate(request)
        async for event in events:
            if isinstance(event, TokenDelta) and event.token_ids:
                produced += len(event.token_ids)
                if not injected and produced >= max(2, request.max_tokens // 3):
                    injected = True
                    if self.mode == "text":
                        yield TokenDelta(text=event.text + self.PHRASE, token_ids=event.token_ids)
                        continue
                    if self.mode == "invalid_ids":
                        ids = [self.INVALID_ID, *event.token_ids[1:]]
                        yield TokenDelta(text=event.text, token_ids=ids)
                        continue
                    assert self.inner._primary is not None
                    phrase_ids = list(self.inner._primary.tokenize(
                        self.PHRASE.encode(), add_bos=False, special=False))
                    budget = max(0, request.max_tokens - produced)
                    phrase_ids = phrase_ids[:budget]
                    yield event
                    yield TokenDelta(text=self.inner.decode(phrase_ids), token_ids=phrase_ids)
                    await events.aclose()  # type: ignore[attr-defined]
                    yield GenerationEnd(
                        finish_reason="stop" if produced + len(phrase_ids) < request.max_tokens
                        else "length",
                        prompt_tokens=self.inner.count_prompt_tokens(request),
                        completion_tokens=produced + len(phrase_ids),
                    )
                    return
            yield event


class TruncatingEngine(_Wrapper):
    """Stops after ``fraction`` of ``max_tokens`` and claims ``finish_reason``."""

    def __init__(self, inner: LlamaCppEngine, fraction: float = 0.4,
                 finish_reason: str = "stop") -> None:
        super().__init__(inner)
        self.fraction = fraction
        self.finish_reason = finish_reason

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        limit = max(1, int(request.max_tokens * self.fraction))
        produced = 0
        events = self.inner.generate(request)
        async for event in events:
            if isinstance(event, TokenDelta):
                produced += len(event.token_ids)
                yield event
                if produced >= limit:
                    await events.aclose()  # type: ignore[attr-defined]
                    yield GenerationEnd(
                        finish_reason=self.finish_reason,  # type: ignore[arg-type]
                        prompt_tokens=self.inner.count_prompt_tokens(request),
                        completion_tokens=produced,
                    )
                    return
            else:
                yield event
