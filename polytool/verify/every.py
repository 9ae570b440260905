"""`verify --against` over any mix of what polytool writes: LoRAs, dense models, `--task all` folders, merges
(verify/__init__.py: the routed model in transformers) and GGUF files or folders (verify/gguf.py: llama.cpp,
with --gguf-base). Each artifact is routed by its contents; one report lists every check and its proof."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

from ..formats.provenance import TASKS_INDEX


def is_gguf(path: Path) -> bool:
    """A GGUF file, or a folder of GGUF files (`collapse --to gguf --task all`: its task index names .gguf files)."""
    from ..formats.jsonfile import parse_json

    if path.suffix == ".gguf" and not path.is_dir():
        return True
    if not path.is_dir() or (path / "adapter_config.json").is_file() or (path / "config.json").is_file():
        return False
    try:
        tasks = parse_json((path / TASKS_INDEX).read_text(encoding="utf-8")).get("tasks")
        return bool(tasks) and all(str(name).endswith(".gguf") for name in tasks.values())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError, AttributeError, TypeError):
        return any(path.glob("*.gguf"))  # unreadable index: whoever reads it says why


def verify_every(o, progress: Callable | None = None) -> tuple[dict, Callable[[dict], str]]:
    """(report, its renderer) for `o` (VerifyOptions): the GGUF report, the transformers report, or both
    combined, where --against mixes GGUF artifacts with the others."""
    from . import render_report, verify
    from .gguf import gguf_report, render_gguf_report

    gguf = [p for p in o.against if is_gguf(Path(p))]
    rest = [p for p in o.against if p not in gguf]
    if not gguf and (o.gguf_base is None or rest):
        return verify(o, progress), render_report
    if not rest:
        return gguf_report(o), render_gguf_report
    main = verify(dataclasses.replace(o, against=tuple(rest), gguf_base=None), progress)
    side = gguf_report(dataclasses.replace(o, against=tuple(gguf), atol=None, rtol=None, prompts=None, device="cpu"))
    checks = main["checks"] + side["checks"]
    n_passed = sum(c["passed"] for c in checks)
    report = {**main, "passed": n_passed == len(checks), "checks": checks,
              "gguf": {k: v for k, v in side.items() if k not in ("checks", "summary", "passed")},
              "summary": {"checks": len(checks), "passed": n_passed, "failed": len(checks) - n_passed}}
    return report, render_every


def render_every(report: dict) -> str:
    """The transformers checks' report, then the GGUF checks' (llama.cpp's rule), then one summary line."""
    from . import render_report
    from .gguf import render_gguf_report

    main = {**report, "checks": [c for c in report["checks"] if c["kind"] != "gguf"]}
    side = {**report["gguf"], "checks": [c for c in report["checks"] if c["kind"] == "gguf"]}
    for part in (main, side):
        n = sum(c["passed"] for c in part["checks"])
        part.update(passed=n == len(part["checks"]),
                    summary={"checks": len(part["checks"]), "passed": n, "failed": len(part["checks"]) - n})
    s = report["summary"]
    return "\n".join([render_report(main), "", render_gguf_report(side), "",
                      f"all: {'PASS' if report['passed'] else 'FAIL'}: {s['passed']} of {s['checks']} checks passed, "
                      f"{s['failed']} failed"])
