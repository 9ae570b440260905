"""`polytool check`: preflight a LoRA for a serving stack (no torch)."""
from __future__ import annotations

from pathlib import Path

import click

from ..errors import VerificationError
from .options import json_option, revision_option
from .render import handle_errors, result


@click.command(short_help="Preflight a LoRA for vLLM, TGI, llama.cpp or PEFT.")
@click.argument("lora_dir", metavar="LORA", type=click.Path(path_type=Path))
@revision_option
@click.option("--for", "stack", required=True, type=click.Choice(["vllm", "tgi", "llama.cpp", "peft"]),
              help="The serving stack whose rules apply (docs/serving.md cites the versions they were read from).")
@click.option("--base", "base_dir", type=click.Path(path_type=Path),
              help="Base model directory or hub id: match the adapter's module paths against its weights (default: "
                   "the LoRA's base_model_name_or_path when at hand, local or cached); for a GGUF LoRA, BASE.gguf.")
@json_option
@handle_errors
def check(lora_dir: Path, revision: str | None, stack: str, base_dir: Path | None, as_json: bool) -> None:
    """Preflight a PEFT LoRA directory (or hub id), or a GGUF LoRA file for llama.cpp, for a serving stack:
    what it would refuse or silently ignore.

    Exit 0 when ready, 1 when a problem was found, 2 for bad input. No torch is imported.
    """
    from ..check.rules import check as run_check, render
    from ..core.units import plural
    from ..formats.hub import input_path

    if str(lora_dir).endswith(".gguf") and lora_dir.is_file():  # a GGUF LoRA for llama.cpp
        from ..check.gguf import check_gguf

        data = check_gguf(lora_dir, stack, base_dir)
    else:
        data = run_check(input_path(lora_dir, revision, "LoRA directory"), stack, base_dir)
    result(data, as_json, render)
    if not data["ready"]:
        first = next(x for x in data["findings"] if x["status"] == "problem")
        raise VerificationError(f"{plural(data['summary']['problem'], 'problem')} for {stack} (first: {first['rule']})")
