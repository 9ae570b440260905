"""`polytool adapt`: a new task learned from a few examples (its routing only, by default); imports torch
and transformers when it runs."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from .options import out_option, writes_output
from .render import result


class _Progress:
    """One line on stderr, rewritten in place, when stderr is a terminal: step, loss, examples/s."""

    def __init__(self) -> None:
        self.shown = False

    def __call__(self, state: dict) -> None:
        click.echo(f"\rstep {state['step']}/{state['steps']}  loss {state['loss']:.4f}  "
                   f"{state['examples_per_s']:.1f} examples/s", err=True, nl=False)
        self.shown = True

    def end(self) -> None:
        if self.shown:
            click.echo("", err=True)


@click.command(short_help="Learn a new task from a few examples (its routing only, MHR-z).")
@click.argument("adapter_dir", type=click.Path(path_type=Path))
@click.option("--base", "base_dir", type=click.Path(path_type=Path),
              help="Base model directory with its tokenizer (default: the adapter's base_model_name_or_path).")
@click.option("--data", "data", required=True, type=click.Path(path_type=Path),
              help="JSONL examples: {\"text\": ...} per line, or {\"input\": ..., \"target\": ...} (loss on the "
                   "target only; docs/adapt.md).")
@out_option
@click.option("--train", "train", type=click.Choice(["routing", "all"]), default="routing", show_default=True,
              help="routing: only the new task's routing logits; all: the skills too (the other tasks change).")
@click.option("--steps", type=int, default=100, show_default=True, help="Optimizer steps.")
@click.option("--lr", type=float, default=0.05, show_default=True, help="AdamW learning rate.")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Examples per step.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the shuffles, the split and the "
                                                                    "routing draws (same seed, same output).")
@click.option("--init", "init", default="uniform", show_default=True,
              help="The new task's starting routing: uniform (MHR-mu), mean (of the tasks' logits) or a task id.")
@click.option("--eval-split", type=float, default=0.2, show_default=True,
              help="Share of the examples held out to measure the loss before and after (0: none).")
@writes_output("polytool.adapt.command:AdaptOptions")
def adapt(options, as_json: bool) -> None:
    """Append a task to ADAPTER_DIR learned from --data, and write the result to --out.

    Only the new task's routing logits train by default (a few hundred numbers): every other tensor of
    the output is the input's, byte for byte. The JSON keys are documented in docs/adapt.md.
    """
    from ..adapt.command import adapt as run_adapt

    bar = _Progress() if sys.stderr.isatty() and not as_json else None
    try:
        data = run_adapt(options, progress=bar)
    finally:
        if bar is not None:
            bar.end()
    result(data, as_json, _render_adapt)


def _render_adapt(data: dict) -> str:
    trained = "its routing" if data["train"] == "routing" else "its routing and every skill"
    lines = [f"wrote {data['out']}: task {data['task']} added ({data['n_tasks']} tasks), {trained} trained for "
             f"{data['steps']} steps on {data['examples']['train']} examples",
             f"  {data['trainable_parameters']:,d} parameters trained, {data['examples_per_s']:.1f} examples/s"]
    loss = data["eval_loss"]
    lines.insert(1, "  no held-out loss (--eval-split 0)" if loss["before"] is None else
                 f"  held-out loss ({data['examples']['eval']} examples): {loss['before']:.4f} before, "
                 f"{loss['after']:.4f} after")
    if data["changed_tasks"]:
        lines.append(f"  note: tasks {', '.join(map(str, data['changed_tasks']))} changed too (--train all trains "
                     "the skills they share)")
    return "\n".join(lines)
