"""Tests of eval.py: the editing metrics against hand computations on a model we control, and the
general-ability measures on the real checkpoint. Run: python -m pytest -q test_eval.py"""
import dataclasses
import itertools
import json
import math
import random
import shutil
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

import eval as E
import model as M
from data import Request, load_requests
from test_lyaplock import FIX


# ----------------------------------------------------------------------- a model we control
class WordTok:
    """Whitespace tokenizer over a fixed word list; id 0 is BOS (prepended unless bos=False)."""
    bos_id, pad_id, eos_ids = 0, 0, []
    pad = M.Tokenizer.pad

    def __init__(self, words):
        self.ids = {w: i + 1 for i, w in enumerate(words)}

    def encode(self, text, bos=None):      # a word outside the list (target_ids' probe "x"): one id past it
        return ([0] if bos is not False else []) + [self.ids.get(w, len(self.ids) + 1) for w in text.split()]


class Bigram(nn.Module):
    """Next-token probabilities depend only on the current word: probs[word] = {next: p}, the rest
    of the mass on the filler word "_" (every vocabulary contains it)."""

    def __init__(self, words, probs):
        super().__init__()
        self.tokenizer = WordTok(words)
        V = len(words) + 1
        table = torch.full((V, V), 1e-30)
        for w, row in probs.items():
            ids = self.tokenizer.ids
            table[ids[w], ids["_"]] = 1 - sum(row.values())
            for nxt, p in row.items():
                table[ids[w], ids[nxt]] = p
        self.logp = nn.Parameter(table.log(), requires_grad=False)   # (V, V)

    def forward(self, ids, mask=None, logits_at=None):
        if logits_at is not None:
            ids = ids.gather(1, logits_at)
        return M.Output(self.logp[ids])


def cf_request(cid, rewrite_end, para_ends, neigh_ends, kind="counterfact", new="new",
               true="true", answer="true"):
    """A request whose prompts end in the given words (the bigram model reads only those)."""
    return Request(cid, "{} " + rewrite_end, "S", new, true, tuple("S " + p for p in para_ends),
                   tuple("N " + p for p in neigh_ends), (answer,) * len(neigh_ends), kind=kind)


WORDS = ["S", "N", "r", "r0", "p1", "p2", "n1", "n2", "new", "true", "a", "b", "c", "d", "_"]


# ----------------------------------------------------------------------- CounterFact by hand
def test_counterfact_by_hand():
    m = Bigram(WORDS, {
        "r": {"new": 0.6, "true": 0.2},     # efficacy 1, magnitude 0.4
        "p1": {"new": 0.5, "true": 0.25},   # paraphrase right, 0.25
        "p2": {"new": 0.1, "true": 0.4},    # paraphrase wrong, -0.3
        "n1": {"new": 0.1, "true": 0.7},    # neighbour kept, 0.6
        "n2": {"new": 0.3, "true": 0.2},    # neighbour lost, -0.1
        "r0": {"new": 0.1, "true": 0.5},    # case 2: efficacy 0, magnitude -0.4
    })
    reqs = [cf_request(1, "r", ["p1", "p2"], ["n1", "n2", "n1"]),
            cf_request(2, "r0", ["p2"], ["n2"])]
    c1, c2 = E.counterfact_eval(m, reqs, batch_size=3)
    assert c1["case_id"] == 1 and c1["kind"] == "counterfact"
    assert c1["efficacy"] == 1 and c1["generalization"] == 0.5 and c1["specificity"] == pytest.approx(2 / 3)
    assert c1["efficacy_magnitude"] == pytest.approx(0.4)
    assert c1["generalization_magnitude"] == pytest.approx((0.25 - 0.3) / 2)
    assert c1["specificity_magnitude"] == pytest.approx((0.6 - 0.1 + 0.6) / 3)
    assert (c2["efficacy"], c2["generalization"], c2["specificity"]) == (0, 0, 0)
    s = E.summarize([c1, c2])
    eff, gen, spe = 50.0, 25.0, 100 / 3                     # means ×100 over the two cases
    assert (s["efficacy"], s["generalization"]) == (eff, gen)
    assert s["specificity"] == pytest.approx(spe)
    assert s["score"] == pytest.approx(3 / (1 / eff + 1 / gen + 1 / spe))   # = 100/3
    assert s["efficacy_magnitude"] == pytest.approx(100 * (0.4 - 0.4) / 2, abs=1e-4)
    assert E.summarize([c2])["score"] == 0
    perfect = {"efficacy": 1.0, "generalization": 1.0, "specificity": 1.0}
    assert E.summarize([perfect])["score"] == pytest.approx(100)
    assert "score" not in E.summarize([perfect | {"kind": "zsre"}])     # the authors' summarize.py: CounterFact's


def test_a_tie_between_the_targets_is_no_success():
    """The comparisons are strict (counterfact_eval: 1[NLL(true) > NLL(new)], neighbours
    1[NLL(answer) < NLL(new)]): where the two targets are exactly as likely, neither efficacy nor
    generalization nor specificity counts the prompt."""
    m = Bigram(WORDS, {"r": {"new": 0.3, "true": 0.3}, "n1": {"new": 0.2, "true": 0.2}})
    c, = E.counterfact_eval(m, [cf_request(1, "r", ["r"], ["n1"])], batch_size=2)
    assert (c["efficacy"], c["generalization"], c["specificity"]) == (0.0, 0.0, 0.0)
    assert c["efficacy_magnitude"] == c["specificity_magnitude"] == 0.0


def test_counterfact_top1_token_accuracy_by_hand():
    """EasyEdit's convention beside ROME's: the argmax token after the prompt (the filler "_" takes
    the rest of the mass). A neighbour whose true answer beats the new target but is not the
    argmax counts for specificity, not for specificity_top1."""
    m = Bigram(WORDS, {
        "r": {"new": 0.6, "true": 0.2},     # argmax new
        "p1": {"new": 0.5, "true": 0.25},   # argmax new
        "p2": {"new": 0.1, "true": 0.4},    # argmax "_" (0.5): true wins the comparison, not top-1
        "n1": {"new": 0.1, "true": 0.7},    # argmax true
        "n2": {"new": 0.3, "true": 0.2},    # argmax "_"
        "a": {"b": 0.9}, "b": {"c": 0.3, "d": 0.1},   # multi-token: "b" then "_" argmax after b
    })
    reqs = [cf_request(1, "r", ["p1", "p2"], ["n1", "n2", "n1"]), cf_request(2, "p2", ["r"], ["p2"]),
            cf_request(3, "r", ["r"], ["n1"], new="a b c", true="d")]
    c1, c2, c3 = E.counterfact_eval(m, reqs, batch_size=2)
    assert (c1["efficacy_top1"], c1["generalization_top1"]) == (1.0, 0.5)
    assert c1["specificity_top1"] == pytest.approx(2 / 3) and c1["specificity"] == pytest.approx(2 / 3)
    assert (c2["efficacy"], c2["efficacy_top1"], c2["generalization_top1"]) == (0.0, 0.0, 1.0)
    assert (c2["specificity"], c2["specificity_top1"]) == (1.0, 0.0)        # the two conventions part
    assert c3["efficacy_top1"] == pytest.approx(1 / 3)       # after r: new, not a; after a: b; after b: _, not c
    s = E.summarize([c1, c2])
    assert s["efficacy_top1"] == 50.0 and s["specificity_top1"] == pytest.approx(100 / 3)
    assert list(s).index("efficacy_top1") > list(s).index("score")


def test_a_counterfact_request_without_a_true_target_edits_but_is_not_scored():
    """Editing reads no true target (a hand-built request may have none); efficacy compares the new
    target with it, so scoring such a request is a ValueError naming it (it was an AttributeError
    deep in target_ids)."""
    m = Bigram(WORDS, {"r": {"new": 0.5, "true": 0.1}})
    q = dataclasses.replace(cf_request(7, "r", ["p1"], ["n1"]), target_true=None)
    with pytest.raises(ValueError, match="case_id 7: a CounterFact request without target_true cannot be scored"):
        E.edit_eval(m, [q])
    assert E.edit_eval(m, [dataclasses.replace(q, kind="zsre")])[0]["case_id"] == 7


def test_locality_is_easyedits_agreement_with_the_model_before_editing():
    """EasyEdit's CounterFact and zsRE locality (editor.py: mean(post == pre)): on each neighbourhood
    prompt, teacher-forced on the true answer, the share of argmax tokens unchanged by the edit.
    An unchanged model scores 1 where specificity_top1 (accuracy against the answer) may be 0."""
    before = Bigram(WORDS, {"n1": {"new": 0.1, "true": 0.7}, "n2": {"new": 0.3, "true": 0.2},
                            "a": {"b": 0.9}, "b": {"c": 0.6}})
    after = Bigram(WORDS, {"n1": {"new": 0.1, "true": 0.7}, "n2": {"new": 0.6, "true": 0.2},   # argmax "_" -> new
                           "a": {"b": 0.9}, "b": {"d": 0.6}})                                  # after b: c -> d
    reqs = [cf_request(1, "r", ["p1"], ["n1", "n2", "n1"]), cf_request(2, "r", ["r"], ["n2"]),
            cf_request(3, "r", ["r"], ["a"], answer="b c")]
    pre = E.counterfact_eval(before, reqs)
    assert [c["neighborhood_argmax"] for c in pre][0] == [[before.tokenizer.ids[w]] for w in ("true", "_", "true")]
    same = E.with_locality(pre, pre)
    assert [c["locality_top1"] for c in same] == [1.0, 1.0, 1.0] and same[1]["specificity_top1"] == 0.0
    post = E.with_locality(pre, E.counterfact_eval(after, reqs))
    assert [c["locality_top1"] for c in post] == [pytest.approx(2 / 3), 0.0, 0.5]   # "a b c": b kept, c -> d
    assert E.summarize(post)["locality_top1"] == pytest.approx(100 * (2 / 3 + 0 + 0.5) / 3)
    zsre = [cf_request(4, "r", ["p1"], ["n2"], kind="zsre")]
    post = E.with_locality(E.zsre_eval(before, zsre), E.zsre_eval(after, zsre))
    assert post[0]["locality_top1"] == 0.0
    twins = [dataclasses.replace(q, case_id=7) for q in reqs]        # one id twice (a hand-built list): by place
    post = E.with_locality(E.counterfact_eval(before, twins), E.counterfact_eval(after, twins))
    assert [c["locality_top1"] for c in post] == [pytest.approx(2 / 3), 0.0, 0.5]
    with pytest.raises(ValueError, match="same cases in the same order"):
        E.with_locality(pre[::-1], E.counterfact_eval(after, reqs))


def test_locality_is_left_out_where_the_cases_were_scored_on_other_tokens_before():
    """with_locality compares argmax tokens place by place: where a case's neighbourhood answers
    have other token counts before and after (or other prompts), there is nothing to compare and
    the case gets no locality_top1 (zip would score the overlap: 1/2 and 1)."""
    case = lambda *argmax: {"case_id": 1, "neighborhood_argmax": [list(a) for a in argmax]}
    assert E.with_locality([case((3, 4))], [case((3,))]) == [case((3,))]
    assert E.with_locality([case((3,), (4,))], [case((3,))]) == [case((3,))]
    assert E.with_locality([case((3,), (4,))], [case((3,), (5,))])[0]["locality_top1"] == 0.5


def test_target_nll_multi_token_by_hand():
    m = Bigram(WORDS, {"r": {"a": 0.5, "b": 0.1}, "a": {"b": 0.4, "c": 0.5}, "b": {"c": 0.2, "d": 0.7},
                       "p1": {"b": 0.6, "a": 0.3}})
    s = E.target_nll(m, ["S r", "S p1", "S r"], ["a b c", "a b c", "a"], batch_size=2)
    nll = [-math.log(0.5 * 0.4 * 0.2) / 3, -math.log(0.3 * 0.4 * 0.2) / 3, -math.log(0.5)]
    assert s.nll_mean.tolist() == pytest.approx(nll, rel=1e-5)
    assert s.token_correct == [[True, False, False], [False, False, False], [True]]


def test_zsre_by_hand():
    m = Bigram(WORDS, {"r": {"a": 0.6}, "a": {"b": 0.6}, "b": {"d": 0.5, "c": 0.3},
                       "p1": {"b": 0.6, "a": 0.3}, "n1": {"c": 0.9}, "n2": {"c": 0.5, "d": 0.2}})
    reqs = [cf_request(0, "r", ["p1"], ["n1"], "zsre", new="a b c", true="x", answer="c"),
            cf_request(1, "p1", ["p1"], ["n2"], "zsre", new="a b c", true="x", answer="d")]
    c0, c1 = E.edit_eval(m, reqs)
    # "a b c" after r: a right (0.6), b right (0.6), c wrong (d is 0.5 > 0.3) -> 2/3
    assert (c0["efficacy"], c0["generalization"], c0["specificity"]) == pytest.approx((2 / 3, 1 / 3, 1))
    assert (c1["efficacy"], c1["generalization"], c1["specificity"]) == pytest.approx((1 / 3, 1 / 3, 0))
    assert "efficacy_magnitude" not in c0
    with pytest.raises(ValueError, match=r"several kinds \['counterfact', 'zsre'\]: evaluate each kind apart"):
        E.edit_eval(m, [cf_request(2, "r", ["p1"], ["n1"]), cf_request(3, "r", ["p1"], ["n1"], "zsre")])


def test_each_neighbourhood_prompt_is_scored_against_its_own_answer():
    """A Request holds one answer per neighbourhood prompt (data.Request): specificity compares
    the k-th answer with the new target on the k-th prompt, in CounterFact and zsRE alike (the
    loaders' CounterFact answers are all target_true, so a mix-up there goes unseen)."""
    m = Bigram(WORDS, {"n1": {"a": 0.7, "new": 0.1}, "n2": {"b": 0.6, "a": 0.05, "new": 0.2}})
    r = Request(1, "{} r", "S", "new", "true", (), ("N n1", "N n2"), ("a", "b"))
    c, = E.counterfact_eval(m, [r])
    assert c["specificity"] == 1.0 and c["specificity_magnitude"] == pytest.approx((0.7 - 0.1 + 0.6 - 0.2) / 2)
    assert c["specificity_top1"] == 1.0                     # a is the argmax after n1, b after n2
    z, = E.zsre_eval(m, [dataclasses.replace(r, kind="zsre")])
    assert z["specificity"] == 1.0


def test_a_case_s_token_accuracy_is_its_prompts_mean_not_pooled_over_their_tokens():
    """Top-1 token accuracy (zsRE's three metrics, MEMIT's; CounterFact's *_top1, EasyEdit's) is
    each prompt's fraction of correct target tokens, then the mean over the case's prompts.
    Neighbourhood answers of different lengths tell this from pooling the tokens: "a" right after
    n1 (1 of 1) and "b c d" all wrong after n2 (the filler "_" is every argmax: 0 of 3) give
    (1 + 0) / 2, not 1 / 4."""
    m = Bigram(WORDS, {"n1": {"a": 0.7}, "n2": {}, "b": {}, "c": {}})
    r = Request(1, "{} r", "S", "new", "true", (), ("N n1", "N n2"), ("a", "b c d"))
    c, = E.counterfact_eval(m, [r])
    assert c["specificity_top1"] == 0.5
    z, = E.zsre_eval(m, [dataclasses.replace(r, kind="zsre")])
    assert z["specificity"] == 0.5


def test_the_edit_metrics_score_in_batches_of_the_size_they_are_given(monkeypatch):
    """counterfact_eval and zsre_eval hand their batch_size to target_nll (it bounds the memory of
    a forward pass; the scores do not depend on it)."""
    sizes, target_nll = [], E.target_nll
    monkeypatch.setattr(E, "target_nll", lambda *a, **k: sizes.append(a[3] if len(a) > 3 else k["batch_size"])
                        or target_nll(*a, **k))
    m = Bigram(WORDS, {"r": {"new": 0.6, "true": 0.2}})
    E.counterfact_eval(m, [cf_request(1, "r", ["p1"], ["n1"])], batch_size=3)
    E.zsre_eval(m, [cf_request(2, "r", ["p1"], ["n1"], kind="zsre")], batch_size=5)
    assert sizes == [3, 5]


# ------------------------------------------------------------------- text and classification
def test_ngram_entropy_by_hand():
    # words a b a b a: bigrams ab ba ab ba -> H2 = 1; trigrams aba bab aba -> H3 = h(1/3)
    h3 = -(2 / 3) * math.log2(2 / 3) - (1 / 3) * math.log2(1 / 3)
    assert E.ngram_entropy("a b a b a") == pytest.approx((2 / 3 * 1 + 4 / 3 * h3) / 2)
    assert E.ngram_entropy("a a a a a a") == 0                  # one repeated n-gram: no entropy
    # "x , y ." (punctuation marks are words): 3 distinct bigrams, 2 distinct trigrams
    assert E.ngram_entropy("x, y.") == pytest.approx((2 / 3 * math.log2(3) + 4 / 3 * 1) / 2)


def test_tfidf_by_hand():
    snippets = ["paris is big", "paris city"]                  # N = 2
    idf = E.fit_idf(snippets)
    lo, hi = math.log(3 / 3) + 1, math.log(3 / 2) + 1            # df 2: paris; df 1: is, big, city
    assert idf == pytest.approx({"paris": lo, "is": hi, "big": hi, "city": hi})
    # document frequency: a term counts once per document it is in, however often it is there
    assert E.fit_idf(["paris paris paris city", "city"]) == pytest.approx({"paris": hi, "city": lo})
    # "paris paris city x" (x: 1 char, not a term) vs "big city": shared term city only
    a = {"paris": 2 * lo, "city": hi}                          # b = {"big": hi, "city": hi}
    want = hi * hi / math.sqrt(sum(v * v for v in a.values())) / math.sqrt(2 * hi * hi)
    assert E.tfidf_cosine("Paris paris city x", "big city", idf) == pytest.approx(want)
    assert E.consistency(["paris city"], ["paris city"]) == pytest.approx(1)
    assert E.consistency(["london"], snippets) == 0
    # with the IDF fitted on the snippets, a word they lack weighs as df 0 (ln(1 + N) + 1), so
    # off-topic text lowers the score (it was dropped: the padded text scored as the plain one)
    unseen = math.log(3) + 1
    a = {"paris": lo, "city": hi, "london": unseen}
    b = {"paris": 2 * lo, "is": hi, "big": hi, "city": hi}
    want = (lo * 2 * lo + hi * hi) / math.sqrt(sum(v * v for v in a.values())) / math.sqrt(sum(v * v for v in b.values()))
    assert E.consistency(["paris city london"], snippets) == pytest.approx(want)
    on_topic = E.consistency(["paris is a big city"], snippets)
    assert E.consistency(["paris is a big city " + "the cat sat on the mat " * 30], snippets) < on_topic / 3
    assert E.tfidf_cosine("paris city london", "paris city", idf) == pytest.approx(1)   # a given IDF drops it
    assert E.consistency(["paris city london"], ["paris city"], idf) == pytest.approx(1)   # in consistency too


def test_f1_mcc_by_hand():
    labels, preds = [1, 1, 1, 0, 0, 0, 0, 1], [1, 1, 0, 0, 0, 1, 0, 1]    # TP 3, FN 1, FP 1, TN 3
    r = E.classification_metrics(labels, preds, 2)
    assert r["accuracy"] == 0.75 and r["f1"] == pytest.approx(0.75) and r["macro_f1"] == pytest.approx(0.75)
    assert r["mcc"] == pytest.approx((9 - 1) / 16)
    unbalanced = E.classification_metrics([1, 1, 1, 0], [1, 1, 1, 1], 2)   # class 1: F1 6/7; class 0: 0
    assert unbalanced["f1"] == pytest.approx(3 / 4 * 6 / 7) and unbalanced["macro_f1"] == pytest.approx(3 / 7)
    assert unbalanced["mcc"] == 0                                          # an empty margin
    assert E.classification_metrics([0, 1], [0, 1], 2)["mcc"] == 1
    assert E.classification_metrics([0, 1], [1, 0], 2)["mcc"] == -1
    assert E.classification_metrics([0, 1, 2, 3], [0, 1, 3, 3], 4)["accuracy"] == 0.75
    # macro F1 over the classes that occur or are predicted (scikit-learn): a perfect run on two of
    # four MMLU letters is 1, not 0.5; a class predicted but absent counts (its F1 is 0)
    assert E.classification_metrics([0, 1, 0, 1], [0, 1, 0, 1], 4)["macro_f1"] == 1.0
    assert E.classification_metrics([0, 0, 1, 1], [0, 2, 1, 1], 4)["macro_f1"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    # an answer not given (−1, the authors' protocol) is a class of F1 0 (it read the last class's)
    assert E.classification_metrics([0, 1], [-1, 1], 2)["macro_f1"] == pytest.approx((0 + 0 + 1) / 3)


def test_mcc_is_the_binary_formula_also_where_the_margins_differ():
    """Two classes: (TP·TN − FP·FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)), on label and prediction
    lists whose class counts differ (where they are equal, swapping the two margins goes unseen)."""
    rng = random.Random(0)
    for _ in range(50):
        n = rng.randint(2, 30)
        labels = [rng.randint(0, 1) for _ in range(n)]
        preds = [rng.choice([l, rng.randint(0, 1)]) for l in labels]
        tp = sum(l == p == 1 for l, p in zip(labels, preds))
        tn = sum(l == p == 0 for l, p in zip(labels, preds))
        fp = sum(l == 0 and p == 1 for l, p in zip(labels, preds))
        fn = sum(l == 1 and p == 0 for l, p in zip(labels, preds))
        den = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
        assert E.mcc(labels, preds) == pytest.approx((tp * tn - fp * fn) / den if den else 0.0)
    assert E.mcc([1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]) == pytest.approx(6 / math.sqrt(72))


# --------------------------------------------------------------------- the real checkpoint
@pytest.fixture(scope="module")
def lm():
    return M.load(FIX / "stories260K-hf")


def plain_nll(m, prompt, target):
    """Mean target NLL from one full forward pass (no logits_at, no batching)."""
    p, t = m.tokenizer.encode(prompt), E.target_ids(m.tokenizer, target)
    logp = m(torch.tensor([p + t])).logits[0].log_softmax(-1)
    return -sum(logp[len(p) - 1 + j, tok] for j, tok in enumerate(t)) / len(t)


def test_target_nll_matches_plain_forward(lm):
    prompts = ["Once upon a time, there was a", "Tom and", "The sun was shining and the birds were"]
    targets = ["little girl named Lily", "Sue went to the park", "happy"]
    assert len(E.target_ids(lm.tokenizer, targets[0])) > 1
    assert E.target_ids(lm.tokenizer, "happy") == E.target_ids(lm.tokenizer, " happy")
    got = E.target_nll(lm, prompts, targets).nll_mean
    want = torch.stack([plain_nll(lm, p, t) for p, t in zip(prompts, targets)])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    one = E.target_nll(lm, prompts, targets, batch_size=1)
    torch.testing.assert_close(one.nll_mean, got, atol=1e-5, rtol=1e-5)


def test_target_nll_batches_pairs_by_length_and_returns_scores_in_the_given_order(lm, monkeypatch):
    """Pairs of mixed lengths, given short, long, short, long: each batch holds pairs of like
    length, longest first (5 padded slots in all, 71 in the given order), and every score
    (NLL, each token's argmax and hit) is the one a pair gets alone, in the given order."""
    prompts = ["Tom", "Once upon a time, in a small house near the big dark forest, there lived a", "Sue",
               "The sun was shining and the birds were singing in the tall green trees when a"]
    targets = ["ran", "little girl named Lily who liked to play", "went", "big red dog"]
    shapes, forward = [], type(lm).forward

    def spy(self, ids, mask=None, *a, **k):
        shapes.append((mask.shape[1], int(mask.sum())))
        return forward(self, ids, mask, *a, **k)
    monkeypatch.setattr(type(lm), "forward", spy)
    got = E.target_nll(lm, prompts, targets, batch_size=2)
    lengths = [sum(map(len, p)) for p in E.prompt_target_ids(lm.tokenizer, prompts, targets)]
    by_length = sorted(lengths, reverse=True)                 # [43, 39, 6, 5] tokens
    assert shapes == [(by_length[0], sum(by_length[:2])), (by_length[2], sum(by_length[2:]))], (lengths, shapes)
    for i, (p, t) in enumerate(zip(prompts, targets)):
        one = E.target_nll(lm, [p], [t], batch_size=1)
        torch.testing.assert_close(got.nll_mean[i:i + 1], one.nll_mean, atol=1e-5, rtol=1e-5)
        assert got.argmax[i] == one.argmax[0] and got.token_correct[i] == one.token_correct[0]


def test_fluency_texts_are_romes_hundred_tokens_past_the_end_of_text(lm, monkeypatch):
    """ROME's generate_fast(max_out_len=100): each text is 100 tokens with its prompt, sampling on
    past an end-of-text token (decoding drops it); the texts were 100 NEW tokens, cut at EOS."""
    made = []

    def generate(m, seqs, n, **kw):
        made.append((seqs, n, kw))
        return [[lm.tokenizer.eos_ids[0]] + [300] * (n - 1) for _ in seqs]      # EOS first, then more
    monkeypatch.setattr(M, "generate", generate)
    prompts = ["Once upon a time", "The little dog ran to the park and saw a big red ball"]
    texts = E.generate_texts(lm, prompts, top_k=5, seed=3)
    (seqs, n, kw), = made
    assert kw == dict(top_k=5, seed=3, stop_at_eos=False) and n == 100 - min(map(len, seqs))
    for p, q, text in zip(prompts, seqs, texts):
        assert text == lm.tokenizer.decode(q + [lm.tokenizer.eos_ids[0]] + [300] * (99 - len(q)))
        assert text.startswith(p) and len(lm.tokenizer.encode(text)) > 90
    monkeypatch.setattr(lm.tokenizer, "decode", lambda ids: "Caf\u00e9 au lait\n\nNext")     # ROME's text rules:
    assert E.generate_texts(lm, prompts[:1]) == ["Cafe\u0301 au lait Next"]                 # NFKD, blank line a space


def test_generate_texts_seeds_batch_j_with_seed_plus_j(lm, monkeypatch):
    """ROME's generate_fast per batch: batch j samples with seed + j (one seed for every batch
    gave equal prompts in different batches the same text)."""
    made = []

    def generate(m, seqs, n, **kw):
        made.append((len(seqs), kw["seed"]))
        return [[300] * n for _ in seqs]
    monkeypatch.setattr(M, "generate", generate)
    E.generate_texts(lm, ["Once upon a time"] * 5, text_tokens=10, seed=7, batch_size=2)
    assert made == [(2, 7), (2, 8), (1, 9)]
    monkeypatch.undo()
    a, b = E.generate_texts(lm, ["Once upon a time"] * 2, text_tokens=30, seed=7, batch_size=1)
    assert a != b and a == E.generate_texts(lm, ["Once upon a time"], text_tokens=30, seed=7)[0]
    assert b == E.generate_texts(lm, ["Once upon a time"], text_tokens=30, seed=8)[0]


def test_greedy_continuations_decode_the_targets_length_and_two_tokens_more(lm):
    """Each prompt (encoded with the checkpoint's BOS rule) is continued greedily by
    len(target_ids) + GREEDY_SPARE tokens, as modeling.generate continues it alone."""
    prompts, targets = ["Once upon a time", "Lily went to the", "The dog"], ["there", "park with her mom", "ran"]
    got = E.greedy_continuations(lm, prompts, targets, batch_size=2)
    for p, t, text in zip(prompts, targets, got):
        ids = lm.tokenizer.encode(p)
        assert ids[0] == lm.tokenizer.bos_id
        n = len(E.target_ids(lm.tokenizer, t)) + 2
        assert text == lm.tokenizer.decode(M.generate(lm, [ids], n)[0])


def test_target_ids_are_the_targets_ids_inside_the_sentence(tmp_path):
    """A tokenizer that marks the start of every text (Llama-2's and Mistral-7B's tokenizer.json:
    normalizer Prepend "▁", then " " -> "▁") encodes " girl" alone as "▁" "▁g" "ir" "l"; after a
    prompt the target's ids are those it has in the joint sentence, and prompt + target_ids is the
    sentence's encoding (so efficacy and E4's targets read the tokens the model sees)."""
    import shutil
    path = tmp_path / "llama2-style"
    shutil.copytree(FIX / "stories260K-hf", path)
    spec = json.loads((path / "tokenizer.json").read_text())
    spec["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}
    (path / "tokenizer.json").write_text(json.dumps(spec))
    tok = M.Tokenizer(path, M.read_config(path))
    assert tok.tok.encode(" girl", add_special_tokens=False).tokens[0] == "▁"          # the stray piece
    for prompt, target in [("Once upon a time there was a little", "girl"), ("Tom and", " Sue went home"),
                           ("The sun was", "happy, and the birds sang")]:
        sentence = prompt + (target if target.startswith(" ") else " " + target)
        assert tok.encode(prompt) + E.target_ids(tok, target) == tok.encode(sentence), (prompt, target)
        assert tok.tok.id_to_token(E.target_ids(tok, target)[0]) != "▁"
    lm = M.load(FIX / "stories260K-hf")            # its own tokenizer: the ids alone were already these
    assert E.target_ids(lm.tokenizer, "girl") == lm.tokenizer.encode(" girl", bos=False)


def test_target_ids_fall_back_to_the_spaced_target_where_the_probe_does_not_stay_one_piece():
    """Where "x" + target does not begin with the ids of "x" (a tokenizer that merges "x " into one
    token), target_ids is the target tokenised alone, with the leading space it has after a prompt."""
    class MergingTok:                                   # one id per character; "x " one token of its own
        def encode(self, text, bos=None):
            return [1000] + self.encode(text[2:]) if text.startswith("x ") else [ord(c) for c in text]
    tok = MergingTok()
    assert tok.encode("x Paris")[:1] != tok.encode("x")
    assert E.target_ids(tok, "Paris") == [ord(c) for c in " Paris"] == E.target_ids(tok, " Paris")


def test_a_target_that_leaves_no_room_for_a_prompt_is_refused(lm):
    """prompt_target_batch cuts a prompt to max_len less its target's ids, keeping the lead: where
    only the lead would be left (no prompt token), the target would be scored after BOS alone, a
    ValueError; one position more keeps the prompt's last token before the target."""
    tok, target, prompt = lm.tokenizer, "little girl named Lily", "Once upon a time, there was a"
    t, lead = E.target_ids(tok, target), tok.lead
    assert lead and len(t) > 1
    with pytest.raises(ValueError, match="no room for a prompt"):
        E.prompt_target_batch(tok, [prompt], [target], max_len=len(lead) + len(t))
    b = E.prompt_target_batch(tok, [prompt], [target], max_len=len(lead) + len(t) + 1)
    assert b.ids[0].tolist() == lead + tok.encode(prompt)[-1:] + t
    assert b.pos[0].tolist() == list(range(len(lead), len(lead) + len(t)))


def test_batched_case_eval_equals_one_at_a_time(lm):
    for name in ("counterfact-rome.json", "zsre-mend.json"):
        reqs = load_requests(FIX / name, limit=4)[0]
        batched = E.edit_eval(lm, reqs, batch_size=64)
        single = [E.edit_eval(lm, [r], batch_size=1)[0] for r in reqs]
        for b, s in zip(batched, single):
            assert b.keys() == s.keys()
            assert all(b[k] == (pytest.approx(s[k], abs=1e-5) if isinstance(s[k], float) else s[k])
                       for k in b)


def test_perplexity_matches_plain_forward(lm):
    texts = ["Once upon a time, there was a little dog.", "Lily liked to play in the park with her friends."]
    total, count = 0.0, 0
    for t in texts:
        ids = lm.tokenizer.encode(t, bos=True)[:12]
        logp = lm(torch.tensor([ids])).logits[0].log_softmax(-1)
        total -= sum(float(logp[i, ids[i + 1]]) for i in range(len(ids) - 1))
        count += len(ids) - 1
    assert E.perplexity(lm, texts, max_len=12) == pytest.approx(math.exp(total / count), rel=1e-5)


def test_perplexity_of_texts_of_different_lengths_in_one_batch(lm):
    """A right-padded batch: pad positions neither predict nor are predicted, so the batched
    perplexity is exp(total NLL / predicted tokens) of each text scored alone; texts with nothing
    to predict (a lone BOS) are a ValueError, not a division by zero."""
    texts = ["Once upon a time, there was a little dog.", "Lily liked to play.",
             "The sun was shining and the birds were singing in the tall green trees."]
    assert len({len(lm.tokenizer.encode(t)) for t in texts}) == 3
    total, count = 0.0, 0
    for t in texts:
        ids = lm.tokenizer.encode(t, bos=True)
        logp = lm(torch.tensor([ids])).logits[0].log_softmax(-1)
        total -= sum(float(logp[i, ids[i + 1]]) for i in range(len(ids) - 1))
        count += len(ids) - 1
    assert E.perplexity(lm, texts, batch_size=3) == pytest.approx(math.exp(total / count), rel=1e-5)
    with pytest.raises(ValueError, match="no text has 2 or more tokens"):
        E.perplexity(lm, ["", ""])


def test_perplexity_scores_a_text_of_two_tokens_and_skips_a_lone_bos(lm):
    """A text of 2 tokens (BOS and one word) has one token to predict and is scored; a text of
    one token (a lone BOS) has none and is left out, not counted as a token of NLL 0."""
    ids = lm.tokenizer.encode("Lily")
    assert len(ids) == 2 and lm.tokenizer.encode("") == ids[:1]
    logp = lm(torch.tensor([ids])).logits[0].log_softmax(-1)
    assert E.perplexity(lm, ["Lily", ""]) == pytest.approx(math.exp(-float(logp[0, ids[1]])), rel=1e-5)


def test_perplexity_scores_after_what_the_template_puts_first(tmp_path):
    """A tokenizer with no BOS whose template puts two special tokens first (as GLM's [gMASK]<sop>):
    each text is scored after them, as a prompt is encoded (it was scored with nothing before)."""
    d = tmp_path / "glm-like"
    shutil.copytree(FIX / "stories260K-hf", d)
    tj = json.loads((d / "tokenizer.json").read_text())
    tj["post_processor"] = {"type": "TemplateProcessing", "single": [
        {"SpecialToken": {"id": "<s>", "type_id": 0}}, {"SpecialToken": {"id": "</s>", "type_id": 0}},
        {"Sequence": {"id": "A", "type_id": 0}}], "pair": [{"Sequence": {"id": "A", "type_id": 0}}],
        "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]},
                           "</s>": {"id": "</s>", "ids": [2], "tokens": ["</s>"]}}}
    (d / "tokenizer.json").write_text(json.dumps(tj))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": None, "eos_token": "</s>"}))
    m = M.load(d)
    assert m.tokenizer.bos_id is None and m.tokenizer.lead == [1, 2]
    text = "Once upon a time, there was a little dog."
    ids = [1, 2] + m.tokenizer.encode(text, bos=False)
    logp = m(torch.tensor([ids])).logits[0].log_softmax(-1)
    nll = -sum(float(logp[i, ids[i + 1]]) for i in range(len(ids) - 1)) / (len(ids) - 1)
    assert E.perplexity(m, [text]) == pytest.approx(math.exp(nll), rel=1e-5)


def test_prompts_and_texts_past_the_model_s_positions_lose_their_start_and_a_collapse_is_inf(tmp_path):
    """General ability and perplexity are held to the model's positions as the edits are: a GPT-2
    of 64 learned positions failed on the 98-token prompt of a bundled task (after the run had
    begun), a RoPE model ran past its trained length. A prompt too long keeps its end (the
    question and "Answer:"), after the lead; a text its start. A collapsed model's perplexity is
    inf (it was an OverflowError in math.exp, where --stop-below should record the collapse)."""
    d = tmp_path / "short"
    shutil.copytree(FIX / "stories260K-hf", d)
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(config | {"max_position_embeddings": 64}))
    m = M.load(d)
    prompts, _ = E.read_task(FIX / "glue", "mmlu", 4)
    assert all(len(m.tokenizer.encode(p)) > 64 for p in prompts)
    words = list(E.TASKS["mmlu"].words)
    got = E.target_nll(m, [p for p in prompts for _ in words], words * 4, max_len=64).nll_mean
    lead = m.tokenizer.lead
    for i, (p, w) in enumerate((p, w) for p in prompts for w in words):              # by hand: one at a time
        t = E.target_ids(m.tokenizer, w)
        ids = lead + m.tokenizer.encode(p)[len(lead):][-(64 - len(t) - len(lead)):] + t
        assert len(ids) == 64
        logp = m(torch.tensor([ids])).logits[0].log_softmax(-1)
        nll = -sum(float(logp[64 - len(t) - 1 + j, t[j]]) for j in range(len(t))) / len(t)
        assert float(got[i]) == pytest.approx(nll, rel=1e-5)
    assert E.general_eval(m, FIX / "glue", n_per_task=4, tasks=("mmlu",))["mmlu"]["accuracy"] == \
        E.classification_metrics(E.read_task(FIX / "glue", "mmlu", 4)[1], got.view(4, 4).argmin(1).tolist(), 4)["accuracy"]
    texts = [" ".join(["Once upon a time, there was a little dog."] * 20)]
    assert E.perplexity(m, texts) == E.perplexity(m, texts, max_len=64) != E.perplexity(M.load(FIX / "stories260K-hf"), texts)
    with torch.no_grad():
        m.norm.weight.mul_(3000)                                  # every prediction sure and wrong
    assert E.perplexity(m, texts) == math.inf


def test_generation_eval_runs_and_is_seeded(lm):
    reqs = load_requests(FIX / "counterfact-rome.json", limit=2)[0]
    a = E.generation_eval(lm, reqs, snippets={reqs[0].case_id: ["the little dog ran"]}, text_tokens=30)
    b = E.generation_eval(lm, reqs, text_tokens=30)
    assert [c["generations"] for c in a] == [c["generations"] for c in b]
    assert all(0 < c["fluency"] < 10 for c in a)
    assert 0 <= a[0]["consistency"] <= 1 and "consistency" not in a[1]
    text_key = E.generation_eval(lm, reqs[:1], snippets={str(reqs[0].case_id): ["the little dog ran"]}, text_tokens=30)
    assert text_key[0]["consistency"] == a[0]["consistency"]       # 7 and "7": one case (JSON's keys are text)


def test_general_eval_on_fixtures(lm):
    r = E.general_eval(lm, FIX / "glue", n_per_task=6)
    assert set(r) == {"sst2", "mrpc", "cola", "rte", "nli", "mmlu"}
    for name, x in r.items():
        assert x["n"] == 6 and 0 <= x["accuracy"] <= 1 and 0 <= x["f1"] <= 1 and 0 <= x["macro_f1"] <= 1
        assert ("mcc" in x) == (name != "mmlu") and -1 <= x.get("mcc", 0) <= 1


def test_general_eval_maps_each_answer_word_to_its_glue_class(tmp_path, monkeypatch):
    """Each task's answer words stand for GLUE's class ids (sst2 1 = positive; mrpc 1 = paraphrase;
    cola 1 = acceptable; rte and nli 0 = entailment; mmlu the choice index): a scorer that gives
    the word an item names (<word> in its text) the lowest NLL answers every item right; each
    prompt is held to the model's positions (target_nll's max_len)."""
    limits = set()

    def names_the_word(m, prompts, targets, batch_size, max_len):
        limits.add(max_len)
        return E.TargetScores(torch.tensor([0.0 if f"<{t.strip()}>" in p else 1.0 for p, t in zip(prompts, targets)]),
                              [], [])
    monkeypatch.setattr(E, "target_nll", names_the_word)
    pair = lambda word, label: dict(sentence1=f"<{word}>", sentence2="s", label=label)
    items = {"sst2": [dict(sentence="<positive>", label=1), dict(sentence="<negative>", label=0)],
             "mrpc": [pair("Yes", 1), pair("No", 0)],
             "cola": [dict(sentence="<Yes>", label=1), dict(sentence="<No>", label=0)],
             "rte": [pair("Yes", 0), pair("No", 1)],
             "nli": [pair("Yes", "entailment"), pair("No", "not_entailment")],
             "mmlu": [dict(question=f"<{w}>", subject="x", choices=list("abcd"), answer=k) for k, w in enumerate("ABCD")]}
    for name, xs in items.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(xs))
    r = E.general_eval(SimpleNamespace(cfg=SimpleNamespace(position_limit=(512, ""))), tmp_path, n_per_task=4)
    assert {name: x["accuracy"] for name, x in r.items()} == dict.fromkeys(items, 1.0)
    assert limits == {512}


def test_general_eval_reads_row_i_of_the_scores_as_prompt_i_s(tmp_path, monkeypatch):
    """target_nll gets prompt after prompt, each with every answer word (the word varies fastest),
    so the (n, L) NLLs are read a prompt per row. Three sst2 items of classes 1, 1, 0 (the scores
    of two items of two classes are the same read either way) and a scorer that gives the word an
    item names the lowest NLL: every item answered right."""
    monkeypatch.setattr(E, "target_nll", lambda m, prompts, targets, batch_size, max_len: E.TargetScores(
        torch.tensor([0.0 if f"<{t.strip()}>" in p else 1.0 for p, t in zip(prompts, targets)]), [], []))
    (tmp_path / "sst2.json").write_text(json.dumps([dict(sentence="<positive>", label=1),
                                                    dict(sentence="<positive>", label=1),
                                                    dict(sentence="<negative>", label=0)]))
    m = SimpleNamespace(cfg=SimpleNamespace(position_limit=(512, "")))
    assert E.general_eval(m, tmp_path, n_per_task=3, tasks=("sst2",))["sst2"]["accuracy"] == 1.0


@pytest.mark.parametrize("name, fixture, n", [("stories260K", "stories260K-hf", 10), ("factmodel-ci", "factmodel-ci", 30)])
def test_the_authors_glue_eval_agrees_with_their_code_item_by_item(name, fixture, n, tmp_path):
    """fixtures/oracle-glue/<name>.json: their glue_eval/<task>_eval.py run on the model by
    transformers (fixtures/oracle-glue/build.py; its 512 positions made 2048 there and here, so
    that no MMLU prompt is cut). On their first n items (MMLU's, long: 10; the fact model's MRPC,
    whose generations give answers: all 100), item by item: the greedy continuation,
    the parsed answer, the answer words' probabilities and the answer they choose; on all 100,
    their f1, f1_new, mcc and accuracy from their answers by our metrics (scikit-learn's there);
    their _get_answer on made-up answers; and authors_general_eval's figures from these answers."""
    d = tmp_path / name
    shutil.copytree(FIX / fixture, d)
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(config | {"max_position_embeddings": 2048}))
    m = M.load(d)
    oracle = json.loads((FIX / "oracle-glue" / f"{name}.json").read_text())
    for task, theirs in oracle.items():
        rule, items = E.AUTHORS_TASKS[task], E.read_items(FIX / "glue", task, 100, 10)
        some = 100 if (name, task) == ("factmodel-ci", "mrpc") else 10 if task == "mmlu" else n
        ours = E.authors_answers(m, task, items[:some])
        assert ours["continuations"] == [x["generated"] for x in theirs["items"][:some]], task
        assert ours["parsed"] == [x["answer"] for x in theirs["items"][:some]], task
        assert ours["chosen"] == [x["answer_new"] for x in theirs["items"][:some]], task
        for a, b in zip(ours["probs"], (x["probs"] for x in theirs["items"])):
            assert a == pytest.approx(b, rel=3e-5), task       # (measured: 7e-6, float32 forwards)
        labels = [rule.label(E.class_id(E.TASKS[task], x)) for x in items]
        assert labels == [x["label"] for x in theirs["items"]], task        # (RTE's raw label, NLI's _get_label)
        parsed, chosen = [x["answer"] for x in theirs["items"]], [x["answer_new"] for x in theirs["items"]]
        result, k = theirs["result"], len(rule.words)
        assert E.classification_metrics(labels, parsed, k)["f1"] == pytest.approx(result["f1"], abs=1e-12), task
        assert E.classification_metrics(labels, chosen, k)["f1"] == pytest.approx(result["f1_new"], abs=1e-12), task
        assert E.mcc(labels, parsed) == pytest.approx(result["mcc"], abs=1e-12), task
        assert E.classification_metrics(labels, parsed, k)["accuracy"] == result["correct"] / result["total"]
        assert parsed.count(-1) == result["invalid"]
        for probe in theirs["parse"]:
            assert E.parsed_answer(rule, probe["prompt"], probe["text"]) == probe["answer"], probe
    got = E.authors_general_eval(m, FIX / "glue", n, tasks=("mrpc",))["mrpc"]      # the figures of these answers
    labels = [E.class_id(E.TASKS["mrpc"], x) for x in E.read_items(FIX / "glue", "mrpc", n, 10)]
    parsed = [x["answer"] for x in oracle["mrpc"]["items"][:n]]
    assert got == dict(n=n, f1=E.classification_metrics(labels, parsed, 2)["f1"], mcc=E.mcc(labels, parsed),
                       accuracy=E.classification_metrics(labels, parsed, 2)["accuracy"], invalid=parsed.count(-1),
                       f1_new=E.classification_metrics(labels, E.authors_answers(m, "mrpc", E.read_items(
                           FIX / "glue", "mrpc", n, 10))["chosen"], 2)["f1"], accuracy_new=got["accuracy_new"])
    assert name != "factmodel-ci" or got["invalid"] == 30             # answers parsed: the mcc of −1, 0, 1 is read


def test_the_answer_the_authors_choose_by_probability_is_their_expression_with_ties_and_nan():
    """Their answer_new, transcribed: `1 if p_first > p_second else 0` for the two-word tasks,
    max_prob_suffix for MMLU; on every combination of a tie and a NaN (a collapsed model's)."""
    def max_prob_suffix(a, b, c, d):                                   # mmlu_eval.py, as written there
        if a > max(b, c, d):
            return 0
        elif b > max(a, c, d):
            return 1
        elif c > max(b, a, d):
            return 2
        elif d > max(b, c, a):
            return 3
        return -1
    values = (0.1, 0.2, math.nan)
    for probs in itertools.product(values, repeat=4):
        assert E.chosen_answer(E.AUTHORS_TASKS["mmlu"], list(probs)) == max_prob_suffix(*probs), probs
    for task in ("sst2", "mrpc", "cola", "rte", "nli"):
        for p, q in itertools.product(values, repeat=2):
            assert E.chosen_answer(E.AUTHORS_TASKS[task], [p, q]) == (1 if p > q else 0), (task, p, q)


def test_the_authors_protocol_cuts_a_prompt_too_long_for_the_model_and_scores_the_cut_ids(lm, monkeypatch):
    """Their prompts are not cut; a model's positions are a hard limit for a GPT-2 and a trained
    length for the others: the joint ids lose their start (after the lead), and the word is read
    where it stands in them; a prompt to continue is cut so that it and its 5 new tokens fit."""
    items = E.read_items(FIX / "glue", "mmlu", 100, 10)
    task = E.AUTHORS_TASKS["mmlu"]
    longest = max(items, key=lambda x: len(lm.tokenizer.encode(task.prompt(x))))
    prompt, lead = task.prompt(longest), lm.tokenizer.lead
    assert len(lm.tokenizer.encode(prompt)) > 512
    got = E.word_probabilities(lm, [prompt], task.words)[0]
    for word, p in zip(task.words, got):                                  # by hand, one at a time
        ids = E.cut_start(lm.tokenizer.encode(f"{prompt} {word}"), len(lead), 512)
        suffix = lm.tokenizer.encode(f" {word}", bos=False)
        assert len(ids) == 512 and ids[:len(lead)] == lead and ids[-len(suffix):] == suffix
        logp = lm(torch.tensor([ids])).logits[0].log_softmax(-1)
        nll = -sum(float(logp[512 - len(suffix) - 1 + j, t]) for j, t in enumerate(suffix)) / len(suffix)
        assert p == pytest.approx(math.exp(-nll), rel=1e-5)
    made, generate = [], M.generate
    monkeypatch.setattr(M, "generate", lambda m, seqs, n, **kw: made.append(max(map(len, seqs)) + n) or
                        generate(m, seqs, n, **kw))
    answers = E.authors_answers(lm, "mmlu", [longest])
    assert answers["probs"] == [got] and len(answers["continuations"]) == 1
    assert made == [512]                                      # prompt and new tokens within the positions


def test_the_authors_figures_read_items_10_on_with_their_nli_classes(monkeypatch):
    """authors_general_eval scores items 10 .. 9 + n_per_task (their FEW_SHOT_TEST_SPLIT) against
    the classes their nli_eval reads (entailment 1: AuthorsTask.label, 1 − GLUE's id): answers
    naming each item's class their way score 1 in every figure, and GLUE's ids 0."""
    items = E.read_items(FIX / "glue", "nli", 6, 10)
    theirs = [1 if x["label"] == "entailment" else 0 for x in items]
    assert set(theirs) == {0, 1}
    for answers, want in ((theirs, 1.0), ([1 - c for c in theirs], 0.0)):
        asked = []

        def authors_answers(m, name, xs, batch_size):
            asked.append((name, xs))
            return dict(parsed=answers, chosen=answers)
        monkeypatch.setattr(E, "authors_answers", authors_answers)
        r = E.authors_general_eval(None, FIX / "glue", 6, tasks=("nli",))["nli"]
        assert asked == [("nli", items)]
        assert (r["accuracy"], r["accuracy_new"], r["f1"], r["f1_new"], r["invalid"]) == (want, want, want, want, 0)


def test_general_eval_names_a_task_file_it_cannot_read(lm, tmp_path):
    for task in E.TASKS:
        (tmp_path / f"{task}.json").write_text((FIX / "glue" / f"{task}.json").read_text())
    (tmp_path / "rte.json").write_text("[{")
    with pytest.raises(ValueError, match=f"{tmp_path / 'rte.json'}: cannot read the task's items"):
        E.general_eval(lm, tmp_path, n_per_task=2)
    items = json.loads((FIX / "glue" / "mmlu.json").read_text())[:2]
    items[1]["choices"].append("a fifth")                   # was an IndexError from deep in the prompt
    (tmp_path / "mmlu.json").write_text(json.dumps(items))
    with pytest.raises(ValueError, match=r"mmlu.json: item 1: choices \[.*'a fifth'\] is not a list of 4 texts"):
        E.general_eval(lm, tmp_path, n_per_task=2, tasks=("mmlu",))


@pytest.mark.parametrize("task, change, message", [
    ("mmlu", dict(subject=None), "subject None is not a text"),                        # was an AttributeError
    ("mmlu", dict(subject=3), "subject 3 is not a text"),
    ("sst2", dict(sentence=None), "sentence None is not a text"),                     # scored "Review: None"
    ("sst2", dict(label=1.7), r"label 1.7 is not a class id 0..1 \(the answers negative, positive, in order\)"),
    ("sst2", dict(label=True), r"label True is not a class id 0..1"),                 # (1.7 scored as class 1)
    ("sst2", dict(label="positive"), r"label 'positive' is not a class id 0..1"),
    ("sst2", dict(label="²"), r"label '²' is not a class id 0..1"),                   # (int() fails on it)
    ("mmlu", dict(answer="٣"), r"answer '٣' is not a class id 0..3"),
    ("rte", dict(sentence2=["a"]), r"sentence2 \['a'\] is not a text"),
    ("nli", dict(label="neutral"), r"label 'neutral' is not a class id 0..1 \(the answers Yes, No, in order; or a label 'entailment', 'not_entailment'\)"),
    ("mmlu", dict(choices="ABCD"), "choices 'ABCD' is not a list of 4 texts"),        # four one-letter options
    ("mmlu", dict(answer=None), r"answer None is not a class id 0..3 \(the answers A, B, C, D, in order\)"),
    ("cola", dict(label=None), "label None is not a class id 0..1"),
    ("sst2", dict(label=2), r"label 2 is not a class id 0..1"),                        # one past the last class
    ("mmlu", dict(answer=-1), r"answer -1 is not a class id 0..3"),
    ("nli", dict(label=" entailment"), r"label ' entailment' is not a class id 0..1"),  # a name is matched whole
])
def test_a_task_item_of_the_wrong_kind_is_named_with_its_field(tmp_path, task, change, message):
    """Each item's text fields are texts and its class id a whole number in range (or, for the NLI
    file, its label's name): one line naming the file, the item and the field."""
    items = json.loads((FIX / "glue" / f"{task}.json").read_text())[:3]
    items[2] |= change
    (tmp_path / f"{task}.json").write_text(json.dumps(items))
    with pytest.raises(ValueError, match=rf"{task}.json: item 2: {message}"):
        E.read_task(tmp_path, task, 3)


def test_read_items_names_the_file_and_the_item_by_its_place_in_the_file(tmp_path):
    """read_items' ValueErrors: a file that is not a list, an item not an object or without its
    class id, no items past `start`; an item is numbered by its place in the file (the authors'
    protocol reads from item 10), not in the part read."""
    items = json.loads((FIX / "glue" / "sst2.json").read_text())[:14]

    def refused(xs, message, start=0):
        (tmp_path / "sst2.json").write_text(json.dumps(xs))
        with pytest.raises(ValueError, match=message):
            E.read_items(tmp_path, "sst2", 4, start)
    refused({"items": items}, "sst2.json: expected a JSON list of items")
    refused(items[:2] + ["positive"], "sst2.json: item 2: a str, not an object")
    refused(items[:1] + [{"sentence": "fine"}], "sst2.json: item 1: lacks the field 'label'")
    refused(items[:12] + [items[12] | {"label": 5}], "sst2.json: item 12: label 5 is not a class id", start=10)
    refused(items, "sst2.json: no items past the first 14", start=14)
    refused([], "sst2.json: no items$")


def test_class_ids_as_datasets_write_them_read_as_whole_numbers(tmp_path):
    """An id written as a whole float or a string of digits is that class (they read before the
    items were checked); one of another task's label names is not."""
    items = json.loads((FIX / "glue" / "sst2.json").read_text())[:4]
    for kind in (float, str):
        (tmp_path / "sst2.json").write_text(json.dumps([x | {"label": kind(x["label"])} for x in items]))
        prompts, ids = E.read_task(tmp_path, "sst2", 4)
        assert (prompts, ids) == E.read_task(FIX / "glue", "sst2", 4) and {type(i) for i in ids} == {int}


def test_the_nli_file_s_labels_may_be_glue_s_class_ids(tmp_path):
    """GLUE's RTE-style files give 0 (entailment) and 1 (not); the NLI file's text labels mean the
    same (it was a KeyError(0))."""
    items = json.loads((FIX / "glue" / "nli.json").read_text())[:4]
    (tmp_path / "nli.json").write_text(json.dumps([x | {"label": ["entailment", "not_entailment"].index(x["label"])}
                                                   for x in items]))
    assert E.read_task(tmp_path, "nli", 4) == E.read_task(FIX / "glue", "nli", 4)


def test_write_summary(tmp_path):
    s = E.summarize([{"efficacy": 1.0, "generalization": 0.5, "specificity": 1.0, "fluency": 6.0}])
    s["general"] = {"sst2": {"f1": 0.5}}
    header = {"method": "lyaplock", "model": "stories260K", "n_edits": 1, "batch_size": 1}
    E.write_summary(tmp_path, s, header)
    j = json.loads((tmp_path / "summary.json").read_text())
    assert {*header, "efficacy", "generalization", "specificity", "score", "fluency"} <= set(j)
    assert j["score"] == pytest.approx(300 / 4) and j["fluency"] == 600
    md = (tmp_path / "summary.md").read_text()
    assert md.startswith("- method: lyaplock\n- model: stories260K\n- n_edits: 1\n- batch_size: 1\n")
    assert "| efficacy | 100.00 |" in md and "| general.sst2.f1 | 0.50 |" in md
    E.write_summary(tmp_path, s, header, pre={"efficacy": 0.0})
    md = (tmp_path / "summary.md").read_text()
    assert "| metric | before | after |" in md and "| efficacy | 0.00 | 100.00 |" in md
    assert "| score |  | 75.00 |" in md
    assert json.loads((tmp_path / "summary.json").read_text())["pre"] == {"efficacy": 0.0}
    with pytest.raises(ValueError, match="n_edits"):
        E.write_summary(tmp_path, s, {"method": "x", "model": "y", "batch_size": 1})
    with pytest.raises(ValueError, match="keys in both header and summary: model"):   # not one silently lost
        E.write_summary(tmp_path, s | {"model": "edited"}, header)
