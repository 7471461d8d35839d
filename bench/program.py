"""Compute units the ``aidp_market`` program spends per instruction, on LiteSVM.

Builds the program from source (clang-19 + programs/link.py), runs each instruction's
success path once (slash: a 3-of-5 and a 4-of-8 verdict; open_case: inclusion proofs of
depth 3 and 19), and prints one JSON object: compute units per instruction against the
targets (slash with 3-of-5 verifiers <= 60,000; a claim <= 15,000); and the lamports that
settling 1,000 receipts of 10 nodes takes, against the earlier Memo and transfer design,
before and after the fully claimed epoch is closed (``close_epoch`` returns its rent).

    python bench/program.py
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from solders.keypair import Keypair  # noqa: E402

from programs.build import build  # noqa: E402
from tests.programs.test_aidp_market import Case, Chain, Epoch, Staking  # noqa: E402


def units(result: object) -> int:
    Chain.ok(result)
    return int(result.compute_units_consumed())  # type: ignore[attr-defined]


def main() -> None:
    program = build("aidp_market", Path(tempfile.mkdtemp())).read_bytes()
    chain = Chain(program)
    verifiers = [Keypair().pubkey() for _ in range(5)]
    measured: dict[str, int] = {"initialize": units(chain.initialize(verifiers=verifiers))}
    measured["anchor_root"] = units(chain.anchor(b"\x09" * 32))
    chain = Chain(program)
    staking = Staking(chain)
    measured["register_stake"] = units(staking.call("registerStake"))
    measured["stake"] = units(staking.call("stake", amount=500))
    measured["request_unbond"] = units(staking.call("requestUnbond", amount=100))
    staking.later(7 * 86400)
    measured["withdraw"] = units(staking.call("withdraw"))
    shallow = _case(Chain(program), leaves=6)
    measured["open_case_depth_3"] = units(shallow.open())
    measured["slash_3_of_5"] = units(shallow.slash(300, 200))
    deep = _case(Chain(program), leaves=2**19, quorum=4, verifiers=8)
    measured["open_case_depth_19"] = units(deep.open())
    measured["slash_4_of_8"] = units(deep.slash(300, 200, signers=deep.staking.verifiers[:4]))
    closing = _case(Chain(program), leaves=6)
    closing.chain.ok(closing.open())
    measured["close_case"] = units(closing.close())
    epoch = Epoch(Chain(program), [7] * 1000)  # a 1,000-node epoch: a 10-level proof
    measured["post_payouts_1000"] = units(epoch.post())
    measured["claim_of_1000"] = units(epoch.claim(999))
    small = Epoch(Chain(program), [7, 8])
    small.chain.ok(small.post())
    small.chain.ok(small.claim(0))
    small.chain.ok(small.claim(1))
    measured["close_epoch"] = units(small.close())
    lamports = settlement_lamports(program)
    print(json.dumps({"compute_units": measured,
                      "lamports_per_1000_jobs": lamports,
                      "targets": {"slash_3_of_5": 60_000, "claim": 15_000},
                      "slash_3_of_5_vs_target": round(measured["slash_3_of_5"] / 60_000, 3),
                      "claim_vs_target": round(measured["claim_of_1000"] / 15_000, 3)},
                     indent=2))


def settlement_lamports(program: bytes, jobs: int = 1000, nodes: int = 10) -> dict[str, int]:
    """Lamports the chain takes (fees, and rent locked in new accounts) to settle ``jobs``
    receipts earned by ``nodes`` nodes in one anchor and one payout round: today's design
    (a Memo anchor, one SPL transfer per node) against the program's (an anchored root,
    one funded epoch, one claim per node). Both on LiteSVM, each payer's balance before
    and after."""
    import os

    from chain import spl
    from protocol import merkle

    def spent(chain: Chain, payers: list[Keypair], run: object) -> int:
        before = sum(chain.svm.get_balance(p.pubkey()) or 0 for p in payers)
        run()  # type: ignore[operator]
        return before - sum(chain.svm.get_balance(p.pubkey()) or 0 for p in payers)

    receipts = [os.urandom(32).hex() for _ in range(jobs)]
    root = bytes.fromhex(merkle.merkle_root(receipts))

    memo_chain = Chain(program)
    source = memo_chain.token_account(memo_chain.mint, memo_chain.authority.pubkey())
    memo_chain.ok(memo_chain.send([spl.mint_to_checked(
        memo_chain.mint, source, memo_chain.authority.pubkey(), 10**9, 6)],
        memo_chain.authority))
    node_accounts = [memo_chain.ata(Keypair().pubkey()) for _ in range(nodes)]

    def memo_design() -> None:
        memo_chain.ok(memo_chain.send([spl.memo(f"aidp:anchor:{root.hex()}:{jobs}",
                                                [memo_chain.authority.pubkey()])],
                                      memo_chain.authority))
        for account in node_accounts:
            memo_chain.ok(memo_chain.send([spl.transfer_unchecked(
                source, account, memo_chain.authority.pubkey(), 1_000)], memo_chain.authority))

    today = spent(memo_chain, [memo_chain.authority], memo_design)

    epoch = Epoch(Chain(program), [1_000] * nodes)

    def program_design() -> None:
        epoch.chain.ok(epoch.chain.anchor(root, leaves=jobs))
        epoch.chain.ok(epoch.post())
        for index in range(nodes):
            epoch.chain.ok(epoch.claim(index))

    # the claims' fees fall on whoever submits them (Epoch.claim funds a new payer each)
    with_program = spent(epoch.chain, [epoch.chain.authority], program_design)
    claims = nodes * 5_000
    rent = epoch.chain.svm.minimum_balance_for_rent_exemption
    locked = rent(57) + rent(70 + (nodes + 7) // 8) + rent(165)  # anchor, payouts, vault
    # once every leaf is paid the epoch closes: its two accounts' rent comes back
    closing = spent(epoch.chain, [epoch.chain.authority], lambda: epoch.chain.ok(epoch.close()))
    return {"memo_and_transfers": today, "program_market_side": with_program,
            "program_rent_locked": locked, "program_claims": claims,
            "program_total": with_program + claims,
            "program_vs_memo": round((with_program + claims) / today, 2),
            "program_fees_only_vs_memo": round((with_program + claims - locked) / today, 2),
            "close_epoch_returns": -closing,
            "program_total_after_close": with_program + claims + closing,
            "program_after_close_vs_memo": round((with_program + claims + closing) / today, 2),
            "rent_still_locked_after_close": rent(57)}


def _case(chain: Chain, leaves: int, quorum: int = 3, verifiers: int = 5) -> Case:
    return Case(Staking(chain, quorum=quorum, verifiers=verifiers), leaves=leaves,
                index=leaves - 1)


if __name__ == "__main__":
    main()
