"""A run's memory plan: what each device (and the host) holds at a step's peak, from config.json
alone, so a user knows whether a run fits before loading anything (`python lyaplock.py --plan`,
which first checks the checkpoint's files as loading does, without reading a tensor), and where
the model's blocks go so that it does (M.load's placement: Editor.open, the command).

Kept apart from lyaplock.py, which reads as the method: this is arithmetic about the method's
tensors (their sizes per model family and method), checked against peaks measured on the CPU and
on an H100 (test_multidevice.py, docs/bench/). Sizes are bytes.
"""
from __future__ import annotations

import math
import sys
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import torch

import lyaplock as L        # the method's facts (method_of, projected), read at call time
import model as M
import stats


def memory_plan(cfg: M.Config, hp: "L.HParams", dtype: str, z_tokens: int, shares: list[float],
                state_on_host: bool = False, n_edits: int = 0, stats_tokens: int = 8192,
                stream: StreamTokens | None = None) -> list[dict]:
    """Per device (in the order of `shares`: what each holds, e.g. its memory), the bytes a run
    needs at its peak, from the config alone (device_need), with the blocks placed to make the
    largest need / share as small as it can be (M.split_blocks; M.load places them so too:
    plan_stages). Against the measured peaks of two Llama-3-8B steps
    (docs/bench/llama3-8b-two-steps.txt, CounterFact, when E4's passes ran whole rows): 43.4
    planned for 40.5 GiB at 2048 tokens, 68.4 for 61.5 at 8192 (the solve's and the statistics' terms are not
    measured on a GPU yet). With the state on the host a last row says what host memory it takes.
    stream: the stream's row and target lengths (stream_tokens), None: the model's positions."""
    need = device_need(cfg, hp, dtype, z_tokens, len(shares), state_on_host, n_edits, stats_tokens, stream)
    stages = M.split_blocks(cfg.n_layers, lambda j, k, i: need(j, k, i)["need"], shares)
    rows = []
    for j in range(len(shares)):
        mine = [i for i, s in enumerate(stages) if s == j]
        rows.append(need(j, mine[0], mine[-1] + 1) if mine else need(j, 0, 0))
    if state_on_host:
        held = host_layer_bytes(cfg, hp, dtype, n_edits) * len(hp.layers)
        rows.append(dict(blocks=[], weights=0, state=held, target_values=0, solve=0, statistics=0, need=held, host=True))
    return rows


def host_layer_bytes(cfg: M.Config, hp: "L.HParams", dtype: str, n_edits: int = 0) -> int:
    """What one edit layer keeps in host memory with --state-device cpu: edit_layer_bytes, its
    tensors pinned on a GPU machine, where CUDA's pinned allocator gives each the next power of two
    of bytes (C at Llama-3-8B's m: 2 GiB for 1.53); the E8a columns are not pinned."""
    pinned = state_tensor_bytes(cfg, hp.method) + [cfg.d_model * cfg.d_mlp * M.DTYPES[dtype].itemsize]   # W0
    columns = columns_kept(hp, n_edits) * edit_column_bytes(cfg, hp.method)
    return sum(1 << (n - 1).bit_length() for n in pinned) + columns


def edit_layer_bytes(cfg: M.Config, hp: "L.HParams", dtype: str, n_edits: int = 0) -> int:
    """What one edit layer keeps beside its weights (on its device, or on the host): its float64
    state (layer_state_bytes, with the edits kept under hp.superseded "remove") and W0 in `dtype`."""
    W0 = cfg.d_model * cfg.d_mlp * M.DTYPES[dtype].itemsize
    return layer_state_bytes(cfg, hp.method, columns_kept(hp, n_edits)) + W0


def device_need(cfg: M.Config, hp: "L.HParams", dtype: str, z_tokens: int, n_devices: int,
                state_on_host: bool = False, n_edits: int = 0, stats_tokens: int = 8192, stream=None):
    """need(j, k, i): what device j of n_devices holds at its peak when it runs blocks k..i-1, a
    dict of bytes: the weights in `dtype` (with the embeddings on the first device and the head on
    the last: M.fixed_bytes); each edit layer's state on its device — C, the method's edit memory
    (S_KK m×m, S_VK d×m) and AlphaEdit's projector (m×m) in float64, and W0, its original weights —
    unless `state_on_host` (ROME's factor of C, m×m, stays on the device either way); then the
    largest of the phases: the target values (target_value_bytes:
    a pass of z_tokens tokens through the blocks above the last edit layer, and the prefix caches of
    the step's hp.batch_size requests), a solve (solve_bytes; with the state on the host, also what
    of a layer's state comes over: brought_bytes, and W0) and the collection of C
    (stats.collection_bytes: its sums, all the device's edit layers at once or, with the state on
    the host, one). n_edits: the stream's edits whose prompt comes again, which the state keeps
    under hp.superseded "remove" (layer_state_bytes), at its end."""
    with torch.device("meta"):
        model = M.CausalLM(cfg)
    dt = M.DTYPES[dtype]
    layer_state = edit_layer_bytes(cfg, hp, dtype, n_edits)
    W0 = cfg.d_model * cfg.d_mlp * dt.itemsize             # comes over with a solve from the host
    brought = brought_bytes(cfg, hp.method, columns_kept(hp, n_edits)) + W0 if state_on_host else 0
    solve = solve_bytes(cfg, hp.method) + brought
    weights = M.weight_need(model, dt, n_devices)
    per_block, home, logits = target_value_bytes(cfg, hp, dt, z_tokens, stream)
    head = 0 if cfg.tie_embeddings else n_devices - 1       # the device of the head (M.fixed_bytes)
    last = hp.layers[-1]
    factor = 8 * cfg.d_mlp ** 2 if L.method_of(hp.method).locate == "rome" else 0   # ROME's E18 factor of C (or
    #   of I), on the layer's device through the whole step: beside its target values too

    def need(j: int, k: int, i: int) -> dict:
        edit = sum(k <= l < i for l in hp.layers)
        above = max(0, i - max(k, last + 1))               # blocks above the last edit layer
        row = dict(blocks=list(range(k, i)), weights=weights(j, k, i),
                   state=(0 if state_on_host else layer_state * edit) + factor * edit,
                   target_values=per_block * above + (home if j == 0 else 0) + (logits if j in (0, head) else 0),
                   solve=solve if edit else 0,
                   statistics=stats.collection_bytes(cfg, dt, stats_tokens, 1 if state_on_host else edit)
                   if edit else 0)
        work = max(row["state"] + max(row["target_values"], row["solve"]), row["statistics"])
        return row | {"need": row["weights"] + work}
    return need


def plan_stages(rows: list[dict]) -> list[int]:
    """Each block's device index in a memory plan: M.load's placement, so a run's blocks are
    where its plan puts them (Editor.open, load_model)."""
    return [j for j, row in enumerate(rows) for _ in row["blocks"]]


ROW_SLOTS = 30      # token slots a target-value row keeps between passes: its padded prefix in the
#   cache (CounterFact and zsRE with GPT-2's BPE and the 10-token templates, 100 requests: 15-23 and
#   18-28.1 a row on average at 512-8,192 tokens a pass) and, fewer, its padded suffix of the edit
#   layer's output (4-7)
LOGIT_VALUES = 1.0   # vocabulary-wide float32 values a pass holds at its peak, per token slot: the loss
#   reads at most 0.34 positions a slot (zsRE's answers at 512 tokens a pass, 0.28 at 1,024-2,048;
#   CounterFact 0.15), each held three times at the peak (the log-probabilities, their gradient,
#   the logits' gradient), a KL row's six (its KL's terms); measured on CounterFact and zsRE, GPT-2's
#   BPE, as the resident memory of each pass on the CPU (test_memory_plan_target_value_term_covers_a_...)


def target_value_bytes(cfg: M.Config, hp: "L.HParams", dt: torch.dtype, z_tokens: int,
                       stream: StreamTokens | None = None) -> tuple[int, int, int]:
    """E4's memory, (per block above the last edit layer, on the first device, vocabulary-wide):
    one pass's activations kept for backward (slot_values per token slot and block, its slots
    pass_slots) and its copy of the prefix cache; beside
    them, all the step's passes keep their prefix caches (rows × ROW_SLOTS keys and values per
    block, a row's at most its length) and, on the first device, the output of the edit layer
    from each subject on and the KL rows' first log-probabilities (float32, V each); and a pass's
    logits at the positions the loss reads, with their gradients (float32, V each: on the first
    device, where the loss is, and on the head's): LOGIT_VALUES a slot, or, for a known stream,
    more where its targets make a pass read more (logit_values)."""
    d, kv = cfg.d_model, 2 * cfg.n_kv_heads * cfg.head_dim
    requests, rows = step_rows(hp)
    slots = pass_slots(cfg, hp, z_tokens, stream)
    row_slots = min(ROW_SLOTS, stream.row if stream else ROW_SLOTS)
    kept = rows * row_slots * kv * dt.itemsize
    home = rows * row_slots * d * dt.itemsize + requests * cfg.vocab_size * 4
    logits = logit_values(cfg, rows, requests, slots, stream) * cfg.vocab_size * 4
    return pass_bytes(cfg, hp, dt, z_tokens, stream) + kept, home, logits


def pass_bytes(cfg: M.Config, hp: "L.HParams", dt: torch.dtype, z_tokens: int, stream: StreamTokens | None) -> int:
    """One pass's part of target_value_bytes per block: what its slots keep for backward
    (slot_values) and its copy of the prefix cache."""
    slots = pass_slots(cfg, hp, z_tokens, stream)
    return slots * (slot_values(cfg, stream.row if stream else slots) + 2 * cfg.n_kv_heads * cfg.head_dim) * dt.itemsize


def slot_values(cfg: M.Config, row: int) -> int:
    """Values a pass keeps for backward per token slot and block, in the model's dtype (the
    weights frozen, as E4's). LLaMA's block keeps 8d + 3m and a little more (the softmax's
    log-sum-exps, masks: 0.4d at 16 dims a head), counted as the larger of 6d + 4m (the count
    checked against Llama-3-8B's GPU peaks: m − 2d to spare) and 9d + 3m (d to spare where the
    MLP is narrow); GPT-J's and GPT-2's 6d + 2m. Where a block keeps more: 2d for each RMSNorm on
    the residual stream past two (Gemma 2 and 3, GLM-4: four), 2 for each value of q and k (and
    of each head's norm) that a norm reads (Qwen3, OLMo 2 and 3, Gemma 3), the values of q, k and v
    that OLMo's clamps read (clip_qkv), and Gemma 2's capped
    attention scores, written out (its tanh, its softmax in float32 and cast back: 4 values a
    score, a slot attending to at most `row` keys). Checked against what autograd keeps in the
    blocks of every family (test_memory_plan_slot_values_cover_what_autograd_keeps)."""
    d, m = cfg.d_model, cfg.d_mlp
    if not cfg.llama_like:
        return 6 * d + 2 * m
    norms = 2 * cfg.pre_norms + 2 * cfg.post_norms
    heads = 2 * (cfg.n_heads + cfg.n_kv_heads) * (cfg.head_dim + 1) if cfg.qk_norm else 0
    clamped = (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim if cfg.clip_qkv is not None else 0
    scores = 4 * cfg.n_heads * row if cfg.attn_softcap is not None else 0
    return max(6 * d + 4 * m, 9 * d + 3 * m) + 2 * d * max(0, norms - 2) + heads + clamped + scores


POSITION_VALUES = 3.5   # vocabulary-wide float32 values a pass holds per position its loss reads: the
#   log-probabilities, their gradient, the logits' gradient (measured 3.09 on GPT-2's shape); with a
#   final soft cap (Gemma 2) its saved tanh, 0.5 more (3.81 measured)


def logit_values(cfg: M.Config, rows: int, requests: int, slots: int, stream: StreamTokens | None) -> int:
    """Vocabulary-wide values of a pass's logits: LOGIT_VALUES a slot (measured on CounterFact and
    zsRE); for a known stream at least POSITION_VALUES for each position its loss can read
    (logit_positions) and 3 for each KL row's terms."""
    calibrated = math.ceil(LOGIT_VALUES * slots)
    if not stream:
        return calibrated
    per = POSITION_VALUES + (0.5 if cfg.final_softcap else 0.0)
    return max(calibrated, math.ceil(per * logit_positions(rows, requests, slots, stream)) + 3 * requests)


def logit_positions(rows: int, requests: int, slots: int, stream: StreamTokens) -> int:
    """The most positions a pass's loss reads (suffix_batches, _chunks): a pass of b rows pads every
    row to its longest target k, b·k. With a target row among them, each row is at least the
    shortest prompt and k − 1 tokens long, so b·k ≤ slots·T/(T + c) (T the longest target, c the
    shortest prompt less one), and at most every row's T; a pass of KL rows alone (sorted last
    where the targets' suffixes are shorter) reads one position a row, at most slots / the
    shortest KL row, and at most one a request."""
    T, c = stream.target, stream.prompt - 1
    with_targets = min(rows * T, max(T, math.ceil(slots * T / (T + c))))
    return max(with_targets, min(requests, math.ceil(slots / stream.kl)))


def step_rows(hp: "L.HParams") -> tuple[int, int]:
    """(requests, target-value rows) of a step: each request in every template and a KL row (ROME:
    one request at a time)."""
    requests = 1 if L.method_of(hp.method).locate == "rome" else hp.batch_size
    return requests, requests * (2 + sum(count for _, count in L.method_of(hp.method).templates))


def pass_slots(cfg: M.Config, hp: "L.HParams", z_tokens: int, stream: StreamTokens | None = None) -> int:
    """The token slots E4's largest pass holds (suffix_batches: its rows, each padded to the
    longest prefix and suffix): z_tokens, or fewer where the step's rows (step_rows) take fewer,
    each at most the stream's longest (stream_tokens), else a prefix and a suffix of the model's
    positions; a row longer than z_tokens is a pass of its own."""
    rows = step_rows(hp)[1]
    if stream:
        return max(min(z_tokens, rows * stream.row), stream.row)
    return min(z_tokens, 2 * rows * cfg.max_positions)


class StreamTokens(NamedTuple):
    row: int        # the most tokens a target-value row is padded to: its prefix and suffix
    target: int     # the longest target, in tokens
    prompt: int     # the shortest prompt, its subject in, in tokens
    kl: int         # the shortest KL row ("{subject} is a"), in tokens


TEMPLATE_FACTOR = 3     # a context template of n generated tokens re-encodes to at most 3n: a byte-
#   fallback tokenizer's lone byte decodes to "�", three byte tokens again (random models: +14 on 20;
#   GPT-2's BPE re-merging a random model's text: +8 on 10); trained models' text, 0-3 more


def stream_tokens(tok, requests, method: str, cfg: M.Config) -> StreamTokens | None:
    """A bound on E4's rows for `requests` (z_rows; the templates are not made when a run plans):
    the longest prefix — a context template's (TEMPLATE_FACTOR × its group's length) and a prompt
    up to its subject — plus the longest suffix — the prompt's rest and its target, or a KL row's
    " is a" — the longest target, the shortest prompt and KL row. A request longer than the
    model's positions is left out (the run refuses it, or skips it with --skip-bad); None if none
    is left."""
    template = TEMPLATE_FACTOR * max((length for length, _ in L.method_of(method).templates), default=0)
    prefix = suffix = target = 0
    prompt = kl_row = sys.maxsize
    for q in requests:
        head = len(tok.encode(q.prompt[:q.prompt.index("{}")] + q.subject))
        whole = len(tok.encode(q.prompt.replace("{}", q.subject, 1)))
        new = len(L.ev.target_ids(tok, q.target_new))
        if whole + new > cfg.position_limit[0]:
            continue
        kl_ids = len(tok.encode(q.subject + " is a"))
        kl = kl_ids - len(tok.encode(q.subject)) + 1
        prefix, suffix, target = max(prefix, head), max(suffix, whole - head + new, kl), max(target, new)
        prompt, kl_row = min(prompt, whole), min(kl_row, kl_ids)
    return StreamTokens(template + prefix + suffix, target, prompt, kl_row) if target else None


def solve_bytes(cfg: M.Config, method: str) -> int:
    """A solve's float64 temporaries beside the state: for the Cholesky methods the m×m system
    (factored in its own memory: solve_system) and four d×m (W, the right side, two products);
    for AlphaEdit's LU ones (E12, E22) the system and its factor, and three d×m."""
    m, d = cfg.d_mlp, cfg.d_model
    return 8 * (2 * m * m + 3 * d * m if L.projected(method) else m * m + 4 * d * m)


def brought_bytes(cfg: M.Config, method: str, kept_edits: int = 0) -> int:
    """What of one layer's float64 state (layer_state_bytes) is on the GPU during its solve when
    the state lives on the host: all of it but C and S_KK, which come two blocks of rows at a
    time (row_blocks). AlphaEdit's step 0 takes C whole for its projector, in P's place."""
    m = cfg.d_mlp
    streamed = 1 + ("S_KK" in L.method_of(method).memory)
    return layer_state_bytes(cfg, method, kept_edits) - streamed * 8 * m * m + 2 * min(L.BLOCK_BYTES, 8 * m * m)


def run_shares(capacity: list[float], on_cpu: list[bool]) -> list[float]:
    """The shares a run places its blocks by (M.device_shares): a GPU its memory, a cpu entry the
    mean of the GPUs' (all alike without one); the plan judges each row against its own memory."""
    gpus = [c for c, cpu in zip(capacity, on_cpu) if not cpu]
    mean = sum(gpus) / len(gpus) if gpus else 1.0
    return [mean if cpu else c for c, cpu in zip(capacity, on_cpu)]


def print_plan(args) -> int:
    """--plan: the memory plan of the run the flags describe (with --resume, the run's settings and
    the flags that may change), from the model's config as the run reads it; the run's blocks are
    placed by it. A checkpoint the run would refuse at load, from its files alone
    (M.checkpoint_config: tensor names, shapes and dtypes, the tokenizer; no tensor data read but
    a tied head the files also store), is refused here in its words; a directory without weights
    yet (config.json downloaded first, to plan) is planned from config.json alone."""
    _, settings, cfg = L.open_run(args)             # (M.checkpoint_config: the files checked, if any)
    requests = L.load_requests(settings)[0] if settings.edits else []        # as the run reads them
    given = "device" in args.given or args.resume            # (a resumed run's: its recorded devices)
    typed = M.check_devices(settings.device, here=False) if given and settings.device != "auto" else None
    if args.plan_gib and typed and len(typed) != len(args.plan_gib):
        raise ValueError(f"--plan-gib gives the memory of {len(args.plan_gib)} device(s), --device {args.device} "
                         f"names {len(typed)}: give one figure per device")
    if not any(Path(settings.model).glob("*.safetensors")):   # planning before the download: config.json only
        print(f"no weights in {settings.model} yet: planned from config.json alone (the run checks the "
              "checkpoint's files when it loads them)")
        if quant := M.read_json(Path(settings.model) / "config.json").get("quantization_config"):
            method = quant.get("quant_method", "?") if isinstance(quant, dict) else quant
            print(f"config.json has a quantization_config ({method}): planned as float weights of --dtype; the run "
                  "loads float tensors only (a quantised checkpoint's are refused then; a merge saved in 16 bits "
                  "that kept the entry loads)")
    host = args.plan_host_gib * 2 ** 30 if args.plan_host_gib else M.device_memory(torch.device("cpu"))
    if args.plan_gib:
        names = [str(dev) for dev in typed] if typed else [f"device {i}" for i in range(len(args.plan_gib))]
        capacity = [g * 2 ** 30 for g in args.plan_gib]
        on_cpu = [dev.type == "cpu" for dev in typed] if typed else [False] * len(names)
    else:
        devices = M.check_devices(settings.device)
        names = [str(dev) for dev in devices]
        on_cpu = [dev.type == "cpu" for dev in devices]
        capacity = [host if cpu else M.device_memory(dev) for dev, cpu in zip(devices, on_cpu)]   # the host's memory
    if args.plan_host_gib and not settings.state_device and not any(on_cpu):   # (a resumed run's: its recorded one)
        raise ValueError("--plan-host-gib without --state-device cpu or a cpu device: the run keeps nothing in "
                         "host memory to plan for; the figure would not be used")
    stream = run_stream_tokens(settings, cfg, requests)
    rows = run_memory_plan(settings, cfg, requests, run_shares(capacity, on_cpu), stream)
    hp = settings.hparams
    on_host = ", --state-device cpu" if settings.state_device else ""
    fewer = (f" (a step of {len(requests)}: all of --edits{' that --limit takes' if settings.limit else ''})"
             if requests and len(requests) < hp.batch_size else "")
    print(f"memory plan: {settings.model} ({cfg.arch}), {hp.method}, layers {list(hp.layers)}, {settings.dtype}, "
          f"--batch-size {hp.batch_size}{fewer}, --z-batch-tokens {settings.z_batch_tokens}{on_host} (GiB)")
    step = replace(hp, batch_size=min(hp.batch_size, len(requests))) if requests else hp
    if stream and (slots := pass_slots(cfg, step, settings.z_batch_tokens, stream)) != settings.z_batch_tokens:
        n_requests, n_rows = step_rows(step)
        step_is = "one request" if n_requests == 1 else f"a step of {n_requests} requests"
        print(f"targets: a pass holds at most {slots} tokens, not --z-batch-tokens' {settings.z_batch_tokens}: "
              f"{step_is} makes {n_rows} rows, each at most {stream.row} tokens (a context template, then "
              "--edits' longest prompt and target)")
    if cfg.attn_softcap is not None and not stream:
        print(f"targets: the capped attention scores (written out: no fused kernel caps them) counted for rows as "
              f"long as a pass ({pass_slots(cfg, step, settings.z_batch_tokens)} tokens); --edits, with the "
              "checkpoint's tokenizer, counts its rows' own length")
    if hp.superseded == "remove" and L.method_of(hp.method).memory:
        per = 1000 * edit_column_bytes(cfg, hp.method)
        counted = (f"counted for the {kept_edit_count(requests)} of the {len(requests)} edits of --edits whose "
                   "prompt is edited again" if settings.edits else "not counted: give --edits")
        print(f"--superseded remove: the state grows by {per / 2 ** 20:.3g} MiB per 1,000 edits and edit "
              f"layer ({counted}); every checkpoint holds it too")
    gib = lambda b: f"{b / 2 ** 30:.1f}" if b == 0 or b >= 2 ** 29 else f"{b / 2 ** 30:.2g}"   # small: 2 digits
    print(f"{'device':<12}{'blocks':>10}{'weights':>9}{'state':>8}{'targets':>8}{'solve':>8}{'stats':>8}"
          f"{'need':>8}{'has':>8}  fits")
    has = capacity + [host]
    for row, name, room in zip(rows, names + ["host"], has):
        span = f"{row['blocks'][0]}-{row['blocks'][-1]}" if row["blocks"] else "-"
        print(f"{name:<12}{span:>10}{gib(row['weights']):>9}{gib(row['state']):>8}{gib(row['target_values']):>8}"
              f"{gib(row['solve']):>8}{gib(row['statistics']):>8}{gib(row['need']):>8}{gib(room):>8}  "
              f"{'yes' if row['need'] <= room else 'NO'}")
    fits = all(row["need"] <= room for row, room in zip(rows, has))
    ram = [row["need"] for row, cpu in zip(rows, on_cpu + [True]) if cpu and row["need"]]
    if len(ram) > 1 or any(on_cpu) and args.plan_gib and args.plan_host_gib:   # the CPU's devices and the host share
        #   one memory (a cpu device given its --plan-gib figure: --plan-host-gib's holds it too)
        print(f"{'cpu + host':<12}{'':>51}{gib(sum(ram)):>8}{gib(host):>8}  {'yes' if sum(ram) <= host else 'NO'}"
              "  (one memory: the rows on the CPU together)")
        fits = fits and sum(ram) <= host
    return 0 if fits else 1


def run_memory_plan(settings: "L.Settings", cfg: M.Config, requests, shares: list[float],
                    stream: StreamTokens | None) -> list[dict]:
    """The memory plan of the command's run: its settings, and its stream (a step holds at most
    --batch-size of its requests; --superseded remove keeps the edits whose prompt comes again;
    `stream`: run_stream_tokens of them)."""
    hp = settings.hparams
    if requests:
        hp = replace(hp, batch_size=min(hp.batch_size, len(requests)))
    return memory_plan(cfg, hp, settings.dtype, settings.z_batch_tokens, shares, bool(settings.state_device),
                       kept_edit_count(requests), settings.stats_batch_tokens, stream=stream)


def run_stream_tokens(settings: "L.Settings", cfg: M.Config, requests) -> StreamTokens | None:
    """stream_tokens of the run's requests with its checkpoint's tokenizer; None without requests
    or without a readable tokenizer.json (planned before the download, where the run checks it:
    the config's bound)."""
    try:
        tok = M.Tokenizer(Path(settings.model), cfg) if requests else None
    except M.CheckpointError:
        tok = None
    return stream_tokens(tok, requests, settings.hparams.method, cfg) if tok else None


def kept_edit_count(requests) -> int:
    """How many of the requests edit a prompt that another one edits too: the E8a columns a run
    with --superseded remove keeps (EditState.recurring)."""
    recurring = L.recurring_prompts(requests)
    return sum(q.rewrite_prompt() in recurring for q in requests)


def state_tensor_bytes(cfg: M.Config, method: str) -> list[int]:
    """The bytes of each float64 tensor of one edit layer's state: C, the method's edit memory
    (S_KK m×m, S_VK d×m) and AlphaEdit's projector (m×m)."""
    m, d = cfg.d_mlp, cfg.d_model
    sizes = {"S_KK": m * m, "S_VK": d * m}
    projector = [m * m] if L.projected(method) else []
    return [8 * n for n in (m * m, *(sizes[k] for k in L.method_of(method).memory), *projector)]


def edit_column_bytes(cfg: M.Config, method: str) -> int:
    """One edit kept to take it out again (E8a, --superseded remove): its key (m) and, with S_VK,
    its value (d), in float64; nothing for a method without memory."""
    memory = L.method_of(method).memory
    return 8 * (cfg.d_mlp + (cfg.d_model if "S_VK" in memory else 0)) if memory else 0


def layer_state_bytes(cfg: M.Config, method: str, kept_edits: int = 0) -> int:
    """One edit layer's float64 state (state_tensor_bytes) with `kept_edits` edits' columns."""
    return sum(state_tensor_bytes(cfg, method)) + kept_edits * edit_column_bytes(cfg, method)


def columns_kept(hp: "L.HParams", n_edits: int) -> int:
    """The edits whose columns a run keeps: n_edits under hp.superseded "remove", else none."""
    return n_edits if hp.superseded == "remove" else 0
