"""Run every `polytool` command that README.md and docs/*.md show on the shipped fixtures, and record what
each prints (stdout, stderr, exit code): the proof that a refactor left the CLI's behaviour byte-identical.

    python docs/cli_snapshot.py --write before.json     # on the old code
    python docs/cli_snapshot.py --check before.json     # on the new code: exit 1 and a diff where they differ

Commands are taken from fenced code blocks (a line starting with `polytool `, or a part of an `&&` chain),
in document order, README first; a command with a placeholder (ADAPTER, BASE_DIR, $var, [options]) or a
shell redirection is skipped. Each runs in the repository root with outputs under out/ (removed first), so
the paths they print are the same from run to run (the
repository's own absolute path is shown as <ROOT>). `--help` of every command is recorded too.
"""
from __future__ import annotations

import argparse
import difflib
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PLACEHOLDER = re.compile(r"\$|\[|[<>|]|\b[A-Z][A-Z_]{2,}\b(?!\.gguf)")
COMMANDS = ("inspect", "collapse", "merge", "verify", "check")


def commands() -> list[str]:
    """Every runnable polytool command of the docs, in order, each once."""
    found: list[str] = []
    for doc in DOCS:
        fenced = False
        for line in doc.read_text(encoding="utf-8").splitlines():
            if line.lstrip().startswith("```"):
                fenced = not fenced
                continue
            if not fenced:
                continue
            for part in line.split("&&"):
                part = part.split("  #")[0].strip().removeprefix("$ ")
                if part.startswith("polytool ") and "   " not in part \
                        and not PLACEHOLDER.search(part.removeprefix("polytool ")):
                    found.append(part)
    found += ["polytool --help"] + [f"polytool {c} --help" for c in COMMANDS]
    return list(dict.fromkeys(found))


def run(command: str) -> dict:
    exe = Path(sys.executable).parent / "polytool"
    proc = subprocess.run([str(exe), *shlex.split(command)[1:]], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    here = str(ROOT)  # absolute paths (serving manifests) read the same from any checkout
    return {"command": command, "exit_code": proc.returncode, "stdout": proc.stdout.replace(here, "<ROOT>"),
            "stderr": proc.stderr.replace(here, "<ROOT>")}


def snapshot() -> list[dict]:
    shutil.rmtree(ROOT / "out", ignore_errors=True)
    return [run(c) for c in commands()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", type=Path, help="record the outputs into this JSON file")
    mode.add_argument("--check", type=Path, help="compare the outputs with this recorded JSON file")
    args = parser.parse_args()
    now = snapshot()
    if args.write:
        args.write.write_text(json.dumps(now, indent=1) + "\n", encoding="utf-8")
        print(f"recorded {len(now)} commands in {args.write}")
        return 0
    before = {r["command"]: r for r in json.loads(args.check.read_text(encoding="utf-8"))}
    differ = 0
    for r in now:
        old = before.get(r["command"])
        if old == r:
            continue
        differ += 1
        print(f"DIFFERS: {r['command']}")
        for key in ("exit_code", "stdout", "stderr"):
            if old is None or old[key] != r[key]:
                a = "" if old is None else str(old[key])
                print("".join(difflib.unified_diff(a.splitlines(True), str(r[key]).splitlines(True), key, key)))
    print(f"{len(now) - differ} of {len(now)} commands byte-identical")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
