"""In a real browser: find a job in the explorer, verify its receipt against the chain
(pass), tamper with the stored receipt, verify again (fail). Screenshots are kept."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import httpx
import openai
import pytest
from sqlalchemy import select, update

from market.db import make_sync_engine
from market.models import Receipt
from tests.e2e.conftest import Network

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Chromium is not installed"),
]
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def wait_for_anchor(network: Network, receipt_hash: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proof = httpx.get(f"{network.market_url}/explorer/api/receipts/{receipt_hash}/proof",
                          timeout=10).json()
        if proof.get("anchor"):
            return proof
        time.sleep(1)
    raise AssertionError(f"receipt {receipt_hash} was not anchored within {timeout:.0f}s")


def test_verify_receipt_in_browser(network: Network, artifacts_dir: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    sdk = openai.OpenAI(base_url=f"{network.market_url}/v1", api_key=network.api_key, max_retries=0)
    reply = sdk.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "Tell me a fact."}],
        max_tokens=16, temperature=0,
    )
    job_id = reply.id.split("-", 1)[1]
    engine = make_sync_engine(network.database_url)
    with engine.connect() as conn:
        receipt_hash = conn.execute(select(Receipt.receipt_hash).where(Receipt.job_id == job_id)).scalar_one()
    proof = wait_for_anchor(network, receipt_hash)
    assert proof["anchor"]["rpc_url"] == network.ledger_url

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(f"{network.market_url}/explorer")
        page.fill("input[name=q]", job_id)
        page.click("header button[type=submit]")
        expect(page).to_have_url(f"{network.market_url}/explorer/jobs/{job_id}")
        page.click(f"a[href$='/explorer/receipts/{receipt_hash}']")
        page.click("#verify")
        verdict = page.locator("#verdict")
        expect(verdict).to_contain_text("PASS", timeout=30_000)
        page.screenshot(path=str(artifacts_dir / "explorer-verify-pass.png"), full_page=True)

        # Tamper with the stored receipt: the browser must now refuse it.
        with engine.begin() as conn:
            original = conn.execute(select(Receipt.receipt).where(Receipt.receipt_hash == receipt_hash)).scalar_one()
            tampered = {**original, "body": {**original["body"], "output_sha256": "0" * 64}}
            conn.execute(update(Receipt).where(Receipt.receipt_hash == receipt_hash).values(receipt=tampered))
        try:
            page.reload()
            page.click("#verify")
            expect(verdict).to_contain_text("FAIL", timeout=30_000)
            page.screenshot(path=str(artifacts_dir / "explorer-verify-fail.png"), full_page=True)
        finally:
            with engine.begin() as conn:
                conn.execute(update(Receipt).where(Receipt.receipt_hash == receipt_hash).values(receipt=original))
            browser.close()
            engine.dispose()
