"""Tests of a run's report (eval.report: figures, the audit of theorem T1, the verdict) on
hand-written run directories, and of the generative efficacy (eval.generative_eval) on a model
whose greedy choices are set by hand. Run: python -m pytest -q test_report.py"""
import dataclasses
import json
import math
import random
import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

import eval as E
import lyaplock as L
import model as M
from data import Request, load_requests

FACTMODEL = Path(__file__).parent / "fixtures" / "factmodel-ci"


# ------------------------------------------------------------------- hand-written run directories
def queue_log(pl: list[float], alpha: float) -> list[dict]:
    """One layer's log entries as a run writes them: the raw queue E13 calibrated after step 0
    (D_base = PL(0), D = α·D_base, a = 1/√D, Z(0) = Zmax = √D, E13 applied at step 0 too) and
    z = a·Z logged after each step."""
    D = alpha * pl[0]
    a, Z = 1 / math.sqrt(D), math.sqrt(D)
    out = []
    for p in pl:
        Z = max(Z + a * (p - D), math.sqrt(D))                                   # E13
        out.append(dict(pl=p, D=D, z=a * Z))
    return out


def write_run(d: Path, layers: dict, method="lyaplock", alpha=2.0, batch=10, ability=None, summary=True,
              torn=False, stop=None) -> Path:
    """A run directory: config.json, log.jsonl from {layer: [entries]}, ability.jsonl, and
    (summary=True) summary.json with "pre"."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps({"model": "m", "hparams": dict(
        method=method, layers=[int(l) for l in layers], lam=30.0, alpha=alpha, batch_size=batch)}))
    T = len(next(iter(layers.values())))
    lines = [json.dumps({"step": t, "layers": {l: v[t] for l, v in layers.items()}, "edits": batch * (t + 1),
                         "seconds": 1.0}) for t in range(T)]
    tail = '{"step": %d, "layers": {"1": {"pl"' % T if torn else ""             # killed mid-write
    (d / "log.jsonl").write_text("\n".join(lines) + "\n" + tail)
    ab = ability or [dict(step=0, edits=0, final=False, perplexity=100.0,
                          general={"sst2": {"f1": 0.6, "accuracy": 0.6}, "cola": {"mcc": -0.1, "f1": 0.4}}),
                     dict(step=T, edits=batch * T, final=True, perplexity=120.0,
                          general={"sst2": {"f1": 0.5, "accuracy": 0.5}, "cola": {"mcc": -0.2, "f1": 0.3}})]
    (d / "ability.jsonl").write_text("".join(json.dumps(e) + "\n" for e in ab))
    if summary:
        (d / "summary.json").write_text(json.dumps(dict(
            method=method, model="m", n_edits=batch * T, batch_size=batch, efficacy=80.0, generalization=60.0,
            specificity=90.0, score=74.0, efficacy_generative=40.0, perplexity=120.0,
            pre=dict(efficacy=0.0, generalization=0.0, specificity=95.0, score=0.0, perplexity=100.0))))
    if stop:
        (d / "stop.json").write_text(json.dumps(stop))
    return d


def write_checkpoint(run: Path, step: int, state: dict):
    """ckpt-<step> with state.json (method and edits filled in) and (placeholder) tensor files,
    and latest.json naming it."""
    (run / f"ckpt-{step:06d}").mkdir()
    (run / f"ckpt-{step:06d}" / "state.json").write_text(json.dumps(dict(method="lyaplock", n_edits=10 * step) | state))
    for name in ("state.safetensors", "weights.safetensors"):
        save_file({"x": torch.zeros(1000)}, run / f"ckpt-{step:06d}" / name)
    (run / "latest.json").write_text(json.dumps({"checkpoint": f"ckpt-{step:06d}", "step": step}))


# ------------------------------------------------------------------------------- the T1 audit
def test_audit_agrees_with_a_hand_computation(tmp_path):
    # D_base = PL(0) = 0.1, α = 2: D = 0.2. E14 by hand, z = max(z + PL/D − 1, 1) from z = 1:
    # step 0: 1 + 0.5 − 1 -> 1 (floor); 1: 1 + 1.5 − 1 = 1.5; 2: 1.5 + 1.25 − 1 = 1.75;
    # 3: 1.75 + 0.5 − 1 = 1.25; 4: 1.25 + 1 − 1 = 1.25.
    pl = [0.1, 0.3, 0.25, 0.1, 0.2]
    log = queue_log(pl, alpha=2.0)
    assert [e["z"] for e in log] == pytest.approx([1, 1.5, 1.75, 1.25, 1.25], rel=1e-12)
    d = write_run(tmp_path / "run", {"1": log})
    text = E.report(d)
    a = E.audit_run(E.read_run(d))["1"]
    assert a["T"] == 5 and a["mean_pl"] == pytest.approx(0.95 / 5, rel=1e-12)         # 0.19
    assert a["D"] == pytest.approx(0.2) and a["slack"] == pytest.approx(0.2 * 0.25 / 5, rel=1e-9)   # 0.01
    assert a["bound"] == pytest.approx(0.21) and a["holds"] and a["replay_ok"]
    assert a["z_T"] == pytest.approx(1.25) and a["first_active"] == 1
    assert a["slope"] == pytest.approx(E.slope([1.75, 1.25, 1.25]))              # last half: 3 steps
    assert E.slope([1.75, 1.25, 1.25]) == pytest.approx(-0.25)
    assert a["trend"] == "stable"
    assert "| 1 | 5 | 0.19 | 0.2 | 0.01 | yes | 1.250 |" in text
    assert ("strongly stable on layer(s) 1 and T1's bound holds: layer 1: time-average PL 0.19 ≤ D 0.2 "
            "+ slack 0.01") in text
    assert (d / "report.md").read_text() == text


def test_the_header_gives_the_target_values_fit_where_the_log_has_it(tmp_path):
    """log.jsonl's z_loss and z_passes (E4's fit per step) make one header line: the mean final loss
    at the first and the last step, and the passes per request over the run, of v_num_grad_steps;
    a log written before they were logged (or a step without them) gives no line, not a wrong one."""
    d = write_run(tmp_path / "run", {"1": queue_log([0.1, 0.3, 0.25], alpha=2.0)})
    assert "target values" not in E.report(d)
    lines = (d / "log.jsonl").read_text().splitlines()
    fits = [dict(z_loss=0.5, z_passes=25.0), dict(z_loss=0.31, z_passes=20.0), dict(z_loss=0.04, z_passes=6.0)]
    (d / "log.jsonl").write_text("".join(json.dumps(json.loads(l) | f) + "\n" for l, f in zip(lines, fits)))
    config = json.loads((d / "config.json").read_text())
    config["hparams"]["v_num_grad_steps"] = 25
    (d / "config.json").write_text(json.dumps(config))
    header = E.report(d).split("## Verdict")[0]
    assert ("- target values (E4): mean final loss 0.5 at the first step, 0.04 at the last (a request stops "
            "below 0.05); 17 of 25 passes per request on average") in header


@pytest.mark.parametrize("seed", range(30))
def test_audit_slack_is_T1_of_the_raw_queue_and_of_the_codes_queue(seed):
    """The slack read from the logged normalised z equals (Z(T) − Z(0))/(aT) of E13 simulated
    directly, step 0 included in the sum; the code's own queue (lyaplock.feed_queue) logs the
    same z; where the floor never binds (α < 1, PL ≥ D after step 0) T1 is an equality."""
    rng = random.Random(seed)
    alpha = rng.choice([0.5, 0.9, 2.0, 10.0])
    pl0 = 10 ** rng.uniform(-3, 0)
    tight = alpha < 1 and seed % 2 == 0
    pl = [pl0] + [alpha * pl0 * (rng.uniform(1, 2) if tight else rng.choice([0, 0.5, 1.5, 3]) * rng.random())
                  for _ in range(rng.randint(0, 60))]
    D, a = alpha * pl0, 1 / math.sqrt(alpha * pl0)
    Z = [math.sqrt(D)]
    for p in pl:
        Z.append(max(Z[-1] + a * (p - D), math.sqrt(D)))                         # E13, Z(0) = Zmax
    ls, z_code = L.LayerState(), []
    for p in pl:
        L.feed_queue(ls, p, alpha)
        z_code.append(ls.z)
    log = queue_log(pl, alpha)
    assert [e["z"] for e in log] == pytest.approx(z_code, rel=1e-12)
    r = E.audit_queue(pl, z_code, D)
    T = len(pl)
    assert r["slack"] == pytest.approx((Z[T] - Z[0]) / (a * T), rel=1e-9, abs=1e-15)
    assert r["holds"] and r["replay_ok"]
    assert math.fsum(pl) / T <= D + (Z[T] - Z[0]) / (a * T) + 1e-12 * D           # T1 itself
    if tight:
        assert r["mean_pl"] == pytest.approx(r["bound"], rel=1e-9)


def test_a_queue_that_grows_is_flagged_and_a_stable_one_is_not(tmp_path):
    pl0, alpha = 0.05, 4.0
    D = alpha * pl0
    growing = [pl0] + [1.5 * D] * 19                                     # always above D: z + 0.5 a step
    rising = [D * (0.2 + 0.1 * t) for t in range(9)]                     # up to D, then around it
    rising_then_held = [pl0] + rising + [D * (1.0 + 0.05 * (-1) ** t) for t in range(10)]
    below = [pl0] + [0.9 * D] * 19
    d = write_run(tmp_path / "run", {"1": queue_log(growing, alpha), "2": queue_log(rising_then_held, alpha),
                                     "3": queue_log(below, alpha)}, alpha=alpha)
    text = E.report(d)
    audits = E.audit_run(E.read_run(d))
    assert audits["1"]["trend"] == "growing" and audits["1"]["slope"] == pytest.approx(0.5)
    assert audits["2"]["trend"] == "stable" and abs(audits["2"]["slope"]) < E.GROWING
    assert audits["3"]["trend"] == "floor" and audits["3"]["z_T"] == 1
    assert all(a["holds"] for a in audits.values())
    verdict = text.split("## Verdict")[1].split("##")[0]
    assert "the queue grows linearly on layer(s) 1 (z +0.5/step on layer 1" in verdict
    assert "the budget α·D_base is below what these edits need; raise --alpha" in verdict
    assert "strongly stable on layer(s) 2, 3 (at its floor on 3: PL ≤ D at every step, at most 0.9·D) and " \
           "T1's bound holds" in verdict


def test_a_queue_that_just_left_its_floor_is_too_early_to_judge(tmp_path):
    pl0, alpha = 0.05, 4.0
    D = alpha * pl0
    d = write_run(tmp_path / "run", {"1": queue_log([pl0, 0.5 * D, 0.9 * D, 1.1 * D], alpha)}, alpha=alpha)
    a = E.audit_run(E.read_run(d))["1"]
    assert a["trend"] == "new" and a["first_active"] == 3
    assert "only just left its floor on layer(s) 1 (step 3)" in E.report(d)


def test_a_queue_three_steps_off_its_floor_is_judged_and_not_too_early():
    """"new" is a queue that left its floor less than 3 steps before the end (queue_trend): one
    active for the last 3 steps has its trend read, here growing (z 1.5, 2, 2.5)."""
    pl0, alpha = 0.05, 4.0
    D = alpha * pl0
    log = queue_log([pl0, 0.5 * D, 0.9 * D, 1.5 * D, 1.5 * D, 1.5 * D], alpha)
    z = [e["z"] for e in log]
    assert z == pytest.approx([1, 1, 1, 1.5, 2, 2.5], rel=1e-12)
    a = E.audit_queue([e["pl"] for e in log], z, D)
    assert a["first_active"] == 3 and a["trend"] == "growing" and a["slope"] == pytest.approx(0.5)
    assert E.queue_trend(z[:5])[0] == "new"                       # 2 steps off the floor: too early


def test_a_queue_calibrated_after_steps_that_left_w0_is_audited_from_its_calibration(tmp_path):
    """Steps whose PL was exactly 0 before the first that moved the layer log no D
    (lyaplock.feed_queue): the queue's path, and T1, begin at its calibration."""
    pl0, alpha = 0.05, 4.0
    log = queue_log([pl0, 0.1, 0.3, 0.25], alpha)
    d = write_run(tmp_path / "late", {"1": [dict(pl=0.0, D=None, z=1.0)] * 2 + log}, alpha=alpha)
    late, direct = E.audit_run(E.read_run(d))["1"], E.audit_queue([e["pl"] for e in log], [e["z"] for e in log],
                                                                    alpha * pl0)
    assert late["queue"] and late == direct | dict(first_active=direct["first_active"] + 2)
    assert "the queue has only just left its floor on layer(s) 1 (step 4)" in E.report(d)
    assert "(dashed: threshold D)" in (d / "pl_layer1.svg").read_text()


def test_a_log_that_breaks_E13_or_disagrees_with_the_checkpoint_is_flagged(tmp_path):
    pl0, alpha = 0.05, 4.0
    log = queue_log([pl0, 0.1, 0.3, 0.25, 0.2], alpha)
    fine = write_run(tmp_path / "fine", {"1": log}, alpha=alpha)
    assert "not trustworthy" not in E.report(fine)
    bad = [dict(e) for e in log]
    bad[2]["z"] += 0.5                                       # a queue E14 does not give
    d = write_run(tmp_path / "bad", {"1": bad}, alpha=alpha)
    text = E.report(d)
    assert not E.audit_run(E.read_run(d))["1"]["replay_ok"]
    assert "the log breaks E13/T1 on layer(s) 1" in text and "(log ≠ E14 replay)" in text
    verdict = text.split("## Verdict")[1].split("##")[0]
    assert "T1's bound holds" not in verdict and "strongly stable" not in verdict      # (it said both beside it)
    stuck = [dict(pl=0.1, D=0.2, z=1.0)] + [dict(pl=0.5, D=0.2, z=1.0)] * 5          # z should rise: it stays 1
    nan = [dict(e) for e in log]
    nan[1]["pl"] = float("nan")                                 # (the replay stopped checking after it)
    for name, entries in (("stuck", stuck), ("nan", nan)):
        d = write_run(tmp_path / name, {"1": entries}, alpha=alpha)
        assert not E.audit_run(E.read_run(d))["1"]["replay_ok"]
        verdict = E.report(d).split("## Verdict")[1].split("##")[0]
        assert "the log breaks E13/T1 on layer(s) 1" in verdict and "the queue is" not in verdict, verdict
    D = alpha * pl0                                         # a checkpoint after step 3 (4 steps done)
    for name, Z in (("agrees", log[3]["z"] * math.sqrt(D)), ("differs", 1.01 * log[3]["z"] * math.sqrt(D))):
        run = write_run(tmp_path / name, {"1": log}, alpha=alpha, summary=False)
        write_checkpoint(run, 4, {"step": 4, "layers": {"1": dict(D_base=pl0, Z=Z, a=1 / math.sqrt(D),
                                                                   zmax=math.sqrt(D))}})
        text = E.report(run)
        assert ("checkpoint's queue (step 4) disagrees with the log" in text) == (name == "differs")
        assert "latest checkpoint at step 4" in text
        assert "missing from log.jsonl" not in text
    cut = write_run(tmp_path / "cut", {"1": log[:3]}, alpha=alpha)     # a log cut to 3 of a run's 5 steps
    write_checkpoint(cut, 5, {"step": 5, "layers": {"1": dict(D_base=pl0, Z=log[4]["z"] * math.sqrt(D),
                                                              a=1 / math.sqrt(D), zmax=math.sqrt(D))}})
    verdict = E.report(cut).split("## Verdict")[1].split("##")[0]
    assert verdict.strip().startswith("- the log ends at step 2 but the latest checkpoint is at step 5: 2 step(s) "
                                      "are missing from log.jsonl")


def test_baseline_pl_and_its_growth(tmp_path):
    pl = [0.01 * (t + 1) for t in range(8)]                          # +0.01 per step
    flat = [0.02] * 8
    d = write_run(tmp_path / "run", {"1": [dict(pl=p, D=None, z=None) for p in pl],
                                     "2": [dict(pl=p, D=None, z=None) for p in flat]}, method="memit")
    text = E.report(d)
    a = E.audit_run(E.read_run(d))
    assert a["1"]["growth"] == pytest.approx(0.01) and a["1"]["grows"]
    assert a["1"]["mean_pl"] == pytest.approx(0.045)
    assert a["2"]["growth"] == pytest.approx(0.0, abs=1e-15) and not a["2"]["grows"]
    assert "no queue (memit): PL grows on layer(s) 1 with nothing to bound it" in text
    assert "| 1 | 8 | 0.045 | 0.01 | 0.08 | +0.01/step |" in text
    assert "## Preservation loss per layer" in text and "Audit of theorem T1" not in text     # no queue: no T1 audit
    assert "## Audit of theorem T1" in E.report(write_run(tmp_path / "lyap", {"1": queue_log([0.1, 0.1], 2.0)}))
    assert not (d / "queue.svg").exists()
    assert "- method memit, layers [1, 2], λ 30.0, batch size 10" in text      # memit reads no α: not shown
    queued = E.report(write_run(tmp_path / "queued", {"1": queue_log([0.1, 0.1], 2.0)}))
    assert "- method lyaplock, layers [1], λ 30.0, α 2.0, batch size 10" in queued
    projected = write_run(tmp_path / "alphaedit", {"1": [dict(pl=0.01, D=None, z=None)] * 2}, method="alphaedit")
    config = json.loads((projected / "config.json").read_text())
    config["hparams"] |= dict(l2=1.0, nullspace_threshold=0.02)
    (projected / "config.json").write_text(json.dumps(config))
    assert "- method alphaedit, layers [1], L2 1.0, null-space threshold 0.02, batch size 10" in E.report(projected)
    waiting = E.report(write_run(tmp_path / "waiting", {"1": [dict(pl=0.0, D=None, z=1.0)] * 2}))   # (was: "no
    assert "- queue not calibrated yet (lyaplock: it waits for a step that moves the layer): PL is flat" in waiting
    assert "Its queue is not calibrated yet (it waits for a step that moves the layer): theorem T1 applies" in waiting
    assert "no queue" not in waiting and "keeps no queue" not in waiting                        # queue (lyaplock)")
    mixed = E.report(write_run(tmp_path / "mixed", {"1": [dict(pl=0.0, D=None, z=1.0)] * 2,
                                                     "2": queue_log([0.1, 0.1], 2.0)}))     # (was: a table uncaptioned)
    assert "\nNot calibrated yet (no D: T1 applies from the step that calibrates the queue):\n\n| layer | steps T" in mixed


def test_baseline_pl_grows_when_it_rises_more_than_one_percent_of_its_mean_a_step():
    """audit_pl's `grows`: the last half's slope above 1% of its mean PL per step (2% grows, 0.5% does not)."""
    two, half = E.audit_pl([1 + 0.02 * t for t in range(8)]), E.audit_pl([1 + 0.005 * t for t in range(8)])
    assert two["growth"] == pytest.approx(0.02) and two["grows"]                     # 0.02 > 0.0111
    assert half["growth"] == pytest.approx(0.005) and not half["grows"]              # 0.005 < 0.0103


def test_baseline_pl_growth_is_judged_against_its_window_s_mean_not_the_run_s():
    """audit_pl's `grows`: the last half's slope against 1% of that half's mean PL. A PL that fell
    from 10 to 1 and now rises 0.015 a step grows (1% of its window's mean 1.0225 is 0.0102),
    though 0.015 is under 1% of the whole run's mean 5.51."""
    a = E.audit_pl([10.0] * 4 + [1 + 0.015 * t for t in range(4)])
    assert a["growth"] == pytest.approx(0.015) and a["grows"]
    assert a["mean_pl"] == pytest.approx((40 + 4.09) / 8) and a["last"] == pytest.approx(1.045)


def test_report_of_an_interrupted_run_reads_only(tmp_path):
    """A torn last log line, no summary.json, no cases.jsonl: the report covers the steps that
    are whole and leaves the run's files as they were; an unreadable summary.json, a log with no
    whole step and a run directory it cannot write into are said so."""
    pl0, alpha = 0.05, 4.0
    d = write_run(tmp_path / "run", {"1": queue_log([pl0, 0.1, 0.3], alpha)}, alpha=alpha, summary=False,
                  torn=True, ability=[dict(step=0, edits=0, final=False, perplexity=100.0)])
    case = {"efficacy": 0.0, "generalization": 0.5, "specificity": 1.0}
    (d / "cases_pre.jsonl").write_text(json.dumps(case) + "\n")
    files = {p.name: p.read_bytes() for p in d.iterdir()}
    text = E.report(d)
    assert {p.name: p.read_bytes() for p in d.iterdir() if p.name in files} == files
    assert ("in progress or interrupted (no summary.json yet): 3 steps logged, 30 edits; "
            "1 log line(s) left out") in text
    whole = (d / "log.jsonl").read_bytes()
    (d / "log.jsonl").write_bytes(whole + b"\n\xff\xfe\n")      # torn inside a character (was: a UnicodeDecodeError)
    assert "3 steps logged, 30 edits; 2 log line(s) left out" in E.report(d)
    (d / "log.jsonl").write_bytes(whole)
    assert E.audit_run(E.read_run(d))["1"]["T"] == 3
    assert "| efficacy | 0.00 |  |" in text and "| generalization | 50.00 |  |" in text
    assert "## Metrics before and after editing (after: when the run finishes, in summary.md)" in text   # (it
    for name in ("pl_layer1.svg", "queue.svg", "perplexity.svg", "metrics.svg"):
        ET.parse(d / name)
    assert not (d / "general.svg").exists()
    (d / "summary.json").write_text("{")                  # (was: "no summary.json yet")
    assert "- summary.json is unreadable: 3 steps logged" in E.report(d)
    (d / "summary.json").unlink()
    (d / "log.jsonl").write_text('{"step": 0, "lay')      # no whole step, a checkpoint at step 2 (was: "step -1")
    write_checkpoint(d, 2, {"step": 2, "layers": {}})
    assert "log.jsonl holds no whole step but the latest checkpoint is at step 2" in E.report(d)
    whole = (d / "ckpt-000002" / "weights.safetensors").read_bytes()
    (d / "ckpt-000002" / "weights.safetensors").write_bytes(whole[:len(whole) // 2])     # cut (was: not a word)
    text = E.report(d)
    assert f"- its latest checkpoint cannot be resumed from: {d / 'ckpt-000002' / 'weights.safetensors'} is " \
           "unreadable (" in text and "latest checkpoint is at step 2" not in text
    (d / "ckpt-000002" / "weights.safetensors").write_bytes(whole)
    (d / "latest.json").write_text(json.dumps({"checkpoint": "ckpt-000009", "step": 9}))   # named, not there
    assert f"cannot be resumed from: {d / 'ckpt-000009' / 'state.safetensors'} is unreadable" in E.report(d)
    (d / "latest.json").write_text(json.dumps({"checkpoint": "ckpt-000002", "step": 2}))
    state = (d / "ckpt-000002" / "state.json").read_text()
    for damaged, why in (("{}", "state.json lacks method/step/n_edits/layers"), ('{"method": "lyaplock", "step": "x", "n_edits": 0, '
                         '"layers": {}}', "step and n_edits must be"), ('{"method": "lyaplock", "step": 2, "n_edits": 0, '
                         '"layers": []}', "layers must map"), ('{"method": [], "step": 2, "n_edits": 0, "layers": {}}',
                         "unknown method []"), ('{"method": "lyaplock", "step": 2, "n_edits": 0, "layers": {"\u00b2": {}}}',
                         "layers must map")):    # (were: nothing said, a TypeError, an AttributeError, a TypeError)
        (d / "ckpt-000002" / "state.json").write_text(damaged)
        assert f"cannot be resumed from: {d / 'ckpt-000002'}: {why}" in E.report(d)
    (d / "ckpt-000002" / "state.json").write_text(state)
    real = Path.write_text                                # a read-only mount: the report all the same
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Path, "write_text", lambda self, *a, **k: (_ for _ in ()).throw(OSError(30, "Read-only "
                      "file system")) if self.parent == d else real(self, *a, **k))
        text = E.report(d)
    assert f"- not written into {d} (Read-only file system): report.md and some or all of the figures" in text
    assert "## Verdict" in text
    (d / "config.json").write_bytes(b"\xff\xfe{")              # not UTF-8 (was: the codec's error alone)
    with pytest.raises(ValueError, match="not a run directory .no readable config.json"):
        E.report(d)
    only_config = tmp_path / "new"
    only_config.mkdir()
    (only_config / "config.json").write_text(json.dumps({"hparams": {"method": "lyaplock"}}))
    assert "nothing to audit yet" in E.report(only_config)
    with pytest.raises(ValueError, match="missing: no such run directory"):
        E.report(tmp_path / "missing")
    testbed = tmp_path / "tb"                           # a testbed's report: pointed to its table
    testbed.mkdir()
    for name in ("result.json", "table.md"):
        (testbed / name).write_text("{}")
    with pytest.raises(ValueError, match="tb: a testbed report .its table.md and figures are the report."):
        E.report(testbed)
    with pytest.raises(ValueError, match="result.json: a file, not a run directory"):
        E.report(testbed / "result.json")
    model_dir = tmp_path / "model"                      # a checkpoint: refused, nothing written into it
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(ValueError, match=r"model: not a run directory \(its config.json holds no run settings"):
        E.report(model_dir)
    assert [p.name for p in model_dir.iterdir()] == ["config.json"]


def test_a_hand_edited_run_file_is_one_line_from_the_command(tmp_path, capsys):
    """A log entry whose z is not a number, a summary that is not an object: `report` names the
    run directory in one line (were a TypeError and an AttributeError)."""
    import lyaplock as L
    d = write_run(tmp_path / "z", {"1": queue_log([1.0, 1.2, 1.1], 2.0)})
    (d / "log.jsonl").write_text((d / "log.jsonl").read_text().replace('"z": ', '"z": "x", "was": ', 1))
    (write_run(tmp_path / "s", {"1": queue_log([1.0, 1.2, 1.1], 2.0)}) / "summary.json").write_text("[1, 2]")
    for run in (tmp_path / "z", tmp_path / "s"):
        assert L.main(["report", str(run)]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"error: {run}: a run file holds something a run does not write (") and err.count("\n") == 1


def test_report_marks_the_stop_and_writes_well_formed_figures(tmp_path):
    pl0, alpha = 0.05, 4.0
    stop = dict(step=4, edits=40, metric="mean zero-shot score", value=0.2, before=0.5, threshold=0.25)
    d = write_run(tmp_path / "run", {"1": queue_log([pl0, 0.1, 0.3, 0.25], alpha),
                                     "2": queue_log([pl0, 0.1, 0.1, 0.1], alpha)}, alpha=alpha, stop=stop)
    text = E.report(d)
    assert ("the run stopped at step 4 (40 edits), the collapse point: its mean zero-shot score 0.2 "
            "fell below 0.25 (--stop-below 0.5 × its 0.5 before editing)") in text
    assert text.index("collapse point") < text.index("T1's bound holds")        # the most urgent first
    assert "the queue is at its floor (PL ≤ D at every step, at most 0.5·D) on layer(s) 2 and T1's" in text
    sound = dict(queue=True, holds=True, replay_ok=True)
    stable = sound | dict(trend="stable", max_pl_over_D=1.2, mean_pl=0.19, D=0.2, slack=0.01)
    floor = sound | dict(trend="floor", max_pl_over_D=0.5, mean_pl=0.1, D=0.2, slack=0.0)
    assert E.queue_findings({"1": stable, "2": floor})[0].startswith(      # both kinds: each named
        "the queue is strongly stable on layer(s) 1, 2 (at its floor on 2: PL ≤ D at every step, at most 0.5·D) and")
    names = ["pl_layer1.svg", "pl_layer2.svg", "queue.svg", "perplexity.svg", "general.svg", "metrics.svg"]
    for name in names:
        root = ET.parse(d / name).getroot()
        assert root.tag == "{http://www.w3.org/2000/svg}svg" and f"![{name[:-4]}]({name})" in text
    pl_fig = (d / "pl_layer1.svg").read_text()
    assert 'stroke-dasharray="5,4"' in pl_fig                                     # D drawn
    assert "sst2 f1" in (d / "general.svg").read_text() and "cola mcc" in (d / "general.svg").read_text()
    assert "efficacy (gen.)" in (d / "metrics.svg").read_text()
    one_point = E.svg_plot({"a<b & c": ([1], [-0.5])}, "x < y", "z")         # escaped; a single point
    assert ET.fromstring(one_point).tag.endswith("svg")
    collapsed = E.svg_plot({"ppl": ([0, 10, 20, 30, 40], [100.0, 120.0, float("nan"), 140.0, float("inf")])},
                           "p", "p", hline=float("nan"))     # (points "220.0,nan", labels at y="nan", all else at 0)
    assert "nan" not in collapsed and "inf" not in collapsed and ET.fromstring(collapsed).tag.endswith("svg")
    whole = E.svg_plot({"ppl": ([0, 10, 30], [100.0, 120.0, 140.0])}, "p", "p")
    points = lambda svg: [line.split('"')[1] for line in svg.split("<polyline points=")[1:]]
    assert points(collapsed) == [" ".join(points(whole)[0].split()[:2]), points(whole)[0].split()[2]]   # broken at NaN
    assert ET.fromstring(E.svg_plot({"none": ([], [])}, "p", "p")).tag.endswith("svg")   # (was min() of nothing)


# ------------------------------------------------------- the report's figures, tables and findings
SVG = "{http://www.w3.org/2000/svg}"


def test_text_in_a_figure_is_escaped_once_wherever_it_goes():
    """A title, axis label, legend entry or bar label holding '<', '&' and '>' parses as SVG and
    reads back as written: escaped in every place, and once ('&' first, else '<' shows as '&lt;')."""
    text = "a<b & c>d"
    plot = ET.fromstring(E.svg_plot({text: ([0, 1], [1.0, 2.0])}, text, text))
    assert [t.text for t in plot.iter(SVG + "text")].count(text) == 3            # title, y label, legend
    bars = ET.fromstring(E.svg_bars({text: (10.0, 20.0)}, text))
    assert [t.text for t in bars.iter(SVG + "text")].count(text) == 2            # title, bar label


def test_plot_axes_run_left_to_right_and_up_from_zero_and_hold_the_threshold():
    """svg_plot puts the first x at the x axis' left end (60) and the last at its right end
    (w − 20), a larger y higher up (a smaller SVG y), the y axis from 0 for positive data, and a
    threshold D above every point still between the axes' top and bottom."""
    root = ET.fromstring(E.svg_plot({"PL": ([10, 20, 30], [0.1, 0.3, 0.2])}, "t", "PL", hline=0.5))
    w = float(root.get("width"))
    pts = [tuple(map(float, p.split(","))) for p in root.find(SVG + "polyline").get("points").split()]
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    assert xs[0] == 60 and xs[-1] == w - 20 and xs[0] < xs[1] < xs[2]
    assert ys[1] < ys[2] < ys[0]                                                 # 0.3 highest, 0.1 lowest
    axis = [l for l in root.iter(SVG + "line") if l.get("x1") == l.get("x2") == "60"][0]
    top, bottom = float(axis.get("y1")), float(axis.get("y2"))
    assert top < min(ys) and max(ys) < bottom
    d_line = [l for l in root.iter(SVG + "line") if l.get("stroke-dasharray") == "5,4"][0]
    assert top <= float(d_line.get("y1")) < min(ys)                               # D = 0.5: above the data, inside
    y_ticks = [t for t in root.iter(SVG + "text") if t.get("x") == "55"]
    assert y_ticks[0].text == "0" and float(y_ticks[0].get("y")) - 4 == pytest.approx(bottom, abs=0.06)
    assert [t.text for t in root.iter(SVG + "text") if t.get("y") == str(int(bottom) + 14)] == ["10", "30"]   # x ticks
    mixed = ET.fromstring(E.svg_plot({"cola mcc": ([0, 1], [-0.1, -0.2]), "sst2 f1": ([0, 1], [0.6, 0.5])}, "t", "s"))
    axis = [l for l in mixed.iter(SVG + "line") if l.get("x1") == l.get("x2") == "60"][0]
    ys = [float(p.split(",")[1]) for line in mixed.iter(SVG + "polyline") for p in line.get("points").split()]
    assert all(float(axis.get("y1")) <= y <= float(axis.get("y2")) for y in ys)   # negative and positive: all inside


def test_metric_bars_put_before_in_its_legend_colour_and_after_in_its_own(tmp_path):
    """metrics.svg: each metric's bars are its value before (the legend's 'before' colour, left)
    and after (the 'after' colour, right), heights on 0..100 (190 px here); a metric the summary's
    "pre" lacks has no before bar."""
    d = write_run(tmp_path / "run", {"1": queue_log([0.05, 0.1, 0.3], 4.0)}, alpha=4.0)
    E.report(d)
    root = ET.parse(d / "metrics.svg").getroot()
    legend = {t.text: t.get("fill") for t in root.iter(SVG + "text") if t.text in ("before", "after")}
    bars = [r for r in root.iter(SVG + "rect") if r.get("fill") != "white"]
    height = lambda which: [round(float(r.get("height")) / 190 * 100, 1) for r in bars if r.get("fill") == legend[which]]
    assert height("before") == [0.0, 0.0, 95.0, 0.0]               # efficacy, generalization, specificity, score
    assert height("after") == [80.0, 60.0, 90.0, 74.0, 40.0]       # and efficacy_generative
    x = lambda r: float(r.get("x"))
    assert all(x(b) < x(a) for b, a in zip(bars[0::2], bars[1::2]))


def test_figures_plot_the_logged_series_against_the_edits(tmp_path):
    """Each figure is svg_plot of the right series: each layer's PL against the edits with its D
    (from the step that calibrated it) dashed; every layer's queue z, one calibrated after step 0
    included; perplexity and each task's headline (CoLA's MCC, else F1) against the edits of its
    ability entry."""
    pl0, alpha = 0.05, 4.0
    late = [dict(pl=0.0, D=None, z=1.0)] * 2 + queue_log([pl0, 0.1, 0.3], alpha)
    now = queue_log([pl0, 0.2, 0.1, 0.3, 0.25], alpha)
    d = write_run(tmp_path / "run", {"1": late, "2": now}, alpha=alpha, batch=10)
    E.report(d)
    x = [10, 20, 30, 40, 50]
    for l, rows in (("1", late), ("2", now)):
        assert (d / f"pl_layer{l}.svg").read_text() == E.svg_plot(
            {"PL": (x, [r["pl"] for r in rows])}, f"preservation loss, layer {l} (dashed: threshold D)", "PL",
            alpha * pl0)
    assert (d / "queue.svg").read_text() == E.svg_plot(
        {"layer 1": (x, [r["z"] for r in late]), "layer 2": (x, [r["z"] for r in now])},
        "virtual queue z = a·Z (its weight on preservation is z·λ)", "z")
    assert (d / "perplexity.svg").read_text() == E.svg_plot({"perplexity": ([0, 50], [100.0, 120.0])},
                                                          "held-out perplexity", "perplexity")
    assert (d / "general.svg").read_text() == E.svg_plot(
        {"sst2 f1": ([0, 50], [0.6, 0.5]), "cola mcc": ([0, 50], [-0.1, -0.2])}, "zero-shot general ability", "score")


def test_audit_table_and_findings_read_each_layers_own_numbers(tmp_path):
    """The table's z(T)/T is the last z over T; a queue at its floor is said to hold PL at most
    max(PL)/D (the largest PL, not the last) and is listed in T1's line with its time average."""
    pl0, alpha = 0.05, 4.0
    D = alpha * pl0
    floor = queue_log([pl0, 0.9 * D, 0.5 * D, 0.3 * D], alpha)                   # max PL at step 1
    growing = queue_log([pl0, 1.5 * D, 1.5 * D, 1.5 * D], alpha)                 # z 1, 1.5, 2, 2.5
    text = E.report(write_run(tmp_path / "run", {"1": floor, "2": growing}, alpha=alpha))
    assert "| 2 | 4 | 0.2375 | 0.2 | 0.075 | yes | 2.500 | 0.625 | +0.5/step | growing |" in text
    assert "| 1 | 4 | 0.0975 | 0.2 | 0 | yes | 1.000 | 0.25 | +0/step | floor |" in text
    assert ("the queue is at its floor (PL ≤ D at every step, at most 0.9·D) on layer(s) 1 and T1's bound holds: "
            "layer 1: time-average PL 0.0975 ≤ D 0.2 + slack 0") in text


def test_a_queue_just_off_its_floor_on_several_layers_names_the_earliest_step():
    """Two layers that left their floor too recently to judge: one line, the step the first left it."""
    pl0, alpha = 0.05, 4.0
    D = alpha * pl0
    a = lambda pl: E.audit_queue(pl, [e["z"] for e in queue_log(pl, alpha)], D)
    audits = {"1": a([pl0, 0.5 * D, 0.5 * D, 1.1 * D, 1.1 * D]), "2": a([pl0, 0.5 * D, 0.5 * D, 0.5 * D, 1.1 * D])}
    assert [audits[l]["first_active"] for l in "12"] == [3, 4]
    assert E.queue_findings(audits) == ["the queue has only just left its floor on layer(s) 1, 2 (step 3): too early "
                                        "to tell whether it holds PL at D; run longer"]


def test_checkpoint_that_disagrees_with_the_log_in_D_base_or_a_or_runs_one_step_past_it(tmp_path):
    """check_state compares the checkpoint's a with 1/√D and α·D_base with the logged D, not only
    a·Z with z; a checkpoint one step past the last logged step says that step is missing."""
    pl0, alpha = 0.05, 4.0
    D = alpha * pl0
    log = queue_log([pl0, 0.1, 0.3, 0.25, 0.2], alpha)
    good = dict(D_base=pl0, Z=log[3]["z"] * math.sqrt(D), a=1 / math.sqrt(D), zmax=math.sqrt(D))
    for name, change in (("agrees", {}), ("d_base", dict(D_base=1.01 * pl0)),
                         ("a", dict(a=1.01 / math.sqrt(D), Z=log[3]["z"] * math.sqrt(D) / 1.01))):
        run = write_run(tmp_path / name, {"1": log}, alpha=alpha, summary=False)
        write_checkpoint(run, 4, {"step": 4, "layers": {"1": good | change}})
        assert ("layer 1: the checkpoint's queue (step 4) disagrees with the log" in E.report(run)) == (name != "agrees")
    past = write_run(tmp_path / "past", {"1": log}, alpha=alpha, summary=False)      # 5 steps logged, 6 done
    write_checkpoint(past, 6, {"step": 6, "layers": {"1": good}})
    verdict = E.report(past).split("## Verdict")[1].split("##")[0]
    assert verdict.strip().startswith("- the log ends at step 4 but the latest checkpoint is at step 6: 1 step(s) "
                                      "are missing from log.jsonl")


def test_log_read_up_to_its_first_gap_the_later_of_a_step_logged_twice_layers_in_number_order(tmp_path):
    """read_run: a step logged twice counts once, as its later line, and the header says so (not
    as a line left out); the steps after a gap are left out and counted so; layers go in number
    order (10 after 2)."""
    entry = lambda t, pl: json.dumps({"step": t, "layers": {"10": dict(pl=pl, D=None, z=None),
                                                            "2": dict(pl=pl, D=None, z=None)}, "edits": 10 * (t + 1)})
    d = write_run(tmp_path / "twice", {"2": [dict(pl=0.1, D=None, z=None)] * 3}, method="memit")
    (d / "log.jsonl").write_text("\n".join([entry(0, 0.1), entry(1, 0.5), entry(1, 0.2), entry(2, 0.3)]) + "\n")
    run = E.read_run(d)
    assert [s["layers"]["2"]["pl"] for s in run.steps] == [0.1, 0.2, 0.3] and E.run_layers(run) == ["2", "10"]
    text = E.report(d)
    assert text.index("| 2 | 3 | 0.2 |") < text.index("| 10 | 3 | 0.2 |")
    assert "- finished: 3 steps logged, 30 edits; 1 step(s) logged again (the later line read)\n" in text
    (d / "log.jsonl").write_text("\n".join([entry(0, 0.1), entry(1, 0.2), entry(3, 0.3)]) + "\n")
    assert "- finished: 2 steps logged, 20 edits; 1 log line(s) left out (torn or past a gap)" in E.report(d)


def test_baseline_line_reads_first_to_last_pl_and_the_last_halfs_growth(tmp_path):
    """A baseline's verdict line gives PL at step 0 → now and the growth fitted on the last half
    (flat, then rising 0.1 a step: +0.1/step); with no queue anywhere, no 'not calibrated' caption."""
    pl = [0.1, 0.1, 0.1, 0.1, 0.1, 0.2, 0.3, 0.4]
    text = E.report(write_run(tmp_path / "run", {"1": [dict(pl=p, D=None, z=None) for p in pl]}, method="memit"))
    assert "- no queue (memit): PL grows on layer(s) 1 with nothing to bound it (layer 1: 0.1 → 0.4, +0.1/step)" in text
    assert "Not calibrated yet" not in text


def test_a_run_with_a_queue_still_waiting_on_one_layer_is_audited_under_T1(tmp_path):
    """One layer calibrated, one waiting: the report is T1's audit (the waiting layer tabled apart),
    not the baselines' 'Preservation loss per layer'."""
    text = E.report(write_run(tmp_path / "mixed", {"1": [dict(pl=0.0, D=None, z=1.0)] * 2,
                                                   "2": queue_log([0.1, 0.1], 2.0)}))
    assert "## Audit of theorem T1" in text and "## Preservation loss per layer" not in text


def test_metrics_table_gives_each_tasks_headline(tmp_path):
    """The metrics table's zero-shot rows are each task's headline (headline_of): CoLA's mcc,
    MMLU's accuracy, else f1, not another of its figures; perplexity has its row. (The header of
    a whole log says nothing of lines left out.)"""
    d = write_run(tmp_path / "run", {"1": queue_log([0.1, 0.1], 2.0)})
    summary = json.loads((d / "summary.json").read_text())
    general = {"cola": {"mcc": 0.25, "f1": 0.5}, "mmlu": {"accuracy": 0.375, "f1": 0.125},
               "sst2": {"f1": 0.75, "accuracy": 0.5}}
    summary["general"], summary["pre"]["general"] = general, general
    (d / "summary.json").write_text(json.dumps(summary))
    text = E.report(d)
    assert "| perplexity | 100.00 | 120.00 |" in text
    assert "- finished: 2 steps logged, 20 edits\n" in text                      # a whole log: nothing left out
    rows = [r for r in text.splitlines() if r.startswith("| general.")]
    assert rows == ["| general.cola.mcc | 0.25 | 0.25 |", "| general.mmlu.accuracy | 0.38 | 0.38 |",
                    "| general.sst2.f1 | 0.75 | 0.75 |"]


# ----------------------------------------------------------------------- generative efficacy
class GlueTok:
    """Whitespace tokens over a word list (id 0 is BOS, prepended unless bos=False); a word not
    in the list is its first letter and a "##" piece ("xer" -> x ##er). Decoding puts a space
    before each word but glues "##" pieces to the previous one."""
    bos_id, pad_id, eos_ids = 0, 0, []
    pad = M.Tokenizer.pad

    def __init__(self, words):
        self.words = ["<s>", *words]
        self.ids = {w: i for i, w in enumerate(self.words)}

    def encode(self, text, bos=None):
        ids = [0] if bos is not False else []
        for w in text.split():                      # a word, or a word and its "##" piece
            ids += [self.ids[w]] if w in self.ids else [self.ids[w[:1]], self.ids["##" + w[1:]]]
        return ids

    def decode(self, ids):
        return "".join(self.words[i][2:] if self.words[i].startswith("##") else " " + self.words[i]
                       for i in ids if i != 0)


class GreedyBigram(nn.Module):
    """Next-token probabilities set by the current word (probs[word] = {next: p}, the rest on
    "_"), with what modeling.generate needs: a config for its (empty) KV cache and `embed`."""

    def __init__(self, words, probs):
        super().__init__()
        self.tokenizer = GlueTok(words)
        ids, V = self.tokenizer.ids, len(words) + 1
        table = torch.full((V, V), 1e-30)
        for w, row in probs.items():
            table[ids[w], ids["_"]] = 1 - sum(row.values())
            for nxt, p in row.items():
                table[ids[w], ids[nxt]] = p
        self.logp = nn.Parameter(table.log(), requires_grad=False)               # (V, V)
        self.embed = nn.Embedding(V, 1)
        self.cfg = SimpleNamespace(vocab_size=V, n_layers=0, n_kv_heads=1, head_dim=1, longrope_switch=None)
        self.placement = []                         # no layers, so no cache tensors anywhere

    def forward(self, ids, mask=None, logits_at=None, cache=None):
        if logits_at is not None:
            ids = ids.gather(1, logits_at)
        return M.Output(self.logp[ids])


WORDS = ["S", "r", "p1", "p2", "p3", "q", "new", "true", "a", "b", "c", "d", "x", "##er", "_"]


def request(cid, rewrite_end, para_ends, new="new", true="true", kind="counterfact"):
    return Request(cid, "{} " + rewrite_end, "S", new, true, tuple("S " + p for p in para_ends), ("S q",),
                   (true,), kind=kind)


def greedy_model():
    return GreedyBigram(WORDS, {
        "r": {"new": 0.3, "true": 0.2},                 # new beats true, but greedy says "_"
        "p1": {"new": 0.6, "true": 0.1},                # both: new wins and is greedy
        "p2": {"a": 0.7, "true": 0.1},                  # a b c by greedy steps
        "a": {"b": 0.6}, "b": {"c": 0.5, "d": 0.4}, "c": {},
        "p3": {"x": 0.8},                               # x, then "##er": "xer", not "x"
        "x": {"##er": 0.9},
        "q": {"true": 0.9}, "_": {},
    })


def test_teacher_forced_success_that_decoding_does_not_reproduce():
    m = greedy_model()
    reqs = [request(0, "r", ["p1"]), request(1, "p1", ["r", "p1"])]
    tf = E.counterfact_eval(m, reqs)
    gen = E.generative_eval(m, reqs, batch_size=3)
    assert tf[0]["efficacy"] == 1 and gen[0]["efficacy_generative"] == 0        # NLL says yes, greedy "_"
    assert gen[0]["greedy"][0].split()[0] == "_"
    assert tf[1]["efficacy"] == 1 and gen[1]["efficacy_generative"] == 1        # both
    assert gen[0]["generalization_generative"] == 1 and gen[1]["generalization_generative"] == 0.5
    assert tf[1]["generalization"] == 1
    s = E.summarize([t | g for t, g in zip(tf, gen)])
    assert s["efficacy"] == 100 and s["efficacy_generative"] == 50 and s["generalization_generative"] == 75
    assert list(s)[:7] == ["n_cases", "efficacy", "generalization", "specificity", "score",
                           "efficacy_generative", "generalization_generative"]


def test_multi_token_targets_and_word_ends():
    m = greedy_model()
    reqs = [request(0, "p2", ["p2"], new="a b c"),          # greedy a, b, c: success
            request(1, "p2", [], new="a b d"),              # greedy goes c at the third token
            request(2, "p3", [], new="x"),                  # decodes "xer": not the word x
            request(3, "p3", [], new="xer"),                # the whole word: a success
            request(4, "p2", ["p2"], new="a b c", kind="zsre")]
    gen = E.generative_eval(m, reqs, batch_size=2)
    assert [g["efficacy_generative"] for g in gen] == [1, 0, 0, 1, 1]
    assert gen[1]["generalization_generative"] is None and gen[0]["generalization_generative"] == 1
    assert gen[0]["greedy"][0].startswith(" a b c")
    assert len(gen[0]["greedy"][0].split()) == 3 + 2                            # target tokens + 2
    assert E.generative_eval(m, reqs, batch_size=1) == gen                      # batching is invisible
    tf = E.counterfact_eval(m, reqs[:2])
    assert tf[1]["efficacy"] == 1                       # mean NLL of "a b d" still beats "true"


def test_continues_with_rules():
    assert E.continues_with(" Paris is", "Paris") and E.continues_with("Paris", " Paris ")
    assert E.continues_with("\n Paris, France", "Paris") and E.continues_with(" New York City", "New York")
    assert not E.continues_with(" Parisian", "Paris") and not E.continues_with(" paris", "Paris")
    assert E.continues_with(" U.S.A", "U.S.") and E.continues_with(" 1990s", "1990") is False
    assert not E.continues_with(" 19901", "1990") and not E.continues_with(" Paris2", "Paris")   # a digit too
    assert not E.continues_with(" Paris", "") and not E.continues_with("", "Paris")


def test_generative_eval_on_the_fact_model_knows_its_true_facts():
    """The trained fact model answers its true facts in greedy decoding (it knows 96% of them
    teacher-forced) and none of the new targets before editing."""
    m = M.load(FACTMODEL)
    reqs, _ = load_requests(FACTMODEL / "edits.json", limit=30)
    true = [dataclasses.replace(r, target_new=r.target_true) for r in reqs]
    assert E.summarize(E.generative_eval(m, true))["efficacy_generative"] >= 90
    s = E.summarize(E.generative_eval(m, reqs))
    assert s["efficacy_generative"] == 0 and s["generalization_generative"] <= 5


def test_plot_legend_labels_never_overlap_and_every_series_looks_different():
    """Thirteen series with long names (the churn testbed's queue figure: 'lyaplock:superseded=remove
    L1' and '... L2' overlapped at 120 px a column, and the ninth series took the first one's
    colour): no two legend labels' boxes (at 6.6 px a character) overlap or leave the figure, and
    no two series share both colour and dash pattern."""
    names = [f"lyaplock:superseded=remove{'x' * (i % 3)} L{i}" for i in range(13)] + ["a"]
    series = {n: ([0, 10, 20], [i, i + 1, i / 2]) for i, n in enumerate(names)}
    root = ET.fromstring(E.svg_plot(series, "queues", "z"))
    ns = "{http://www.w3.org/2000/svg}"
    w, h = float(root.get("width")), float(root.get("height"))
    boxes = [(float(t.get("x")), float(t.get("y")) - 11, float(t.get("x")) + 6.6 * len(t.text), float(t.get("y")) + 3)
             for t in root.iter(ns + "text") if t.text in series]
    assert len(boxes) == len(series)
    for i, a in enumerate(boxes):
        assert 0 <= a[0] and a[2] <= w and 0 <= a[1] and a[3] <= h, a
        for b in boxes[:i]:
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (a, b)
    styles = [(p.get("stroke"), p.get("stroke-dasharray")) for p in root.iter(ns + "polyline")]
    assert len(styles) == len(series) == len(set(styles))
    plot_top = min(float(l.get("y1")) for l in root.iter(ns + "line") if l.get("x1") == l.get("x2") == "60")
    assert plot_top > max(b[3] for b in boxes)                      # the plot starts below the legend
