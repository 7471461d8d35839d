"""The one place a job becomes what an engine is asked.

The OpenAI body is read once, into ``protocol.job.JobRequest``; this module only pairs
a job with its continuation prefix (and, for tests and tools that start from an OpenAI
body, composes the two steps).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from inference.base import GenerationRequest
from protocol.job import InvalidJobRequest, JobRequest

BadRequest = InvalidJobRequest  # what engines raise for content they cannot render


def engine_request(job: JobRequest,
                   continuation_token_ids: Sequence[int] | None = ()) -> GenerationRequest:
    """The engine's request for ``job``, continuing after ``continuation_token_ids``."""
    return GenerationRequest(job=job, continuation_token_ids=list(continuation_token_ids or ()))


def generation_request(kind: str, body: Mapping[str, Any],
                       continuation_token_ids: Sequence[int] | None = ()) -> GenerationRequest:
    """OpenAI body -> ``JobRequest`` -> engine request (raises ``InvalidJobRequest``)."""
    return engine_request(JobRequest.from_openai(kind, body), continuation_token_ids)

