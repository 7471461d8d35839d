"""Settlement in AIDP on a ``Ledger``: one module per kind of movement.

Each operation comes as a pure, synchronous ``*_instructions`` builder (so the market can
``ledger.prepare`` → record ``sent`` → ``ledger.submit`` → ``ledger.confirm`` with its
own exactly-once bookkeeping) plus, where useful, an async convenience that runs it.

* ``memo``: the ``aidp:`` memo formats that tell movements apart on chain;
* ``config``: ``ChainConfig`` (mint, deposit account, treasury) and its bootstrap;
* ``deposits``: buyer payments into the deposit account, and scanning for them;
* ``allowance``: delegations to the market, and pulls within them;
* ``program``, ``deploy``, ``install``: the ``aidp_market`` program's client, its deploy
  through the upgradeable loader, and a market's initialisation of it;
* ``stake``: stake vaults of the program (stake, unbond, withdraw: the operator alone);
* ``cases``: slashing on evidence (a case on an anchored, node-signed receipt; a
  verdict signed by a quorum of verifiers);
* ``payouts``: payout epochs posted as Merkle roots and claimed per node, and the fee;
* ``anchors``: receipts' Merkle roots stored by the program (and a memo).

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
from chain.aidp.anchors import (
    Anchor,
    anchor_instructions,
    anchor_memo_instruction,
    read_anchor,
    read_anchor_account,
)
from chain.aidp.cases import (
    Case,
    Evidence,
    Verdict,
    acquit_instructions,
    open_case_instructions,
    read_case,
    slash_instructions,
)
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
from chain.aidp.install import ProgramParams, install, read_config
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
)
from chain.aidp.payouts import (
    PayoutEpoch,
    PayoutLeaf,
    PostedEpoch,
    claim_instructions,
    close_instructions,
    fee_instructions,
    plan_epoch,
    post_instructions,
    read_epoch,
)
from chain.aidp.stake import (
    Stake,
    StakeInfo,
    read_stake,
    register_instructions,
    request_unbond_instructions,
    stake_for,
    stake_instructions,
    withdraw_instructions,
)

__all__ = [
    "LAMPORTS_PER_SOL",
    "MEMO_PREFIX",
    "MINT_SEED",
    "TREASURY_SEED",
    "AidpMemo",
    "Anchor",
    "Case",
    "ChainConfig",
    "Deposit",
    "DepositScan",
    "Evidence",
    "PayoutEpoch",
    "PayoutLeaf",
    "PostedEpoch",
    "ProgramParams",
    "Stake",
    "StakeInfo",
    "Verdict",
    "acquit_instructions",
    "allowance",
    "anchor_instructions",
    "anchor_memo",
    "anchor_memo_instruction",
    "approve_instructions",
    "bootstrap",
    "claim_instructions",
    "close_instructions",
    "deposit_instructions",
    "deposit_memo",
    "fee_instructions",
    "fee_memo",
    "find_memo",
    "fund_wallet",
    "install",
    "keyed_memo",
    "local_mint_address",
    "memo_names",
    "memo_texts",
    "open_case_instructions",
    "parse_memo",
    "plan_epoch",
    "post_instructions",
    "prepare_pull",
    "pull_instructions",
    "read_anchor",
    "read_anchor_account",
    "read_case",
    "read_config",
    "read_epoch",
    "read_stake",
    "register_instructions",
    "request_unbond_instructions",
    "revoke_instructions",
    "scan_deposits",
    "slash_instructions",
    "stake_for",
    "stake_instructions",
    "withdraw_instructions",
]
