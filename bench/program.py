"""Compute units the ``aidp_market`` program spends per instruction, on LiteSVM.

Builds the program from source (clang-19 + programs/link.py), runs each instruction's
success path once (slash: a 3-of-5 and a 4-of-8 verdict; open_case: inclusion proofs of
depth 3 and 19), and prints one JSON object: compute units per instruction against the
targets (slash with 3-of-5 verifiers <= 60,000; a claim <= 15,000).

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
    print(json.dumps({"compute_units": measured,
                      "targets": {"slash_3_of_5": 60_000, "claim": 15_000},
                      "slash_3_of_5_vs_target": round(measured["slash_3_of_5"] / 60_000, 3),
                      "claim_vs_target": round(measured["claim_of_1000"] / 15_000, 3)},
                     indent=2))


def _case(chain: Chain, leaves: int, quorum: int = 3, verifiers: int = 5) -> Case:
    return Case(Staking(chain, quorum=quorum, verifiers=verifiers), leaves=leaves,
                index=leaves - 1)


if __name__ == "__main__":
    main()
