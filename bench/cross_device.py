"""CPU ↔ GPU honesty: jobs generated on one device judged on the other.

A node on a GPU and a verifier on a CPU (or the reverse) compute the same model with
different kernels; the verifier's tolerances must hold across them. This moves honest
jobs between machines as JSON lines and judges them with the full verifier
(``market.verify.reexec``: text, ids, stop, prompt count, protocol sampler,
fingerprint).

    # on the CPU machine: llama.cpp node, jobs written out
    .venv/bin/python bench/cross_device.py export --jobs 200 --out cpu_jobs.jsonl
    # on the GPU machine: judge them with transformers on cuda, and generate its own
    python bench/cross_device.py judge --jobs-file cpu_jobs.jsonl --engine transformers \\
        --device cuda --generate 200 --out gpu_jobs.jsonl
    # back on the CPU machine: judge the GPU node's jobs with llama.cpp
    .venv/bin/python bench/cross_device.py judge --jobs-file gpu_jobs.jsonl

Each job is judged as if its node had run the verifier's engine, so under the
stricter same-engine fingerprint limit. ``judge`` prints one JSON line per verifier cell (false positives, closest approach to
each tolerance) and, with ``--generate``, the GPU node's generation and scoring time:
scoring over generation is the verifier's cost per job (target ≤ 1/20).
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from honest import Cell  # noqa: E402

from inference.base import Engine  # noqa: E402
from market.settings import MarketSettings  # noqa: E402
from market.verify.engine import run_sync  # noqa: E402
from tests.verification.workload import Generated, generate, honest_jobs, verify  # noqa: E402


def _engine(name: str, device: str, threads: int, dtype: str = "auto") -> Engine:
    if name == "llamacpp":
        from inference.llamacpp import LlamaCppEngine

        return LlamaCppEngine(n_threads=threads)
    from inference.transformers import TransformersEngine

    return TransformersEngine(device=device, dtype=dtype)


def _write(gens: list[Generated], node: str, path: Path) -> None:
    with path.open("w") as out:
        for gen in gens:
            row = asdict(gen)
            row["fingerprint"] = base64.b64encode(gen.fingerprint).decode()
            row["node"] = node
            out.write(json.dumps(row) + "\n")


def _read(path: Path) -> list[tuple[str, Generated]]:
    jobs = []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        node = row.pop("node")
        row["fingerprint"] = base64.b64decode(row["fingerprint"])
        jobs.append((node, Generated(**row)))
    return jobs


def export(args: argparse.Namespace) -> None:
    engine = _engine(args.engine, args.device, args.threads)
    run_sync(engine.start())
    gens = [generate(engine, kind, body) for kind, body in honest_jobs(args.jobs, args.seed)]
    _write(gens, f"{args.engine}/{args.device}", args.out)
    print(json.dumps({"exported": len(gens), "node": f"{args.engine}/{args.device}",
                      "out": str(args.out)}))


def judge(args: argparse.Namespace) -> None:
    tol = MarketSettings().verify.tolerances
    verifier = _engine(args.engine, args.device, args.threads, args.dtype)
    run_sync(verifier.start())
    label = f"{args.engine}/{args.device}" + ("" if args.dtype == "auto" else f"/{args.dtype}")
    cells: dict[str, Cell] = {}
    if args.jobs_file:
        for node, gen in _read(args.jobs_file):
            verdict, seconds = verify(verifier, verifier, gen, tol)
            cells.setdefault(node, Cell(node, label)).add(gen, verdict, seconds, False)
    if args.generate:
        # this device as the node: its own jobs, judged here too, then written out
        gens = []
        for kind, body in honest_jobs(args.generate, args.seed + 1):
            gen = generate(verifier, kind, body)
            verdict, seconds = verify(verifier, verifier, gen, tol)
            cells.setdefault(label, Cell(label, label)).add(gen, verdict, seconds, False)
            gens.append(gen)
        if args.out:
            _write(gens, label, args.out)
    for cell in cells.values():
        row = cell.row()
        row["generation_s"] = round(cell.gen_s, 3)
        row["scoring_s"] = round(cell.score_s, 3)
        print(json.dumps(row), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("export", "judge"):
        p = sub.add_parser(name)
        p.add_argument("--engine", choices=["llamacpp", "transformers"], default="llamacpp")
        p.add_argument("--device", default="cpu", help="transformers' device (cpu, cuda)")
        p.add_argument("--threads", type=int, default=2)
        p.add_argument("--seed", type=int, default=31, help="the workload's seed")
        p.add_argument("--dtype", default="auto",
                       help="transformers' dtype (auto: bfloat16 on cuda, float32 on cpu)")
        p.add_argument("--out", type=Path, default=None, help="JSON lines of jobs to write")
    sub.choices["export"].add_argument("--jobs", type=int, default=200)
    sub.choices["judge"].add_argument("--jobs-file", type=Path, default=None)
    sub.choices["judge"].add_argument("--generate", type=int, default=0,
                                      help="also generate this many jobs here, as a node")
    args = parser.parse_args()
    started = time.time()
    export(args) if args.command == "export" else judge(args)
    print(json.dumps({"wall_s": round(time.time() - started, 1)}))


if __name__ == "__main__":
    main()
