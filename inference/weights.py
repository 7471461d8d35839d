"""The weights-file hash a node reports and a market lists.

sha256 of a multi-GB file is slow, so it is computed once and cached by (path, mtime,
size) in a small JSON file.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

from protocol.canonical import sha256_hex

DEFAULT_CACHE_DIR = Path("~/.cache/aidp")
_CACHE_LOCK = threading.Lock()


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def weights_sha256(
    path: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None
) -> str:
    """sha256 of a weights file (or of a directory's weight files), cached by path+mtime+size.

    The cache lives in ``cache_dir``, else ``$AIDP_NODE_CACHE_DIR``, else ``~/.cache/aidp``.

    For a directory (a Hugging Face checkout) the digest covers each ``*.safetensors``,
    ``*.bin`` and ``*.gguf`` file's name and sha256, in name order.
    """
    target = Path(path).expanduser().resolve()
    cache_root = cache_dir or os.environ.get("AIDP_NODE_CACHE_DIR") or DEFAULT_CACHE_DIR
    cache_file = Path(cache_root).expanduser() / "weights-sha256.json"
    if target.is_dir():
        files = sorted(
            p
            for p in target.iterdir()
            if p.suffix in {".safetensors", ".bin", ".gguf"} and p.is_file()
        )
        parts = [{"name": p.name, "sha256": weights_sha256(p, cache_dir)} for p in files]
        return sha256_hex(json.dumps(parts, sort_keys=True))
    stat = target.stat()
    key = f"{target}|{stat.st_mtime_ns}|{stat.st_size}"
    with _CACHE_LOCK:
        try:
            cache: dict[str, str] = json.loads(cache_file.read_text())
        except (OSError, ValueError):
            cache = {}
        if key in cache:
            return cache[key]
    digest = _hash_file(target)
    with _CACHE_LOCK:
        try:
            cache = json.loads(cache_file.read_text())
        except (OSError, ValueError):
            cache = {}
        # Drop stale entries of the same path (the file changed).
        cache = {k: v for k, v in cache.items() if not k.startswith(f"{target}|")}
        cache[key] = digest
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=0, sort_keys=True))
        tmp.replace(cache_file)
    return digest
