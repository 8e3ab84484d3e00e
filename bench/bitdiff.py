"""Compare two `bench/bitcheck.sh` outputs: every metrics.jsonl and comparison.json, value for value.

    python bench/bitdiff.py /tmp/bit_before /tmp/bit_after

Timing and memory keys (tokens_per_s, peak_rss_mb, *_s) are dropped; paths are made relative to each
output folder. Also lists the saved weights whose SHA-256 differ. Exit status 1 if anything differs.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

TIMING_KEYS = ("tokens_per_s", "peak_rss_mb", "wall", "elapsed")


def is_timing(key: str) -> bool:
    return key in TIMING_KEYS or key.endswith("_s")


def clean(value, root: Path):
    """The value with timing keys dropped and the output folder's path replaced by ROOT."""
    if isinstance(value, dict):
        return {k: clean(v, root) for k, v in value.items() if not is_timing(k)}
    if isinstance(value, list):
        return [clean(v, root) for v in value]
    if isinstance(value, str):
        return value.replace(str(root), "ROOT")
    return value


def load(path: Path, root: Path):
    if path.suffix == ".jsonl":
        return clean([json.loads(line) for line in path.read_text().splitlines()], root)
    return clean(json.loads(path.read_text()), root)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> int:
    before, after = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve()
    differing = 0
    names = ("metrics.jsonl", "comparison.json")
    results = sorted(p.relative_to(before) for p in before.rglob("*") if p.name in names)
    for rel in results:
        if not (after / rel).exists():
            print(f"missing after: {rel}")
            differing += 1
            continue
        a, b = load(before / rel, before), load(after / rel, after)
        differing += a != b
        lines = f"  ({len(a)} lines)" if rel.suffix == ".jsonl" else ""
        print(f"{'same' if a == b else 'DIFFERENT'}  {rel}{lines}")
    weights = sorted(p.relative_to(before) for p in before.rglob("*.safetensors"))
    changed = [rel for rel in weights if not (after / rel).exists() or sha256(before / rel) != sha256(after / rel)]
    for rel in changed:
        print(f"DIFFERENT weights  {rel}")
    print(f"{len(results)} result files, {len(weights)} weight files; differing: {differing + len(changed)}")
    return 1 if differing or changed else 0


if __name__ == "__main__":
    raise SystemExit(main())
