"""Random instruction sequences against the ``aidp_market`` program (hypothesis): honest
operators, an intruder, the market authority, verifiers and the clock act in any order,
with any amounts, and the token invariants hold after every step: no token is made or
lost, the vault always holds exactly the stake, nothing leaves a vault but by its rules,
and whoever holds no right to a vault never gains a token from it (unless the operator
itself withdraws to it)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.programs.test_aidp_market import PERIOD, Case, Chain, Staking

pytestmark = pytest.mark.slow

ACTIONS = st.lists(st.one_of(
    st.tuples(st.just("stake"), st.integers(0, 600), st.sampled_from(["operator", "intruder"])),
    st.tuples(st.just("unbond"), st.integers(0, 600), st.sampled_from(["operator", "intruder"])),
    st.tuples(st.just("withdraw"), st.sampled_from(["operator", "intruder", "authority"]),
              st.sampled_from(["wallet", "intruder"])),
    st.tuples(st.just("later"), st.sampled_from([60, 3600, 86400, PERIOD])),
    st.tuples(st.just("open"), st.sampled_from(["authority", "intruder"])),
    st.tuples(st.just("slash"), st.integers(0, 700), st.integers(0, 700), st.integers(0, 5)),
    st.tuples(st.just("close"), st.sampled_from(["authority", "intruder"])),
), max_size=20)


def _apply(case: Case, intruder: Any, intruder_wallet: Any, action: tuple) -> None:
    staking, chain = case.staking, case.chain
    signer = {"operator": staking.operator, "intruder": intruder,
              "authority": chain.authority}
    kind = action[0]
    if kind == "stake":
        staking.call("stake", signer=signer[action[2]], amount=action[1])
    elif kind == "unbond":
        staking.call("requestUnbond", signer=signer[action[2]], amount=action[1])
    elif kind == "withdraw":
        destination = staking.wallet if action[2] == "wallet" else intruder_wallet
        staking.call("withdraw", signer=signer[action[1]], destination=destination)
    elif kind == "later":
        staking.later(action[1])
    elif kind == "open":
        case.open(signer=signer[action[1]])
    elif kind == "slash":
        amount, refund, quorum = action[1], action[2], action[3]
        case.slash(amount, refund, signers=staking.verifiers[:quorum])
    elif kind == "close":  # an acquittal by a quorum, or none (only valid once expired)
        case.close(signers=staking.verifiers[:3] if action[1] == "authority" else [])


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(actions=ACTIONS)
def test_tokens_are_conserved_and_vaults_move_only_by_their_rules(aidp_program: bytes,
                                                                 actions: list) -> None:
    chain = Chain(aidp_program)
    staking = Staking(chain)
    case = Case(staking)  # registered, 500 staked, a receipt anchored
    intruder = chain.funded()
    intruder_wallet = chain.token_account(chain.mint, intruder.pubkey())
    holders = [staking.wallet, staking.vault, chain.treasury, case.buyer, intruder_wallet]

    def balances() -> list[int]:
        return [staking.tokens(h) for h in holders]

    total = sum(balances())
    slashed_before = 0
    for action in actions:
        before = balances()
        _apply(case, intruder, intruder_wallet, action)
        after = balances()
        state = staking.state()
        assert sum(after) == total, action  # nothing made or lost
        assert after[1] == state["staked"] and state["unbonding"] <= state["staked"]
        # the intruder gains a token only when the operator itself sends it there
        operator_pays_intruder = action == ("withdraw", "operator", "intruder")
        assert after[4] - before[4] == (before[1] - after[1] if operator_pays_intruder
                                        else 0), action
        gained = (after[2] - before[2]) + (after[3] - before[3])  # treasury + buyer
        if gained:  # only a slash pays them, by exactly what it took from the vault
            assert action[0] == "slash" and action[3] >= 3, action
            assert state["slashed"] - slashed_before == gained == before[1] - after[1]
        if after[1] < before[1] and action[0] != "slash":  # a vault debit: a withdrawal
            assert action[0] == "withdraw" and action[1] == "operator", action
            credited = after[0] - before[0] if action[2] == "wallet" else after[4] - before[4]
            assert credited == before[1] - after[1]
        slashed_before = state["slashed"]
