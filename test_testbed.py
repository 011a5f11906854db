"""Fast tests of the testbed's long-stream experiment (testbed.py): stream construction, run
specs, the queue summary, a short run and its report. The long streams themselves are
measurements (README "Testbed"), not tests."""
import dataclasses
import json
from pathlib import Path

import pytest
import torch

import lyaplock as L
import model as M
import testbed as TB
from data import Request

FIX = Path(__file__).parent / "fixtures"
FACTMODEL, STORIES = FIX / "factmodel-ci", FIX / "stories260K-hf"


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


def test_stories_stream_edits_one_told_slot_per_name():
    m = M.load(STORIES)
    s = TB.stories_stream(m, 24, seed=0)
    names = [q.subject for q in s.requests]
    assert len(s.requests) == 24 and len(set(names)) == 24
    assert not {f[2] for f in s.retained} & set(names) and len(s.retained) > 100
    facts = [(q.rewrite_prompt(), q.target_true) for q in s.requests]
    assert all(TB.knows(m, facts)) and all(TB.knows(m, s.retained))
    assert all(q.target_new in TB.STORY_SLOTS[q.prompt][1] for q in s.requests)
    with pytest.raises(ValueError, match="at most"):
        TB.stories_stream(m, len(TB.STORY_NAMES))


def test_run_specs_give_typed_overrides_and_clear_errors():
    assert TB.parse_run("lyaplock", {}) == ("lyaplock", {})
    assert TB.parse_run("lyaplock:alpha=30:superseded=remove", {"lyaplock": {"lam": 3.0}}) == (
        "lyaplock", {"lam": 3.0, "alpha": 30.0, "superseded": "remove"})
    assert TB.parse_run("memit:v_num_grad_steps=5", {}) == ("memit", {"v_num_grad_steps": 5})
    for bad, match in (("nosuch", "unknown method"), ("lyaplock:alpha", "field=value"),
                       ("lyaplock:colour=3", "field=value"), ("lyaplock:alpha=big", "needs a float"),
                       ("lyaplock:layers=1", "field=value")):
        with pytest.raises(ValueError, match=match):
            TB.parse_run(bad, {})


def test_queue_summary_tells_a_growing_queue_from_a_floor_and_a_growing_pl():
    z = [1.0, 1.0, 1.5, 2.2, 3.0, 3.9, 4.8, 5.9]
    steps = [{"layers": {"1": {"pl": 1.0 + t, "D": 2.0, "z": z[t]}, "2": {"pl": 0.1, "D": 2.0, "z": 1.0}}}
             for t in range(8)]
    q = TB.queue_summary(steps)
    assert q["1"]["trend"] == "growing" and q["1"]["z_T"] == 5.9 and q["1"]["z_over_T"] == pytest.approx(5.9 / 8)
    assert q["2"]["trend"] == "floor"
    memit = [{"layers": {"1": {"pl": 0.1 * (t + 1) ** 2, "D": None, "z": None}}} for t in range(8)]
    assert TB.queue_summary(memit)["1"]["pl_grows"] is True


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
    again = _short(out, cache, _stop)                                   # both complete: nothing reruns
    assert again["methods"] == json.loads(json.dumps(r["methods"]))
