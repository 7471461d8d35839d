"""The deterministic engine (``node_agent.engines.fake``) under the names tests use."""

from node_agent.engines.fake import EOS, VOCAB, DeterministicEngine, fake_sha256, next_token

__all__ = ["EOS", "VOCAB", "DeterministicEngine", "fake_sha256", "next_token"]
