"""``aidp-market worker`` (Celery worker: verification) and ``aidp-market beat``.

The worker runs the verification tasks; beat schedules the tick that decides
sampling, dispatches verifications and closes expired challenge windows. On one
machine ``aidp-market worker --beat`` runs both in one process.
"""

from __future__ import annotations

import argparse


def _worker(args: argparse.Namespace) -> int:
    from market.settings import get_settings
    from market.worker.celery_app import celery_app

    settings = get_settings()
    print(f"aidp-market worker: broker {settings.broker.url}, database {settings.db.url}",
          flush=True)
    argv = [
        "worker",
        f"--loglevel={args.loglevel}",
        f"--concurrency={args.concurrency}",
        f"--pool={args.pool}",
        "--without-gossip",
        "--without-mingle",
    ]
    if args.beat:
        argv += ["--beat", f"--schedule={settings.data_dir}/celerybeat-schedule"]
    celery_app.worker_main(argv)
    return 0


def _beat(args: argparse.Namespace) -> int:
    from market.settings import get_settings
    from market.worker.celery_app import celery_app

    settings = get_settings()
    print(f"aidp-market beat: tick every {settings.verify.scan_interval_s}s on "
          f"{settings.broker.url}", flush=True)
    celery_app.start(["beat", f"--loglevel={args.loglevel}",
                      f"--schedule={settings.data_dir}/celerybeat-schedule"])
    return 0


def _tick(args: argparse.Namespace) -> int:
    from market.settings import get_settings
    from market.verify.service import tick, verify
    from market.worker.tasks import sessions

    settings = get_settings()
    result = tick(sessions(), settings)
    outcomes = {rid: verify(sessions(), rid, settings) for rid in result.dispatched}
    print(f"decided {result.decided}, verified {len(outcomes)}, settled {len(result.settled)}")
    for rid, outcome in outcomes.items():
        print(f"  {rid}: {outcome}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    worker = subparsers.add_parser(
        "worker",
        help="run the Celery worker (verification by re-execution, settlement, slashing)",
        description="Celery worker for challenge windows and verification. The broker is "
        "AIDP_BROKER__URL (default: SQLite under .aidp/; redis://… in production).",
    )
    worker.add_argument("--concurrency", type=int, default=1,
                        help="worker processes (each loads its own verifier engine; default 1)")
    worker.add_argument("--pool", default="prefork", choices=["prefork", "solo", "threads"],
                        help="Celery pool (default prefork)")
    worker.add_argument("--beat", action="store_true",
                        help="also run beat in this process (one-machine setups)")
    worker.add_argument("--loglevel", default="info")
    worker.set_defaults(func=_worker)

    beat = subparsers.add_parser(
        "beat",
        help="run Celery beat (sampling, dispatch, window closing every few seconds)",
        description="Schedules the verification tick every AIDP_VERIFY__SCAN_INTERVAL_S seconds.",
    )
    beat.add_argument("--loglevel", default="info")
    beat.set_defaults(func=_beat)

    once = subparsers.add_parser(
        "verify-tick",
        help="run one verification tick in this process, without Celery (debugging)",
    )
    once.set_defaults(func=_tick)
