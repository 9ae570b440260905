"""The docs stay true: docs/cli.md is what docs/gen_cli.py generates from the Click commands,
docs/troubleshooting.md lists every error message polytool raises (and nothing it no longer raises),
the inspect example is the command's real output, the CI gate script runs on the fixtures, and
docs/compatibility.md lists every matrix case and renders the committed sweep results."""
from __future__ import annotations

import ast
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from polytool.cli import main

ROOT = Path(__file__).resolve().parent.parent
TROUBLESHOOTING = ROOT / "docs" / "troubleshooting.md"
BASE_ERRORS = {"PolytoolError", "VerificationError"}
MIN_CHUNK = 12  # literal characters enough to identify a message


def test_cli_reference_is_up_to_date():
    spec = importlib.util.spec_from_file_location("gen_cli", ROOT / "docs" / "gen_cli.py")
    gen_cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen_cli)
    text = gen_cli.render()
    assert "## `polytool collapse`" in text and "`--max-shard-size`" in text
    assert (ROOT / "docs" / "cli.md").read_text(encoding="utf-8") == text, "docs/cli.md is out of date: run python docs/gen_cli.py"


def _template(node: ast.expr) -> str:
    """A message expression as text, each computed part as <...>."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "<>" for v in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _template(node.left) + _template(node.right)
    return "<>"


def raised_messages() -> dict[str, str]:
    """{template: 'file:line'} of every error polytool constructs: PolytoolError and its subclasses
    (found in the sources), VerificationError, and SafetensorsFile's `self._error(...)`."""
    trees = {f: ast.parse(f.read_text()) for f in sorted((ROOT / "polytool").rglob("*.py"))}
    errors = set(BASE_ERRORS) | {"_error"}
    grew = True
    while grew:  # subclasses of subclasses
        found = {n.name for t in trees.values() for n in ast.walk(t) if isinstance(n, ast.ClassDef)
                 and any(ast.unparse(b).split(".")[-1] in errors for b in n.bases)}
        grew = not found <= errors
        errors |= found
    messages = {}
    for file, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and node.args and ast.unparse(node.func).split(".")[-1] in errors:
                messages[_template(node.args[0])] = f"{file.relative_to(ROOT)}:{node.lineno}"
    return messages


def documented() -> list[str]:
    """The messages in the troubleshooting tables: the first cell's code span of each row."""
    rows = re.findall(r"^\| (`+)(.+?)\1 \|", TROUBLESHOOTING.read_text(encoding="utf-8"), re.M)
    return [message for _, message in rows]


def _pattern(template: str) -> re.Pattern:
    """A message template as a regex: every <placeholder> (source or docs) matches anything."""
    return re.compile(".*".join(re.escape(part) for part in re.split(r"<[^>]*>", template)), re.S)


def _literal(template: str) -> int:
    return len("".join(re.split(r"<[^>]*>", template)).strip())


def test_every_error_message_is_documented():
    docs = documented()
    missing = {where: t for t, where in raised_messages().items()
               if _literal(t) >= MIN_CHUNK and not any(_pattern(t).fullmatch(d) for d in docs)}
    assert not missing, f"add these messages to docs/troubleshooting.md (cause and fix): {missing}"


def test_every_documented_message_is_still_raised():
    sources = [_pattern(t) for t in raised_messages()]
    stale = [d for d in documented() if not any(p.fullmatch(d) for p in sources)]
    assert not stale, f"docs/troubleshooting.md lists messages polytool no longer raises: {stale}"


def fenced_after(doc: str, marker: str) -> str:
    """The body of the first fenced block in docs/`doc` that contains `marker`."""
    blocks = re.findall(r"^```[a-z]*\n(.*?)^```$", (ROOT / "docs" / doc).read_text(encoding="utf-8"), re.M | re.S)
    return next(b for b in blocks if marker in b)


def test_inspect_example_is_the_real_output(monkeypatch):
    monkeypatch.chdir(ROOT)  # the example shows the relative path
    command, _, shown = fenced_after("inspect.md", "$ polytool inspect fixtures/mhr").partition("\n")
    res = CliRunner().invoke(main, ["inspect", "fixtures/mhr"])
    assert command == "$ polytool inspect fixtures/mhr" and res.exit_code == 0 and shown == res.stdout
    other = CliRunner().invoke(main, ["inspect", "fixtures/poly"]).stdout
    assert other.splitlines()[1:] != shown.splitlines()[1:]  # another adapter's report differs: the check can fail


def test_ci_gate_script_runs_on_the_fixtures(tmp_path):
    script = fenced_after("ci.md", "#!/usr/bin/env bash").replace("out/", f"{tmp_path}/out/")
    script = script.replace("> verify.json", f"> {tmp_path}/verify.json")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert '"passed": true' in (tmp_path / "verify.json").read_text()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["dense-3", "loras"]


def test_compatibility_page_lists_the_matrix_and_the_sweep():
    """Every case of tests/matrix.py has a row; the sweep's section is what docs/gen_compat.py --sweep-only
    renders from benchmarks/sweep_results.json (rerun it after a sweep)."""
    import json

    from matrix import CASES

    sys.path.insert(0, str(ROOT / "docs"))
    from compat_sweep import render_sweep

    page = (ROOT / "docs" / "compatibility.md").read_text(encoding="utf-8")
    assert all(f"| `{name}` |" in page for name in CASES)
    results = json.loads((ROOT / "benchmarks" / "sweep_results.json").read_text(encoding="utf-8"))
    assert render_sweep(results) in page, "docs/compatibility.md: rerun python docs/gen_compat.py --sweep-only"
