"""The Celery application: ``celery -A market.worker.celery_app worker|beat``.

Broker from ``settings.broker.url``: Redis in production
(``redis://127.0.0.1:6379/0``), kombu's SQLAlchemy transport on SQLite by default
(``sqla+sqlite:///.aidp/broker.db``). No result backend: tasks record their outcome
in the database. Tasks are acknowledged late (a worker that dies mid-task leaves the
message to be redelivered), one message prefetched at a time, and idempotent.
"""

from __future__ import annotations

from pathlib import Path

from celery import Celery

from market.settings import MarketSettings, get_settings
from market.worker.chain_schedule import TASKS_MODULE as CHAIN_TASKS
from market.worker.chain_schedule import beat_schedule as chain_beat_schedule

TICK_TASK = "market.verification.tick"
VERIFY_TASK = "market.verification.verify_receipt"


def _ensure_broker_dir(url: str) -> None:
    prefix = "sqla+sqlite:///"
    if url.startswith(prefix):
        path = url[len(prefix):]
        if path and path != ":memory:":
            Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)


def _transport_options(settings: MarketSettings) -> dict[str, object]:
    if settings.broker.url.startswith(("redis://", "rediss://")):
        # Redeliver an unacknowledged (acks_late) message after this long.
        return {"visibility_timeout": max(3600, int(settings.verify.timeout_s * 2))}
    # kombu's SQLAlchemy transport hands its options to create_engine: none needed.
    return {}


def configure(app: Celery, settings: MarketSettings) -> Celery:
    _ensure_broker_dir(settings.broker.url)
    app.conf.update(
        broker_url=settings.broker.url,
        result_backend=None,
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_connection_retry_on_startup=True,
        task_default_queue="aidp-verification",
        task_serializer="json",
        accept_content=["json"],
        timezone="UTC",
        enable_utc=True,
        worker_hijack_root_logger=False,
        broker_transport_options=_transport_options(settings),
        beat_schedule={
            "verification-tick": {
                "task": TICK_TASK,
                "schedule": settings.verify.scan_interval_s,
                "options": {"expires": max(1.0, settings.verify.scan_interval_s * 4)},
            },
            **chain_beat_schedule(settings),  # on-chain settlement (market/chain)
        },
        beat_schedule_filename=str(Path(settings.data_dir) / "celerybeat-schedule"),
    )
    return app


def create_celery(settings: MarketSettings | None = None) -> Celery:
    app = Celery("aidp-market", include=["market.worker.tasks", CHAIN_TASKS])
    return configure(app, settings or get_settings())


celery_app = create_celery()
app = celery_app  # ``celery -A market.worker.celery_app`` finds ``app``
