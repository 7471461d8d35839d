"""The deterministic engine (``inference.fake``) under the names tests use."""

from inference.fake import EOS, VOCAB, DeterministicEngine, fake_sha256, next_token

__all__ = ["EOS", "VOCAB", "DeterministicEngine", "fake_sha256", "next_token"]
