"""``aidp-market serve`` (the API) and ``aidp-market migrate``."""

from __future__ import annotations

import argparse
import sys

from market.settings import get_settings


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from market.app import serving_app
    from market.settings import exposure_problem

    settings = get_settings()
    host = args.host or settings.host
    port = args.port or settings.port
    # the market's identity (what nodes sign) follows where it really listens
    settings = settings.model_copy(update={"host": host, "port": port})
    if (problem := exposure_problem(settings, host)) is not None:
        print(f"aidp-market: {problem}", file=sys.stderr)
        return 2
    scheme = "https" if settings.tls_certfile else "http"
    print(f"aidp-market: serving on {scheme}://{host}:{port} (database {settings.database_url})",
          flush=True)
    uvicorn.run(
        serving_app(settings),
        host=host,
        port=port,
        log_level=settings.log_level,
        ws_max_size=settings.link_max_frame_bytes,
        ws_ping_interval=20,
        ws_ping_timeout=20,
        ssl_certfile=str(settings.tls_certfile) if settings.tls_certfile else None,
        ssl_keyfile=str(settings.tls_keyfile) if settings.tls_keyfile else None,
    )
    return 0


def _migrate(args: argparse.Namespace) -> int:
    from market.migrate import upgrade

    url = get_settings().database_url
    upgrade(url, args.revision)
    print(f"database at {url} is at {args.revision}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    serve = subparsers.add_parser(
        "serve", help="run the market API (OpenAI-compatible /v1, node link, admin, metrics)"
    )
    serve.add_argument("--host", help="bind address (default: AIDP_HOST or 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default: AIDP_PORT or 8000)")
    serve.set_defaults(func=_serve)

    migrate = subparsers.add_parser("migrate", help="apply database migrations (alembic)")
    migrate.add_argument("revision", nargs="?", default="head", help="target (default: head)")
    migrate.set_defaults(func=_migrate)
