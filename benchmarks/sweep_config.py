"""A tiny config for any transformers model_type, made generically from the family's own config class.

    tiny_config(model_type) -> a config instance built as CONFIG_MAPPING[model_type](**overrides)

The overrides shrink the size attributes the default config has (hidden size, layers, heads, FFN width,
vocabulary, positions, image and patch size, experts, ...), also inside nested sub-configs (text_config,
vision_config, ...). They are passed to the config's own __init__ so that what it derives (layer_types, head_dim
defaults, rope settings) stays consistent. Nothing is downloaded; no weights are built here.
"""
from __future__ import annotations

HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, FFN, VOCAB, POSITIONS = 64, 2, 4, 2, 16, 64, 256, 128

# attribute -> its small value (applied only where the default is an int larger than the small value)
SMALL_INTS = {
    **dict.fromkeys(("hidden_size", "d_model", "n_embd", "dim", "embed_dim", "word_embed_proj_dim", "d_embed",
                     "embedding_size", "hidden_dim", "projection_dim", "proj_dim", "text_embed_dim",
                     "vision_embed_dim", "emb_dim", "n_embed", "model_dim", "d_hidden"), HIDDEN),
    **dict.fromkeys(LAYER_KEYS := ("num_hidden_layers", "n_layer", "num_layers", "encoder_layers", "decoder_layers",
                     "num_decoder_layers", "n_layers", "num_encoder_layers", "depth", "decoder_num_layers",
                     "num_text_layers", "num_vision_layers", "vision_layers", "text_layers",
                     "encoder_num_layers", "num_attention_layers"), LAYERS),
    **dict.fromkeys(("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads",
                     "decoder_attention_heads", "n_heads", "decoder_num_attention_heads",
                     "encoder_num_attention_heads", "num_attention_heads_per_layer"), HEADS),
    **dict.fromkeys(("num_key_value_heads", "num_kv_heads", "multi_query_group_num", "n_kv_heads",
                     "num_query_groups", "n_head_kv", "num_kv_attention_heads"), KV_HEADS),
    **dict.fromkeys(("head_dim", "d_kv", "kv_channels", "attention_head_size", "attention_head_dim",
                     "v_head_dim", "qk_head_dim"), HEAD_DIM),
    **dict.fromkeys(("intermediate_size", "d_ff", "ffn_dim", "encoder_ffn_dim", "decoder_ffn_dim", "n_inner",
                     "ffn_hidden_size", "mlp_dim", "inner_dim", "decoder_intermediate_size", "dff",
                     "feed_forward_hidden_size", "shared_expert_intermediate_size", "linear_units"), FFN),
    **dict.fromkeys(("moe_intermediate_size", "expert_intermediate_size", "intermediate_size_mlp"), 32),
    **dict.fromkeys(("vocab_size", "text_vocab_size"), VOCAB),
    **dict.fromkeys(("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "seq_length",
                     "max_sequence_length", "max_seq_length", "n_positions_max", "max_length"), POSITIONS),
    **dict.fromkeys(("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"), 4),
    **dict.fromkeys(("num_experts_per_tok", "moe_topk", "top_k", "num_selected_experts"), 2),
    "n_shared_experts": 1, "num_shared_experts": 1,
    "kv_lora_rank": 16, "q_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8,
    "image_size": 32, "patch_size": 8, "num_channels": 3, "window_size": 4,
    "num_labels": 3, "conv_dim": 32, "ssm_state_size": 16, "state_size": 16, "time_step_rank": 8,
    "mamba_d_state": 16, "mamba_n_heads": 4, "mamba_head_dim": 16, "linear_num_key_heads": 2,
    "linear_num_value_heads": 4, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
    "rotary_dim": 8, "moe_k": 2, "num_groups": 4, "global_attn_every_n_layers": 2, "sliding_window": 32, "attention_window": 16,
}
# list attributes (convolutional and hierarchical models): each stage made small
# init-only values a trained model has left behind (applied where the default is smaller): a residual branch
# scaled by 1e-5 (SwiftFormer's layer scale at init) hides any adapter on it below the sweep's DIFFERS
TRAINED = {"layer_scale_init_value": 0.1}
SMALL_LISTS = {"depths": 1, "hidden_sizes": 16, "embed_dims": 16, "num_heads": 2, "embedding_sizes": 16}
TOKEN_SUFFIXES = ("_token_id", "_token_index", "_token_ids")


def _small_list(key: str, value) -> list | None:
    if isinstance(value, (list, tuple)) and key in SMALL_LISTS and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        small = SMALL_LISTS[key]
        if key in ("hidden_sizes", "embed_dims", "embedding_sizes"):  # keep the growth between stages
            return [small * 2 ** min(i, 3) for i in range(len(value))]
        return [min(v, small) for v in value]
    return None


def overrides(config, layers: int = LAYERS) -> dict:
    """The keyword arguments that make `config` (a PretrainedConfig) small, sub-configs as nested dicts."""
    from transformers import PretrainedConfig

    values = {k: getattr(config, k) for k in list(config.to_dict()) if hasattr(config, k)}
    old_layers = next((values[k] for k in ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
                       if isinstance(values.get(k), int)), None)
    out: dict = {}
    for key, value in values.items():
        if isinstance(value, PretrainedConfig):
            out[key] = overrides(value, layers)
        elif isinstance(value, bool) or value is None:
            continue
        elif isinstance(value, float) and key in TRAINED and 0 < value < TRAINED[key]:
            out[key] = TRAINED[key]
        elif isinstance(value, int) and key in LAYER_KEYS:
            out[key] = min(value, layers)
        elif isinstance(value, int) and key in SMALL_INTS and value > SMALL_INTS[key]:
            out[key] = SMALL_INTS[key]
        elif isinstance(value, int) and key.endswith(TOKEN_SUFFIXES) and value >= VOCAB:
            out[key] = VOCAB - 1 - sum(map(ord, key)) % 8  # a special id inside the small vocabulary
        elif _small_list(key, value) is not None:
            out[key] = _small_list(key, value)
        elif isinstance(value, list) and old_layers and len(value) == old_layers and old_layers > layers:
            out[key] = value[:layers]  # per-layer settings (layer_types, ...) follow the layer count
    for kv in ("num_key_value_heads", "num_kv_heads", "n_kv_heads"):  # MHA stays MHA (MLA needs it)
        if kv in out and values.get(kv) == values.get("num_attention_heads", values.get("n_head")):
            out[kv] = out.get("num_attention_heads", out.get("n_head", HEADS))
    if "qk_rope_head_dim" in out and "head_dim" in values:  # MLA: rope acts on head_dim = qk_rope_head_dim
        out["head_dim"] = out["qk_rope_head_dim"]
    return out


def tiny_config(model_type: str, pad: bool = False, layers: int = LAYERS):
    """The family's config class built with its defaults made small (ValueError and others propagate).
    pad: give a config without a pad token one (sequence classification pools at the last non-pad token).
    layers: at most this many layers (hybrids place their attention layers by period: 2 may hold none)."""
    from transformers import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    default = cls()
    config = cls(**_as_kwargs(overrides(default, layers), default))
    for part in {id(c): c for c in (config, config.get_text_config())}.values():
        if pad and getattr(part, "pad_token_id", None) is None:
            part.pad_token_id = 0
    config._attn_implementation = "eager"
    return config


def _as_kwargs(small: dict, default) -> dict:
    """Nested overrides as the dicts a config's __init__ takes for its sub-configs (the default's dict updated)."""
    from transformers import PretrainedConfig

    out = {}
    for key, value in small.items():
        sub = getattr(default, key, None)
        if isinstance(sub, PretrainedConfig):
            merged = sub.to_dict()
            merged.update(_as_kwargs(value, sub))
            out[key] = merged
        else:
            out[key] = value
    return out


def special_token_ids(config) -> set[int]:
    """Every special token id the config (and its sub-configs) names, to keep out of random inputs."""
    from transformers import PretrainedConfig

    ids: set[int] = set()
    for key in config.to_dict():
        value = getattr(config, key, None)
        if isinstance(value, PretrainedConfig):
            ids |= special_token_ids(value)
        elif key.endswith(TOKEN_SUFFIXES):
            for v in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(v, int) and not isinstance(v, bool):
                    ids.add(v)
    return ids
