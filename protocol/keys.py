"""Solana ed25519 keys: keypair files and domain-separated signatures.

Nodes sign with the same keypair that holds their Solana identity, so every
signature carries a domain prefix: a signature made for the node link can never be
replayed as a receipt signature or as a Solana transaction signature.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from solders.keypair import Keypair
from solders.pubkey import Pubkey
from solders.signature import Signature

LINK_AUTH_DOMAIN = b"AIDP/node-link/auth/v1\x00"
RECEIPT_DOMAIN = b"AIDP/receipt/v1\x00"
#: a verifier's verdict that a receipt is fraud, naming the slash it asks for (checked on
#: chain by programs/aidp_market: chain/aidp/program.py builds the message)
VERDICT_DOMAIN = b"AIDP/verdict/v1\x00"
#: verifiers' acquittal of a receipt a case was opened on (padded to 16 bytes as the rest)
ACQUIT_DOMAIN = b"AIDP/acquit/v1\x00\x00"
#: a wallet owner naming the market account its SPL approval funds
ALLOWANCE_DOMAIN = b"AIDP/allowance-register/v1\x00"

DEFAULT_KEYPAIR_PATH = Path("~/.config/solana/id.json")
DEFAULT_PORTS = ("80", "443")


def canonical_host(host: str) -> str:
    """``host[:port]`` as both link ends name it: lower case, default port dropped."""
    host = host.strip().lower()
    name, sep, port = host.rpartition(":")
    return name if sep and port in DEFAULT_PORTS else host


def link_auth_message(market_host: str, nonce: bytes) -> bytes:
    """What a node signs on the node link: the market host it dialed, then the nonce.

    Naming the host stops a malicious market from relaying another market's challenge
    to a node and logging in there as that node: the node signs the host it dialed,
    the real market checks against the ``Host`` its connection arrived on.
    """
    return canonical_host(market_host).encode() + b"\x00" + nonce


def allowance_message(market_id: str, account_id: str, wallet: str, signed_at: int) -> bytes:
    """What a wallet owner signs to fund ``account_id`` at ``market_id`` from its approval.

    Naming the market and the account stops the signature being replayed for another
    account or at another market; ``signed_at`` (unix seconds) must be recent and newer
    than the account's last registration, so an old one is never accepted again.
    """
    from protocol.canonical import canonical_json

    return canonical_json({"market": canonical_host(market_id), "account": account_id,
                           "wallet": wallet, "signed_at": int(signed_at)})


def load_keypair(path: str | os.PathLike[str]) -> Keypair:
    """Read a keypair file in solana-keygen's format (JSON array of 64 bytes)."""
    raw = json.loads(Path(path).expanduser().read_text())
    if not isinstance(raw, list) or len(raw) != 64:
        raise ValueError(f"{path}: not a Solana keypair file (expected a JSON array of 64 bytes)")
    return Keypair.from_bytes(bytes(raw))


def save_keypair(keypair: Keypair, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Write ``keypair`` in solana-keygen's format, readable by the owner only."""
    target = Path(path).expanduser()
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; refusing to overwrite a keypair")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(json.dumps(list(bytes(keypair))))
    return target


def sign(keypair: Keypair, domain: bytes, message: bytes) -> str:
    """Sign ``domain + message``; returns the base58 signature."""
    return str(keypair.sign_message(domain + message))


def verify(pubkey_b58: str, domain: bytes, message: bytes, signature_b58: str) -> bool:
    """True when ``signature_b58`` is ``pubkey_b58``'s signature of ``domain + message``.

    Malformed keys or signatures are simply invalid: callers get a bool, never an
    exception, because the input comes from untrusted peers.
    """
    try:
        pubkey = Pubkey.from_string(pubkey_b58)
        signature = Signature.from_string(signature_b58)
    except (ValueError, TypeError):
        return False
    return signature.verify(pubkey, domain + message)
