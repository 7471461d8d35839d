"""Optimistic verification, free of Celery: the challenge ``window`` (receipt states,
settlement, slashing), which receipts are re-executed (``sampling``), how (``reexec``
over the ``engine`` pool, judged by ``judge``), and the units of work the
worker's tasks run (``service``). Money moves through ``market.money``."""
