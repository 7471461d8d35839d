"""Build the on-chain programs: discriminators from each IDL, clang-19 to BPF, our linker.

    python programs/build.py [--out build/programs]

For each ``programs/<name>/`` with an ``idl.json`` and ``<name>.c``: writes
``discriminators.h`` (Anchor's: sha256("global:<snake name>")[:8] per instruction,
sha256("account:<Name>")[:8] per account) into the build folder, compiles with Debian's
clang-19 for SBPF v0 (``-mcpu=v2``, never ALU32: ``../shared/ONCHAIN.md``) and links with
``programs/link.py`` into ``<out>/<name>.so``. About a second a program.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

from programs.link import LinkError, link  # noqa: E402

CLANG_FLAGS = ["-target", "bpf", "-mcpu=v2", "-O2", "-ffreestanding", "-fno-builtin",
               "-nostdlib", "-mllvm", "-bpf-stack-size=4096", "-Wall", "-Werror",
               "-Wno-unused-function"]


def snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def discriminator(namespace: str, name: str) -> bytes:
    return hashlib.sha256(f"{namespace}:{name}".encode()).digest()[:8]


def discriminators_header(idl: dict) -> str:
    lines = ["/* written by programs/build.py from idl.json: do not edit */", "#pragma once"]

    def constant(macro: str, value: bytes) -> None:
        body = ", ".join(str(b) for b in value)
        lines.append(f"static const uint8_t {macro}[8] = {{{body}}};")

    for ix in idl["instructions"]:
        constant(f"DISC_{snake(ix['name']).upper()}", discriminator("global", snake(ix["name"])))
    for account in idl.get("accounts", []):
        constant(f"DISC_ACCOUNT_{snake(account['name']).upper()}",
                 discriminator("account", account["name"]))
    return "\n".join(lines) + "\n"


def clang() -> str:
    for name in ("clang-19", "clang"):
        if shutil.which(name):
            return name
    raise SystemExit("clang-19 is not installed (the Makefile installs it: make programs)")


def build(name: str, out: Path) -> Path:
    source = ROOT / name
    idl = json.loads((source / "idl.json").read_text())
    work = out / name
    work.mkdir(parents=True, exist_ok=True)
    (work / "discriminators.h").write_text(discriminators_header(idl))
    obj = work / f"{name}.o"
    subprocess.run([clang(), *CLANG_FLAGS, "-I", str(ROOT / "include"), "-I", str(work),
                    "-c", str(source / f"{name}.c"), "-o", str(obj)], check=True)
    program = out / f"{name}.so"
    link([obj], program)
    return program


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT.parent / "build" / "programs")
    args = parser.parse_args(argv)
    names = sorted(p.name for p in ROOT.iterdir() if (p / "idl.json").is_file())
    try:
        for name in names:
            print(f"built {build(name, args.out)}")
    except (LinkError, subprocess.CalledProcessError) as exc:
        print(f"build failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
