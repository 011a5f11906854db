"""A small, hand-written forward pass on HF-format checkpoints: LLaMA (Llama-2/3/3.1/3.2), Qwen2 /
Qwen2.5, Qwen3, Mistral (and Mistral 3's language models), Gemma, Gemma 2 and 3, OLMo 2 and 3,
SmolLM3, GLM-4, Granite 3, Phi-3 (3.5, 4), GPT-J, GPT-2, GPT-NeoX (Pythia) and Phi (1, 1.5, 2).

Parameter names mirror the checkpoint's tensor names one to one, so loading is a strict
name-and-shape match. The LLaMA-like families share one block (Qwen2 adds biases on q, k, v; Qwen3
an RMSNorm over each head of q and k; Mistral and windowed Qwen layers a sliding attention window;
Gemma (1 + w) norms, scaled embeddings and a GELU gate; Gemma 2 also norms on the outputs of
attention and the MLP, soft-capped attention scores and logits, and a window on alternate layers;
Gemma 3 and OLMo 2 and 3 variations of those; SmolLM3 layers without rope; GLM-4 interleaved
rope, its 0414 release Gemma 2's norms under its own names; Granite scaled embeddings, attention,
residual adds and logits; Phi-3 fused projections and LongRoPE); GPT-J, GPT-2, GPT-NeoX and Phi have their own. The forward pass returns
what knowledge editing needs without hooks: the MLP keys (the input of `down_proj` / `fc_out` /
GPT-2's `mlp.c_proj` / `dense_4h_to_h` / `fc2`) and residual-stream outputs at chosen layers; it
can stop after a layer, or start at one from a given residual stream (editing's residual delta:
stop, add it, start again), and compute logits only where asked. A model too large for one device
is loaded across several (load(device="cuda:0,cuda:1")): its blocks in order, split by the
devices' memory, the residual stream moving at the boundaries;
forward takes and returns every tensor on the first device.

    python model.py CHECKPOINT --prompt "Once upon a time" --max-new-tokens 50
"""
from __future__ import annotations

import argparse
import copy
from contextlib import contextmanager
import fnmatch
import hashlib
import json
import math
import operator
import os
import shutil
import sys
from dataclasses import dataclass, field, replace
from typing import NamedTuple
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

# one layout (model.embed_tokens, model.layers, model.norm): RMSNorm (OLMo, StableLM: LayerNorms), rope on halves, a gated MLP
LLAMA_LIKE = ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3_text", "gemma3", "olmo", "olmo2", "olmo3",
              "stablelm", "phi3", "smollm3", "glm", "glm4", "granite", "ministral3", "mistral3")
# the gate activations of the gated MLP, by HF's names: SwiGLU (LLaMA ...) and GeGLU (Gemma)
GATE_ACTIVATIONS = ("silu", "gelu_pytorch_tanh")
# each layout's module names: (the body, its embeddings, its blocks, its final norm; the head)
LAYOUTS = {"llama": ("model", "embed_tokens", "layers", "norm", "lm_head"),
           "gptj": ("transformer", "wte", "h", "ln_f", "lm_head"),
           "gpt2": ("transformer", "wte", "h", "ln_f", "lm_head"),
           "gpt_neox": ("gpt_neox", "embed_in", "layers", "final_layer_norm", "embed_out"),
           "phi": ("model", "embed_tokens", "layers", "final_layernorm", "lm_head")}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# safetensors dtype codes a weight may be stored in (cast to the requested dtype when loaded)
FLOAT_CODES = ("F16", "BF16", "F32", "F64")
# Buffers some checkpoints carry that are not weights (recomputed here): allowed, ignored.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias", ".attention.bias",
                    ".attention.masked_bias")


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded as it is; the message names the problem."""


# --------------------------------------------------------------------------------------- config
@dataclass
class Config:
    arch: str                     # the checkpoint's model_type, one of SUPPORTED
    vocab_size: int
    d_model: int                  # hidden size
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_mlp: int                    # MLP inner size (the edited weight is d_model x d_mlp)
    norm_eps: float
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None   # Llama-3.1 style {"rope_type": "llama3", ...}; "yarn"; Gemma 3's "linear";
                                       # Phi's "longrope" (read_phi3's fields)
    local_rope_theta: float | None = None   # Gemma 3, OLMo 3: the sliding layers' own rope base (no scaling)
    nope_layers: tuple[int, ...] = ()       # SmolLM3: layers whose q and k are not turned (NoPE)
    rotary_dim: int = 0           # GPT-J, GPT-NeoX, Phi: rotary over the first rotary_dim dims of each head (0: all)
    tie_embeddings: bool = False
    attention_bias: bool = False  # biases on q, k, v and the attention output projection
    mlp_bias: bool = False
    max_positions: int = 2048     # n_positions / max_position_embeddings: the longest input taken (position_limit)
    bos_id: int | None = None
    eos_ids: list[int] = field(default_factory=list)
    pad_id: int | None = None
    qkv_bias: bool = False        # Qwen2: biases on q, k, v only
    qk_norm: bool = False         # Qwen3: RMSNorm over each head of q and k, before rope
    qk_norm_whole: bool = False   # OLMo 2: ... over the whole q and k projections instead
    sliding_window: int | None = None   # a query sees the keys of the last `sliding_window` positions...
    window_layers: tuple[int, ...] = ()  # ...in these layers (Mistral: all; Qwen: layer_types)
    attn_scale: float | None = None      # None: 1/sqrt(head_dim); GPT-2 without scale_attn_weights: 1
    mlp_act: str = "silu"         # the gated MLP's gate activation, one of GATE_ACTIVATIONS (Gemma: GELU);
                                  # an ungated MLP's (GPT-J, GPT-NeoX, Phi): "gelu" (erf) or "gelu_pytorch_tanh"
    parallel_residual: bool = False      # GPT-NeoX: attention and the MLP both read the block's input
    head_bias: bool = False       # GPT-J, Phi: the head has a bias (kept apart where the weight is tied)
    fused_qkv: bool = False       # Phi-3: q, k, v in one qkv_proj
    fused_gate_up: bool = False   # Phi-3, GLM: the MLP's gate and up in one gate_up_proj
    rope_interleaved: bool = False       # GLM: rope turns interleaved pairs (GPT-J's), not the two halves
    norm_plus_one: bool = False   # Gemma: RMSNorm's weight applied as (1 + w), in float32 (FloatRMSNorm)
    norm_weight_float32: bool = False   # OLMo 2: the weight w applied in float32 before the cast
    rope_float32: bool = False    # OLMo 2, 3: cos and sin kept in float32, q and k turned in float32, then cast
    embed_scale: float | None = None     # Gemma: embeddings times sqrt(d_model), rounded to their dtype
    embedding_multiplier: float = 1.0    # Granite: embeddings times this float (not rounded: its own arithmetic)
    residual_multiplier: float = 1.0     # Granite: attention's and the MLP's outputs times this before the add
    logits_scaling: float = 1.0          # Granite: the logits divided by this
    post_norms: bool = False      # Gemma 2, 3, OLMo 2, 3: attention's and the MLP's outputs normalised before the add
    pre_norms: bool = True        # OLMo 2: False, the block's inputs are not normalised
    attn_softcap: float | None = None    # Gemma 2: attention scores capped to tanh(s / c) * c
    final_softcap: float | None = None   # Gemma 2: logits capped so too
    weights_prefix: str = ""      # Gemma 3, Mistral 3 image-text: the language model's names begin "language_model."
    query_scale: tuple[float, int] | None = None   # Ministral 3: (β, n), q times 1 + β ln(1 + ⌊position / n⌋)
    layer_norms: str | None = None       # LayerNorms, not RMSNorms: OLMo's "plain" (no weight or bias,
                                         # in float32), StableLM's "affine" (weight and bias)
    clip_qkv: float | None = None        # OLMo: q, k and v clamped to ±clip_qkv after their projections

    @property
    def llama_like(self) -> bool:
        return self.arch in LLAMA_LIKE

    @property
    def mlp_output_mapped(self) -> bool:
        """The MLP's output joins the residual stream changed (normalised: Gemma 2, 3, OLMo 2, 3,
        GLM-4-0414; scaled: Granite), not as it is: editing's E4b and E6b, E6c."""
        return self.post_norms or self.residual_multiplier != 1.0

    @property
    def layout(self) -> tuple[str, str, str, str, str]:
        """The names of the body, embeddings, blocks, final norm and head (LAYOUTS)."""
        return LAYOUTS["llama" if self.llama_like else self.arch]

    @property
    def longrope_switch(self) -> int | None:
        """LongRoPE's original_max_position_embeddings: a pass with a position past it takes the
        long factors (None: another rope)."""
        rs = self.rope_scaling or {}
        return rs["original_max_position_embeddings"] if rs.get("rope_type") == "longrope" else None

    @property
    def rope_attention_factor(self) -> float:
        """What LongRoPE and YaRN multiply cos and sin by (1.0 for other ropes, whatever config.json
        adds beside them, as transformers)."""
        rs = self.rope_scaling or {}
        return rs["attention_factor"] if rs.get("rope_type") in ("longrope", "yarn") else 1.0

    @property
    def position_limit(self) -> tuple[int, str]:
        """How many positions an input may take, and config.json's field that says so: LongRoPE's
        trained length (past it a pass turns every row by the long factors, so a row's keys would
        hang on its batch's longest), else GPT-2's learned positions or the model's maximum."""
        if self.longrope_switch is not None:
            return self.longrope_switch, "original_max_position_embeddings"
        return self.max_positions, self.positions_field

    @property
    def positions_field(self) -> str:
        """config.json's field for max_positions."""
        return "n_positions" if self.arch in ("gpt2", "gptj") else "max_position_embeddings"

    def edit_parameter_name(self, layer: int) -> str:
        """The module's name of `layer`'s edited MLP output projection (EDIT_WEIGHTS; in the files
        with weights_prefix before it: CausalLM.edit_weight_name)."""
        return EDIT_WEIGHTS["llama" if self.llama_like else self.arch].format(layer)

    @property
    def head_weight(self) -> str:
        """The head weight's name: not in the checkpoint's files where tied to the embeddings."""
        return self.layout[4] + ".weight"

    def window(self, layer: int) -> int | None:
        """The sliding attention window of `layer`, or None for full causal attention."""
        return self.sliding_window if layer in self.window_layers else None

    def rope(self, layer: int) -> str:
        """The rope that turns q and k in `layer`: "local" (Gemma 3's, OLMo 3's sliding layers), "none"
        (SmolLM3's NoPE layers) or "global"."""
        if self.local_rope_theta is not None and layer in self.window_layers:
            return "local"
        return "none" if layer in self.nope_layers else "global"

    @staticmethod
    def from_hf(c: dict) -> "Config":
        mt = c.get("model_type")
        if not isinstance(mt, str) or mt not in READERS:
            raise CheckpointError(f"unsupported model_type {mt!r} in config.json: supported are "
                                  + ", ".join(repr(s) for s in SUPPORTED))
        for name in Config.HF_SIZES:               # before a reader divides by one (None: the family's default)
            v = c.get(name)
            if v is not None and not count(v):
                raise CheckpointError(f"config.json (model_type {mt!r}): {name} {v!r} is not a whole number of at least 1")
        try:
            cfg = READERS[mt](HF_DEFAULTS.get(mt, {}) | c)
        except KeyError as e:
            raise CheckpointError(f"config.json (model_type {mt!r}) lacks the field {e.args[0]!r}") from None
        except CheckpointError:
            raise
        except (TypeError, ValueError, ArithmeticError, AttributeError) as e:   # a field of the wrong kind
            raise CheckpointError(f"config.json (model_type {mt!r}) holds a value that cannot be read as "
                                  f"transformers reads it: {type(e).__name__}: {e}") from e
        limit, field = cfg.position_limit
        if not count(limit):     # (transformers refuses it too)
            raise CheckpointError(f"config.json (model_type {mt!r}): {field} {limit!r} is not a number of positions")
        cfg.check_sizes()
        return cfg

    SIZES = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_mlp")
    HF_SIZES = ("vocab_size", "hidden_size", "n_embd", "num_hidden_layers", "n_layer", "num_attention_heads", "n_head",
                "num_key_value_heads", "head_dim", "intermediate_size", "n_inner")   # config.json's names

    def check_sizes(self):
        """The sizes whole numbers of at least 1, the norm's epsilon and the rope base positive
        numbers: a string or a negative number would otherwise fail deep in torch, or (a negative
        rope base) give nonsense without a word."""
        for name in self.SIZES:
            v = getattr(self, name)
            if not count(v):
                raise CheckpointError(f"config.json (model_type {self.arch!r}): {name} {v!r} is not a whole number of at least 1")
        for name in ("norm_eps", "rope_theta", "attn_scale"):
            v = getattr(self, name)
            if not positive_number(v) and not (name == "attn_scale" and v is None):
                raise CheckpointError(f"config.json (model_type {self.arch!r}): {name} {v!r} is not a positive number")
        if self.n_heads % self.n_kv_heads:          # (transformers' forward fails; ours would pair heads wrongly)
            raise CheckpointError(f"config.json (model_type {self.arch!r}): {self.n_heads} attention heads do not "
                                  f"share {self.n_kv_heads} key-value heads evenly")
        if self.arch in ("gpt2", "gptj", "gpt_neox") and self.n_heads * self.head_dim != self.d_model:
            raise CheckpointError(f"config.json (model_type {self.arch!r}): the hidden size {self.d_model} is not "
                                  f"divisible by the {self.n_heads} attention heads")
        w = self.sliding_window
        if w is not None and (not isinstance(w, int) or isinstance(w, bool) or w < 1):
            raise CheckpointError(f"config.json (model_type {self.arch!r}): sliding_window {w!r} is not a number "
                                  "of positions")


def positive_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < math.inf


def id_list(v) -> list:
    """An HF token-id field (eos_token_id: an id, a list of them, or null) as a list."""
    return [] if v is None else list(v) if isinstance(v, list) else [v]


def is_token_id(v) -> bool:
    """A token id as config files give it: a whole number torch can hold (any sign: old Llama
    configs' pad -1 means none)."""
    return whole_number(v) and abs(v) < 2 ** 63


def special_ids(c: dict) -> dict:
    """config.json's BOS, EOS and padding ids (each a whole number or null; EOS also a list of them)."""
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        ids = id_list(c.get(key)) if key == "eos_token_id" else [c.get(key)]
        if not all(i is None or is_token_id(i) for i in ids):
            refuse(c, f"{key} {c.get(key)!r}", "a token id is a whole number (EOS: or a list of them)")
    return dict(bos_id=c.get("bos_token_id"), eos_ids=id_list(c.get("eos_token_id")), pad_id=c.get("pad_token_id"))


def refuse(c: dict, what: str, why: str):
    raise CheckpointError(f"config.json (model_type {c['model_type']!r}): {what} is not supported ({why})")


LLAMA3_ROPE_FIELDS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
YARN_ROPE_FIELDS = ("factor", "original_max_position_embeddings")


def read_rope(c: dict, theta: float = 10000.0) -> dict:
    """The rope base (`theta` where config.json is silent) and its scaling: none, Llama-3.1's
    'llama3', YaRN ('yarn', read by yarn_scaling) or position interpolation ('linear': every
    frequency slowed by `factor`, as vicuna-v1.5-16k's and LongChat's)."""
    rp = c.get("rope_parameters") or {}      # transformers >= 5 writes rope here
    if rp and c.get("rope_scaling"):         # (a scaling added to a file transformers 5 wrote)
        refuse(c, "rope_scaling beside rope_parameters", "transformers 5 then takes rope_scaling alone, at the "
               "family's default rope base; put the scaling into rope_parameters")
    rs = c.get("rope_scaling") or (rp if rp.get("rope_type", rp.get("type", "default")) != "default" else None)
    kind = rs and rs.get("rope_type", rs.get("type"))
    if rs is not None and kind not in ("llama3", "yarn", "linear", "default"):
        refuse(c, f"rope_scaling {rs!r}", "only 'llama3', 'yarn' and 'linear' are implemented")
    top = c.get("original_max_position_embeddings")
    if kind in ("llama3", "yarn") and top is not None:       # transformers 5 takes the top-level one
        trained = rs.get("original_max_position_embeddings")
        if trained not in (None, top):
            refuse(c, f"original_max_position_embeddings {top} beside {kind}'s {trained}",
                   "transformers 5 takes the first, earlier versions the second; give one")
        rs = rs | {"original_max_position_embeddings": top}
    for key in {"llama3": LLAMA3_ROPE_FIELDS, "yarn": YARN_ROPE_FIELDS, "linear": ("factor",)}.get(kind, ()):
        if rs.get(key) is None:            # no guessed defaults: transformers requires or derives them
            raise CheckpointError(f"config.json (model_type {c['model_type']!r}): {kind} rope_scaling "
                                  f"{rs!r} lacks the field {key!r}")
        if not positive_number(rs[key]):
            raise CheckpointError(f"config.json (model_type {c['model_type']!r}): {kind} rope_scaling's {key} "
                                  f"{rs[key]!r} is not a positive number")
    return dict(rope_theta=rope_given(c).get("rope_theta", c.get("rope_theta", theta)),   # its base first
                rope_scaling=yarn_scaling(rs) if kind == "yarn" else rs)


def yarn_scaling(rs: dict) -> dict:
    """YaRN's fields as transformers reads them: factor, the trained length
    original_max_position_embeddings, the attention factor (given, else 0.1 ln(factor) + 1, or
    the ratio of two such with DeepSeek's mscale and mscale_all_dim), beta_fast 32 and beta_slow 1
    where unset, truncate (the correction range rounded out to whole dims; true where unset)."""
    factor = float(rs["factor"])
    mscale = lambda m: 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0
    attention = rs.get("attention_factor")
    if attention is None:
        both = rs.get("mscale") and rs.get("mscale_all_dim")
        attention = mscale(rs["mscale"]) / mscale(rs["mscale_all_dim"]) if both else mscale(1.0)
    return dict(rope_type="yarn", factor=factor, attention_factor=float(attention),
                original_max_position_embeddings=rs["original_max_position_embeddings"],
                beta_fast=rs.get("beta_fast") or 32, beta_slow=rs.get("beta_slow") or 1,
                truncate=rs.get("truncate", True))


def read_llama_like(c: dict, rope: dict | None = None, **family) -> Config:
    """The LLaMA layout's fields; `family` adds or overrides the family's own (Gemma: its gate
    activation, checked by its reader); `rope` replaces read_rope's reading (Gemma 3's, OLMo 3's
    two ropes, Phi-3's, SmolLM3's base)."""
    nh = c["num_attention_heads"]
    fields = dict(arch=c["model_type"], vocab_size=c["vocab_size"], d_model=c["hidden_size"],
                  n_layers=c["num_hidden_layers"], n_heads=nh, n_kv_heads=c.get("num_key_value_heads") or nh,
                  head_dim=c.get("head_dim") or c["hidden_size"] // nh, d_mlp=c["intermediate_size"],
                  norm_eps=c.get("rms_norm_eps", 1e-6), tie_embeddings=c.get("tie_word_embeddings", False),
                  max_positions=c.get("max_position_embeddings", 2048), mlp_act=c.get("hidden_act", "silu"))
    cfg = Config(**fields | (read_rope(c) if rope is None else rope) | special_ids(c) | family)
    if cfg.mlp_act not in GATE_ACTIVATIONS:
        refuse(c, f"hidden_act {cfg.mlp_act!r}", "the gated MLP here is SiLU- or tanh-GELU-gated")
    return cfg


def read_llama(c: dict) -> Config:
    return read_llama_like(c, attention_bias=c.get("attention_bias", False), mlp_bias=c.get("mlp_bias", False))


def sliding_layers(c: dict, default) -> tuple[int, ...]:
    """The layers config.json's `layer_types` marks "sliding_attention" (without it, those
    `default(i)` picks), as transformers reads them; a list of another length or kind is refused."""
    n = c["num_hidden_layers"]
    kinds = c.get("layer_types") or ["sliding_attention" if default(i) else "full_attention" for i in range(n)]
    if len(kinds) != n or not set(kinds) <= {"sliding_attention", "full_attention"}:
        refuse(c, f"layer_types {kinds!r}", f"{n} entries of sliding_attention or full_attention are")
    return tuple(i for i, kind in enumerate(kinds) if kind == "sliding_attention")


def qwen_window(c: dict) -> dict:
    """Qwen's sliding window: only with use_sliding_window (of sliding_window tokens, 4096 where
    the key is absent), in its sliding layers (by default those from max_window_layers on)."""
    window = c.get("sliding_window", 4096) if c.get("use_sliding_window") else None
    if not window:
        return {}
    first = c.get("max_window_layers", 28)
    return dict(sliding_window=window, window_layers=sliding_layers(c, lambda i: i >= first))


def read_qwen2(c: dict) -> Config:
    return read_llama_like(c, qkv_bias=True, **qwen_window(c))


def read_qwen3(c: dict) -> Config:
    return read_llama_like(c, qk_norm=True, head_dim=c.get("head_dim", 128),
                           attention_bias=c.get("attention_bias", False), **qwen_window(c))


def read_mistral(c: dict, default_window: int | None = 4096) -> Config:
    window = c.get("sliding_window", default_window)  # absent: transformers' default; null (Mistral-7B-v0.3): none
    return read_llama_like(c, sliding_window=window or None,
                           window_layers=tuple(range(c["num_hidden_layers"])) if window else ())


# Ministral3Config's rope where config.json gives none
MINISTRAL3_ROPE = dict(rope_type="yarn", rope_theta=1e6, factor=16.0, original_max_position_embeddings=16384,
                       beta_fast=32.0, beta_slow=1.0, mscale_all_dim=1.0, mscale=1.0, llama_4_scaling_beta=0.1)


def read_ministral3(c: dict) -> Config:
    """Ministral 3's text model (Ministral3ForCausalLM): Mistral's, with YaRN where config.json is
    silent (MINISTRAL3_ROPE, as transformers) and no window, and from YaRN's trained length n on
    each query (after rope) times 1 + β ln(1 + ⌊position / n⌋) (Llama 4's, β =
    llama_4_scaling_beta: Config.query_scale; transformers' forward fails without β or n)."""
    if not rope_given(c):
        c = c | {"rope_parameters": MINISTRAL3_ROPE}
    rope = rope_given(c)
    start, beta = rope.get("original_max_position_embeddings"), rope.get("llama_4_scaling_beta")
    if start is None or beta is None:
        refuse(c, f"a rope without llama_4_scaling_beta and original_max_position_embeddings ({rope!r})",
               "Ministral 3 scales its queries by them; transformers' forward fails without them")
    return replace(read_mistral(c, default_window=None), query_scale=(float(beta), start))


def read_mistral3(c: dict) -> Config:
    """Mistral 3's image-text checkpoint (Mistral3ForConditionalGeneration: Mistral Small 3.1 and
    3.2, Ministral 3): its language model, text_config (Mistral's or
    Ministral 3's, read by theirs), whose weights are named "language_model." + the text model's
    names, its head tied as the top-level tie_word_embeddings says (true where silent; a
    checkpoint that stores a head of its own is untied where it differs: check_checkpoint); the
    vision tower and the projector are not read (and save copies them as they are). Text in,
    text out: images are not taken."""
    text = c.get("text_config") or {}
    kind = text.get("model_type", "mistral")
    if kind not in ("mistral", "ministral3"):
        refuse(c, f"text_config's model_type {kind!r}", "Mistral 3's language model here is 'mistral' or 'ministral3'")
    with in_text_config(c):
        cfg = Config.from_hf(text | {"model_type": kind, "tie_word_embeddings": c.get("tie_word_embeddings", True)})
    return replace(cfg, arch="mistral3", weights_prefix="language_model.")


def check_gelu_tanh(c: dict, key: str, legacy: tuple = ()):
    """Gemma's gate activation, config.json's `key`: the tanh GELU (transformers' gelu_pytorch_tanh,
    the default, and any `legacy` name it reads as that)."""
    act = c.get(key) or "gelu_pytorch_tanh"
    if act != "gelu_pytorch_tanh" and act not in legacy:
        refuse(c, f"{key} {act!r}", "Gemma's MLP here is gated by the tanh GELU, gelu_pytorch_tanh")


def gemma_family(c: dict) -> dict:
    """What Gemma (1-3) adds to the LLaMA layout: (1 + w) norms, embeddings scaled by
    sqrt(hidden_size), the tanh-GELU gate, head_dim 256 and a tied head where config.json is silent."""
    if c.get("use_bidirectional_attention"):
        refuse(c, "use_bidirectional_attention: true", "the models here are causal")
    return dict(mlp_act="gelu_pytorch_tanh", norm_plus_one=True, embed_scale=c["hidden_size"] ** 0.5,
                head_dim=c.get("head_dim") or 256, tie_embeddings=c.get("tie_word_embeddings", True),
                attention_bias=c.get("attention_bias", False))


def read_gemma(c: dict) -> Config:
    check_gelu_tanh(c, "hidden_act", legacy=("gelu",))   # transformers reads the releases' "gelu" as tanh
    check_gelu_tanh(c, "hidden_activation")               # older transformers read this key first
    return read_llama_like(c, **gemma_family(c))


def window_fields(c: dict, sliding) -> dict:
    """sliding_window tokens (4096 where the key is absent) in the layers layer_types marks
    sliding (by default those `sliding(i)` picks), as Gemma 2 and 3 and OLMo 3 read them; a null
    window with sliding layers is refused (transformers cannot build their mask)."""
    layers = sliding_layers(c, sliding)
    window = c.get("sliding_window", 4096)
    if layers and not window:
        refuse(c, f"sliding_window {window!r} with sliding_attention layers", "a window needs its size")
    return dict(sliding_window=window if layers else None, window_layers=layers)


def gemma2_layout(c: dict, sliding, caps: tuple) -> dict:
    """What Gemma 2 and 3 add to Gemma's: norms on the outputs of attention and the MLP, the
    attention scale query_pre_attn_scalar^-0.5, soft caps (attention, logits; `caps` where
    config.json is silent), and sliding_window tokens (4096 where the key is absent) in the
    sliding layers (by default those `sliding(i)` picks: window_fields)."""
    scalar = c.get("query_pre_attn_scalar", 256)
    if not positive_number(scalar):
        refuse(c, f"query_pre_attn_scalar {scalar!r}", "the attention scale is its inverse square root")
    capped = {key: c.get(key, default) for key, default in zip(("attn_logit_softcapping", "final_logit_softcapping"), caps)}
    for key, cap in capped.items():
        if cap is not None and not positive_number(cap):
            refuse(c, f"{key} {cap!r}", "a soft cap is a positive number (or null: none)")
    return dict(**gemma_family(c), **window_fields(c, sliding), post_norms=True, attn_scale=scalar ** -0.5,
                attn_softcap=capped["attn_logit_softcapping"], final_softcap=capped["final_logit_softcapping"])


def gemma3_rope(c: dict) -> dict:
    """Gemma 3's two ropes, as transformers reads them: rope_parameters per layer kind (transformers
    5), else rope_theta (1e6) with rope_scaling for the full-attention layers and
    rope_local_base_freq (1e4) for the sliding ones; only the full layers' may be scaled (linear)."""
    rp = c.get("rope_parameters") or {}
    full, local = rp.get("full_attention") or {}, rp.get("sliding_attention") or {}
    scaling = c.get("rope_scaling") or (full if full.get("rope_type", "default") != "default" else None)
    for name, r in (("rope_scaling", scaling), ("the sliding layers' rope_parameters", local)):
        if r and "type" in r and "rope_type" not in r:       # the old key, which transformers 5 ignores here
            refuse(c, f"{name} {r!r} (its kind under 'type')", "transformers applies no scaling then; "
                   "name the kind under 'rope_type'")
        kind = (r or {}).get("rope_type", "default")
        if kind not in ("default", "linear") or (kind == "linear" and r is local):
            refuse(c, f"{name} {r!r}", "Gemma 3's full-attention rope may be linear-scaled, nothing else")
    if scaling is not None and scaling.get("rope_type") == "linear":
        if not isinstance(scaling.get("factor"), (int, float)):
            refuse(c, f"rope_scaling {scaling!r} without a factor", "a linear rope needs its factor")
        scaling = {"rope_type": "linear", "factor": float(scaling["factor"])}
    else:
        scaling = None
    return dict(rope_theta=full.get("rope_theta", c.get("rope_theta", 1e6)), rope_scaling=scaling,
                local_rope_theta=local.get("rope_theta", c.get("rope_local_base_freq", 1e4)))


# transformers' Gemma3TextConfig defaults, which a Gemma 3 config.json relies on (the image-text
# releases' text_config names only what differs: sizes, window, rope scaling)
GEMMA3_TEXT_DEFAULTS = dict(vocab_size=262_208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                            num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                            max_position_embeddings=131_072, rms_norm_eps=1e-6, pad_token_id=0, eos_token_id=1,
                            bos_token_id=2, tie_word_embeddings=True, query_pre_attn_scalar=256, sliding_window=4096)


def read_gemma3_text(c: dict, **more) -> Config:
    """Gemma 3's text model (Gemma3ForCausalLM: the 270M and 1B releases): Gemma 2's block with
    (1 + w) norms over each head of q and k, a local rope on the sliding layers (by default five
    in six), and no caps (a final one if config.json sets it)."""
    c = GEMMA3_TEXT_DEFAULTS | c
    check_gelu_tanh(c, "hidden_activation")
    if c.get("attn_logit_softcapping") is not None:     # (Gemma 2's cap: Gemma 3's attention never reads it)
        refuse(c, f"attn_logit_softcapping {c['attn_logit_softcapping']!r}", "transformers' Gemma 3 never "
               "caps attention scores; null runs as transformers does")
    pattern = c.get("sliding_window_pattern", 6)
    return read_llama_like(c, gemma3_rope(c), **gemma2_layout(c, lambda i: (i + 1) % pattern != 0, (None, None)),
                           qk_norm=True, **more)


def read_gemma3(c: dict) -> Config:
    """Gemma 3's image-text checkpoint (Gemma3ForConditionalGeneration: 4B and up): its language
    model, text_config (the special ids config.json names at its top level over it), whose
    weights are named "language_model." + the text model's names; the vision tower and the
    projector are not read (and save copies them as they are). Text in, text out: images are
    not taken."""
    text = c.get("text_config") or {}
    top = {k: c[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in c}
    special_ids(top | {"model_type": "gemma3"})         # (the top level's own: named so)
    with in_text_config(c):                             # every check of a config.json, on text_config
        cfg = Config.from_hf(text | top | {"model_type": "gemma3_text"})
    return replace(cfg, arch="gemma3", weights_prefix="language_model.")


@contextmanager
def in_text_config(c: dict):
    """An image-text checkpoint's language model is read from its text_config: a refusal there
    says so (it named config.json's top level, and for Mistral 3 a model_type the file lacks)."""
    try:
        yield
    except CheckpointError as e:
        raise CheckpointError(str(e).replace("config.json (", f"config.json's text_config ({c['model_type']}: ", 1)) \
            from None


def read_olmo(c: dict) -> Config:
    """OLMo (the first: OLMo-1B-hf, OLMo-7B-0424-hf; model_type olmo): LLaMA's layout whose norms
    are LayerNorms with no weight or bias (in float32, eps 1e-5: none is in the files), q, k and v
    perhaps clamped to ±clip_qkv, q and k turned in float32 (as OLMo 2)."""
    clip = c.get("clip_qkv")
    if clip is not None and (not isinstance(clip, (int, float)) or isinstance(clip, bool) or not clip > 0):
        refuse(c, f"clip_qkv {clip!r}", "q, k and v are clamped to ±clip_qkv, a positive number (or null: not clamped)")
    return read_llama_like(c, layer_norms="plain", norm_eps=1e-5, rope_float32=True,
                           attention_bias=c.get("attention_bias", False), clip_qkv=None if clip is None else float(clip))


def read_stablelm(c: dict) -> Config:
    """StableLM (stablelm-3b-4e1t, StableLM 2 1.6B and its chat models; model_type stablelm):
    LLaMA's layout with LayerNorms (weight and bias), rope on the halves of the first
    partial_rotary_factor (a quarter where silent) of each head, biases on q, k and v where
    use_qkv_bias. StableLM 2 12B's parallel block and per-head q/k norms are refused."""
    for key in ("use_parallel_residual", "qk_layernorm"):
        if c.get(key):
            refuse(c, f"{key} true", "StableLM 2 12B's parallel block and per-head q/k LayerNorms are not read here")
    head_dim = c["hidden_size"] // c["num_attention_heads"]
    return read_llama_like(c, layer_norms="affine", norm_eps=c.get("layer_norm_eps", 1e-5),
                           qkv_bias=c.get("use_qkv_bias", False), rotary_dim=rotary_dims(c, head_dim, 0.25))


def read_olmo2(c: dict, rope: dict | None = None, **more) -> Config:
    """OLMo 2: LLaMA's layout with the norms moved from the block's inputs to the outputs of
    attention and of the MLP, RMSNorm over the whole q and k projections, norm weights applied
    in float32, q and k turned in float32 (OLMo 3 adds `rope` and `more`)."""
    return read_llama_like(c, rope, pre_norms=False, post_norms=True, qk_norm=True, qk_norm_whole=True,
                           norm_weight_float32=True, rope_float32=True, norm_eps=c.get("rms_norm_eps", 1e-5),
                           attention_bias=c.get("attention_bias", False), **more)


def read_olmo3(c: dict) -> Config:
    """OLMo 3: OLMo 2's block with a window (sliding_window, 4096 where absent) in the layers
    layer_types marks sliding (by default three in four, every fourth full), their rope
    unscaled, the full layers' perhaps YaRN-scaled (the released long-context models), as
    transformers 5 reads them: rope_parameters per layer kind, or rope_theta (5e5) with
    rope_scaling for the full layers."""
    rp = c.get("rope_parameters") or {}
    if rp and not set(rp) <= {"full_attention", "sliding_attention"}:
        refuse(c, f"rope_parameters {rp!r}", "OLMo 3's are given per layer kind, full_attention and sliding_attention")
    full, local = rp.get("full_attention") or {}, rp.get("sliding_attention") or {}
    if not rp and c.get("rope_theta", 5e5) != 5e5:     # transformers 5 turns the sliding layers at 5e5 then
        refuse(c, f"rope_theta {c['rope_theta']!r} without rope_parameters", "transformers 5 turns the sliding "
               "layers at 500000 whatever it says, earlier versions at it; give rope_parameters per layer kind")
    if local.get("rope_type", "default") != "default":
        refuse(c, f"the sliding layers' rope_parameters {local!r}", "OLMo 3's sliding layers turn unscaled")
    scaling = full | (c.get("rope_scaling") or {})        # transformers 5 updates the one with the other
    if scaling.get("truncate", True) is not True:         # it reads truncate beside the layer kinds
        refuse(c, "YaRN's truncate false for the full layers", "transformers ignores it in OLMo 3, truncating")
    scaling = scaling if scaling.get("rope_type", "default") != "default" else None
    theta = full.get("rope_theta", c.get("rope_theta", 5e5))
    rope = read_rope(dict(model_type=c["model_type"], rope_scaling=scaling), theta=theta)
    return read_olmo2(c, rope | dict(local_rope_theta=local.get("rope_theta", 5e5)),
                      **window_fields(c, lambda i: (i + 1) % 4 != 0))


def read_gemma2(c: dict) -> Config:
    check_gelu_tanh(c, "hidden_activation")     # the key transformers reads for Gemma 2 (hidden_act: unused)
    return read_llama_like(c, **gemma2_layout(c, lambda i: i % 2 == 0, (50.0, 30.0)))   # even layers slide


def check_gelu_new(c: dict):
    if c.get("activation_function", "gelu_new") != "gelu_new":
        refuse(c, f"activation_function {c['activation_function']!r}", "only gelu_new is implemented")


def read_gptj(c: dict) -> Config:
    check_gelu_new(c)
    nh, d = c["n_head"], c["n_embd"]
    rotary = c.get("rotary_dim", 64)                   # transformers' GPTJConfig default (it refuses null)
    bad = not isinstance(rotary, int) or isinstance(rotary, bool) or rotary < 2 or rotary % 2
    if bad or (d % nh == 0 and rotary > d // nh):      # (a head size that is no whole number: check_sizes says so)
        given = f"rotary_dim {rotary!r}" + ("" if "rotary_dim" in c else " (transformers' default where config.json has none)")
        refuse(c, given, f"rope turns an even number of the {d // nh} head dims, at least 2")
    return Config(arch="gptj", vocab_size=c["vocab_size"], d_model=d, n_layers=c["n_layer"], n_heads=nh,
                  n_kv_heads=nh, head_dim=d // nh, d_mlp=c.get("n_inner") or 4 * d,
                  norm_eps=c.get("layer_norm_epsilon", 1e-5), rotary_dim=rotary,
                  tie_embeddings=c.get("tie_word_embeddings", False),   # tied: lm_head keeps its own bias
                  mlp_bias=True, mlp_act="gelu_pytorch_tanh", head_bias=True,
                  max_positions=c.get("n_positions", 2048), **special_ids(c))


def read_gpt2(c: dict) -> Config:
    check_gelu_new(c)
    for option in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention"):
        if c.get(option):
            refuse(c, f"{option}: true", "only the standard GPT-2 attention is implemented")
    nh, d = c["n_head"], c["n_embd"]
    return Config(arch="gpt2", vocab_size=c["vocab_size"], d_model=d, n_layers=c["n_layer"], n_heads=nh,
                  n_kv_heads=nh, head_dim=d // nh, d_mlp=c.get("n_inner") or 4 * d,
                  norm_eps=c.get("layer_norm_epsilon", 1e-5), tie_embeddings=c.get("tie_word_embeddings", True),
                  attention_bias=True, mlp_bias=True, max_positions=c.get("n_positions", 1024),
                  attn_scale=None if c.get("scale_attn_weights", True) else 1.0, **special_ids(c))


# the ungated MLPs' activations (GPT-NeoX, Phi), by config.json's hidden_act: the erf GELU, or the
# tanh approximation under any of its names (gelu_fast and gelu_new are its formula written out:
# equal to rounding)
GELU_ACTIVATIONS = {"gelu": "gelu", "gelu_fast": "gelu_pytorch_tanh", "gelu_new": "gelu_pytorch_tanh",
                    "gelu_pytorch_tanh": "gelu_pytorch_tanh"}


def rope_given(c: dict) -> dict:
    """The rope fields as transformers 5 takes them: rope_scaling (the older key, which it copies
    over), else rope_parameters."""
    return c.get("rope_scaling") or c.get("rope_parameters") or {}


def unscaled_rope(c: dict, family: str) -> dict:
    """The rope fields transformers reads (rope_given) of a family whose rope is implemented here
    unscaled; a scaling is refused."""
    rope = rope_given(c)
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        refuse(c, f"rope scaling {rope!r}", f"{family}'s rope is implemented unscaled")
    return rope


def rotary_dims(c: dict, head_dim: int, default: float, key: str = "partial_rotary_factor") -> int:
    """The head dims rope turns, int(head_dim · share) as transformers: an even number, or refused.
    The share is partial_rotary_factor of the rope fields (rope_given), else config.json's `key`
    (GPT-NeoX's rotary_pct), else `default`; null turns the whole head."""
    share = rope_given(c).get("partial_rotary_factor", c.get(key, default))
    rotary = int(head_dim * (1.0 if share is None else share))
    if rotary < 2 or rotary % 2:
        refuse(c, f"a rotary share giving {rotary} of {head_dim} head dims", "rope turns an even number of them")
    return rotary


def gelu_activation(c: dict, family: str, default: str) -> str:
    """An ungated MLP's GELU (GELU_ACTIVATIONS' reading of config.json's hidden_act)."""
    act = c.get("hidden_act", default)
    if act not in GELU_ACTIVATIONS:
        refuse(c, f"hidden_act {act!r}", f"{family}'s MLP here is " + ", ".join(GELU_ACTIVATIONS))
    return GELU_ACTIVATIONS[act]


def phi3_rope(c: dict, head_dim: int) -> tuple[dict, int]:
    """Phi-3's rope as transformers reads it: rope_scaling, else rope_parameters, for the base and
    the share of each head turned (else rope_theta, partial_rotary_factor); LongRoPE ("longrope",
    or the older "su" and "yarn") divides each frequency by short_factor's entry, or long_factor's
    in a pass with a position past original_max_position_embeddings (config.json's top-level
    key, 4096 where absent), and scales cos and sin by attention_factor (by default
    sqrt(1 + ln s / ln original), s = factor or max_position_embeddings / original). Returns the
    rope fields and rotary_dim (0: the whole head)."""
    rp = rope_given(c)
    kind = rp.get("rope_type", rp.get("type", "default"))
    kind = "longrope" if kind in ("su", "yarn") else kind
    rotary = rotary_dims(c, head_dim, 1.0)
    fields = dict(rope_theta=rp.get("rope_theta", c.get("rope_theta", 10000.0)), rope_scaling=None)
    if kind == "longrope":
        original = c.get("original_max_position_embeddings", 4096)
        factor = rp.get("factor") or c.get("max_position_embeddings", 4096) / original
        attention = rp.get("attention_factor") or (math.sqrt(1 + math.log(factor) / math.log(original))
                                                   if factor > 1 else 1.0)
        for key in ("short_factor", "long_factor"):
            if not isinstance(rp.get(key), list) or len(rp[key]) != rotary // 2:
                refuse(c, f"longrope {key} {rp.get(key)!r}",
                       f"a list of {rotary // 2} numbers, one per frequency, is needed")
        fields["rope_scaling"] = dict(rope_type="longrope", short_factor=rp["short_factor"],
                                      long_factor=rp["long_factor"], original_max_position_embeddings=original,
                                      attention_factor=attention)
    elif kind != "default":
        refuse(c, f"rope scaling {rp!r}", "Phi-3's rope is implemented plain or longrope")
    return fields, rotary if rotary < head_dim else 0


def read_phi3(c: dict) -> Config:
    """Phi-3, 3.5 and 4 (mini and full): LLaMA's layout with q, k and v in one projection
    (qkv_proj, in that order) and the MLP's gate and up in one (gate_up_proj); rope on a share
    of each head, plain or LongRoPE; a sliding window over every layer where config.json sets one."""
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    rope, rotary = phi3_rope(c, head_dim)
    window = c.get("sliding_window")
    return read_llama_like(c, rope, fused_qkv=True, fused_gate_up=True, rotary_dim=rotary, sliding_window=window,
                           window_layers=tuple(range(c["num_hidden_layers"])) if window else (),
                           norm_eps=c.get("rms_norm_eps", 1e-5))


def read_gpt_neox(c: dict) -> Config:
    """GPT-NeoX (Pythia, GPT-NeoX-20B): LayerNorms, one fused q/k/v projection, rope over the
    first rotary_pct of each head, attention and the MLP in parallel off two LayerNorms (or one
    after the other without use_parallel_residual). The rope as transformers reads it: base and
    share from rope_scaling or rope_parameters, else rotary_emb_base and rotary_pct; unscaled."""
    rope = unscaled_rope(c, "GPT-NeoX")
    nh, d = c["num_attention_heads"], c["hidden_size"]
    rotary = rotary_dims(c, d // nh, 0.25, key="rotary_pct")
    return Config(arch="gpt_neox", vocab_size=c["vocab_size"], d_model=d, n_layers=c["num_hidden_layers"],
                  n_heads=nh, n_kv_heads=nh, head_dim=d // nh, d_mlp=c["intermediate_size"],
                  norm_eps=c.get("layer_norm_eps", 1e-5), rotary_dim=rotary,
                  rope_theta=rope.get("rope_theta", c.get("rotary_emb_base", 1e4)),
                  tie_embeddings=c.get("tie_word_embeddings", False),
                  attention_bias=c.get("attention_bias", True), mlp_bias=True,
                  mlp_act=gelu_activation(c, "GPT-NeoX", "gelu"),
                  parallel_residual=c.get("use_parallel_residual", True),
                  max_positions=c.get("max_position_embeddings", 2048), **special_ids(c))


def read_phi(c: dict) -> Config:
    """Phi-1, 1.5 and 2: GPT-J's parallel block (attention and the MLP off one LayerNorm) under
    LLaMA-like names, biases everywhere (the head too), rope over partial_rotary_factor of each
    head (0.5 where config.json is silent, as transformers), unscaled; a GELU MLP (fc1, fc2)."""
    if c.get("qk_layernorm"):
        refuse(c, "qk_layernorm: true", "Phi's q and k are used as projected")
    rope = unscaled_rope(c, "Phi")
    nh, d = c["num_attention_heads"], c["hidden_size"]
    head_dim = c.get("head_dim") or d // nh
    rotary = rotary_dims(c, head_dim, 0.5)
    return Config(arch="phi", vocab_size=c["vocab_size"], d_model=d, n_layers=c["num_hidden_layers"], n_heads=nh,
                  n_kv_heads=c.get("num_key_value_heads") or nh, head_dim=head_dim, d_mlp=c["intermediate_size"],
                  norm_eps=c.get("layer_norm_eps", 1e-5), rotary_dim=rotary if rotary < head_dim else 0,
                  rope_theta=rope.get("rope_theta", c.get("rope_theta", 1e4)),
                  tie_embeddings=c.get("tie_word_embeddings", False), attention_bias=True, mlp_bias=True,
                  mlp_act=gelu_activation(c, "Phi", "gelu_new"), head_bias=True,
                  max_positions=c.get("max_position_embeddings", 2048), **special_ids(c))


def read_smollm3(c: dict) -> Config:
    """SmolLM3: LLaMA's layout with a tied head where config.json is silent, and no rope in some
    layers (no_rope_layers: 1 turns q and k, 0 leaves them unturned; by default every
    no_rope_layer_interval-th layer is NoPE); with use_sliding_window, a window in the layers
    layer_types marks sliding (by default the NoPE ones), as transformers reads them."""
    n = c["num_hidden_layers"]
    every = c.get("no_rope_layer_interval", 4)
    marks = c.get("no_rope_layers") or [int((i + 1) % every != 0) for i in range(n)]
    if len(marks) < n or not set(marks[:n]) <= {0, 1}:
        refuse(c, f"no_rope_layers {marks!r}", f"a 1 (rope) or 0 (NoPE) for each of the {n} layers is")
    nope = tuple(i for i in range(n) if marks[i] == 0)
    window = c.get("sliding_window") if c.get("use_sliding_window") else None
    sliding = sliding_layers(c, lambda i: bool(window) and i in nope)
    if sliding and not window:
        refuse(c, "layer_types' sliding_attention without use_sliding_window and sliding_window",
               "transformers' eager and sdpa attention apply the window there, its flash attention does not")
    windows = dict(sliding_window=window, window_layers=sliding) if sliding else {}
    return read_llama_like(c, read_rope(c, theta=2e6), nope_layers=nope,
                           tie_embeddings=c.get("tie_word_embeddings", True),
                           attention_bias=c.get("attention_bias", False), mlp_bias=c.get("mlp_bias", False), **windows)


# transformers' defaults for the keys a config.json may leave out that change what is read here
# (the positions, the key-value heads, the padding id; each family's other defaults are its
# reader's), checked against each family's config class (test_models); not the special ids a
# run starts and ends with, the tokenizer's (its BOS and EOS where config.json names none: a
# config class's default EOS is not what transformers' generate stops at); Gemma 3's text
# model: GEMMA3_TEXT_DEFAULTS, its sizes and special ids too (its image-text releases rely on them)
OLMO = dict(pad_token_id=1)
GEMMA = dict(max_position_embeddings=8192, pad_token_id=0)
QWEN = dict(num_key_value_heads=32, max_position_embeddings=32768)
GLM = dict(num_key_value_heads=2, head_dim=128, max_position_embeddings=131072, pad_token_id=151329)
MINISTRAL3 = dict(num_key_value_heads=8, head_dim=128, max_position_embeddings=262144, pad_token_id=11, rms_norm_eps=1e-5)
HF_DEFAULTS = {"olmo": OLMO, "olmo2": OLMO, "olmo3": OLMO, "qwen2": QWEN, "qwen3": QWEN,
               "mistral": dict(num_key_value_heads=8, max_position_embeddings=131072),
               "gemma": dict(GEMMA, num_key_value_heads=16), "gemma2": dict(GEMMA, num_key_value_heads=4),
               "phi3": dict(max_position_embeddings=4096, pad_token_id=32000),
               "smollm3": dict(num_key_value_heads=4, max_position_embeddings=32768, pad_token_id=128004),
               "glm": GLM, "glm4": GLM, "ministral3": MINISTRAL3,
               "stablelm": dict(num_key_value_heads=32, max_position_embeddings=4096)}

def read_glm(c: dict, **more) -> Config:
    """GLM-4 (GLM-4-9B, model_type glm): LLaMA's layout with biases on q, k and v, the MLP's gate
    and up in one gate_up_proj, and rope on interleaved pairs (GPT-J's) of the first
    partial_rotary_factor (0.5 where silent) of each head; GLM-4-0414 (glm4) adds norms on the
    outputs of attention and the MLP (`more`)."""
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    return read_llama_like(c, qkv_bias=c.get("attention_bias", True), fused_gate_up=True, rope_interleaved=True,
                           rotary_dim=rotary_dims(c, head_dim, 0.5), norm_eps=c.get("rms_norm_eps", 1.5625e-07),
                           **more)


def read_glm4(c: dict) -> Config:
    return read_glm(c, post_norms=True)


GRANITE_SCALARS = ("embedding_multiplier", "attention_multiplier", "residual_multiplier", "logits_scaling")


def read_granite(c: dict) -> Config:
    """Granite (3.0-3.3; model_type granite): LLaMA's layout with four scalars: the embeddings
    times embedding_multiplier, the attention scores times attention_multiplier (not
    1/sqrt(head_dim)), attention's and the MLP's outputs times residual_multiplier before each
    joins the residual stream, the logits divided by logits_scaling (1.0 each where silent; a null
    one is refused, as transformers refuses it)."""
    scalars = {key: c.get(key, 1.0) for key in GRANITE_SCALARS}
    for key, value in scalars.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            refuse(c, f"{key} {value!r}", "Granite's scalars are finite numbers")
    if scalars["logits_scaling"] == 0:
        refuse(c, "logits_scaling 0", "the logits are divided by it")
    return read_llama_like(c, attention_bias=c.get("attention_bias", False), mlp_bias=c.get("mlp_bias", False),
                           embedding_multiplier=float(scalars["embedding_multiplier"]),
                           attn_scale=float(scalars["attention_multiplier"]),
                           residual_multiplier=float(scalars["residual_multiplier"]),
                           logits_scaling=float(scalars["logits_scaling"]))


READERS = {"llama": read_llama, "gptj": read_gptj, "gpt2": read_gpt2, "qwen2": read_qwen2,
           "qwen3": read_qwen3, "mistral": read_mistral, "gemma": read_gemma, "gemma2": read_gemma2,
           "gemma3_text": read_gemma3_text, "gemma3": read_gemma3, "olmo": read_olmo, "olmo2": read_olmo2, "olmo3": read_olmo3,
           "gpt_neox": read_gpt_neox, "phi3": read_phi3, "phi": read_phi, "smollm3": read_smollm3,
           "glm": read_glm, "glm4": read_glm4, "granite": read_granite, "ministral3": read_ministral3,
           "mistral3": read_mistral3, "stablelm": read_stablelm}
SUPPORTED = tuple(READERS)


# ----------------------------------------------------------------------------------------- rope
def rope_inv_freq(cfg: Config, local: bool = False, long: bool = False) -> torch.Tensor:
    """Rotary inverse frequencies (over rotary_dim where set: GPT-J, GPT-NeoX, Phi's share; else over
    the head; GPT-2: none, its positions are learned; local: Gemma 3's and OLMo 3's sliding layers',
    unscaled), with Llama-3.1 'llama3' scaling: long wavelengths slowed by `factor`, short ones
    kept, a blend in between; YaRN's ('yarn', yarn_inv_freq), a ramp of the same kind;
    'linear' (Gemma 3): all slowed by `factor`; or 'longrope' (Phi): each slowed by its entry of
    short_factor, or with `long` of long_factor."""
    r = 0 if cfg.arch == "gpt2" else cfg.rotary_dim or cfg.head_dim
    base = cfg.local_rope_theta if local else cfg.rope_theta
    inv = 1.0 / base ** (torch.arange(0, r, 2, dtype=torch.float32, device="cpu") / max(r, 1))
    rs = None if local else cfg.rope_scaling
    kind = rs and rs.get("rope_type", rs.get("type"))
    if kind == "linear":
        return inv / rs["factor"]
    if kind == "longrope":        # written as transformers does, to the last bit
        shape = torch.arange(0, r, 2, dtype=torch.float32) / r
        return 1.0 / (torch.tensor(rs["long_factor" if long else "short_factor"], dtype=torch.float32) * base ** shape)
    if kind == "yarn":
        return yarn_inv_freq(rs, base, r)
    if kind != "llama3":
        return inv
    factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    old = rs["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    smooth = ((old / wavelen - lo) / (hi - lo)).clamp(0, 1)    # 0: long waves, 1: short waves
    blended = (1 - smooth) * inv / factor + smooth * inv
    return torch.where(wavelen > old / lo, inv / factor, torch.where(wavelen < old / hi, inv, blended))


def yarn_inv_freq(rs: dict, base: float, r: int) -> torch.Tensor:
    """YaRN's inverse frequencies, as transformers computes them to the last bit: each
    frequency slowed by `factor` (interpolated) or kept (extrapolated), by a ramp over the dims
    between those that turn beta_fast and beta_slow times within the trained length."""
    turns = base ** (torch.arange(0, r, 2, dtype=torch.float32) / r)
    kept, slowed = 1.0 / turns, 1.0 / (rs["factor"] * turns)
    trained = rs["original_max_position_embeddings"]
    dims = lambda turns: r * math.log(trained / (turns * 2 * math.pi)) / (2 * math.log(base))   # turning so often
    low, high = dims(rs["beta_fast"]), dims(rs["beta_slow"])
    if rs["truncate"]:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, r - 1)
    high = high + 0.001 if low == high else high          # (transformers: no division by zero)
    share_kept = 1 - ((torch.arange(r // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    return slowed * (1 - share_kept) + kept * share_kept


def rope_llama(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """LLaMA (HF layout): rotate the two halves of the head, or of its first r = 2 · cos.shape[-1]
    dims, the rest passing (GPT-NeoX, Phi's partial_rotary_factor; SmolLM3's NoPE layers: r = 0).
    x (B, nh, T, hd); cos/sin (B, 1, T, r/2)."""
    r = 2 * cos.shape[-1]
    if r == 0:
        return x
    if r < x.shape[-1]:
        return torch.cat((rope_llama(x[..., :r], cos, sin), x[..., r:]), dim=-1)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)   # (float32 tables: cast)


def rope_gptj(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """GPT-J: rotate interleaved pairs (0,1), (2,3), ... of the first rotary_dim dims; the rest pass."""
    r = 2 * cos.shape[-1]
    xr, xp = x[..., :r], x[..., r:]
    x1, x2 = xr[..., 0::2], xr[..., 1::2]
    rot = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    return torch.cat((rot, xp), dim=-1)


# ------------------------------------------------------------------------------------ attention
class KVCache:
    """Preallocated keys/values for incremental decoding: (B, n_kv, max_len, hd) per layer. Every
    key is kept (a sliding window is applied by the mask, so decoding past it stays exact).
    device: one device, or a list with each layer's (model.placement: a layer's cache lives
    where its block runs). first: the layers below it hold nothing (a pass that starts above them)."""

    def __init__(self, cfg: Config, batch: int, max_len: int, device, dtype, first: int = 0):
        shape = (batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        devices = device if isinstance(device, (list, tuple)) else [device] * cfg.n_layers
        self.k, self.v = ([torch.zeros(shape, device=d, dtype=dtype) if i >= first else None
                           for i, d in enumerate(devices)] for _ in "kv")
        self.length = 0
        self.long_rope: bool | None = None    # LongRoPE: whether the cached keys took the long factors

    def _mapped(self, f) -> "KVCache":
        """This cache with f applied to each layer's keys and values (f makes new tensors)."""
        new = copy.copy(self)
        new.k, new.v = ([None if t is None else f(t) for t in kv] for kv in (self.k, self.v))
        return new

    def copy(self, extend: int = 0) -> "KVCache":
        """A cache to extend without changing this one: the same keys and values, copied, with room
        for `extend` more positions (uninitialised: each is written before it is read)."""
        return self._mapped(lambda t: torch.cat((t, t.new_empty(*t.shape[:2], extend, t.shape[3])), 2))

    def rows(self, index) -> "KVCache":
        """The cache of the batch's rows `index` (a copy)."""
        return self._mapped(lambda t: t[index.to(t.device)])


def attention_mask(mask, past: int, window: int | None = None):
    """(B, 1, T, S) bool, True where query i may read key j: j <= i, j a real token, and with a
    window, i - window < j by real-token positions (as transformers' sliding window, which counts
    padded indices: the same for a batch padded on one side). A pad query reads itself, so no row
    is empty. None where plain causal attention is exact: right padding, no cache, no window
    shorter than the batch. mask (B, S) with 1 on real tokens; the last T = S - past are queries."""
    S = mask.shape[1]
    T = S - past
    right_padded = bool((mask[:, 1:] <= mask[:, :-1]).all())
    if not past and right_padded and (window is None or T <= window):
        return None
    qi = torch.arange(past, S, device=mask.device)
    kj = torch.arange(S, device=mask.device)
    allowed = (kj[None, :] <= qi[:, None])[None] & mask.bool()[:, None, :]       # (B, T, S)
    if window is not None:
        pos = mask.long().cumsum(-1)                                              # (B, S)
        allowed &= (pos[:, past:, None] - pos[:, None, :]) < window
    return (allowed | (kj[None, :] == qi[:, None])[None])[:, None]


def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """Gemma 2's soft-capping: tanh(x / cap) * cap, in x's dtype (as transformers); None: x."""
    return x if cap is None else torch.tanh(x / cap) * cap


def capped_attention(q, k, v, allowed, scale: float | None, cap: float):
    """softmax(softcap(q kᵀ · scale, cap), masked by `allowed`) v, written out (no fused kernel caps
    scores): the scores in q's dtype, capped before the mask, softmax in float32 and cast back (as
    transformers' eager attention). q, k, v (B, nh, T|S, hd); allowed None: causal. Returns (B, nh, T, hd)."""
    T, S = q.shape[2], k.shape[2]
    scores = (q @ k.transpose(2, 3)) * (q.shape[-1] ** -0.5 if scale is None else scale)   # (B, nh, T, S)
    scores = softcap(scores, cap)
    if allowed is None:                            # no cache (S == T): plain causal
        allowed = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~allowed, float("-inf"))
    return scores.softmax(-1, dtype=torch.float32).to(q.dtype) @ v


def attend(q, k, v, allowed, cache: KVCache | None, layer: int, scale: float | None, cap: float | None = None):
    """softmax(q kᵀ · scale, masked by `allowed`) v over the cached and the new keys (scores
    soft-capped at `cap` where given: Gemma 2). q (B, nh, T, hd); k, v (B, nkv, T, hd), written
    into the cache first. Returns (B, T, nh * hd)."""
    B, nh, T, hd = q.shape
    if cache is not None:
        s = cache.length
        cache.k[layer][:, :, s:s + T], cache.v[layer][:, :, s:s + T] = k, v
        k, v = cache.k[layer][:, :, :s + T], cache.v[layer][:, :, :s + T]   # (B, nkv, S, hd)
    if k.shape[1] != nh:                           # grouped-query: head h reads kv head h // rep
        rep = nh // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    if cap is not None:
        y = capped_attention(q, k, v, allowed, scale, cap)                        # (B, nh, T, hd)
    elif allowed is None:     # right padding, no cache: plain causal (fused kernels)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)   # (B, nh, T, hd)
    else:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)
    return y.transpose(1, 2).reshape(B, T, nh * hd)


class Attention(nn.Module):
    """q, k, v projections (Phi-3: one, qkv_proj) and an output projection (LLaMA-like: o_proj;
    GPT-J: out_proj; Phi: dense); rope on q and k (none in SmolLM3's NoPE layers); Qwen3 first
    normalises each head of q and k."""

    def __init__(self, cfg: Config, out_name: str):
        super().__init__()
        self.cfg = cfg
        self.out_name = out_name
        hd, nh, nkv = cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
        qkv_bias = cfg.attention_bias or cfg.qkv_bias
        self.widths = (nh * hd, nkv * hd, nkv * hd)
        if cfg.fused_qkv:                               # Phi-3: one projection, q then k then v
            self.qkv_proj = nn.Linear(cfg.d_model, sum(self.widths), bias=qkv_bias)
        else:
            self.q_proj = nn.Linear(cfg.d_model, nh * hd, bias=qkv_bias)
            self.k_proj = nn.Linear(cfg.d_model, nkv * hd, bias=qkv_bias)
            self.v_proj = nn.Linear(cfg.d_model, nkv * hd, bias=qkv_bias)
        setattr(self, out_name, nn.Linear(nh * hd, cfg.d_model, bias=cfg.attention_bias))
        if cfg.qk_norm:                                 # over each head, or the whole projection
            self.q_norm = family_norm(cfg, nh * hd if cfg.qk_norm_whole else hd)
            self.k_norm = family_norm(cfg, nkv * hd if cfg.qk_norm_whole else hd)

    def forward(self, x, rope, tables: RopeTables, allowed, cache: KVCache | None, layer: int):
        B, T, _ = x.shape
        hd, nh, nkv = self.cfg.head_dim, self.cfg.n_heads, self.cfg.n_kv_heads
        if self.cfg.fused_qkv:
            q, k, v = self.qkv_proj(x).split(self.widths, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if (clip := self.cfg.clip_qkv) is not None:   # OLMo
            q, k, v = q.clamp(-clip, clip), k.clamp(-clip, clip), v.clamp(-clip, clip)
        if self.cfg.qk_norm_whole:                      # OLMo 2: RMSNorm over the whole projection
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, T, nh, hd)                        # (B, T, nh, hd)
        k = k.view(B, T, nkv, hd)                       # (B, T, nkv, hd)
        v = v.view(B, T, nkv, hd)
        if self.cfg.qk_norm and not self.cfg.qk_norm_whole:   # Qwen3, Gemma 3: over each head
            q, k = self.q_norm(q), self.k_norm(k)
        q = rope(q.transpose(1, 2), tables.cos, tables.sin)     # (B, nh, T, hd)
        k = rope(k.transpose(1, 2), tables.cos, tables.sin)     # (B, nkv, T, hd)
        if tables.q_scale is not None:                  # Ministral 3: each query scaled by its position
            q = q * tables.q_scale
        y = attend(q, k, v.transpose(1, 2), allowed, cache, layer, self.cfg.attn_scale,
                   self.cfg.attn_softcap)                                         # (B, T, nh * hd)
        return getattr(self, self.out_name)(y)


class Conv1D(nn.Module):
    """GPT-2's linear layer: the weight is stored [d_in, d_out] (nn.Linear's transpose); y = x W + b."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d_in, d_out))     # from the checkpoint
        self.bias = nn.Parameter(torch.zeros(d_out))

    def forward(self, x):
        return x @ self.weight + self.bias


class GPT2Attention(nn.Module):
    """One fused projection c_attn to q, k, v (no rope: positions are learned); output c_proj."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.c_attn = Conv1D(cfg.d_model, 3 * cfg.d_model)
        self.c_proj = Conv1D(cfg.d_model, cfg.d_model)

    def forward(self, x, allowed, cache: KVCache | None, layer: int):
        B, T, d = x.shape
        q, k, v = (t.view(B, T, self.cfg.n_heads, self.cfg.head_dim).transpose(1, 2)   # (B, nh, T, hd)
                   for t in self.c_attn(x).split(d, dim=-1))
        return self.c_proj(attend(q, k, v, allowed, cache, layer, self.cfg.attn_scale))


class NeoXAttention(nn.Module):
    """GPT-NeoX: one fused projection query_key_value whose output holds, head by head, that head's
    q, k and v side by side; rope over the first rotary_dim dims of each; output dense."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.query_key_value = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.attention_bias)
        self.dense = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.attention_bias)

    def forward(self, x, tables: RopeTables, allowed, cache: KVCache | None, layer: int):
        B, T, _ = x.shape
        qkv = self.query_key_value(x).view(B, T, self.cfg.n_heads, 3 * self.cfg.head_dim)   # (B, T, nh, 3 hd)
        q, k, v = qkv.transpose(1, 2).chunk(3, dim=-1)                                    # (B, nh, T, hd)
        q, k = rope_llama(q, tables.cos, tables.sin), rope_llama(k, tables.cos, tables.sin)
        return self.dense(attend(q, k, v, allowed, cache, layer, None))


# --------------------------------------------------------------------------------------- blocks
class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):   # computed in float32, cast back (as the reference implementation)
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)

    def scale(self) -> torch.Tensor:
        """The per-feature factor applied after normalising."""
        return self.weight.detach()


class FloatRMSNorm(nn.Module):
    """An RMSNorm whose weight is applied in float32 before the cast back (LLaMA's casts first,
    then multiplies): Gemma's, whose weight is stored as an offset from 1 (offset 1), and
    OLMo 2's (offset 0)."""

    def __init__(self, d: int, eps: float, offset: float):
        super().__init__()
        self.weight = nn.Parameter(torch.full((d,), 1.0 - offset))
        self.eps = eps
        self.offset = offset

    def forward(self, x):   # normalised and scaled in float32, then cast back (as transformers)
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * (self.offset + self.weight.float())).to(x.dtype)

    def scale(self) -> torch.Tensor:
        """The per-feature factor applied after normalising."""
        return self.offset + self.weight.detach().float()


class PlainLayerNorm(nn.Module):
    """OLMo's norm: a LayerNorm with no weight or bias, computed in float32, cast back."""

    def __init__(self, d: int, eps: float):
        super().__init__()
        self.d, self.eps = d, eps

    def forward(self, x):
        return F.layer_norm(x.float(), (self.d,), eps=self.eps).to(x.dtype)


def family_norm(cfg: Config, d: int | None = None) -> nn.Module:
    """The LLaMA layout's norm over the residual stream (or d features: a head), in the family's
    convention: an RMSNorm (Gemma's, OLMo 2's: FloatRMSNorm), OLMo's PlainLayerNorm, StableLM's LayerNorm."""
    if cfg.layer_norms == "plain":
        return PlainLayerNorm(d or cfg.d_model, cfg.norm_eps)
    if cfg.layer_norms == "affine":
        return nn.LayerNorm(d or cfg.d_model, eps=cfg.norm_eps)
    if cfg.norm_plus_one or cfg.norm_weight_float32:
        return FloatRMSNorm(d or cfg.d_model, cfg.norm_eps, offset=1.0 if cfg.norm_plus_one else 0.0)
    return RMSNorm(d or cfg.d_model, cfg.norm_eps)


class LlamaMLP(nn.Module):
    """The gated MLP: down(act(gate(x)) * up(x)), act SiLU (SwiGLU) or the tanh GELU (Gemma's GeGLU);
    Phi-3 and GLM have gate and up in one projection, gate_up_proj (gate first)."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.gelu = cfg.mlp_act == "gelu_pytorch_tanh"
        self.fused = cfg.fused_gate_up
        b = cfg.mlp_bias
        if self.fused:
            self.gate_up_proj = nn.Linear(cfg.d_model, 2 * cfg.d_mlp, bias=b)
        else:
            self.gate_proj = nn.Linear(cfg.d_model, cfg.d_mlp, bias=b)
            self.up_proj = nn.Linear(cfg.d_model, cfg.d_mlp, bias=b)
        self.down_proj = nn.Linear(cfg.d_mlp, cfg.d_model, bias=b)

    def forward(self, x):   # returns (output, key = input of down_proj)
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1) if self.fused else (self.gate_proj(x), self.up_proj(x))
        act = F.gelu(gate, approximate="tanh") if self.gelu else F.silu(gate)
        key = act * up
        return self.down_proj(key), key


class GeluMLP(nn.Module):
    """An ungated MLP, out(gelu(in(x))) with biases, the GELU erf or tanh (cfg.mlp_act), under the
    checkpoint's names for in and out: GPT-J's fc_in, fc_out; GPT-NeoX's dense_h_to_4h,
    dense_4h_to_h; Phi's fc1, fc2."""

    def __init__(self, cfg: Config, names: tuple[str, str]):
        super().__init__()
        self.names = names
        self.approximate = "tanh" if cfg.mlp_act == "gelu_pytorch_tanh" else "none"
        setattr(self, names[0], nn.Linear(cfg.d_model, cfg.d_mlp))
        setattr(self, names[1], nn.Linear(cfg.d_mlp, cfg.d_model))

    def forward(self, x):   # returns (output, key = input of the out projection)
        fc_in, fc_out = (getattr(self, name) for name in self.names)
        key = F.gelu(fc_in(x), approximate=self.approximate)
        return fc_out(key), key


class GPT2MLP(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.c_fc = Conv1D(cfg.d_model, cfg.d_mlp)
        self.c_proj = Conv1D(cfg.d_mlp, cfg.d_model)   # the edited weight, stored [d_mlp, d_model]

    def forward(self, x):   # returns (output, key = input of c_proj, after gelu_new)
        key = F.gelu(self.c_fc(x), approximate="tanh")
        return self.c_proj(key), key


# The names of a block's norms after attention, before and after the MLP: LLaMA's has only the
# middle one (the outer two are identities, with no weights to name); the post-norm families have
# Gemma 2's (OLMo 2's) where not listed; GLM-4 keeps LLaMA's post_attention_layernorm on the MLP's input
LLAMA_NORM_NAMES = ("attention_output", "post_attention_layernorm", "mlp_output")
POST_NORM_NAMES = {"glm4": ("post_self_attn_layernorm", "post_attention_layernorm", "post_mlp_layernorm")}
GEMMA_POST_NORM_NAMES = ("post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")


class LlamaBlock(nn.Module):
    """LLaMA, Qwen2, Qwen3, Mistral, Gemma, GLM and Granite: pre-norm, attention then MLP (Granite:
    each output scaled by residual_multiplier before the add, in the model's dtype; 1.0 elsewhere,
    which changes nothing). Gemma 2 and 3 (post_norms): the outputs of attention and of the MLP
    normalised before each joins the residual stream; their post_attention_layernorm is thus on
    attention's output (LLaMA's of that name is on the MLP's input: there pre_feedforward_layernorm).
    OLMo: LLaMA's, its norms without weights; StableLM: LayerNorms (layer_norms). OLMo 2: Gemma 2's without the norms on
    the inputs (pre_norms false: identities). GLM-4-0414: Gemma 2's under its own names
    (POST_NORM_NAMES), its rope on interleaved pairs."""

    def __init__(self, cfg: Config):
        super().__init__()
        identity = lambda cfg: nn.Identity()
        pre, post = (family_norm if cfg.pre_norms else identity), (family_norm if cfg.post_norms else identity)
        self.rope = rope_gptj if cfg.rope_interleaved else rope_llama
        self.residual_multiplier = cfg.residual_multiplier
        self.names = POST_NORM_NAMES.get(cfg.arch, GEMMA_POST_NORM_NAMES) if cfg.post_norms else LLAMA_NORM_NAMES
        after_attention, before_mlp, after_mlp = self.names
        self.input_layernorm = pre(cfg)
        self.self_attn = Attention(cfg, "o_proj")
        setattr(self, after_attention, post(cfg))
        setattr(self, before_mlp, pre(cfg))
        self.mlp = LlamaMLP(cfg)
        setattr(self, after_mlp, post(cfg))

    @property
    def mlp_output_norm(self) -> nn.Module:
        """The norm on the MLP's output (Gemma 2's post_feedforward_layernorm): editing's E6b."""
        return getattr(self, self.names[2])

    def forward(self, h, tables, allowed, cache, layer):   # sequential: attention, then MLP
        after_attention, before_mlp, after_mlp = (getattr(self, n) for n in self.names)
        a = self.self_attn(self.input_layernorm(h), self.rope, tables, allowed, cache, layer)
        h = h + after_attention(a) * self.residual_multiplier
        out, key = self.mlp(before_mlp(h))
        return h + after_mlp(out) * self.residual_multiplier, key


class GPTJBlock(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg, "out_proj")
        self.mlp = GeluMLP(cfg, ("fc_in", "fc_out"))

    def forward(self, h, tables, allowed, cache, layer):   # parallel: attention and MLP read one LayerNorm
        x = self.ln_1(h)
        out, key = self.mlp(x)
        return h + self.attn(x, rope_gptj, tables, allowed, cache, layer) + out, key


class PhiBlock(nn.Module):
    """Phi-1, 1.5, 2: GPT-J's block under LLaMA-like names: attention (output `dense`) and the
    MLP in parallel off one LayerNorm."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.self_attn = Attention(cfg, "dense")
        self.mlp = GeluMLP(cfg, ("fc1", "fc2"))

    def forward(self, h, tables, allowed, cache, layer):   # summed in transformers' order
        x = self.input_layernorm(h)
        out, key = self.mlp(x)
        return self.self_attn(x, rope_llama, tables, allowed, cache, layer) + out + h, key


class NeoXBlock(nn.Module):
    """GPT-NeoX: attention off input_layernorm; the MLP off post_attention_layernorm of the
    block's input, in parallel (use_parallel_residual), or of the stream after attention."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.parallel = cfg.parallel_residual
        self.input_layernorm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attention = NeoXAttention(cfg)
        self.mlp = GeluMLP(cfg, ("dense_h_to_4h", "dense_4h_to_h"))

    def forward(self, h, tables, allowed, cache, layer):
        a = self.attention(self.input_layernorm(h), tables, allowed, cache, layer)
        if self.parallel:                       # summed in transformers' order
            out, key = self.mlp(self.post_attention_layernorm(h))
            return out + a + h, key
        h = a + h
        out, key = self.mlp(self.post_attention_layernorm(h))
        return out + h, key


class GPT2Block(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = GPT2Attention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = GPT2MLP(cfg)

    def forward(self, h, tables, allowed, cache, layer):   # sequential; no rope (tables unused)
        h = h + self.attn(self.ln_1(h), allowed, cache, layer)
        out, key = self.mlp(self.ln_2(h))
        return h + out, key


# ---------------------------------------------------------------------------------------- model
@dataclass
class Output:
    logits: torch.Tensor | None                       # float32, (B, T, V) or (B, k, V) with logits_at
    keys: dict = field(default_factory=dict)          # layer -> (B, T, d_mlp) MLP keys
    outs: dict = field(default_factory=dict)          # layer -> (B, T, d_model) residual after layer


# the edited MLP output projection of each layout, by parameter name
EDIT_WEIGHTS = {"llama": "model.layers.{}.mlp.down_proj.weight", "gptj": "transformer.h.{}.mlp.fc_out.weight",
                "gpt2": "transformer.h.{}.mlp.c_proj.weight", "phi": "model.layers.{}.mlp.fc2.weight",
                "gpt_neox": "gpt_neox.layers.{}.mlp.dense_4h_to_h.weight"}
# the blocks of the layouts that are not LLaMA's
BLOCKS = {"gptj": GPTJBlock, "gpt2": GPT2Block, "gpt_neox": NeoXBlock, "phi": PhiBlock}


class CausalLM(nn.Module):
    """LlamaForCausalLM (and the Qwen, Mistral, Gemma, OLMo, SmolLM3, GLM and Phi-3 models in its layout),
    GPTJForCausalLM, GPT2LMHeadModel, GPTNeoXForCausalLM, PhiForCausalLM, with the checkpoint's parameter names
    (each layout's in LAYOUTS)."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        body_name, embed_name, blocks_name, norm_name, head_name = cfg.layout
        # nn.Embedding's random initialisation, which the checkpoint overwrites, would import
        # torch's compiler on the meta device (1 s per process); an empty weight skips it
        embedding = lambda n, d: nn.Embedding.from_pretrained(torch.empty(n, d), freeze=False)
        if cfg.llama_like:
            block, norm = LlamaBlock, family_norm(cfg)
        else:
            block, norm = BLOCKS[cfg.arch], nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        body = nn.Module()
        setattr(body, embed_name, embedding(cfg.vocab_size, cfg.d_model))
        if cfg.arch == "gpt2":
            body.wpe = embedding(cfg.max_positions, cfg.d_model)
        setattr(body, blocks_name, nn.ModuleList(block(cfg) for _ in range(cfg.n_layers)))
        setattr(body, norm_name, norm)
        setattr(self, body_name, body)
        setattr(self, head_name, nn.Linear(cfg.d_model, cfg.vocab_size, bias=cfg.head_bias))
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        for name, inv_freq in rope_buffers(cfg).items():
            self.register_buffer(name, inv_freq, persistent=False)
        self.tokenizer: Tokenizer | None = None
        # the prefix the checkpoint's names lack: "transformer." in GPT-2 files saved from
        # GPT2Model (as OpenAI's gpt2 ... gpt2-xl on the Hub); set by load
        self.missing_prefix = ""
        # set by load across several devices (None: one device, where the embeddings are; such a
        # model may be moved with .to(), a spread one not): the listed devices, the first the
        # home device, and stages[i], the index in devices of block i's device
        self.devices: list[torch.device] | None = None
        self.stages: list[int] | None = None

    # the same four parts under each layout's own names
    body = property(lambda s: getattr(s, s.cfg.layout[0]))
    embed = property(lambda s: getattr(s.body, s.cfg.layout[1]))
    blocks = property(lambda s: getattr(s.body, s.cfg.layout[2]))
    norm = property(lambda s: getattr(s.body, s.cfg.layout[3]))
    head = property(lambda s: getattr(s, s.cfg.layout[4]))

    @property
    def placement(self) -> list[torch.device]:
        """The device each block runs on (load(device="cuda:0,cuda:1") spreads them; else all on
        the embeddings' device, the home device where forward takes and returns tensors)."""
        if self.stages is None:
            return [self.embed.weight.device] * self.cfg.n_layers
        return [self.devices[j] for j in self.stages]

    def checkpoint_name(self, name: str) -> str:
        """The name parameter `name` has in the checkpoint's files."""
        p = self.missing_prefix
        return self.cfg.weights_prefix + (name[len(p):] if p and name.startswith(p) else name)

    def _edit_parameter(self, layer: int) -> nn.Parameter:
        return self.get_parameter(self.cfg.edit_parameter_name(layer))

    def edit_weight_name(self, layer: int) -> str:
        """Checkpoint name of the edited MLP output projection at `layer` (the tensor behind
        edit_weight(layer); GPT-2 stores it transposed, so for anything written to disk use
        edit_tensors / load_edit_tensors)."""
        return self.checkpoint_name(self.cfg.edit_parameter_name(layer))

    def edit_weight(self, layer: int) -> torch.Tensor:
        """W (d_model, d_mlp), the edited projection as the method sees it (out = W key). It aliases
        the parameter (for GPT-2 the transposed view of the stored [d_mlp, d_model]): write it with
        copy_ or in-place operations and the model changes."""
        w = self._edit_parameter(layer)
        return w.T if self.cfg.arch == "gpt2" else w

    def edit_bias(self, layer: int) -> torch.Tensor | None:
        """The edited projection's bias (d_model,) where it has one (GPT-J, GPT-2, GPT-NeoX, Phi, a
        LLaMA with mlp_bias; not edited)."""
        name = self.cfg.edit_parameter_name(layer).removesuffix(".weight") + ".bias"
        return dict(self.named_parameters()).get(name)

    def mlp_contribution(self, layer: int, out: torch.Tensor) -> torch.Tensor:
        """What the MLP output `out` (..., d) adds to the residual stream at `layer`, on out's
        device: out itself, or with a post-norm block's norm on it (Gemma 2's
        post_feedforward_layernorm), or times Granite's residual_multiplier."""
        if not self.cfg.post_norms:
            return out * self.cfg.residual_multiplier
        norm = self.blocks[layer].mlp_output_norm
        return norm(out.to(norm.weight.device)).to(out.device)

    def edit_tensors(self, layers) -> dict[str, torch.Tensor]:
        """{checkpoint name: the stored parameter} of the edited projections at `layers`, in the
        checkpoint's own layout (GPT-2: [d_mlp, d_model]): what `save` and run-state files take.
        The live parameters, on the model's device, not copies."""
        return {self.edit_weight_name(l): self._edit_parameter(l) for l in layers}

    @torch.no_grad()
    def load_edit_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy tensors in the layout edit_tensors returns into the edited parameters (all are
        checked first: a bad one leaves the model as it was)."""
        layer_of = {self.edit_weight_name(l): l for l in range(self.cfg.n_layers)}
        for name, t in tensors.items():
            if name not in layer_of:
                raise CheckpointError(f"{name!r} is not an edited weight of this {self.cfg.arch} model "
                                      f"(those are named like {self.edit_weight_name(0)!r})")
            w = self._edit_parameter(layer_of[name])
            if tuple(t.shape) != tuple(w.shape):
                raise CheckpointError(f"tensor {name} has shape {tuple(t.shape)}, the model stores "
                                      f"{tuple(w.shape)} (the checkpoint's layout)")
        for name, t in tensors.items():
            self._edit_parameter(layer_of[name]).copy_(t)

    def names_through_layer(self, layer: int) -> list[str]:
        """Checkpoint names of the tensors the computation up to and including block `layer`
        depends on: the embeddings (GPT-2: with wpe) and blocks 0..layer."""
        parts = [self.embed, *([self.body.wpe] if self.cfg.arch == "gpt2" else []),
                 *self.blocks[:layer + 1]]
        wanted = {id(p) for part in parts for p in part.parameters()}
        return [self.checkpoint_name(n) for n, p in self.named_parameters() if id(p) in wanted]

    def positions(self, mask, past: int) -> torch.Tensor:
        """(B, T) position of each query among its sequence's real tokens (left or right padding
        alike). GPT-2 has only max_positions learned positions: beyond them is an error."""
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
        if self.cfg.arch == "gpt2" and mask.shape[1] > self.cfg.max_positions \
                and int(pos.max()) >= self.cfg.max_positions:
            raise ValueError(f"a sequence of {int(pos.max()) + 1} tokens is longer than this GPT-2's "
                             f"{self.cfg.max_positions} learned positions (n_positions)")
        return pos

    def forward(self, ids, mask=None, *, keys_at=(), outs_at=(), stop_after=None,
                logits_at=None, start=None, cache: KVCache | None = None) -> Output:
        """ids (B, T) long; mask (B, S) with 1 on real tokens (S = T, or cache length + T), left or
        right padding alike: positions count real tokens only.
        keys_at / outs_at: layers whose MLP keys / residual outputs to return.
        stop_after: last layer to run (no logits). start: (layer, h) runs layers > layer from the
        residual h (B, T, d) instead of embedding ids. logits_at: (B, k) positions to score.
        Every input and output lives on the home device (the embeddings'); with the blocks on
        several devices the residual stream moves at each boundary (autograd follows it)."""
        B, T = ids.shape
        home = self.embed.weight.device
        past = cache.length if cache is not None else 0
        mask = torch.ones(B, past + T, dtype=torch.long, device=ids.device) if mask is None else mask
        pos = self.positions(mask, past)                                           # (B, T)
        dt = self.embed.weight.dtype
        rope_dt = torch.float32 if self.cfg.rope_float32 else dt
        inv_freq, scale = self.inv_freq, self.cfg.rope_attention_factor
        if self.cfg.longrope_switch is not None:        # Phi's LongRoPE: long past the trained length
            long = int(pos.max()) + 1 > self.cfg.longrope_switch                  # for the pass, as transformers
            inv_freq = self.inv_freq_long if long else inv_freq
            check_rope_regime(cache, long)
        ropes = {"global": rope_tables(pos, inv_freq, rope_dt, scale, self.cfg.query_scale)}   # RopeTables
        if self.cfg.local_rope_theta is not None:                       # Gemma 3's, OLMo 3's sliding layers
            ropes["local"] = rope_tables(pos, self.inv_freq_local, rope_dt)
        if self.cfg.nope_layers:                              # SmolLM3's NoPE layers: turned over no dims
            ropes["none"] = rope_tables(pos, inv_freq[:0], rope_dt)
        first, h = (0, self.embed(ids)) if start is None else (start[0] + 1, start[1])
        if start is None and self.cfg.arch == "gpt2":                              # learned positions
            h = h + self.body.wpe(pos)
        if start is None and self.cfg.embed_scale is not None:   # Gemma: a float32 scalar cast to dt
            h = h * torch.tensor(self.cfg.embed_scale).to(h.device, dt)
        if start is None and self.cfg.embedding_multiplier != 1.0:             # Granite: a Python float
            h = h * self.cfg.embedding_multiplier
        last = self.cfg.n_layers - 1 if stop_after is None else stop_after
        windows = {self.cfg.window(i) for i in range(first, last + 1)}
        masks = {w: attention_mask(mask, past, w) for w in windows}                # (B, 1, T, S) or None
        place = self.placement
        inputs = {dev: block_inputs(dev, ropes, masks) for dev in set(place[first:last + 1])}
        out = Output(None)
        for i in range(first, last + 1):
            h = h.to(place[i])                       # a device boundary: the residual stream moves
            ropes_i, masks_i = inputs[place[i]]
            h, key = self.blocks[i](h, ropes_i[self.cfg.rope(i)], masks_i[self.cfg.window(i)], cache, i)
            if i in keys_at:
                out.keys[i] = key.to(home)
            if i in outs_at:
                out.outs[i] = h.to(home)
        if cache is not None:
            cache.length += T
        if stop_after is None:
            head = self.head.weight.device           # the final norm lives with the head
            h = h.to(head)
            if logits_at is not None:
                h = h.gather(1, logits_at.to(head)[..., None].expand(-1, -1, h.shape[-1]))
            logits = softcap(self.head(self.norm(h)), self.cfg.final_softcap)       # capped in dt
            if self.cfg.logits_scaling != 1.0:                                       # Granite, in dt
                logits = logits / self.cfg.logits_scaling
            out.logits = logits.float().to(home)
        return out


def check_rope_regime(cache: KVCache | None, long: bool):
    """LongRoPE turns a pass by the long factors when a position is past the trained length: keys
    cached by the short ones cannot join such a pass (generate starts again, as transformers'
    Phi-3 does)."""
    if cache is None:
        return
    if cache.length and cache.long_rope is False and long:
        raise ValueError("a pass past LongRoPE's original_max_position_embeddings turns q and k by the long "
                         "factors, the cached keys were turned by the short ones: run the whole sequence at once")
    cache.long_rope = long


class RopeTables(NamedTuple):
    """What turns q and k at each position: cos and sin (B, 1, T, hd/2); Ministral 3's query
    scale (B, 1, T, 1), else None."""
    cos: torch.Tensor
    sin: torch.Tensor
    q_scale: torch.Tensor | None = None


def rope_tables(pos, inv_freq, dtype, scale: float = 1.0, query_scale=None) -> RopeTables:
    """cos and sin of positions pos (B, T) at inverse frequencies inv_freq, times `scale`
    (LongRoPE's and YaRN's attention factor) in float32, in dtype; with query_scale (β, n),
    Ministral 3's 1 + β ln(1 + ⌊pos / n⌋) (Llama 4's), in float32, in dtype, as transformers."""
    freqs = pos[:, None, :, None].float() * inv_freq
    q_scale = None
    if query_scale is not None:
        beta, n = query_scale
        q_scale = (1 + beta * torch.log(1 + torch.floor(pos / n)))[:, None, :, None].to(dtype)
    return RopeTables((freqs.cos() * scale).to(dtype), (freqs.sin() * scale).to(dtype), q_scale)


def rope_buffers(cfg: Config) -> dict[str, torch.Tensor]:
    """The model's inverse frequencies by buffer name: inv_freq; Gemma 3's and OLMo 3's sliding
    layers' inv_freq_local; LongRoPE's long-context inv_freq_long."""
    out = {"inv_freq": rope_inv_freq(cfg)}
    if cfg.local_rope_theta is not None:
        out["inv_freq_local"] = rope_inv_freq(cfg, local=True)
    if (cfg.rope_scaling or {}).get("rope_type") == "longrope":
        out["inv_freq_long"] = rope_inv_freq(cfg, long=True)
    return out


def block_inputs(device, ropes: dict, masks: dict):
    """What every block reads besides the residual stream (rope's cos and sin, per rope; the
    attention mask of each window) on `device` (the same tensors where they already are)."""
    return ({k: RopeTables(*(t if t is None else t.to(device) for t in tables)) for k, tables in ropes.items()},
            {w: None if m is None else m.to(device) for w, m in masks.items()})


# ------------------------------------------------------------------------------------ tokenizer
def read_json(file: Path) -> dict:
    """A checkpoint's JSON object file (config, tokenizer or generation config); a file that is
    not one is named."""
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: not a readable JSON file ({e})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(value).__name__}")
    return value


class Tokenizer:
    """tokenizer.json through the `tokenizers` library; BOS handled here, in one place. The BOS is
    the tokenizer's own, as transformers takes it: tokenizer_config.json's bos_token (an explicit
    null: none, as Qwen2's, whose config.json still names one), config.json's only where that file
    is silent. A prompt begins with what tokenizer.json's post-processor puts before a text
    (template_lead: Llama's and Gemma's BOS, none for GPT-2's and Qwen's), as transformers 5 encodes
    it: it reads tokenizer_config.json's add_bos_token only where tokenizer.json is absent, so a
    release whose two files disagree (an early Phi-3-mini-128k: add_bos_token true, no BOS in its
    template) gets no BOS, as there (transformers 4's LlamaTokenizerFast added one). A special
    token the template puts after the text (an EOS) is not added: a prompt is to be continued.
    Generation stops at config.json's EOS and at generation_config.json's (a chat model's end of
    turn, as Llama-3-Instruct's <|eot_id|>)."""

    def __init__(self, path: Path, cfg: Config):
        from tokenizers import Tokenizer as HFTok
        tj, tc = path / "tokenizer.json", path / "tokenizer_config.json"
        if not tj.exists():
            others = [f for f in ("tokenizer.model", "vocab.json", "merges.txt") if (path / f).exists()]
            hint = (f"; write it from its {' and '.join(others)} with transformers: " + transformers_command(
                f"t.AutoTokenizer.from_pretrained({str(path)!r}).backend_tokenizer.save({str(tj)!r})") if others else "")
            raise CheckpointError(f"{path}: tokenizer.json is missing (needed to encode prompts){hint}")
        try:
            self.tok = HFTok.from_file(str(tj))
        except Exception as e:           # the library raises a bare Exception (truncated, not UTF-8, no model)
            raise CheckpointError(f"{tj}: not a readable tokenizer ({e})") from None
        check_vocabulary(self.tok, cfg, tj)
        self.tok.no_truncation()     # a tokenizer.json may carry either (the GPT-2 one truncates at
        self.tok.no_padding()        # 50 tokens); transformers does neither unless asked, nor do we
        conf = read_json(tc) if tc.exists() else {}
        gc = path / "generation_config.json"
        gen = read_json(gc) if gc.exists() else {}

        def token_id(v):
            v = v.get("content") if isinstance(v, dict) else v
            return self.tok.token_to_id(v) if isinstance(v, str) else None
        self.bos_id = token_id(conf["bos_token"]) if "bos_token" in conf else cfg.bos_id
        if conf.get("bos_token") is not None and self.bos_id is None:
            raise CheckpointError(f"{tc}: bos_token {conf['bos_token']!r} is not a token of {tj}")
        self.eos_ids = list(cfg.eos_ids) or [i for i in [token_id(conf.get("eos_token"))] if i is not None]
        end = id_list(gen.get("eos_token_id"))
        if not all(is_token_id(i) for i in end):
            raise CheckpointError(f"{gc}: eos_token_id {gen['eos_token_id']!r} is not a token id or a list of them")
        self.eos_ids += [i for i in end if i not in self.eos_ids]
        self.lead = template_lead(self.tok)              # what a prompt begins with
        if self.bos_id is not None and not 0 <= self.bos_id < cfg.vocab_size:
            raise CheckpointError(f"{path}: the BOS token id {self.bos_id} has no row in the embedding "
                                  f"(config.json's vocab_size {cfg.vocab_size})")
        pad = cfg.pad_id if cfg.pad_id is not None else token_id(conf.get("pad_token"))
        if pad is None or not 0 <= pad < cfg.vocab_size:      # old Llama configs say -1: any real id
            pad = self.eos_ids[0] if self.eos_ids and 0 <= self.eos_ids[0] < cfg.vocab_size else 0
        self.pad_id = pad                                     # does, padded positions are masked

    def encode(self, text: str, bos: bool | None = None) -> list[int]:
        """The ids of `text`: after what the tokenizer puts first (bos None: its template's lead),
        or after its BOS where asked (bos True) and it has one, or alone (bos False)."""
        ids = self.tok.encode(text, add_special_tokens=False).ids
        if bos is None:
            return self.lead + ids
        return [self.bos_id] + ids if bos and self.bos_id is not None else ids

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def pad(self, seqs: list[list[int]], side: str = "right", device=None):
        """Pad id lists to one (B, T) batch; returns (ids, mask)."""
        if side not in ("left", "right"):
            raise ValueError(f"pad: side {side!r}: give 'left' or 'right'")
        T = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), T), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(seqs), T, dtype=torch.long)
        for b, s in enumerate(seqs):
            sl = slice(0, len(s)) if side == "right" else slice(T - len(s), T)
            ids[b, sl], mask[b, sl] = torch.tensor(s, dtype=torch.long), 1
        return ids.to(device), mask.to(device)


def template_lead(tok) -> list[int]:
    """The ids tokenizer.json's post-processor (a TemplateProcessing, alone or in a Sequence) puts
    before a single sequence ($A): Llama's and Gemma's BOS; [] for none (GPT-2's ByteLevel). Read
    from the post-processor's own JSON (its pickled state), not the whole tokenizer's, which for
    Llama 3's 128k-token vocabulary is 9 MB written out and parsed again at every load."""
    pp = json.loads(tok.post_processor.__getstate__()) if tok.post_processor is not None else {}
    for p in pp.get("processors", []) if pp.get("type") == "Sequence" else [pp]:
        if p.get("type") == "TemplateProcessing":
            lead = []
            for piece in p["single"]:
                if "SpecialToken" not in piece:
                    break
                lead += p["special_tokens"][piece["SpecialToken"]["id"]]["ids"]
            return lead
    return []


def check_vocabulary(tok, cfg: Config, file: Path):
    """Every id of the tokenizer (its added tokens' too) has a row in the embedding: below
    config.json's vocab_size. A smaller vocabulary is fine (checkpoints pad the embedding to a
    round size: Qwen2.5's 151,665 tokens in 151,936 rows)."""
    vocab = tok.get_vocab(with_added_tokens=True)                   # token -> id
    if past := sorted((i, t) for t, i in vocab.items() if i >= cfg.vocab_size):
        (first, token), (last, _) = past[0], past[-1]
        raise CheckpointError(f"{file}: the tokenizer has {len(vocab)} tokens with ids up to {last}, but "
                              f"config.json's vocab_size is {cfg.vocab_size}: {len(past)} of them (the first "
                              f"{token!r}, id {first}) have no row in the model's embedding (a tokenizer "
                              f"of another model?)")


# ------------------------------------------------------------------------------ load and save
def weight_files(path: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file, for a single-file or a sharded checkpoint."""
    index = path / "model.safetensors.index.json"
    single = path / "model.safetensors"
    if index.exists():
        try:
            wm = json.loads(index.read_text())["weight_map"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        if not isinstance(wm, dict) or not all(isinstance(f, str) for f in wm.values()):
            raise CheckpointError(f"{index}: not a valid safetensors index (its weight_map is not "
                                  "{tensor name: file name})")
        return {name: path / f for name, f in wm.items()}
    if single.exists():
        with _open(single) as f:
            return {name: single for name in f.keys()}
    pickles = sorted(p.name for p in path.glob("pytorch_model*.bin"))
    if pickles:
        raise CheckpointError(f"{path}: its weights are PyTorch pickles ({', '.join(pickles[:2])}"
                              f"{', ...' if len(pickles) > 2 else ''}), which this loader never unpickles; "
                              f"write a safetensors copy once, with transformers: {convert_command(path)}")
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")


def transformers_command(*statements: str) -> str:
    """A shell command that runs `statements` with transformers imported as t (the fixes that
    loading errors suggest: this library never imports transformers itself)."""
    return f"python -c \"import transformers as t; {'; '.join(statements)}\""


def convert_command(path: Path) -> str:
    """The shell command that writes `path` (a checkpoint transformers reads) again as safetensors
    with a tokenizer.json, beside it in `path`-safetensors, in its stored dtype."""
    src, out = str(path), str(path.with_name(path.name + "-safetensors"))
    return transformers_command(f"t.AutoModelForCausalLM.from_pretrained({src!r}, torch_dtype='auto')"
                                f".save_pretrained({out!r})",
                                f"t.AutoTokenizer.from_pretrained({src!r}).save_pretrained({out!r})")


def _open(file: Path, device: str = "cpu"):
    if not file.exists():
        raise CheckpointError(f"{file}: weight file named by the checkpoint is missing")
    if file.is_dir():
        raise CheckpointError(f"{file}: a directory, where the checkpoint's weights (a safetensors file) belong")
    try:                              # (safetensors takes "cpu", not "cpu:0")
        return safe_open(str(file), framework="pt", device="cpu" if torch.device(device).type == "cpu" else str(device))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: unreadable safetensors file (truncated or corrupt?): {e}") from None


def check_device(device) -> torch.device:
    """The torch device for a one-device value (cpu, cuda, cuda:N), or a ValueError that says why
    it cannot be used."""
    dev, problem = _device_problem(device)
    if problem:
        raise ValueError(f"device {device!r}: {problem}")
    return dev


def _device_problem(device, here: bool = True) -> tuple[torch.device | None, str | None]:
    """(the device, None), or (None, why `device` cannot be used; with `here` False, only why it
    cannot be named: a plan for another machine)."""
    if "," in str(device):
        return None, "give one device here (cpu, cuda or cuda:N), not a list"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        return None, "use cpu, cuda or cuda:N"
    if dev.type == "cuda" and here and not torch.cuda.is_available():
        return None, "this machine has no CUDA GPU that torch can use; use cpu"
    if dev.type == "cuda" and here and (dev.index or 0) >= torch.cuda.device_count():
        return None, f"there are only {torch.cuda.device_count()} CUDA device(s)"
    return dev, None


def check_devices(spec, here: bool = True) -> list[torch.device]:
    """The devices of a --device value: one device; a comma list, each entry checked (cpu may
    repeat: cpu,cpu; "cuda" in a list is the current CUDA device); or "auto", every visible CUDA
    device (cpu where there is none). A ValueError names the bad entry. `here` False: named
    right, not necessarily on this machine (a plan for another; "cuda" is cuda:0 there)."""
    if spec == "auto":
        return [torch.device("cuda", i) for i in range(torch.cuda.device_count())] or [torch.device("cpu")]
    names = str(spec).split(",")
    if len(names) == 1 and here:
        return [check_device(spec)]
    devices = []
    for name in names:
        dev, problem = _device_problem(name.strip(), here)
        if problem:
            entry = f"entry {name.strip()!r}: " if len(names) > 1 else ""
            raise ValueError(f"device {spec!r}: {entry}{problem}")
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device() if here else 0)
        dev = torch.device("cpu") if dev.type == "cpu" else dev    # cpu:0 is cpu
        if dev.type == "cuda" and dev in devices:
            raise ValueError(f"device {spec!r}: {dev} is listed twice (only cpu may repeat)")
        devices.append(dev)
    return devices


# ------------------------------------------------------------------------ blocks across devices
def device_memory(device: torch.device) -> int:
    """A device's total memory in bytes (the host's RAM for cpu)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def device_free(device: torch.device) -> int:
    """The bytes a new allocation can take on a device now: the host's MemAvailable (else its
    total) for cpu, the free memory of a CUDA device."""
    if device.type == "cuda":                        # (with what torch's allocator holds unused)
        return torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        line = next(l for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemAvailable:"))
        return int(line.split()[1]) * 1024
    except (OSError, StopIteration, IndexError, ValueError):
        return device_memory(device)


def device_shares(devices: list[torch.device]) -> list[float]:
    """The share of the model each listed device should hold, in proportion to its memory: a
    CUDA device its total memory; a cpu entry the mean of the listed CUDA devices' (1 without
    any: cpu entries share equally)."""
    cuda = {d: device_memory(d) for d in devices if d.type == "cuda"}
    cpu = sum(cuda.values()) / len(cuda) if cuda else 1.0
    return [float(cuda.get(d, cpu)) for d in devices]


def split_blocks(n: int, need, shares: list[float]) -> list[int]:
    """The device index of each of n blocks: blocks in order, each device a contiguous run of them
    (possibly none). need(j, k, i): the bytes device j needs when it holds blocks k..i-1 (its
    weights, and whatever else it must hold then: weight_need, or a run's memory plan). It
    minimises the largest fill need / shares[j] over the devices; among the splits that reach it,
    the sum of squared fills (spread, not piled on one device). Two dynamic programmes over the
    devices in order: the least largest fill, then the least sum of squares within it."""
    fills, top = {}, max(shares)

    def fill(j, k, i):                                 # device j holding blocks k..i-1 (shares as fractions
        if (j, k, i) not in fills:                     # of the largest: a share of 1e-300 GiB overflowed)
            fills[j, k, i] = need(j, k, i) / (shares[j] / top)
        return fills[j, k, i]
    devices = range(len(shares))
    # largest[j][i]: the least largest fill of blocks < i on devices 0..j
    largest = [[fill(0, 0, i) for i in range(n + 1)]]
    for j in devices[1:]:
        largest.append([min(max(largest[j - 1][k], fill(j, k, i)) for k in range(i + 1)) for i in range(n + 1)])
    bound = largest[-1][n]
    # squares[j][i]: (least sum of squared fills of blocks < i on devices 0..j, each fill within
    # the bound; the cut k where device j's blocks begin)
    squares = [[(fill(0, 0, i) * fill(0, 0, i) if fill(0, 0, i) <= bound else math.inf, 0) for i in range(n + 1)]]
    for j in devices[1:]:
        squares.append([min((squares[j - 1][k][0] + fill(j, k, i) * fill(j, k, i) if fill(j, k, i) <= bound else math.inf, k)
                            for k in range(i + 1)) for i in range(n + 1)])
    device = [0] * n
    i = n
    for j in reversed(devices[1:]):                    # walk the cuts back from the last device
        k = squares[j][i][1]
        device[k:i] = [j] * (i - k)
        i = k
    return device


def weight_need(model: "CausalLM", dtype: torch.dtype, n_devices: int):
    """split_blocks' need by the weights alone: device j's weights outside the blocks (fixed_bytes)
    and those of blocks k..i-1, in `dtype`. The model may be on the meta device (a plan)."""
    fixed = fixed_bytes(model, dtype, n_devices)
    starts = [0]
    for block in model.blocks:
        starts.append(starts[-1] + weight_bytes(dtype, block))     # starts[i]: the blocks < i
    return lambda j, k, i: fixed[j] + starts[i] - starts[k]


def check_stages(stages: list[int], n_blocks: int, n_devices: int):
    """A placement is each block's device index, in order (a contiguous run each); else a ValueError."""
    if len(stages) != n_blocks or list(stages) != sorted(stages) or not all(0 <= j < n_devices for j in stages):
        raise ValueError(f"placement {stages}: give each of the {n_blocks} blocks a device index in "
                         f"0..{n_devices - 1}, in order")


def weight_bytes(dtype: torch.dtype, *modules) -> int:
    return sum(p.numel() for m in modules for p in m.parameters()) * dtype.itemsize


def fixed_bytes(model: "CausalLM", dtype: torch.dtype, n_devices: int) -> list[int]:
    """The weights outside the blocks on each of n devices: the embeddings (GPT-2: and its
    positions) on the first; the final norm and the head (tied: its bias alone, its weight the
    embeddings') on the last (tied: the first)."""
    fixed = [0] * n_devices
    fixed[0] += weight_bytes(dtype, model.embed, *([model.body.wpe] if model.cfg.arch == "gpt2" else []))
    head = [p for p in (*model.norm.parameters(), *model.head.parameters()) if p is not model.embed.weight]
    fixed[0 if model.cfg.tie_embeddings else -1] += sum(p.numel() for p in head) * dtype.itemsize
    return fixed


def parameter_devices(model: "CausalLM", devices: list[torch.device],
                      blocks: list[torch.device]) -> dict[str, torch.device]:
    """Parameter name -> device: each block's on its device in `blocks`, the embeddings on the
    first listed device (the home device), the final norm with the head: on the last listed
    device, or on the first when the head is tied to the embeddings."""
    home = devices[0]
    head = home if model.cfg.tie_embeddings else devices[-1]
    where = {id(p): home for p in model.parameters()}
    for block, dev in zip(model.blocks, blocks):
        where.update({id(p): dev for p in block.parameters()})
    where.update({id(p): head for m in (model.norm, model.head) for p in m.parameters()
                  if p is not model.embed.weight})
    return {n: where[id(p)] for n, p in model.named_parameters()}


def tensor_headers(files: dict[str, Path]) -> dict[str, tuple[Path, str, tuple]]:
    """Tensor name -> (file, safetensors dtype code, shape), from the files' headers (no data read)."""
    out = {}
    for file in sorted(set(files.values())):
        with _open(file) as f:
            for name in f.keys():
                part = f.get_slice(name)
                out[name] = (file, part.get_dtype(), tuple(part.get_shape()))
    return out


def check_tensors(path: Path, cfg: Config, expected: dict[str, tuple], headers: dict) -> None:
    """Every stored weight a float, no tensor missing or unexpected, every shape as config.json
    implies. expected: checkpoint name -> shape."""
    names = {n for n in headers if not n.endswith(IGNORED_SUFFIXES) and n.startswith(cfg.weights_prefix)
             and not (cfg.tie_embeddings and n == cfg.weights_prefix + cfg.head_weight)}    # tied: ignored
    for name in sorted(names):
        file, code, _ = headers[name]
        if code not in FLOAT_CODES:
            raise CheckpointError(f"{file}: tensor {name} has dtype {code}: quantised or integer checkpoints "
                                  f"are not supported (weights must be float16, bfloat16, float32 or float64)")
    if missing := sorted(set(expected) - names):
        raise CheckpointError(f"{path}: missing tensor(s) {', '.join(missing[:5])}"
                              + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    if extra := sorted(names - set(expected)):
        raise CheckpointError(f"{path}: unexpected tensor(s) {', '.join(extra[:5])} for a "
                              f"{cfg.arch} model with this config.json")
    for name, shape in expected.items():
        file, _, stored = headers[name]
        if stored != shape:
            raise CheckpointError(f"{file}: tensor {name} has shape {stored}, config.json implies {shape}")


def read_config(path: Path) -> Config:
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory" if not path.exists() else
                              f"{path} is a file; give the checkpoint's directory (config.json, *.safetensors, tokenizer.json)")
    if not (path / "config.json").exists():
        raise CheckpointError(f"{path}: config.json is missing (is this an HF checkpoint directory?)")
    return Config.from_hf(read_json(path / "config.json"))


def checkpoint_config(path) -> Config:
    """The model's config as loading will read it: config.json completed by the checkpoint's files
    (check_checkpoint: a head they store where config.json ties it, untied_by_files); config.json
    alone where no weights are there yet (--plan before the download)."""
    path = Path(path)
    if not any(path.glob("*.safetensors")):
        return read_config(path)
    return check_checkpoint(path)[0].cfg


def check_checkpoint(path) -> tuple[CausalLM, dict, dict[str, str]]:
    """Everything loading checks from the checkpoint's files alone, before any tensor data is
    read (but a tied head the files also store: untied_by_files): config.json, the stored
    tensors' names, shapes and float dtypes (the safetensors headers) against the model
    config.json implies, and the tokenizer. load runs it first, and so does --plan
    (plan.print_plan), which thus refuses what the run would, in the same words. Returns the
    model on the meta device (its tokenizer set), the headers (tensor_headers) and checkpoint
    name -> parameter name of each tensor to read."""
    path = Path(path)
    cfg = read_config(path)
    headers = tensor_headers(weight_files(path))
    model = meta_model(cfg, headers)
    if untied_by_files(model, headers):
        cfg = replace(cfg, tie_embeddings=False)
        model = meta_model(cfg, headers)
    params = {model.checkpoint_name(n): n for n in model.state_dict()
              if not (cfg.tie_embeddings and n == cfg.head_weight)}           # checkpoint -> parameter
    if cfg.arch == "gpt_neox" and "embed_out.weight" in params and "embed_out.weight" not in headers \
            and "lm_head.weight" in headers:          # as transformers 5 saves it without save_original_format
        params["lm_head.weight"] = params.pop("embed_out.weight")
    shapes = {n: tuple(p.shape) for n, p in model.state_dict().items()}
    check_tensors(path, cfg, {c: shapes[n] for c, n in params.items()}, headers)
    model.tokenizer = Tokenizer(path, cfg)
    return model, headers, params


def meta_model(cfg: Config, headers: dict) -> CausalLM:
    """The model of `cfg` on the meta device, named as the files name its tensors."""
    with torch.device("meta"):
        model = CausalLM(cfg)
    if cfg.arch == "gpt2" and "transformer.wte.weight" not in headers and "wte.weight" in headers:
        model.missing_prefix = "transformer."          # saved from GPT2Model: h.0..., wte.weight
    return model


def untied_by_files(model: CausalLM, headers: dict) -> bool:
    """Whether the files store a head of other values than the embeddings where config.json ties
    them: transformers 5 then reads the head (Mistral 3's releases leave tie_word_embeddings to
    its default, true, and store their own head), and so does load; where they are equal, tied."""
    cfg = model.cfg
    head, embed = (model.checkpoint_name(n) for n in (cfg.head_weight, f"{cfg.layout[0]}.{cfg.layout[1]}.weight"))
    if not cfg.tie_embeddings or head not in headers or embed not in headers:
        return False
    read = lambda name, rows=None: _open(headers[name][0]).get_slice(name)[:rows]
    if not torch.equal(read(head, 1), read(embed, 1)):       # the first rows tell most heads apart
        return True
    return not torch.equal(read(head), read(embed))


def load(path, device="cpu", dtype="float32", placement=None) -> CausalLM:
    """Load config, weights and tokenizer of an HF checkpoint directory. The model is built on the
    meta device and each tensor goes straight to its device in `dtype`; names, shapes and (float)
    dtypes, and the tokenizer, are checked from the files before any data is read
    (check_checkpoint), and every weight must be finite. device: one device, or several
    (check_devices: "cuda:0,cuda:1", "cpu,cpu", "auto"), over which the blocks are placed in
    order, in proportion to the devices' memory (device_shares): by `placement`, a function
    shares -> each block's device index (a run's memory plan: plan.plan_stages), else by the
    weights alone (weight_need)."""
    devices = check_devices(device)
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    model, headers, params = check_checkpoint(path)
    cfg = model.cfg
    if len(devices) > 1:
        shares = device_shares(devices)
        model.devices = devices
        model.stages = placement(shares) if placement else \
            split_blocks(cfg.n_layers, weight_need(model, DTYPES[dtype], len(devices)), shares)
        check_stages(model.stages, cfg.n_layers, len(devices))
    blocks = [devices[j] for j in model.stages] if model.stages else devices[:1] * cfg.n_layers
    where = parameter_devices(model, devices, blocks)                           # name -> device
    state = {}
    for file, dev in sorted({(headers[c][0], where[n]) for c, n in params.items()}, key=str):
        with _open(file, str(dev)) as f:
            for stored in (c for c in params if headers[c][0] == file and where[params[c]] == dev):
                t = f.get_tensor(stored).to(DTYPES[dtype])
                if not torch.isfinite(t).all():
                    if torch.isfinite(f.get_tensor(stored)).all():
                        raise CheckpointError(f"{file}: tensor {stored} holds values beyond {dtype}'s range: load "
                                              "it in a dtype of wider range (float32 or bfloat16)")
                    raise CheckpointError(f"{file}: tensor {stored} contains NaN or Inf")
                state[params[stored]] = t
    model.load_state_dict(state, assign=True, strict=False)   # names and shapes checked above
    if cfg.tie_embeddings:
        model.head.weight = model.embed.weight
    for name, inv_freq in rope_buffers(cfg).items():        # built on the meta device: made again
        setattr(model, name, inv_freq.to(devices[0]))
    return model.eval().requires_grad_(False)


# What save leaves out of the edited checkpoint, by file name (lower-cased): weights in any other
# format than the safetensors it writes, and their indexes (they hold the unedited model, which a
# loader that prefers them, as from_pretrained(..., use_safetensors=False), would silently get),
# and a trainer's state (optimizer.pt, scheduler.pt, scaler.pt, rng_state*.pth, training_args.bin
# fall under the patterns; trainer_state.json is named).
LEFT_OUT = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.gguf", "*.ggml",
            "*.onnx", "*.onnx_data", "*.onnx.data", "*.ot", "*.tflite", "*.npz", "*.npy", "*.pkl", "*.pickle",
            "*.index.json", "trainer_state.json")


def left_out_of_save(name: str) -> bool:
    """Whether save leaves a file of the input checkpoint out of the edited one: LEFT_OUT, but
    for the safetensors index (save writes the files it names)."""
    name = name.lower()
    return name != "model.safetensors.index.json" and any(fnmatch.fnmatchcase(name, p) for p in LEFT_OUT)


def check_seed(seed, name: str = "seed"):
    """A seed torch's generators take, with room for the seed + k the samplers add: a ValueError
    naming it otherwise (torch's own is 'Overflow when unpacking long long')."""
    if not whole_number(seed) or not -2 ** 63 <= operator.index(seed) < 2 ** 63:
        raise ValueError(f"{name} {seed!r}: give a whole number from -2**63 to 2**63 - 1")


def count(v) -> bool:
    """A whole number of at least 1 (a size, a number of positions)."""
    return whole_number(v) and v >= 1


def whole_number(v) -> bool:
    """An int (numpy's too), not a bool."""
    try:
        operator.index(v)
    except TypeError:
        return False
    return not isinstance(v, bool)


def write_safetensors(tensors: dict, path, metadata: dict | None = None):
    """safetensors' save_file, its failures an OSError naming the file (a full disk: its
    SafetensorError), and the file readable as any this process writes (save_file leaves it to
    its owner alone, 0600: an edited model no one else on the machine could load)."""
    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as e:
        raise OSError(f"{path}: {e}") from None
    umask = os.umask(0)          # (read by setting it: for the moment between, this process is one thread)
    os.umask(umask)
    try:
        os.chmod(path, 0o666 & ~umask)
    except OSError:              # a file system without modes (FAT, some network mounts): its own
        pass


# The metadata key save adds to each weights file it writes: a digest of the source checkpoint
# (saved_from), so that a later save from the same checkpoint may replace the files and a save
# from another may not (two fine-tunes of one base share config.json and file names).
SAVED_FROM = "edited_from"


def saved_from(src: Path) -> str:
    """The source checkpoint's directory and its weights files' names, sizes and modification
    times, as a digest: a model retrained at the same path is another source; read without
    reading the weights."""
    files = sorted({file for file, _, _ in tensor_headers(weight_files(src)).values()})
    stamp = [str(Path(src).resolve())] + [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    return hashlib.sha256(json.dumps(stamp).encode()).hexdigest()[:16]


def stored_source(file: Path) -> str | None:
    """The SAVED_FROM of a weights file (None: not written by save, or not readable)."""
    try:
        with safe_open(str(file), "pt") as f:
            return (f.metadata() or {}).get(SAVED_FROM)
    except (SafetensorError, OSError):
        return None


def check_save_target(src: Path, out: Path, ours: set, source: str):
    """A ValueError where `out` holds another checkpoint than an earlier save of src: a config.json
    not src's, weights files save does not write (`ours`: another layout's, another format's), or
    of its names but not saved from src as it is now (SAVED_FROM other than `source`)."""
    if (out / "config.json").exists() and (out / "config.json").read_bytes() != (src / "config.json").read_bytes():
        raise ValueError(f"{out} holds another checkpoint (its config.json is not {src}'s): writing this one "
                         "over it would mix two models; save into a new or empty directory")
    if other := sorted(p.name for p in out.glob("*") if p.name not in ours and left_out_of_save(p.name)):
        raise ValueError(f"{out} holds other weights ({', '.join(other[:3])}): writing this checkpoint "
                         "beside them would mix two models; save into a new or empty directory")
    if foreign := sorted(name for name in ours if (out / name).exists() and stored_source(out / name) != source):
        raise ValueError(f"{out} holds weights that are not an earlier save of {src} as it is now "
                         f"({', '.join(foreign[:3])}: another model's, a save from a copy or an earlier version "
                         "of the model, or by an earlier version of this code): writing over them could lose "
                         "a model; save into a new or empty directory, or remove them first")


def save(src, out, tensors: dict[str, torch.Tensor], replace: bool = False) -> list[str]:
    """Write checkpoint `src` to `out` in its own layout (same files, names, dtypes, sharding and
    index) with the given tensors replaced, and copy the files that describe the model (config,
    tokenizer, generation config, README, licence, ...): every other file at src's top level but
    those LEFT_OUT, weights of other formats and training state, whose names it returns (sorted).
    `tensors` maps checkpoint names to tensors in the stored layout, as CausalLM.edit_tensors
    returns them (for GPT-2 [d_mlp, d_model], not edit_weight's (d_model, d_mlp) view); a shape
    that differs from the stored one is an error, and so is an `out` that holds another
    checkpoint (a config.json not src's, weights files save does not write: another layout's,
    another format's, or of save's names but not saved from src: SAVED_FROM); saving again over
    an earlier save of the same checkpoint replaces it. `replace`: the caller knows `out` for its
    own earlier save, perhaps cut short (torn files): written over without those checks."""
    if not isinstance(out, (str, os.PathLike)) or not os.fspath(out):     # (Path("") is ".": taken)
        raise ValueError(f"save: the edited model's directory {out!r}: give a path (an empty one is the "
                         "working directory)")
    src = Path(src)
    out = Path(out)
    if out.resolve() == src.resolve():
        raise ValueError(f"refusing to write the edited model into its input checkpoint {src}")
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file; the checkpoint is a directory: save into a new or empty one")
    headers = tensor_headers(weight_files(src))
    ours = {file.name for file, _, _ in headers.values()}       # the weights files written below
    source = saved_from(src)
    if not replace:
        check_save_target(src, out, ours, source)
    if unknown := sorted(set(tensors) - set(headers)):
        raise KeyError(f"tensor(s) not in checkpoint {src}: {', '.join(unknown)}")
    for n, t in tensors.items():
        if tuple(t.shape) != headers[n][2]:
            raise ValueError(f"tensor {n}: shape {tuple(t.shape)} given, the checkpoint stores "
                             f"{headers[n][2]} (pass model.edit_tensors(layers): the stored layout)")
    out.mkdir(parents=True, exist_ok=True)
    for file in sorted({file for file, _, _ in headers.values()}):
        with _open(file) as f:
            meta = f.metadata()
            data = {n: f.get_tensor(n) for n in f.keys()}
        for n in data:
            if n in tensors:
                data[n] = tensors[n].detach().to("cpu", data[n].dtype).contiguous()
        write_safetensors(data, out / file.name, metadata=(meta or {}) | {SAVED_FROM: source})
    left_out = []
    for p in sorted(src.iterdir()):          # config, tokenizer, generation config, the index, ...
        if not p.is_file() or p.name in ours:
            continue
        if left_out_of_save(p.name):
            left_out.append(p.name)
        else:
            shutil.copy2(p, out / p.name)
    return left_out


# ----------------------------------------------------------------------------------- generation
@torch.no_grad()
def generate(model: CausalLM, seqs: list[list[int]], max_new_tokens: int, top_k: int | None = None,
             seed: int = 0, stop_at_eos: bool = True) -> list[list[int]]:
    """Greedy (top_k None) or top-k sampling with a KV cache; prompts are left-padded into one
    batch. Returns the new tokens of each sequence."""
    if len(seqs) == 0 or any(len(q) == 0 for q in seqs):
        raise ValueError("generate: give at least one prompt, each of at least one token (a BOS, say)")
    if bad := [t for q in seqs for t in q if not (whole_number(t) and 0 <= t < model.cfg.vocab_size)]:
        raise ValueError(f"generate: token id {bad[0]!r} is not one of the model's {model.cfg.vocab_size}")
    if not whole_number(max_new_tokens) or max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens {max_new_tokens!r}: give a whole number of at least 0")
    dev = model.embed.weight.device
    ids, mask = model.tokenizer.pad(seqs, side="left", device=dev)
    B = len(seqs)
    cache = KVCache(model.cfg, B, ids.shape[1] + max_new_tokens, model.placement, model.embed.weight.dtype)
    gen = torch.Generator(device=dev).manual_seed(seed)
    new = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    eos = torch.tensor(model.tokenizer.eos_ids or [-1], device=dev)
    switch = model.cfg.longrope_switch
    seq = ids
    for _ in range(max_new_tokens):
        if switch is not None and cache.length and cache.length <= switch < mask.shape[1]:
            cache.length, ids = 0, seq        # LongRoPE's first long pass: every key again (transformers' Phi-3)
        logits = model(ids, mask, cache=cache).logits[:, -1]
        if top_k is None:
            nxt = logits.argmax(-1)
        else:
            v, i = logits.topk(min(top_k, logits.shape[-1]), dim=-1)
            nxt = i.gather(1, torch.multinomial(v.softmax(-1), 1, generator=gen)).squeeze(1)
        for b, (t, d) in enumerate(zip(nxt.tolist(), done.tolist())):   # one host sync per token
            if not d:
                new[b].append(t)
        if stop_at_eos:
            done |= torch.isin(nxt, eos)
        if done.all():
            break
        ids = nxt[:, None]
        seq = torch.cat([seq, ids], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return new


def cache_too_large(model: CausalLM, positions: int) -> str | None:
    """Why generate's key-value cache for `positions` (made whole first, one sequence) cannot fit
    what is free on the devices its layers are on (filling it past the host's would end in the
    kernel's out-of-memory kill, no message), or None."""
    per_layer = 2 * model.cfg.n_kv_heads * model.cfg.head_dim * positions * model.embed.weight.element_size()
    for device in dict.fromkeys(model.placement):
        need, free = model.placement.count(device) * per_layer, device_free(device)
        if need > free:
            return (f"the key-value cache for {positions:,} positions takes {need / 2 ** 30:.3g} GiB on {device}, "
                    f"where {free / 2 ** 30:.3g} GiB is free")
    return None


def main(argv=None):
    p = argparse.ArgumentParser(description="Continue a prompt with a checkpoint (greedy unless --top-k).")
    p.add_argument("checkpoint", help="HF-format directory: config.json, *.safetensors, tokenizer.json")
    p.add_argument("--prompt", default="", help="text to continue; empty starts from BOS")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda, cuda:N, a list the layers are spread over (cuda:0,cuda:1) or auto")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    args = p.parse_args(argv)
    if args.max_new_tokens < 0 or (args.top_k is not None and args.top_k < 1):
        p.error("--max-new-tokens must be at least 0 and --top-k at least 1")
    try:
        check_seed(args.seed, "--seed")
    except ValueError as e:
        p.error(str(e))
    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError as e:  # bytes the shell passed that are not UTF-8 (a TypeError in the tokenizer)
        p.error(f"--prompt is not valid text: {e.reason} at character {e.start}")
    try:
        model = load(args.checkpoint, args.device, args.dtype)
    except ValueError as e:          # CheckpointError, a bad --device or --dtype
        raise SystemExit(f"error: {e}")
    ids = model.tokenizer.encode(args.prompt)
    if not ids:                      # an empty prompt starts from BOS, where the tokenizer has one
        ids = model.tokenizer.encode(args.prompt, bos=True)
    if not ids:
        raise SystemExit(f"error: the prompt {args.prompt!r} encodes to no tokens and the tokenizer of "
                         f"{args.checkpoint} has no BOS token to start from: give a --prompt")
    if len(ids) + args.max_new_tokens > model.cfg.max_positions:
        what = f"the prompt ({len(ids)} tokens) and --max-new-tokens {args.max_new_tokens} go past the model's " \
               f"{model.cfg.max_positions} positions"
        if model.cfg.arch == "gpt2":           # learned positions: none past them
            raise SystemExit(f"error: {what} ({model.cfg.positions_field})")
        print(f"note: {what} ({model.cfg.positions_field}): what follows is past what it was trained on", file=sys.stderr)
    if problem := cache_too_large(model, len(ids) + args.max_new_tokens):
        raise SystemExit(f"error: --max-new-tokens {args.max_new_tokens}: {problem}")
    try:
        out = generate(model, [ids], args.max_new_tokens, args.top_k, args.seed)[0]
    except ValueError as e:          # e.g. a GPT-2 prompt past its learned positions
        raise SystemExit(f"error: {e}")
    except (MemoryError, RuntimeError) as e:     # the key-value cache, made whole first (CPU: a RuntimeError)
        if not isinstance(e, (MemoryError, torch.OutOfMemoryError)) and "can't allocate memory" not in str(e):
            raise
        raise SystemExit(f"error: out of memory generating {args.max_new_tokens} tokens (the key-value cache is "
                         f"made for all {len(ids) + args.max_new_tokens} first): {str(e).splitlines()[0]}") from None
    except KeyboardInterrupt:        # (the text is decoded whole, at the end: none yet)
        print("\ninterrupted", file=sys.stderr)
        raise SystemExit(130) from None
    print(model.tokenizer.decode(ids + out))   # decoded whole: the tokenizer places the spaces


if __name__ == "__main__":
    main()
