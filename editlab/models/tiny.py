"""Tiny random models built from configs in code, for fast tests (no hub, no files).

They share a byte-level tokenizer (256 byte tokens + end-of-text) so that multi-token targets,
leading spaces and non-ASCII prompts are exercised exactly as with a real BPE tokenizer.

There is one builder per family of ``editlab.models.arch``.  Byte-level prompts are 20-60 tokens
long, so the sliding windows here (5 tokens) are shorter than every prompt, and the families with
mixed attention (qwen2/qwen3 with ``max_window_layers``, gemma2, gemma3_text) alternate layer
types, each with its own mask (and, in gemma3_text, its own rotary embedding).
"""
from __future__ import annotations

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTJConfig,
    GPTJForCausalLM,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

EOS = "<|endoftext|>"
VOCAB = 257
N_LAYERS = 4
WIDTH = 64
WINDOW = 5  # sliding-window length of the tiny models that have one


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-character map (what ByteLevel pre-tokenizing emits)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def byte_tokenizer() -> PreTrainedTokenizerFast:
    alphabet = _bytes_to_unicode()
    vocab = {ch: i for i, ch in enumerate(alphabet[b] for b in range(256))}
    vocab[EOS] = 256
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS, unk_token=EOS
    )


def _gpt2() -> PreTrainedModel:
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=256, n_embd=WIDTH, n_layer=N_LAYERS, n_head=4,
                     bos_token_id=256, eos_token_id=256)
    return GPT2LMHeadModel(cfg)


def _decoder(family: str, **extra):
    """A llama-layout decoder (``model.layers.N.mlp.down_proj``) of one transformers family."""
    prefix = {"gemma3_text": "Gemma3", "qwen2": "Qwen2", "qwen3": "Qwen3", "phi3": "Phi3"}.get(
        family, family.capitalize())
    config_cls = getattr(transformers, prefix + ("TextConfig" if family == "gemma3_text" else "Config"))
    model_cls = getattr(transformers, prefix + "ForCausalLM")

    def build() -> PreTrainedModel:
        cfg = config_cls(vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=4 * WIDTH,
                         num_hidden_layers=N_LAYERS, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, bos_token_id=256, eos_token_id=256,
                         pad_token_id=256, tie_word_embeddings=False, **extra)
        return model_cls(cfg)

    return build


_ALTERNATING = ["sliding_attention", "full_attention"] * (N_LAYERS // 2)
def _gptj() -> PreTrainedModel:
    cfg = GPTJConfig(vocab_size=VOCAB, n_positions=256, n_embd=WIDTH, n_layer=N_LAYERS, n_head=4,
                     rotary_dim=8, bos_token_id=256, eos_token_id=256)
    return GPTJForCausalLM(cfg)


def _gpt_neox() -> PreTrainedModel:
    cfg = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=4 * WIDTH,
                        num_hidden_layers=N_LAYERS, num_attention_heads=4, max_position_embeddings=256,
                        rotary_pct=0.5, bos_token_id=256, eos_token_id=256)
    return GPTNeoXForCausalLM(cfg)


BUILDERS = {
    "gpt2": _gpt2,
    "gptj": _gptj,
    "gpt_neox": _gpt_neox,
    "llama": _decoder("llama"),
    "mistral": _decoder("mistral", sliding_window=WINDOW),
    # the top half of the layers slide (max_window_layers), the bottom half attend fully
    "qwen2": _decoder("qwen2", use_sliding_window=True, sliding_window=WINDOW, max_window_layers=N_LAYERS // 2),
    "qwen3": _decoder("qwen3", head_dim=16, use_sliding_window=True, sliding_window=WINDOW,
                      max_window_layers=N_LAYERS // 2),
    "gemma": _decoder("gemma", head_dim=16),
    "gemma2": _decoder("gemma2", head_dim=16, sliding_window=WINDOW),  # alternating, logit soft-capping
    "gemma3_text": _decoder("gemma3_text", head_dim=16, sliding_window=WINDOW, layer_types=_ALTERNATING),
    "olmo": _decoder("olmo"),
    "phi3": _decoder("phi3", sliding_window=WINDOW),
}


def build_tiny(arch: str, seed: int) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    if arch not in BUILDERS:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {sorted(BUILDERS)}")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = BUILDERS[arch]()
    return model, byte_tokenizer()
