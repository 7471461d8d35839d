"""Every kind of chain transfer and how to build and confirm it: the table the
exactly-once driver (``transfers.drive``) is given. Each kind's module exports its own
part; joining them here keeps the driver free of imports back up to them."""

from __future__ import annotations

from market.onchain import allowance, bootstrap, settle
from market.onchain.transfers import Handlers

HANDLERS: Handlers = {
    **allowance.HANDLERS,
    **bootstrap.HANDLERS,
    **settle.HANDLERS,
}
