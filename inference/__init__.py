"""Inference engines shared by the node (serving) and the market (verifying, counting).

One small interface (:mod:`inference.base`); llama.cpp, transformers, vLLM and the
deterministic test engine behind it; the vocabulary the market counts prompts and
replays text with (:mod:`inference.vocab`); the weights hash (:mod:`inference.weights`).
Depends on ``protocol`` only.
"""
