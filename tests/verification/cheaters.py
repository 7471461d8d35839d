"""Cheating engines for verification tests and bench/verify.py.

Each one is the real llama.cpp engine doing less (or other) work than it attests,
while its receipts name the honest model's sha256 — what a dishonest operator would
run:

* :class:`DifferentModelEngine` — another model: the SmolLM2 GGUF with most of its
  transformer blocks removed or its norms perturbed (written with the ``gguf``
  package), or requantised to Q2_K / Q3_K by llama.cpp's own quantiser.
* :class:`PromptAlteringEngine` — serves a shortened or rewritten prompt.
* :class:`EditingEngine` — generates honestly, then edits the output: either the text
  only (token ids kept) or text and ids together.
* :class:`ForeignSamplerEngine` — the right model, its own randomness (not the
  protocol sampler's draw for the job's seed).
* :class:`TruncatingEngine` — stops after a fraction of the work and claims a natural
  stop (``finish_reason`` "stop") or ``length``.
* :class:`CheapEmbedder` — the listed embedding model's identity over less work.
"""

from __future__ import annotations

import ctypes
import os
import threading
import warnings
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from inference.base import (
    Engine,
    GenerationEnd,
    GenerationEvent,
    GenerationRequest,
    PositionScore,
    TokenDelta,
)
from inference.embedding import SentenceEmbedder
from inference.llamacpp import LlamaCppEngine, default_gguf
from protocol import fingerprint
from protocol.messages import Capabilities


def _rewrite_gguf(source: Path, target: Path, *, keep_blocks: int | None = None,
                  transform: Callable[[np.ndarray], np.ndarray] | None = None) -> Path:
    """A copy of ``source`` keeping its first ``keep_blocks`` transformer blocks, with
    ``transform`` applied to every float32 tensor (the norms)."""
    import gguf

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
        if key == f"{arch}.block_count" and keep_blocks is not None:
            value = keep_blocks
        if vtype == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(key, value, vtype, sub_type=field.types[-1])
        else:
            writer.add_key_value(key, value, vtype)
    kept = [
        t for t in reader.tensors
        if keep_blocks is None
        or not (t.name.startswith("blk.") and int(t.name.split(".")[1]) >= keep_blocks)
    ]

    def data(t: Any) -> np.ndarray:
        if transform is not None and t.tensor_type == gguf.GGMLQuantizationType.F32:
            return transform(np.array(t.data)).astype(np.float32)
        return t.data

    for t in kept:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in kept:
        writer.write_tensor_data(data(t))
    writer.close()
    tmp.replace(target)
    return target


def pruned_gguf(keep_blocks: int, target: Path, source: Path | None = None) -> Path:
    """A copy of ``source`` GGUF keeping only its first ``keep_blocks`` blocks."""
    return _rewrite_gguf(source or default_gguf(), target, keep_blocks=keep_blocks)


def perturbed_gguf(scale: float, target: Path, source: Path | None = None,
                   seed: int = 0) -> Path:
    """A copy of ``source`` whose norm weights are each multiplied by 1 + N(0, scale):
    another model of the same size, close to the real one."""
    rng = np.random.default_rng(seed)
    return _rewrite_gguf(source or default_gguf(), target,
                         transform=lambda x: x * (1.0 + rng.normal(0.0, scale, x.shape)))


def requantised_gguf(ftype: str, target: Path, source: Path | None = None) -> Path:
    """``source`` requantised by llama.cpp's own quantiser (``ftype``: "Q2_K", "Q3_K_M"
    …): a smaller, cheaper copy of the same model."""
    import llama_cpp

    if target.exists():
        return target
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.allow_requantize = True
    params.nthread = 2
    tmp = target.with_suffix(f".{os.getpid()}.tmp")
    code = llama_cpp.llama_model_quantize(str(source or default_gguf()).encode(),
                                          str(tmp).encode(), ctypes.byref(params))
    if code != 0:
        raise RuntimeError(f"llama_model_quantize to {ftype} failed ({code})")
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

    def capabilities(self) -> Capabilities:
        return self.inner.capabilities()


class ShapingIgnoringEngine(_Wrapper):
    """Declares constrained decoding, penalties and logit_bias, then serves the job
    without them (no grammar mask to compute, the model's favourite tokens); the receipt
    still names the job's request, constraint and sampling as asked."""

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        job = request.job
        plain = job.model_copy(update={
            "constraint": None,
            "sampling": job.sampling.model_copy(update={
                "presence_penalty": 0.0, "frequency_penalty": 0.0, "logit_bias": ()}),
        })
        return self.inner.generate(replace(request, job=plain))


class DifferentModelEngine(_Wrapper):
    """Generates with another (pruned, perturbed or requantised) model, claims the full
    model's sha256; its fingerprint is its own model's, as nothing better is at hand."""

    def __init__(self, other_path: Path, honest: LlamaCppEngine, n_threads: int = 2) -> None:
        super().__init__(
            LlamaCppEngine(other_path, model_id=honest.model_id, n_threads=n_threads), honest
        )


class PromptAlteringEngine(_Wrapper):
    """Serves a cheaper prompt than the job's: ``mode="shorten"`` keeps only the last
    user message (a long system prompt and history cost prefill), ``mode="alter"``
    rewrites it. The receipt still names the job's request."""

    def __init__(self, inner: LlamaCppEngine, mode: str = "shorten") -> None:
        super().__init__(inner)
        self.mode = mode

    def _cheaper(self, request: GenerationRequest) -> GenerationRequest:
        job = request.job
        if job.messages is not None:
            messages = [m for m in job.messages if m.role == "user"][-1:]
            if self.mode == "alter":
                messages = [m.model_copy(update={"content": m.content.upper()})
                            for m in messages]
            return replace(request, job=job.model_copy(update={"messages": messages}))
        prompt = job.prompt or ""
        cut = prompt[len(prompt) // 2:] if self.mode == "shorten" else prompt.upper()
        return replace(request, job=job.model_copy(update={"prompt": cut}))

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        return self.inner.generate(self._cheaper(request))


class EditingEngine(_Wrapper):
    """Edits the output after generating it.

    ``mode="text"``: the streamed text gets a phrase inserted, ids untouched.
    ``mode="tokens"``: from the middle on, the ids and text of an injected phrase
    replace what the model produced (consistent ids and text).
    ``mode="invalid_ids"``: one token id is swapped for one the vocabulary lacks.
    ``last_edited`` says whether the last generation was edited (an output that ended
    before a third of ``max_tokens`` is left as the model wrote it).
    """

    INVALID_ID = 10**7

    PHRASE = " Visit cheap-tokens.example for a discount!"

    def __init__(self, inner: LlamaCppEngine, mode: str = "text") -> None:
        super().__init__(inner)
        self.mode = mode
        self.last_edited = False

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        produced = 0
        injected = False
        self.last_edited = False
        events = self.inner.generate(request)
        async for event in events:
            if isinstance(event, TokenDelta) and event.token_ids:
                produced += len(event.token_ids)
                if not injected and produced >= max(2, request.max_tokens // 3):
                    injected = self.last_edited = True
                    if self.mode == "text":
                        yield replace(event, text=event.text + self.PHRASE)
                        continue
                    if self.mode == "invalid_ids":
                        ids = [self.INVALID_ID, *event.token_ids[1:]]
                        yield replace(event, token_ids=ids)
                        continue
                    assert self.inner._primary is not None
                    phrase_ids = list(self.inner._primary.tokenize(
                        self.PHRASE.encode(), add_bos=False, special=False))
                    budget = max(0, request.max_tokens - produced)
                    phrase_ids = phrase_ids[:budget]
                    yield event
                    # rows claiming each injected token was sure: the cheapest lie
                    rows = b"".join(fingerprint.encode_row([(t, 0.0)]) for t in phrase_ids)
                    yield TokenDelta(text=self.inner.decode(phrase_ids), token_ids=phrase_ids,
                                     fingerprint=rows)
                    await events.aclose()  # type: ignore[attr-defined]
                    yield GenerationEnd(
                        finish_reason="stop" if produced + len(phrase_ids) < request.max_tokens
                        else "length",
                        prompt_tokens=self.inner.count_prompt_tokens(request),
                        completion_tokens=produced + len(phrase_ids),
                    )
                    return
            yield event


class ForeignSamplerEngine(_Wrapper):
    """The right model and the right distribution, but its own randomness: it samples as
    if the job's seed were another. Statistically indistinguishable from honest sampling
    (a node reusing cached outputs, or one whose engine ignores the seed); only the
    protocol sampler tells. At temperature 0 it is honest (no randomness to replace)."""

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        own = request.job.with_seed((request.seed or 0) + 1)
        return self.inner.generate(replace(request, job=own))


class TruncatingEngine(_Wrapper):
    """Stops after ``fraction`` of ``max_tokens`` and claims ``finish_reason``;
    ``last_cut`` says whether the last generation was cut (an output that ended by
    itself before the limit is honest)."""

    def __init__(self, inner: LlamaCppEngine, fraction: float = 0.4,
                 finish_reason: str = "stop") -> None:
        super().__init__(inner)
        self.fraction = fraction
        self.finish_reason = finish_reason
        self.last_cut = False

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        limit = max(1, int(request.max_tokens * self.fraction))
        produced = 0
        self.last_cut = False
        events = self.inner.generate(request)
        async for event in events:
            if isinstance(event, TokenDelta):
                produced += len(event.token_ids)
                yield event
                if produced >= limit:
                    await events.aclose()  # type: ignore[attr-defined]
                    self.last_cut = True
                    yield GenerationEnd(
                        finish_reason=self.finish_reason,  # type: ignore[arg-type]
                        prompt_tokens=self.inner.count_prompt_tokens(request),
                        completion_tokens=produced,
                    )
                    return
            else:
                yield event


# the cheats that serve the honest model but do less (or other) work with its output or
# prompt, by label: bench/verify.py and the detection tests build them from here
OUTPUT_CHEATS: dict[str, Callable[[LlamaCppEngine], Engine]] = {
    "edit_text": lambda honest: EditingEngine(honest, mode="text"),
    "edit_tokens": lambda honest: EditingEngine(honest, mode="tokens"),
    "truncate_stop": lambda honest: TruncatingEngine(honest, 0.4, "stop"),
    "truncate_length": lambda honest: TruncatingEngine(honest, 0.4, "length"),
    "prompt_shortened": lambda honest: PromptAlteringEngine(honest, "shorten"),
    "prompt_altered": lambda honest: PromptAlteringEngine(honest, "alter"),
    "sampler_not_followed": lambda honest: ForeignSamplerEngine(honest),
}


def output_cheat(label: str, honest: LlamaCppEngine) -> Engine:
    """The ``OUTPUT_CHEATS`` engine for ``label``, attesting ``honest``'s model."""
    engine = OUTPUT_CHEATS[label](honest)
    engine.model = honest.model
    return engine


# ---- embeddings ------------------------------------------------------------------------------


class CheapEmbedder(SentenceEmbedder):
    """The listed embedding model's identity (its weights' sha256, its id) over a cheaper
    computation, built from the honest, started ``base``:

    * ``layers=k``: only the first k transformer layers (k/6 of the work);
    * ``quantized``: int8 dynamic quantisation of every linear layer (torch's own);
    * ``noise=s``: weights perturbed by relative Gaussian noise of scale s;
    * ``pooling="cls"``: the first token's state instead of the mean;
    * ``truncate=n``: embeds only each input's first n tokens (a shorter job).
    """

    def __init__(self, base: SentenceEmbedder, *, model_id: str | None = None,
                 layers: int | None = None, quantized: bool = False, noise: float = 0.0,
                 pooling: str | None = None, truncate: int | None = None,
                 seed: int = 0) -> None:
        import copy

        import torch

        self.__dict__.update(base.__dict__)
        self._lock = threading.Lock()
        if model_id is not None:
            self.model = replace(base.model, id=model_id)
            self.model_id = model_id
        net = copy.deepcopy(base._net)
        if layers is not None:
            net.encoder.layer = net.encoder.layer[:layers]
        if noise:
            generator = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for parameter in net.parameters():
                    parameter.mul_(1 + noise * torch.randn(parameter.shape, generator=generator))
        if quantized:
            with warnings.catch_warnings():  # torch's eager quantiser is deprecated, works
                warnings.simplefilter("ignore")
                net = torch.ao.quantization.quantize_dynamic(net, {torch.nn.Linear},
                                                             dtype=torch.qint8)
        self._net = net
        if pooling is not None:
            self.layout = replace(self.layout, pooling=pooling)
        self._truncate = truncate

    def embed_sync(self, token_ids: Any, stop: Any = None) -> bytes:
        if self._truncate is not None:
            token_ids = [list(ids[: self._truncate - 1]) + [ids[-1]] if len(ids) > self._truncate
                         else ids for ids in token_ids]
        return super().embed_sync(token_ids, stop)
