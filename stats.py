"""Preservation statistics C (E1): collected once, written to a file people can share, read back
checked against the model being edited; also read from the files the MEMIT/ROME code wrote.

    python stats.py --model CHECKPOINT --out FILE [--stats-corpus F] [--stats-tokens N]
        [--layers 4,5,6] [--max-len 256] [--batch-tokens 8192] [--device D] [--dtype float32]
        [--state-device cpu]
    torchrun --nproc-per-node N stats.py --model CHECKPOINT --out FILE ...   (N processes)
    (the same as `python lyaplock.py stats ...`; an editing run takes the file with --stats FILE)

Why a module of its own: C — collected in one pass for all edit layers (collection_passes),
optionally sharded over torch.distributed ranks, the shareable statistics file and its key,
and the import of the MEMIT/ROME-family npz files — is one unit that the editing method only
consumes (a dict {layer: C (m, m) float64}); lyaplock.py should read as the method. (Named stats.py, not
statistics.py: a file of that name shadows Python's own `statistics`, which bench.py, pytest
plugins and torch import.)

The statistics file (safetensors): `C.<layer>` float64 (m, m) per layer, and in the metadata
`format` ("lyaplock-statistics"), `version`, `tokens` (the count actually used), `sha256` (of
each C's bytes, so a corrupted file is refused) and `key`: everything C depends on — the
weights' fingerprint through the last layer of the file (sha256 over config.json and the
stored bytes of every tensor up to that layer, each tensor's own digest kept too, so a refusal
can name it), the tokenizer's sha256 (over tokenizer.json and tokenizer_config.json, which
make the token ids and the BOS rule), the corpus sha256, the requested token count (0: the
whole corpus), max length, the forward pass's dtype, the layers and d_mlp. Weights above the
file's last layer do not enter: editing a later layer's copy of the model keeps the file valid.
--stats FILE refuses a file whose weights, tokenizer, shape or format version differ from the
run's, or that lacks a layer the run edits, naming what differs.
A different dtype is allowed with a warning line: C is float64 either way, and a bf16 forward
pass moves C by about bf16's rounding (0.7% relative, Frobenius, on stories260K). The runtime
cache (`--stats-cache`) stores the same files, named by the hash of their key.

The MEMIT/ROME/AlphaEdit/LyapLock code's layer statistics (`<module>_<precision>_mom2_<n>.npz`,
README "Preservation statistics"): their `mom2.mom2 / mom2.count` is our C, read in float64
without unpickling (authors_files, read_authors_file); they carry no weights fingerprint, so only
the layers and the shape are checked, and a warning says so.

Many GPUs (torchrun): every rank tokenises the whole corpus and takes every N-th of the
length-sorted batches; each sums its float64 Σ k kᵀ and token count in one buffer, ONE all_reduce
(a pass) adds them, and rank 0 divides (E1) and writes the file: the one-process C up to the
order of the float64 additions. Editing stays one process (README "Preservation statistics": each
step's solve needs the state the previous step left).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open

import data
import model as M

FORMAT = "lyaplock-statistics"
VERSION = 3                  # 2: the key holds the tokenizer; 3: a prompt's BOS is tokenizer.json's template's


class StatisticsError(ValueError):
    """A statistics file that cannot be used: unreadable, corrupt, or made for something else."""


class UnreadableStatistics(StatisticsError):
    """Not a safetensors file at all (truncated, or not one)."""


# ----------------------------------------------------------------------------- collection (E1)

def stats_sequences(tok, texts, n_tokens: int, max_len: int = 256) -> list[list[int]]:
    """Each paragraph encoded alone (with BOS where the model uses one), cut to max_len, taken
    in order until exactly n_tokens tokens (the last one shortened); n_tokens 0: all of them."""
    seqs = []
    total = 0
    want = n_tokens or sys.maxsize
    for t in texts:
        ids = tok.encode(t)[:max_len][:want - total]
        if ids:
            seqs.append(ids)
            total += len(ids)
        if total == want:
            break
    if n_tokens and total < n_tokens:
        raise ValueError(f"the statistics corpus has only {total} tokens, {n_tokens} were asked for "
                         "(--stats-tokens)")
    return seqs


def corpus_sequences(model: M.CausalLM, corpus: Path, n_tokens: int, max_len: int) -> tuple[list, int]:
    """The corpus's sequences for C (stats_sequences) and their token count, refused before the
    pass (not at the first solve) when fewer than d_mlp: C would be singular."""
    seqs = stats_sequences(model.tokenizer, data.read_corpus(corpus), n_tokens, max_len)
    total, m = sum(map(len, seqs)), model.cfg.d_mlp
    if total < m:
        taken = f"{total} tokens taken (--stats-tokens {n_tokens})" if n_tokens else f"the corpus has {total} tokens"
        raise StatisticsError(f"{corpus}: {taken}; C ({m}×{m}) needs at least d_mlp = {m} tokens, or it is singular "
                              "(more tokens, or another corpus)")
    return seqs, total


def positions_cap(cfg: M.Config, max_len: int, log=print) -> int:
    """max_len, or the model's position limit where that is fewer (GPT-2's learned positions,
    LongRoPE's trained length), said in a line: a longer paragraph would fail in GPT-2's last
    (longest) batch, after all the others' work, and would turn LongRoPE's longest batches by
    other factors than the rest. Capped, not refused: editing runs have no --max-len to lower."""
    limit, field = cfg.position_limit
    if max_len <= limit or not (cfg.arch == "gpt2" or cfg.longrope_switch is not None):
        return max_len
    why = (f"this GPT-2 has {limit} learned positions" if cfg.arch == "gpt2" else
           "LongRoPE turns a longer pass by its long factors")
    log(f"statistics: paragraphs cut to {limit} tokens, not {max_len}: {why} ({field})")
    return limit


def length_batches(lengths, max_tokens: int) -> list[list[int]]:
    """Indices sorted by length and cut into batches whose padded size (count × longest) stays
    within max_tokens (at least one per batch): little padding, bounded memory."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    out = []
    while order:
        n = 1
        while n < len(order) and (n + 1) * lengths[order[n]] <= max_tokens:
            n += 1
        out.append(order[:n])
        order = order[n:]
    return out


@torch.no_grad()
def gram_sums(model: M.CausalLM, seqs, layers, batch_tokens: int, progress=None, rank: int = 0,
              world: int = 1) -> torch.Tensor:
    """One float64 buffer: Σ k kᵀ (lower triangle) for each of `layers`, as (len(layers), m, m),
    then the token count, over this rank's share of the length batches (rank, rank + world, ...).
    One forward pass per batch, stopped after the last of `layers`; the buffer lives on the first
    layer's device (the caller groups layers by device: collection_passes)."""
    dev = model.edit_weight(layers[0]).device
    m = model.cfg.d_mlp
    flat = torch.zeros(len(layers) * m * m + 1, dtype=torch.float64, device=dev)
    sums = flat[:-1].view(len(layers), m, m)
    done = 0
    for idx in length_batches([len(s) for s in seqs], batch_tokens)[rank::world]:
        ids, mask = model.tokenizer.pad([seqs[i] for i in idx], device=model.embed.weight.device)
        out = model(ids, mask, keys_at=set(layers), stop_after=max(layers))
        real = mask.bool()
        for S, l in zip(sums, layers):
            add_gram_lower(S, out.keys[l][real].to(dev, torch.float64))   # E1, not yet divided
        done += int(real.sum())
        if progress:
            progress(done)
    flat[-1] = done
    return flat


def add_gram_lower(C, k, block: int = 2048):
    """C += kᵀk on and below the diagonal, one column block at a time: kᵀk is symmetric, so this
    does about half the float64 work; the caller mirrors the lower triangle at the end."""
    for i in range(0, C.shape[0], block):
        C[i:, i:i + block] += k[:, i:].T @ k[:, i:i + block]


def finish_sums(flat: torch.Tensor, layers, block: int = 2048) -> dict[int, torch.Tensor]:
    """C_l = (1/N) Σ k kᵀ (E1) from gram_sums' buffer (summed over ranks): the lower triangle
    mirrored, then divided by the token count; in place, so the C are views of the buffer."""
    m = math.isqrt((flat.numel() - 1) // len(layers))
    sums, n = flat[:-1].view(len(layers), m, m), flat[-1].item()
    for S in sums:
        mirror_lower(S, block)
        S.div_(n)                                                         # E1
    return dict(zip(layers, sums))


def mirror_lower(S: torch.Tensor, block: int = 2048):
    """S's strict upper triangle := its strict lower one, transposed, in place, a block of rows
    at a time: the largest temporary is one diagonal block (block², within the m × block of
    add_gram_lower's product that the memory plan counts), not an m × m copy (1.5 GiB at
    Llama-3-8B's m). Rows i:j right of their diagonal block are copied from columns i:j below
    it (lower entries, never written here); the diagonal block mirrors itself."""
    for i in range(0, S.shape[0], block):
        j = i + block
        S[i:j, j:].copy_(S[j:, i:j].T)
        D = S[i:j, i:j]
        D.tril_().add_(D.tril(-1).T)


def state_devices(model: M.CausalLM, layers, state_device=None) -> dict[int, torch.device]:
    """Where each edit layer's C lives: beside its layer's weights, or all on `state_device`
    (--state-device cpu: host memory)."""
    return {l: torch.device(state_device) if state_device else model.edit_weight(l).device for l in layers}


def collection_passes(model: M.CausalLM, layers, state_device=None) -> list[tuple]:
    """The passes over the corpus that collect C: one for the edit layers that share a device
    (their sums beside them; listed devices count apart, cpu,cpu too), so one in all on one
    device; with the state in host memory (state_device), one pass per layer, so a GPU holds one
    layer's m×m float64 sum at a time (Llama-3-8B: 1.5 GiB instead of 7.7 for five layers,
    beside 15 GiB of weights on a 24 GB card). More passes repeat only the forward up to their
    layer, not the float64 work."""
    if state_device:
        return [(l,) for l in sorted(layers)]
    stage = model.stages or [0] * model.cfg.n_layers          # index of each block's device
    passes = {}
    for l in sorted(layers):
        passes.setdefault(stage[l], []).append(l)
    return [tuple(p) for p in passes.values()]


def collection_bytes(cfg: M.Config, dt: torch.dtype, batch_tokens: int, n_layers: int) -> int:
    """Device memory of one collection pass for `n_layers` edit layers (plan.memory_plan):
    their float64 sums (m×m each, exact), and, estimated, a batch's activations — its keys at
    those layers, one layer's keys in float64, the forward's MLP and residual values (3m + 4d a
    token) — and a column block of the lower-triangle product (m × 2048, float64)."""
    m, d = cfg.d_mlp, cfg.d_model
    per_token = (n_layers * m + 3 * m + 4 * d) * dt.itemsize + 8 * m
    return 8 * m * m * n_layers + batch_tokens * per_token + 8 * m * 2048


def collect_stats(model: M.CausalLM, seqs, layers, batch_tokens: int = 8192, progress=None,
                  rank: int = 0, world: int = 1, state_device=None) -> dict[int, torch.Tensor]:
    """C_l = (1/N) Σ k kᵀ over all N tokens (E1), float64, for every edit layer: one forward pass
    per batch of text, stopped after the pass's last layer, for each of collection_passes (one
    on one device). With world > 1 (an initialised process group) each rank passes its share
    and one all_reduce per pass sums the sums and counts. `progress` gets the tokens done over
    all passes. Each C ends on state_devices(model, layers, state_device)."""
    where = state_devices(model, layers, state_device)
    total = sum(map(len, seqs))
    share = rank_share(seqs, batch_tokens, rank, world)
    C = {}
    for i, group in enumerate(collection_passes(model, layers, state_device)):
        shown = None if progress is None else lambda n, before=i * share: progress(before + n)
        flat = gram_sums(model, seqs, group, batch_tokens, shown, rank, world)
        if world > 1:
            dist.all_reduce(flat)
        if flat[-1].item() != total:
            raise StatisticsError(f"the ranks summed {flat[-1].item():.0f} tokens, the corpus has {total}: "
                                  "every rank must read the same model and corpus")
        C |= {l: c.to(where[l]) for l, c in finish_sums(flat, list(group)).items()}
        del flat        # with --state-device the C are copies, freed here before the next pass's sum (else views)
    return C


def definite_above(C, shift: float) -> bool:
    """Whether C − shift·I is positive definite (every eigenvalue of C above `shift`): its Cholesky
    factor exists, made in place in one float64 m×m copy (column-major: no second one)."""
    U = C.to(torch.float64, copy=True).mT
    U.diagonal().sub_(shift)
    info = torch.empty((), dtype=torch.int32, device=U.device)
    torch.linalg.cholesky_ex(U, upper=True, out=(U, info))
    return info.item() == 0


def singular_warning(C: dict, corpus, tokens: int) -> str | None:
    """A warning naming the layers whose C is numerically singular — an eigenvalue below float64's
    ε times its trace, i.e. C − ε·tr(C)·I has no Cholesky factor (factored in place, one m×m copy at
    a time) — or None. Such a C comes from too few different keys (a short or repetitive corpus,
    or a --max-len that keeps little more than the BOS token): the methods that solve with λC
    refuse it at their first step, and AlphaEdit's null space (E11) is then most of the space.
    Checked once, where C is collected (a cached or shared file is not factored again); with no
    room for the check (out of memory) the layers found before it are named, the rest unchecked."""
    singular = []
    for l, c in C.items():
        try:                                              # (no room for the check: the layers found so far)
            if not definite_above(c, torch.finfo(torch.float64).eps * float(c.trace())):
                singular.append(str(l))
        except (RuntimeError, MemoryError):
            break
    if not singular:
        return None
    return (f"warning: the statistics C of layer(s) {', '.join(singular)} are singular: the {tokens:,} tokens of "
            f"{corpus} give too few different keys (a short or repetitive corpus, or a --max-len that keeps little "
            "more than each text's first token); LyapLock, MEMIT and the others that solve with C refuse it at "
            "their first step, and AlphaEdit's null space would be most of the space: use a larger, varied corpus")


def rank_share(seqs, batch_tokens: int, rank: int = 0, world: int = 1) -> int:
    """The tokens one pass gives this rank (its length batches: rank, rank + world, ...)."""
    batches = length_batches([len(s) for s in seqs], batch_tokens)[rank::world]
    return sum(len(seqs[i]) for b in batches for i in b)


# ----------------------------------------------------------------------------- the key

def tensor_digests(path, names, known: dict | None = None) -> dict[str, str]:
    """{name: sha256 of its dtype, shape and stored bytes}, read in blocks straight from the
    safetensors files (no tensor is built); names not in the checkpoint are left out. `known`
    ({(file, name): digest}, filled here): what the caller's earlier calls hashed, not read again
    (a run's start hashes the same weights for its inputs' record and its statistics' key)."""
    files = M.weight_files(Path(path))
    known = {} if known is None else known
    out = {}
    for file in sorted({files[n] for n in names if n in files}):
        wanted = sorted(n for n in names if files.get(n) == file)
        out.update({n: known[file, n] for n in wanted if (file, n) in known})
        if all(n in out for n in wanted):
            continue
        with open(file, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
            for name in (n for n in wanted if n not in out):
                info = header[name]
                start, end = info["data_offsets"]
                h = hashlib.sha256(f"{info['dtype']}{info['shape']}".encode())
                f.seek(8 + size + start)
                for at in range(start, end, 1 << 24):
                    h.update(f.read(min(1 << 24, end - at)))
                out[name] = known[file, name] = h.hexdigest()
    return out


def fingerprint(config_sha: str, digests: dict) -> str:
    """One sha256 over config.json's and the tensors' digests."""
    return hashlib.sha256(json.dumps([config_sha, sorted(digests.items())]).encode()).hexdigest()


def tokenizer_sha(model_path) -> str:
    """One sha256 over tokenizer.json and tokenizer_config.json (an absent file counts as empty):
    they make the token ids C is collected on, the BOS included (the template's, the bos_token)."""
    files = [Path(model_path) / name for name in ("tokenizer.json", "tokenizer_config.json")]
    digests = [data.file_sha256(f) if f.exists() else hashlib.sha256(b"").hexdigest() for f in files]
    return hashlib.sha256(json.dumps(digests).encode()).hexdigest()


def weights_key(model_path, model: M.CausalLM, top: int, known=None) -> dict:
    """The weights' part of a key: config.json's sha256, each tensor's through layer `top`, and
    their fingerprint. (`known`: tensor_digests'.)"""
    config = data.file_sha256(Path(model_path) / "config.json")
    digests = tensor_digests(model_path, model.names_through_layer(top), known)
    return dict(weights=fingerprint(config, digests), config=config, tensors=digests)


def stats_key(model_path, model: M.CausalLM, layers, corpus: Path, n_tokens, max_len, known=None) -> dict:
    """Everything C depends on: the weights up to the last edit layer, tokenizer, corpus, size,
    dtype. (`known`: tensor_digests'.)"""
    return weights_key(model_path, model, max(layers), known) | dict(
        tokenizer=tokenizer_sha(model_path), layers=sorted(layers), d_mlp=model.cfg.d_mlp,
        corpus=data.file_sha256(corpus), n_tokens=n_tokens, max_len=max_len,
        dtype=str(model.embed.weight.dtype).removeprefix("torch."))


# ----------------------------------------------------------------------------- the file

def write_stats_file(path, C: dict, key: dict, tokens: int):
    """The statistics file, whole or not at all (a temporary file of this process, then a rename:
    runs that share a cache and collect the same statistics at once each put a whole file there).
    Written as safetensors one tensor at a time, so only one C at a time is copied off its device."""
    path = Path(path)
    names = {f"C.{l}": c for l, c in sorted(C.items())}
    if any(c.dtype != torch.float64 for c in names.values()):
        raise StatisticsError("C must be float64")
    digests = {n: hashlib.sha256(c.cpu().contiguous().numpy()).hexdigest() for n, c in names.items()}
    header, offset = {"__metadata__": dict(format=FORMAT, version=str(VERSION), tokens=str(tokens),
                                           sha256=json.dumps(digests), key=json.dumps(key, sort_keys=True))}, 0
    for n, c in names.items():
        header[n] = dict(dtype="F64", shape=list(c.shape), data_offsets=[offset, offset + 8 * c.numel()])
        offset += 8 * c.numel()
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)                           # the format's 8-byte alignment
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(len(head).to_bytes(8, "little") + head)
            for c in names.values():
                f.write(c.cpu().contiguous().numpy().data)        # little-endian float64, row-major
        os.replace(tmp, path)
    except BaseException:            # (a full disk, an interrupt: no temporary file of this pid is left)
        tmp.unlink(missing_ok=True)
        raise


KEY_FIELDS = {"weights", "config", "tensors", "tokenizer", "layers", "d_mlp", "corpus", "n_tokens", "max_len",
              "dtype"}
WHOLE = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0
KEY_KINDS = dict.fromkeys(("weights", "config", "tokenizer", "corpus", "dtype"), lambda v: isinstance(v, str)) | \
    dict.fromkeys(("d_mlp", "n_tokens", "max_len"), WHOLE) | dict(
        layers=lambda v: isinstance(v, list) and all(map(WHOLE, v)),
        tensors=lambda v: isinstance(v, dict) and all(isinstance(d, str) for d in v.values()))


def file_metadata(path) -> dict:
    """A safetensors file's metadata; an UnreadableStatistics if it cannot be read."""
    if not Path(path).exists():                         # (a run's statistics file moved before a resume)
        raise UnreadableStatistics(f"{path}: no such statistics file")
    try:
        with safe_open(str(path), "pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise UnreadableStatistics(f"{path}: not a readable statistics file (truncated or corrupt?): {e}") from None


def read_meta(path) -> tuple[dict, dict, dict]:
    """(metadata, key, {tensor: sha256}) of a statistics file; a StatisticsError if it is not one."""
    meta = file_metadata(path)
    if meta.get("format") != FORMAT:
        raise StatisticsError(f"{path}: not a statistics file (python lyaplock.py stats writes them)")
    if meta.get("version") != str(VERSION):
        raise StatisticsError(f"{path}: statistics format version {meta.get('version')}; this code reads "
                              f"version {VERSION} (3: the BOS a prompt begins with is tokenizer.json's "
                              "template's): write the file again with this version")
    try:
        key, digests = json.loads(meta["key"]), json.loads(meta["sha256"])
    except (KeyError, json.JSONDecodeError) as e:
        raise StatisticsError(f"{path}: the statistics file's metadata is damaged ({e})") from None
    if not isinstance(key, dict) or KEY_FIELDS - set(key):
        raise StatisticsError(f"{path}: the statistics file's key is damaged (it lacks "
                              f"{', '.join(sorted(KEY_FIELDS - set(key if isinstance(key, dict) else {})))})")
    if bad := [k for k, ok in KEY_KINDS.items() if not ok(key[k])]:
        raise StatisticsError(f"{path}: the statistics file's key is damaged ({', '.join(bad)} of the wrong kind)")
    if not (isinstance(digests, dict) and all(isinstance(d, str) for d in digests.values())
            and str(meta.get("tokens", "")).isdigit()):
        raise StatisticsError(f"{path}: the statistics file's metadata is damaged (its sha256 or tokens)")
    return meta, key, digests


def read_C(path, layers, m: int, digests: dict, where: dict) -> dict[int, torch.Tensor]:
    """C.<layer> for each of `layers`, each checked: present, float64 (m, m), the bytes that were
    written (sha256), finite, symmetric; then moved to its device where[layer] (state_devices)."""
    C = {}
    try:
        with safe_open(str(path), "pt") as f:
            for l in layers:
                name = f"C.{l}"
                if name not in f.keys():
                    raise StatisticsError(f"{path}: tensor {name} is missing")
                c = f.get_tensor(name)
                if c.dtype != torch.float64 or tuple(c.shape) != (m, m):
                    raise StatisticsError(f"{path}: {name} is {str(c.dtype).removeprefix('torch.')} "
                                          f"{tuple(c.shape)}; float64 ({m}, {m}) is needed")
                if hashlib.sha256(c.numpy()).hexdigest() != digests.get(name):
                    raise StatisticsError(f"{path}: {name} is corrupt (its bytes are not the ones written)")
                if not bool(torch.isfinite(c).all()) or not torch.equal(c, c.T):
                    raise StatisticsError(f"{path}: {name} is not a finite symmetric matrix")
                C[l] = c.to(where[l])
    except (SafetensorError, OSError) as e:
        raise UnreadableStatistics(f"{path}: unreadable statistics file (truncated or corrupt?): {e}") from None
    return C


def weights_difference(key: dict, model_path, model: M.CausalLM, known=None) -> str | None:
    """What differs between the weights a file was made for and this model's, or None."""
    now = weights_key(model_path, model, max(key["layers"]), known)
    if now["weights"] == key["weights"]:
        return None
    if now["config"] != key["config"]:
        return "config.json differs"
    digests = now["tensors"]
    changed = sorted(n for n in set(digests) | set(key["tensors"]) if digests.get(n) != key["tensors"].get(n))
    more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
    return f"tensor{'s' * (len(changed) > 1)} {', '.join(changed[:3])}{more} differ{'s' * (len(changed) == 1)}"


def check_shape(path, key: dict, layers, d_mlp: int):
    """Refuse a file that lacks a layer the run edits, or made for another MLP width, naming what
    differs (what a file can be checked for from the model's config alone: --plan)."""
    missing = sorted(set(layers) - set(key["layers"]))
    if missing:
        raise StatisticsError(f"{path}: made for layers {key['layers']}; this run edits {sorted(layers)} "
                              f"(no C for layer{'s' * (len(missing) > 1)} {', '.join(map(str, missing))})")
    if key["d_mlp"] != d_mlp:
        raise StatisticsError(f"{path}: made for d_mlp = {key['d_mlp']} (C {key['d_mlp']}×{key['d_mlp']}); "
                              f"this model's d_mlp is {d_mlp}")


def check_key(path, key: dict, model: M.CausalLM, model_path, layers, known=None):
    """Refuse a file that lacks a layer the run edits, or made for another shape, other weights or
    with another tokenizer, naming what differs."""
    check_shape(path, key, layers, model.cfg.d_mlp)
    differs = weights_difference(key, model_path, model, known)
    if differs:
        raise StatisticsError(f"{path}: made for other weights: through layer {max(key['layers'])}, "
                              f"{differs} ({model_path})")
    if key["tokenizer"] != tokenizer_sha(model_path):
        raise StatisticsError(f"{path}: made with another tokenizer: {model_path}'s tokenizer.json or "
                              "tokenizer_config.json differs, so C was collected on other token ids")


def load_stats_file(path, model: M.CausalLM, model_path, layers, log=print,
                    state_device=None, known=None) -> dict[int, torch.Tensor]:
    """C for `layers` from --stats: a statistics file (checked against this model's weights), or
    the MEMIT/ROME code's .npz files (a directory, or one file; checked for layers and shape);
    each C straight to where it lives (state_devices). (`known`: tensor_digests'.)"""
    path = Path(path)
    if not path.exists():
        raise StatisticsError(f"--stats {path}: no such file or directory")
    if is_authors_stats(path):
        return load_authors_stats(path, model, layers, log, state_device)
    meta, key, digests = read_meta(path)
    check_key(path, key, model, model_path, layers, known)
    dtype = str(model.embed.weight.dtype).removeprefix("torch.")
    if key["dtype"] != dtype:
        log(f"warning: {path} was collected with a {key['dtype']} forward pass, this run is {dtype}; "
            "used as it is (C is float64 either way)")
    C = read_C(path, sorted(layers), model.cfg.d_mlp, digests, state_devices(model, layers, state_device))
    log(f"statistics: {path} ({meta['tokens']} tokens, layers {','.join(map(str, sorted(layers)))})")
    return C


# ----------------------------------------------------------------------------- the MEMIT/ROME files

def authors_module(cfg: M.Config, layer: int) -> str:
    """The module name their files are named by: the edited projection's HF module."""
    return cfg.edit_parameter_name(layer).removesuffix(".weight")


def authors_kind(file: Path) -> str | None:
    """'mom2' (MEMIT/ROME/AlphaEdit's file), 'KK_T' (LyapLock's kk_t file) or None (another
    statistic), from the members' names."""
    if not zipfile.is_zipfile(file):                       # (numpy would call it pickled data)
        raise StatisticsError(f"{file}: not a readable .npz file (not a whole zip archive of arrays: truncated, or "
                              "another kind of file)")
    try:
        with np.load(file, allow_pickle=False) as z:
            members = set(z.files)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise StatisticsError(f"{file}: not a readable .npz file ({e})") from None
    return next((k for k in ("mom2", "KK_T") if f"{k}.mom2" in members), None)


def authors_files(path: Path, cfg: M.Config, layers) -> dict[int, tuple[Path, str | None]]:
    """{layer: (file, kind)} in a directory of their layout, or for one file."""
    if path.is_file():
        if len(layers) > 1:
            raise StatisticsError(f"--stats {path}: one .npz file is one layer's statistics; this run edits "
                                  f"layers {list(layers)}: give the directory that holds them")
        if not path.name.startswith(authors_module(cfg, layers[0]) + "_"):
            raise StatisticsError(f"--stats {path}: not named for layer {layers[0]} "
                                  f"({authors_module(cfg, layers[0])}_<precision>_mom2_<n>.npz)")
        return {layers[0]: (path, authors_kind(path))}
    out = {}
    for l in layers:
        module = authors_module(cfg, l)
        files = sorted([*path.glob(f"{module}_*.npz"), *path.glob(f"*_stats/{module}_*.npz")])
        kinds = {f: authors_kind(f) for f in files}
        for kind in ("mom2", "KK_T"):
            chosen = [f for f in files if kinds[f] == kind]
            if len(chosen) > 1:
                raise StatisticsError(f"--stats {path}: layer {l} has {len(chosen)} {kind} files "
                                      f"({', '.join(str(f.relative_to(path)) for f in chosen)}); keep one")
            if chosen:
                out[l] = (chosen[0], kind)
                break
        else:
            raise StatisticsError(f"--stats {path}: no statistics for layer {l} (a file named {module}_<precision>"
                                  f"_mom2_<n>.npz, there or in a <dataset>_stats/ folder){elsewhere(path, module)}")
    return out


def elsewhere(path: Path, module: str) -> str:
    """Where in a directory the user may have meant: a model's folder of their files below it (a
    <stats_dir> given for <stats_dir>/<model>), or a statistics file of ours in it."""
    below = sorted({f.parent.parent if f.parent.name.endswith("_stats") else f.parent
                    for f in [*path.glob(f"*/{module}_*.npz"), *path.glob(f"*/*_stats/{module}_*.npz")]})
    if below:
        return f"; {', '.join(map(str, below))} {'has' if len(below) == 1 else 'have'} them: give --stats that folder"
    ours = sorted(f for f in path.glob("*.safetensors") if is_statistics_file(f))
    return f"; {ours[0]} is a statistics file: give --stats that file" if ours else ""


def check_kind(file: Path, kind: str | None):
    """A StatisticsError unless `file` holds a second moment (authors_kind: mom2 or KK_T)."""
    if kind not in ("mom2", "KK_T"):
        raise StatisticsError(f"{file}: no mom2.mom2 or KK_T.mom2 array (not a second-moment file)")


def check_sum(file: Path, kind: str, dtype: np.dtype, shape: tuple, m: int):
    """A StatisticsError unless their sum is a float32 or float64 (m, m) array."""
    if dtype.kind != "f" or dtype.itemsize not in (4, 8) or shape != (m, m):
        raise StatisticsError(f"{file}: {kind}.mom2 is {dtype} {shape}; a float ({m}, {m}) sum is needed")


def read_authors_file(file: Path, kind: str | None, m: int) -> torch.Tensor:
    """C = <kind>.mom2 / <kind>.count (E1; their SecondMoment.moment()) in float64, from one of
    their files, without unpickling. Their sum is symmetrised ((S + Sᵀ)/2: a GPU product need not
    be bitwise symmetric) after checking it is symmetric to its precision."""
    check_kind(file, kind)
    try:
        with np.load(file, allow_pickle=False) as z:
            S, count = z[f"{kind}.mom2"], z[f"{kind}.count"]
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise StatisticsError(f"{file}: {kind}.mom2 or .count needs unpickling; refused") from None
        raise StatisticsError(f"{file}: unreadable ({e})") from None
    except (KeyError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise StatisticsError(f"{file}: unreadable ({e})") from None
    check_sum(file, kind, S.dtype, S.shape, m)
    S = S.astype(S.dtype.newbyteorder("="), copy=False)                    # (a big-endian file's)
    n = float(count) if count.shape == () and count.dtype.kind in "iuf" else math.nan
    if not (math.isfinite(n) and n >= 1 and n == int(n)):
        raise StatisticsError(f"{file}: {kind}.count is {count!r}, not a token count")
    if n < m:                                 # (as a corpus of fewer tokens is refused: corpus_sequences)
        raise StatisticsError(f"{file}: {kind}.count is {n:.0f} tokens, fewer than d_mlp = {m}: C would be singular")
    tolerance = float(np.finfo(S.dtype).eps) ** 0.5      # float64: 1.5e-8, float32: 3.5e-4 of the largest
    S = torch.from_numpy(S).double()
    if not bool(torch.isfinite(S).all()) or float((S - S.T).abs().max()) > tolerance * float(S.abs().max()):
        raise StatisticsError(f"{file}: {kind}.mom2 is not a finite symmetric matrix")
    return (S + S.T).div_(2).div_(int(n))                                 # E1


def load_authors_stats(path: Path, model: M.CausalLM, layers, log=print,
                       state_device=None) -> dict[int, torch.Tensor]:
    """C per layer from their files; they hold no fingerprint, so only layers and shape are checked."""
    C = {}
    where = state_devices(model, layers, state_device)
    for l, (file, kind) in authors_files(path, model.cfg, sorted(layers)).items():
        C[l] = read_authors_file(file, kind, model.cfg.d_mlp).to(where[l])
        log(f"statistics: layer {l} from {file} (C = {kind}.mom2 / {kind}.count)")
    log(f"warning: the MEMIT/ROME statistics in {path} carry no fingerprint of the weights they were "
        "collected on: only their layers and shape were checked; make sure they are this model's")
    return C


def check_authors_files(path: Path, cfg: M.Config, layers):
    """What --plan can check of their files without reading their sums: a file of a second moment
    for each layer, of this model's shape (read from its .npy header). A StatisticsError as the
    run's."""
    m = cfg.d_mlp
    for l, (file, kind) in authors_files(path, cfg, sorted(layers)).items():
        check_kind(file, kind)
        try:
            with zipfile.ZipFile(file) as z, z.open(f"{kind}.mom2.npy") as f:
                version = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, _, dtype = read(f)
        except (KeyError, OSError, ValueError, zipfile.BadZipFile) as e:
            raise StatisticsError(f"{file}: unreadable ({e})") from None
        check_sum(file, kind, dtype, shape, m)


# ----------------------------------------------------------------------------- the cache

def load_or_collect_stats(model, model_path, corpus, n_tokens, layers, cache_dir, max_len=256,
                          log=print, batch_tokens=8192, state_device=None, known=None) -> dict:
    """C for every edit layer, from the cache when its key matches and its tensors are sound,
    else computed (and cached) anew; each on state_devices(model, layers, state_device).
    (`known`: tensor_digests'.)"""
    max_len = positions_cap(model.cfg, max_len, log)
    key = stats_key(model_path, model, layers, Path(corpus), n_tokens, max_len, known)
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    file = Path(cache_dir) / f"stats-{name}.safetensors"
    if file.exists():
        try:
            _, found, digests = read_meta(file)
            if found != key:
                raise StatisticsError("another key")
            C = read_C(file, layers, model.cfg.d_mlp, digests, state_devices(model, layers, state_device))
            log(f"statistics: reusing {file}")
            return C
        except UnreadableStatistics as e:
            log(f"statistics: {file} is unreadable ({e}); recomputing")
        except StatisticsError as e:
            log(f"statistics: {file} does not match this model/corpus ({e}); recomputing")
    seqs, total = corpus_sequences(model, corpus, n_tokens, max_len)
    progress = Progress(total, log, passes=len(collection_passes(model, layers, state_device)),
                        each="layer" if state_device else "device")
    C = collect_stats(model, seqs, layers, batch_tokens, progress, state_device=state_device)
    if progress.tty:
        log("")                           # ends the line refreshed in place
    try:
        write_stats_file(file, C, key, total)
    except OSError as e:                  # a read-only or full cache: the statistics serve this run all the same
        log(f"statistics: not cached, {file.parent} cannot take them ({e.strerror or e})")
    if warning := singular_warning(C, corpus, total):     # (after the cache: the check needs an m×m of room)
        log(warning)
    return C


# ----------------------------------------------------------------------------- the command

class Progress:
    """Tokens done, tok/s and time left: refreshed in place at most once a second (tty), else a
    line every 10 s; always at the end. `total`: the tokens of one pass of `passes`, each pass
    one `each` (collection_passes: a layer with the state on the host, else a device). `tty`:
    whether `log` writes to a terminal (default: whether stdout is one), so a log file gets
    lines, not carriage returns."""

    def __init__(self, total: int, log, tty: bool | None = None, note: str = "", passes: int = 1,
                 each: str = "device"):
        self.total = total * passes
        self.log = log
        self.tty = sys.stdout.isatty() if tty is None else tty
        self.note = note + (f" over {passes} passes, one a {each}" if passes > 1 else "")
        self.start = time.time()
        self.shown = 0.0

    def __call__(self, done: int):
        now = time.time()
        if now - self.shown < (1 if self.tty else 10) and done < self.total:
            return
        self.shown = now
        rate = done / max(now - self.start, 1e-9)
        left = hours_minutes_seconds((self.total - done) / max(rate, 1e-9))
        line = f"statistics: {done:,}/{self.total:,} tokens{self.note}, {rate:,.0f} tok/s, {left} left"
        self.log("\r" + line if self.tty else line, end="" if self.tty else "\n")


def hours_minutes_seconds(seconds: float) -> str:
    """277:45:00 for 999,900 s: hours unbounded (a day's worth does not wrap to 00)."""
    minutes, s = divmod(round(seconds), 60)
    return f"{minutes // 60:02d}:{minutes % 60:02d}:{s:02d}"


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="lyaplock.py stats", description="Collect the preservation statistics C (E1) of the edit layers "
        "into a file that an editing run takes with --stats FILE. Under torchrun --nproc-per-node N the corpus "
        "is shared out among the N processes (NCCL on GPUs, gloo on the CPU).")
    p.add_argument("--model", required=True, help="HF checkpoint directory")
    p.add_argument("--out", required=True, help="the statistics file to write (safetensors)")
    p.add_argument("--stats-corpus", help="plain text, one paragraph a line (default: the bundled WikiText-2 sample)")
    p.add_argument("--stats-tokens", type=int, default=0, help="tokens for C (default: the whole corpus)")
    p.add_argument("--layers", help="edit layers, e.g. 4,5,6,7,8 (default: the model's LyapLock preset)")
    p.add_argument("--max-len", type=int, default=256, help="tokens per paragraph at most")
    p.add_argument("--batch-tokens", "--stats-batch-tokens", dest="batch_tokens", type=int, default=8192,
                   help="padded tokens per forward pass (the editing command's --stats-batch-tokens)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (under torchrun: cuda = cuda:LOCAL_RANK)")
    p.add_argument("--dtype", default="float32", choices=list(M.DTYPES), help="the forward pass's dtype")
    p.add_argument("--state-device", help="cpu: keep each finished C in host memory and collect one layer per "
                   "pass, so the GPU holds one layer's float64 sum at a time beside the weights (a small card)")
    args = p.parse_args(argv)
    data.refuse_empty_paths(args, dict(model="directory", out="file", stats_corpus="file"))
    for name in ("max_len", "batch_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.stats_tokens < 0:
        raise ValueError(f"--stats-tokens must be 0 (the whole corpus) or more, got {args.stats_tokens}")
    out = Path(args.out)                # found before the collection, not when the file is written
    if out.is_dir():
        raise ValueError(f"--out {args.out} is a directory; give the file to write, e.g. "
                         f"{out / 'stats.safetensors'}")
    folder = next(p for p in out.absolute().parents if p.exists())      # the rest is made (mkdir)
    if not folder.is_dir():
        raise ValueError(f"--out {args.out}: {folder} is a file, not a directory")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"--out {args.out}: the directory {folder} is not writable")
    if Path(args.model).resolve() in out.resolve().parents:
        raise ValueError(f"--out {args.out} is inside --model {args.model}: keep the statistics file apart from "
                         "the checkpoint (it would replace or add to the checkpoint's files)")
    if out.suffix == ".npz":              # (--stats reads a .npz as the MEMIT/ROME code's file)
        raise ValueError(f"--out {args.out}: a statistics file is safetensors; .npz names the MEMIT/ROME code's "
                         f"layer files: give e.g. {out.with_suffix('.safetensors')}")
    if out.exists() and not is_statistics_file(out):
        raise ValueError(f"--out {args.out} exists and is not a statistics file: give a new path (only an "
                         "earlier statistics file is written over)")
    return args


def is_authors_stats(path: Path) -> bool:
    """Whether --stats names the MEMIT/ROME code's files (a directory, or a .npz file that is not a
    statistics file of ours under another name) rather than a statistics file."""
    return path.is_dir() or (path.suffix == ".npz" and not is_statistics_file(path))


def is_statistics_file(path) -> bool:
    """Whether `path` is a statistics file this code (any version) wrote."""
    try:
        return file_metadata(path).get("format") == FORMAT
    except UnreadableStatistics:
        return False


def torchrun_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment variables; (0, 1, 0) without."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1, 0
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))


def rank_device(device: str, world: int, local_rank: int) -> str:
    """This process's device: --device itself (one process: also a list, as for editing), or under
    torchrun with CUDA, cuda:LOCAL_RANK."""
    if world == 1:
        M.check_devices(device)
        return device
    dev = M.check_device(device)
    if dev.type == "cpu":
        return str(dev)
    if dev.index is not None:
        raise ValueError(f"--device {device}: under torchrun each process takes cuda:LOCAL_RANK; give --device cuda")
    return str(M.check_device(f"cuda:{local_rank}"))


def main(argv=None) -> int:
    """`stats`: the statistics file, on one process or on each of torchrun's."""
    rank, world, local_rank = torchrun_env()
    try:
        args = parse_args(sys.argv[1:] if argv is None else list(argv))
        device = rank_device(args.device, world, local_rank)
        if args.state_device:
            M.check_device(args.state_device)
        if world > 1:
            if device.startswith("cuda"):
                torch.cuda.set_device(device)
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        try:
            with data.sigterm_exits():       # (torchrun's agent stops the other ranks so: their files go)
                write_statistics(args, device, rank, world)
        finally:
            if world > 1:
                dist.destroy_process_group()
    except (M.CheckpointError, data.DataError, ValueError, OSError) as e:     # OSError: a full disk, ...
        print(f"error{f' (rank {rank})' if world > 1 else ''}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\ninterrupted{f' (rank {rank})' if world > 1 else ''}: no statistics file written", file=sys.stderr)
        return 130
    except data.Terminated:
        print(f"\nstopped (SIGTERM){f' (rank {rank})' if world > 1 else ''}: no statistics file written",
              file=sys.stderr)
        raise                           # (exit 143, for a caller's loop too)
    return 0


def same_inputs(key: dict, world: int):
    """A StatisticsError on every rank unless every rank's key (its weights, tokenizer, corpus and
    settings: what C depends on, and how the corpus is shared out) is rank 0's: a node whose path
    holds another checkpoint or corpus would add its sums to the others' under rank 0's key, and
    another --batch-tokens would count some sequences twice and others never."""
    keys = [None] * world
    dist.all_gather_object(keys, key)
    for rank, other in enumerate(keys):
        if differs := [f for f in sorted(key) if other.get(f) != keys[0].get(f) and f != "weights"]:
            if "tensors" in differs:                      # (the fingerprint "weights" differs with them)
                tensors = [n for n in sorted(set(other["tensors"]) | set(keys[0]["tensors"]))
                           if other["tensors"].get(n) != keys[0]["tensors"].get(n)]
                differs[differs.index("tensors")] = "the tensors " + ", ".join(tensors[:3]) + " ..." * (len(tensors) > 3)
            raise StatisticsError(f"rank {rank} read other inputs than rank 0 ({', '.join(differs)} differ): "
                                  "every process must read the same model, tokenizer and corpus with the same "
                                  "settings")


def write_statistics(args, device: str, rank: int, world: int):
    """Load, tokenise, collect (this rank's share; one all_reduce), and on rank 0 write the file;
    every rank then learns whether rank 0 wrote it, so that on a failure each leaves with one
    line (error (rank r): ...) instead of the others dying in gloo when rank 0 leaves."""
    import lyaplock                                   # here, not above: lyaplock imports this module
    def say(line, end="\n"):                          # rank 0's progress and notes, on stderr
        if rank == 0:
            print(line, end=end, file=sys.stderr, flush=True)
    model = M.load(args.model, device, args.dtype)
    if args.layers:
        layers = lyaplock.parse_layers(args.layers, model.cfg.n_layers)
    else:
        layers = lyaplock.preset(model.cfg, "lyaplock").layers
    corpus = Path(args.stats_corpus or lyaplock.DEFAULT_CORPUS)
    max_len = positions_cap(model.cfg, args.max_len, say)
    seqs, total = corpus_sequences(model, corpus, args.stats_tokens, max_len)
    key = stats_key(args.model, model, layers, corpus, args.stats_tokens, max_len)
    if world > 1:              # (and what shares the corpus out and counts the passes: no key's, but the ranks')
        same_inputs(key | dict(batch_tokens=args.batch_tokens, state_device=args.state_device), world)
    progress = None
    if rank == 0:
        progress = Progress(rank_share(seqs, args.batch_tokens, rank, world), say, tty=sys.stderr.isatty(),
                            note=f" (rank 0's share of {world} processes)" * (world > 1),
                            passes=len(collection_passes(model, layers, args.state_device)),
                            each="layer" if args.state_device else "device")
    start = time.time()
    C = collect_stats(model, seqs, layers, args.batch_tokens, progress, rank, world, args.state_device)
    seconds = time.time() - start                      # .item() in collect_stats has synchronised
    failed = None
    if rank == 0:
        if progress.tty:
            print(file=sys.stderr)
        try:
            write_stats_file(args.out, C, key, total)
        except OSError as e:                           # a full disk, a folder removed meanwhile, ...
            failed = f"could not write {args.out}: {e}"
        if not failed and (warning := singular_warning(C, corpus, total)):   # (it never raises: the ranks wait)
            say(warning)
    if world > 1:           # rank 0's outcome to all, once it has written: a rank leaving while
        outcome = [failed]  # rank 0 still writes can abort in gloo's exit (seen once, 2026-12-02)
        dist.broadcast_object_list(outcome, src=0)
        failed = outcome[0]
    if failed:
        raise OSError(failed if rank == 0 else f"rank 0 {failed}")
    if rank == 0:
        print(f"statistics: {total:,} tokens in {seconds:.1f} s, {total / seconds:,.0f} tok/s"
              f"{f' on {world} processes' if world > 1 else ''}, layers {','.join(map(str, layers))}; "
              f"wrote {args.out}", flush=True)


if __name__ == "__main__":
    import stats                    # the one copy of this module (lyaplock imports it by name too)
    args = sys.argv[1:]
    sys.exit(stats.main(args[1:] if args[:1] == ["stats"] else args))
