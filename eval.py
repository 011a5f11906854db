"""Evaluation: CounterFact and zsRE edit metrics, fluency and consistency, zero-shot general
ability, perplexity, and the run summary.

Definitions follow ../shared/docs/LYAPLOCK.md §8, i.e. the ROME/MEMIT conventions, so numbers
compare with the literature. Every target (edit target, neighbourhood answer, label word) is
tokenised by `target_ids` and scored after its prompt by `target_nll`: one place, used by the
editing method too. NLL below always means the MEAN per-token NLL of a target after its prompt.
"""
from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import model as modeling
from data import Request


# ------------------------------------------------------------------------ target tokenisation
def target_ids(tok, target: str) -> list[int]:
    """Token ids of a target as it follows a prompt: a leading space unless present, no BOS."""
    return tok.encode(target if target.startswith(" ") else " " + target, bos=False)


@dataclass
class TargetBatch:
    ids: torch.Tensor     # (B, T) prompt + target, right-padded
    mask: torch.Tensor    # (B, T) 1 on real tokens
    pos: torch.Tensor     # (B, K) position predicting target token j: len(prompt) - 1 + j
    tgt: torch.Tensor     # (B, K) target token ids (0 where padded)
    tmask: torch.Tensor   # (B, K) True on real target tokens


def prompt_target_batch(tok, prompts, targets, device=None) -> TargetBatch:
    """Encode each prompt (the checkpoint's BOS rule) followed by its target's ids."""
    seqs, tgts, lens = [], [], []
    for p, t in zip(prompts, targets, strict=True):
        pi, ti = tok.encode(p), target_ids(tok, t)
        if not pi or not ti:
            raise ValueError(f"prompt {p!r} or target {t!r} encodes to no tokens")
        seqs.append(pi + ti)
        tgts.append(ti)
        lens.append(len(pi))
    B, K = len(seqs), max(len(t) for t in tgts)
    pos, tgt = torch.zeros(B, K, dtype=torch.long), torch.zeros(B, K, dtype=torch.long)
    tmask = torch.zeros(B, K, dtype=torch.bool)
    for b, (ti, n) in enumerate(zip(tgts, lens)):
        k = len(ti)
        pos[b, :k], tgt[b, :k], tmask[b, :k] = torch.arange(n - 1, n - 1 + k), torch.tensor(ti), True
    ids, mask = tok.pad(seqs, side="right", device=device)
    return TargetBatch(ids, mask, pos.to(device), tgt.to(device), tmask.to(device))


@dataclass
class TargetScores:
    nll_mean: torch.Tensor            # (n,) mean per-token NLL of each target
    prob: torch.Tensor                # (n,) exp(-sum NLL): the probability of the whole target
    token_correct: list[list[bool]]   # per target token: argmax (given the gold prefix) == gold


def _device(m) -> torch.device:
    return next(m.parameters()).device


@torch.no_grad()
def target_nll(m, prompts, targets, batch_size: int = 64) -> TargetScores:
    """Score each target after its prompt, `batch_size` pairs per forward pass, logits only at
    the positions that predict target tokens."""
    nll, prob, correct = [torch.zeros(0)], [torch.zeros(0)], []
    for s in range(0, len(prompts), batch_size):
        b = prompt_target_batch(m.tokenizer, prompts[s:s + batch_size], targets[s:s + batch_size],
                                _device(m))
        logp = m(b.ids, b.mask, logits_at=b.pos).logits.log_softmax(-1)       # (B, K, V)
        tok_nll = -logp.gather(-1, b.tgt[..., None]).squeeze(-1) * b.tmask     # (B, K)
        n = b.tmask.sum(1)
        nll.append((tok_nll.sum(1) / n).cpu())
        prob.append(torch.exp(-tok_nll.sum(1)).cpu())
        hit = (logp.argmax(-1) == b.tgt).cpu()
        correct += [h[:k].tolist() for h, k in zip(hit, n.tolist())]
    return TargetScores(torch.cat(nll), torch.cat(prob), correct)


# ------------------------------------------------------------------------ CounterFact and zsRE
def _rows(requests: list[Request], other_of):
    """Flatten cases to (case index, category, prompt, target_new, other target) rows."""
    rows = []
    for i, r in enumerate(requests):
        rows.append((i, "efficacy", r.rewrite_prompt(), r.target_new, other_of(r, None)))
        rows += [(i, "generalization", p, r.target_new, other_of(r, None)) for p in r.paraphrase_prompts]
        rows += [(i, "specificity", p, r.target_new, other_of(r, k))
                 for k, p in enumerate(r.neighborhood_prompts)]
    return rows


def _mean(xs):
    return sum(xs) / len(xs) if xs else None


def counterfact_eval(m, requests: list[Request], batch_size: int = 64) -> list[dict]:
    """Per case (ROME): Efficacy 1[NLL(true) > NLL(new)] on the rewrite prompt, Generalization the
    same averaged over paraphrases, Specificity 1[NLL(answer) < NLL(new)] averaged over neighbourhood
    prompts (answer = target_true in CounterFact). Magnitudes with P = exp(-mean token NLL):
    P(new) - P(true) for efficacy/generalization, P(answer) - P(new) for specificity (so for all
    three, higher is better, as ROME's EM/PM/NM)."""
    rows = _rows(requests, lambda r, k: r.target_true if k is None else r.neighborhood_answers[k])
    prompts = [p for _, _, p, _, _ in rows]
    nll = target_nll(m, prompts + prompts, [t for *_, t, _ in rows] + [o for *_, o in rows],
                     batch_size).nll_mean.tolist()
    new, other = nll[:len(rows)], nll[len(rows):]
    success, magnitude = [{} for _ in requests], [{} for _ in requests]   # [case][category] lists
    for (i, cat, *_), n, o in zip(rows, new, other):
        sign = 1 if cat != "specificity" else -1                          # which target should win
        success[i].setdefault(cat, []).append(float(sign * (o - n) > 0))
        magnitude[i].setdefault(cat, []).append(sign * (math.exp(-n) - math.exp(-o)))
    return [_case(r, success[i], magnitude[i]) for i, r in enumerate(requests)]


def _case(r: Request, success: dict, magnitude: dict | None = None) -> dict:
    case = {"case_id": r.case_id, "kind": r.kind}
    for cat in ("efficacy", "generalization", "specificity"):
        case[cat] = _mean(success.get(cat, []))
    for cat in magnitude or {}:
        case[cat + "_magnitude"] = _mean(magnitude[cat])
    return case


def zsre_eval(m, requests: list[Request], batch_size: int = 64) -> list[dict]:
    """Per case (MEMIT): teacher-forced top-1 token accuracy of target_new after the rewrite prompt
    (Efficacy) and the paraphrases (Generalization), and of the recorded answer after the
    neighbourhood prompt (Specificity); a prompt's accuracy is its fraction of correct tokens."""
    rows = _rows(requests, lambda r, k: None if k is None else r.neighborhood_answers[k])
    targets = [t if cat != "specificity" else o for _, cat, _, t, o in rows]
    correct = target_nll(m, [p for _, _, p, _, _ in rows], targets, batch_size).token_correct
    acc = [{} for _ in requests]
    for (i, cat, *_), c in zip(rows, correct):
        acc[i].setdefault(cat, []).append(sum(c) / len(c))
    return [_case(r, acc[i]) for i, r in enumerate(requests)]


def edit_eval(m, requests: list[Request], batch_size: int = 64) -> list[dict]:
    """`counterfact_eval` or `zsre_eval`, by the requests' kind."""
    kinds = {r.kind for r in requests}
    if len(kinds) > 1:
        raise ValueError(f"requests of several kinds {sorted(kinds)}: evaluate each kind apart")
    return (zsre_eval if kinds == {"zsre"} else counterfact_eval)(m, requests, batch_size)


# -------------------------------------------------------------------- fluency and consistency
_WORD = re.compile(r"\w+|[^\w\s]")    # a run of word characters, or one punctuation mark
_TERM = re.compile(r"\b\w\w+\b")      # TF-IDF terms: lower-cased words of 2+ characters


def ngram_entropy(text: str, ns=(2, 3), weights=(2 / 3, 4 / 3)) -> float:
    """ROME's fluency of one text: the MEAN over n of weight_n * H_n = (H2 + 2 H3) / 3, with H_n the
    log2 entropy of the text's n-gram frequency distribution. Words: `_WORD` (close to nltk's
    word_tokenize, which ROME uses). LYAPLOCK.md §8 writes the sum (2/3)H2 + (4/3)H3; ROME's code
    and published numbers (~6 per text, ~600 as ×100) use this mean, half of that sum."""
    words, hs = _WORD.findall(text), []
    for n, w in zip(ns, weights):
        counts = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
        total = sum(counts.values())
        hs.append(w * -sum(c / total * math.log2(c / total) for c in counts.values()))
    return sum(hs) / len(hs)


def fit_idf(docs: list[str]) -> dict[str, float]:
    """Smoothed IDF over a reference collection: ln((1 + N) / (1 + df)) + 1 (scikit-learn's)."""
    df = Counter(t for d in docs for t in set(_TERM.findall(d.lower())))
    return {t: math.log((1 + len(docs)) / (1 + c)) + 1 for t, c in df.items()}


def tfidf_cosine(a: str, b: str, idf: dict[str, float]) -> float:
    """Cosine of raw-count TF x IDF vectors; terms outside `idf` are dropped; 0 if a vector is 0."""
    va, vb = ({t: c * idf[t] for t, c in Counter(_TERM.findall(x.lower())).items() if t in idf}
              for x in (a, b))
    dot = sum(v * vb.get(t, 0.0) for t, v in va.items())
    na, nb = (math.sqrt(sum(v * v for v in x.values())) for x in (va, vb))
    return dot / (na * nb) if na and nb else 0.0


def consistency(texts: list[str], snippets: list[str], idf: dict | None = None) -> float:
    """ROME's consistency: TF-IDF cosine of the joined generations and the joined reference
    snippets; IDF from `idf` or else from the snippets themselves (each snippet a document)."""
    return tfidf_cosine(" ".join(texts), " ".join(snippets), idf if idf is not None else fit_idf(snippets))


def generate_texts(m, prompts, max_new_tokens=100, top_k=5, seed=0, batch_size=32) -> list[str]:
    """Prompt + sampled continuation (top-k), decoded together; batch j is seeded with seed + j."""
    tok, texts = m.tokenizer, []
    for j, s in enumerate(range(0, len(prompts), batch_size)):
        seqs = [tok.encode(p) for p in prompts[s:s + batch_size]]
        new = modeling.generate(m, seqs, max_new_tokens, top_k=top_k, seed=seed + j)
        texts += [tok.decode(q + n) for q, n in zip(seqs, new)]
    return texts


def generation_eval(m, requests: list[Request], snippets: dict | None = None, idf: dict | None = None,
                    max_new_tokens=100, top_k=5, seed=0, batch_size=32) -> list[dict]:
    """Per case: `fluency` (mean ngram_entropy over its generation prompts' texts), `consistency`
    where `snippets` (case_id -> reference texts) has the case, and the texts; {} if no prompts."""
    prompts = [(i, p) for i, r in enumerate(requests) for p in r.generation_prompts]
    texts = generate_texts(m, [p for _, p in prompts], max_new_tokens, top_k, seed, batch_size)
    per = [[] for _ in requests]
    for (i, _), t in zip(prompts, texts):
        per[i].append(t)
    out = []
    for r, ts in zip(requests, per):
        case = {"fluency": _mean([ngram_entropy(t) for t in ts]), "generations": ts} if ts else {}
        if ts and snippets and snippets.get(r.case_id):
            case["consistency"] = consistency(ts, snippets[r.case_id], idf)
        out.append(case)
    return out


# --------------------------------------------------------------------------- general ability
# Zero-shot prompts; each ends in a question and "Answer:", and the label words are scored as
# the answer (lowest mean NLL wins). Class ids: sst2 0 neg / 1 pos; mrpc 1 = paraphrase;
# cola 1 = acceptable; rte and nli 0 = entailment / 1 = not (GLUE's order); mmlu the choice index.
def _entail(x):
    return (f"{x['sentence1']}\nQuestion: Does this mean that \"{x['sentence2']}\" is true? "
            "Yes or no?\nAnswer:")


def _mmlu(x):
    opts = "".join(f"\n{'ABCD'[k]}. {c}" for k, c in enumerate(x["choices"]))
    topic = x["subject"].replace("_", " ")
    return f"The following is a multiple choice question about {topic}.\n\n{x['question']}{opts}\nAnswer:"


TASKS = {   # name -> (prompt, class label words, class id of an item)
    "sst2": (lambda x: f"Review: {x['sentence']}\nQuestion: Is this review positive or negative?\nAnswer:",
             (" negative", " positive"), lambda x: int(x["label"])),
    "mrpc": (lambda x: f"Sentence 1: {x['sentence1']}\nSentence 2: {x['sentence2']}\n"
                       "Question: Do both sentences mean the same thing? Yes or no?\nAnswer:",
             (" No", " Yes"), lambda x: int(x["label"])),
    "cola": (lambda x: f"Sentence: {x['sentence']}\nQuestion: Is this sentence grammatically correct? "
                       "Yes or no?\nAnswer:", (" No", " Yes"), lambda x: int(x["label"])),
    "rte": (_entail, (" Yes", " No"), lambda x: int(x["label"])),
    "nli": (_entail, (" Yes", " No"), lambda x: {"entailment": 0, "not_entailment": 1}[x["label"]]),
    "mmlu": (_mmlu, (" A", " B", " C", " D"), lambda x: int(x["answer"])),
}


def f1_per_class(labels, preds, n_classes) -> list[float]:
    """F1 = 2TP / (2TP + FP + FN) of each class (0 where the class never occurs nor is predicted)."""
    out = []
    for c in range(n_classes):
        tp = sum(l == c and p == c for l, p in zip(labels, preds))
        wrong = sum((l == c) != (p == c) for l, p in zip(labels, preds))   # FP + FN
        out.append(2 * tp / (2 * tp + wrong) if tp + wrong else 0.0)
    return out


def mcc(labels, preds) -> float:
    """Binary Matthews correlation (TP TN - FP FN) / sqrt(...); 0 when a margin is empty."""
    tp, tn, fp, fn = (sum(l == a and p == b for l, p in zip(labels, preds))
                      for a, b in ((1, 1), (0, 0), (0, 1), (1, 0)))
    den = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return (tp * tn - fp * fn) / den if den else 0.0


def classification_metrics(labels, preds, n_classes) -> dict:
    """accuracy; f1 = support-weighted mean of the classes' F1 (the authors' f1_score(average=
    'weighted')); macro_f1; mcc for two classes."""
    f1s, n = f1_per_class(labels, preds, n_classes), len(labels)
    support = [sum(l == c for l in labels) for c in range(n_classes)]
    out = {"n": n, "accuracy": sum(l == p for l, p in zip(labels, preds)) / n,
           "f1": sum(f * s for f, s in zip(f1s, support)) / n, "macro_f1": sum(f1s) / n_classes}
    if n_classes == 2:
        out["mcc"] = mcc(labels, preds)
    return out


def general_eval(m, glue_dir, n_per_task: int = 100, tasks=tuple(TASKS), batch_size: int = 64) -> dict:
    """Zero-shot classification on the first `n_per_task` items of each `<task>.json` in glue_dir
    (the items alternate classes, so these are balanced). Headline: f1 for sst2/mrpc/rte/nli,
    mcc for cola, accuracy for mmlu; all metrics are fractions."""
    results = {}
    for name in tasks:
        prompt_of, words, label_of = TASKS[name]
        path = Path(glue_dir) / f"{name}.json"
        items = json.loads(path.read_text(encoding="utf-8"))[:n_per_task]
        if not items:
            raise ValueError(f"{path}: no items")
        try:
            prompts, labels = [prompt_of(x) for x in items], [label_of(x) for x in items]
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: an item lacks or has a bad field: {e!r}") from None
        L = len(words)
        nll = target_nll(m, [p for p in prompts for _ in words], list(words) * len(prompts),
                         batch_size).nll_mean.view(-1, L)                  # (n, L)
        results[name] = classification_metrics(labels, nll.argmin(1).tolist(), L)
    return results


# ------------------------------------------------------------------------------- perplexity
@torch.no_grad()
def perplexity(m, texts, max_len: int = 256, batch_size: int = 16) -> float:
    """exp(total NLL / number of predicted tokens) over texts, each encoded alone with BOS (where
    the tokenizer has one) and cut to `max_len` tokens; texts under 2 tokens are skipped."""
    tok = m.tokenizer
    seqs = [tok.encode(t, bos=tok.bos_id is not None)[:max_len] for t in texts]
    seqs = [s for s in seqs if len(s) >= 2]
    if not seqs:
        raise ValueError("perplexity: no text has 2 or more tokens")
    total, count = 0.0, 0
    for s in range(0, len(seqs), batch_size):
        ids, mask = tok.pad(seqs[s:s + batch_size], side="right", device=_device(m))
        logits = m(ids, mask).logits[:, :-1]                                   # (B, T-1, V)
        nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # (B, T-1)
        real = mask[:, 1:].bool()
        total, count = total + float(nll[real].double().sum()), count + int(real.sum())
    return math.exp(total / count)


# -------------------------------------------------------------------------------- summaries
METRICS = ("efficacy", "generalization", "specificity")
EXTRA = tuple(k + "_magnitude" for k in METRICS) + ("fluency", "consistency")
HEADER = ("method", "model", "n_edits", "batch_size")


def summarize(cases: list[dict]) -> dict:
    """Means over cases ×100 of the metrics present (a case's None is left out); `score` is the
    harmonic mean of efficacy, generalization and specificity (×100 already)."""
    out = {"n_cases": len(cases)}
    for k in METRICS + EXTRA:
        vals = [c[k] for c in cases if c.get(k) is not None]
        if vals:
            out[k] = 100 * sum(vals) / len(vals)
    if all(k in out for k in METRICS):
        parts = [out[k] for k in METRICS]
        out["score"] = 0.0 if min(parts) <= 0 else len(parts) / sum(1 / v for v in parts)
    order = ["n_cases", *METRICS, "score", *EXTRA]
    return {k: out[k] for k in order if k in out}


def flat(d: dict, prefix: str = "") -> dict:
    """Nested dicts to dotted keys ({'sst2': {'f1': ..}} -> 'sst2.f1')."""
    out = {}
    for k, v in d.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def write_summary(out_dir, summary: dict, header: dict, pre: dict | None = None) -> None:
    """summary.json ({**header, **summary, "pre": pre}) and summary.md: the header, then one row
    per metric with its value before (when `pre` is given) and after editing, floats to 2 decimals."""
    if missing := [k for k in HEADER if k not in header]:
        raise ValueError(f"write_summary: header lacks {', '.join(missing)}")
    if clash := sorted(set(header) & set(summary)):
        raise ValueError(f"write_summary: keys in both header and summary: {', '.join(clash)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps({**header, **summary, **({"pre": pre} if pre else {})},
                                                 indent=2) + "\n")
    fmt = lambda v: "" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)
    after, before = flat(summary), flat(pre or {})
    lines = [f"- {k}: {header[k]}" for k in HEADER] + [""]
    lines += ["| metric | before | after |", "|---|---|---|"] if pre else ["| metric | value |", "|---|---|"]
    for k, v in after.items():
        lines.append(f"| {k} | {fmt(before.get(k))} | {fmt(v)} |" if pre else f"| {k} | {fmt(v)} |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
