"""Benchmark: forward throughput against transformers, preservation statistics against their
roofline, and two editing steps per method (the second split into phases; peak memory over both),
on random-weight checkpoints of real shapes.

    python bench.py                      # on a GPU: llama3-8b and gptj-6b; on a CPU: tiny, stories
    python bench.py --preset tiny        # the CI smoke test
    python bench.py --preset llama3-8b --device cuda --dtype bfloat16 --json bench.json
    python bench.py --preset llama3-8b --memory-gib 44.7 --z-batch-tokens 1024   # as on a 48 GB card

Nothing is downloaded: each preset's checkpoint is written in the HF layout with random weights
(normal, std 0.02) and loaded through model.load, as a user's checkpoint would be. --json is
rewritten as each part ends (forward, statistics, each method's step, the one-request steps,
which run right after LyapLock's), and SIGTERM (`timeout`) ends the run through Python's shutdown
so the checkpoint's temporary directory is removed: a run stopped early keeps what it measured.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

import data
import eval as E
import lyaplock as L
import model as M
import plan
import stats as S

HERE = Path(__file__).parent
REQUESTS = HERE / "fixtures" / "counterfact-easyedit.json"      # the timed steps' requests
LLAMA = dict(model_type="llama", rms_norm_eps=1e-5, bos_token_id=128000, eos_token_id=128001,
             tie_word_embeddings=False, max_position_embeddings=8192)
PRESETS = {   # config.json, edit layers
    "llama3-8b": (LLAMA | dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                               num_key_value_heads=8, intermediate_size=14336, vocab_size=128256,
                               rope_theta=500000.0), (4, 5, 6, 7, 8)),
    "gptj-6b": (dict(model_type="gptj", n_embd=4096, n_layer=28, n_head=16, rotary_dim=64, n_inner=16384,
                     vocab_size=50400, n_positions=2048, bos_token_id=50256, eos_token_id=50256), (3, 4, 5, 6, 7, 8)),
    "gpt2-xl": (dict(model_type="gpt2", n_embd=1600, n_layer=48, n_head=25, n_inner=6400, vocab_size=50257,
                     n_positions=1024, bos_token_id=50256, eos_token_id=50256), (13, 14, 15, 16, 17)),
    "qwen2.5-7b": (dict(model_type="qwen2", hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
                        num_key_value_heads=4, intermediate_size=18944, vocab_size=152064, rope_theta=1e6,
                        rms_norm_eps=1e-6, tie_word_embeddings=False, max_position_embeddings=131072,
                        use_sliding_window=False, sliding_window=131072, max_window_layers=28,
                        bos_token_id=151643, eos_token_id=151643), (7, 8, 9, 10, 11)),   # the published
    "mistral-7b": (dict(model_type="mistral", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                        num_key_value_heads=8, intermediate_size=14336, vocab_size=32768, rope_theta=1e6,
                        rms_norm_eps=1e-5, sliding_window=None, tie_word_embeddings=False,
                        max_position_embeddings=32768, bos_token_id=1, eos_token_id=2), (4, 5, 6, 7, 8)),
    "pythia-6.9b": (dict(model_type="gpt_neox", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                         intermediate_size=16384, vocab_size=50432, rotary_pct=0.25, rotary_emb_base=10000,
                         hidden_act="gelu", use_parallel_residual=True, max_position_embeddings=2048,
                         bos_token_id=0, eos_token_id=0), (4, 5, 6, 7, 8)),
    "phi-2": (dict(model_type="phi", hidden_size=2560, num_hidden_layers=32, num_attention_heads=32,
                   intermediate_size=10240, vocab_size=51200, partial_rotary_factor=0.4, rope_theta=10000.0,
                   hidden_act="gelu_new", layer_norm_eps=1e-5, max_position_embeddings=2048,
                   bos_token_id=50256, eos_token_id=50256), (4, 5, 6, 7, 8)),
    "phi3-mini": (dict(model_type="phi3", hidden_size=3072, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, intermediate_size=8192, vocab_size=32064, rms_norm_eps=1e-5,
                       max_position_embeddings=4096, original_max_position_embeddings=4096, sliding_window=2047,
                       tie_word_embeddings=False, bos_token_id=1, eos_token_id=32000), (4, 5, 6, 7, 8)),
    "olmo3-7b": (dict(model_type="olmo3", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, intermediate_size=11008, vocab_size=100278, rms_norm_eps=1e-6,
                      max_position_embeddings=65536, sliding_window=4096, rope_theta=5e5,
                      rope_scaling=dict(rope_type="yarn", factor=8.0, original_max_position_embeddings=8192,
                                        attention_factor=1.2079441541679836, beta_fast=32, beta_slow=1),
                      tie_word_embeddings=False, bos_token_id=None, eos_token_id=100257), (4, 5, 6, 7, 8)),
    "glm4-9b": (dict(model_type="glm4", hidden_size=4096, num_hidden_layers=40, num_attention_heads=32,
                     num_key_value_heads=2, head_dim=128, intermediate_size=13696, vocab_size=151552,
                     partial_rotary_factor=0.5, rope_theta=10000.0, rms_norm_eps=1e-5, attention_bias=True,
                     max_position_embeddings=32768, tie_word_embeddings=False, pad_token_id=151329,
                     eos_token_id=[151329, 151336, 151338]), (4, 5, 6, 7, 8)),
    "granite-3.3-8b": (dict(model_type="granite", hidden_size=4096, num_hidden_layers=40, num_attention_heads=32,
                            num_key_value_heads=8, intermediate_size=12800, vocab_size=49159, rope_theta=1e7,
                            rms_norm_eps=1e-5, embedding_multiplier=12.0, attention_multiplier=0.0078125,
                            residual_multiplier=0.22, logits_scaling=16.0, tie_word_embeddings=True,
                            max_position_embeddings=131072, bos_token_id=0, eos_token_id=0, pad_token_id=0),
                       (4, 5, 6, 7, 8)),
    "ministral3-8b": (dict(model_type="ministral3", hidden_size=4096, num_hidden_layers=34, num_attention_heads=32,
                           num_key_value_heads=8, head_dim=128, intermediate_size=14336, vocab_size=131072,
                           rms_norm_eps=1e-5, max_position_embeddings=262144, tie_word_embeddings=False,
                           bos_token_id=1, eos_token_id=2, pad_token_id=11), (4, 5, 6, 7, 8)),   # YaRN: the default
    "smollm3-3b": (dict(model_type="smollm3", hidden_size=2048, num_hidden_layers=36, num_attention_heads=16,
                        num_key_value_heads=4, intermediate_size=11008, vocab_size=128256, rope_theta=5e6,
                        rms_norm_eps=1e-6, tie_word_embeddings=True, max_position_embeddings=65536,
                        no_rope_layer_interval=4, bos_token_id=128000, eos_token_id=128012,
                        pad_token_id=128004), (4, 5, 6, 7, 8)),
    "olmo-7b": (dict(model_type="olmo", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,   # 0424
                     num_key_value_heads=32, intermediate_size=11008, vocab_size=50304, clip_qkv=8.0,
                     max_position_embeddings=4096, rope_theta=10000.0, tie_word_embeddings=False,
                     bos_token_id=None, eos_token_id=50279, pad_token_id=1), (4, 5, 6, 7, 8)),
    "stablelm-2-1.6b": (dict(model_type="stablelm", hidden_size=2048, num_hidden_layers=24, num_attention_heads=32,
                             num_key_value_heads=32, intermediate_size=5632, vocab_size=100352,
                             partial_rotary_factor=0.25, use_qkv_bias=True, layer_norm_eps=1e-5, rope_theta=10000.0,
                             max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=100257,
                             eos_token_id=100257), (3, 4, 5, 6)),
    "small": (LLAMA | dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                           intermediate_size=1536, vocab_size=50257, bos_token_id=50256, eos_token_id=50256), (1, 2, 3)),
    "tiny": (LLAMA | dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                          intermediate_size=128, vocab_size=50257, bos_token_id=50256, eos_token_id=50256), (1, 2)),
    "gpt2-tiny": (dict(model_type="gpt2", n_embd=64, n_layer=4, n_head=4, vocab_size=50257, n_positions=1024,
                       bos_token_id=50256, eos_token_id=50256), (1, 2)),
}


def weight_shapes(config: dict) -> dict:
    """The shapes of a checkpoint's tensors, by their HF names (a tied head's not among them)."""
    cfg = M.Config.from_hf(config)
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in M.CausalLM(cfg).state_dict().items()}
    if cfg.tie_embeddings:
        del shapes[cfg.head_weight]
    return shapes


def make_checkpoint(path: Path, config: dict, dtype, device) -> Path:
    """Random weights of the preset's exact shapes, written with the HF tensor names."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    cfg, shapes = M.Config.from_hf(config), weight_shapes(config)
    g = torch.Generator(device).manual_seed(0)
    tensors = {n: (torch.ones(s, device=device, dtype=dtype) if ("norm" in n or "ln_" in n) and n.endswith("weight")
                   else torch.randn(s, device=device, dtype=dtype, generator=g) * 0.02).cpu()
               for n, s in shapes.items()}
    save_file(tensors, str(path / "model.safetensors"))
    (path / "tokenizer.json").write_text(gpt2_tokenizer(cfg.vocab_size, bos=cfg.arch in ("llama", "mistral")))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}))
    return path


def gpt2_tokenizer(vocab_size: int, bos: bool = False) -> str:
    """tokenizer.json of the GPT-2 BPE; for a smaller vocabulary (Mistral's) its first merges only
    (GPT-2's ids are the 256 bytes, then the merges in order), <|endoftext|> the last id, so that
    every id it makes is one the model has; with `bos`, its template puts <|endoftext|> before a
    text, as LLaMA's and Mistral's put their BOS."""
    tok = json.loads((HERE / "fixtures" / "gpt2-tokenizer" / "tokenizer.json").read_text())
    if vocab_size < len(tok["model"]["vocab"]):
        last = vocab_size - 1
        bpe = tok["model"]
        bpe["vocab"] = {t: i for t, i in bpe["vocab"].items() if i < last} | {"<|endoftext|>": last}
        bpe["merges"] = bpe["merges"][:last - 256]
        tok["added_tokens"] = [t | {"id": last} for t in tok["added_tokens"] if t["content"] == "<|endoftext|>"]
    if bos:
        eot = tok["model"]["vocab"]["<|endoftext|>"]
        tok["post_processor"] = {"type": "TemplateProcessing", "single": [
            {"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [eot], "tokens": ["<|endoftext|>"]}}}
    return json.dumps(tok)


def timed(fn, device, repeat=3):
    """Median seconds of `repeat` runs after one warm-up."""
    fn()
    out = []
    for _ in range(repeat):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def on_gpu(device) -> bool:
    """cuda and cuda:N alike."""
    return torch.device(device).type == "cuda"


def sync(device):
    if on_gpu(device):
        torch.cuda.synchronize(device)


def peak_flops(device, dtype, n=4096 if torch.cuda.is_available() else 1024):
    a = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n ** 3 / timed(lambda: a @ a, device)


def forward(ckpt, m, device, dtype, batch=8, seq=512, compare=True):
    """Tokens/s of our forward, and (compare) of transformers' eager model on the same weights and
    inputs (a second copy of the weights on the device: not under a --memory-gib cap)."""
    ids = torch.randint(0, min(m.cfg.vocab_size, 50000), (batch, seq), device=device)
    with torch.no_grad():
        ours = batch * seq / timed(lambda: m(ids, logits_at=ids[:, -1:] * 0 + seq - 1), device)
        try:
            import transformers
        except ImportError:
            compare = False
        if not compare:
            return dict(ours_tok_s=ours)
        theirs = batch * seq / hf_seconds(transformers, ckpt, ids, device, dtype)
    if on_gpu(device):
        torch.cuda.empty_cache()              # its blocks back before the statistics and steps
    return dict(ours_tok_s=ours, hf_eager_tok_s=theirs, ratio=ours / theirs)


def hf_seconds(transformers, ckpt, ids, device, dtype) -> float:
    """Seconds of transformers' eager forward over `ids` (its model freed on return)."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        ckpt, dtype=M.DTYPES[dtype], attn_implementation="eager").to(device).eval()
    return timed(lambda: hf(input_ids=ids, logits_to_keep=1), device)


STATS_SEQ = 700          # tokens per statistics sequence (the full setting: 100,000 of them)


def stats(m, layers, device, dtype, n_tokens, seq=STATS_SEQ, state_device=None):
    """Tokens/s collecting C for all edit layers in one pass (with state_device, one pass per
    layer, each C to that device: stats.collection_passes), and that over its roofline; and C
    (random tokens: with random weights any text is as good, and C stays full rank)."""
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, min(m.cfg.vocab_size, 50000), (seq,), generator=g).tolist()
            for _ in range(-(-n_tokens // seq))]
    C = {}
    collect = lambda: C.update(S.collect_stats(m, seqs, layers, batch_tokens=12 * seq, state_device=state_device))
    t = timed(collect, device, repeat=1)
    c = m.cfg
    per_layer = 2 * (c.d_model * c.head_dim * (2 * c.n_heads + 2 * c.n_kv_heads)
                     + (3 if c.llama_like else 2) * c.d_model * c.d_mlp) + 2 * seq * c.n_heads * c.head_dim
    blocks_run = sum(max(p) + 1 for p in S.collection_passes(m, layers, state_device))   # every pass's forward
    fwd = len(seqs) * seq * per_layer * blocks_run
    cflops = len(seqs) * seq * c.d_mlp * (c.d_mlp + 1) * len(layers)   # kkᵀ is symmetric: half of it
    roof = fwd / peak_flops(device, M.DTYPES[dtype]) + cflops / peak_flops(device, torch.float64)
    return dict(tok_s=len(seqs) * seq / t, seconds=t, roofline_seconds=roof, fraction_of_roofline=roof / t), C


def edit_step(m, ckpt, layers, method, C, device, n_edits, seed=0, z_tokens=2048, state_device=None):
    """Two editing steps of n_edits CounterFact requests each (real prompts): the context
    templates alone; the first step (with them, and AlphaEdit's projector) as a whole; the
    second (the steady state, with the edit memory on the device) split into phases, and PL
    timed on its own; the peak memory over both; then the standard metrics of the second batch
    (efficacy, generalization, specificity), timed after a warm-up. With state_device, W0 lives
    there too, as the command keeps it (and C comes over a block of rows at a time, PL's included)."""
    requests, _ = data.load_requests(REQUESTS, limit=2 * n_edits)
    hp = L.replace(L.preset(m.cfg, method), layers=bench_layers(m, layers, method), batch_size=n_edits)  # (the plan's)
    layers = hp.layers
    W0 = {l: m.edit_weight(l).to(state_device or device, copy=True) for l in layers}
    if on_gpu(device):
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t = time.perf_counter()
    templates = L.method_templates(m, seed, method)
    sync(device)
    out = dict(templates=time.perf_counter() - t)
    state = L.EditState.start(method, layers)
    L.edit_batch(m, requests[:n_edits], templates, hp, state, C, W0, z_tokens)
    sync(device)
    out["first_step"] = time.perf_counter() - t
    batch = requests[n_edits:2 * n_edits]             # (main: the file holds 2 n)
    log = L.edit_batch(m, batch, templates, hp, state, C, W0, z_tokens)
    out |= dict(target_values=log["seconds_z"], keys=log["seconds_keys"], solve_pl_queue=log["seconds_solve"])
    out["total"] = out["target_values"] + out["keys"] + out["solve_pl_queue"]
    out["of_which_pl"] = timed(lambda: [L.preservation_loss(m.edit_weight(l), W0[l].to(device), C[l]) for l in layers],
                               device, repeat=1)      # PL (E2) for every layer; the queue is scalar arithmetic
    if on_gpu(device):
        out["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    dtype = next(name for name, dt in M.DTYPES.items() if dt == m.embed.weight.dtype)
    planned = plan.memory_plan(m.cfg, hp, dtype, z_tokens, [1.0], state_on_host=bool(state_device),
                               stream=plan.stream_tokens(m.tokenizer, batch, hp.method, m.cfg))[0]
    out["planned_gib"] = planned["need"] / 2 ** 30           # what --plan says for this step, beside the peak
    out["eval"] = timed(lambda: E.edit_eval(m, batch), device, repeat=1)   # after a warm-up: the first
    # method's scoring held the process's first calls (docs/bench: LyapLock's 0.82 s, MEMIT's 0.49, same work)
    for l in layers:   # leave the model as it was for the next method
        m.edit_weight(l).copy_(W0[l])
    return out


def note(line: str):
    """A progress line on stderr (stdout keeps the results)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)


def bench_layers(m, layers, method) -> tuple:
    """The edit layers a method's step uses: its preset's for a published shape, else the bench's."""
    if (m.cfg.arch, m.cfg.d_model, m.cfg.n_layers, m.cfg.d_mlp) in L.PUBLISHED:
        return L.preset(m.cfg, method).layers
    return (layers[-1],) if L.METHODS[method].locate == "rome" else tuple(layers)


def single_edits(m, layers, C, device, n_steps: int, z_tokens=2048, state_device=None) -> dict:
    """The long-horizon protocol's rate: n_steps LyapLock steps of ONE request each (after one
    to calibrate the queue), edits per second and the phases of a step."""
    requests, _ = data.load_requests(REQUESTS, limit=n_steps + 1)
    hp = L.replace(L.preset(m.cfg, "lyaplock"), layers=bench_layers(m, layers, "lyaplock"), batch_size=1)
    W0 = {l: m.edit_weight(l).to(state_device or device, copy=True) for l in hp.layers}
    templates = L.context_templates(m, 0)
    state = L.EditState.start("lyaplock", hp.layers)
    L.edit_batch(m, requests[:1], templates, hp, state, C, W0, z_tokens)
    sync(device)
    t = time.perf_counter()
    logs = [L.edit_batch(m, [q], templates, hp, state, C, W0, z_tokens) for q in requests[1:]]
    sync(device)
    seconds = time.perf_counter() - t
    for l in hp.layers:
        m.edit_weight(l).copy_(W0[l])
    phase = {k: sum(e[f"seconds_{k}"] for e in logs) / len(logs) for k in ("z", "keys", "solve")}
    return dict(steps=len(logs), edits_per_s=len(logs) / seconds, step_seconds=phase)


def run(preset, device, dtype, n_edits, stats_tokens, workdir, z_tokens=2048, methods=("lyaplock", "memit", "alphaedit"),
        state_device=None, batch1=0, compare_hf=True, save=lambda r: None):
    """One preset's results; save(r) is called with them so far as each part ends. The batch1
    one-request steps run right after LyapLock's step (the first method), before the others."""
    if preset == "stories":
        ckpt, layers = HERE / "fixtures" / "stories260K-hf", (1, 2)
    else:
        config, layers = PRESETS[preset]
        ckpt = make_checkpoint(Path(workdir) / preset, config, M.DTYPES[dtype], device)
    m = M.load(ckpt, device, dtype)
    r = dict(preset=preset, device=torch.cuda.get_device_name(device) if on_gpu(device) else "cpu",
             dtype=dtype, layers=list(layers), date=time.strftime("%Y-%m-%d"))
    shape = (8, 512) if on_gpu(device) else (2, 64) if preset == "tiny" else (4, 128)
    note(f"{preset}: forward pass, ours" + (" and transformers'" if compare_hf else ""))
    r["forward"] = forward(ckpt, m, device, dtype, *shape, compare=compare_hf)
    print(f"{preset}: forward {r['forward']}", flush=True)
    save(r)
    n_stats = -(-max(stats_tokens, 2 * m.cfg.d_mlp) // STATS_SEQ) * STATS_SEQ     # whole sequences
    note(f"{preset}: statistics over {n_stats:,} tokens, all edit layers"
         + (f" (at {r['forward']['ours_tok_s']:,.0f} tok/s forward)" if "ours_tok_s" in r["forward"] else ""))
    all_layers = sorted({l for meth in methods for l in bench_layers(m, layers, meth)})
    r["stats"], C = stats(m, all_layers, device, dtype, n_stats, state_device=state_device)
    print(f"{preset}: statistics {r['stats']}", flush=True)
    save(r)
    if state_device:                  # --state-device cpu: C and the memory in (pinned) host memory
        C = {l: c.pin_memory() if on_gpu(device) else c for l, c in C.items()}
        r["state_device"] = state_device
    r["steps"] = {}
    spent = 0.0                                              # seconds of the methods' steps so far
    for i, meth in enumerate(methods):
        eta = f", about {spent / i * (len(methods) - i):.0f} s left" if i else ""
        note(f"{preset}: method {i + 1}/{len(methods)} {meth}: two {n_edits}-edit steps and scoring{eta}")
        t0 = time.time()
        r["steps"][meth] = edit_step(m, ckpt, layers, meth, C, device, n_edits, z_tokens=z_tokens,
                                     state_device=state_device)
        spent += time.time() - t0
        print(f"{preset}: {meth} step {r['steps'][meth]}", flush=True)
        save(r)
        if meth == "lyaplock" and batch1:    # before the other methods: a capped run gets it
            note(f"{preset}: {batch1} LyapLock steps of one request each (the long-horizon protocol)")
            r["batch_size_1"] = single_edits(m, layers, C, device, batch1, z_tokens, state_device)
            print(f"{preset}: one request per step {r['batch_size_1']}", flush=True)
            save(r)
    ly = r["steps"]["lyaplock"]
    full_stats = 100_000 * STATS_SEQ / r["stats"]["tok_s"]
    r["projection_10k_edits_hours"] = dict(editing=(ly["first_step"] + (10_000 / n_edits - 1) * ly["total"]) / 3600,
                                           stats_100k_samples=full_stats / 3600)
    return r


def method_table(results) -> str:
    """Seconds of the steady-state step of every method timed, per preset."""
    methods = list(results[0]["steps"])
    rows = ["| preset | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for r in results:
        rows.append(f"| {r['preset']} | " + " | ".join(f"{r['steps'][k]['total']:.2f}" for k in methods) + " |")
    return "\n".join(rows)


def table(results) -> str:
    rows = ["| preset | device | fwd tok/s: ours / HF eager | stats tok/s (of roofline); 70M tokens | "
            "LyapLock step (s) = z + keys + solve; first step | MEMIT | AlphaEdit; first step | eval (s) | "
            "peak / planned GiB | 10k edits (h) |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        f, s, st, proj = r["forward"], r["stats"], r["steps"], r["projection_10k_edits_hours"]
        ly = st["lyaplock"]
        fwd = f"{f['ours_tok_s']:.0f}" + (f" / {f['hf_eager_tok_s']:.0f} ({f['ratio']:.2f}x)" if "ratio" in f else "")
        peak = (f"{ly['peak_gib']:.1f}" if "peak_gib" in ly else "-") + f" / {ly['planned_gib']:.1f}"
        total = lambda k: f"{st[k]['total']:.2f}" if k in st else "-"       # (a method not asked for)
        rows.append(f"| {r['preset']} | {r['device']} {r['dtype']} | {fwd} | {s['tok_s']:.0f} "
                    f"({100 * s['fraction_of_roofline']:.0f}%); {proj['stats_100k_samples']:.2f} h | "
                    f"{ly['total']:.2f} = {ly['target_values']:.2f} + {ly['keys']:.2f} + {ly['solve_pl_queue']:.2f}; "
                    f"{ly['first_step']:.2f} | {total('memit')} | {total('alphaedit')}"
                    f"{'; %.2f' % st['alphaedit']['first_step'] if 'alphaedit' in st else ''} | "
                    f"{ly['eval']:.2f} | {peak} | {proj['editing']:.2f} |")
    return "\n".join(rows)


def methods_to_run(asked) -> list[str]:
    """--method as given ('all': every method; none: LyapLock, MEMIT, AlphaEdit), always with
    LyapLock, first (the projections and the one-request steps are its). Only these run: under a
    --memory-gib cap a method not asked for can run out of memory where the one asked for fits."""
    methods = list(L.METHODS) if "all" in (asked or []) else asked or ["lyaplock", "memit", "alphaedit"]
    return ["lyaplock", *(meth for meth in dict.fromkeys(methods) if meth != "lyaplock")]


def write_json(path, results):
    """The results so far, whole or not at all (a temporary file, then a rename): a run killed
    while writing keeps the previous version."""
    tmp = Path(f"{path}.tmp")
    try:
        tmp.write_text(json.dumps(results, indent=1))
        os.replace(tmp, path)
    except OSError as e:                                # (a disk full: a traceback in the middle of the benchmark)
        tmp.unlink(missing_ok=True)
        sys.exit(f"error: --json {path} cannot be written: {e.strerror or e}")


def main(argv=None):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    p.add_argument("--preset", action="append", choices=[*PRESETS, "stories"],
                   help="repeatable (default: llama3-8b and gptj-6b on a GPU, tiny and stories on a CPU)")
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--dtype", default="bfloat16" if cuda else "float32", choices=list(M.DTYPES))
    p.add_argument("--edits", type=int, default=100, help="requests in the timed editing step")
    p.add_argument("--stats-tokens", type=int, default=None,
                   help="tokens for the statistics timing (at least 2·d_mlp, in whole sequences of 700; default "
                        "33,600 on a GPU, 8,400 on the CPU)")
    p.add_argument("--z-batch-tokens", type=int, default=2048, help="as lyaplock.py's (memory of the target values)")
    p.add_argument("--memory-gib", type=float, help="cap this process's GPU memory, e.g. 44.7 to act as a 48 GB card")
    p.add_argument("--method", action="append", choices=[*L.METHODS, "all"],
                   help="repeatable; 'all' for every method (default: lyaplock, memit, alphaedit); "
                        "LyapLock always runs")
    p.add_argument("--state-device", help="as lyaplock.py's: cpu keeps C and the edit memory in host memory")
    p.add_argument("--batch1", type=int, default=0, help="also time this many LyapLock steps of one request")
    p.add_argument("--json", help="write the results here (rewritten as each part ends)")
    p.add_argument("--no-hf", action="store_true",
                   help="skip the transformers forward comparison (it loads a second copy of the weights)")
    args = p.parse_args(argv)
    for flag, value, least in (("--edits", args.edits, 1), ("--z-batch-tokens", args.z_batch_tokens, 1),
                               ("--stats-tokens", args.stats_tokens, 1), ("--batch1", args.batch1, 0)):
        if value is not None and value < least:        # (0 edits: a ValueError deep in the target values)
            p.error(f"{flag} {value}: give a whole number of at least {least}")
    if args.json and Path(args.json).is_dir():        # (an IsADirectoryError after the whole benchmark)
        p.error(f"--json {args.json} is a directory; give a file name")
    if args.json and not Path(args.json).absolute().parent.is_dir():
        p.error(f"--json {args.json}: no directory {Path(args.json).absolute().parent} to write it in")
    if args.json:                                       # (a PermissionError after the first preset)
        try:
            tempfile.TemporaryFile(dir=Path(args.json).absolute().parent).close()
        except OSError as e:
            p.error(f"--json {args.json}: {Path(args.json).absolute().parent} cannot be written ({e.strerror})")
    records = len(data.load_requests(REQUESTS)[0])        # the timed step takes the second n (a first n edits)
    if args.edits > records // 2 or args.batch1 >= records:
        p.error(f"--edits {args.edits}, --batch1 {args.batch1}: {REQUESTS.name} holds {records} requests, for "
                f"--edits up to {records // 2} (the timed step edits the second n) and --batch1 up to {records - 1}")
    for flag, device in (("--device", args.device), ("--state-device", args.state_device)):
        try:
            if device is not None:
                M.check_device(device)
        except ValueError as e:                         # (torch's RuntimeError after the first parts)
            p.error(f"{flag}: {e}")
    if args.memory_gib is not None:                     # (torch's RuntimeError; on the CPU: silently nothing)
        if not on_gpu(args.device):
            p.error(f"--memory-gib caps a GPU's memory: give it with a cuda --device (here {args.device})")
        card = torch.cuda.get_device_properties(args.device).total_memory / 2 ** 30
        if not 0 < args.memory_gib <= card:
            p.error(f"--memory-gib {args.memory_gib}: give GiB above 0 and at most the card's {card:.1f}")
    args.preset = args.preset or (["llama3-8b", "gptj-6b"] if on_gpu(args.device) else ["tiny", "stories"])
    # the random weights are made on the host whatever the device (killed past its memory); on the CPU
    # our model holds them again, and transformers' copy beside it unless --no-hf
    copies = 1 if on_gpu(args.device) else 1 if args.no_hf else 2
    for name in [n for n in args.preset if n != "stories"]:
        config, layers = PRESETS[name]
        weights = sum(s.numel() for s in weight_shapes(config).values()) * M.DTYPES[args.dtype].itemsize
        m = M.Config.from_hf(config).d_mlp
        need = copies * weights + (0 if on_gpu(args.device) else 8 * m * m * len(layers))    # C beside them
        if need > (free := M.device_free(torch.device("cpu"))):
            p.error(f"--preset {name}: its random {args.dtype} checkpoint takes {need / 2 ** 30:.1f} GiB of host "
                    f"memory ({copies} cop{'ies' if copies > 1 else 'y'} of the weights"
                    f"{'' if on_gpu(args.device) else ' and C'}) and {free / 2 ** 30:.1f} GiB is available"
                    f"{' (--no-hf takes one copy less)' if copies > 1 else ''}")
    try:
        with data.sigterm_exits():
            return run_presets(args)
    except KeyboardInterrupt:                           # (its temporary directory is removed on the way)
        print("\ninterrupted: the temporary checkpoint removed", file=sys.stderr)
        sys.exit(130)
    except data.Terminated:
        print("\nstopped (SIGTERM): the temporary checkpoint removed", file=sys.stderr)
        raise                                           # (exit 143)


def run_presets(args) -> list[dict]:
    """main's work, under its SIGTERM handler: every preset in one temporary directory."""
    if args.memory_gib:
        card = torch.cuda.get_device_properties(args.device).total_memory
        torch.cuda.set_per_process_memory_fraction(args.memory_gib * 2 ** 30 / card, args.device)
    presets = args.preset                               # (main gives the default)
    methods = methods_to_run(args.method)
    results = []
    save = (lambda partial: write_json(args.json, results + [partial])) if args.json else (lambda partial: None)
    with tempfile.TemporaryDirectory() as work:
        for name in presets:
            tokens = args.stats_tokens or (33_600 if on_gpu(args.device) else 8_400)
            results.append(run(name, args.device, args.dtype, args.edits, tokens, work, args.z_batch_tokens,
                               methods, args.state_device, args.batch1,
                               compare_hf=not (args.memory_gib or args.no_hf), save=save))
            print(json.dumps(results[-1]), flush=True)
    print(table(results))
    print(method_table(results))
    if args.json:
        write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
