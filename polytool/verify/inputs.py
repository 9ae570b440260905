"""The inputs every model of a verify run sees: seeded random token ids, or the user's prompts."""
from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError, PolytoolError
from .models import why

SEED = 0
DEFAULT_INPUTS, DEFAULT_SEQ_LEN = 4, 32


def random_inputs(config, n: int, seq_len: int) -> tuple[list[dict], dict]:
    """One batch of N x L token ids, seeded (SEED), uniform in [0, vocab_size): the same every run."""
    import torch

    text = config.get_text_config()
    vocab, limit = getattr(text, "vocab_size", None), getattr(text, "max_position_embeddings", None)
    if not isinstance(vocab, int) or vocab < 1:
        raise PolytoolError("the base config has no vocab_size: pass real text with --prompts")
    if n < 1 or seq_len < 1 or (isinstance(limit, int) and seq_len > limit):
        raise PolytoolError(f"--inputs {n} --seq-len {seq_len}: need >= 1 each and seq-len <= {limit} "
                            "(max_position_embeddings)")
    ids = torch.randint(0, vocab, (n, seq_len), generator=torch.Generator().manual_seed(SEED))  # (N, L)
    return [{"input_ids": ids}], {"source": "random", "sequences": n, "seq_len": seq_len, "seed": SEED}


def prompt_inputs(base_dir: Path, file: Path, seq_len: int | None) -> tuple[list[dict], dict]:
    """One batch per non-empty line of `file`, tokenised by the base's tokenizer (truncated to seq_len)."""
    from transformers import AutoTokenizer

    try:
        prompts = [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise PolytoolError(f"cannot read the prompts file ({exc.__class__.__name__})", file) from None
    if not prompts:
        raise PolytoolError("the prompts file holds no non-empty line", file)
    try:
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
    except Exception as exc:  # no tokenizer files, or unreadable ones
        raise CheckpointError(f"has no usable tokenizer for --prompts ({why(exc)})", base_dir) from None
    trunc = {"truncation": True, "max_length": seq_len} if seq_len else {}
    batches = [{"input_ids": tokenizer(p, return_tensors="pt", **trunc)["input_ids"]} for p in prompts]  # (1, len)
    if any(b["input_ids"].shape[1] == 0 for b in batches):
        raise PolytoolError("a prompt tokenises to no tokens", file)
    return batches, {"source": "prompts", "file": str(file), "sequences": len(prompts), "seq_len": seq_len, "seed": None}
