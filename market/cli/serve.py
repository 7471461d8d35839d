"""``aidp-market serve`` (the API), ``aidp-market migrate`` and ``aidp-market settings``."""

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
    print(f"aidp-market: serving on {scheme}://{host}:{port} (database {settings.db.url})",
          flush=True)
    uvicorn.run(
        serving_app(settings),
        host=host,
        port=port,
        log_level=settings.log_level,
        ws_max_size=settings.limits.link_max_frame_bytes,
        ws_ping_interval=20,
        ws_ping_timeout=20,
        ssl_certfile=str(settings.tls_certfile) if settings.tls_certfile else None,
        ssl_keyfile=str(settings.tls_keyfile) if settings.tls_keyfile else None,
    )
    return 0


def _migrate(args: argparse.Namespace) -> int:
    from market.migrate import upgrade

    url = get_settings().db.url
    upgrade(url, args.revision)
    print(f"database at {url} is at {args.revision}")
    return 0


#: settings printed as "***": whoever reads a terminal or a log must not learn them
SECRET_SETTINGS = ("AIDP_ADMIN_TOKEN", "AIDP_VERIFY__SAMPLING_KEY")


def _settings(args: argparse.Namespace) -> int:
    import json

    from market.settings import environment_names

    for name, value in environment_names(get_settings()):
        if name in SECRET_SETTINGS and value:
            value = "***"
        elif isinstance(value, dict | list):
            value = json.dumps(value, default=str)  # what the variable would be set to
        print(f"{name}={'' if value is None else value}")
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

    settings = subparsers.add_parser(
        "settings", help="print every setting as its environment variable and current value "
        "(groups spelled AIDP_GROUP__FIELD; secrets masked)")
    settings.set_defaults(func=_settings)
