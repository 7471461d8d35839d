"""The hand-written instruction encoders agree byte for byte with solana-py's ``spl`` package,
and the account parsers read what the real chain wrote."""

from __future__ import annotations

from solders.keypair import Keypair
from spl.token import instructions as T
from spl.token import models as M
from spl.token.constants import TOKEN_PROGRAM_ID

from chain import spl

K = [Keypair().pubkey() for _ in range(6)]


def _same(ours, theirs):
    assert ours.program_id == theirs.program_id
    assert bytes(ours.data) == bytes(theirs.data)
    assert [(a.pubkey, a.is_signer, a.is_writable) for a in ours.accounts] == [
        (a.pubkey, a.is_signer, a.is_writable) for a in theirs.accounts
    ]


def test_encoders_match_solana_py():
    p = TOKEN_PROGRAM_ID
    # the parameters the three checked instructions below have in common
    checked = {"program_id": p, "source": K[0], "mint": K[1], "owner": K[3], "decimals": 6}
    _same(
        spl.transfer_checked(K[0], K[1], K[2], K[3], 12345, 6),
        T.transfer_checked(M.TransferCheckedParams(**checked, dest=K[2], amount=12345)),
    )
    _same(
        spl.transfer_checked(K[0], K[1], K[2], K[3], 7, 6, [K[4], K[5]]),
        T.transfer_checked(
            M.TransferCheckedParams(**checked, dest=K[2], amount=7, signers=[K[4], K[5]])
        ),
    )
    _same(
        spl.approve_checked(K[0], K[1], K[2], K[3], 99, 6),
        T.approve_checked(M.ApproveCheckedParams(**checked, delegate=K[2], amount=99)),
    )
    _same(spl.revoke(K[0], K[1]), T.revoke(M.RevokeParams(program_id=p, account=K[0], owner=K[1])))
    _same(
        spl.mint_to_checked(K[0], K[1], K[2], 5, 6),
        T.mint_to_checked(
            M.MintToCheckedParams(
                program_id=p, mint=K[0], dest=K[1], mint_authority=K[2], amount=5, decimals=6
            )
        ),
    )
    _same(
        spl.transfer_unchecked(K[0], K[1], K[2], 3),
        T.transfer(M.TransferParams(program_id=p, source=K[0], dest=K[1], owner=K[2], amount=3)),
    )
    _same(
        spl.initialize_mint2(K[0], 6, K[1], K[2]),
        T.initialize_mint2(
            M.InitializeMint2Params(
                program_id=p, mint=K[0], decimals=6, mint_authority=K[1], freeze_authority=K[2]
            )
        ),
    )
    # without a freeze authority we write the canonical short COption (tag 0 only), as the
    # Rust encoder does; solana-py pads 32 zero bytes, which the program ignores
    no_freeze = T.initialize_mint2(
        M.InitializeMint2Params(program_id=p, mint=K[0], decimals=6, mint_authority=K[1])
    )
    assert bytes(no_freeze.data).startswith(bytes(spl.initialize_mint2(K[0], 6, K[1]).data))
    _same(
        spl.initialize_account3(K[0], K[1], K[2]),
        T.initialize_account3(
            M.InitializeAccount3Params(program_id=p, account=K[0], mint=K[1], owner=K[2])
        ),
    )
    _same(
        spl.initialize_multisig2(K[0], K[1:4], 2),
        T.initialize_multisig2(
            M.InitializeMultisig2Params(program_id=p, multisig=K[0], m=2, signers=K[1:4])
        ),
    )
    assert spl.associated_token_address(K[0], K[1]) == T.get_associated_token_address(K[0], K[1])
    _same(
        spl.create_ata_idempotent(K[0], K[1], K[2]),
        T.create_idempotent_associated_token_account(K[0], K[1], K[2]),
    )


def test_seeds_fit_and_memo_limits():
    seed = spl.short_seed("ms", K[0], K[1])
    assert len(seed) == 32 and seed == spl.short_seed("ms", K[0], K[1]) != spl.short_seed(
        "ms", K[1], K[0]
    )
    assert spl.memo("x" * 566).data == b"x" * 566
    try:
        spl.memo("x" * 567)
    except ValueError:
        pass
    else:
        raise AssertionError("oversized memo accepted")


def test_transactions_are_deterministic_and_name_missing_signers():
    from solders.hash import Hash

    from chain.ledger.base import build_transaction

    payer, member, outsider = Keypair(), Keypair(), Keypair()
    bh = Hash.new_unique()
    ixs = [spl.transfer_checked(K[0], K[1], K[2], K[3], 1, 6, [payer.pubkey(), member.pubkey()])]
    a = build_transaction(ixs, payer, [member, outsider], bh)  # extra keys are ignored
    b = build_transaction(ixs, payer, [outsider, member], bh)
    assert bytes(a) == bytes(b) and len(a.signatures) == 2
    try:
        build_transaction(ixs, payer, [outsider], bh)
    except ValueError as exc:
        assert str(member.pubkey()) in str(exc)
    else:
        raise AssertionError("a transaction without a required signature was built")


def test_token_balances_of_lookup_table_accounts_parse() -> None:
    """getTransaction of a v0 transaction: indexes past the static keys name accounts
    loaded from lookup tables; a deposit scanner must read them, not crash."""
    import base64

    from solders.hash import Hash
    from solders.keypair import Keypair

    from chain.ledger.base import build_transaction, tx_info_from_json

    payer, loaded = Keypair(), Keypair().pubkey()
    tx = build_transaction([spl.memo("x", [payer.pubkey()])], payer, [], Hash.default())
    static = len(tx.message.account_keys)
    mint = str(Keypair().pubkey())

    def entry(amount: int) -> dict:
        return {"accountIndex": static, "mint": mint, "owner": str(payer.pubkey()),
                "uiTokenAmount": {"amount": str(amount), "decimals": 6}}

    info = tx_info_from_json(str(tx.signatures[0]), {
        "slot": 5,
        "transaction": [base64.b64encode(bytes(tx)).decode(), "base64"],
        "meta": {"err": None, "fee": 5000, "preTokenBalances": [entry(1)],
                 "postTokenBalances": [entry(9)],
                 "loadedAddresses": {"writable": [str(loaded)], "readonly": []}},
    })
    assert info.account_keys[static] == str(loaded)
    assert info.token_delta(loaded) == 8 and info.memos == ["x"]
