"""The inputs every model of a verify run sees, built from the model's own forward signature and config:
seeded random token ids, images, audio features or waveforms, or the user's prompts.

    input_ids          (N, L) uniform in [0, vocab_size) (id_range: else the embedding's rows, hash buckets)   text
    pixel_values       (N, num_channels, H, W), (H, W) = the (vision) config's image_size   vision
    input_features     (N, num_mel_bins, 2 * max_source_positions)                   Whisper (its exact length)
                       (N, L, input_feat_per_channel * input_channels)                Speech2Text-like
    input_values       (N, samples): the raw audio whose conv feature stack gives L frames   wav2vec2-like
    decoder_input_ids  encoder-decoders: the input_ids themselves (text), else (N, L) random ids   seq2seq

What a model reads is its `main_input_name`; a model whose forward takes both input_ids and pixel_values and
no labels (CLIP-like pairs) gets both. Floats are standard normal, drawn from one torch.Generator seeded
with SEED after the ids: the same every run. compare.forward casts them to the model's dtype.
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Callable

from ..errors import CheckpointError, PolytoolError
from .models import resolve_class, why

SEED = 0
ANY_IMAGE_SIZE = 64  # pixels a side, for a vision model whose config names no image_size (a fully convolutional one)
DEFAULT_INPUTS, DEFAULT_SEQ_LEN = 4, 32


IMAGE_TOKEN_KEYS = ("image_token_id", "image_token_index")  # configs whose images enter as tokens of the ids


def image_token(config) -> int | None:
    """The id that marks an image's place in the token ids (LLaVA-like models), None for other models."""
    for key in IMAGE_TOKEN_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def forward_inputs(cls, config=None) -> tuple[str, list[str]]:
    """(the class's name, the tensors verify feeds it, main input first); text models (or no class): input_ids.
    A model whose images enter as image tokens of its ids (LLaVA-like: the config names an image token) gets
    text alone: its image path needs ids and images made for each other, which random ones are not."""
    if cls is None:
        return "the model", ["input_ids"]
    params = inspect.signature(cls.forward).parameters
    names = [getattr(cls, "main_input_name", "input_ids")]
    if "input_ids" in params and config is not None and image_token(config) is not None:
        names = ["input_ids"]
    elif {"input_ids", "pixel_values"} <= set(params) and "labels" not in params:  # CLIP-like: text and image
        names = ["input_ids", "pixel_values"]
    if "decoder_input_ids" in params:
        names.append("decoder_input_ids")
    return cls.__name__, names


def random_inputs(config, n: int, seq_len: int, class_name: str | None = None) -> tuple[list[dict], dict]:
    """One seeded batch of N inputs for the model `class_name` (a transformers class, Auto ones resolved
    for `config`; None: a text model): the same every run."""
    import torch

    name, names = forward_inputs(resolve_class(class_name, config) if class_name else None, config)
    if n < 1 or seq_len < 1:
        raise PolytoolError(f"--inputs {n} --seq-len {seq_len}: need >= 1 each")
    generator = torch.Generator().manual_seed(SEED)
    batch: dict = {}
    for key in names:
        if key == "decoder_input_ids" and "input_ids" in batch:  # T5, BART: the encoder's ids (as before)
            batch[key] = batch["input_ids"]
            continue
        if key not in BUILDERS:
            raise PolytoolError(f"{name} reads {key!r}, which verify cannot make (it makes "
                                f"{', '.join(BUILDERS)}): this model cannot be verified yet")
        batch[key] = BUILDERS[key](config, n, seq_len, generator, name)
    shapes = {key: list(value.shape) for key, value in batch.items()}
    fixed = {"pixel_values"} | ({"input_features"} if hasattr(config, "num_mel_bins") else set())  # config-sized
    return [batch], {"source": "random", "sequences": n, "seq_len": seq_len if set(batch) - fixed else None,
                     "seed": SEED, "tensors": shapes}


def _unsized(name: str, key: str, missing: str) -> PolytoolError:
    return PolytoolError(f"{name} reads {key!r}, and its config has no {missing} to size it: this model cannot be "
                         "verified yet")


def _config_int(config, key: str, name: str, needs: str) -> int:
    value = getattr(config, key, None)
    if not isinstance(value, int) or value < 1:
        raise _unsized(name, needs, key)
    return value


def _token_ids(config, n: int, seq_len: int, generator, name: str, decoder: bool = False):
    import torch

    text = config.get_text_config(decoder=True) if decoder else config.get_text_config()
    vocab = id_range(text, name)
    limit = getattr(config, "max_target_positions", None) if decoder else None
    limit = limit or getattr(text, "max_position_embeddings", None)
    if isinstance(limit, int) and seq_len > limit:
        raise PolytoolError(f"--inputs {n} --seq-len {seq_len}: need >= 1 each and seq-len <= {limit} "
                            "(max_position_embeddings)")
    ids = torch.randint(0, vocab, (n, seq_len), generator=generator)  # (N, L)
    return _fit_ids(ids, config, vocab, name)


def id_range(text, name: str) -> int:
    """How many ids the model reads, [0, n): the config's vocab_size; else the rows of the model's input
    embedding (the class built on the meta device: no memory); else, for a model that hashes its ids into
    embedding tables (CANINE reads Unicode code points), num_hash_buckets: each hash ((id + 1) * prime mod
    buckets, the prime coprime to the bucket count) maps [0, buckets) onto every row of its table."""
    vocab = getattr(text, "vocab_size", None)
    if not isinstance(vocab, int) or vocab < 1:
        vocab = _embedding_rows(text, name)
    if not isinstance(vocab, int) or vocab < 1:
        vocab = getattr(text, "num_hash_buckets", None)
    if not isinstance(vocab, int) or vocab < 1:
        raise PolytoolError("the base config has no vocab_size (nor an input embedding or hash buckets that size "
                            "the ids): pass real text with --prompts")
    return vocab


def _embedding_rows(config, name: str) -> int | None:
    """The row count of the input embedding of the transformers class `name` built for `config` on the meta
    device; None where there is no such class or embedding (CANINE hashes its ids: no one table)."""
    import torch
    import transformers

    cls = getattr(transformers, name, None)
    if cls is None:
        return None
    try:
        with torch.device("meta"):
            embedding = cls(config).get_input_embeddings()
    except Exception:  # noqa: BLE001 - a model that cannot be built from this (sub-)config, or has no embedding
        return None
    rows = getattr(embedding, "num_embeddings", None)
    return rows if isinstance(rows, int) else None


def _fit_ids(ids, config, vocab: int, name: str):
    """Random ids made acceptable where a model reads meaning into one id: no image token (LLaVA-like models
    would look for an image there), and for an encoder-decoder classifier (BART, T5) exactly one <eos>, at the
    end of each row, whose hidden state is the one classified."""
    marker = image_token(config)
    if marker is not None and 0 <= marker < vocab:
        ids[ids == marker] = (marker + 1) % vocab
    eos = getattr(config, "eos_token_id", None)
    if name.endswith("ForSequenceClassification") and getattr(config, "is_encoder_decoder", False) \
            and isinstance(eos, int) and 0 <= eos < vocab:
        ids[ids == eos] = (eos + 1) % vocab
        ids[:, -1] = eos
    return ids


def _pixels(config, n: int, seq_len: int, generator, name: str):
    """(N, C, H, W) standard normal (normalised images); the size from the vision config (CLIP: nested)."""
    import torch

    vision = getattr(config, "vision_config", None) or config
    size = getattr(vision, "image_size", None)
    if size is None and isinstance(getattr(vision, "num_channels", None), int):  # convolutional (CvT, SegFormer):
        size = ANY_IMAGE_SIZE  # no configured size, any size runs
    size = (size, size) if isinstance(size, int) else tuple(size or ())
    if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
        raise _unsized(name, "pixel_values", "image_size")
    channels = getattr(vision, "num_channels", 3)
    return torch.randn((n, channels, *size), generator=generator)  # (N, C, H, W)


def _features(config, n: int, seq_len: int, generator, name: str):
    """Whisper: (N, mel bins, 2 * max_source_positions), the one length its encoder takes (two convs, the second
    of stride 2); Speech2Text-like: (N, L, features)."""
    import torch

    if hasattr(config, "num_mel_bins"):
        mels = _config_int(config, "num_mel_bins", name, "input_features")
        frames = 2 * _config_int(config, "max_source_positions", name, "input_features")
        return torch.randn((n, mels, frames), generator=generator)  # (N, mels, frames)
    per_channel = _config_int(config, "input_feat_per_channel", name, "input_features")
    channels = getattr(config, "input_channels", 1)
    return torch.randn((n, seq_len, per_channel * channels), generator=generator)  # (N, L, features)


def _waveform(config, n: int, seq_len: int, generator, name: str):
    """(N, samples): the shortest raw audio whose conv feature encoder (kernels k_i, strides s_i) gives L frames:
    receptive field 1 + sum (k_i - 1) * prod(s_<i), then prod(s) samples a frame."""
    import torch

    kernels, strides = getattr(config, "conv_kernel", None), getattr(config, "conv_stride", None)
    if not kernels or not strides or len(kernels) != len(strides):
        raise _unsized(name, "input_values", "conv_kernel and conv_stride")
    hop, field = 1, 1
    for kernel, stride in zip(kernels, strides):
        field += (kernel - 1) * hop
        hop *= stride
    return torch.randn((n, field + (seq_len - 1) * hop), generator=generator)  # (N, samples)


def _decoder_ids(config, n: int, seq_len: int, generator, name: str):
    return _token_ids(config, n, seq_len, generator, name, decoder=True)


BUILDERS: dict[str, Callable] = {"input_ids": _token_ids, "pixel_values": _pixels, "input_features": _features,
                                 "input_values": _waveform, "decoder_input_ids": _decoder_ids}


def prompt_inputs(base_dir: Path, file: Path, seq_len: int | None, class_name: str | None = None,
                  config=None) -> tuple[list[dict], dict]:
    """One batch per non-empty line of `file`, tokenised by the base's tokenizer (truncated to seq_len); a model
    that also reads an image (CLIP-like) gets a seeded one per prompt, encoder-decoders the ids as decoder ids."""
    import torch
    from transformers import AutoTokenizer

    name, names = forward_inputs(resolve_class(class_name, config) if class_name else None, config)
    if "input_ids" not in names:
        raise PolytoolError(f"--prompts: {name} reads {names[0]!r}, not token ids: drop --prompts (verify makes "
                            "seeded inputs from the base's config)")
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
    generator = torch.Generator().manual_seed(SEED)
    for batch in batches:
        for key in names[1:]:
            batch[key] = batch["input_ids"] if key == "decoder_input_ids" else \
                BUILDERS[key](config, 1, batch["input_ids"].shape[1], generator, name)
    shapes = {key: [1, None] if key.endswith("input_ids") else list(batches[0][key].shape) for key in names}
    return batches, {"source": "prompts", "file": str(file), "sequences": len(prompts), "seq_len": seq_len,
                     "seed": None if names == ["input_ids"] else SEED, "tensors": shapes}

