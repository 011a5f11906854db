"""Laptop-scale testbed: a small LLaMA "fact model" trained here, from scratch, with torch only.

It learns the TRUE facts of real CounterFact records (rewrite, rephrase and neighbourhood
prompts -> the true answer) of two disjoint sets: the records an edit stream will rewrite
(from counterfact-edit) and held-back records that are never edited (from counterfact-train),
on which retention is measured; WikiText paragraphs are mixed in for general language. The
result is an ordinary HF-layout LLaMA checkpoint (or Gemma 2, OLMo 2, Phi-3, GPT-NeoX, Phi:
`--family`) that `model.load` (and transformers) reads, with its training text (`corpus.txt`, the
statistics corpus) and its edit stream (`edits.json`).

Editing methods of the ROME/MEMIT family assume an LLM's way of recalling a fact: MLPs of the
early layers put the answer at the subject's last token, attention later reads it from there.
Trained on the prompts alone, a small model looks the subject up at the prompt's end instead
and cannot be edited there. So training (`fit`) has two phases: (1) subject "cards" (subject ->
answer) read out right after the store layer (the last edit layer), all weights training;
(2) the prompts, training only the attention above the store layer, where for a share of the
prompts the subject's state after the store layer is swapped for another fact's and the answer
asked for is that fact's (an interchange intervention), so the answer is read from there.

    python testbed.py train --size ci --out fixtures/factmodel-ci [--seed 0] [--device cpu]
    python testbed.py train --size laptop --out fixtures/factmodel-laptop --threads 1   # 1,694 distinct edits
    python testbed.py train --size ci --family gemma2 --out runs/factmodel-gemma2       # Gemma 2's layout
    python testbed.py experiment [--edits 200] [--batch-size 10] [--out runs/testbed]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import eval as E
import lyaplock as L
import model as M
from data import (DataError, Request, Terminated, file_sha256, load_requests, read_corpus, read_text, sigterm_exits,
                  write_atomic)

FIX = Path(__file__).parent / "fixtures"
HELD_FILE = FIX / "counterfact-train.json.gz"          # held-back records: never edited
TEXT_FILE = FIX / "wikitext-2-test-sample.txt"
BOS, EOS = "<s>", "</s>"


@dataclass(frozen=True)
class Size:
    """One recipe, two scales."""
    edit_file: str                 # the records to edit: the first n_edit of this fixture ...
    n_edit: int
    n_held: int                    # ... and the held-back ones: the first n_held of HELD_FILE
    vocab: int                     # tokenizer and model shape
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_mlp: int
    steps: int                     # optimisation
    batch_facts: int
    batch_text: int
    text_len: int
    lr: float
    weight_decay: float = 0.1      # AdamW, on matrices and the embedding (not the norms)
    warmup: int = 50
    eos_weight: float = 0.1        # loss weight of the EOS after an answer (answer tokens: 1)
    context_prob: float = 0.5      # share of facts seen after a random text snippet ...
    context_max: int = 10          # ... of 1 to context_max tokens
    text_weight: float = 0.5       # weight of the WikiText loss beside the fact loss
    store_share: float = 0.45      # share of the steps in phase 1 (subject cards only)
    store_layer: int = 2           # cards are read out after this layer (the last edit layer)
    swap_prob: float = 0.3         # phase 2: share of prompts whose subject state is swapped
    more_edit: int = 0             # records to edit beside edit_file's: HELD_FILE's after the held ones


SIZES = {
    "ci": Size("counterfact-easyedit.json", 300, 300, 4096, 128, 6, 4, 2, 384,
               steps=1200, batch_facts=64, batch_text=8, text_len=64, lr=2e-3),
    "laptop": Size("counterfact-easyedit.json", 300, 300, 4096, 128, 6, 4, 2, 384,   # ci's shape, twice the
                   steps=2400, batch_facts=64, batch_text=8, text_len=64, lr=2e-3,   # records and steps: a
                   more_edit=600),                                                  # 1,694-edit distinct stream
    "gpu": Size("counterfact-edit.json.gz", 10000, 3000, 6144, 512, 8, 8, 4, 1376,   # 14,000 to edit:
                steps=8000, batch_facts=256, batch_text=32, text_len=128, lr=1e-3, warmup=300,
                more_edit=4000),                                      # room for a 10,000-edit stream
}


# ----------------------------------------------------------------------------------------- data
def records(size: str | Size) -> tuple[list[Request], list[Request]]:
    """(records the edit stream will rewrite, held-back records never edited) for a size."""
    s = SIZES[size] if isinstance(size, str) else size
    edit, _ = load_requests(FIX / s.edit_file, limit=s.n_edit)
    train, _ = load_requests(HELD_FILE, limit=s.n_held + s.more_edit)
    return edit + train[s.n_held:], train[:s.n_held]


def facts(requests: list[Request]) -> list[tuple[str, str, str]]:
    """The true facts of records as (prompt, answer, subject): rewrite prompt, paraphrases and
    neighbourhood prompts. A neighbourhood prompt's subject is found by matching it against the
    records' own prompt templates ("{} plays the"); prompts that match none are dropped. So are
    facts whose subject has two answers (a subject "card" can hold one) and duplicate prompts."""
    by_suffix: dict[str, list[str]] = {}               # template "{prefix}{}{suffix}"
    for t in {r.prompt for r in requests}:
        prefix, suffix = t.split("{}", 1)
        by_suffix.setdefault(suffix, []).append(prefix)

    def subject_of(prompt):     # under the longest template that fits: (template length, subject)
        fits = [(len(pre) + len(prompt) - i, prompt[len(pre):i]) for i in range(1, len(prompt) + 1)
                for pre in by_suffix.get(prompt[i:], ()) if len(pre) < i and prompt.startswith(pre)]
        return max(fits)[1] if fits else None
    out = []
    for r in requests:
        out += [(p, r.target_true, r.subject) for p in (r.rewrite_prompt(), *r.paraphrase_prompts)]
        out += [(p, a, subject_of(p)) for p, a in zip(r.neighborhood_prompts, r.neighborhood_answers)]
    answers: dict[str, set] = {}
    for _, a, s in out:
        answers.setdefault(s, set()).add(a)
    seen, unique = set(), []
    for p, a, s in out:
        if s is not None and len(answers[s]) == 1 and p not in seen:
            seen.add(p)
            unique.append((p, a, s))
    return unique


def subject_cards(fact_list) -> list[tuple[str, str, str]]:
    """Training-only "cards", one per subject: (subject, answer, subject), the answer predicted AT the
    subject's last token (read out after the last edit layer), where editing looks for it."""
    return list({s: (s, a, s) for _, a, s in fact_list}.values())


def make_tokenizer(texts: list[str], vocab: int, out: Path):
    """Byte-level BPE trained on `texts` (GPT-2 style: a word carries its leading space, so
    " " + target encodes alike alone and after a prompt), with <s> and </s>; saved to `out`,
    its template putting <s> first (the BOS `model.Tokenizer` and transformers prepend). Trained on the
    WikiText only, as an LLM's tokenizer is not fitted to the facts: names split into common
    pieces, so a subject is composed at its last token, where editing finds it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab, min_frequency=2, special_tokens=[BOS, EOS], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, tok.token_to_id(BOS))])
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
         "add_bos_token": True, "add_eos_token": False}, indent=2) + "\n")
    return tok


def fact_sequence(tok: M.Tokenizer, prompt: str, answer: str) -> tuple[list[int], int]:
    """A fact as eval scores it: BOS + prompt ids + target_ids(answer) + EOS, and the number
    of tokens before the answer."""
    pi = tok.encode(prompt, bos=True)
    return pi + E.target_ids(tok, answer) + tok.eos_ids[:1], len(pi)


def with_context(tok: M.Tokenizer, stream: torch.Tensor, template: str, gen, max_len: int) -> str:
    """The template after a random snippet of text and ". ", as the locate step's context
    templates put it, so that recall does not hang on the prompt being first."""
    n = int(torch.randint(1, max_len + 1, (1,), generator=gen))
    i = int(torch.randint(0, len(stream) - n, (1,), generator=gen))
    snippet = tok.decode(stream[i:i + n].tolist()).strip().replace("{", "(").replace("}", ")")
    return f"{snippet}. {template}"


def text_stream(tok: M.Tokenizer, paragraphs: list[str]) -> torch.Tensor:
    """All paragraphs as one token stream, each as BOS paragraph EOS."""
    ids = [t for p in paragraphs for t in tok.encode(p, bos=True) + tok.eos_ids[:1]]
    return torch.tensor(ids, dtype=torch.long)


# ---------------------------------------------------------------------------------------- model
def init_weights(m: M.CausalLM, gen: torch.Generator) -> None:
    """GPT-2/LLaMA style: N(0, 0.02), residual output projections scaled by 1/sqrt(2 n_layers),
    norms to one (Gemma's (1 + w): w to zero), biases (GPT-NeoX's) to zero."""
    out_std = 0.02 / math.sqrt(2 * m.cfg.n_layers)
    outputs = ("o_proj.weight", "down_proj.weight", "attention.dense.weight", "dense_4h_to_h.weight",
               "self_attn.dense.weight", "fc2.weight")
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(0.0 if m.cfg.norm_plus_one else 1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                std = out_std if name.endswith(outputs) else 0.02
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def hf_config(family: str, s: Size, vocab: int, bos: int, eos: int) -> dict:
    """The fact model's config.json: LLaMA (RMSNorm, SwiGLU), or Gemma 2 ((1 + w) norms also on
    the attention and MLP outputs, tanh-GELU gate, scaled embeddings, soft caps; its window is
    longer than any training text) or OLMo 2 (LLaMA's with the norms on those outputs instead of
    the inputs), which train on the same recipe to measure editing through a normalised MLP
    output (E6b); or Phi-3 (LLaMA's with fused projections), GPT-NeoX (Pythia's: LayerNorms,
    erf-GELU MLP beside attention, rope on a quarter of each head, no grouped queries) or Phi
    (Phi-1.5's block: GPT-J's, one LayerNorm, biases, rope on half of each head; grouped queries
    and a tied head here), or Granite (LLaMA's with its four scalars: the MLP output joins the
    stream scaled, E6c), to measure editing in those layouts."""
    sizes = {"architectures": [FAMILIES[family]], "model_type": family, "hidden_size": s.d_model,
             "intermediate_size": s.d_mlp, "num_hidden_layers": s.n_layers, "num_attention_heads": s.n_heads}
    ids = {"tie_word_embeddings": True, "bos_token_id": bos, "eos_token_id": eos}
    rest = {"initializer_range": 0.02, "torch_dtype": "float32"}
    if family == "gpt_neox":
        return sizes | {"vocab_size": vocab, "hidden_act": "gelu", "rotary_pct": 0.25, "rotary_emb_base": 10000,
                        "use_parallel_residual": True, "layer_norm_eps": 1e-5, "max_position_embeddings": 512,
                        **ids, "attention_bias": True} | rest
    sizes["num_key_value_heads"] = s.n_kv_heads
    if family == "phi":
        return sizes | {"vocab_size": vocab, "hidden_act": "gelu_new", "partial_rotary_factor": 0.5,
                        "rope_theta": 10000.0, "layer_norm_eps": 1e-5, "max_position_embeddings": 512, **ids} | rest
    hf = sizes | {"head_dim": s.d_model // s.n_heads, "vocab_size": vocab}
    if family == "gemma2":
        hf |= {"hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 512, "rms_norm_eps": 1e-6,
               "query_pre_attn_scalar": s.d_model // s.n_heads, "attn_logit_softcapping": 50.0,
               "final_logit_softcapping": 30.0, "sliding_window": 4096}
    else:
        hf |= {"hidden_act": "silu", "max_position_embeddings": 512, "rms_norm_eps": 1e-5}
    if family == "phi3":      # transformers' Phi3Config would pad with id 32000, past this vocabulary
        hf |= {"original_max_position_embeddings": 512, "sliding_window": None, "pad_token_id": eos}
    if family == "granite":   # Granite 3.3's scalars (its attention scale 1/head_dim, not 1/sqrt) but
        # its logits / 16, through which this recipe (init, learning rate) does not train: 0% known
        hf |= {"embedding_multiplier": 12.0, "attention_multiplier": s.n_heads / s.d_model,
               "residual_multiplier": 0.22, "logits_scaling": 1.0}
    return hf | {"rope_theta": 10000.0, **ids, "attention_bias": False,
                 **({"mlp_bias": False} if family == "llama" else {})} | rest


FAMILIES = {"llama": "LlamaForCausalLM", "gemma2": "Gemma2ForCausalLM", "olmo2": "Olmo2ForCausalLM",
            "phi3": "Phi3ForCausalLM", "gpt_neox": "GPTNeoXForCausalLM", "phi": "PhiForCausalLM",
            "granite": "GraniteForCausalLM"}


def save_weights(m: M.CausalLM, out: Path) -> None:
    """model.safetensors (HF names, float32; a tied head is not stored)."""
    state = {n: t.detach().to("cpu", torch.float32).contiguous() for n, t in m.state_dict().items()
             if not (m.cfg.tie_embeddings and n == m.cfg.head_weight)}
    M.write_safetensors(state, out / "model.safetensors", metadata={"format": "pt"})


# ------------------------------------------------------------------------------------- training
def fact_batches(lengths: list[int], batch: int, gen: torch.Generator) -> list[list[int]]:
    """One epoch of fact indices in batches: a seeded shuffle, sorted by length within windows
    of 16 batches (little padding), the batches in seeded order."""
    perm, w = torch.randperm(len(lengths), generator=gen).tolist(), 16 * batch
    chunks = [sorted(perm[i:i + w], key=lambda j: lengths[j]) for i in range(0, len(perm), w)]
    batches = [c[i:i + batch] for c in chunks for i in range(0, len(c), batch)]
    return [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]


def fact_batch(seqs: list[tuple[list[int], int]], pad_id: int, s: Size, device="cpu"):
    """Right-padded (ids, mask) of fact sequences, with the positions that predict the answer
    tokens and EOS, their targets and loss weights: (ids, mask, pos, tgt, w)."""
    T, K = max(len(x) for x, _ in seqs), max(len(x) - n for x, n in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask, pos, tgt = (torch.zeros(len(seqs), n, dtype=torch.long) for n in (T, K, K))
    w = torch.zeros(len(seqs), K)
    for b, (x, n) in enumerate(seqs):
        k = len(x) - n                                   # answer tokens + EOS
        ids[b, :len(x)], mask[b, :len(x)] = torch.tensor(x), 1
        pos[b, :k], tgt[b, :k] = torch.arange(n - 1, len(x) - 1), torch.tensor(x[n:])
        w[b, :k - 1], w[b, k - 1] = 1.0, s.eos_weight
    return tuple(t.to(device) for t in (ids, mask, pos, tgt, w))


def fact_loss(m, ids, mask, pos, tgt, w, exit_layer=None, swap=None) -> torch.Tensor:
    """Weighted mean cross-entropy of the answer tokens (and EOS) after their prompts. With
    `exit_layer`: read out (final norm and head) right after that layer. With `swap` = (layer,
    rows, positions, source rows, source positions): the layers above `layer` run from its output
    with the states at (rows, positions) replaced by those at the source (the layers up to
    `layer` are frozen then, so they run without grad)."""
    if exit_layer is not None:
        h = m(ids, mask, stop_after=exit_layer, outs_at=(exit_layer,)).outs[exit_layer]
        logits = m.head(m.norm(h.gather(1, pos[..., None].expand(-1, -1, h.shape[-1])))).float()
        logits = logits / m.cfg.logits_scaling          # Granite's readout (Gemma 2's final soft cap
        # is not applied here: its fact model, measured in the README, was trained so)
    elif swap is not None:
        layer, rows, at, src_rows, src_at = swap
        with torch.no_grad():
            h = m(ids, mask, stop_after=layer, outs_at=(layer,)).outs[layer]
            h[rows, at] = h[src_rows, src_at]          # read before written: a copy
        logits = m(ids, mask, start=(layer, h), logits_at=pos).logits
    else:
        logits = m(ids, mask, logits_at=pos).logits
    return (F.cross_entropy(logits.transpose(1, 2), tgt, reduction="none") * w).sum() / w.sum()


def text_loss(m, ids) -> torch.Tensor:
    """Mean next-token cross-entropy over unpadded text windows."""
    logits = m(ids).logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def lr_at(step: int, s: Size, steps: int) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    t = max(0, step - s.warmup) / max(1, steps - s.warmup)
    return s.lr * min(1.0, (step + 1) / s.warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * t)))


def fact_batch_loss(m, pool, idx, stream, s: Size, gen, device, phase: int) -> torch.Tensor:
    """Loss of the facts `idx` of `pool` (prompt, answer, subject); a share of them after a
    random text snippet. Phase 0 reads the answers out after the store layer. Phase 1 swaps, in
    a share of the prompts, the subject's state after the store layer for the subject state of
    another prompt of the batch and asks for that prompt's answer (an interchange intervention),
    so that the answer is read from the subject's last token."""
    tok, items = m.tokenizer, []
    for i in idx:
        p, a, subject = pool[i]
        t = p.replace(subject, "{}", 1) if subject in p else None      # the subject's place
        if torch.rand(1, generator=gen) < s.context_prob:
            t = with_context(tok, stream, t or p, gen, s.context_max)
            p = t.replace("{}", subject, 1) if "{}" in t else t
        at = L.subject_row(tok, t, subject, 0).lookup if t and "{}" in t else None
        items.append([p, a, at])
    swaps = []                                  # (row, its subject position, donor row, its position)
    for b, (p, a, at) in enumerate(items if phase == 1 else []):
        j = int(torch.randint(len(items), (1,), generator=gen))
        if torch.rand(1, generator=gen) < s.swap_prob and at is not None and items[j][2] is not None \
                and pool[idx[j]][1] != pool[idx[b]][1]:
            swaps.append((b, at, j, items[j][2]))
            items[b][1] = pool[idx[j]][1]
    ids, mask, pos, tgt, w = fact_batch([fact_sequence(tok, p, a) for p, a, _ in items], tok.pad_id, s, device)
    if phase == 0:
        return fact_loss(m, ids, mask, pos, tgt, w, exit_layer=s.store_layer)
    return fact_loss(m, ids, mask, pos, tgt, w, swap=(s.store_layer, *map(list, zip(*swaps))) if swaps else None)


def fit(m, pairs, cards, stream, s: Size, steps: int, seed: int, device="cpu", log=print) -> float:
    """Two phases of AdamW (each a warm-up and cosine decay) on length-bucketed fact batches
    plus random WikiText windows. Phase 1 (store): the subject cards, read out after the store
    layer, so the early layers put each answer at its subject. Phase 2 (extract): all facts,
    training only the attention above the store layer, with subject-state swaps, so attention
    learns to read the answers there. Returns the last step's loss."""
    gen = torch.Generator().manual_seed(seed)
    groups = [[p for p in m.parameters() if p.ndim == n] for n in (2, 1)]
    opt = torch.optim.AdamW([{"params": groups[0], "weight_decay": s.weight_decay},
                             {"params": groups[1], "weight_decay": 0.0}], lr=s.lr, betas=(0.9, 0.95))
    n1 = round(s.store_share * steps)
    upper = tuple(f"layers.{i}.{attention}." for i in range(s.store_layer + 1, m.cfg.n_layers)
                  for attention in ("self_attn", "attention"))                      # GPT-NeoX: attention
    for phase, (start, n, pool) in enumerate([(0, n1, cards), (n1, steps - n1, pairs)]):
        for name, p in m.named_parameters():
            p.requires_grad_(phase == 0 or any(u in name for u in upper))
        lengths, batches = [len(fact_sequence(m.tokenizer, p, a)[0]) for p, a, _ in pool], []
        for step in range(n):
            batches = batches or fact_batches(lengths, s.batch_facts, gen)
            facts_part = fact_batch_loss(m, pool, batches.pop(), stream, s, gen, device, phase)
            starts = torch.randint(0, len(stream) - s.text_len, (s.batch_text,), generator=gen).tolist()
            text_part = text_loss(m, torch.stack([stream[i:i + s.text_len] for i in starts]).to(device))
            loss = facts_part + s.text_weight * text_part
            for g in opt.param_groups:
                g["lr"] = lr_at(step, s, n)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % 100 == 0 or step == n - 1:
                log(f"phase {phase + 1} step {start + step:5d}  fact loss {facts_part.item():.4f}  "
                    f"text loss {text_part.item():.4f}  lr {lr_at(step, s, n):.2e}")
    m.requires_grad_(True)
    return loss.item()


def knows(m: M.CausalLM, pairs, batch_size: int = 64) -> list[bool]:
    """For each (prompt, answer, ...) fact: is every answer token the top-1 prediction given the
    prompt and the gold answer prefix (teacher-forced)?"""
    scores = E.target_nll(m, [f[0] for f in pairs], [f[1] for f in pairs], batch_size)
    return [all(c) for c in scores.token_correct]


def fact_accuracy(m: M.CausalLM, pairs, batch_size: int = 128) -> float:
    """Fraction of the facts the model knows (`knows`)."""
    return sum(knows(m, pairs, batch_size)) / len(pairs)


def prepare(s: Size, out: Path, seed: int, device="cpu", family: str = "llama"):
    """Records, facts and text of recipe `s`; a tokenizer trained on the text and the model's
    config.json (saved to `out`); the initialised model. Returns (model, edit, held, facts, text
    stream)."""
    edit, held = records(s)
    pairs, paragraphs = facts(edit + held), read_corpus(TEXT_FILE)
    hf_tok = make_tokenizer(paragraphs, s.vocab, out)
    hf = hf_config(family, s, hf_tok.get_vocab_size(), hf_tok.token_to_id(BOS), hf_tok.token_to_id(EOS))
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    cfg = M.Config.from_hf(hf)
    m = M.CausalLM(cfg)     # GQA, tied embeddings
    init_weights(m, torch.Generator().manual_seed(seed))
    m.tokenizer = M.Tokenizer(out, cfg)
    return m.to(device), edit, held, pairs, text_stream(m.tokenizer, paragraphs)


def write_corpus(path: Path, fact_list) -> None:
    """The model's training text, one paragraph per line: each fact as a sentence, then the
    WikiText. It is the statistics corpus for editing this model, as Wikipedia is for an LLM
    trained on it: the preservation statistics C must see the keys of what the model knows."""
    lines = [" ".join(f"{p} {a}.".split()) for p, a, _ in fact_list] + read_corpus(TEXT_FILE)
    path.write_text("\n".join(lines) + "\n")


def write_edits(path: Path, m: M.CausalLM, s: Size, edit, held) -> None:
    """The edit stream for this model: the records of `editable`, in their file's own layout."""
    ids = {r.case_id for r in editable(m, edit, held)}
    raw = (json.loads(read_text(FIX / s.edit_file, "data"))[:s.n_edit]          # as `records` reads them
           + json.loads(read_text(HELD_FILE, "data"))[s.n_held:s.n_held + s.more_edit])
    path.write_text(json.dumps([x for x in raw if x["case_id"] in ids], indent=1) + "\n")


def train(out_dir, size: str = "ci", seed: int = 0, device: str = "cpu", steps: int | None = None,
          log=print, family: str = "llama") -> dict:
    """Train the fact model of `size` and `family` (FAMILIES) and write it to `out_dir` (HF
    layout + training.json): a new or empty directory, or an earlier fact model's (replaced, said
    in a line); a directory holding other files is refused before any work."""
    out = Path(out_dir).resolve()            # (--out ., a symlink: the directory itself)
    if out.is_dir() and any(not p.name.startswith(".training-") for p in out.iterdir()):
        if not (out / "training.json").exists():
            raise ValueError(f"--out {out_dir} holds files and no fact model (training.json): give a new or "
                             "empty directory, or an earlier fact model's to train it again")
        log(f"training again into {out_dir}: its fact model is replaced")
    elif out.exists() and not out.is_dir():
        raise ValueError(f"--out {out_dir} is a file; give a directory")
    M.check_device(device)
    tf32 = torch.device(device).type == "cuda"     # TF32 matmuls: the gpu size is ~13 PFLOP of float32 training
    made = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        with training_into(out) as work:                # the model, then moved in place
            with tf32_matmuls(tf32):
                info = train_model(work, size, seed, device, steps, tf32, log, family)
            move_in(work, out)
    finally:
        if made and not any(out.iterdir()):
            out.rmdir()
    log(f"written to {out_dir}")
    return info


@contextmanager
def training_into(out: Path):
    """A work directory for one training in `out` (out/.training-*, removed after), with `out`
    held meanwhile (L.holding, a lock on the directory itself): a second training into it is
    refused, and the work directories a killed one left there (a partial model each) are removed."""
    with L.holding(out, "a fact model's training into it", on_directory=True):
        for left in out.glob(".training-*"):
            shutil.rmtree(left, ignore_errors=True)
        work = Path(tempfile.mkdtemp(prefix=".training-", dir=out))
        try:
            yield work
        finally:
            shutil.rmtree(work, ignore_errors=True)


def move_in(work: Path, out: Path):
    """The files of `work` in place of out's of the same names (out's other files, such as a
    report written there, stay): the earlier ones set aside first, the new
    ones moved in with training.json, which marks a fact model, last; an error puts the earlier
    ones back (a kill in between leaves them whole in out/.replaced-*)."""
    aside = Path(tempfile.mkdtemp(prefix=".replaced-", dir=out))
    names = {p.name for p in work.iterdir()}
    earlier = [p for p in out.iterdir() if p.name in names]
    moved = []
    try:
        for p in earlier:
            p.rename(aside / p.name)
        for p in sorted(work.iterdir(), key=lambda p: p.name == "training.json"):
            p.rename(out / p.name)
            moved.append(p.name)
    except BaseException:
        for name in moved:
            (out / name).rename(work / name)
        for p in aside.iterdir():
            p.rename(out / p.name)
        raise
    finally:
        shutil.rmtree(aside, ignore_errors=True)


@contextmanager
def tf32_matmuls(on: bool):
    """TF32 float32 matmuls (and cuDNN convolutions) within, when `on`; the previous settings back
    after, even on an error. They are process-wide flags: left on, whatever runs next in the
    process (an experiment's editing and scoring, the tests) would compute its float32 matmuls
    with TF32's 10-bit mantissa where the method's numerics assume float32."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    if on:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def train_model(out_dir, size: str, seed: int, device: str, steps: int | None, tf32: bool, log,
                family: str = "llama") -> dict:
    """train's work, under its TF32 setting (recorded in training.json)."""
    t0, s, out = time.time(), SIZES[size], Path(out_dir)
    steps = s.steps if steps is None else steps
    m, edit, held, pairs, stream = prepare(s, out, seed, device, family)
    n_params, cards = sum(p.numel() for p in m.parameters()), subject_cards(pairs)
    log(f"{size}: {len(edit)} edit + {len(held)} held-back records, {len(pairs)} facts, "
        f"{len(cards)} cards, {len(stream)} text tokens, {n_params} parameters")
    final_loss = fit(m.train(), pairs, cards, stream, s, steps, seed + 1, device, log)
    acc = fact_accuracy(m.eval(), pairs)
    save_weights(m, out)
    write_corpus(out / "corpus.txt", pairs)
    write_edits(out / "edits.json", m.eval(), s, edit, held)
    info = {"size": size, "family": family, "seed": seed, "steps": steps, "seconds": round(time.time() - t0, 1),
            "parameters": n_params, "n_edit_records": len(edit), "n_held_records": len(held),
            "n_facts": len(pairs), "n_cards": len(cards), "text_tokens": len(stream),
            "final_loss": round(final_loss, 4), "fact_accuracy": acc, "device": str(device),
            "tf32": tf32, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "recipe": asdict(s)}
    (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    log(f"fact accuracy {acc:.4f}  ({info['seconds']} s)")
    return info


# ----------------------------------------------------------------------------------- experiment
def editable(m: M.CausalLM, edit: list[Request], held: list[Request]) -> list[Request]:
    """The edit records whose true rewrite fact the model answers (all answer tokens top-1) and
    whose new target is one of the answers it was trained to produce: a small model, unlike an
    LLM, cannot spell a word it has never output."""
    answers = {a for _, a, _ in facts(edit + held)}
    reqs = [r for r in edit if r.target_new in answers]
    ok = knows(m, [(r.rewrite_prompt(), r.target_true) for r in reqs])
    return [r for r, k in zip(reqs, ok) if k]


def held_facts_of(edit: list[Request], held: list[Request]):
    """The facts of the held-back records: no prompt of an edit record among them and, as
    distinct_stream keeps its retained subjects apart, no subject of one (an edit of the subject
    could move them; ci: none, laptop: 3 facts, gpu: 142)."""
    edit_prompts = {p for r in edit for p in (r.rewrite_prompt(), *r.paraphrase_prompts, *r.neighborhood_prompts)}
    edit_subjects = {r.subject for r in edit}
    return [f for f in facts(edit + held) if f[0] not in edit_prompts and f[2] not in edit_subjects]


# --------------------------------------------------------------------------------- edit streams
@dataclass
class Stream:
    """What an experiment edits, in order, and the never-edited facts it measures retention on."""
    requests: list[Request]
    retained: list[tuple[str, str, str]]      # (prompt, answer, subject), known before editing


def template_of(prompt: str, subject: str) -> str:
    return prompt.replace(subject, "{}", 1)


def known(m: M.CausalLM, fact_list: list) -> list:
    """The facts (prompt, answer, subject) the model answers (knows)."""
    return [f for f, k in zip(fact_list, knows(m, fact_list)) if k]


def by_subject(fact_list: list) -> dict[str, list]:
    """The facts grouped by their subject, in order."""
    groups: dict[str, list] = {}
    for f in fact_list:
        groups.setdefault(f[2], []).append(f)
    return groups


def neighbourhood(hood: list) -> dict:
    """A Request's neighbourhood fields from facts (prompt, answer, subject)."""
    return dict(neighborhood_prompts=tuple(p for p, _, _ in hood), neighborhood_answers=tuple(a for _, a, _ in hood))


def answer_pools(fact_list) -> dict[str, list[str]]:
    """Template -> the answers the model was trained to give after it (sorted): the targets a
    rewrite of that relation can take and the model can produce."""
    pools: dict[str, set] = {}
    for p, a, s in fact_list:
        pools.setdefault(template_of(p, s), set()).add(a)
    return {t: sorted(a) for t, a in pools.items()}


def another_answer(pool: list[str], avoid: set, gen: torch.Generator) -> str | None:
    """A seeded choice from `pool` of an answer not in `avoid` (None if there is none)."""
    choices = [a for a in pool if a not in avoid]
    return choices[int(torch.randint(len(choices), (1,), generator=gen))] if choices else None


def in_steps(passes: list[list[Request]], batch_size: int) -> list[Request]:
    """The passes one after another, so that no step (batch) edits a prompt twice: where a pass
    begins inside a step, its requests for the prompts that step already holds move back."""
    out: list[Request] = []
    for requests in passes:
        open_step = {q.rewrite_prompt() for q in out[len(out) - len(out) % batch_size:]}
        out += sorted(requests, key=lambda q: q.rewrite_prompt() in open_step)      # stable
    return out


def churn_stream(requests: list[Request], pools: dict, n_edits: int, batch_size: int, seed: int) -> list[Request]:
    """The same subjects rewritten again and again: pass 0 is `requests` as given; each later
    pass visits them in a new seeded order, each time to a new target that is neither the true
    answer nor the previous target: a seeded choice among the answers trained after the same
    prompt template (pools[q.prompt], answer_pools) or, where the template has no such answer
    (its pool holds only those two), among the answers of every pool: one never trained after
    that template. On the ci model's 2,230-edit stream (seed 0, 10 a step) 170 of the 2,007
    re-edits fall back so, on 30 of the 223 subjects, those whose template's pool holds one or
    two answers (test_churn_fallback_count). n_edits in all."""
    gen, passes, n = torch.Generator().manual_seed(seed), [list(requests)], len(requests)
    latest = {q.rewrite_prompt(): q.target_new for q in requests}
    every = sorted({a for pool in pools.values() for a in pool})
    for p in range(1, -(-n_edits // n)):
        this = []
        for i in torch.randperm(n, generator=gen).tolist():
            q = requests[i]
            avoid = {q.target_true, latest[q.rewrite_prompt()]}
            new = (another_answer(pools.get(q.prompt, []), avoid, gen)
                   or another_answer(every, avoid, gen))
            latest[q.rewrite_prompt()] = new
            this.append(dataclasses.replace(q, case_id=f"{q.case_id}.{p}", target_new=new))
        passes.append(this)
    return in_steps(passes, batch_size)[:n_edits]


def distinct_stream(m: M.CausalLM, edit: list[Request], held: list[Request], seed: int,
                    retain_share: float = 0.2) -> Stream:
    """One edit for each subject the model knows (neighbourhood subjects included), a seeded
    share of them kept back, never edited, for retention. A subject's request: its first known
    fact's prompt to another answer of that relation, its other prompts as paraphrases, and two
    kept-back facts of the same relation (else any two) as neighbourhood."""
    fact_list = known(m, facts(edit + held))
    grouped = by_subject(fact_list)
    gen = torch.Generator().manual_seed(seed)
    subjects = [list(grouped)[i] for i in torch.randperm(len(grouped), generator=gen).tolist()]
    n_kept = round(retain_share * len(subjects))
    retained = [f for s in subjects[:n_kept] for f in grouped[s]]
    near: dict[str, list] = {}
    for f in retained:
        near.setdefault(template_of(f[0], f[2]), []).append(f)
    pools, requests = answer_pools(fact_list), []
    every = sorted({a for _, a, _ in fact_list})
    for s in subjects[n_kept:]:
        (prompt, true, _), *more = grouped[s]
        template = template_of(prompt, s)
        new = another_answer(pools[template], {true}, gen) or another_answer(every, {true}, gen)
        hood = list(dict.fromkeys(near.get(template, []) + retained))[:2]     # (a fact of both: once)
        requests.append(Request(case_id=f"d{len(requests)}", prompt=template, subject=s, target_new=new,
                                target_true=true, paraphrase_prompts=tuple(p for p, _, _ in more),
                                **neighbourhood(hood)))
    return Stream(requests, retained)


# stories260K knows TinyStories, not world facts: "{name} went to the" -> park, whatever the name.
# An edit makes one name's story go elsewhere (a plausible word of the same slot), and must leave
# the other names' stories alone (neighbourhood, retention).
STORY_SLOTS = {
    "{} went to the": ("park", ("store", "beach", "school", "zoo", "forest")),
    "{} saw a big": ("box", ("dog", "tree", "bird", "cat", "truck")),
    "{} had a red": ("ball", ("hat", "car", "kite", "bike", "book")),
    "{} ran to the": ("park", ("tree", "house", "door", "river", "shop")),
    "{} liked to play with her": ("toys", ("doll", "ball", "dog", "cat", "friends")),
    "{} wanted a new": ("toy", ("ball", "dog", "hat", "bike", "book")),
    "{} played in the": ("park", ("garden", "snow", "house", "sand", "water")),
    "{} loved his": ("toys", ("dog", "mom", "ball", "car", "friends")),
}
STORY_NAMES = ("Lily Tom Ben Sue Tim Anna Max Mia Sam Lucy Jack Amy Bob Sara Kate Mark Jill Zoe Leo Ella "
               "Jane Fred Rose Dan Molly Jen Kim Pete Emma Joe Lisa Paul Nina Ray Ruth Alex Jake Beth Carl "
               "Dora Eve Finn Gus Hana Ivy Jon Kay Liam Meg Ned Olga Pam Rex Sid Tara Una Vic Will Yara "
               "Zack Adam Bella Chloe David Emily Frank Grace Henry Isla James Karen Luke Mary Noah Oscar "
               "Polly Quinn Ryan Sophie Toby Ursula Violet Walter Xena Yusuf Zara Alice Billy Clara Derek "
               "Edith George Harry Irene Jenny Kevin Laura Mike Nora Oliver").split()


def stories_stream(m: M.CausalLM, n_edits: int | None = 80, seed: int = 0) -> Stream:
    """Edits for stories260K: names in turn, each with the next slot whose story the model tells
    (its answer top-1), rewritten to a seeded alternative, until n_edits (None: all but the last
    10 names); every slot of the names left over (at least 10) are the retained facts."""
    slots = list(STORY_SLOTS)
    by_name = by_subject(known(m, [(t.format(n), STORY_SLOTS[t][0], n) for n in STORY_NAMES for t in slots]))
    if not by_name:
        raise ValueError(f"stories stream: the model tells none of its stories (such as {slots[0].format('Lily')!r} "
                         f"-> {STORY_SLOTS[slots[0]][0]!r}): the stream is for a TinyStories model such as stories260K")
    gen, chosen = torch.Generator().manual_seed(seed), []
    for name in (STORY_NAMES if n_edits else STORY_NAMES[:-10]):
        if len(chosen) == n_edits:
            break
        mine = by_name.get(name, [])
        if mine:
            chosen.append(next((f for f in mine if f[0] == slots[len(chosen) % len(slots)].format(name)), mine[0]))
    rest = STORY_NAMES[STORY_NAMES.index(chosen[-1][2]) + 1:] if chosen else STORY_NAMES
    if (n_edits and len(chosen) < n_edits) or len(rest) < 10:
        raise ValueError(f"stories stream: the model tells enough stories for at most "
                         f"{len(chosen) - max(0, 10 - len(rest))} edits; asked for {n_edits}")
    retained = [f for n in rest for f in by_name.get(n, [])]
    requests = []
    for i, (prompt, true, name) in enumerate(chosen):
        t = template_of(prompt, name)
        hood = [f for f in retained if template_of(f[0], f[2]) == t][i % 4::4][:2]
        requests.append(Request(case_id=i, prompt=t, subject=name, target_true=true,
                                target_new=another_answer(list(STORY_SLOTS[t][1]), set(), gen),
                                paraphrase_prompts=("One day, " + prompt, "Once upon a time, " + prompt),
                                **neighbourhood(hood)))
    return Stream(requests, retained)


STREAMS = ("first", "churn", "distinct", "stories")


def make_stream(kind: str, m: M.CausalLM, model_dir: Path, n_edits: int | None, batch_size: int, seed: int,
                n_retained: int | None = None) -> Stream:
    """The edit stream of `kind` for the model in model_dir (n_edits None: the whole stream;
    n_retained: at most that many retained facts, None: all). first: the model's editable
    records in order; churn: those rewritten again and again; distinct: one edit per known
    subject; stories: stories260K's slots (stories_stream)."""
    if kind == "stories":
        stream = stories_stream(m, n_edits, seed)
    else:
        if kind not in STREAMS:
            raise ValueError(f"unknown stream {kind!r}; expected one of {', '.join(STREAMS)}")
        info = model_dir / "training.json"
        if not info.exists():
            raise ValueError(f"{model_dir} has no training.json: the {kind!r} stream needs a fact model trained by "
                             "`train` (for another model, such as stories260K, --stream stories)")
        try:
            size = json.loads(info.read_text())["size"]
        except (UnicodeDecodeError, json.JSONDecodeError, TypeError, KeyError):
            size = None
        if not isinstance(size, str) or size not in SIZES:        # (was a KeyError or an unnamed JSON error)
            raise ValueError(f"{info}: not a fact model's training.json (its size, one of {', '.join(SIZES)}): the "
                             f"{kind!r} stream needs a fact model trained by `train`")
        edit, held = records(SIZES[size])
        if kind == "distinct":
            stream = distinct_stream(m, edit, held, seed)
        else:
            retained = known(m, held_facts_of(edit, held)[:n_retained])
            first = editable(m, edit, held)
            total = n_edits or 10 * len(first)               # churn: ten passes unless told
            if kind == "churn" and first and batch_size > len(first) and total > len(first):
                raise ValueError(f"{model_dir}: a churn step of {batch_size} would edit one of its {len(first)} "
                                 f"editable subjects twice; give a batch size of at most {len(first)}")
            requests = first if kind == "first" or not first else churn_stream(
                first, answer_pools(facts(edit + held)), total, batch_size, seed)
            stream = Stream(requests, retained)
    if not stream.requests:
        raise ValueError(f"{model_dir}: the {kind!r} stream has no edits (the model knows none of the facts it "
                         "could be edited from: trained too briefly?)")
    if n_edits is not None and len(stream.requests) < n_edits:
        raise ValueError(f"{model_dir}: the {kind!r} stream has only {len(stream.requests)} edits; asked for {n_edits}")
    stream.requests, stream.retained = stream.requests[:n_edits], stream.retained[:n_retained]
    return stream


def latest_requests(requests: list[Request]) -> list[Request]:
    """Each edited prompt's latest request (the target it should give now), in first-edit order."""
    return list({q.rewrite_prompt(): q for q in requests}.values())


NOT_IN_SPECS = {"method": "the name before the first ':'", "layers": "--layers", "batch_size": "--batch-size"}


def parse_run(spec: str) -> tuple[str, dict]:
    """A run spec "method[:field=value...]" ("lyaplock:alpha=30:superseded=remove") -> (method,
    overrides): the spec's settings over the preset's, typed as HParams' fields (an
    int an integer, a bool true or false). A field is refused if the spec sets it twice, if a flag
    sets it for every run (NOT_IN_SPECS) or if the method does not read it (lyaplock.unread)."""
    method, *sets = spec.split(":")
    L.method_of(method)                                     # an unknown method: refused here
    over, defaults = {}, L.HParams()
    fields = {f.name for f in dataclasses.fields(L.HParams)}
    named = set()
    for item in sets:
        name, eq, value = item.partition("=")
        if not eq or name not in fields:
            raise ValueError(f"run {spec!r}: {item!r} is not field=value of an HParams field")
        if name in NOT_IN_SPECS:
            raise ValueError(f"run {spec!r}: {name} is not set per run; give {NOT_IN_SPECS[name]}")
        if name in named:
            raise ValueError(f"run {spec!r}: {name} is set twice")
        if why := L.unread(method, name):
            raise ValueError(f"run {spec!r}: {method} does not read {name} ({why})")
        named.add(name)
        kind = type(getattr(defaults, name))
        convert = {bool: {"true": True, "false": False}.__getitem__, int: int}.get(kind, kind)
        try:
            over[name] = convert(value.lower() if kind is bool else value)
        except (KeyError, ValueError):
            need = {bool: "true or false", int: "an integer"}.get(kind, f"a {kind.__name__}")
            raise ValueError(f"run {spec!r}: {name} needs {need}, got {value!r}") from None
    return method, over


# ------------------------------------------------------------------------------ running streams
def measure(m: M.CausalLM, stream: Stream, n_done: int, heldout, W0: dict) -> dict:
    """One evaluation point: each edited prompt's latest target (efficacy, generalization,
    specificity; before editing, n_done = 0: of the whole stream, the targets its last point
    measures), retention of the never-edited facts, held-out perplexity, and per layer the
    relative change of the weight ‖W − W0‖/‖W0‖."""
    cases = E.summarize(E.edit_eval(m, latest_requests(stream.requests[:n_done or None])))
    drift = {str(l): float((m.edit_weight(l) - W.to(m.edit_weight(l).device)).norm() / W.norm())
             for l, W in W0.items()}
    return dict(edits=n_done, efficacy=cases["efficacy"], generalization=cases["generalization"],
                specificity=cases["specificity"], retention=100 * fact_accuracy(m, stream.retained),
                perplexity=E.perplexity(m, heldout), drift=drift)


def queue_summary(steps: list[dict]) -> dict:
    """Per layer: z at the end, z(T)/T and the queue's trend (eval.queue_trend: floor, stable,
    growing) for a method with a queue; PL's growth (eval.audit_pl) for one without."""
    out = {}
    for l in steps[0]["layers"]:
        pl = [s["layers"][l]["pl"] for s in steps]
        z = [s["layers"][l]["z"] for s in steps]
        if z[0] is None:
            a = E.audit_pl(pl)
            out[l] = dict(pl_last=pl[-1], pl_growth=a["growth"], pl_grows=a["grows"])
        else:
            trend, s = E.queue_trend(z)
            out[l] = dict(pl_last=pl[-1], z_T=z[-1], z_over_T=z[-1] / len(z), z_slope=s, trend=trend)
    return out


PROGRESS_SECONDS = 5.0       # a progress line between evaluation points at most this often


def run_stream(editor: L.Editor, stream: Stream, heldout, run: dict, eval_every: int,
               report=lambda: None, log=print) -> dict:
    """Edit the stream step by step (editor.hparams.batch_size per step), filling `run` (steps:
    each step's log; points: `measure`, on the weights the method's user gets, every eval_every
    steps and at the end) and calling `report` after each point."""
    n, size, t0 = len(stream.requests), editor.hparams.batch_size, time.time()
    shown = t0
    for s in range(-(-n // size)):
        run["steps"].append(json.loads(json.dumps(editor.edit(stream.requests[s * size:(s + 1) * size]))))
        done = editor.state.n_edits
        if time.time() - shown >= PROGRESS_SECONDS and done < n:            # between points, on stderr
            shown, rate = time.time(), done / (time.time() - t0)
            print(f"{run['label']:>9} {done:>5}/{n} edits, {rate:.2f} edits/s, ETA {(n - done) / rate:.0f} s",
                  file=sys.stderr, flush=True)
        if (s + 1) % eval_every == 0 or done == n:
            with editor.restrained() as m:
                run["points"].append(measure(m, stream, done, heldout, editor.W0))
            run["seconds"] = time.time() - t0
            run["queue"] = queue_summary(run["steps"])
            report()
            log(f"{run['label']:>9} {done:>5} edits  " + "  ".join(
                f"{k} {v:.1f}" for k, v in run["points"][-1].items() if k not in ("edits", "drift"))
                + f"  ({run['seconds']:.0f} s)")
    return run


def experiment(model_dir, n_edits: int | None, batch_size: int, methods=("lyaplock", "memit", "alphaedit"),
               eval_every: int = 5, seed: int = 0, device: str = "cpu", stats_tokens: int = 0,
               out=None, stats_cache="runs/stats-cache", layers=None, corpus=None,
               stream: str = "first", n_retained: int | None = None, n_heldout: int = 64, log=print) -> dict:
    """A long stream of edits (make_stream: `stream`, n_edits of it, 0 or None: all; batch_size
    per step) with each run of `methods` ("method" or "method:field=value:...", parse_run) on a
    fresh copy of the model; at several points: the latest targets' efficacy, generalization, specificity,
    retention of never-edited facts, held-out perplexity and weight drift; per step: PL, D, z.
    The presets are the testbed's (README "Hyper-parameters": chosen on this model). With `out`, the
    report is rewritten at every point; runs complete there with the same settings (SAME_SETTINGS)
    are kept in it, and those this call lists are not rerun. n_retained, n_heldout: at most that
    many retained facts and held-out texts (None: all)."""
    if n_edits is not None and n_edits < 0:
        raise ValueError(f"--edits {n_edits}: give a number of edits of at least 1 (0: the whole stream)")
    n_edits = n_edits or None                                       # 0 as None: the whole stream
    if eval_every < 1:
        raise ValueError(f"--eval-every {eval_every}: give a number of steps of at least 1")
    if twice := sorted({m for m in methods if list(methods).count(m) > 1}):
        raise ValueError(f"--methods: {', '.join(twice)} given twice (a run is made once; give another setting "
                         "to compare, e.g. lyaplock:alpha=30)")
    if out and Path(out).exists() and (Path(out).is_file() or any(f.name != "run.lock" for f in Path(out).iterdir())) \
            and not (Path(out) / "result.json").exists():
        raise ValueError(f"--out {out} holds other files than a testbed report (no result.json): choose a new "
                         "directory, or the one of the report to continue")
    work = (model_dir, n_edits, batch_size, methods, eval_every, seed, device, stats_tokens, out, stats_cache,
            layers, corpus, stream, n_retained, n_heldout, log)
    if not out:
        return run_experiment(*work)
    made = not Path(out).exists()
    Path(out).mkdir(parents=True, exist_ok=True)
    with L.holding(Path(out), "a testbed experiment"):         # a second one there would overwrite its report
        try:
            earlier_report(Path(out))                          # readable, before any work
            return run_experiment(*work)
        finally:                                               # ended before its first report: nothing left
            if made and [f.name for f in Path(out).iterdir()] == ["run.lock"]:
                shutil.rmtree(out)


def run_experiment(model_dir, n_edits, batch_size, methods, eval_every, seed, device, stats_tokens, out,
                   stats_cache, layers, corpus, stream, n_retained, n_heldout, log) -> dict:
    """experiment's work, its arguments checked and its --out held."""
    model_dir = Path(model_dir)
    m = M.load(model_dir, device)
    layers = L.parse_layers(layers, m.cfg.n_layers) if isinstance(layers, str) else layers
    layers = tuple(layers or L.preset(m.cfg, "lyaplock").layers)
    runs = {spec: run_hparams(spec, m.cfg, layers, batch_size) for spec in methods}   # all checked first
    check_one_name_per_run(runs, {})
    edits = make_stream(stream, m, model_dir, n_edits, batch_size, seed, n_retained)
    heldout = read_corpus(L.DEFAULT_HELDOUT)[:n_heldout]
    corpus = corpus or (model_dir / "corpus.txt" if (model_dir / "corpus.txt").exists() else L.DEFAULT_CORPUS)
    C = L.stats.load_or_collect_stats(m, model_dir, corpus, stats_tokens, layers, stats_cache, log=lambda *a, **k: None)
    result = dict(model=str(model_dir), weights=model_digest(model_dir), stream=stream,
                  n_edits=len(edits.requests), batch_size=batch_size, layers=list(layers),
                  held_facts=len(edits.retained), seed=seed, corpus=str(corpus), corpus_sha256=file_sha256(corpus),
                  stats_tokens=stats_tokens, eval_every=eval_every, n_heldout=len(heldout), methods={})
    done = finished_runs(out, result, log)
    check_one_name_per_run(runs, done, out)
    result["before"] = measure(m, edits, 0, heldout, {l: m.edit_weight(l) for l in layers})
    result["methods"] = dict(done)           # earlier runs of these settings stay in the report
    report = (lambda: write_report(result, Path(out))) if out else (lambda: None)
    for spec, hp in runs.items():
        settings = json.loads(json.dumps(asdict(hp)))
        if spec in done and done[spec]["hparams"] == settings:
            log(f"{spec:>12}  complete in {out} with these settings: kept, not rerun")
            continue
        m = M.load(model_dir, device)
        run = result["methods"][spec] = dict(label=spec, steps=[], points=[], seconds=0.0, hparams=settings)
        editor = L.Editor(m, hp, C, L.method_templates(m, seed, hp.method), model_dir)
        run_stream(editor, edits, heldout, run, eval_every, report, log)
    return result


def check_one_name_per_run(runs: dict, kept: dict, out=None):
    """One name per run's settings: two given for one (lyaplock, lyaplock:alpha=60), or a new name
    for a run `kept` complete in `out`, ran it twice (a ValueError naming both)."""
    seen = {json.dumps(run["hparams"], sort_keys=True): name for name, run in kept.items() if name not in runs}
    for spec, hp in runs.items():
        same = seen.setdefault(json.dumps(json.loads(json.dumps(asdict(hp))), sort_keys=True), spec)
        if same != spec and same in kept:
            raise ValueError(f"--methods: {spec} is the run {same} complete in {out} (the same settings); give "
                             f"{same} to keep it")
        if same != spec:
            raise ValueError(f"--methods: {same} and {spec} are one run (the same settings); give one of them")


def model_digest(model_dir: Path) -> str:
    """The model's weights fingerprint (config.json and every stored tensor, stats.fingerprint)
    and its tokenizer's sha256, as stats.py keys its cache: a model retrained at the same path
    gets another."""
    weights = L.stats.fingerprint(file_sha256(model_dir / "config.json"),
                                  L.stats.tensor_digests(model_dir, M.weight_files(model_dir)))
    return f"{weights}-{L.stats.tokenizer_sha(model_dir)}"


def run_hparams(spec: str, cfg: M.Config, layers: tuple, batch_size: int) -> L.HParams:
    """A run's settings: its method's preset for this model, the edit layers (ROME: the last),
    then the spec's (parse_run)."""
    method, over = parse_run(spec)
    one = L.method_of(method).locate == "rome"               # ROME edits one layer: the last
    try:
        return L.with_overrides(L.preset(cfg, method), batch_size=batch_size,
                                layers=layers[-1:] if one else layers, **over)
    except ValueError as e:
        raise ValueError(f"run {spec!r}: {e}") from None


# What a run's figures depend on beside its own hyper-parameters: a report's runs are comparable,
# and an earlier run is reused, only where all of these are the same (the model by its weights,
# tokenizer and config, wherever it lies: not its path).
SAME_SETTINGS = ("weights", "stream", "n_edits", "batch_size", "layers", "seed", "held_facts",
                 "corpus_sha256", "stats_tokens", "eval_every", "n_heldout")


def finished_runs(out, result: dict, log=print) -> dict:
    """The complete runs of an earlier report in `out` with the same SAME_SETTINGS (none if any
    differs, or the report predates one of them: one line names the runs dropped and why)."""
    old = earlier_report(Path(out)) if out else None
    if not old:
        return {}
    path = Path(out) / "result.json"
    if differ := [k for k in SAME_SETTINGS if k not in old or old[k] != result[k]]:
        if old.get("methods"):
            log(f"{path}: earlier runs dropped, their settings differ ({', '.join(differ)}): "
                + ", ".join(old["methods"]))
        return {}
    return {k: r for k, r in old["methods"].items() if complete(r, result)}


def complete(run: dict, result: dict) -> bool:
    """A run has reached the end of the stream (an interrupted one has not)."""
    return bool(run["points"]) and run["points"][-1]["edits"] == result["n_edits"]


# What each step and each point of a report's run holds (run_stream writes them)
STEP_KEYS = {"edits", "layers"}
POINT_KEYS = {"edits", "efficacy", "generalization", "specificity", "retention", "perplexity", "drift"}


def earlier_report(out: Path) -> dict | None:
    """The result.json of an earlier report in `out`, or None; a ValueError naming the file if it
    is not a report's."""
    path = out / "result.json"
    if not path.exists():
        return None
    try:
        old = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable ({e}); remove it, or choose another --out") from None
    if not (isinstance(old, dict) and {"n_edits", "layers", "methods"} <= old.keys()
            and isinstance(old["methods"], dict)):
        raise ValueError(f"{path}: not a testbed report's result; remove it, or choose another --out")
    for name, run in old["methods"].items():             # (damaged ones were TypeErrors and KeyErrors later)
        if not (isinstance(run, dict) and isinstance(run.get("hparams"), dict) and all(
                isinstance(run.get(k), list) and all(isinstance(e, dict) and keys <= e.keys() for e in run[k])
                for k, keys in (("steps", STEP_KEYS), ("points", POINT_KEYS)))):
            raise ValueError(f"{path}: run {name!r} is not a testbed run (its hparams, steps and points); remove "
                             "it, or choose another --out")
    return old


# The figures write_report writes: those of its names the new result does not produce are removed
FIGURES = re.compile(r"pl_layer\d+\.svg|queue\.svg|retention\.svg|efficacy\.svg|perplexity\.svg|frontier\.svg")


def write_report(result: dict, out: Path):
    """result.json, table.md and the SVG figures: PL per layer (against the first queue's D),
    each queue's z, retention, efficacy and perplexity over edits, and the efficacy-retention
    frontier at the last point. A figure of an earlier report in `out` that this result does
    not produce (a layer or a queue no run has now) is removed."""
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "result.json", json.dumps(result, indent=1))             # a kill keeps the last whole one
    (out / "table.md").write_text("\n".join(report_table(result)) + "\n")
    figs = report_figures(result)
    for name, svg in figs.items():
        (out / name).write_text(svg)
    for f in out.iterdir():
        if FIGURES.fullmatch(f.name) and f.name not in figs:
            f.unlink()


def report_figures(result: dict) -> dict:
    """{file name: SVG} of write_report."""
    figs, runs, layers = {}, result["methods"], list(map(str, result["layers"]))
    edits = lambda r: [s["edits"] for s in r["steps"]]
    has = lambda r, l: r["steps"] and l in r["steps"][-1]["layers"]          # ROME edits one layer
    queued = {k: r for k, r in runs.items() if has(r, layers[-1]) and r["steps"][-1]["layers"][layers[-1]]["z"] is not None}
    for l in layers:
        pl = {k: (edits(r), [s["layers"][l]["pl"] for s in r["steps"]]) for k, r in runs.items() if has(r, l)}
        if not pl:                       # no run has edited this layer yet (ROME alone or first)
            continue
        D = next(iter(queued.values()))["steps"][-1]["layers"][l]["D"] if queued else None
        figs[f"pl_layer{l}.svg"] = E.svg_plot(
            pl, f"preservation loss PL, layer {l} (dashed: {next(iter(queued), 'LyapLock')}'s threshold D)", "PL", D)
    if queued:
        figs["queue.svg"] = E.svg_plot(
            {f"{k} L{l}": (edits(r), [s["layers"][l]["z"] for s in r["steps"]]) for k, r in queued.items() for l in layers},
            "virtual queue z (the weight on preservation is z*lambda)", "z")
    for metric, title in (("retention", "never-edited facts still known (%)"),
                          ("efficacy", "efficacy of each edited prompt's latest target (%)"),
                          ("perplexity", "held-out perplexity")):
        figs[f"{metric}.svg"] = E.svg_plot(
            {k: ([p["edits"] for p in r["points"]], [p[metric] for p in r["points"]]) for k, r in runs.items() if r["points"]},
            title, metric)
    last = {k: r["points"][-1] for k, r in runs.items() if r["points"]}
    short = ", ".join(f"{k} {p['edits']}" for k, p in last.items() if not complete(runs[k], result))
    figs["frontier.svg"] = svg_frontier(
        {k: (p["retention"], p["efficacy"]) for k, p in last.items()},
        f"efficacy against retention at the last point ({result['n_edits']} edits" + (f"; so far {short})" if short else ")"))
    return figs


def report_table(result: dict) -> list[str]:
    """The points of every run as a markdown table (PL and z of the last edit layer)."""
    l = str(result["layers"][-1])
    rows = ["| method | edits | efficacy | generalization | specificity | retention | perplexity "
            f"| PL L{l} | z L{l} | ‖ΔW‖/‖W0‖ L{l} |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in result["methods"].items():
        by_edits = {s["edits"]: s["layers"][l] for s in r["steps"]}
        for p in r["points"]:
            z = by_edits[p["edits"]]["z"]
            rows.append(f"| {name} | {p['edits']} | {p['efficacy']:.1f} | {p['generalization']:.1f} | "
                        f"{p['specificity']:.1f} | {p['retention']:.1f} | {p['perplexity']:.1f} | "
                        f"{by_edits[p['edits']]['pl']:.3g} | {'–' if z is None else f'{z:.2f}'} | "
                        f"{p['drift'][l]:.3g} |")
    methods = result["methods"]
    if short := [f"{name} ({r['points'][-1]['edits'] if r['points'] else 0})" for name, r in methods.items()
                 if not complete(r, result)]:
        rows += ["", f"Not at the end of the stream ({result['n_edits']} edits) yet: {', '.join(short)}; the same "
                     "command completes them"]
    if restrained := [name for name in methods if L.method_of(methods[name]["hparams"]["method"]).restrain]:
        rows += ["", f"{', '.join(restrained)}: PL and z are the stream's (the weights the steps edit, unrestrained); "
                     "the other columns measure the restrained weights a user gets"]
    return rows


LABEL_HEIGHT = 11        # px of a line of 10 px sans-serif text; a character is at most 6.5 px wide


def label_boxes(at: dict, w: int, h: int, lines=()) -> list[tuple[float, float, float, float]]:
    """A box (left, top, right, bottom) for each label of svg_frontier, {label: (x, y) of its
    point in px}, that overlaps no box placed before it and no point, inside the figure: beside
    its point (above right, above left, below right, below left) or else the nearest place on a
    vertical ladder of label heights beside it. Of those, the first that also crosses none of
    `lines` (polylines, lists of (x, y)) and lies nearer its own point than any other is taken."""
    placed, points = [], list(at.values())
    disjoint = lambda a, b: a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]
    gap = lambda box, x, y: math.hypot(max(box[0] - x, 0, x - box[2]), max(box[1] - y, 0, y - box[3]))
    on_lines = [(a[0] + (b[0] - a[0]) * t / 20, a[1] + (b[1] - a[1]) * t / 20)       # 21 points a segment
                for line in lines for a, b in zip(line, line[1:]) for t in range(21)]
    for k, (x, y) in at.items():
        width = 6.5 * len(k)
        tops = [y - 4 - LABEL_HEIGHT - step * LABEL_HEIGHT if above else y + 4 + step * LABEL_HEIGHT
                for step in range(2 * h // LABEL_HEIGHT) for above in (True, False)]
        boxes = [(left, top, left + width, top + LABEL_HEIGHT) for top in tops for left in (x + 4, x - 4 - width)]
        inside = [b for b in boxes if b[0] >= 62 and b[2] <= w and b[1] >= 20 and b[3] <= h - 42]   # off the axes
        free = [b for b in inside if all(disjoint(b, o) for o in placed)
                and all(disjoint(b, (px - 3, py - 3, px + 3, py + 3)) for px, py in points)]
        clear = [b for b in free if not any(b[0] <= px <= b[2] and b[1] <= py <= b[3] for px, py in on_lines)
                 and all(gap(b, px, py) > gap(b, x, y) + 3 for px, py in points if (px, py) != (x, y))]
        placed.append((clear or free or inside or boxes)[0])
    return placed


def svg_frontier(points: dict, title: str, w=560, h=360) -> str:
    """Labelled points (x retention %, y efficacy %) on 0..100 axes as SVG text; runs of one
    method (the label before ':') joined by a line in order of x. Labels never overlap one another
    or a point (label_boxes); one moved away from its point is joined to it by a thin line."""
    colors = E.PALETTE
    px = lambda x: 60 + x / 100 * (w - 80)
    py = lambda y: h - 40 - y / 100 * (h - 70)
    out = E.svg_frame(w, h, title, 10, 30, h - 40, "retention %", "efficacy %")
    for v in (0, 50, 100):
        out.append(f'<text x="55" y="{py(v) + 4:.1f}" text-anchor="end">{v}</text>')
        out.append(f'<text x="{px(v):.1f}" y="{h - 26}" text-anchor="middle">{v}</text>')
    families = list(dict.fromkeys(k.split(":")[0] for k in points))
    color = lambda k: colors[families.index(k.split(":")[0]) % len(colors)]
    at = {k: (px(x), py(y)) for k, (x, y) in points.items()}
    lines = {f: sorted(xy for k, xy in at.items() if k.split(":")[0] == f) for f in families}
    lines = {f: xy for f, xy in lines.items() if len(xy) > 1}
    for f, xy in lines.items():
        pts = " ".join(f"{x:.1f},{y:.1f}" for x, y in xy)
        out.append(f'<polyline points="{pts}" fill="none" stroke="{color(f)}" stroke-width="1" stroke-opacity="0.5"/>')
    for (k, (x, y)), (left, top, right, bottom) in zip(at.items(), label_boxes(at, w, h, lines.values())):
        out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{color(k)}"/>')
        if not (left - 5 <= x <= right + 5 and top - 5 <= y <= bottom + 5):           # moved: a leader
            ex, ey = min(max(x, left), right), (bottom if y > bottom else top)
            out.append(f'<line x1="{x:.1f}" y1="{y:.1f}" x2="{ex:.1f}" y2="{ey:.1f}" stroke="{color(k)}" '
                       'stroke-width="0.5"/>')
        out.append(f'<text x="{left:.1f}" y="{bottom - 2:.1f}" fill="{color(k)}">{E._esc(k)}</text>')
    return "\n".join(out + ["</svg>"])


def main(argv=None):
    p = argparse.ArgumentParser(description="The laptop-scale fact-model testbed.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a fact model and save it in the HF layout")
    t.add_argument("--size", choices=list(SIZES), default="ci")
    t.add_argument("--family", choices=list(FAMILIES), default="llama",
                   help="the model's family: LLaMA, or Gemma 2 or OLMo 2 (their MLP outputs normalised "
                        "before the residual add), Granite (scaled), or Phi-3, GPT-NeoX or Phi (their layouts)")
    t.add_argument("--out", required=True, help="output directory")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--steps", type=int, default=None, help="override the size's step count")
    t.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    t.add_argument("--threads", type=int, default=2, help="CPU threads (results depend on it)")
    t.set_defaults(run=lambda args: train(args.out, args.size, args.seed, args.device, args.steps,
                                          family=args.family))
    e = sub.add_parser("experiment", help="a long edit stream with each method: table and SVG figures")
    e.add_argument("--model", default=str(FIX / "factmodel-ci"), help="a fact model trained by `train`, or stories260K")
    e.add_argument("--stream", choices=STREAMS, default="first",
                   help="first: the editable records in order; churn: those rewritten again and again; "
                        "distinct: one edit per known subject; stories: stories260K's story slots")
    e.add_argument("--edits", type=int, default=200, help="edits in all (0: the whole stream)")
    e.add_argument("--batch-size", type=int, default=10)
    e.add_argument("--methods", default="lyaplock,memit,alphaedit",
                   help="comma-separated runs, each a method of lyaplock.METHODS with optional "
                        "':field=value' settings, e.g. lyaplock:alpha=30:superseded=remove")
    e.add_argument("--layers", help="edit layers (default: the preset for the model's size)")
    e.add_argument("--eval-every", type=int, default=5, help="evaluate every k steps")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--corpus", help="statistics corpus (default: the model's corpus.txt, else WikiText)")
    e.add_argument("--out", default="runs/testbed")
    e.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    e.add_argument("--threads", type=int, default=2)
    e.set_defaults(run=lambda args: experiment(
        args.model, args.edits or None, args.batch_size, args.methods.split(","), args.eval_every,
        seed=args.seed, device=args.device, out=args.out, corpus=args.corpus, stream=args.stream,
        layers=args.layers))
    args = p.parse_args(argv)
    try:
        for flag in ("threads", "steps", "batch_size"):
            if getattr(args, flag, None) is not None and getattr(args, flag) < 1:
                raise ValueError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: give a whole number of at least 1")
        most = max(1024, os.cpu_count() or 1)          # (torch.set_num_threads(100000) crashed; 4096 runs)
        if (args.threads or 0) > most:
            raise ValueError(f"--threads {args.threads}: give at most {most} (this machine has {os.cpu_count()} CPUs)")
        M.check_seed(getattr(args, "seed", 0), "--seed")
        if not args.out:                     # (the experiment ran and wrote no report)
            raise ValueError("--out '': give a directory")
        torch.set_num_threads(args.threads)
        with sigterm_exits():                  # `kill`: the finally blocks clean up
            args.run(args)
    except (M.CheckpointError, DataError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\ninterrupted{kept(args)}", file=sys.stderr)
        return 130
    except Terminated:                         # (the finally blocks have run)
        print(f"\nstopped (SIGTERM){kept(args)}", file=sys.stderr)
        raise                                  # (exit 143)
    return 0


def kept(args) -> str:
    """What an interrupted command leaves: an experiment's complete runs (the same command does
    the rest); a training leaves its --out as it was (a model is written whole or not at all)."""
    return f"; the runs complete in {args.out} are kept and the same command does the rest" \
        if args.command == "experiment" and args.out and (Path(args.out) / "result.json").exists() else ""


if __name__ == "__main__":
    sys.exit(main())
