"""A small, hand-written LLaMA (Llama-2/3/3.1/3.2) and GPT-J forward pass on HF-format checkpoints.

Parameter names mirror the checkpoint's tensor names one to one, so loading is a strict
name-and-shape match. The forward pass returns what knowledge editing needs without hooks:
the MLP keys (the input of `down_proj` / `fc_out`) and residual-stream outputs at chosen layers;
it accepts an additive delta on the residual stream at (layer, per-sequence position); it can stop
after a layer, or start at one from a given residual stream, and compute logits only where asked.

    python model.py CHECKPOINT --prompt "Once upon a time" --max-new-tokens 50
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

SUPPORTED = ("llama", "gptj")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Buffers some checkpoints carry that are not weights (recomputed here): allowed, ignored.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "attn.bias", "attn.masked_bias")


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded as it is; the message names the problem."""


# --------------------------------------------------------------------------------------- config
@dataclass
class Config:
    arch: str                     # "llama" | "gptj"
    vocab_size: int
    d_model: int                  # hidden size
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_mlp: int                    # MLP inner size (the edited weight is d_model x d_mlp)
    norm_eps: float
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None   # Llama-3.1 style {"rope_type": "llama3", ...}
    rotary_dim: int = 0           # GPT-J: rotary over the first rotary_dim dims of each head
    tie_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    max_positions: int = 2048
    bos_id: int | None = None
    eos_ids: list[int] = field(default_factory=list)
    pad_id: int | None = None

    @staticmethod
    def from_hf(c: dict) -> "Config":
        mt = c.get("model_type")
        if mt not in SUPPORTED:
            raise CheckpointError(f"unsupported model_type {mt!r} in config.json: supported are "
                                  + ", ".join(repr(s) for s in SUPPORTED))
        eos = c.get("eos_token_id")
        eos = [] if eos is None else eos if isinstance(eos, list) else [eos]
        try:
            if mt == "llama":
                nh = c["num_attention_heads"]
                rp = c.get("rope_parameters") or {}      # transformers >= 5 writes rope here
                rs = c.get("rope_scaling") or (rp if rp.get("rope_type", "default") != "default" else None)
                if rs is not None and rs.get("rope_type", rs.get("type")) not in ("llama3", "default"):
                    raise CheckpointError(f"unsupported rope_scaling {rs!r}: only 'llama3' is implemented")
                return Config("llama", c["vocab_size"], c["hidden_size"], c["num_hidden_layers"], nh,
                              c.get("num_key_value_heads") or nh,
                              c.get("head_dim") or c["hidden_size"] // nh, c["intermediate_size"],
                              c.get("rms_norm_eps", 1e-6), c.get("rope_theta", rp.get("rope_theta", 10000.0)), rs, 0,
                              c.get("tie_word_embeddings", False), c.get("attention_bias", False),
                              c.get("mlp_bias", False), c.get("max_position_embeddings", 2048),
                              c.get("bos_token_id"), eos, c.get("pad_token_id"))
            nh, d = c["n_head"], c["n_embd"]
            return Config("gptj", c["vocab_size"], d, c["n_layer"], nh, nh, d // nh,
                          c.get("n_inner") or 4 * d, c.get("layer_norm_epsilon", 1e-5), 10000.0, None,
                          c.get("rotary_dim") or d // nh, False, False, True,
                          c.get("n_positions", 2048), c.get("bos_token_id"), eos, c.get("pad_token_id"))
        except KeyError as e:
            raise CheckpointError(f"config.json (model_type {mt!r}) lacks the field {e.args[0]!r}") from None


# ----------------------------------------------------------------------------------------- rope
def rope_inv_freq(cfg: Config) -> torch.Tensor:
    """Rotary inverse frequencies (GPT-J: over rotary_dim; LLaMA: over the head), with Llama-3.1
    'llama3' scaling: long wavelengths slowed by `factor`, short ones kept, a blend in between."""
    r = cfg.rotary_dim if cfg.arch == "gptj" else cfg.head_dim
    inv = 1.0 / cfg.rope_theta ** (torch.arange(0, r, 2, dtype=torch.float32) / r)
    rs = cfg.rope_scaling
    if not rs or rs.get("rope_type", rs.get("type")) != "llama3":
        return inv
    factor, lo, hi = rs["factor"], rs.get("low_freq_factor", 1.0), rs.get("high_freq_factor", 4.0)
    old = rs.get("original_max_position_embeddings", 8192)
    wavelen = 2 * math.pi / inv
    smooth = ((old / wavelen - lo) / (hi - lo)).clamp(0, 1)    # 0: long waves, 1: short waves
    blended = (1 - smooth) * inv / factor + smooth * inv
    return torch.where(wavelen > old / lo, inv / factor, torch.where(wavelen < old / hi, inv, blended))


def rope_llama(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """LLaMA (HF layout): rotate the two halves of the whole head. x (B, nh, T, hd); cos/sin (B, 1, T, hd/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def rope_gptj(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """GPT-J: rotate interleaved pairs (0,1), (2,3), ... of the first rotary_dim dims; the rest pass."""
    r = 2 * cos.shape[-1]
    xr, xp = x[..., :r], x[..., r:]
    x1, x2 = xr[..., 0::2], xr[..., 1::2]
    rot = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    return torch.cat((rot, xp), dim=-1)


# --------------------------------------------------------------------------------------- blocks
class KVCache:
    """Preallocated keys/values for incremental decoding: (B, n_kv, max_len, hd) per layer."""

    def __init__(self, cfg: Config, batch: int, max_len: int, device, dtype):
        shape = (batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.length = 0


class Attention(nn.Module):
    def __init__(self, cfg: Config, out_name: str, bias: bool):
        super().__init__()
        self.cfg, self.out_name = cfg, out_name
        hd, nh, nkv = cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
        self.q_proj = nn.Linear(cfg.d_model, nh * hd, bias=bias)
        self.k_proj = nn.Linear(cfg.d_model, nkv * hd, bias=bias)
        self.v_proj = nn.Linear(cfg.d_model, nkv * hd, bias=bias)
        setattr(self, out_name, nn.Linear(nh * hd, cfg.d_model, bias=bias))   # o_proj | out_proj

    def forward(self, x, rope, cos, sin, allowed, cache: KVCache | None, layer: int):
        B, T, _ = x.shape
        hd, nh, nkv = self.cfg.head_dim, self.cfg.n_heads, self.cfg.n_kv_heads
        q = rope(self.q_proj(x).view(B, T, nh, hd).transpose(1, 2), cos, sin)   # (B, nh, T, hd)
        k = rope(self.k_proj(x).view(B, T, nkv, hd).transpose(1, 2), cos, sin)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, nkv, hd).transpose(1, 2)
        if cache is not None:
            s = cache.length
            cache.k[layer][:, :, s:s + T], cache.v[layer][:, :, s:s + T] = k, v
            k, v = cache.k[layer][:, :, :s + T], cache.v[layer][:, :, :s + T]
        if nkv != nh:                                   # grouped-query: head h reads kv head h // rep
            k, v = k.repeat_interleave(nh // nkv, dim=1), v.repeat_interleave(nh // nkv, dim=1)
        if allowed is None:     # right padding, no cache: plain causal (fused kernels)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)     # (B, nh, T, hd)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return getattr(self, self.out_name)(y.transpose(1, 2).reshape(B, T, nh * hd))


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(d)), eps

    def forward(self, x):   # computed in float32, cast back (as the reference implementation)
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class LlamaMLP(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        b = cfg.mlp_bias
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_mlp, bias=b)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_mlp, bias=b)
        self.down_proj = nn.Linear(cfg.d_mlp, cfg.d_model, bias=b)

    def forward(self, x):   # returns (output, key = input of down_proj)
        key = F.silu(self.gate_proj(x)) * self.up_proj(x)
        return self.down_proj(key), key


class GPTJMLP(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.fc_in = nn.Linear(cfg.d_model, cfg.d_mlp)
        self.fc_out = nn.Linear(cfg.d_mlp, cfg.d_model)

    def forward(self, x):   # gelu_new is the tanh approximation
        key = F.gelu(self.fc_in(x), approximate="tanh")
        return self.fc_out(key), key


class LlamaBlock(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg, "o_proj", cfg.attention_bias)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(self, h, *attn_args):   # sequential: attention, then MLP
        h = h + self.self_attn(self.input_layernorm(h), rope_llama, *attn_args)
        out, key = self.mlp(self.post_attention_layernorm(h))
        return h + out, key


class GPTJBlock(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg, "out_proj", False)
        self.mlp = GPTJMLP(cfg)

    def forward(self, h, *attn_args):   # parallel: attention and MLP both read one LayerNorm
        x = self.ln_1(h)
        out, key = self.mlp(x)
        return h + self.attn(x, rope_gptj, *attn_args) + out, key


# ---------------------------------------------------------------------------------------- model
@dataclass
class Output:
    logits: torch.Tensor | None                       # float32, (B, T, V) or (B, k, V) with logits_at
    keys: dict = field(default_factory=dict)          # layer -> (B, T, d_mlp) MLP keys
    outs: dict = field(default_factory=dict)          # layer -> (B, T, d_model) residual after layer


class CausalLM(nn.Module):
    """LlamaForCausalLM / GPTJForCausalLM with the checkpoint's parameter names."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        if cfg.arch == "llama":
            self.model = nn.Module()
            self.model.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
            self.model.layers = nn.ModuleList(LlamaBlock(cfg) for _ in range(cfg.n_layers))
            self.model.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        else:
            self.transformer = nn.Module()
            self.transformer.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
            self.transformer.h = nn.ModuleList(GPTJBlock(cfg) for _ in range(cfg.n_layers))
            self.transformer.ln_f = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=cfg.arch == "gptj")
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.tokenizer: Tokenizer | None = None

    # the same three parts under each architecture's own names
    embed = property(lambda s: s.model.embed_tokens if s.cfg.arch == "llama" else s.transformer.wte)
    blocks = property(lambda s: s.model.layers if s.cfg.arch == "llama" else s.transformer.h)
    norm = property(lambda s: s.model.norm if s.cfg.arch == "llama" else s.transformer.ln_f)

    def edit_weight_name(self, layer: int) -> str:
        """Name of the edited MLP output projection ([d_model, d_mlp]) at `layer`."""
        return (f"model.layers.{layer}.mlp.down_proj.weight" if self.cfg.arch == "llama"
                else f"transformer.h.{layer}.mlp.fc_out.weight")

    def edit_weight(self, layer: int) -> torch.Tensor:
        return self.blocks[layer].mlp.down_proj.weight if self.cfg.arch == "llama" \
            else self.blocks[layer].mlp.fc_out.weight

    def forward(self, ids, mask=None, *, keys_at=(), outs_at=(), delta=None, stop_after=None,
                logits_at=None, start=None, cache: KVCache | None = None) -> Output:
        """ids (B, T) long; mask (B, S) with 1 on real tokens (S = T, or cache length + T), left or
        right padding alike: positions count real tokens only.
        keys_at / outs_at: layers whose MLP keys / residual outputs to return.
        delta: (layer, pos (B,), vec (B, d)) adds vec[b] to layer's output at position pos[b].
        stop_after: last layer to run (no logits). start: (layer, h) runs layers > layer from the
        residual h (B, T, d) instead of embedding ids. logits_at: (B, k) positions to score."""
        B, T = ids.shape
        past = cache.length if cache is not None else 0
        mask = torch.ones(B, past + T, dtype=torch.long, device=ids.device) if mask is None else mask
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]                 # (B, T)
        freqs = pos[:, None, :, None].float() * self.inv_freq                     # (B, 1, T, hd/2)
        dt = self.embed.weight.dtype
        cos, sin = freqs.cos().to(dt), freqs.sin().to(dt)
        allowed = None          # right padding without a cache: causal masking alone is exact
        if past or not bool((mask[:, 1:] <= mask[:, :-1]).all()):    # for the real tokens
            qi = torch.arange(past, past + T, device=ids.device)
            kj = torch.arange(past + T, device=ids.device)
            allowed = (kj[None, :] <= qi[:, None])[None] & mask.bool()[:, None, :]   # (B, T, S)
            allowed = (allowed | (kj[None, :] == qi[:, None])[None])[:, None]       # a pad row sees itself
        first, h = (0, self.embed(ids)) if start is None else (start[0] + 1, start[1])
        last = self.cfg.n_layers - 1 if stop_after is None else stop_after
        out = Output(None)
        for i in range(first, last + 1):
            h, key = self.blocks[i](h, cos, sin, allowed, cache, i)
            if i in keys_at:
                out.keys[i] = key
            if delta is not None and delta[0] == i:
                h = h.index_put((torch.arange(B, device=h.device), delta[1]), delta[2].to(h.dtype),
                                accumulate=True)
            if i in outs_at:
                out.outs[i] = h
        if cache is not None:
            cache.length += T
        if stop_after is None:
            if logits_at is not None:
                h = h.gather(1, logits_at[..., None].expand(-1, -1, h.shape[-1]))
            out.logits = self.lm_head(self.norm(h)).float()
        return out


# ------------------------------------------------------------------------------------ tokenizer
class Tokenizer:
    """tokenizer.json through the `tokenizers` library; BOS handled here, in one place."""

    def __init__(self, path: Path, cfg: Config):
        from tokenizers import Tokenizer as HFTok
        tj, tc = path / "tokenizer.json", path / "tokenizer_config.json"
        if not tj.exists():
            raise CheckpointError(f"{path}: tokenizer.json is missing (needed to encode prompts)")
        self.tok = HFTok.from_file(str(tj))
        conf = json.loads(tc.read_text()) if tc.exists() else {}

        def token_id(v):
            v = v.get("content") if isinstance(v, dict) else v
            return self.tok.token_to_id(v) if isinstance(v, str) else None
        self.bos_id = cfg.bos_id if cfg.bos_id is not None else token_id(conf.get("bos_token"))
        self.eos_ids = cfg.eos_ids or [i for i in [token_id(conf.get("eos_token"))] if i is not None]
        self.add_bos = conf.get("add_bos_token", cfg.arch == "llama") and self.bos_id is not None
        pad = cfg.pad_id if cfg.pad_id is not None else token_id(conf.get("pad_token"))
        self.pad_id = pad if pad is not None else (self.eos_ids[0] if self.eos_ids else 0)

    def encode(self, text: str, bos: bool | None = None) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id] + ids if (self.add_bos if bos is None else bos) else ids

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def pad(self, seqs: list[list[int]], side: str = "right", device=None):
        """Pad id lists to one (B, T) batch; returns (ids, mask)."""
        T = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), T), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(seqs), T, dtype=torch.long)
        for b, s in enumerate(seqs):
            sl = slice(0, len(s)) if side == "right" else slice(T - len(s), T)
            ids[b, sl], mask[b, sl] = torch.tensor(s, dtype=torch.long), 1
        return ids.to(device), mask.to(device)


# ------------------------------------------------------------------------------ load and save
def weight_files(path: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file, for a single-file or a sharded checkpoint."""
    index, single = path / "model.safetensors.index.json", path / "model.safetensors"
    if index.exists():
        try:
            wm = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        return {name: path / f for name, f in wm.items()}
    if single.exists():
        with _open(single) as f:
            return {name: single for name in f.keys()}
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")


def _open(file: Path, device: str = "cpu"):
    if not file.exists():
        raise CheckpointError(f"{file}: weight file named by the checkpoint is missing")
    try:
        return safe_open(str(file), framework="pt", device=device)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: unreadable safetensors file (truncated or corrupt?): {e}") from None


def check_device(device) -> torch.device:
    """The torch device for a --device value, or a ValueError that says why it cannot be used."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r}: use cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: this machine has no CUDA GPU that torch can use; use --device cpu")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: there are only {torch.cuda.device_count()} CUDA device(s)")
    return dev


def load(path, device="cpu", dtype="float32") -> CausalLM:
    """Load config, weights and tokenizer of an HF checkpoint directory. The model is built on the
    meta device and each tensor goes straight to `device` in `dtype`; names and shapes must match
    exactly, and every weight must be finite."""
    path, device = Path(path), str(check_device(device))
    if not (path / "config.json").exists():
        raise CheckpointError(f"{path}: config.json is missing (is this an HF checkpoint directory?)")
    try:
        cfg = Config.from_hf(json.loads((path / "config.json").read_text()))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path / 'config.json'}: not valid JSON ({e})") from None
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    with torch.device("meta"):
        model = CausalLM(cfg)
    expected = {n: tuple(p.shape) for n, p in model.state_dict().items()}
    if cfg.tie_embeddings:            # tied: the head is the embedding (a stored copy is ignored)
        del expected["lm_head.weight"]
    files = weight_files(path)
    names = {n for n in files if not n.endswith(IGNORED_SUFFIXES)
             and not (cfg.tie_embeddings and n == "lm_head.weight")}
    if missing := sorted(set(expected) - names):
        raise CheckpointError(f"{path}: missing tensor(s) {', '.join(missing[:5])}"
                              + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    if extra := sorted(names - set(expected)):
        raise CheckpointError(f"{path}: unexpected tensor(s) {', '.join(extra[:5])} for a "
                              f"{cfg.arch} model with this config.json")
    state = {}
    for file in sorted(set(files.values())):
        with _open(file, device) as f:
            for name in f.keys():
                if name not in expected:
                    continue
                t = f.get_tensor(name)
                if tuple(t.shape) != expected[name]:
                    raise CheckpointError(f"{file}: tensor {name} has shape {tuple(t.shape)}, "
                                          f"config.json implies {expected[name]}")
                state[name] = t.to(DTYPES[dtype])
                if not torch.isfinite(state[name]).all():
                    raise CheckpointError(f"{file}: tensor {name} contains NaN or Inf")
    model.load_state_dict(state, assign=True, strict=False)   # names and shapes checked above
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    model.inv_freq = rope_inv_freq(cfg).to(device)
    model.tokenizer = Tokenizer(path, cfg)
    return model.eval().requires_grad_(False)


def save(src, out, tensors: dict[str, torch.Tensor]) -> None:
    """Write checkpoint `src` to `out` in its own layout (same files, names, dtypes, sharding and
    index; config and tokenizer files copied) with the given tensors replaced."""
    src, out = Path(src), Path(out)
    if out.resolve() == src.resolve():
        raise ValueError(f"refusing to write the edited model into its input checkpoint {src}")
    out.mkdir(parents=True, exist_ok=True)
    files = weight_files(src)
    if unknown := sorted(set(tensors) - set(files)):
        raise KeyError(f"tensor(s) not in checkpoint {src}: {', '.join(unknown)}")
    for file in sorted(set(files.values())):
        with _open(file) as f:
            meta = f.metadata()
            data = {n: f.get_tensor(n) for n in f.keys()}
        for n in data:
            if n in tensors:
                data[n] = tensors[n].detach().to("cpu", data[n].dtype).contiguous()
        save_file(data, str(out / file.name), metadata=meta)
    for p in src.iterdir():   # config, tokenizer, generation config, the index, ...
        if p.is_file() and not p.name.endswith(".safetensors"):
            shutil.copy2(p, out / p.name)


# ----------------------------------------------------------------------------------- generation
@torch.no_grad()
def generate(model: CausalLM, seqs: list[list[int]], max_new_tokens: int, top_k: int | None = None,
             seed: int = 0, stop_at_eos: bool = True) -> list[list[int]]:
    """Greedy (top_k None) or top-k sampling with a KV cache; prompts are left-padded into one
    batch. Returns the new tokens of each sequence."""
    dev = model.embed.weight.device
    ids, mask = model.tokenizer.pad(seqs, side="left", device=dev)
    B = len(seqs)
    cache = KVCache(model.cfg, B, ids.shape[1] + max_new_tokens, dev, model.embed.weight.dtype)
    gen = torch.Generator(device=dev).manual_seed(seed)
    new, done = [[] for _ in range(B)], torch.zeros(B, dtype=torch.bool, device=dev)
    eos = torch.tensor(model.tokenizer.eos_ids or [-1], device=dev)
    for _ in range(max_new_tokens):
        logits = model(ids, mask, cache=cache).logits[:, -1]
        if top_k is None:
            nxt = logits.argmax(-1)
        else:
            v, i = logits.topk(top_k, dim=-1)
            nxt = i.gather(1, torch.multinomial(v.softmax(-1), 1, generator=gen)).squeeze(1)
        for b, (t, d) in enumerate(zip(nxt.tolist(), done.tolist())):   # one host sync per token
            if not d:
                new[b].append(t)
        done |= torch.isin(nxt, eos) if stop_at_eos else done
        if done.all():
            break
        ids, mask = nxt[:, None], torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return new


def main(argv=None):
    p = argparse.ArgumentParser(description="Continue a prompt with a checkpoint (greedy unless --top-k).")
    p.add_argument("checkpoint", help="HF-format directory: config.json, *.safetensors, tokenizer.json")
    p.add_argument("--prompt", default="", help="text to continue; empty starts from BOS")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    a = p.parse_args(argv)
    try:
        model = load(a.checkpoint, a.device, a.dtype)
    except ValueError as e:          # CheckpointError, a bad --device or --dtype
        raise SystemExit(f"error: {e}")
    ids = model.tokenizer.encode(a.prompt, bos=True if not a.prompt else None)
    if not ids:
        raise SystemExit("error: the prompt encodes to no tokens and the tokenizer has no BOS token")
    out = generate(model, [ids], a.max_new_tokens, a.top_k, a.seed)[0]
    print(a.prompt + model.tokenizer.decode(out) if a.prompt else model.tokenizer.decode(out))


if __name__ == "__main__":
    main()
