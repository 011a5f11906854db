"""Tests of the testbed (testbed.py): its streams, run specs, queue summary, a short run and its
report; the fact model's training and the committed model; and the paper's claim on a 200-edit
stream (thresholds at about half the measured margins). The long streams themselves are
measurements (README "Testbed"), not tests."""
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import eval as E
import lyaplock as L
import model as M
import testbed as TB
from data import Request, load_requests, read_corpus

HERE = Path(__file__).parent
FIX = HERE / "fixtures"
FACTMODEL, LAPTOP, STORIES = FIX / "factmodel-ci", FIX / "factmodel-laptop", FIX / "stories260K-hf"


@pytest.fixture(scope="module")
def factmodel():
    return M.load(FACTMODEL)


@pytest.fixture(scope="module")
def ci_records():
    edit, held = TB.records("ci")
    return edit, held, TB.facts(edit + held)


@pytest.mark.parametrize("path, d_mlp", [(FACTMODEL, 384), (STORIES, 172)])
def test_bundled_models_get_the_rule_for_other_sizes(path, d_mlp):
    """λ = d_mlp/4 for LyapLock (and its plug-ins), λ = d_mlp for the MEMIT family, α = 60,
    AlphaEdit L2 = 1, layers 1-2 (README "Hyper-parameters"); a published shape keeps its file's."""
    cfg = M.Config.from_hf(json.loads((path / "config.json").read_text()))
    assert cfg.d_mlp == d_mlp
    for method in L.METHODS:
        hp = L.preset(cfg, method)
        if L.method_of(method).preset == "rome":
            assert hp.layers == (2,)
            continue
        lam = d_mlp / 4 if L.method_of(method).preset == "lyaplock" else d_mlp
        assert (hp.layers, hp.lam, hp.alpha, hp.l2) == ((1, 2), lam, 60.0, 1.0), method
    llama3_8b = dataclasses.replace(cfg, arch="llama", d_model=4096, n_layers=32, d_mlp=14336)
    assert L.preset(llama3_8b, "lyaplock").lam == 1000.0 and L.preset(llama3_8b, "memit").lam == 15000.0
    neox_20b = dataclasses.replace(cfg, arch="gpt_neox", d_model=6144, n_layers=44, d_mlp=24576)
    assert (L.preset(neox_20b, "memit").lam, L.preset(neox_20b, "lyaplock").lam) == (6000.0, 400.0)
    assert L.preset(neox_20b, "rome").layers == (15,)
    phi3_mini = dataclasses.replace(cfg, arch="phi3", d_model=3072, n_layers=32, d_mlp=8192)
    assert (L.preset(phi3_mini, "memit").lam, L.preset(phi3_mini, "lyaplock").lam) == (15000.0, 1000.0)
    assert L.preset(phi3_mini, "rome").layers == (8,)            # no ROME file: the rule for other sizes


def _request(i, prompt="{} is in", subject=None, new="x", true="y"):
    return Request(case_id=i, prompt=prompt, subject=subject or f"s{i}", target_new=new, target_true=true,
                   paraphrase_prompts=(), neighborhood_prompts=(), neighborhood_answers=())


def _steps(requests, batch_size):
    return [requests[i:i + batch_size] for i in range(0, len(requests), batch_size)]


@pytest.mark.parametrize("seed", range(5))
def test_in_steps_never_puts_a_prompt_twice_in_one_step(seed):
    gen = torch.Generator().manual_seed(seed)
    n, batch = int(torch.randint(3, 30, (1,), generator=gen)), int(torch.randint(2, 12, (1,), generator=gen))
    batch = min(batch, n)
    base = [_request(i) for i in range(n)]
    passes = [[base[i] for i in torch.randperm(n, generator=gen).tolist()] for _ in range(4)]
    out = TB.in_steps(passes, batch)
    assert sorted(q.case_id for q in out) == sorted(q.case_id for p in passes for q in p)
    assert out[:n] == passes[0]
    for step in _steps(out, batch):
        assert len({q.rewrite_prompt() for q in step}) == len(step)


def test_churn_targets_always_change_and_are_answers_the_model_can_give(factmodel, ci_records):
    edit, held, fact_list = ci_records
    first = TB.editable(factmodel, edit, held)
    pools, answers = TB.answer_pools(fact_list), {a for _, a, _ in fact_list}
    n = 3 * len(first) + 7
    stream = TB.churn_stream(first, pools, n, 10, seed=0)
    assert len(stream) == n and stream[:len(first)] == first
    latest = {}
    for q in stream:
        p = q.rewrite_prompt()
        assert q.target_new in answers and q.target_new != q.target_true
        assert q.target_new != latest.get(p)                      # a re-edit always changes the target
        same_relation = set(pools[q.prompt]) - {q.target_true, latest.get(p)}
        if p in latest and same_relation:                         # a re-edit: the same relation's answer
            assert q.target_new in same_relation
        latest[p] = q.target_new
    for step in _steps(stream, 10):
        assert len({q.rewrite_prompt() for q in step}) == len(step)
    assert len({q.case_id for q in stream}) == n
    assert stream == TB.churn_stream(first, pools, n, 10, seed=0)          # seeded
    assert stream != TB.churn_stream(first, pools, n, 10, seed=1)


def test_a_stream_that_cannot_be_made_as_promised_is_refused(factmodel, monkeypatch):
    """A churn step larger than the editable subjects (223 on ci) edited a prompt twice, with two
    targets, without a word; a fact model that knows no editable fact (trained a few steps) made
    an empty stream and a KeyError or ZeroDivisionError."""
    first, known = TB.editable(factmodel, *TB.records(TB.SIZES["ci"])[:2]), TB.known   # (each once: the slow part)
    monkeypatch.setattr(TB, "editable", lambda m, edit, held: first)
    monkeypatch.setattr(TB, "known", lambda m, fs: known(m, fs[:10]))
    TB.make_stream("churn", factmodel, FACTMODEL, 446, 223, 0)
    assert len(TB.make_stream("churn", factmodel, FACTMODEL, 200, 300, 0).requests) == 200    # one pass: no twice
    with pytest.raises(ValueError, match="a churn step of 224 would edit one of its 223 editable subjects twice"):
        TB.make_stream("churn", factmodel, FACTMODEL, 900, 224, 0)
    monkeypatch.setattr(TB, "editable", lambda m, edit, held: [])
    for kind in ("first", "churn"):
        with pytest.raises(ValueError, match=f"the '{kind}' stream has no edits .the model knows none"):
            TB.make_stream(kind, factmodel, FACTMODEL, None, 10, 0)
    with pytest.raises(ValueError, match="tells none of its stories .* for a TinyStories model such as stories260K"):
        TB.make_stream("stories", factmodel, FACTMODEL, 20, 10, 0)      # said "at most 0 edits"


def test_answer_pools_are_sorted_so_a_seeded_stream_is_the_same_in_every_process(ci_records):
    """A churn or distinct target is a seeded index into its pool: a pool in set order (which
    string hashing changes from process to process) gave another stream at each run."""
    pools = TB.answer_pools(ci_records[2])
    assert all(pool == sorted(set(pool)) for pool in pools.values()) and len(pools) > 20


def test_churn_fallback_count(factmodel, ci_records):
    """churn_stream's rule, pinned on the ci model's 2,230-edit stream (the README's churn table):
    a re-edit takes another answer trained after its prompt template, but where that template's
    pool holds nothing besides the true answer and the previous target, any answer of any pool.
    That happens for 170 of the 2,007 re-edits, on the 30 subjects whose pool has one or two answers."""
    edit, held, fact_list = ci_records
    first = TB.editable(factmodel, edit, held)
    pools = TB.answer_pools(fact_list)
    every = {a for pool in pools.values() for a in pool}
    stream = TB.churn_stream(first, pools, 2230, 10, seed=0)
    latest, fallbacks = {q.rewrite_prompt(): q.target_new for q in first}, []
    for q in stream[len(first):]:
        rest = set(pools[q.prompt]) - {q.target_true, latest[q.rewrite_prompt()]}
        assert q.target_new in (rest or every - {q.target_true, latest[q.rewrite_prompt()]})
        if not rest:
            fallbacks.append(q)
        latest[q.rewrite_prompt()] = q.target_new
    assert (len(first), len(stream) - len(first), len(fallbacks)) == (223, 2007, 170)
    assert len({q.subject for q in fallbacks}) == 30 == sum(len(pools[q.prompt]) <= 2 for q in first)


def test_held_facts_share_no_prompt_or_subject_with_an_edit_record():
    """Retention is measured on facts no edit can touch: of the held-back records, none with an
    edit record's prompt or subject (laptop had 3 such facts, gpu 142). ci had none: its held
    facts, those of the committed tables, are the same 861."""
    for size in ("ci", "laptop", "gpu"):
        edit, held = TB.records(size)
        kept = TB.held_facts_of(edit, held)
        prompts = {p for r in edit for p in (r.rewrite_prompt(), *r.paraphrase_prompts, *r.neighborhood_prompts)}
        assert not {f[0] for f in kept} & prompts and not {f[2] for f in kept} & {r.subject for r in edit}, size
        assert len(kept) == {"ci": 861, "laptop": 864, "gpu": 7005}[size]


def test_distinct_stream_edits_each_known_subject_once_and_keeps_the_rest_apart(factmodel, ci_records):
    edit, held, fact_list = ci_records
    s = TB.distinct_stream(factmodel, edit, held, seed=0)
    prompts = [q.rewrite_prompt() for q in s.requests]
    subjects = [q.subject for q in s.requests]
    assert len(set(prompts)) == len(prompts) and len(set(subjects)) == len(subjects)
    kept_subjects, kept_prompts = {f[2] for f in s.retained}, {f[0] for f in s.retained}
    assert not kept_subjects & set(subjects)
    edited_prompts = {p for q in s.requests for p in (q.rewrite_prompt(), *q.paraphrase_prompts)}
    assert not kept_prompts & edited_prompts
    assert all(set(q.neighborhood_prompts) <= kept_prompts for q in s.requests)
    answers = {a for _, a, _ in fact_list}
    assert all(q.target_new in answers and q.target_new != q.target_true for q in s.requests)
    assert len(s.requests) > 800 and len(kept_subjects) > 150


def test_distinct_stream_neighbourhood_holds_a_fact_once(monkeypatch):
    """A request's two neighbourhood facts are two: where its relation had one kept-back fact and
    that fact was also the first of all kept back, it was given twice (laptop, --seed 2: 8 requests),
    and specificity counted it twice."""
    fact_list = [(f"S{i} lives in", "AB"[i % 2], f"S{i}") for i in range(5)] + \
                [(f"S{i} plays", "CD"[i % 2], f"S{i}") for i in range(5, 10)]
    monkeypatch.setattr(TB, "known", lambda m, facts: fact_list)
    for seed in range(10):
        s = TB.distinct_stream(None, [], [], seed)
        assert all(len(set(q.neighborhood_prompts)) == len(q.neighborhood_prompts) == 2 for q in s.requests), seed


def _relations(n_subjects=20):
    """Known facts of n_subjects subjects: even ones live in P, Q or R, odd ones play X, Y or Z, each
    also under a second prompt of its relation."""
    out = []
    for i in range(n_subjects):
        a = ("PQR" if i % 2 == 0 else "XYZ")[i % 3]
        first, second = ("{} lives in", "The home of {} is") if i % 2 == 0 else ("{} plays", "{} is good at")
        out += [(first.format(f"S{i}"), a, f"S{i}"), (second.format(f"S{i}"), a, f"S{i}")]
    return out


def test_distinct_stream_requests_follow_their_relation(monkeypatch):
    """A distinct request: a fifth of the subjects kept back, its subject's other prompts as
    paraphrases (not its rewrite prompt), a new target of the same relation, and the kept-back
    facts of that relation as neighbourhood where there are two."""
    fact_list = _relations()
    monkeypatch.setattr(TB, "known", lambda m, facts: fact_list)
    pools, same_relation = TB.answer_pools(fact_list), 0
    for seed in range(5):
        s = TB.distinct_stream(None, [], [], seed)
        assert len({f[2] for f in s.retained}) == 4 and len(s.requests) == 16, seed
        for q in s.requests:
            own = [p for p, _, subject in fact_list if subject == q.subject]
            assert q.paraphrase_prompts == tuple(own[1:]) and q.rewrite_prompt() == own[0]
            assert q.target_new in set(pools[q.prompt]) - {q.target_true}
            kin = [f[0] for f in s.retained if TB.template_of(f[0], f[2]) == q.prompt]
            if len(kin) >= 2:
                assert list(q.neighborhood_prompts) == kin[:2]
                same_relation += 1
    assert same_relation > 10


def test_stories_stream_turns_slots_spreads_neighbours_and_keeps_ten_names(monkeypatch):
    """stories_stream on a model that tells every story: name i is edited at slot i (mod 8), the
    neighbourhoods spread over the retained names, and an edit that would leave fewer than ten
    names to retain is refused."""
    monkeypatch.setattr(TB, "known", lambda m, facts: facts)
    s = TB.stories_stream(None, 16, seed=0)
    slots = list(TB.STORY_SLOTS)
    assert [q.prompt for q in s.requests] == [slots[i % 8] for i in range(16)]
    assert [q.subject for q in s.requests] == list(TB.STORY_NAMES[:16])
    assert len(s.retained) == 8 * (len(TB.STORY_NAMES) - 16)
    assert all(p == q.prompt.format(p.split()[0]) for q in s.requests for p in q.neighborhood_prompts)
    assert len({p.split()[0] for q in s.requests for p in q.neighborhood_prompts}) >= 4
    assert len(TB.stories_stream(None, len(TB.STORY_NAMES) - 10).requests) == len(TB.STORY_NAMES) - 10
    with pytest.raises(ValueError, match=f"at most {len(TB.STORY_NAMES) - 10} edits"):
        TB.stories_stream(None, len(TB.STORY_NAMES) - 9)


def test_make_stream_counts_edits_and_retained_facts_as_asked(factmodel, monkeypatch):
    """make_stream: churn without --edits is ten passes; a stream shorter than asked is refused (not
    fewer edits without a word); n_retained is at most that many retained facts, for first
    the known ones among the first n_retained held-back facts, for distinct its first ones."""
    edit, held = TB.records("ci")
    first = edit[:5]
    monkeypatch.setattr(TB, "editable", lambda m, e, h: first)
    assert len(TB.make_stream("churn", factmodel, FACTMODEL, None, 2, 0, n_retained=1).requests) == 50
    with pytest.raises(ValueError, match="the 'first' stream has only 5 edits; asked for 6"):
        TB.make_stream("first", factmodel, FACTMODEL, 6, 2, 0, n_retained=1)
    s = TB.make_stream("first", factmodel, FACTMODEL, None, 2, 0, n_retained=40)
    held40 = TB.held_facts_of(edit, held)[:40]
    assert s.requests == first and s.retained == [f for f, k in zip(held40, TB.knows(factmodel, held40)) if k]
    monkeypatch.setattr(TB, "known", lambda m, facts: _relations())
    assert len(TB.make_stream("distinct", None, FACTMODEL, None, 2, 0, n_retained=3).retained) == 3


def test_make_stream_refuses_an_unknown_kind_and_a_model_that_is_not_a_fact_model(tmp_path):
    """An unknown stream kind is named (without the check: a churn stream); a model directory
    without training.json (stories260K given --stream first) is one clear error (without the
    check: a FileNotFoundError)."""
    with pytest.raises(ValueError, match="unknown stream 'nosuch'; expected one of first, churn, distinct, stories"):
        TB.make_stream("nosuch", None, tmp_path, 5, 10, 0)
    with pytest.raises(ValueError, match=f"{tmp_path} has no training.json: the 'first' stream needs a fact model"):
        TB.make_stream("first", None, tmp_path, 5, 10, 0)


def test_a_training_json_that_is_not_a_fact_model_s_is_one_line(tmp_path):
    """A model directory whose training.json is not the testbed's (no size, an unknown one, not
    JSON) is named in one clear error (was a KeyError or TypeError traceback, or the JSON error
    alone, naming no file)."""
    for text in ('{"size": "huge"}', "[]", "{", '{"epochs": 3}', '{"size": ["ci"]}'):
        (tmp_path / "training.json").write_text(text)
        with pytest.raises(ValueError, match=f"{tmp_path / 'training.json'}: not a fact model's training.json"):
            TB.make_stream("first", None, tmp_path, 5, 10, 0)


def test_stories_stream_edits_one_told_slot_per_name():
    m = M.load(STORIES)
    s = TB.stories_stream(m, 24, seed=0)
    names = [q.subject for q in s.requests]
    assert len(s.requests) == 24 and len(set(names)) == 24
    assert not {f[2] for f in s.retained} & set(names) and len(s.retained) > 100
    facts = [(q.rewrite_prompt(), q.target_true) for q in s.requests]
    assert all(TB.knows(m, facts)) and all(TB.knows(m, s.retained))
    assert all(q.target_new in TB.STORY_SLOTS[q.prompt][1] for q in s.requests)
    with pytest.raises(ValueError, match="at most 90 edits"):
        TB.stories_stream(m, len(TB.STORY_NAMES))
    whole = TB.make_stream("stories", m, STORIES, None, 4, 0)       # --edits 0: the whole stream (it stopped at 80)
    assert len(whole.requests) == 90 and len({q.subject for q in whole.requests}) == 90


def test_run_specs_give_typed_overrides_and_clear_errors():
    assert TB.parse_run("lyaplock") == ("lyaplock", {})
    assert TB.parse_run("lyaplock:alpha=30:superseded=remove") == (
        "lyaplock", {"alpha": 30.0, "superseded": "remove"})
    assert TB.parse_run("memit:v_num_grad_steps=5") == ("memit", {"v_num_grad_steps": 5})
    assert TB.parse_run("rome:mom2_adjustment=False") == ("rome", {"mom2_adjustment": False})
    assert TB.parse_run("lyaplock+alphaedit:lam=5:l2=10:V=2")[1] == {"lam": 5.0, "l2": 10.0, "V": 2.0}
    for bad, match in (("nosuch", "unknown method"), ("lyaplock:alpha", "field=value"),
                       ("lyaplock:colour=3", "field=value"), ("lyaplock:alpha=big", "alpha needs a float"),
                       ("lyaplock:__init__=1", "field=value"),
                       # each of these was accepted (a wrong value, or a copy of the plain run) or a traceback
                       ("memit:v_num_grad_steps=2.9", "v_num_grad_steps needs an integer, got '2.9'"),
                       ("lyaplock:v_num_grad_steps=inf", "v_num_grad_steps needs an integer, got 'inf'"),
                       ("rome:mom2_adjustment=yes", "mom2_adjustment needs true or false, got 'yes'"),
                       ("lyaplock:batch_size=5", "batch_size is not set per run; give --batch-size"),
                       ("lyaplock:layers=1", "layers is not set per run; give --layers"),
                       ("lyaplock:alpha=30:alpha=10", "alpha is set twice"),
                       ("memit:alpha=10", "memit does not read alpha"), ("memit:V=2", "memit does not read V"),
                       ("memit:superseded=remove", "memit does not read superseded"),
                       ("rome:lam=5", "rome does not read lam"), ("alphaedit:lam=5", "alphaedit does not read lam"),
                       ("memit:l2=1", "memit does not read l2"),
                       ("lyaplock:mom2_adjustment=false", "lyaplock does not read mom2_adjustment")):
        with pytest.raises(ValueError, match=re.escape(match)):
            TB.parse_run(bad)


@pytest.mark.parametrize("method", [m for m in L.METHODS if L.method_of(m).locate != "rome"])
def test_run_specs_refuse_exactly_the_fields_a_method_does_not_read(method):
    """lyaplock.unread against the methods themselves: two steps of step_layer (the second re-editing a
    prompt, with the queue above its floor, where λ and V weigh E22) with one field changed give
    other weights exactly when unread says the method reads it. (mom2_adjustment is ROME's, whose
    one-request path is not step_layer: E18.)"""
    g = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, dtype=torch.float64, generator=g)
    d, m = 5, 8
    K0 = r(m, 3 * m)
    ev, U = torch.linalg.eigh(K0 @ K0.T / (3 * m))
    ev[:m // 2] = 1e-3                                  # a null space for AlphaEdit's family (E11)
    C, W0 = U @ torch.diag(ev) @ U.T, r(d, m)
    steps = [(r(m, 2), r(d, 2), prompts) for prompts in (["a", "b"], ["a", "c"])]    # "a" edited again
    base = dict(method=method, lam=1.0, alpha=0.5, V=1.0, l2=1.0, superseded="keep")   # z = 2 after step 0

    def edited(**change):
        hp, ls, W = L.HParams(**{**base, **change}), L.LayerState(), W0
        for K1, R, prompts in steps:
            W, _ = L.step_layer(W, W0, C, K1, R, ls, hp, prompts)
        return W
    plain = edited()
    for name, value in dict(lam=3.0, alpha=0.05, V=3.0, l2=10.0, superseded="remove").items():
        reads = not L.unread(method, name)
        assert (not torch.equal(edited(**{name: value}), plain)) == reads, name


def test_experiment_checks_every_run_before_the_first_and_errors_in_one_line(tmp_path, monkeypatch, capsys):
    """A bad run late in --methods used to surface as a traceback after the earlier runs' minutes."""
    monkeypatch.setattr(TB, "make_stream", lambda *a, **k: pytest.fail("the stream was made"))
    threads = ["--threads", str(torch.get_num_threads())]             # as the suite runs
    for methods, message in (
            ("lyaplock,memit:lam=big", "run 'memit:lam=big': lam needs a float, got 'big'"),
            ("lyaplock,lyaplock:lam=inf", "run 'lyaplock:lam=inf': hyper-parameter lam must be positive, got inf"),
            ("lyaplock,nosuch", "unknown method 'nosuch'"),
            ("lyaplock,lyaplock:batch_size=5", "run 'lyaplock:batch_size=5': batch_size is not set per run"),
            ("memit:v_num_grad_steps=inf", "run 'memit:v_num_grad_steps=inf': v_num_grad_steps needs an integer")):
        assert TB.main(["experiment", "--methods", methods, "--out", str(tmp_path / "out"), *threads]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"error: {message}") and err.count("\n") == 1
    assert TB.main(["experiment", "--layers", "1,x", "--out", str(tmp_path / "out"), *threads]) == 1
    assert capsys.readouterr().err.startswith("error: --layers '1,x': give increasing layer numbers")
    monkeypatch.setattr(TB, "make_stream", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    assert TB.main(["experiment", "--out", str(tmp_path / "out"), *threads]) == 130
    assert capsys.readouterr().err == "\ninterrupted\n"       # (no report yet: no runs kept to promise)
    assert not (tmp_path / "out").exists()
    import os
    import signal
    monkeypatch.setattr(TB, "make_stream", lambda *a, **k: os.kill(os.getpid(), signal.SIGTERM))   # `timeout`
    previous = signal.signal(signal.SIGTERM, lambda *_: pytest.fail("the SIGTERM reached the caller's handler"))
    try:
        with pytest.raises(SystemExit) as stop:
            TB.main(["experiment", "--out", str(tmp_path / "out"), *threads])
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert stop.value.code == 128 + signal.SIGTERM and capsys.readouterr().err == "\nstopped (SIGTERM)\n"


def test_experiment_refuses_eval_every_and_edits_below_one_before_any_work(tmp_path, monkeypatch, capsys):
    """--eval-every 0 was a ZeroDivisionError after the first step, --edits -5 all edits but the
    last five; --edits 0 is the whole stream (None)."""
    monkeypatch.setattr(M, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    threads = ["--threads", str(torch.get_num_threads())]
    for flags, message in ((["--eval-every", "0"], "--eval-every 0: give a number of steps of at least 1"),
                           (["--eval-every", "-2"], "--eval-every -2: give a number of steps of at least 1"),
                           (["--edits", "-5"], "--edits -5: give a number of edits of at least 1 "
                                                   "(0: the whole stream)"),
                           (["--seed", str(10 ** 20)], f"--seed {10 ** 20}: give a whole number from -2**63 to "
                                                       "2**63 - 1")):      # (was 'Overflow when unpacking long long')
        assert TB.main(["experiment", *flags, "--out", str(tmp_path / "out"), *threads]) == 1
        assert capsys.readouterr().err == f"error: {message}\n"
    asked = []
    monkeypatch.setattr(TB, "experiment", lambda model, n_edits, *a, **k: asked.append(n_edits))
    assert TB.main(["experiment", "--edits", "0", "--out", str(tmp_path / "out"), *threads]) == 0
    assert asked == [None]


def test_latest_requests_keep_each_prompt_s_last_target_in_first_edit_order():
    """What measure scores: a prompt edited again is scored on its latest target, where it was
    first edited in the stream."""
    a1, b, a2 = _request(0, subject="A", new="x"), _request(1, subject="B", new="y"), _request(2, subject="A", new="z")
    assert TB.latest_requests([a1, b, a2]) == [a2, b]


def test_measure_scores_latest_targets_retention_in_percent_and_drift_against_w0(monkeypatch):
    """A point scores each prompt's latest target of the first n_done edits (0: of the whole stream),
    retention in percent, and drift ‖W − W0‖/‖W0‖ (here ‖1‖/‖2‖)."""
    reqs = [_request(0, subject="A", new="x"), _request(1, subject="B"), _request(2, subject="A", new="z")]
    scored = []
    monkeypatch.setattr(E, "edit_eval", lambda m, requests: scored.append(list(requests)) or [])
    monkeypatch.setattr(E, "summarize", lambda cases: dict(efficacy=1.0, generalization=2.0, specificity=3.0))
    monkeypatch.setattr(E, "perplexity", lambda m, texts: 7.0)
    monkeypatch.setattr(TB, "fact_accuracy", lambda m, facts: 0.25 * len(facts))
    model = type("Model", (), {"edit_weight": staticmethod(lambda l: torch.full((2, 2), 3.0))})()
    stream, W0 = TB.Stream(reqs, [("p", "a", "s")] * 2), {1: torch.full((2, 2), 2.0)}
    assert TB.measure(model, stream, 3, [], W0) == dict(edits=3, efficacy=1.0, generalization=2.0, specificity=3.0,
                                                        retention=50.0, perplexity=7.0, drift={"1": 0.5})
    TB.measure(model, stream, 2, [], W0)
    TB.measure(model, stream, 0, [], W0)
    assert scored == [[reqs[2], reqs[1]], [reqs[0], reqs[1]], [reqs[2], reqs[1]]]


def test_churn_stream_visits_the_subjects_in_a_new_order_each_pass_and_never_twice_a_step():
    """Five subjects, three a step, ten passes: each later pass in its own seeded order, and a pass
    that begins inside a step does not edit a prompt of that step again."""
    first = [_request(i, true="t") for i in range(5)]
    stream = TB.churn_stream(first, {"{} is in": ["a", "b", "c", "t"]}, 50, 3, seed=0)
    assert len(stream) == 50 and stream[:5] == first
    for step in _steps(stream, 3):
        assert len({q.rewrite_prompt() for q in step}) == len(step)
    orders = [[q.subject for q in stream if str(q.case_id).endswith(f".{p}")] for p in range(1, 10)]
    assert sum(order != [q.subject for q in first] for order in orders) >= 8


def test_queue_summary_tells_a_growing_queue_from_a_floor_and_a_growing_pl():
    z = [1.0, 1.0, 1.5, 2.2, 3.0, 3.9, 4.8, 5.9]
    steps = [{"layers": {"1": {"pl": 1.0 + t, "D": 2.0, "z": z[t]}, "2": {"pl": 0.1, "D": 2.0, "z": 1.0}}}
             for t in range(8)]
    q = TB.queue_summary(steps)
    assert q["1"]["trend"] == "growing" and q["1"]["z_T"] == 5.9 and q["1"]["z_over_T"] == pytest.approx(5.9 / 8)
    assert q["2"]["trend"] == "floor"
    memit = [{"layers": {"1": {"pl": 0.1 * (t + 1) ** 2, "D": None, "z": None}}} for t in range(8)]
    assert TB.queue_summary(memit)["1"]["pl_grows"] is True


def test_queue_summary_gives_the_last_step_s_pl():
    """pl_last, z_T and z(T)/T are the end of the stream's (not the largest), with a queue and without."""
    pl = [1.0, 4.0, 3.0, 2.0]
    for z in (None, [1.0, 3.0, 2.5, 2.0]):
        steps = [{"layers": {"1": {"pl": pl[t], "D": 2.0, "z": z and z[t]}}} for t in range(4)]
        q = TB.queue_summary(steps)["1"]
        assert q["pl_last"] == 2.0 and (z is None or (q["z_T"], q["z_over_T"]) == (2.0, 0.5)), z


def test_run_stream_measures_at_the_end_whatever_eval_every(monkeypatch):
    """A run's last point is at the end of the stream also where eval_every does not divide its
    steps (5 edits, 2 a step, every 2 steps: at 4 and at 5), and the report is written at each."""
    from contextlib import contextmanager
    from types import SimpleNamespace

    class Editor:
        hparams, state, W0 = SimpleNamespace(batch_size=2), SimpleNamespace(n_edits=0), {}

        def edit(self, requests):
            self.state.n_edits += len(requests)
            return {"edits": self.state.n_edits, "layers": {}}

        @contextmanager
        def restrained(self):
            yield None
    monkeypatch.setattr(TB, "measure", lambda m, stream, done, heldout, W0: {"edits": done})
    run, reports = dict(label="x", steps=[], points=[]), []
    TB.run_stream(Editor(), TB.Stream([_request(i) for i in range(5)], []), [], run, 2,
                  lambda: reports.append(len(run["points"])), log=lambda *_: None)
    assert [p["edits"] for p in run["points"]] == [4, 5] and [s["edits"] for s in run["steps"]] == [2, 4, 5]
    assert reports == [1, 2]


RUNS = ("lyaplock:v_num_grad_steps=3:alpha=2", "memit:v_num_grad_steps=3", "rome:v_num_grad_steps=3")


def _short(out, cache, log):
    return TB.experiment(FACTMODEL, 4, 2, RUNS, eval_every=1, stats_tokens=3000, out=out, stats_cache=cache,
                         stream="churn", n_retained=40, n_heldout=2, log=log)


def _stop(line):
    raise RuntimeError(line)


def test_short_churn_run_survives_a_stop_logs_every_step_and_point_and_is_not_rerun(tmp_path, monkeypatch, capsys):
    out, cache = tmp_path / "tb", tmp_path / "c"
    monkeypatch.setattr(TB, "PROGRESS_SECONDS", 0.0)
    with pytest.raises(RuntimeError, match="2 edits"):                  # stopped at its first point
        _short(out, cache, _stop)
    r = json.loads((out / "result.json").read_text())
    assert list(r["methods"]) == [RUNS[0]] and [p["edits"] for p in r["methods"][RUNS[0]]["points"]] == [2]
    assert f"| {RUNS[0]} | 2 |" in (out / "table.md").read_text()
    lines, _ = [], capsys.readouterr()
    r = _short(out, cache, lines.append)                                # the stopped run starts again
    progress = [l for l in capsys.readouterr().err.splitlines() if "edits/s" in l]
    assert len(progress) == 3 and all("2/4 edits" in l and "ETA" in l for l in progress)   # between points
    assert len(lines) == 6 and r["stream"] == "churn" and r["n_edits"] == 4 and list(r["methods"]) == list(RUNS)
    assert {"efficacy", "retention", "perplexity"} <= set(r["before"]) and 30 <= r["held_facts"] <= 40
    for name, run in r["methods"].items():
        layers = {"2"} if name.startswith("rome") else {"1", "2"}             # ROME: the last edit layer
        assert [s["edits"] for s in run["steps"]] == [p["edits"] for p in run["points"]] == [2, 4]
        for s in run["steps"]:
            assert set(s["layers"]) == layers and all({"pl", "D", "z"} <= set(v) for v in s["layers"].values())
        assert all(set(p["drift"]) == layers and p["drift"]["2"] > 0 for p in run["points"])
        assert set(run["queue"]) == layers
    ly = r["methods"][RUNS[0]]
    assert ly["hparams"]["alpha"] == 2.0 and ly["steps"][-1]["layers"]["2"]["z"] >= 1
    assert f"| {RUNS[1]} | 4 |" in (out / "table.md").read_text()
    for f in ("frontier.svg", "efficacy.svg", "perplexity.svg", "retention.svg", "queue.svg", "pl_layer2.svg"):
        assert (out / f).read_text().startswith("<svg")
    said = []
    again = _short(out, cache, said.append)                             # both complete: nothing reruns,
    assert again["methods"] == json.loads(json.dumps(r["methods"]))     # and it says so (it said nothing)
    assert said == [f"{spec:>12}  complete in {out} with these settings: kept, not rerun" for spec in RUNS]


def test_an_experiment_into_a_directory_of_other_files_is_refused(tmp_path):
    """`train` refuses an --out holding files; `experiment` wrote its report among them."""
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=f"--out {tmp_path} holds other files than a testbed report"):
        TB.experiment(FACTMODEL, 2, 2, ("memit",), out=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def _tiny(model, out, methods, log, **over):
    """Two edits in one step, scored on 10 held facts and 2 texts: a report in seconds."""
    kw = dict(eval_every=1, stats_tokens=3000, out=out, stats_cache=out.parent / "c", n_retained=10, n_heldout=2)
    return TB.experiment(model, 2, 2, methods, log=log, **{**kw, **over})


def test_rome_alone_writes_its_report(tmp_path):
    """ROME edits only the last layer: a report of ROME alone, or of ROME first at its first point,
    has no PL for layer 1 (svg_plot of nothing was "min() arg is an empty sequence", after ROME's
    minutes)."""
    out = tmp_path / "tb"
    r = _tiny(FACTMODEL, out, ("rome:v_num_grad_steps=1",), lambda *_: None)
    assert [p["edits"] for p in r["methods"]["rome:v_num_grad_steps=1"]["points"]] == [2]
    assert (out / "pl_layer2.svg").read_text().startswith("<svg") and not (out / "pl_layer1.svg").exists()
    assert "| rome:v_num_grad_steps=1 | 2 |" in (out / "table.md").read_text()


def test_model_digest_changes_with_the_weights_the_config_and_the_tokenizer(tmp_path):
    """A model retrained at the same path gets another digest, and so does one with another tokenizer
    (its token ids are other ids: an earlier run on it is no run on this one)."""
    shutil.copytree(FACTMODEL, tmp_path / "m")
    seen = [TB.model_digest(tmp_path / "m")]
    for name in ("tokenizer_config.json", "config.json"):
        with open(tmp_path / "m" / name, "a") as f:
            f.write(" ")
        seen.append(TB.model_digest(tmp_path / "m"))
    assert seen[0] == TB.model_digest(FACTMODEL) and len(set(seen)) == 3


def test_finished_runs_are_kept_only_under_the_same_settings(tmp_path):
    """A finished run in --out is reused (and kept in the report) only if everything its figures
    depend on is the same: among them the statistics corpus's bytes, the statistics' token count,
    the evaluation points, the held-out texts and the model's weights (not its path: the same
    model given as fixtures/factmodel-ci or by its absolute path dropped every run)."""
    base = dict(model="m", weights="a" * 64, stream="first", n_edits=2, batch_size=2, layers=[1, 2], seed=0,
                held_facts=10, corpus="m/corpus.txt", corpus_sha256="b" * 64, stats_tokens=3000, eval_every=1,
                n_heldout=2)
    at = lambda edits: dict(edits=edits, efficacy=0.0, generalization=0.0, specificity=0.0, retention=0.0,
                            perplexity=1.0, drift={})
    done = dict(label="memit", steps=[], points=[at(2)], hparams={})
    (tmp_path / "result.json").write_text(json.dumps({**base, "methods": {
        "memit": done, "rome": dict(done, points=[at(1)])}}))              # rome: not finished
    assert TB.finished_runs(tmp_path, {**base, "methods": {}}) == {"memit": done}
    assert TB.finished_runs(tmp_path, {**base, "model": "/elsewhere/m", "methods": {}}) == {"memit": done}
    for key, value in (("weights", "c" * 64), ("corpus_sha256", "d" * 64), ("stats_tokens", 0),
                       ("eval_every", 2), ("n_heldout", 3), ("n_edits", 4), ("layers", [2])):
        lines = []
        assert TB.finished_runs(tmp_path, {**base, key: value, "methods": {}}, lines.append) == {}, key
        assert lines == [f"{tmp_path / 'result.json'}: earlier runs dropped, their settings differ ({key}): "
                         "memit, rome"]                         # one line names them and why
    older = {k: v for k, v in base.items() if k != "weights"}           # a report from before the key
    (tmp_path / "result.json").write_text(json.dumps({**older, "methods": {"memit": done}}))
    assert TB.finished_runs(tmp_path, {**base, "methods": {}}) == {}


def test_every_same_setting_drops_an_earlier_run_and_a_damaged_report_is_named(tmp_path):
    """Each of SAME_SETTINGS differing drops the earlier runs (the stream, batch size, seed and
    retained facts were not tried); a run with no point is not complete (not an IndexError); a
    report whose methods are not a mapping is named (not an AttributeError)."""
    base = dict(model="m", weights="a", stream="first", n_edits=2, batch_size=2, layers=[1, 2], seed=0,
                held_facts=10, corpus="c", corpus_sha256="b", stats_tokens=3000, eval_every=1, n_heldout=2)
    assert set(TB.SAME_SETTINGS) == set(base) - {"model", "corpus"}
    point = dict(edits=2, efficacy=0.0, generalization=0.0, specificity=0.0, retention=0.0, perplexity=1.0, drift={})
    done = dict(label="memit", steps=[], points=[point], hparams={})
    runs = {"memit": done, "rome": dict(done, points=[])}
    (tmp_path / "result.json").write_text(json.dumps({**base, "methods": runs}))
    assert TB.finished_runs(tmp_path, {**base, "methods": {}}) == {"memit": done}
    for key in TB.SAME_SETTINGS:
        assert TB.finished_runs(tmp_path, {**base, key: "other", "methods": {}}, lambda *_: None) == {}, key
    (tmp_path / "result.json").write_text(json.dumps({**base, "methods": []}))
    with pytest.raises(ValueError, match="not a testbed report's result"):
        TB.earlier_report(tmp_path)


def test_experiment_takes_edits_0_as_the_whole_stream_and_refuses_an_out_that_is_a_file(tmp_path, monkeypatch):
    """experiment(n_edits=0) is the whole stream as --edits 0 is (None); an --out that is a file is
    refused naming it (not "[Errno 17] File exists")."""
    asked = []
    monkeypatch.setattr(TB, "run_experiment", lambda model, n_edits, *a: asked.append(n_edits))
    TB.experiment(FACTMODEL, 0, 2, ("memit",))
    assert asked == [None]
    (tmp_path / "out").write_text("mine")
    with pytest.raises(ValueError, match=f"--out {tmp_path / 'out'} holds other files than a testbed report"):
        TB.experiment(FACTMODEL, 2, 2, ("memit",), out=tmp_path / "out")
    assert (tmp_path / "out").read_text() == "mine" and asked == [None]


def test_a_kept_run_whose_settings_changed_is_run_again_and_its_old_settings_are_free(tmp_path, monkeypatch, factmodel):
    """A run complete in --out under a name this call lists, but with other settings (its preset
    changed since), is run again, not kept; another name given its old settings is no copy of it
    and runs too. (The editing is a stub here: the bookkeeping is what is tested.)"""
    at = lambda edits: dict(edits=edits, efficacy=0.0, generalization=0.0, specificity=0.0, retention=0.0,
                            perplexity=1.0, drift={})
    ran = []

    def run_stream(editor, stream, heldout, run, eval_every, report, log):
        ran.append(run["label"])
        run["steps"].append(dict(edits=1, layers={}))
        run["points"].append(at(1))
        report()
    for name, value in (("load", lambda *a, **k: factmodel),
                        ("make_stream", lambda *a, **k: TB.Stream([_request(0)], [])),
                        ("model_digest", lambda d: "w"), ("measure", lambda *a: at(0)), ("run_stream", run_stream),
                        ("write_report", lambda result, out: (out / "result.json").write_text(json.dumps(result)))):
        monkeypatch.setattr(TB.M if name == "load" else TB, name, value)
    monkeypatch.setattr(L.stats, "load_or_collect_stats", lambda *a, **k: None)
    monkeypatch.setattr(L, "Editor", lambda *a, **k: None)
    monkeypatch.setattr(L, "method_templates", lambda *a: None)
    out = tmp_path / "tb"
    TB.experiment(FACTMODEL, 1, 1, ("memit",), out=out, log=lambda *_: None)
    report = json.loads((out / "result.json").read_text())
    report["methods"]["memit"]["hparams"]["lam"] = 1.0                    # as an older preset gave it
    (out / "result.json").write_text(json.dumps(report))
    r = TB.experiment(FACTMODEL, 1, 1, ("memit", "memit:lam=1.0"), out=out, log=lambda *_: None)
    assert ran == ["memit", "memit", "memit:lam=1.0"] and r["methods"]["memit"]["hparams"]["lam"] != 1.0


def _result(runs: dict, layers=(1, 2)) -> dict:
    """A report's result.json with `runs`: name -> z (None: no queue), two points of fake numbers."""
    step = lambda e, z: dict(edits=e, layers={str(l): dict(pl=0.1 * e, D=0.2, z=z) for l in layers})
    point = lambda e: dict(edits=e, efficacy=50.0, generalization=40.0, specificity=90.0, retention=80.0,
                           perplexity=100.0 + e, drift={str(l): 0.01 * e for l in layers})
    methods = {k: dict(label=k, steps=[step(e, z) for e in (2, 4)], points=[point(e) for e in (2, 4)],
                       seconds=1.0, hparams=dict(method=k)) for k, z in runs.items()}
    return dict(layers=list(layers), n_edits=4, methods=methods)


def test_report_table_gives_the_last_layer_s_pl_z_and_drift():
    """table.md's row: the last edit layer's PL, z (– without a queue) and drift at each point."""
    result = _result({"lyaplock": 3.0, "memit": None}, layers=(1, 3))
    result["methods"]["lyaplock"]["steps"][0]["layers"]["3"]["z"] = 1.5         # each point: its own step's z
    rows = TB.report_table(result)
    assert rows[0].endswith("| PL L3 | z L3 | ‖ΔW‖/‖W0‖ L3 |")
    assert rows[2:] == ["| lyaplock | 2 | 50.0 | 40.0 | 90.0 | 80.0 | 102.0 | 0.2 | 1.50 | 0.02 |",
                        "| lyaplock | 4 | 50.0 | 40.0 | 90.0 | 80.0 | 104.0 | 0.4 | 3.00 | 0.04 |",
                        "| memit | 2 | 50.0 | 40.0 | 90.0 | 80.0 | 102.0 | 0.2 | – | 0.02 |",
                        "| memit | 4 | 50.0 | 40.0 | 90.0 | 80.0 | 104.0 | 0.4 | – | 0.04 |"]


def test_pl_figures_draw_the_first_queue_s_threshold():
    """pl_layer*.svg: the dashed threshold D of the first run with a queue, named in the title."""
    figs = TB.report_figures(_result({"memit": None, "lyaplock": 3.0}))
    assert all('stroke="gray" stroke-dasharray="5,4"' in figs[f] and "(dashed: lyaplock's threshold D)" in figs[f]
               for f in ("pl_layer1.svg", "pl_layer2.svg"))
    assert 'stroke="gray" stroke-dasharray' not in TB.report_figures(_result({"memit": None}))["pl_layer2.svg"]
    dashed = []
    for D in (0.25, 0.35):                            # a second queue's D moves no threshold
        result = _result({"memit": None, "lyaplock": 3.0, "lyaplock:alpha=30": 2.0})
        for step in result["methods"]["lyaplock:alpha=30"]["steps"]:
            step["layers"]["2"]["D"] = D
        dashed.append(re.findall(r'<[^>]*stroke-dasharray[^>]*>', TB.report_figures(result)["pl_layer2.svg"]))
    assert dashed[0] == dashed[1] and dashed[0]


def test_a_report_into_a_reused_out_removes_its_stale_figures(tmp_path):
    """--methods lyaplock then --methods memit with other settings into one --out: result.json and
    table.md held only memit, but queue.svg (and a layer no run edits now) still plotted lyaplock.
    Only the report's own figure names are removed."""
    out = tmp_path / "tb"
    TB.write_report(_result({"lyaplock": 3.0}), out)
    assert {"queue.svg", "pl_layer1.svg", "pl_layer2.svg"} <= {f.name for f in out.iterdir()}
    (out / "notes.svg").write_text("<svg/>")
    (out / "pl_layer1.svg.bak").write_text("keep")
    TB.write_report(_result({"memit": None}, layers=(2,)), out)
    assert "PL and z are the stream's" not in (out / "table.md").read_text()
    assert TB.report_table(_result({"prune": None, "memit": None}))[-1].startswith("prune: PL and z are the stream's")
    names = {f.name for f in out.iterdir()}
    assert names == {"result.json", "table.md", "pl_layer2.svg", "retention.svg", "efficacy.svg",
                     "perplexity.svg", "frontier.svg", "notes.svg", "pl_layer1.svg.bak"}
    assert all("lyaplock" not in (out / f).read_text() for f in names if f.endswith(".svg"))


def test_a_report_says_which_runs_are_not_at_the_end_of_the_stream(tmp_path):
    """A report rewritten at each point and left by an interrupt: memit's run at 2 of 4 edits was
    a row like any other, and the frontier, titled "at the last point (4 edits)", put it beside
    lyaplock's at 4."""
    result = _result({"lyaplock": 3.0, "memit": None})
    whole = TB.report_table(result)
    assert not any("Not at the end" in row for row in whole)
    assert "at the last point (4 edits)</text>" in TB.report_figures(result)["frontier.svg"]
    memit = result["methods"]["memit"]
    memit["steps"], memit["points"] = memit["steps"][:1], memit["points"][:1]
    assert TB.report_table(result)[-1] == ("Not at the end of the stream (4 edits) yet: memit (2); the same command "
                                           "completes them")
    assert "at the last point (4 edits; so far memit 2)</text>" in TB.report_figures(result)["frontier.svg"]


def test_a_rerun_keeps_the_other_finished_runs_and_reruns_on_a_retrained_model(tmp_path):
    """--methods a, then --methods b in the same --out: the report holds both (it held only b).
    The model retrained at the same path (here a tensor above the edit layers changed, so even the
    statistics are the same): every run is stale, and the listed one reruns."""
    model, out = tmp_path / "model", tmp_path / "tb"
    model.mkdir()
    for f in FACTMODEL.iterdir():
        (model / f.name).write_bytes(f.read_bytes())
    a, b = "memit:v_num_grad_steps=1", "memit-seq:v_num_grad_steps=1"
    lines = []
    first = _tiny(model, out, (a,), lines.append)
    assert len(lines) == 1
    second = _tiny(model, out, (b,), lines.append)
    assert len(lines) == 2 and list(second["methods"]) == [a, b] and second["methods"][a] == first["methods"][a]
    assert list(json.loads((out / "result.json").read_text())["methods"]) == [a, b]
    table = (out / "table.md").read_text()
    assert f"| {a} | 2 |" in table and f"| {b} | 2 |" in table
    assert list(_tiny(model, out, (a,), lines.append)["methods"]) == [a, b]       # nothing reruns, and it says so
    assert lines[2:] == [f"{a:>12}  complete in {out} with these settings: kept, not rerun"]
    alias = f"{a}:lam={L.preset(M.checkpoint_config(model), 'memit').lam}"      # a's settings, another name
    with pytest.raises(ValueError, match=f"--methods: {alias} is the run {a} complete in {out} .the same settings."):
        _tiny(model, out, (alias,), lines.append)                               # (it ran again, a second row)
    from safetensors.torch import load_file, save_file
    weights = load_file(model / "model.safetensors")
    weights["model.norm.weight"] *= 1.01
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    third = _tiny(model, out, (a,), lines.append)
    assert len(lines) == 5 and list(third["methods"]) == [a] and third["weights"] != first["weights"]
    assert lines[3] == f"{out / 'result.json'}: earlier runs dropped, their settings differ (weights): {a}, {b}"
    assert len(list((tmp_path / "c").iterdir())) == 1              # the statistics' key did not see it


# ==================== the fact model (moved from test_lyaplock.py)
@pytest.mark.parametrize("fails", [False, True])
def test_training_on_cuda_turns_tf32_on_and_back_as_it_was(tmp_path, monkeypatch, fails):
    """train on a GPU runs its matmuls in TF32, process-wide flags: after it, ended or failed,
    they are as before (an experiment in the same process edits in float32). The training is a
    stub here, which sees the flags on."""
    seen = []

    def stub(*a, **k):
        seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
        if fails:
            raise InterruptedError("stopped")
        return {}
    monkeypatch.setattr(TB, "prepare" if fails else "train_model", stub)
    monkeypatch.setattr(TB.M, "check_device", lambda device: None)          # (no GPU needed: a stub trains)
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, False
    try:
        if fails:
            with pytest.raises(InterruptedError):
                TB.train(tmp_path / "m", "ci", device="cuda", steps=1, log=lambda *_: None)
        else:
            TB.train(tmp_path / "m", "ci", device="cuda", steps=1, log=lambda *_: None)
        assert seen == [(True, True)]
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (False, False)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_training_refuses_a_directory_of_other_files_and_says_it_replaces_a_fact_model(tmp_path, monkeypatch):
    """--out holding files and no fact model is refused before any work (the README's command
    wrote over the committed fixture without a word); an earlier fact model's is trained again,
    said in a line."""
    monkeypatch.setattr(TB, "train_model", lambda *a, **k: {})
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=f"--out {other} holds files and no fact model .training.json.: give a new"):
        TB.train(other, "ci", log=lambda *_: pytest.fail("it went on"))
    model = tmp_path / "model"
    model.mkdir()
    (model / "training.json").write_text("{}")
    lines = []
    TB.train(model, "ci", log=lines.append)
    assert lines == [f"training again into {model}: its fact model is replaced", f"written to {model}"]
    lines.clear()
    TB.train(tmp_path / "new", "ci", log=lines.append)
    assert lines == [f"written to {tmp_path / 'new'}"]


def test_training_again_replaces_the_model_s_files_and_keeps_the_others(tmp_path, monkeypatch):
    """Training into an earlier fact model's --out replaces its files; others there (a report
    written beside the model, notes) are kept: they were deleted without a word."""
    def fake(work, *a, **k):
        for name in ("config.json", "training.json"):
            (Path(work) / name).write_text("new")
        return {}
    monkeypatch.setattr(TB, "train_model", fake)
    model = tmp_path / "model"
    (model / "testbed").mkdir(parents=True)
    for name in ("config.json", "training.json", "notes.txt", "testbed/result.json"):
        (model / name).write_text("old")
    TB.train(model, "ci", log=lambda *_: None)
    assert {str(f.relative_to(model)): f.read_text() for f in model.rglob("*") if f.is_file()} == {
        "config.json": "new", "training.json": "new", "notes.txt": "old", "testbed/result.json": "old"}


def test_training_s_out_checks_keep_what_is_there(tmp_path, monkeypatch):
    """--out a file is refused naming it (not "[Errno 17] File exists"); an --out that existed empty
    is left in place by a failed training (only one made for it is removed); a .training-* left by a
    killed training is no file of the user's: the directory is trained into."""
    fails = lambda *a, **k: (_ for _ in ()).throw(InterruptedError("stopped"))
    monkeypatch.setattr(TB, "train_model", fails)
    (tmp_path / "file").write_text("mine")
    with pytest.raises(ValueError, match=f"--out {tmp_path / 'file'} is a file; give a directory"):
        TB.train(tmp_path / "file", "ci", log=lambda *_: None)
    assert (tmp_path / "file").read_text() == "mine"
    (tmp_path / "empty").mkdir()
    with pytest.raises(InterruptedError):
        TB.train(tmp_path / "empty", "ci", log=lambda *_: None)
    assert (tmp_path / "empty").is_dir()
    (tmp_path / "killed" / ".training-x1").mkdir(parents=True)
    monkeypatch.setattr(TB, "train_model", lambda work, *a, **k: (Path(work) / "training.json").write_text("{}"))
    TB.train(tmp_path / "killed", "ci", log=lambda *_: None)
    assert (tmp_path / "killed" / "training.json").exists()


def test_move_in_puts_training_json_last_and_an_error_leaves_the_earlier_model_as_it_was(tmp_path, monkeypatch):
    """training.json, which marks a fact model, is moved in last (a kill before it leaves no marked
    half model); a failure on it takes back the new files already moved, also those the earlier
    model had no file of (a new family's), and puts the earlier ones back."""
    work, out = tmp_path / "work", tmp_path / "out"
    for d, names, text in ((work, ("a.json", "training.json", "z.json", "new.bin"), "new"),
                           (out, ("a.json", "training.json", "z.json", "notes.txt"), "old")):
        d.mkdir()
        for name in names:
            (d / name).write_text(text)
    real, into = Path.rename, []

    def rename(self, to):
        if Path(to).parent == out:
            into.append(Path(to).name)
        return real(self, to)
    monkeypatch.setattr(Path, "rename", rename)
    TB.move_in(work, out)
    assert into[-1] == "training.json" and len(into) == 4
    assert {f.name: f.read_text() for f in out.iterdir()} == {
        "a.json": "new", "training.json": "new", "z.json": "new", "new.bin": "new", "notes.txt": "old"}
    for name in ("a.json", "training.json", "z.json", "extra.bin"):       # extra.bin: none in out
        (work / name).write_text("newer")
    before = {f.name: f.read_text() for f in out.iterdir()}
    fail = lambda self, to: (_ for _ in ()).throw(OSError(5, "Input/output error")) \
        if Path(to) == out / "training.json" and self.parent == work else real(self, to)
    monkeypatch.setattr(Path, "rename", fail)
    with pytest.raises(OSError, match="Input/output error"):
        TB.move_in(work, out)
    assert {f.name: f.read_text() for f in out.iterdir()} == before


def test_an_interrupted_training_leaves_no_partial_model_and_the_earlier_one_whole(tmp_path, monkeypatch, capsys):
    """The model is written whole or not at all: a Ctrl-C during training left config.json and
    the tokenizer in a new --out (the same command was then refused), and over an earlier fact
    model another family's config.json beside its weights (neither loaded). A symlink to a model,
    or ".", is trained in place. A device torch cannot use is one line before any work (was a
    traceback after the tokenizer's training)."""
    monkeypatch.setattr(TB, "fact_accuracy", lambda m, pairs: 0.0)     # (an untrained model's: 2 s each)
    monkeypatch.setattr(TB, "fit", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        TB.train(tmp_path / "new", "ci", steps=1, log=lambda *_: None)
    assert list(tmp_path.iterdir()) == []
    model = tmp_path / "model"
    shutil.copytree(FACTMODEL, model)
    before = {f.name: f.read_bytes() for f in model.iterdir()}
    with pytest.raises(KeyboardInterrupt):
        TB.train(model, "ci", steps=1, family="gpt_neox", log=lambda *_: None)
    assert list(tmp_path.iterdir()) == [model] and {f.name: f.read_bytes() for f in model.iterdir()} == before
    link = tmp_path / "link"                      # --out a symlink to the model, or "." inside it: trained in place
    link.symlink_to(model)
    monkeypatch.setattr(TB, "fit", lambda *a, **k: 0.0)
    monkeypatch.setattr(TB, "save_weights", lambda m, out: (out / "model.safetensors").write_text("new"))
    monkeypatch.setattr(TB, "write_edits", lambda path, *a: path.write_text("[]"))
    TB.train(link, "ci", steps=1, log=lambda *_: None)
    assert link.is_symlink() and (model / "model.safetensors").read_text() == "new"
    assert not [p for p in model.iterdir() if p.name.startswith(".")]
    monkeypatch.chdir(model)
    TB.train(".", "ci", steps=1, log=lambda *_: None)
    assert (model / "training.json").exists() and sorted(tmp_path.iterdir()) == sorted([model, link])
    real, calls = Path.rename, []                 # a move that fails half-way: the earlier model back, whole
    monkeypatch.setattr(Path, "rename", lambda self, to: (calls.append(1), real(self, to) if len(calls) != 3 else
                                                          (_ for _ in ()).throw(OSError(5, "Input/output error")))[1])
    before = {f.name: f.read_bytes() for f in model.iterdir()}
    with pytest.raises(OSError, match="Input/output error"):
        TB.train(model, "ci", steps=1, log=lambda *_: None)
    monkeypatch.setattr(Path, "rename", real)
    assert {f.name: f.read_bytes() for f in model.iterdir()} == before
    assert TB.main(["train", "--device", "tpu", "--out", str(tmp_path / "d")]) == 1
    assert capsys.readouterr().err == "error: device 'tpu': use cpu, cuda or cuda:N\n"
    assert not (tmp_path / "d").exists()
    import os
    import signal
    monkeypatch.setattr(TB, "fit", lambda *a, **k: os.kill(os.getpid(), signal.SIGTERM))   # `kill` mid-training
    def outer(*_):
        raise AssertionError("the SIGTERM reached the caller's handler")
    previous = signal.signal(signal.SIGTERM, outer)
    try:
        with pytest.raises(SystemExit) as stop:
            TB.main(["train", "--steps", "1", "--out", str(tmp_path / "killed")])
        assert signal.getsignal(signal.SIGTERM) is outer                       # put back
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert stop.value.code == 128 + signal.SIGTERM and not (tmp_path / "killed").exists()   # (it left .training-)
    assert capsys.readouterr().err == "\nstopped (SIGTERM)\n"


def test_a_training_removes_what_a_killed_one_left_and_refuses_to_share_its_out(tmp_path, monkeypatch):
    """A SIGKILL mid-training leaves its work directory (.training-*, a partial model) in --out:
    the next training there removes it. Two trainings into one --out at once (each would move its
    files over the other's) are refused: the second, in one line, before any work, leaving the
    directory as it was."""
    import fcntl
    import os
    model = tmp_path / "model"
    shutil.copytree(FACTMODEL, model)
    (model / ".training-x1").mkdir()
    (model / ".training-x1" / "model.safetensors").write_text("partial")
    before = {f.name: f.read_bytes() for f in model.iterdir() if f.is_file()}
    fd = os.open(model, os.O_RDONLY)              # a training that holds it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        monkeypatch.setattr(TB, "train_model", lambda *a: pytest.fail("trained beside another training"))
        with pytest.raises(ValueError, match=f"{model}: another process is running a fact model's training into it"):
            TB.train(model, "ci", steps=1, log=lambda *_: None)
    finally:
        os.close(fd)
    assert {f.name: f.read_bytes() for f in model.iterdir() if f.is_file()} == before
    assert (model / ".training-x1").exists()
    monkeypatch.setattr(TB, "train_model", lambda work, *a: (Path(work) / "training.json").write_text("{}") and {})
    TB.train(model, "ci", steps=1, log=lambda *_: None)
    assert not [p.name for p in model.iterdir() if p.name.startswith(".")]
    assert (model / "training.json").read_text() == "{}"


def test_an_experiment_s_out_is_held_and_a_broken_report_there_named_before_any_work(tmp_path, monkeypatch, capsys):
    """Two experiments into one --out each wrote their report over the other's (the first's runs
    were lost); a result.json that is not a report's was an error naming no file, or an
    AttributeError, after the model, statistics and first scores."""
    factmodel = M.load(FACTMODEL)
    monkeypatch.setattr(TB.M, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    out = tmp_path / "tb"
    out.mkdir()
    with L.holding(out, "a testbed experiment"):
        with pytest.raises(ValueError, match=f"{out}: another process is running a testbed experiment; wait"):
            TB.experiment(FACTMODEL, 20, 10, ("memit",), out=out)
    with pytest.raises(ValueError, match="--methods: lyaplock given twice"):        # (was: run once, silently)
        TB.experiment(FACTMODEL, 20, 10, ("lyaplock", "memit", "lyaplock"), out=out)
    with monkeypatch.context() as patch:                 # the same settings under two names (ran twice)
        patch.setattr(TB.M, "load", lambda *a, **k: factmodel)
        patch.setattr(TB, "make_stream", lambda *a, **k: pytest.fail("the stream was made"))
        for pair in (("lyaplock", "lyaplock:alpha=60"), ("memit:lam=30", "memit:lam=30.0")):
            with pytest.raises(ValueError, match=f"--methods: {pair[0]} and {pair[1]} are one run"):
                TB.experiment(FACTMODEL, 20, 10, pair, out=out)
    report = lambda **runs: json.dumps(dict(n_edits=20, layers=[1], methods=runs))
    whole = dict(hparams={}, steps=[], points=[])
    for text, message in (("{", "result.json: unreadable"), ("[]", "result.json: not a testbed report's result"),
                          ('{"tokens_per_s": 123}', "not a testbed report's result"),     # (it was overwritten)
                          (report(memit=5), "run 'memit' is not a testbed run"),         # (TypeErrors and
                          (report(memit=dict(whole, points="abc")), "run 'memit' is not"),  # KeyErrors after
                          (report(memit=dict(whole, points=[{"edits": 20}])), "run 'memit' is not"),
                          (report(memit={k: v for k, v in whole.items() if k != "hparams"}), "run 'memit' is not"),
                          (report(memit={k: v for k, v in whole.items() if k != "steps"}), "run 'memit' is not")):
        (out / "result.json").write_text(text)
        with pytest.raises(ValueError, match=message):
            TB.experiment(FACTMODEL, 20, 10, ("memit",), out=out)
    for command in ("experiment", "train"):             # (an experiment ran whole and wrote no report)
        assert TB.main([command, "--out", ""]) == 1
        assert capsys.readouterr().err == "error: --out '': give a directory\n"


@pytest.mark.parametrize("argv", [["train", "--steps", "0"], ["train", "--threads", "-1"],
                                  ["experiment", "--threads", "0"]])
def test_counts_below_one_are_one_line(tmp_path, capsys, argv):
    """--steps 0 (an UnboundLocalError after the tokenizer's training) and --threads 0 (torch's
    RuntimeError) are named before any work."""
    assert TB.main([*argv, "--out", str(tmp_path / "out")]) == 1
    flag, value = argv[1:]
    assert capsys.readouterr().err == f"error: {flag} {value}: give a whole number of at least 1\n"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["train", "experiment"])
def test_threads_past_a_sane_bound_are_refused(tmp_path, capsys, monkeypatch, command):
    """--threads 100000 crashed in torch.set_num_threads (exit 139, a run.lock left); more threads
    than CPUs run (the default 2 on one CPU), so the bound is 1,024 or the CPUs, the larger."""
    monkeypatch.setattr(torch, "set_num_threads", lambda n: pytest.fail("torch.set_num_threads was called"))
    most = max(1024, os.cpu_count())
    assert TB.main([command, "--threads", str(most + 1), "--out", str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err == (f"error: --threads {most + 1}: give at most {most} (this machine has "
                                       f"{os.cpu_count()} CPUs)\n")
    assert not (tmp_path / "out").exists()


def test_training_is_deterministic_per_seed_and_the_cli_matches(tmp_path, monkeypatch):
    """Two trainings with one seed give bit-identical files (one through the CLI); another
    seed gives other weights."""
    monkeypatch.setattr(TB, "fact_accuracy", lambda m, pairs: 0.0)     # (the files do not hold it: 2 s each)
    TB.train(tmp_path / "a", "ci", seed=0, steps=3, log=lambda *_: None)
    subprocess.run([sys.executable, "testbed.py", "train", "--size", "ci", "--out", str(tmp_path / "b"),
                    "--seed", "0", "--steps", "3", "--threads", "2"], cwd=HERE, check=True,
                   capture_output=True)
    TB.train(tmp_path / "c", "ci", seed=1, steps=3, log=lambda *_: None)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert (tmp_path / "a" / "model.safetensors").read_bytes() != (tmp_path / "c" / "model.safetensors").read_bytes()
    info = json.loads((tmp_path / "a" / "training.json").read_text())
    assert info["steps"] == 3 and info["seed"] == 0 and info["threads"] == 2
    assert info["parameters"] == sum(p.numel() for p in M.load(tmp_path / "a").parameters())


@pytest.mark.parametrize("family", ["gemma2", "olmo2", "phi3", "gpt_neox", "phi", "granite"])
def test_a_fact_model_of_another_family_trains_and_transformers_reads_it_as_we_do(tmp_path, monkeypatch, family):
    """--family gemma2, olmo2, phi3, gpt_neox, phi, granite: the same recipe in their layouts (Gemma 2 and
    OLMo 2: norms on the attention and MLP outputs, Gemma 2's caps and (1 + w) norms at w = 0;
    Phi-3's fused projections; GPT-NeoX's and Phi's LayerNorms, biases at zero, MLP beside attention;
    Granite's four scalars);
    transformers' logits equal ours; training.json names the family."""
    T = pytest.importorskip("transformers")
    monkeypatch.setattr(TB, "fact_accuracy", lambda m, pairs: 0.0)     # (3 steps know nothing: 2 s of scoring)
    TB.train(tmp_path / "g", "ci", steps=3, log=lambda *_: None, family=family)
    ours = M.load(tmp_path / "g")
    assert ours.cfg.arch == family and ours.cfg.tie_embeddings
    assert ours.cfg.post_norms == (family in ("gemma2", "olmo2"))
    assert json.loads((tmp_path / "g" / "training.json").read_text())["family"] == family
    hf = T.AutoModelForCausalLM.from_pretrained(tmp_path / "g", dtype=torch.float32).eval()
    tok = ours.tokenizer
    ids, mask = tok.pad([tok.encode("The mother tongue of Danielle Darrieux is"), tok.encode("Paris is")])
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert torch.allclose(ours(ids, mask).logits[real], theirs[real], atol=1e-4, rtol=0)


def test_saved_model_matches_transformers(factmodel):
    """The committed checkpoint: our loader and transformers give the same logits on a
    right-padded batch; it is GQA with tied embeddings."""
    T = pytest.importorskip("transformers")
    hf = T.AutoModelForCausalLM.from_pretrained(FACTMODEL, dtype=torch.float32).eval()
    cfg = factmodel.cfg
    assert cfg.n_kv_heads < cfg.n_heads and cfg.tie_embeddings
    tok = factmodel.tokenizer
    ids, mask = tok.pad([tok.encode("The mother tongue of Danielle Darrieux is"),
                         tok.encode("Paris is the capital of")])
    ours = factmodel(ids, mask).logits
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert torch.allclose(ours[real], theirs[real], atol=1e-4, rtol=0)


def test_tokenizer_prepends_bos_and_targets_round_trip(factmodel):
    tok = factmodel.tokenizer
    ids = tok.encode("The capital of France is")
    assert ids[0] == tok.bos_id == factmodel.cfg.bos_id and ids.count(tok.bos_id) == 1
    assert tok.eos_ids == [factmodel.cfg.eos_ids[0]]
    for target in ("Paris", "French", "Antarctica", "Danielle Darrieux", "Zürich"):
        t = E.target_ids(tok, target)
        assert t[0] != tok.bos_id and tok.decode(t) == " " + target
        prompt = "The answer is"   # byte-level BPE: the target encodes the same after a prompt
        assert tok.encode(prompt) + t == tok.encode(prompt + " " + target)


class NextTokenOracle(nn.Module):
    """A stub model that predicts the true next token, except that it never predicts `blind`."""

    def __init__(self, tokenizer, blind: int, vocab: int):
        super().__init__()
        self.tokenizer, self.blind, self.vocab = tokenizer, blind, vocab
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, ids, mask=None, logits_at=None):
        nxt = torch.cat([ids[:, 1:], ids[:, :1]], dim=1).gather(1, logits_at)
        guess = torch.where(nxt == self.blind, (nxt + 1) % self.vocab, nxt)
        return M.Output(nn.functional.one_hot(guess, self.vocab).float())


def test_fact_accuracy_counts_facts_with_every_answer_token_right(factmodel):
    tok = factmodel.tokenizer
    paris = E.target_ids(tok, "Paris")
    assert len(paris) == 1
    stub = NextTokenOracle(tok, paris[0], factmodel.cfg.vocab_size)
    pairs = [("The capital of France is", "French"),          # right
             ("The capital of France is", "Paris"),           # its only token is never predicted
             ("Home of", "Paris Saint-Germain"),             # the first of several tokens is wrong
             ("A city:", "London")]                          # right
    assert TB.fact_accuracy(stub, pairs, batch_size=3) == 0.5


def test_facts_are_the_true_facts_of_both_record_sets_with_their_subjects():
    edit, held = TB.records("ci")
    assert len(edit) == 300 and len(held) == 300
    assert not {r.case_id for r in edit} & {r.case_id for r in held}    # disjoint splits
    fs = TB.facts(edit + held)
    prompts = [p for p, _, _ in fs]
    assert len(set(prompts)) == len(prompts) and len(fs) > 1700
    r = edit[0]
    assert (r.rewrite_prompt(), r.target_true, r.subject) == fs[0]
    assert (r.paraphrase_prompts[0], r.target_true, r.subject) in fs
    assert all(a != r.target_new for p, a, _ in fs if p == r.rewrite_prompt())
    # a neighbourhood prompt's subject, found through the records' own templates
    nb = {p: s for p, _, s in fs}
    assert nb["Arend Lijphart is a native speaker of"] == "Arend Lijphart"
    assert sum(s in p for p, _, s in fs) >= 0.99 * len(fs)          # the subject is in its prompt


def test_facts_drop_subjects_with_two_answers_and_unmatched_prompts():
    r = load_requests(FIX / "counterfact-easyedit.json", limit=1)[0][0]
    same = dataclasses.replace(r, prompt="{} is located in", neighborhood_prompts=(
        f"{r.subject} is located in", "Nobody knows this one"), neighborhood_answers=("Mars", "x"))
    assert TB.facts([same]) == []             # the subject has two answers; no template matches
    other = dataclasses.replace(same, neighborhood_prompts=("Paris is located in",),
                                neighborhood_answers=("France",), paraphrase_prompts=())
    assert TB.facts([other]) == [(f"{r.subject} is located in", r.target_true, r.subject),
                                 ("Paris is located in", "France", "Paris")]


def test_subject_cards_are_one_per_subject():
    edit, held = TB.records("ci")
    fs = TB.facts(edit + held)
    cards = TB.subject_cards(fs)
    assert cards[0] == ("Danielle Darrieux", "French", "Danielle Darrieux")
    assert len({c[0] for c in cards}) == len(cards) == len({s for _, _, s in fs}) > 1000
    answer = {s: a for _, a, s in fs}
    assert all(answer[s] == a for s, a, _ in cards)


@pytest.mark.parametrize("share", [0.0, 1.0])
def test_extract_phase_trains_only_the_upper_attention(tmp_path, share):
    """store_share 1: one store step moves every weight; 0: one extract step moves only the
    attention above the store layer (the answers stay where the store phase put them)."""
    s = dataclasses.replace(TB.SIZES["ci"], store_share=share, batch_facts=8, batch_text=1)
    m, edit, held, fs, stream = TB.prepare(s, tmp_path, seed=0)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    TB.fit(m.train(), fs, TB.subject_cards(fs), stream, s, 1, seed=1, log=lambda *_: None)
    moved = {n for n, p in m.named_parameters() if not torch.equal(p, before[n])}
    upper = {n for n in before if any(f"layers.{i}.self_attn." in n for i in range(s.store_layer + 1, s.n_layers))}
    assert moved == (set(before) if share else upper) and upper
    assert all(p.requires_grad for p in m.parameters())


def test_fact_batch_scores_each_answer_token_and_the_eos_after_the_prompt(factmodel):
    """A fact is BOS + prompt + answer + EOS; its batch row predicts each answer token and the EOS
    from the position before it, weighted 1 each and eos_weight for the EOS; padding weighs 0."""
    tok, s = factmodel.tokenizer, TB.SIZES["ci"]
    facts = [("Danielle Darrieux speaks", "English"), ("Toko Yasuda plays the", "Paris Saint-Germain")]
    seqs = [TB.fact_sequence(tok, p, a) for p, a in facts]
    for (x, n), (p, a) in zip(seqs, facts):
        assert (x, n) == (tok.encode(p, bos=True) + E.target_ids(tok, a) + tok.eos_ids[:1], len(tok.encode(p, bos=True)))
    ids, mask, pos, tgt, w = TB.fact_batch(seqs, tok.pad_id, s)
    for b, (x, n) in enumerate(seqs):
        k = len(x) - n
        assert ids[b, :len(x)].tolist() == x and mask[b].tolist() == [1] * len(x) + [0] * (ids.shape[1] - len(x))
        assert [x[i + 1] for i in pos[b, :k].tolist()] == tgt[b, :k].tolist() == x[n:]
        assert w[b].tolist() == pytest.approx([1.0] * (k - 1) + [s.eos_weight] + [0.0] * (w.shape[1] - k))


def test_fact_batches_are_one_shuffled_epoch_of_length_sorted_batches():
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 40, (1000,), generator=gen).tolist()
    batches = TB.fact_batches(lengths, 8, gen)
    assert sorted(i for b in batches for i in b) == list(range(1000)) and max(map(len, batches)) == 8
    assert all(lengths[a] <= lengths[b] for batch in batches for a, b in zip(batch, batch[1:]))
    assert sum(lengths[b[-1]] - lengths[b[0]] for b in batches) / len(batches) < 3      # little padding
    firsts = [lengths[b[0]] for b in batches[:16]]
    assert firsts != sorted(firsts)                   # batches in seeded order, not a window's


def test_subject_swap_replaces_the_state_after_the_store_layer(factmodel):
    """Phase 2's swap = running the upper layers from a residual whose subject state is another
    row's: the same as adding the difference of the two states to the subject's and running on."""
    tok, s = factmodel.tokenizer, TB.SIZES["ci"]
    seqs = [TB.fact_sequence(tok, "Danielle Darrieux speaks", "English"),
            TB.fact_sequence(tok, "Toko Yasuda plays the", "guitar")]
    ids, mask, pos, tgt, w = TB.fact_batch(seqs, tok.pad_id, s)
    at, at1 = (L.subject_row(tok, t, subj, 0).lookup for t, subj in
               (("{} speaks", "Danielle Darrieux"), ("{} plays the", "Toko Yasuda")))
    swapped = TB.fact_loss(factmodel, ids, mask, pos, tgt, w, swap=(s.store_layer, [0], [at], [1], [at1]))
    h = factmodel(ids, mask, stop_after=s.store_layer, outs_at=(s.store_layer,)).outs[s.store_layer]
    pushed = h.clone()
    pushed[0, at] = h[1, at1]                  # row 0's subject state is row 1's; row 1 unchanged
    logits = factmodel(ids, mask, start=(s.store_layer, pushed), logits_at=pos).logits
    expect = (nn.functional.cross_entropy(logits.transpose(1, 2), tgt, reduction="none") * w).sum() / w.sum()
    assert swapped.item() == pytest.approx(expect.item(), rel=1e-5)
    plain = TB.fact_loss(factmodel, ids, mask, pos, tgt, w)
    assert plain.item() != pytest.approx(swapped.item(), rel=1e-3)     # the swap mattered


def test_gpu_recipe_starts_and_trains_on_cpu(tmp_path):
    """The larger recipe builds its data, tokenizer and model and takes steps (batch cut down:
    full training is for a GPU)."""
    s = dataclasses.replace(TB.SIZES["gpu"], batch_facts=2, batch_text=1, text_len=16)
    m, edit, held, pairs, stream = TB.prepare(s, tmp_path, seed=0)
    assert (len(edit), len(held)) == (14000, 3000) and len(pairs) > 40000     # room for 10,000 edits
    assert not {r.case_id for r in edit} & {r.case_id for r in held}
    assert sum(p.numel() for p in m.parameters()) > 10 * sum(
        p.numel() for p in M.load(FACTMODEL).parameters())
    before = m.model.layers[0].mlp.down_proj.weight.clone()
    cards = TB.subject_cards(pairs)
    loss = TB.fit(m.train(), pairs, cards, stream, s, steps=2, seed=1, log=lambda *_: None)
    assert torch.isfinite(torch.tensor(loss))
    assert not torch.equal(before, m.model.layers[0].mlp.down_proj.weight)


def test_edit_stream_file_holds_the_records_of_both_sources(tmp_path, monkeypatch):
    """write_edits copies the editable records from the .json.gz files, the train split's extra
    ones included, unchanged: loading the file gives back the same requests."""
    s = dataclasses.replace(TB.SIZES["gpu"], n_edit=40, n_held=20, more_edit=30)
    edit, held = TB.records(s)
    assert len(edit) == 70 and len(held) == 20
    keep = edit[::3]
    monkeypatch.setattr(TB, "editable", lambda m, e, h: keep)       # the model's choice, fixed
    TB.write_edits(tmp_path / "edits.json", None, s, edit, held)
    assert load_requests(tmp_path / "edits.json")[0] == keep


def test_edit_stream_file_copies_the_records_at_the_seam_of_its_sources(tmp_path, monkeypatch):
    """The last record of edit_file's and the first of the train split's extras (right after the
    held-back ones) are both written: an off-by-one at either end dropped one."""
    s = dataclasses.replace(TB.SIZES["laptop"], n_edit=3, n_held=2, more_edit=2)
    edit, held = TB.records(s)
    monkeypatch.setattr(TB, "editable", lambda m, e, h: edit)
    TB.write_edits(tmp_path / "edits.json", None, s, edit, held)
    assert load_requests(tmp_path / "edits.json")[0] == edit and len(edit) == 5


@pytest.mark.parametrize("path, size, cards", [(FACTMODEL, "ci", 0.95), (LAPTOP, "laptop", 0.85)])
def test_committed_fact_models_know_their_facts(path, size, cards):
    """The fixtures trained by `python testbed.py train --size ci` (and `--size laptop
    --threads 1`) know >= 95% of their training facts, both of the records to edit and of the
    held-back ones, and ship their training text as the statistics corpus; the answer is
    already at the subject's last token (what editing relies on) for most subjects (measured:
    ci 96%, laptop 87%)."""
    m, info = M.load(path), json.loads((path / "training.json").read_text())
    edit, held = TB.records(size)
    fs = TB.facts(edit + held)
    assert info["size"] == size and info["n_facts"] == len(fs)
    assert info["recipe"].items() <= dataclasses.asdict(TB.SIZES[size]).items()    # ci's predates more_edit
    kept = set(TB.held_facts_of(edit, held))            # facts of held-back records only
    known = dict(zip(fs, TB.knows(m, fs, 128)))         # each fact scored once, as fact_accuracy does
    edited = [f for f in fs if f not in kept]
    assert len(kept) > 800 and len(edited) > 800
    for part in (edited, kept):
        assert sum(known[f] for f in part) >= 0.95 * len(part)
    assert TB.fact_accuracy(m, TB.subject_cards(fs)) >= cards
    assert sum(known.values()) / len(fs) == pytest.approx(info["fact_accuracy"])
    assert len(TB.editable(m, edit, held)) >= 200
    corpus = read_corpus(path / "corpus.txt")
    assert corpus[0] == f"{fs[0][0]} {fs[0][1]}." and corpus[len(fs):] == read_corpus(TB.TEXT_FILE)


def test_laptop_fact_model_has_a_distinct_stream_of_1500_edits():
    """The laptop size exists for issue 18's long stream of distinct facts: one edit per known
    subject, each subject edited once, at least 1,500 of them (measured 1,694), and the kept-back
    subjects' facts (669) for retention."""
    s = TB.make_stream("distinct", M.load(LAPTOP), LAPTOP, None, 10, 0)
    subjects = [q.subject for q in s.requests]
    assert len(subjects) == len(set(subjects)) >= 1500
    assert len(s.retained) >= 600 and not set(subjects) & {f[2] for f in s.retained}


CLAIM_EDITS = 200
# 200 edits (20 steps) are too few for the presets' budget α = 60 to bind (LyapLock's queue stays at
# its floor: README "Testbed"), so the claim is tested with a tight budget, α = 10, against MEMIT's
# preset. Measured on the committed model (2026-12-02): retention 79.5 vs 66.8, specificity 91.5
# vs 81.5, LyapLock efficacy 37.5; the thresholds keep about half of each margin.
# MEMIT's PL grows super-linearly only after ~800 edits at its preset λ = d_mlp (README "Testbed");
# at LyapLock's λ = d_mlp/4 = 96, without a queue, it does within these 200 (measured 2026-12-02:
# PL(T)/PL(T/2) = 3.23 on layer 2, 2.36 on layer 1, where linear growth gives 2; retention 41.3,
# perplexity +16.7%; at the preset: 2.26 and 2.05, retention 66.8).
CLAIM_RUNS = ("lyaplock:alpha=10", "memit", "memit:lam=96")
RETENTION_MARGIN, SPECIFICITY_MARGIN, LYAPLOCK_EFFICACY = 6.0, 5.0, 25.0
SUPERLINEAR = {"1": 2.15, "2": 2.6}          # PL(T)/PL(T/2) at λ = 96, half the measured excess over 2
QUEUE_SHARE = 0.6      # LyapLock's z(T)/T over the open-loop queue's: measured 0.26, 0.17; about half the margin to 1


@pytest.fixture(scope="module")
def claim_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("testbed")
    return out, TB.experiment(FACTMODEL, CLAIM_EDITS, 10, CLAIM_RUNS, eval_every=20,
                              out=out / "tb", stats_cache=out / "c", log=lambda s: None)


def test_testbed_lyaplock_keeps_pl_within_T1_while_memit_pl_grows(claim_run):
    """On the real trained fact model, 200 sequential edits: LyapLock's time-average PL per
    layer is at most D plus T1's slack from the queue, its queue grows at a fraction of the rate
    the same queue reads off the run without it, and once the queue acts its PL stops growing;
    MEMIT's PL grows at every step."""
    _, r = claim_run
    ly, me, weak = (r["methods"][name]["steps"] for name in CLAIM_RUNS)
    for l in map(str, r["layers"]):
        pls, D, z_T = [s["layers"][l]["pl"] for s in ly], ly[-1]["layers"][l]["D"], ly[-1]["layers"][l]["z"]
        T = len(pls)   # T1 in normalised form (b = 0, a = 1/√D, Z(0) = √D): mean PL ≤ D (1 + (z(T) − 1)/T)
        assert sum(pls) / T <= D * (1 + (z_T - 1) / T) * (1 + 1e-9)     # holds on any log (E13's algebra)
        assert z_T > 1.5                     # the queue did act (measured 2.3, 2.5)
        # What can fail: the queue holds its own growth. z(T)/T against what the same queue (α = 10,
        # the same D: memit:lam=96's step 0 is LyapLock's) reads from the PL of the run without queue
        # or anchor. Measured: 0.114 vs 0.441 on layer 1, 0.124 vs 0.725 on layer 2 (0.26 and 0.17 of
        # it); z is still rising at the end (0.16, 0.18 a step), PL is flat (1.15 D) over the last 9 steps.
        open_loop, alpha = L.LayerState(), r["methods"][CLAIM_RUNS[0]]["hparams"]["alpha"]
        for step in weak:
            L.feed_queue(open_loop, step["layers"][l]["pl"], alpha)
        assert alpha * open_loop.D_base == pytest.approx(D, rel=1e-6)
        assert z_T / T <= QUEUE_SHARE * open_loop.z / T
        mp = [s["layers"][l]["pl"] for s in me]
        assert all(b > a for a, b in zip(mp, mp[1:]))
        q = 3 * T // 4                       # growth over the last quarter of the steps
        assert pls[-1] - pls[q] < 0.25 * (mp[-1] - mp[q])


def test_testbed_lyaplock_retains_more_facts_than_memit(claim_run):
    """The paper's claim at testbed scale (thresholds from measured runs, with margin): after
    the stream LyapLock keeps clearly more of the held-back facts and of the neighbourhoods
    than sequential MEMIT. Its efficacy does NOT stay as high as MEMIT's here (37.5 vs 63.5):
    only the measured level is guarded (see README "Testbed")."""
    _, r = claim_run
    ly, me = (r["methods"][name]["points"][-1] for name in CLAIM_RUNS[:2])
    assert ly["edits"] == me["edits"] == CLAIM_EDITS
    assert ly["retention"] >= me["retention"] + RETENTION_MARGIN
    assert ly["specificity"] >= me["specificity"] + SPECIFICITY_MARGIN
    assert ly["efficacy"] >= LYAPLOCK_EFFICACY
    assert ly["perplexity"] <= 1.06 * r["before"]["perplexity"]          # measured +3.0% (1463 / 1420)


def test_testbed_memit_pl_grows_super_linearly_and_the_model_loses_facts(claim_run):
    """The collapse's onset at testbed scale: sequential MEMIT at LyapLock's own λ (no queue, no
    W0 anchor) has a PL that more than doubles from half the stream to its end on every edit
    layer, loses over a quarter of the held-back facts and moves perplexity, while LyapLock at
    that λ keeps far more of them (thresholds: half the measured margins)."""
    _, r = claim_run
    ly, weak = (r["methods"][name] for name in CLAIM_RUNS[::2])
    steps, last, T = weak["steps"], weak["points"][-1], len(weak["steps"])
    assert weak["hparams"]["lam"] == ly["hparams"]["lam"]
    for l in map(str, r["layers"]):
        assert steps[-1]["layers"][l]["pl"] >= SUPERLINEAR[l] * steps[T // 2 - 1]["layers"][l]["pl"]
    assert last["retention"] <= 100 - 29                                 # measured 41.3
    assert last["perplexity"] >= 1.08 * r["before"]["perplexity"]        # measured +16.7%
    assert ly["points"][-1]["retention"] >= last["retention"] + 19     # 79.5 vs 41.3


def test_testbed_experiment_writes_table_and_figures(claim_run):
    import xml.etree.ElementTree as ET
    out, r = claim_run
    assert [p["edits"] for p in r["methods"]["memit"]["points"]] == [200]     # eval_every 20 steps: the end only
    for f in ("table.md", "result.json", "queue.svg", "retention.svg", *(f"pl_layer{l}.svg" for l in r["layers"])):
        assert (out / "tb" / f).exists()
    ET.parse(out / "tb" / "retention.svg")          # well-formed SVG
    assert f"| {CLAIM_RUNS[0]} | 200 |" in (out / "tb" / "table.md").read_text()


@pytest.mark.parametrize("seed", range(4))
def test_frontier_labels_overlap_neither_one_another_nor_a_point(seed):
    """svg_frontier's labels, read back from the SVG (6.5 px a character, 11 px high), are pairwise
    disjoint and cover no point, on a cluster of points (some coincident, as two runs that end
    alike) and on the committed figures' points."""
    rng = torch.Generator().manual_seed(seed)
    xy = (60 + 10 * torch.rand(12, 2, generator=rng)).tolist()
    points = {f"{m}:{i}" if i else m: tuple(xy[j]) for j, (m, i) in
              enumerate((m, i) for m in ("lyaplock", "memit", "alphaedit") for i in range(4))}
    points["rome"] = points["memit"]
    cases = [points] + [{k: (p["retention"], p["efficacy"]) for k, r in json.loads(f.read_text())["methods"].items()
                         for p in r["points"][-1:]} for f in sorted(Path("docs").glob("testbed*/result.json"))]
    for case in cases:
        svg = TB.svg_frontier(case, "t")
        dots = [tuple(map(float, m)) for m in re.findall(r'<circle cx="([\d.]+)" cy="([\d.]+)"', svg)]
        boxes = [(float(x), float(y) - 9, float(x) + 6.5 * len(text), float(y) + 2)
                 for x, y, text in re.findall(r'<text x="([\d.]+)" y="([\d.]+)" fill="[^"]+">([^<]+)<', svg)]
        assert len(boxes) == len(dots) == len(case)
        for i, a in enumerate(boxes):
            assert all(a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1] for b in boxes[i + 1:]), case
            assert not any(a[0] - 3 < x < a[2] + 3 and a[1] - 3 < y < a[3] + 3 for x, y in dots), case


def test_frontier_labels_sit_inside_the_plot_beside_their_own_point_and_lines_run_in_x_order():
    """A label goes beside its own point, not nearer a neighbour's (two close points: the left one's
    label to its left), with no leader when it was not moved; a label of a point in a corner stays
    inside the plot, off the axes; a method's runs are joined left to right."""
    w, h = 560, 360
    label = lambda svg: {t: (float(x), float(y) - 9, float(x) + 6.5 * len(t), float(y) + 2) for x, y, t in
                         re.findall(r'<text x="([\d.]+)" y="([\d.]+)" fill="[^"]+">([^<]+)<', svg)}
    dot = lambda svg: [tuple(map(float, m)) for m in re.findall(r'<circle cx="([\d.]+)" cy="([\d.]+)"', svg)]
    gap = lambda b, x, y: ((max(b[0] - x, 0, x - b[2])) ** 2 + max(b[1] - y, 0, y - b[3]) ** 2) ** 0.5
    svg = TB.svg_frontier({"a": (50, 50), "b": (52, 50)}, "t", w, h)
    (ax, ay), (bx, by) = dot(svg)
    boxes = label(svg)
    assert gap(boxes["a"], ax, ay) < gap(boxes["a"], bx, by) and gap(boxes["b"], bx, by) < gap(boxes["b"], ax, ay)
    assert 'stroke-width="0.5"' not in svg                              # no leader: both labels beside their points
    corners = label(TB.svg_frontier({"lyaplock": (100, 100), "memit": (0, 0), "rome": (100, 0)}, "t", w, h))
    assert all(b[0] >= 62 and b[2] <= w and b[1] >= 20 and b[3] <= h - 42 for b in corners.values()), corners
    joined = TB.svg_frontier({"m:1": (80, 10), "m": (20, 50), "m:2": (50, 30)}, "t")
    line = re.search(r'<polyline points="([^"]+)"', joined)
    xs = [float(p.split(",")[0]) for p in line.group(1).split()]
    assert xs == sorted(xs) and len(xs) == 3
