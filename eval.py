"""Evaluation: CounterFact and zsRE edit metrics (teacher-forced and generative), fluency and
consistency, zero-shot general ability, perplexity, the run summary, and a run's report (its
figures, the audit of theorem T1 on its log, a verdict).

Definitions follow docs/LYAPLOCK.md §8, i.e. the ROME/MEMIT conventions, so numbers
compare with the literature. Every target (edit target, neighbourhood answer, label word) is
tokenised by `target_ids` and scored after its prompt by `target_nll`: one place, used by the
editing method too. NLL below always means the MEAN per-token NLL of a target after its prompt.
"""
from __future__ import annotations

import json
import math
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

import model as modeling
from data import Request, read_jsonl


# ------------------------------------------------------------------------ target tokenisation
def target_ids(tok, target: str) -> list[int]:
    """Token ids of a target as it follows a prompt: a leading space unless present, no BOS, and
    tokenised as inside a sentence: the ids of "x" + target past those of "x". Tokenising the
    target alone is not that where a tokenizer marks the start of every text: Llama-2's and
    Mistral's prepend "▁", so " Paris" alone is "▁" "▁Paris" (a stray token 29871 the model never
    sees before a word). Where "x" does not stay one piece, the target alone."""
    text = target if target.startswith(" ") else " " + target
    lead = tok.encode("x", bos=False)
    ids = tok.encode("x" + text, bos=False)
    return ids[len(lead):] if ids[:len(lead)] == lead else tok.encode(text, bos=False)


@dataclass
class TargetBatch:
    ids: torch.Tensor     # (B, T) prompt + target, right-padded
    mask: torch.Tensor    # (B, T) 1 on real tokens
    pos: torch.Tensor     # (B, K) position predicting target token j: len(prompt) - 1 + j
    tgt: torch.Tensor     # (B, K) target token ids (0 where padded)
    tmask: torch.Tensor   # (B, K) True on real target tokens


def cut_start(ids: list[int], lead: int, limit: int) -> list[int]:
    """ids with as many tokens after the first `lead` dropped as keep them within `limit`."""
    return ids if len(ids) <= limit else ids[:lead] + ids[len(ids) - limit + lead:]


def prompt_target_ids(tok, prompts, targets, max_len: int | None = None) -> list[tuple[list[int], list[int]]]:
    """Each prompt's ids (the checkpoint's BOS rule) and its target's; with `max_len`, a prompt too
    long for it loses its start (after the lead: a question's end is kept)."""
    pairs = []
    for p, t in zip(prompts, targets, strict=True):
        pi, ti = tok.encode(p), target_ids(tok, t)
        if not pi or not ti:
            raise ValueError(f"prompt {p!r} or target {t!r} encodes to no tokens")
        if max_len is not None and len(pi) + len(ti) > max_len:
            if max_len - len(ti) <= len(tok.lead):
                raise ValueError(f"target {t!r} is {len(ti)} tokens: no room for a prompt in {max_len} positions")
            pi = cut_start(pi, len(tok.lead), max_len - len(ti))
        pairs.append((pi, ti))
    return pairs


def pair_batch(tok, pairs: list[tuple[list[int], list[int]]], device=None) -> TargetBatch:
    """A batch of (prompt ids, target ids) pairs: each prompt followed by its target, right-padded."""
    B, K = len(pairs), max(len(ti) for _, ti in pairs)
    pos, tgt = torch.zeros(B, K, dtype=torch.long), torch.zeros(B, K, dtype=torch.long)
    tmask = torch.zeros(B, K, dtype=torch.bool)
    for b, (pi, ti) in enumerate(pairs):
        n, k = len(pi), len(ti)
        pos[b, :k], tgt[b, :k], tmask[b, :k] = torch.arange(n - 1, n - 1 + k), torch.tensor(ti), True
    ids, mask = tok.pad([pi + ti for pi, ti in pairs], side="right", device=device)
    return TargetBatch(ids, mask, pos.to(device), tgt.to(device), tmask.to(device))


def prompt_target_batch(tok, prompts, targets, device=None, max_len: int | None = None) -> TargetBatch:
    """Encode each prompt followed by its target's ids (prompt_target_ids), as one batch."""
    return pair_batch(tok, prompt_target_ids(tok, prompts, targets, max_len), device)


@dataclass
class TargetScores:
    nll_mean: torch.Tensor            # (n,) mean per-token NLL of each target
    token_correct: list[list[bool]]   # per target token: argmax (given the gold prefix) == gold
    argmax: list[list[int]]           # per target token: the argmax given the gold prefix


def _device(m) -> torch.device:
    return next(m.parameters()).device


@torch.no_grad()
def target_nll(m, prompts, targets, batch_size: int = 64, max_len: int | None = None) -> TargetScores:
    """Score each target after its prompt, `batch_size` pairs per forward pass, logits only at
    the positions that predict target tokens (`max_len`: prompt_target_ids'). The pairs go by
    length, longest first (little padding: CounterFact's paraphrases run to several times a
    neighbourhood prompt's length; and a batch too large for memory is the first); the scores
    come back in the given order."""
    pairs = prompt_target_ids(m.tokenizer, prompts, targets, max_len)
    order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
    nll, correct, argmax = torch.zeros(len(pairs)), [None] * len(pairs), [None] * len(pairs)
    for s in range(0, len(pairs), batch_size):
        rows = order[s:s + batch_size]
        b = pair_batch(m.tokenizer, [pairs[i] for i in rows], _device(m))
        logp = m(b.ids, b.mask, logits_at=b.pos).logits.log_softmax(-1)       # (B, K, V)
        tok_nll = -logp.gather(-1, b.tgt[..., None]).squeeze(-1) * b.tmask     # (B, K)
        n = b.tmask.sum(1)
        nll[rows] = (tok_nll.sum(1) / n).float().cpu()
        best = logp.argmax(-1).cpu()
        hit = best == b.tgt.cpu()
        for i, h, a, k in zip(rows, hit, best, n.tolist()):
            correct[i], argmax[i] = h[:k].tolist(), a[:k].tolist()
    return TargetScores(nll, correct, argmax)


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
    three, higher is better, as ROME's EM/PM/NM).

    Also the teacher-forced top-1 token accuracy, named apart so the conventions are never mixed:
    `<metric>_top1`, the fraction of target tokens that are the argmax given the gold prefix, of
    target_new on the rewrite and paraphrase prompts (EasyEdit's rewrite and rephrase accuracy)
    and of the true answer on the neighbourhood prompts; and those argmax tokens on the
    neighbourhood prompts (`neighborhood_argmax`), from which with_locality scores EasyEdit's
    locality against the model before editing."""
    if untrue := [r.case_id for r in requests if r.target_true is None]:    # (editing needs none; scoring does)
        raise ValueError(f"case_id {untrue[0]!r}: a CounterFact request without target_true cannot be scored "
                         "(efficacy compares target_new with it); kind='zsre' scores without one")
    rows = _rows(requests, lambda r, k: r.target_true if k is None else r.neighborhood_answers[k])
    prompts = [p for _, _, p, _, _ in rows]
    scores = target_nll(m, prompts + prompts, [t for *_, t, _ in rows] + [o for *_, o in rows], batch_size)
    nll, hits = scores.nll_mean.tolist(), scores.token_correct
    new, other = nll[:len(rows)], nll[len(rows):]
    success, magnitude, top1 = ([{} for _ in requests] for _ in range(3))   # [case][category] lists
    argmax = [[] for _ in requests]
    for j, ((i, cat, *_), n, o) in enumerate(zip(rows, new, other)):
        sign = 1 if cat != "specificity" else -1                          # which target should win
        success[i].setdefault(cat, []).append(float(sign * (o - n) > 0))
        magnitude[i].setdefault(cat, []).append(sign * (math.exp(-n) - math.exp(-o)))
        tokens = hits[j] if cat != "specificity" else hits[len(rows) + j]  # new target / true answer
        top1[i].setdefault(cat, []).append(sum(tokens) / len(tokens))
        if cat == "specificity":
            argmax[i].append(scores.argmax[len(rows) + j])
    return [_case(r, success[i], magnitude[i]) | {f"{c}_top1": _mean(v) for c, v in top1[i].items()}
            | {"neighborhood_argmax": argmax[i]} for i, r in enumerate(requests)]


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
    neighbourhood prompt (Specificity); a prompt's accuracy is its fraction of correct tokens. With
    the argmax tokens on the neighbourhood prompts (`neighborhood_argmax`, for with_locality)."""
    rows = _rows(requests, lambda r, k: None if k is None else r.neighborhood_answers[k])
    targets = [t if cat != "specificity" else o for _, cat, _, t, o in rows]
    scores = target_nll(m, [p for _, _, p, _, _ in rows], targets, batch_size)
    acc, argmax = [{} for _ in requests], [[] for _ in requests]
    for (i, cat, *_), c, a in zip(rows, scores.token_correct, scores.argmax):
        acc[i].setdefault(cat, []).append(sum(c) / len(c))
        if cat == "specificity":
            argmax[i].append(a)
    return [_case(r, acc[i]) | {"neighborhood_argmax": argmax[i]} for i, r in enumerate(requests)]


def with_locality(before: list[dict], after: list[dict]) -> list[dict]:
    """The cases `after` with EasyEdit's locality, `locality_top1`: on the neighbourhood prompts,
    teacher-forced on the true answer, the fraction of positions whose argmax token is the one the
    model gave before editing (`before`: the same cases scored then; 1 for an unchanged model),
    averaged over a case's prompts (EasyEdit's editor.py: mean(post == pre)). The two lists hold
    the same cases in the same order (matched by place: two requests may share a case id)."""
    if [c["case_id"] for c in before] != [c["case_id"] for c in after]:
        raise ValueError("with_locality: `before` and `after` must be the same cases in the same order")
    out = []
    for b, c in zip(before, after):
        pre, now = b.get("neighborhood_argmax"), c.get("neighborhood_argmax")
        if not pre or not now or [len(t) for t in pre] != [len(t) for t in now]:
            out.append(c)
            continue
        same = [sum(a == b for a, b in zip(p, q)) / len(p) for p, q in zip(pre, now)]
        out.append(c | {"locality_top1": _mean(same)})
    return out


def edit_eval(m, requests: list[Request], batch_size: int = 64) -> list[dict]:
    """`counterfact_eval` or `zsre_eval`, by the requests' kind."""
    kinds = {r.kind for r in requests}
    if len(kinds) > 1:
        raise ValueError(f"requests of several kinds {sorted(kinds)}: evaluate each kind apart")
    return (zsre_eval if kinds == {"zsre"} else counterfact_eval)(m, requests, batch_size)


# ------------------------------------------------------------------------ generative efficacy
def continues_with(text: str, target: str) -> bool:
    """The generative success rule: the continuation, its leading whitespace stripped, starts
    with the target's text (stripped), and the target's last word ends there: a target ending
    in a letter or digit must not be followed by one ("Parisian" is not "Paris"; "Paris," and
    "Paris is" are). Case and inner whitespace must match exactly."""
    t, c = target.strip(), text.lstrip()
    if not t or not c.startswith(t):
        return False
    rest = c[len(t):]
    return not (rest[:1].isalnum() and t[-1].isalnum())


GREEDY_SPARE = 2      # greedy_continuations' tokens past the target


@torch.no_grad()
def greedy_continuations(m, prompts, targets, batch_size: int = 32) -> list[str]:
    """Greedy decoding after each prompt (encoded as target_nll encodes it, with the
    checkpoint's BOS rule), left-padded batches as modeling.generate does. Each prompt gets
    len(target_ids) + GREEDY_SPARE new tokens: room for the target, one token after it (to see
    whether its word ends) and one more for a spelling in more tokens than target_ids's. Prompts
    are batched only with those that get as many new tokens (so none runs past its own: the
    length check, lyaplock.longest_input, counts each), and each text is decoded from its own
    first tokens only, so the result does not depend on the batch."""
    tok = m.tokenizer
    seqs = [tok.encode(p) for p in prompts]
    need = [len(target_ids(tok, t)) + GREEDY_SPARE for t in targets]
    texts = [""] * len(prompts)
    for n in sorted(set(need)):
        same = [i for i in range(len(prompts)) if need[i] == n]
        for s in range(0, len(same), batch_size):
            idx = same[s:s + batch_size]
            for i, new in zip(idx, modeling.generate(m, [seqs[i] for i in idx], n)):
                texts[i] = tok.decode(new)
    return texts


def generative_eval(m, requests: list[Request], batch_size: int = 32) -> list[dict]:
    """Per case, what a user of the edited model sees: `efficacy_generative` (the rewrite prompt)
    and `generalization_generative` (mean over the paraphrases; None without any), the fraction
    of prompts whose greedy continuation `continues_with` target_new, and the continuations
    (`greedy`: rewrite first). The same for zsRE: its target_new is the answer's text."""
    rows = []                                                      # (case index, category, prompt)
    for i, r in enumerate(requests):
        rows.append((i, "efficacy", r.rewrite_prompt()))
        rows += [(i, "generalization", q) for q in r.paraphrase_prompts]
    targets = [requests[i].target_new for i, _, _ in rows]
    texts = greedy_continuations(m, [p for *_, p in rows], targets, batch_size)
    hits, seen = [{} for _ in requests], [[] for _ in requests]
    for (i, cat, _), text, t in zip(rows, texts, targets):
        hits[i].setdefault(cat, []).append(float(continues_with(text, t)))
        seen[i].append(text)
    return [{"efficacy_generative": _mean(h.get("efficacy", [])),
             "generalization_generative": _mean(h.get("generalization", [])), "greedy": g}
            for h, g in zip(hits, seen)]


# -------------------------------------------------------------------- fluency and consistency
_WORD = re.compile(r"\w+|[^\w\s]")    # a run of word characters, or one punctuation mark
_TERM = re.compile(r"\b\w\w+\b")      # TF-IDF terms: lower-cased words of 2+ characters


def ngram_entropy(text: str, ns=(2, 3), weights=(2 / 3, 4 / 3)) -> float:
    """ROME's fluency of one text: the MEAN over n of weight_n * H_n = (H2 + 2 H3) / 3, with H_n the
    log2 entropy of the text's n-gram frequency distribution. Words: `_WORD` (close to nltk's
    word_tokenize, which ROME uses). LYAPLOCK.md §8 writes the sum (2/3)H2 + (4/3)H3; ROME's code
    and published numbers (~6 per text, ~600 as ×100) use this mean, half of that sum."""
    words = _WORD.findall(text)
    hs = []
    for n, w in zip(ns, weights):
        counts = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
        total = sum(counts.values())
        hs.append(w * -sum(c / total * math.log2(c / total) for c in counts.values()))
    return sum(hs) / len(hs)


def fit_idf(docs: list[str]) -> dict[str, float]:
    """Smoothed IDF over a reference collection: ln((1 + N) / (1 + df)) + 1 (scikit-learn's)."""
    df = Counter(t for d in docs for t in set(_TERM.findall(d.lower())))
    return {t: math.log((1 + len(docs)) / (1 + c)) + 1 for t, c in df.items()}


def tfidf_cosine(a: str, b: str, idf: dict[str, float], unseen: float | None = None) -> float:
    """Cosine of raw-count TF x IDF vectors; a term outside `idf` weighs `unseen` (None: it is
    dropped, as a fitted vectorizer drops it); 0 if a vector is 0."""
    def vector(text):
        counts = Counter(_TERM.findall(text.lower()))
        return {t: c * idf.get(t, unseen) for t, c in counts.items() if t in idf or unseen is not None}
    va, vb = vector(a), vector(b)
    dot = sum(v * vb.get(t, 0.0) for t, v in va.items())
    na, nb = (math.sqrt(sum(v * v for v in x.values())) for x in (va, vb))
    return dot / (na * nb) if na and nb else 0.0


def consistency(texts: list[str], snippets: list[str], idf: dict | None = None) -> float:
    """ROME's consistency: TF-IDF cosine of the joined generations and the joined reference
    snippets. IDF from `idf` (ROME's: fitted on Wikipedia, a vocabulary that drops few words), or
    else fitted on the snippets themselves (each a document): that vocabulary would drop every
    generated word the snippets lack, so off-topic text could not lower the score; such a word
    weighs as a term of document frequency 0, ln(1 + N) + 1."""
    unseen = None if idf is not None else math.log(1 + len(snippets)) + 1
    return tfidf_cosine(" ".join(texts), " ".join(snippets), fit_idf(snippets) if idf is None else idf, unseen)


FLUENCY_TOKENS = 100    # ROME's max_out_len: a generated text's length in tokens, its prompt included


def generate_texts(m, prompts, text_tokens=FLUENCY_TOKENS, top_k=5, seed=0, batch_size=32) -> list[str]:
    """ROME's generate_fast for fluency and consistency: top-k sampling until each text, its prompt
    (and BOS) included, is `text_tokens` tokens long, past any end-of-text token (decoding drops
    it); prompt and continuation decoded together, then NFKD-normalised with each blank line made a
    space, as ROME's; batch j is seeded with seed + j."""
    tok = m.tokenizer
    texts = []
    for j, s in enumerate(range(0, len(prompts), batch_size)):
        seqs = [tok.encode(p) for p in prompts[s:s + batch_size]]
        room = [max(0, text_tokens - len(q)) for q in seqs]
        new = modeling.generate(m, seqs, max(room), top_k=top_k, seed=seed + j, stop_at_eos=False)
        texts += [unicodedata.normalize("NFKD", tok.decode(q + n[:r])).replace("\n\n", " ")
                  for q, n, r in zip(seqs, new, room)]
    return texts


def generation_eval(m, requests: list[Request], snippets: dict | None = None, idf: dict | None = None,
                    text_tokens=FLUENCY_TOKENS, top_k=5, seed=0, batch_size=32) -> list[dict]:
    """Per case: `fluency` (mean ngram_entropy over its generation prompts' texts), `consistency`
    where `snippets` (case_id -> reference texts; 7 and "7" name one case, as JSON's keys are text)
    has the case, and the texts; {} if no prompts."""
    snippets = {str(k): v for k, v in (snippets or {}).items()}
    prompts = [(i, p) for i, r in enumerate(requests) for p in r.generation_prompts]
    texts = generate_texts(m, [p for _, p in prompts], text_tokens, top_k, seed, batch_size)
    per = [[] for _ in requests]
    for (i, _), t in zip(prompts, texts):
        per[i].append(t)
    out = []
    for r, ts in zip(requests, per):
        case = {"fluency": _mean([ngram_entropy(t) for t in ts]), "generations": ts} if ts else {}
        if ts and snippets.get(str(r.case_id)):
            case["consistency"] = consistency(ts, snippets[str(r.case_id)], idf)
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


@dataclass(frozen=True)
class Task:
    """A zero-shot task: its prompt from an item, the class label words, the item's text fields
    (each a string), where its class id is, names for class ids (the NLI file's text labels), and
    whether items hold `choices`, one text per class (MMLU)."""
    prompt: Callable[[dict], str]
    words: tuple[str, ...]
    texts: tuple[str, ...]
    label: str = "label"
    names: dict = field(default_factory=dict)
    choices: bool = False


TASKS = {
    "sst2": Task(lambda x: f"Review: {x['sentence']}\nQuestion: Is this review positive or negative?\nAnswer:",
                 (" negative", " positive"), ("sentence",)),
    "mrpc": Task(lambda x: f"Sentence 1: {x['sentence1']}\nSentence 2: {x['sentence2']}\n"
                           "Question: Do both sentences mean the same thing? Yes or no?\nAnswer:",
                 (" No", " Yes"), ("sentence1", "sentence2")),
    "cola": Task(lambda x: f"Sentence: {x['sentence']}\nQuestion: Is this sentence grammatically correct? "
                           "Yes or no?\nAnswer:", (" No", " Yes"), ("sentence",)),
    "rte": Task(_entail, (" Yes", " No"), ("sentence1", "sentence2")),
    "nli": Task(_entail, (" Yes", " No"), ("sentence1", "sentence2"), names={"entailment": 0, "not_entailment": 1}),
    "mmlu": Task(_mmlu, (" A", " B", " C", " D"), ("question", "subject"), label="answer", choices=True),
}


def class_id(task: Task, x: dict):
    """An item's class id as a whole number: an int, a whole float or a string of digits (as
    datasets write them), or a label name of the task's (the NLI file's); else its value as it is."""
    value = x[task.label]
    if isinstance(value, str):
        digits = value.strip()
        return task.names.get(value, int(digits) if digits.isascii() and digits.isdigit() else value)
    return int(value) if isinstance(value, float) and value.is_integer() else value


def item_problem(task: Task, x) -> str | None:
    """What is wrong with a task's item (a field missing or of the wrong kind, a class id out of
    range), or None."""
    if not isinstance(x, dict):
        return f"a {type(x).__name__}, not an object"
    for f in task.texts:
        if not isinstance(x.get(f), str):
            return f"{f} {x.get(f)!r} is not a text" if f in x else f"lacks the field {f!r}"
    if task.choices and not (isinstance(x.get("choices"), list) and len(x["choices"]) == len(task.words)
                             and all(isinstance(c, str) for c in x["choices"])):
        return f"choices {x.get('choices')!r} is not a list of {len(task.words)} texts"
    if task.label not in x:
        return f"lacks the field {task.label!r}"
    label = class_id(task, x)
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(task.words):
        names = f"; or a label {', '.join(map(repr, task.names))}" if task.names else ""
        return (f"{task.label} {x[task.label]!r} is not a class id 0..{len(task.words) - 1} (the answers "
                f"{', '.join(w.strip() for w in task.words)}, in order{names})")
    return None


def f1_per_class(labels, preds, n_classes) -> list[float]:
    """F1 = 2TP / (2TP + FP + FN) of each class (0 where the class never occurs nor is predicted)."""
    out = []
    for c in range(n_classes):
        tp = sum(l == c and p == c for l, p in zip(labels, preds))
        wrong = sum((l == c) != (p == c) for l, p in zip(labels, preds))   # FP + FN
        out.append(2 * tp / (2 * tp + wrong) if tp + wrong else 0.0)
    return out


def mcc(labels, preds) -> float:
    """Matthews correlation (scikit-learn's multiclass form, (c·s − Σ t_k p_k) / sqrt((s² − Σ p_k²)
    (s² − Σ t_k²)) with t_k, p_k the true and predicted counts of class k, c the correct ones, s all;
    for two classes the binary (TP TN − FP FN) / sqrt(...)); 0 when a margin is empty. A prediction
    −1 (no answer) is a class of its own."""
    s, c = len(labels), sum(l == p for l, p in zip(labels, preds))
    t, p = Counter(labels), Counter(preds)
    chance = sum(t[k] * p[k] for k in t.keys() | p.keys())
    den = math.sqrt((s * s - sum(v * v for v in p.values())) * (s * s - sum(v * v for v in t.values())))
    return (c * s - chance) / den if den else 0.0


def classification_metrics(labels, preds, n_classes) -> dict:
    """accuracy; f1 = support-weighted mean of the classes' F1 (the authors' f1_score(average=
    'weighted')); macro_f1 = the plain mean over the classes that occur or are predicted
    (scikit-learn's average='macro'); mcc for two classes."""
    f1s = f1_per_class(labels, preds, n_classes)
    n = len(labels)
    support = [sum(l == c for l in labels) for c in range(n_classes)]
    seen = sorted(set(labels) | set(preds))
    out = {"n": n, "accuracy": sum(l == p for l, p in zip(labels, preds)) / n,
           "f1": sum(f * s for f, s in zip(f1s, support)) / n,
           "macro_f1": sum(f1s[c] if 0 <= c < n_classes else 0.0 for c in seen) / len(seen)}   # (−1: no answer, F1 0)
    if n_classes == 2:
        out["mcc"] = mcc(labels, preds)
    return out


def read_items(glue_dir, name: str, n_per_task: int, start: int = 0) -> list[dict]:
    """Items start .. start + n_per_task − 1 of `<glue_dir>/<name>.json` (a JSON list of objects),
    each checked (item_problem); a ValueError names the file and what is wrong."""
    task = TASKS[name]
    path = Path(glue_dir) / f"{name}.json"
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read the task's items ({e})") from None
    if not isinstance(items, list):
        raise ValueError(f"{path}: expected a JSON list of items (objects), as in fixtures/glue")
    items = items[start:start + n_per_task]
    if not items:
        raise ValueError(f"{path}: no items" + (f" past the first {start}" if start else ""))
    for i, x in enumerate(items, start):
        if problem := item_problem(task, x):
            raise ValueError(f"{path}: item {i}: {problem}")
    return items


def read_task(glue_dir, name: str, n_per_task: int) -> tuple[list[str], list[int]]:
    """The prompts and class ids of the first n_per_task items of `<glue_dir>/<name>.json`."""
    task = TASKS[name]
    items = read_items(glue_dir, name, n_per_task)
    return [task.prompt(x) for x in items], [class_id(task, x) for x in items]


def general_eval(m, glue_dir, n_per_task: int = 100, tasks=tuple(TASKS), batch_size: int = 64) -> dict:
    """Zero-shot classification on the first `n_per_task` items of each `<task>.json` in glue_dir
    (the items alternate classes, so these are balanced). Headline: f1 for sst2/mrpc/rte/nli,
    mcc for cola, accuracy for mmlu; all metrics are fractions. A prompt longer than the model's
    positions (an MMLU question, for a small model) loses its start, as the edits are held to
    them (M.Config.position_limit; a GPT-2 could not take it)."""
    results = {}
    for name in tasks:
        prompts, labels = read_task(glue_dir, name, n_per_task)
        words = TASKS[name].words
        L = len(words)
        nll = target_nll(m, [p for p in prompts for _ in words], list(words) * len(prompts),
                         batch_size, m.cfg.position_limit[0]).nll_mean.view(-1, L)            # (n, L)
        results[name] = classification_metrics(labels, nll.argmin(1).tolist(), L)
    return results


# The authors' glue_eval (wpwpwpyo/LyapLock @ c5e6186, glue_eval/<task>_eval.py, as their
# experiments/evaluate.py calls it: 0 shots, 100 tests, 5 generated tokens): items 10.. of each
# set (load_data_split keeps 0..9 for few-shot); `f1`, `mcc`, `accuracy` from the answer parsed in
# a greedy generation (−1 where none is found: wrong); `f1_new`, `accuracy_new` from the answer
# words' probabilities (LYAPLOCK.md §8 lists how this differs from general_eval).
AUTHORS_FIRST_ITEM = 10        # their FEW_SHOT_TEST_SPLIT
AUTHORS_NEW_TOKENS = 5         # GLUEEval.evaluate's gen_len, which every task's evaluate is given


@dataclass(frozen=True)
class AuthorsTask:
    """A task as their <task>_eval.py scores it: its prompt, the answer words in their order and
    the class each stands for, the class of their answer_new where no word's probability is above
    the others' (chosen_answer), the item's class from its class id (general_eval's), and the parse of a greedy
    generation: the text after the last `marker` (None: the generation less the prompt),
    lower-cased, gives the class of the first of `parse`'s texts found in it, else −1."""
    prompt: Callable[[dict], str]
    words: tuple[str, ...]
    classes: tuple[int, ...]
    tie: int
    label: Callable[[int], int]
    marker: str | None
    parse: tuple[tuple[str, int], ...]


def _authors_mmlu(x):
    choices = "".join(f"({'ABCD'[k]}) {c}\n" for k, c in enumerate(x["choices"]))
    return "Question: " + x["question"] + "\n" + choices + "Answer:"


_same = lambda c: c
AUTHORS_TASKS = {
    "sst2": AuthorsTask(lambda x: "Review :" + x["sentence"] + "\nSentiment :", ("positive", "negative"), (1, 0), 0,
                        _same, "Sentiment :", (("positive", 1), ("negative", 0))),
    "mrpc": AuthorsTask(lambda x: f"Are the sentences paraphrases of each other.\nSentence 1: {x['sentence1']}\n"
                                  f"Sentence 2: {x['sentence2']}\nAnswer:", ("Yes", "No"), (1, 0), 0, _same, "Answer:",
                        (("yes", 1), ("no", 0))),
    "cola": AuthorsTask(lambda x: f"Is this sentence linguistically acceptable?\nSentence: {x['sentence']}\nAnswer: ",
                        ("Yes", "No"), (1, 0), 0, _same, "Answer:", (("yes", 1), ("no", 0))),
    "rte": AuthorsTask(lambda x: f"{x['sentence1']}\nquestion: {x['sentence2']} True or False?\nanswer:",
                       ("True", "False"), (1, 0), 0, _same, "answer:", (("false", 0), ("true", 1))),  # (GLUE: 1 = not)
    "nli": AuthorsTask(lambda x: f"{x['sentence1']} entails the {x['sentence2']} True or False? Answer:",
                       ("True", "False"), (1, 0), 0, lambda c: 1 - c, "True or False? Answer:",   # entailment: 1
                       (("true", 1), ("false", 0))),
    "mmlu": AuthorsTask(_authors_mmlu, ("A", "B", "C", "D"), (0, 1, 2, 3), -1, _same, None,
                        (("a\n", 0), ("b\n", 1), ("c\n", 2), ("d\n", 3))),
}


@torch.no_grad()
def word_probabilities(m, prompts, words, batch_size: int = 32) -> list[list[float]]:
    """Their suffix probabilities: exp(−mean NLL) of " word"'s ids (tokenised alone, without what
    the tokenizer puts first), read after the prompt's own length in the ids of the joint text
    "prompt word" (their `logits[0, prefix_tok_len + j − 1]` after dropping the BOS: the joint
    ids are scored as they are, whatever their boundary), summed in float64 as .item() sums.
    Joint ids past the model's positions lose their start (cut_start)."""
    tok, limit = m.tokenizer, m.cfg.position_limit[0]
    lead = len(tok.lead)
    pairs = [(p, w) for p in prompts for w in words]
    probs = []
    for s in range(0, len(pairs), batch_size):
        chunk = pairs[s:s + batch_size]
        whole = [tok.encode(f"{p} {w}") for p, w in chunk]
        seqs = [cut_start(q, lead, limit) for q in whole]
        suffix = [tok.encode(f" {w}", bos=False) for _, w in chunk]
        starts = [lead + len(tok.encode(p, bos=False)) - 1 - (len(q) - len(c))       # (less what the cut dropped)
                  for (p, _), q, c in zip(chunk, whole, seqs)]
        K = max(map(len, suffix))      # (a joint text of fewer ids than prompt and word, where theirs would fail
        at = torch.tensor([[min(a + j, len(q) - 1) for j in range(K)] for a, q in zip(starts, seqs)])   # : its last)
        ids, mask = tok.pad(seqs, side="right", device=_device(m))
        logp = m(ids, mask, logits_at=at.to(ids.device)).logits.float().log_softmax(-1).cpu()     # (B, K, V)
        for b, t in enumerate(suffix):
            nll = math.fsum(-float(logp[b, j, t[j]]) for j in range(len(t))) / len(t)
            probs.append(math.exp(-nll))
    return [probs[i:i + len(words)] for i in range(0, len(probs), len(words))]


RIVALS = {2: ((1,), (0,)), 4: ((1, 2, 3), (0, 2, 3), (1, 0, 3), (1, 2, 0))}   # max_prob_suffix's max() orders


def chosen_answer(task: AuthorsTask, probs: list[float]) -> int:
    """Their answer_new: the class of the first word whose probability is above the max() of the
    others' in their order (`1 if p0 > p1 else 0`; MMLU's max_prob_suffix: `p_c > max(p_b, p_a,
    p_d)` ...), else `tie`. The order matters with a NaN: max(nan, x) is nan, max(x, nan) is x."""
    return next((c for k, c in enumerate(task.classes)
                 if probs[k] > max(probs[i] for i in RIVALS[len(probs)][k])), task.tie)


def parsed_answer(task: AuthorsTask, prompt_text: str, text: str) -> int:
    """Their _get_answer on the decoded generation (prompt included)."""
    answer = (text.split(task.marker)[-1] if task.marker else text.replace(prompt_text, "")).lower()
    return next((c for t, c in task.parse if t in answer), -1)


def authors_answers(m, name: str, items: list[dict], batch_size: int = 32) -> dict:
    """Their answers to a task's items: `continuations` (their generated_text less the prompt),
    `parsed` (their answer; −1: none), `probs` (their prob_<word>s, in the words' order) and
    `chosen` (their answer_new). A prompt too long for the model loses its start (cut_start;
    theirs is not cut)."""
    task, tok = AUTHORS_TASKS[name], m.tokenizer
    seqs = [cut_start(tok.encode(task.prompt(x)), len(tok.lead), m.cfg.position_limit[0] - AUTHORS_NEW_TOKENS)
            for x in items]
    new = []
    for s in range(0, len(seqs), batch_size):
        new += modeling.generate(m, seqs[s:s + batch_size], AUTHORS_NEW_TOKENS)
    prompts, texts = [tok.decode(q) for q in seqs], [tok.decode(q + n) for q, n in zip(seqs, new)]
    probs = word_probabilities(m, [task.prompt(x) for x in items], task.words, batch_size)
    chosen = [chosen_answer(task, ps) for ps in probs]
    return dict(continuations=[t.replace(p, "") for p, t in zip(prompts, texts)],
                parsed=[parsed_answer(task, p, t) for p, t in zip(prompts, texts)], probs=probs, chosen=chosen)


def authors_general_eval(m, glue_dir, n_per_task: int = 100, tasks=tuple(AUTHORS_TASKS), batch_size: int = 32) -> dict:
    """General ability as the authors' glue_eval scores it (AuthorsTask), on items 10 ..
    9 + n_per_task of each task file: f1 (weighted), mcc and accuracy of the parsed answers
    (`invalid`: how many had none), f1_new and accuracy_new of the answer words'
    probabilities; every metric a fraction."""
    results = {}
    for name in tasks:
        task = AUTHORS_TASKS[name]
        items = read_items(glue_dir, name, n_per_task, AUTHORS_FIRST_ITEM)
        labels = [task.label(class_id(TASKS[name], x)) for x in items]
        answers = authors_answers(m, name, items, batch_size)
        parsed, chosen = answers["parsed"], answers["chosen"]
        by_generation = classification_metrics(labels, parsed, len(task.words))
        by_words = classification_metrics(labels, chosen, len(task.words))
        results[name] = dict(n=len(items), f1=by_generation["f1"], mcc=mcc(labels, parsed),
                             accuracy=by_generation["accuracy"], invalid=parsed.count(-1),
                             f1_new=by_words["f1"], accuracy_new=by_words["accuracy"])
    return results


GENERAL = {"likelihood": general_eval, "authors": authors_general_eval}    # --glue-protocol
PROTOCOL_NAMES = {"likelihood": "this code's prompts", "authors": "the authors' glue_eval"}     # in the report


# ------------------------------------------------------------------------------- perplexity
@torch.no_grad()
def perplexity(m, texts, max_len: int = 256, batch_size: int = 16) -> float:
    """exp(total NLL / number of predicted tokens) over texts, each encoded alone after what the
    tokenizer puts first (its template's lead: GLM's [gMASK]<sop>), else its BOS where it has one
    (GPT-2's), and cut to `max_len` tokens; texts under 2 tokens are skipped."""
    tok = m.tokenizer
    max_len = min(max_len, m.cfg.position_limit[0])      # (a GPT-2 of fewer positions could not take it)
    seqs = [tok.encode(t, bos=None if tok.lead else tok.bos_id is not None)[:max_len] for t in texts]
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
    mean = total / count
    return math.exp(mean) if mean < 709.0 else math.inf         # (a collapsed model's: inf, not an OverflowError)


# -------------------------------------------------------------------------------- summaries
METRICS = ("efficacy", "generalization", "specificity")
GENERATIVE = ("efficacy_generative", "generalization_generative")
TOP1 = tuple(k + "_top1" for k in METRICS) + ("locality_top1",)    # teacher-forced token accuracy; EasyEdit's locality
EXTRA = tuple(k + "_magnitude" for k in METRICS) + ("fluency", "consistency")
HEADER = ("method", "model", "n_edits", "batch_size")


def summarize(cases: list[dict]) -> dict:
    """Means over cases ×100 of the metrics present (a case's None is left out); `score` is the
    harmonic mean of efficacy, generalization and specificity (×100 already), CounterFact's (the
    authors' summarize.py scores zsRE without one); the generative efficacy and generalization
    (generative_eval) follow it, where the cases have them."""
    out = {"n_cases": len(cases)}
    for k in METRICS + GENERATIVE + TOP1 + EXTRA:
        vals = [c[k] for c in cases if c.get(k) is not None]
        if vals:
            out[k] = 100 * sum(vals) / len(vals)
    if all(k in out for k in METRICS) and not any(c.get("kind") == "zsre" for c in cases):
        parts = [out[k] for k in METRICS]
        out["score"] = 0.0 if min(parts) <= 0 else len(parts) / sum(1 / v for v in parts)
    order = ["n_cases", *METRICS, "score", *GENERATIVE, *TOP1, *EXTRA]
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


# ------------------------------------------------------------------------------------ figures
def _esc(text) -> str:
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf", "#7f7f7f"]
DASHES = ["", "6,3", "2,2", "8,3,2,3"]       # one per cycle through the palette, then longer dashes
CHAR_W = 6.6                                 # a generous estimate of one character's width at 11 px


def series_style(i: int) -> tuple[str, str]:
    """The i-th series' (colour, dash pattern): the palette, then the palette again with the next
    dash ("" is solid), so no two series of a figure look alike."""
    cycle = i // len(PALETTE)
    dash = DASHES[cycle] if cycle < len(DASHES) else f"{3 * cycle},3"
    return PALETTE[i % len(PALETTE)], dash


def svg_frame(w, h, title: str, font: int, top: float, bottom: float, xlabel=None, ylabel=None) -> list[str]:
    """An SVG chart's first lines: the white page, the title, the axes from `top` to `bottom` (x at
    60 to w - 20) and, given, their labels."""
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" '
           f'font-size="{font}"><rect width="{w}" height="{h}" fill="white"/>',
           f'<text x="{w / 2}" y="16" text-anchor="middle" font-size="13">{_esc(title)}</text>',
           f'<line x1="60" y1="{bottom}" x2="{w - 20}" y2="{bottom}" stroke="black"/>',
           f'<line x1="60" y1="{top}" x2="60" y2="{bottom}" stroke="black"/>']
    if xlabel is not None:
        out += [f'<text x="{w / 2}" y="{h - 8}" text-anchor="middle">{_esc(xlabel)}</text>',
                f'<text x="14" y="{h / 2}" transform="rotate(-90 14 {h / 2})" text-anchor="middle">'
                f'{_esc(ylabel)}</text>']
    return out


def svg_plot(series: dict, title: str, ylabel: str, hline: float | None = None, w=560, h=300) -> str:
    """A small line plot as SVG text: series name -> (xs, ys); an optional dashed threshold D.
    The legend sits below the title in columns as wide as the longest label (the figure widens
    for a label longer than it); each legend row added beyond the first makes the figure taller,
    so the plot area keeps its size. A point that is not finite (a collapsed model's perplexity)
    breaks its line there and is left out of the axes."""
    runs = {k: [[]] for k in series}                   # each series' runs of finite points
    for k, (x, y) in series.items():
        for a, b in zip(x, y):
            if math.isfinite(a) and math.isfinite(b):
                runs[k][-1].append((a, b))
            elif runs[k][-1]:
                runs[k].append([])
    hline = hline if hline is not None and math.isfinite(hline) else None
    xs = [a for r in runs.values() for run in r for a, _ in run] or [0.0]
    ys = [b for r in runs.values() for run in r for _, b in run] + ([hline] if hline is not None else []) or [0.0]
    x0, x1, y0 = min(xs), max(xs), min(0.0, min(ys))
    y1 = max(ys) * 1.05 if max(ys) > 0 else 0.0 if y0 < 0 else 1.0
    col = 28 + CHAR_W * max(len(str(k)) for k in series) + 16          # line sample, label, gap
    w = max(w, int(70 + col + 10))
    ncol = max(1, int((w - 80) // col))
    rows = (len(series) + ncol - 1) // ncol
    top, h = 36 + 14 * rows, h + 14 * max(rows - 1, 0)          # below the title and the legend's rows
    px = lambda x: 60 + (x - x0) / max(x1 - x0, 1e-12) * (w - 80)
    py = lambda y: h - 40 - (y - y0) / max(y1 - y0, 1e-12) * (h - 40 - top)
    out = svg_frame(w, h, title, 11, top, h - 40, "edits", ylabel)
    for v in (y0, (y0 + y1) / 2, y1):
        out.append(f'<text x="55" y="{py(v) + 4:.1f}" text-anchor="end">{v:.3g}</text>')
    for v in (x0, x1):
        out.append(f'<text x="{px(v):.1f}" y="{h - 26}" text-anchor="middle">{v:.0f}</text>')
    if hline is not None:
        out.append(f'<line x1="60" y1="{py(hline):.1f}" x2="{w - 20}" y2="{py(hline):.1f}" stroke="gray" '
                   f'stroke-dasharray="5,4"/>')
        out.append(f'<text x="{w - 22}" y="{py(hline) - 4:.1f}" text-anchor="end">D</text>')
    for i, (name, parts) in enumerate(runs.items()):
        c, dash = series_style(i)
        style = f'stroke="{c}" stroke-width="1.6"' + (f' stroke-dasharray="{dash}"' if dash else "")
        for run in filter(None, parts):
            pts = " ".join(f"{px(a):.1f},{py(b):.1f}" for a, b in run)
            out.append(f'<polyline points="{pts}" fill="none" {style}/>')
        lx, ly = 70 + col * (i % ncol), 34 + 14 * (i // ncol)
        out.append(f'<line x1="{lx:.0f}" y1="{ly - 4}" x2="{lx + 22:.0f}" y2="{ly - 4}" {style}/>')
        out.append(f'<text x="{lx + 28:.0f}" y="{ly}" fill="{c}">{_esc(name)}</text>')
    return "\n".join(out + ["</svg>"])


def svg_bars(values: dict, title: str, w=560, h=300) -> str:
    """Grouped bars as SVG text: metric -> (before, after), each on 0..100 (None: no bar)."""
    colors, n = ("#7f7f7f", "#1f77b4"), max(len(values), 1)
    py = lambda y: h - 60 - max(0.0, min(y, 100.0)) / 100 * (h - 110)
    gw = (w - 80) / n
    out = svg_frame(w, h, title, 10, 50, h - 60)
    for v in (0, 50, 100):
        out.append(f'<text x="55" y="{py(v) + 4:.1f}" text-anchor="end">{v}</text>')
    for i, (name, pair) in enumerate(values.items()):
        for j, v in enumerate(pair):
            if v is not None:
                x = 60 + i * gw + gw * (0.15 + 0.35 * j)
                out.append(f'<rect x="{x:.1f}" y="{py(v):.1f}" width="{gw * 0.33:.1f}" '
                           f'height="{h - 60 - py(v):.1f}" fill="{colors[j]}"/>')
        out.append(f'<text x="{60 + (i + 0.5) * gw:.1f}" y="{h - 46}" text-anchor="middle">'
                   f'{_esc(name)}</text>')
    out += [f'<text x="70" y="34" fill="{colors[0]}">before</text>',
            f'<text x="130" y="34" fill="{colors[1]}">after</text>']
    return "\n".join(out + ["</svg>"])


# ------------------------------------------------------------------ the audit of theorem T1
GROWING = 0.02      # z rising more than this per step over the last half: "grows linearly"
ROUNDING = 1e-9     # relative float tolerance of the bound and of the replayed queue


def slope(ys) -> float:
    """Least-squares slope of ys against 0, 1, 2, ... (per step); 0 for fewer than 2 points."""
    n = len(ys)
    if n < 2:
        return 0.0
    xm, ym = (n - 1) / 2, sum(ys) / n
    return sum((x - xm) * (y - ym) for x, y in enumerate(ys)) / sum((x - xm) ** 2 for x in range(n))


def last_half(ys) -> list:
    """The steps a trend is fitted on: the last half, at least the last 3."""
    return ys[-max(3, len(ys) // 2):]


def replay_error(pl: list[float], z: list[float], D: float) -> float:
    """Largest gap between the logged queue z and E14 replayed on the logged PL from z = 1 (inf
    where a logged value is not finite: no replay holds it)."""
    if not all(map(math.isfinite, [*pl, *z])):
        return math.inf
    replay, error = 1.0, 0.0
    for p, zt in zip(pl, z):
        replay = max(replay + p / D - 1, 1.0)                                 # E14
        error = max(error, abs(replay - zt))
    return error


def queue_trend(z: list[float]) -> tuple[str, float]:
    """(trend, slope): "floor" if z = 1 at every step; "new" if the queue left its floor less
    than 3 steps before the end (too early to tell); "growing" if z rose more than GROWING per
    step over the last half; else "stable"."""
    s = slope(last_half(z))
    active = [t for t, v in enumerate(z) if v > 1]
    if not active:
        return "floor", s
    if len(z) - active[0] < 3:
        return "new", s
    return ("growing" if s > GROWING else "stable"), s


def audit_queue(pl: list[float], z: list[float], D: float) -> dict:
    """T1 on one layer's log: pl[t], z[t] are PL(t) and the normalised queue after step t.

    How a run's queue maps onto E13 (lyaplock.feed_queue): step 0 measures PL(0), sets
    D = α·PL(0), a = 1/√D, Z(0) = Zmax = √D (b = 0), and applies E13 already at step 0. So the
    queue after step t is Z(t+1) = max(Z(t) + a(PL(t) − D), Zmax), logged as z[t] = a·Z(t+1), and a
    log of T steps t = 0..T−1 is one sample path of E13 from Z(0). T1 then reads, step 0 included,

        (1/T) Σ_{t=0}^{T−1} PL(t) ≤ D + (Z(T) − Z(0))/(aT),   Z(T) − Z(0) = (z[T−1] − 1)/a,

    so the slack is (z[T−1] − 1)/(a²T) = D·(z[T−1] − 1)/T, with equality when the floor never
    binds. `holds` allows float rounding only (relative ROUNDING); `replay_ok` says the logged z
    is E14 on the logged PL.

    Strong stability is Z(T)/T → 0. `slope`, the least-squares rise of z per step over the last
    half (queue_trend), estimates lim z(T)/T: a weighted mean (weights k(n − k) over the n points,
    heaviest mid-window) of the steps' rises, each PL/D − 1 while the floor does not bind.
    `holds` follows from a log whose z is E14's (it is T1, the telescoped update): it audits the
    log like `replay_ok`; the evidence that the queue does its work is the trend."""
    T = len(pl)
    mean_pl = math.fsum(pl) / T
    slack = D * (z[-1] - 1) / T                                                # T1
    error = replay_error(pl, z, D)
    trend, s = queue_trend(z)
    first = next((t for t, v in enumerate(z) if v > 1), None)
    return dict(queue=True, T=T, mean_pl=mean_pl, D=D, slack=slack, bound=D + slack,
                holds=mean_pl <= (D + slack) * (1 + ROUNDING), z_T=z[-1], z_over_T=z[-1] / T,
                slope=s, trend=trend, first_active=first, max_pl_over_D=max(pl) / D, replay_error=error,
                replay_ok=error <= ROUNDING * max(z))


def audit_pl(pl: list[float]) -> dict:
    """A baseline's layer (no queue): PL's time average, first and last value, and its growth per
    step (least-squares slope over the last half); `grows` when that rises more than 1% of the
    window's mean PL per step."""
    tail = last_half(pl)
    growth = slope(tail)
    return dict(queue=False, T=len(pl), mean_pl=math.fsum(pl) / len(pl), first=pl[0], last=pl[-1],
                growth=growth, grows=growth > 0.01 * sum(tail) / len(tail))


def _close(x: float, y: float) -> bool:
    return abs(x - y) <= ROUNDING * max(abs(x), abs(y))


def check_state(state: dict, audits: dict, steps: list[dict], alpha) -> list[str]:
    """Where the latest checkpoint (state.json) disagrees with the log: steps it did that the log
    lacks; a·Z against the logged z of the step before it, a against 1/√D and α·D_base against D
    (problems, as text)."""
    t = state.get("step", 0) - 1
    problems = []
    if t >= len(steps):                  # the run syncs a step's log line before its checkpoint
        ends = f"the log ends at step {len(steps) - 1}" if steps else "log.jsonl holds no whole step"
        return [f"{ends} but the latest checkpoint is at step {t + 1}: "
                f"{t + 1 - len(steps)} step(s) are missing from log.jsonl (cut or lost); what follows "
                "covers the logged steps only"]
    if t < 0:
        return problems
    for l, q in state.get("layers", {}).items():
        if l not in audits or not audits[l]["queue"] or q.get("Z") is None:
            continue
        D, z = audits[l]["D"], steps[t]["layers"][l]["z"]
        agrees = (_close(q["a"] * q["Z"], z) and _close(q["a"], 1 / math.sqrt(D))
                  and (alpha is None or _close(alpha * q["D_base"], D)))
        if not agrees:
            problems.append(f"layer {l}: the checkpoint's queue (step {t + 1}) disagrees with the log")
    return problems


# --------------------------------------------------------------------------- a run's report
def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):             # (unreadable, not UTF-8, not JSON)
        return None


@dataclass
class Run:
    """What a run directory holds, read as it is (finished, in progress or interrupted)."""
    dir: Path
    hparams: dict
    steps: list           # log entries of steps 0..T−1 (the contiguous prefix of log.jsonl)
    left_out: int         # log lines not used (torn, unreadable or past a gap)
    ability: list         # ability.jsonl entries
    before: dict | None   # editing metrics before (×100): summary.json's "pre", or cases_pre.jsonl
    after: dict | None    # after: summary.json, or cases.jsonl
    finished: bool        # summary.json exists
    stop: dict | None     # stop.json: where --stop-below ended the run
    state: dict | None    # the latest checkpoint's state.json
    protocol: str = "likelihood"   # how general ability was scored (--glue-protocol)
    unresumable: str | None = None  # why the checkpoint latest.json names cannot be resumed from
    relogged: int = 0     # earlier lines of steps logged again (the later line is read)


def read_run(run_dir) -> Run:
    """Read a run directory; only config.json is required."""
    d = Path(run_dir)
    if not d.is_dir():
        raise ValueError(f"{d}: " + ("a file, not a run directory" if d.exists() else "no such run directory"))
    if (d / "result.json").exists() and (d / "table.md").exists() and not (d / "config.json").exists():
        raise ValueError(f"{d}: a testbed report (its table.md and figures are the report), not a run directory")
    config = _read_json(d / "config.json")
    if not isinstance(config, dict):
        raise ValueError(f"{d}: not a run directory (no readable config.json)")
    if not isinstance(config.get("hparams"), dict):         # a model checkpoint's config.json, say
        raise ValueError(f"{d}: not a run directory (its config.json holds no run settings: hparams)")
    entries, torn = read_jsonl(d / "log.jsonl")
    by_step = {e.get("step"): e for e in entries}          # a step logged twice: the later line
    steps = []
    while len(steps) in by_step:
        steps.append(by_step[len(steps)])
    summary = _read_json(d / "summary.json")
    cases_pre, _ = read_jsonl(d / "cases_pre.jsonl")
    cases, _ = read_jsonl(d / "cases.jsonl")
    state, unresumable = None, None
    if (d / "latest.json").exists():
        import lyaplock                                    # (here: lyaplock imports this module)
        try:
            state, unresumable = lyaplock.read_checkpoint_headers(lyaplock.latest_checkpoint(d)), None
        except ValueError as e:
            unresumable = str(e)
    return Run(dir=d, hparams=config["hparams"], steps=steps,
               left_out=torn + len(by_step) - len(steps), relogged=len(entries) - len(by_step),
               ability=read_jsonl(d / "ability.jsonl")[0],
               before=summary.get("pre") if summary else summarize(cases_pre) if cases_pre else None,
               after=summary if summary else summarize(cases) if cases else None,
               finished=summary is not None, stop=_read_json(d / "stop.json"), state=state,
               protocol=str(config.get("glue_protocol", "likelihood")), unresumable=unresumable)


def run_layers(run: Run) -> list[str]:
    return sorted(run.steps[0]["layers"], key=int) if run.steps else []


def calibration(rows: list[dict]) -> int | None:
    """The step a layer's queue was calibrated at: its first logged D (None for the baselines, with
    no queue, and for a queue not calibrated yet: lyaplock.feed_queue waits for a step that moves
    the layer). `rows`: the layer's log entries, step by step."""
    return next((t for t, r in enumerate(rows) if r.get("D") is not None), None)


def audit_run(run: Run) -> dict:
    """{layer: audit_queue or audit_pl} over the run's logged steps ({} before step 0 is logged)."""
    audits = {}
    for l in run_layers(run):
        rows = [s["layers"][l] for s in run.steps]
        pl = [r["pl"] for r in rows]
        start = calibration(rows)                    # the queue's path begins there
        if start is None:                            # a baseline, or a queue not calibrated yet (z logged)
            audits[l] = audit_pl(pl) | dict(uncalibrated=any(r.get("z") is not None for r in rows))
            continue
        audits[l] = audit_queue(pl[start:], [r["z"] for r in rows[start:]], rows[start]["D"])
        if audits[l]["first_active"] is not None:
            audits[l]["first_active"] += start               # a step of the run, not of the path
    return audits


def queue_findings(audits: dict) -> list[str]:
    """The verdict's lines on the layers with a queue whose log is E14's (verdict names the others)."""
    out = []
    joined = lambda ls: ", ".join(ls)
    of = lambda trend: [l for l, a in audits.items() if a["queue"] and a["holds"] and a["replay_ok"]
                        and a["trend"] == trend]
    if grow := of("growing"):
        rates = ", ".join(f"+{audits[l]['slope']:.3g}/step on layer {l}" for l in grow)
        out.append(f"the queue grows linearly on layer(s) {joined(grow)} (z {rates}: PL runs above D by "
                   "that fraction each step): the budget α·D_base is below what these edits need; raise "
                   "--alpha, or expect the edits to lose ground to preservation as z·λ keeps rising")
    if new := of("new"):
        first = min(audits[l]["first_active"] for l in new)
        out.append(f"the queue has only just left its floor on layer(s) {joined(new)} (step {first}): "
                   "too early to tell whether it holds PL at D; run longer")
    if ok := of("stable") + of("floor"):
        at_floor = of("floor")
        top = max([audits[l]["max_pl_over_D"] for l in at_floor], default=0.0)
        floor = f"PL ≤ D at every step, at most {top:.3g}·D"
        kind = "strongly stable" if of("stable") else f"at its floor ({floor})"
        mixed = f" (at its floor on {joined(at_floor)}: {floor})" if of("stable") and at_floor else ""
        parts = "; ".join(f"layer {l}: time-average PL {audits[l]['mean_pl']:.4g} ≤ D {audits[l]['D']:.4g}"
                          f" + slack {audits[l]['slack']:.3g}" for l in ok)
        out.append(f"the queue is {kind} on layer(s) {joined(ok)}{mixed} and T1's bound holds: {parts}")
    return out


def baseline_findings(audits: dict, method) -> list[str]:
    """The verdict's line on the layers without a queue."""
    base = [l for l, a in audits.items() if not a["queue"]]
    if not base:
        return []
    grows = [l for l in base if audits[l]["grows"]]
    what = f"PL grows on layer(s) {', '.join(grows)} with nothing to bound it" if grows else "PL is flat"
    parts = "; ".join(f"layer {l}: {audits[l]['first']:.3g} → {audits[l]['last']:.3g}, "
                      f"{audits[l]['growth']:+.3g}/step" for l in base)
    if any(audits[l].get("uncalibrated") for l in base):
        return [f"queue not calibrated yet ({method}: it waits for a step that moves the layer): {what} ({parts})"]
    return [f"no queue ({method}): {what} ({parts})"]


def verdict(run: Run, audits: dict) -> list[str]:
    """Short findings a reader can act on, the most urgent first: the stop, a log that breaks
    E13 or disagrees with its checkpoint, then the queues and the baselines' PL."""
    out = []
    if s := run.stop:
        where = "the stream ended" if s.get("end") else "the run stopped"
        out.append(f"{where} at step {s['step']} ({s['edits']} edits), the collapse point: its "
                   f"{s['metric']} {s['value']:.4g} fell below {s['threshold']:.4g} (--stop-below "
                   f"{s['threshold'] / s['before']:.4g} × its {s['before']:.4g} before editing)")
    if bad := [l for l, a in audits.items() if a["queue"] and not (a["holds"] and a["replay_ok"])]:
        out.append(f"the log breaks E13/T1 on layer(s) {', '.join(bad)} (see the table): the queue in the "
                   "log is not the one E14 gives on the logged PL; the run is not trustworthy")
    if run.state:
        out += check_state(run.state, audits, run.steps, run.hparams.get("alpha"))
    out += queue_findings(audits) + baseline_findings(audits, run.hparams.get("method", "baseline"))
    return out or ["nothing to audit yet: no editing step is logged"]


def headline_of(task: str) -> str:
    """The zero-shot task's headline metric (general_eval): mcc for CoLA, accuracy for MMLU, else f1."""
    return {"cola": "mcc", "mmlu": "accuracy"}.get(task, "f1")


def layer_figures(run: Run) -> dict:
    """{file name: SVG}: PL per layer (D dashed where there is a queue) and the queues."""
    figs = {}
    x = [s["edits"] for s in run.steps]
    column = lambda l, key: [s["layers"][l][key] for s in run.steps]
    for l in run_layers(run):
        rows = [s["layers"][l] for s in run.steps]
        D = rows[start]["D"] if (start := calibration(rows)) is not None else None
        title = f"preservation loss, layer {l}" + (" (dashed: threshold D)" if D else "")
        figs[f"pl_layer{l}.svg"] = svg_plot({"PL": (x, column(l, "pl"))}, title, "PL", D)
    queues = [l for l in run_layers(run) if run.steps[0]["layers"][l].get("z") is not None]
    if queues:
        figs["queue.svg"] = svg_plot({f"layer {l}": (x, column(l, "z")) for l in queues},
                                     "virtual queue z = a·Z (its weight on preservation is z·λ)", "z")
    return figs


def ability_figures(run: Run) -> dict:
    """{file name: SVG}: perplexity and each zero-shot task's headline metric over the edits."""
    entries = [e for e in run.ability if "perplexity" in e]
    figs = {}
    if entries:
        x = [e["edits"] for e in entries]
        figs["perplexity.svg"] = svg_plot({"perplexity": (x, [e["perplexity"] for e in entries])},
                                          "held-out perplexity", "perplexity")
    general = [e for e in entries if e.get("general")]
    if general:
        x = [e["edits"] for e in general]
        tasks = list(general[0]["general"])
        series = {f"{t} {headline_of(t)}": (x, [e["general"][t][headline_of(t)] for e in general])
                  for t in tasks}
        by = "" if run.protocol == "likelihood" else f" ({PROTOCOL_NAMES.get(run.protocol, run.protocol)})"
        figs["general.svg"] = svg_plot(series, "zero-shot general ability" + by, "score")
    return figs


def metrics_figure(run: Run) -> dict:
    """{file name: SVG}: the editing metrics (×100) before and after, as bars."""
    before, after = run.before or {}, run.after or {}
    keys = [k for k in (*METRICS, "score", *GENERATIVE) if k in before or k in after]
    if not keys:
        return {}
    bars = {k.replace("_generative", " (gen.)"): (before.get(k), after.get(k)) for k in keys}
    return {"metrics.svg": svg_bars(bars, "editing metrics (×100), before and after")}


def audit_table(audits: dict) -> list[str]:
    """The audit as markdown table rows (queue layers, then baseline layers)."""
    g = lambda v: f"{v:.4g}"
    rows = []
    if queue := {l: a for l, a in audits.items() if a["queue"]}:
        rows += ["| layer | steps T | time-average PL | D | slack D(z(T)−1)/T | bound holds | z(T) | "
                 "z(T)/T | z slope, last half | queue |", "|---|---|---|---|---|---|---|---|---|---|"]
        for l, a in queue.items():
            holds = ("yes" if a["holds"] else "NO") + ("" if a["replay_ok"] else " (log ≠ E14 replay)")
            rows.append(f"| {l} | {a['T']} | {g(a['mean_pl'])} | {g(a['D'])} | {a['slack']:.3g} | {holds} | "
                        f"{a['z_T']:.3f} | {a['z_over_T']:.3g} | {a['slope']:+.3g}/step | {a['trend']} |")
    if base := {l: a for l, a in audits.items() if not a["queue"]}:
        if queue:                            # (a layer whose queue waits for a step that moves it)
            rows += ["", "Not calibrated yet (no D: T1 applies from the step that calibrates the queue):", ""]
        rows += ["| layer | steps T | time-average PL | PL at step 0 | PL now | growth, last half |",
                 "|---|---|---|---|---|---|"]
        rows += [f"| {l} | {a['T']} | {g(a['mean_pl'])} | {g(a['first'])} | {g(a['last'])} | "
                 f"{a['growth']:+.3g}/step |" for l, a in base.items()]
    return rows


def metrics_table(run: Run) -> list[str]:
    """Markdown rows: the editing metrics, perplexity and the zero-shot headlines, before and after."""
    before, after = flat(run.before or {}), flat(run.after or {})
    tasks = sorted({k.split(".")[1] for k in {**before, **after} if k.startswith("general.")})
    keys = [*METRICS, "score", *GENERATIVE, *TOP1, *EXTRA, "perplexity"]
    keys += [f"general.{t}.{headline_of(t)}" for t in tasks]
    fmt = lambda v: "" if v is None else f"{v:.2f}"
    rows = ["| metric | before | after |", "|---|---|---|"]
    return rows + [f"| {k} | {fmt(before.get(k))} | {fmt(after.get(k))} |"
                   for k in keys if k in before or k in after]


def run_header(run: Run) -> list[str]:
    hp = run.hparams
    T = len(run.steps)
    edits = run.steps[-1]["edits"] if run.steps else 0
    status = "finished" if run.finished else "summary.json is unreadable" if (run.dir / "summary.json").exists() \
        else "in progress or interrupted (no summary.json yet)"
    import lyaplock                         # (here: lyaplock imports this module)
    method = hp.get("method")
    known = method in lyaplock.METHODS
    read = [f"{sign} {hp.get(name)}, " for name, sign in (("lam", "λ"), ("alpha", "α"), ("l2", "L2"),
                                                              ("nullspace_threshold", "null-space threshold"))
            if known and name in hp and not lyaplock.unread(method, name)]   # what the method reads
    lines = [f"- method {method}, layers {hp.get('layers')}, {''.join(read)}batch size {hp.get('batch_size')}",
             f"- {status}: {T} steps logged, {edits} edits"
             + (f"; {run.left_out} log line(s) left out (torn or past a gap)" if run.left_out else "")
             + (f"; {run.relogged} step(s) logged again (the later line read)" if run.relogged else "")
             + (f"; latest checkpoint at step {run.state['step']}" if run.state else "")]
    if fit := fit_line(run.steps, hp.get("v_num_grad_steps")):
        lines.append(fit)
    if run.unresumable:
        lines.append(f"- its latest checkpoint cannot be resumed from: {run.unresumable}")
    if run.protocol != "likelihood" and run.ability and "general" in run.ability[0]:
        lines.append(f"- general ability scored as {PROTOCOL_NAMES.get(run.protocol, run.protocol)} (--glue-protocol "
                     f"{run.protocol}): headlines F1 of the parsed answers, CoLA's MCC, MMLU's accuracy")
    if run.stop:
        how = "below --stop-below at the end of the stream" if run.stop.get("end") else "stopped by --stop-below"
        lines.append(f"- {how} at step {run.stop['step']} ({run.stop['edits']} edits): the collapse point")
    return lines


def fit_line(steps: list[dict], passes_max) -> str | None:
    """The target values' fit (E4) from the log's z_loss and z_passes, where it has them (runs before
    they were logged have not): the mean last loss at the first and the last step, and the passes."""
    fits = [s for s in steps if "z_loss" in s]
    if not fits:
        return None
    import lyaplock                         # (here: lyaplock imports this module)
    passes = sum(s["z_passes"] for s in fits) / len(fits)
    return (f"- target values (E4): mean final loss {fits[0]['z_loss']:.3g} at the first step, "
            f"{fits[-1]['z_loss']:.3g} at the last (a request stops below {lyaplock.STOP_LOSS:g}); {passes:.3g}"
            + (f" of {passes_max}" if passes_max else "") + " passes per request on average")


def report(run_dir) -> str:
    """Read a run directory (finished, in progress or interrupted), write its figures (SVG) and
    report.md into it, and return the report's text: status, verdict, the audit of T1 per layer
    (audit_queue; audit_pl for the baselines), the figures and the metrics before and after."""
    run = read_run(run_dir)
    audits = audit_run(run)
    figs = layer_figures(run) | ability_figures(run) | metrics_figure(run)
    unwritten = None
    try:
        for name, svg in figs.items():
            (run.dir / name).write_text(svg)
    except OSError as e:                  # a run directory on a read-only mount: the text all the same
        unwritten = f"- not written into {run.dir} ({e.strerror}): report.md and some or all of the figures"
    lines = [f"# Run report: {run.dir}", "", *run_header(run), *([unwritten] if unwritten else []), "",
             "## Verdict", ""]
    lines += [f"- {v}" for v in verdict(run, audits)]
    if audits and not any(a["queue"] for a in audits.values()):
        why = ("Its queue is not calibrated yet (it waits for a step that moves the layer): theorem T1 applies "
               "from that step on" if any(a.get("uncalibrated") for a in audits.values()) else
               "This method keeps no queue: theorem T1 does not apply")
        lines += ["", "## Preservation loss per layer", "", f"{why}; its PL per edit layer, as logged:", ""]
        lines += audit_table(audits)
    elif audits:
        lines += ["", "## Audit of theorem T1 (docs/LYAPLOCK.md §6–7)", "",
                  "T1 on this log: (1/T) Σ_{t=0}^{T−1} PL(t) ≤ D + (Z(T) − Z(0))/(aT) = D + D·(z(T) − 1)/T, "
                  "z(T) the normalised queue after the last step. Strongly stable: z(T)/T → 0; a "
                  f"steady rise of z (slope > {GROWING}/step over the last half) means the budget cannot "
                  "be met.", ""]
        lines += audit_table(audits)
    lines += ["", "## Figures", ""] + [f"![{name[:-4]}]({name})" for name in figs]
    if run.before or run.after:
        where = "all of them: summary.md" if run.finished else "after: when the run finishes, in summary.md"
        lines += ["", f"## Metrics before and after editing ({where})", ""]
        lines += metrics_table(run)
    text = "\n".join(lines) + "\n"
    if not unwritten:
        (run.dir / "report.md").write_text(text)
    return text
