"""`polytool verify`: the CI gate (exit 1 on a mismatch); imports torch and transformers when it runs."""
from __future__ import annotations

from pathlib import Path

import click

from ..errors import VerificationError
from .options import json_option, packed, revision_option
from .render import handle_errors, progress, result


@click.command(short_help="Prove artifacts compute what the routed model computes (CI gate).")
@click.argument("adapter_dir", type=click.Path(path_type=Path))
@revision_option
@click.option("--base", "base_dir", type=click.Path(path_type=Path),
              help="Base model directory, or a hub id org/name[@REV] (default: the adapter's base_model_name_or_path at its "
                   "recorded revision: local, cached or downloaded).")
@click.option("--against", "against", multiple=True, type=click.Path(path_type=Path),
              help="An artifact polytool wrote, to check: a LoRA, a dense model, a `--task all` folder, a merge (its "
                   "recipe recomputed), a GGUF file or folder (with --gguf-base); repeatable, kinds mixed. Without it: "
                   "a self-check of the in-memory collapse.")
@click.option("--task", help="Task id, uniform or mean: the only task to self-check, or the task of artifacts "
                             "without provenance (overrides the recorded one).")
@click.option("--atol", type=float, help="Absolute tolerance (default: by the dtype the artifact stores, docs/ci.md).")
@click.option("--rtol", type=float, help="Tolerance relative to each output's scale max|b| (default: by that dtype).")
@click.option("--inputs", "n_inputs", type=int, default=4, show_default=True,
              help="Number of random inputs (sequences, images, audio clips).")
@click.option("--seq-len", type=int, help="Random sequence length (default 32): token ids, decoder ids, audio "
                                          "frames (wav2vec2-like); images and Whisper's features have the size "
                                          "their config fixes. With --prompts, truncate to it.")
@click.option("--prompts", type=click.Path(path_type=Path), help="Text file, one prompt per line (base's tokenizer; "
                                                                "models that read token ids).")
@click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default="cpu", show_default=True,
              help="auto: device_map='auto' through accelerate, for bases larger than one device.")
@click.option("--allow-noop", is_flag=True, help="Accept tasks where the adapter does not change the base's output.")
@click.option("--max-kl", type=float, help="Also fail when the KL divergence of an artifact's next-token distribution "
                                           "from the routed one exceeds this at any position (language models).")
@click.option("--reference", type=click.Choice(["polytool", "peft"]), default="polytool", show_default=True,
              help="The routed model trusted: polytool's independent reference, or PEFT's own Poly model (and "
                   "PEFT's loader for LoRA artifacts; needs PEFT).")
@click.option("--max-memory", metavar="SIZE", help="Run in about SIZE (e.g. 1GB) of memory: accelerate keeps what "
                                                 "the process does not already hold of it for the model and offloads "
                                                 "the rest to --offload-dir (needs polytool[auto]).")
@click.option("--offload-dir", type=click.Path(path_type=Path), help="With --max-memory: where the offloaded "
                                                                     "weights go (default: a temporary directory).")
@click.option("--gguf-base", type=click.Path(path_type=Path), metavar="BASE.gguf",
              help="For GGUF artifacts among --against: the base as GGUF; both run in llama.cpp (needs "
                   "llama-cpp-python).")
@json_option
@handle_errors
@packed("polytool.verify.options:VerifyOptions", needs="polytool verify")
def verify(options, as_json: bool, revision: str | None) -> None:
    """Prove collapsed artifacts compute what the live routed Poly model computes.

    Exit 0 when every check passes, 1 when any output differs beyond tolerance (or a task is a
    no-op), 2 for bad input. The report goes to stdout; docs/ci.md documents it.
    """
    from dataclasses import replace

    from ..formats.hub import input_path
    from ..extras import collector_paused

    with collector_paused():  # it imports torch
        from ..verify.every import verify_every  # GGUF artifacts run in llama.cpp, the others in transformers

    options = replace(options, adapter_dir=input_path(options.adapter_dir, revision))  # a hub id: its snapshot

    report, render = verify_every(options, progress=None if as_json else progress)
    result(report, as_json, render)
    if not report["passed"]:
        failed = [c for c in report["checks"] if not c["passed"]]
        first = failed[0]
        if first["kind"] == "gguf":
            raise VerificationError(f"{len(failed)} of {len(report['checks'])} checks failed "
                                    f"(first: task {first['task']}, gguf {first['artifact']})")
        raise VerificationError(f"{len(failed)} of {len(report['checks'])} checks failed "
                                f"(first: task {first['task']}, {first['kind']} {first['artifact']})")
