"""The examples `polytool adapt` learns from: a JSONL file, read, validated, tokenised and batched.

One JSON object per line (blank lines are skipped; other keys are ignored):

    {"text": "..."}                          causal LM: loss on every token but the first
    {"input": "...", "target": "..."}        seq2seq: encoder input, loss on the target; causal LM:
                                             prompt + target as one sequence, loss on the target only

Every line is checked before any training starts; a bad line is a PolytoolError naming the file and
the line number (1-based, as editors count). Tokenised with the base's own tokenizer.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import PolytoolError

IGNORE = -100  # label of a position without loss (transformers' convention)


@dataclass(frozen=True)
class Example:
    """One validated line: `text` alone (causal LM), or `prompt` and `target`."""

    line: int
    text: str | None = None
    prompt: str | None = None
    target: str | None = None


def _example(obj: Any, line: int, path: Path) -> Example:
    if not isinstance(obj, dict):
        raise PolytoolError(f"line {line}: expected a JSON object such as {{\"text\": \"...\"}}, got "
                            f"{type(obj).__name__}", path)
    if "text" in obj and ("input" in obj or "target" in obj):
        raise PolytoolError(f"line {line}: give either \"text\" or \"input\" and \"target\", not both", path)
    if not ({"text", "input", "target"} & set(obj)):
        found = ", ".join(sorted(obj)[:5]) or "none"
        raise PolytoolError(f"line {line}: expected \"text\", or \"input\" and \"target\" (keys found: {found})",
                            path)
    keys = ("text",) if "text" in obj else ("input", "target")
    for key in keys:
        value = obj.get(key)
        if not isinstance(value, str):
            got = "missing" if key not in obj else f"a {type(value).__name__}"
            raise PolytoolError(f"line {line}: \"{key}\" must be a string ({got}); each line is "
                                "{\"text\": ...} or {\"input\": ..., \"target\": ...}", path)
        if key != "input" and not value:
            raise PolytoolError(f"line {line}: \"{key}\" is empty", path)
    if keys == ("text",):
        return Example(line, text=obj["text"])
    return Example(line, prompt=obj["input"], target=obj["target"])


def read_examples(path: str | Path) -> list[Example]:
    """Every example of the JSONL file `path`, validated; PolytoolError on the first bad line."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise PolytoolError(f"cannot read the data file ({exc.strerror or exc})", path) from None
    examples = []
    for number, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            raise PolytoolError(f"line {number}: not valid UTF-8", path) from None
        except (json.JSONDecodeError, RecursionError) as exc:
            why = exc.msg if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
            raise PolytoolError(f"line {number}: invalid JSON ({why})", path) from None
        examples.append(_example(obj, number, path))
    if not examples:
        raise PolytoolError("no examples: expected one JSON object per line", path)
    return examples


@dataclass(frozen=True)
class Tokenized:
    """One example as token ids: the model's input, and the labels (IGNORE where there is no loss)."""

    input_ids: list[int]
    labels: list[int]
    decoder: bool = False  # seq2seq: labels are the decoder's targets, not aligned with input_ids


def _ids(tokenizer: Any, text: str, special: bool = True) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def tokenize(examples: list[Example], tokenizer: Any, seq2seq: bool, max_length: int | None,
             path: Path) -> list[Tokenized]:
    """Token ids of every example, checked to carry a loss and to fit the model (`max_length`)."""
    out = []
    for ex in examples:
        if seq2seq:
            if ex.text is not None:
                raise PolytoolError(f"line {ex.line}: this base is an encoder-decoder model: each line needs "
                                    "\"input\" and \"target\"", path)
            item = Tokenized(_ids(tokenizer, ex.prompt), _ids(tokenizer, ex.target), decoder=True)
            loss_tokens = len(item.labels)
        elif ex.text is not None:
            ids = _ids(tokenizer, ex.text)
            item = Tokenized(ids, ids)
            loss_tokens = len(ids) - 1  # the first token has nothing before it to predict it from
        else:
            prompt = _ids(tokenizer, ex.prompt) if ex.prompt else []
            target = _ids(tokenizer, ex.target, special=not prompt)
            item = Tokenized(prompt + target, [IGNORE] * len(prompt) + target)
            loss_tokens = len(target) - (0 if prompt else 1)
        if loss_tokens < 1:
            raise PolytoolError(f"line {ex.line}: gives no token to learn from (too short once tokenised)", path)
        longest = max(len(item.input_ids), len(item.labels))
        if max_length is not None and longest > max_length:
            raise PolytoolError(f"line {ex.line}: {longest} tokens, more than the base's limit of {max_length} "
                                "(max_position_embeddings): shorten or split it", path)
        out.append(item)
    return out


def split(items: list, eval_split: float, seed: int) -> tuple[list, list]:
    """(train, held out): a seeded shuffle, then the last round(n * eval_split) items (at least 1 when
    eval_split > 0, a share in [0, 1)) held out; at least one item is left to train on."""
    import torch

    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    n_eval = max(1, round(len(items) * eval_split)) if eval_split > 0 else 0
    if len(items) - n_eval < 1:
        raise PolytoolError(f"{len(items)} example(s) and --eval-split {eval_split:g} leave none to train on: "
                            "add examples or pass --eval-split 0")
    shuffled = [items[i] for i in order]
    return shuffled[: len(items) - n_eval], shuffled[len(items) - n_eval:]


def collate(items: list[Tokenized], pad_id: int) -> dict:
    """A padded batch: input_ids, attention_mask, labels (right padding; IGNORE on padding)."""
    import torch

    width = max(len(i.input_ids) for i in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)  # (b, L)
    mask = torch.zeros((len(items), width), dtype=torch.long)  # (b, L)
    lwidth = max(len(i.labels) for i in items)
    labels = torch.full((len(items), lwidth), IGNORE, dtype=torch.long)  # (b, L) or (b, L_target)
    for row, item in enumerate(items):
        ids[row, : len(item.input_ids)] = torch.tensor(item.input_ids)
        mask[row, : len(item.input_ids)] = 1
        labels[row, : len(item.labels)] = torch.tensor(item.labels)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def loss_tokens(items: list[Tokenized], seq2seq: bool) -> int:
    """How many target tokens `items` score (the weight of a batch's mean loss)."""
    if seq2seq:
        return sum(len(i.labels) for i in items)
    return sum(sum(1 for label in i.labels[1:] if label != IGNORE) for i in items)
