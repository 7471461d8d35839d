// Neural Cloud explorer: verify a receipt in the browser, trusting only the chain.
//
// The page gives the receipt's canonical bytes, its Merkle path and the anchor's
// transaction signature. This script hashes the bytes itself, walks the path, fetches
// the anchor transaction straight from the ledger's JSON-RPC endpoint, reads the root
// out of its Memo and compares. It also checks the node's ed25519 signature.
"use strict";

const MEMO_PROGRAM = "MemoSq4gqABAXKb96qnH8TysNcWxMyWCqXgDLGmfcHr";
const RECEIPT_DOMAIN = new TextEncoder().encode("AIDP/receipt/v1\0");
const B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz";

const hex = (bytes) => Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
const unhex = (h) => new Uint8Array(h.match(/../g).map((x) => parseInt(x, 16)));

function concat(...parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) { out.set(p, at); at += p.length; }
  return out;
}

async function sha256(bytes) {
  return new Uint8Array(await crypto.subtle.digest("SHA-256", bytes));
}

function base58Decode(text) {
  let n = 0n;
  for (const ch of text) {
    const v = B58.indexOf(ch);
    if (v < 0) throw new Error("bad base58");
    n = n * 58n + BigInt(v);
  }
  const bytes = [];
  while (n > 0n) { bytes.unshift(Number(n % 256n)); n /= 256n; }
  for (const ch of text) { if (ch === "1") bytes.unshift(0); else break; }
  return new Uint8Array(bytes);
}

// Mirrors protocol/merkle.py: leaf = sha256(0x00 || hash), node = sha256(0x01 || l || r).
async function merkleRootFromPath(receiptHashHex, proof) {
  let node = await sha256(concat(new Uint8Array([0]), unhex(receiptHashHex)));
  for (const step of proof) {
    const sibling = unhex(step.sibling);
    const pair = step.side === "left" ? concat(sibling, node) : concat(node, sibling);
    node = await sha256(concat(new Uint8Array([1]), pair));
  }
  return hex(node);
}

async function signatureValid(pubkeyB58, receiptHashHex, signatureB58) {
  try {
    const key = await crypto.subtle.importKey("raw", base58Decode(pubkeyB58), { name: "Ed25519" }, false, ["verify"]);
    return await crypto.subtle.verify({ name: "Ed25519" }, key, base58Decode(signatureB58),
      concat(RECEIPT_DOMAIN, unhex(receiptHashHex)));
  } catch (err) {
    return false;
  }
}

// The anchor's Memo, read from the transaction as the chain stores it.
async function anchoredRoot(rpcUrl, txSignature) {
  const response = await fetch(rpcUrl, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ jsonrpc: "2.0", id: 1, method: "getTransaction",
      params: [txSignature, { encoding: "json", maxSupportedTransactionVersion: 0 }] }),
  });
  const body = await response.json();
  const tx = body.result;
  if (!tx) throw new Error("anchor transaction not found on chain");
  const message = tx.transaction.message;
  for (const ix of message.instructions) {
    if (message.accountKeys[ix.programIdIndex] !== MEMO_PROGRAM) continue;
    const memo = new TextDecoder().decode(base58Decode(ix.data));
    const match = /^aidp:anchor:v1:([0-9a-f]{64}):(\d+)$/.exec(memo);
    if (match) return { root: match[1], slot: tx.slot };
  }
  throw new Error("anchor transaction carries no anchor memo");
}

function report(box, ok, lines) {
  box.className = "verdict " + (ok ? "pass" : "fail");
  box.replaceChildren();
  const head = document.createElement("strong");
  head.textContent = ok ? "PASS — receipt is anchored on chain" : "FAIL — receipt does not match the chain";
  box.append(head);
  const list = document.createElement("ul");
  for (const [good, text] of lines) {
    const item = document.createElement("li");
    item.textContent = (good ? "✓ " : "✗ ") + text;
    list.append(item);
  }
  box.append(list);
}

async function verifyReceipt(button) {
  const box = document.getElementById("verdict");
  box.className = "verdict"; box.textContent = "verifying…";
  try {
    const proof = await (await fetch(button.dataset.proofUrl)).json();
    if (proof.error) throw new Error(proof.error.message);
    const lines = [];
    const computed = hex(await sha256(new TextEncoder().encode(proof.canonical)));
    const hashOk = computed === proof.receipt_hash;
    lines.push([hashOk, `receipt hash recomputed: ${computed.slice(0, 16)}…`]);
    const sigOk = await signatureValid(proof.node_pubkey, computed, proof.signature);
    lines.push([sigOk, "node signature over the receipt hash"]);
    if (!proof.anchor) {
      lines.push([false, "not anchored yet (anchors are written periodically)"]);
      return report(box, false, lines);
    }
    const root = await merkleRootFromPath(computed, proof.proof);
    const onChain = await anchoredRoot(proof.anchor.rpc_url, proof.anchor.tx_signature);
    const rootOk = root === onChain.root;
    lines.push([rootOk, `Merkle path → ${root.slice(0, 16)}…; on-chain root ${onChain.root.slice(0, 16)}… (slot ${onChain.slot})`]);
    report(box, hashOk && sigOk && rootOk, lines);
  } catch (err) {
    report(box, false, [[false, String(err.message || err)]]);
  }
}

function liveRefresh(el) {
  const every = Number(el.dataset.refresh) * 1000;
  setInterval(async () => {
    const html = await (await fetch(location.href, { headers: { "X-Partial": "1" } })).text();
    const doc = new DOMParser().parseFromString(html, "text/html");
    const fresh = doc.getElementById(el.id);
    if (fresh) el.replaceWith(fresh), (el = fresh);
  }, every);
}

document.addEventListener("DOMContentLoaded", () => {
  const button = document.getElementById("verify");
  if (button) button.addEventListener("click", () => verifyReceipt(button));
  document.querySelectorAll("[data-refresh]").forEach(liveRefresh);
});
