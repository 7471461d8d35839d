"""Settlement in AIDP on a ``Ledger``: one module per kind of movement.

Each operation comes as a pure, synchronous ``*_instructions`` builder (so the market can
``ledger.prepare`` → record ``sent`` → ``ledger.submit`` → ``ledger.confirm`` with its
own exactly-once bookkeeping) plus, where useful, an async convenience that runs it.

* ``memo``: the ``aidp:`` memo formats that tell movements apart on chain;
* ``config``: ``ChainConfig`` (mint, deposit account, treasury) and its bootstrap;
* ``deposits``: buyer payments into the deposit account, and scanning for them;
* ``allowance``: delegations to the market, and pulls within them;
* ``stake``: 2-of-3 multisig stake accounts, slashes and withdrawals;
* ``payouts``: one transfer per node per round, and the market's fee;
* ``anchors``: receipts' Merkle roots in a memo.

The package re-exports each module's public names, so a caller that settles across
several concerns (the market's settlement loop) can use one namespace.
"""

from chain.aidp.allowance import (
    allowance,
    approve_instructions,
    prepare_pull,
    pull_instructions,
    revoke_instructions,
)
from chain.aidp.anchors import Anchor, anchor_instructions, read_anchor
from chain.aidp.config import (
    LAMPORTS_PER_SOL,
    MINT_SEED,
    TREASURY_SEED,
    ChainConfig,
    bootstrap,
    fund_wallet,
    local_mint_address,
)
from chain.aidp.deposits import Deposit, DepositScan, deposit_instructions, scan_deposits
from chain.aidp.memo import (
    MEMO_PREFIX,
    AidpMemo,
    anchor_memo,
    deposit_memo,
    fee_memo,
    find_memo,
    keyed_memo,
    memo_names,
    memo_texts,
    parse_memo,
    payout_memo,
)
from chain.aidp.payouts import (
    NodePayout,
    PayoutRound,
    fee_instructions,
    payout_instructions,
    plan_round,
    round_transactions,
)
from chain.aidp.stake import (
    Stake,
    StakeInfo,
    create_stake,
    create_stake_instructions,
    read_stake,
    slash_instructions,
    stake_deposit_instructions,
    stake_for,
    withdraw_instructions,
    withdraw_message,
)

__all__ = [
    "LAMPORTS_PER_SOL",
    "MEMO_PREFIX",
    "MINT_SEED",
    "TREASURY_SEED",
    "AidpMemo",
    "Anchor",
    "ChainConfig",
    "Deposit",
    "DepositScan",
    "NodePayout",
    "PayoutRound",
    "Stake",
    "StakeInfo",
    "allowance",
    "anchor_instructions",
    "anchor_memo",
    "approve_instructions",
    "bootstrap",
    "create_stake",
    "create_stake_instructions",
    "deposit_instructions",
    "deposit_memo",
    "fee_instructions",
    "fee_memo",
    "find_memo",
    "fund_wallet",
    "keyed_memo",
    "local_mint_address",
    "memo_names",
    "memo_texts",
    "parse_memo",
    "payout_instructions",
    "payout_memo",
    "plan_round",
    "prepare_pull",
    "pull_instructions",
    "read_anchor",
    "read_stake",
    "revoke_instructions",
    "round_transactions",
    "scan_deposits",
    "slash_instructions",
    "stake_deposit_instructions",
    "stake_for",
    "withdraw_instructions",
    "withdraw_message",
]
