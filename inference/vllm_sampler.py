"""The protocol sampler inside vLLM: a vLLM v1 logits processor.

vLLM's own sampler draws from torch's generators, not from the protocol's keyed Philox
noise (:mod:`inference.sampler`), so its sampled tokens would fail verification. The
adapter (:mod:`inference.vllm`) therefore sends a sampled job to vLLM as a *greedy*
request (``temperature: 0``, ``top_p: 1``) that carries the protocol's parameters in
``vllm_xargs``, which vLLM hands to logits processors as ``SamplingParams.extra_args``:

    aidp_seed         the job's seed (a decimal string: exact for any 64-bit value)
    aidp_temperature  T > 0
    aidp_top_p        in (0, 1]
    aidp_position     output position of vLLM's first generated token (the length of
                      the continuation already produced by an earlier node)

For every batch row whose request carries them, :meth:`ProtocolSampler.apply` computes
from the row's own logits the token :func:`inference.sampler.sample` picks at that
output position (``aidp_position`` + tokens generated so far) and masks every other
token to -inf, so vLLM's greedy argmax emits exactly the protocol's choice. The choice
is made by the protocol's own functions on float32 numbers copied to the host, never by
a re-implementation, so a vLLM node and a verifier agree bit for bit on the sampler.
Rows without the arguments are left untouched.

The receipt's fingerprint is built from the streamed ``logprobs``; with vLLM's
``raw_logprobs`` mode (the adapter passes it explicitly) they are computed from the
model's logits *before* any logits processor, so they describe the model's
distribution, not this mask.

Loaded by ``--logits-processors inference.vllm_sampler:ProtocolSampler``. Written
against the interface of vLLM 0.33.0 (``vllm/v1/sample/logits_processor/interface.py``:
constructor ``(vllm_config, device, is_pin_memory)``, ``is_argmax_invariant()``,
``update_state(batch_update)`` with ``removed`` / ``added`` / ``moved``, and
``apply(logits)``). That interface belongs to vLLM's V1 model runner; 0.33 defaults to
the V2 runner, whose processors have another interface, so the adapter starts vLLM
with ``VLLM_USE_V2_MODEL_RUNNER=0``. vLLM is optional here: without it this module
still imports (on a plain base class), so the processor can be tested anywhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum, auto
from typing import TYPE_CHECKING, Any

import numpy as np

from inference.sampler import sample, sampler_key

if TYPE_CHECKING:
    import torch
    from vllm.config import VllmConfig
    from vllm.sampling_params import SamplingParams
    from vllm.v1.sample.logits_processor import BatchUpdate

try:
    from vllm.v1.sample.logits_processor import LogitsProcessor, MoveDirectionality
except ImportError:  # vLLM not installed: the same shapes, so the class stays testable

    class LogitsProcessor:  # type: ignore[no-redef]
        """Stand-in for ``vllm.v1.sample.logits_processor.LogitsProcessor``."""

        @classmethod
        def validate_params(cls, sampling_params: Any) -> None:
            return None

    class MoveDirectionality(Enum):  # type: ignore[no-redef]
        """Stand-in for vLLM's enum of the same name."""

        UNIDIRECTIONAL = auto()
        SWAP = auto()


SEED = "aidp_seed"
TEMPERATURE = "aidp_temperature"
TOP_P = "aidp_top_p"
POSITION = "aidp_position"


@dataclass(frozen=True)
class _Row:
    """One sampled request in the persistent batch. ``output`` is vLLM's own running
    list of the request's output ids (a reference: it grows as tokens are generated,
    with a -1 placeholder per token still in flight under async scheduling), so its
    length is the number of tokens generated so far."""

    key: np.ndarray
    temperature: float
    top_p: float
    start: int
    output: list[int]

    @property
    def position(self) -> int:
        return self.start + len(self.output)


def _parse(extra_args: Mapping[str, Any] | None, output: list[int]) -> _Row | None:
    """The row's sampler state from a request's ``extra_args``; None when the request
    does not ask for the protocol sampler. Raises ValueError on malformed arguments."""
    if not extra_args or TEMPERATURE not in extra_args:
        return None
    try:
        seed = int(extra_args.get(SEED, 0))
        temperature = float(extra_args[TEMPERATURE])
        top_p = float(extra_args.get(TOP_P, 1.0))
        start = int(extra_args.get(POSITION, 0))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"invalid protocol sampler arguments: {exc}") from None
    if not temperature >= 0.0 or not 0.0 < top_p <= 1.0 or start < 0:
        raise ValueError(
            f"invalid protocol sampler arguments: temperature={temperature}, "
            f"top_p={top_p}, position={start}"
        )
    return _Row(sampler_key(seed), temperature, top_p, start, output)


class ProtocolSampler(LogitsProcessor):
    """Forces each opted-in row's argmax to the protocol sampler's token (module doc)."""

    def __init__(self, vllm_config: VllmConfig | None, device: torch.device | None,
                 is_pin_memory: bool) -> None:
        # batch index -> sampler state; only rows whose request opted in
        self._rows: dict[int, _Row] = {}

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        """Malformed arguments fail the request at admission (HTTP 400), not the engine."""
        _parse(getattr(sampling_params, "extra_args", None), [])

    def is_argmax_invariant(self) -> bool:
        """False: it decides the argmax (vLLM skips argmax-invariant processors for
        greedy requests, and every request this processor serves is greedy)."""
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        """Follow the persistent batch: removed, then added, then moved (the order
        vLLM's ``BatchUpdate`` prescribes). An added request may take the index of one
        that left; a move carries the state with it, a swap exchanges two."""
        if batch_update is None:
            return
        for index in batch_update.removed:
            self._rows.pop(index, None)
        for index, params, _prompt_ids, output_ids in batch_update.added:
            row = _parse(getattr(params, "extra_args", None), output_ids)
            if row is None:
                self._rows.pop(index, None)
            else:
                self._rows[index] = row
        for a, b, direction in batch_update.moved:
            row_a, row_b = self._rows.pop(a, None), self._rows.pop(b, None)
            if row_a is not None:
                self._rows[b] = row_a
            if row_b is not None and direction == MoveDirectionality.SWAP:
                self._rows[a] = row_b

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """Mask every opted-in row to the one token the protocol sampler picks there.

        One device-to-host copy of those rows (float32, as the protocol's sampler reads
        logits); the chosen token gets 0.0, every other -inf, so the row's argmax is the
        choice whatever vLLM applies after (penalties keep -inf at -inf)."""
        indices = [i for i in sorted(self._rows) if i < logits.shape[0]]
        if not indices:
            return logits
        values = logits[indices].float().cpu().numpy()
        choices = []
        for row_logits, index in zip(values, indices, strict=True):
            row = self._rows[index]
            choices.append(sample(row_logits, row.temperature, row.top_p, row.key,
                                  row.position))
        logits[indices] = float("-inf")
        logits[indices, choices] = 0.0
        return logits
