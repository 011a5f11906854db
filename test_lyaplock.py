"""Tests of lyaplock.py: property tests for the theory (T1–T4) and every closed form, agreement
with the authors' own code, the run state, the command, and reliability (kills, interrupts, bad
numbers). The other test files take their shared paths and helpers (FIX, DEVICES, _cli) from
here. Run everything: python -m pytest -q"""
import dataclasses
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import data
import lyaplock as L
import model as M
import stats as S
from data import Request

HERE = Path(__file__).parent
FIX = HERE / "fixtures"
STORIES = FIX / "stories260K-hf"
ORACLE = FIX / "oracle"
torch.set_num_threads(2)
# the device tests run on the CPU everywhere and again on CUDA where a GPU is present
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]




# ==================== lyaplock: the closed form, the queue, the run state


def close(a, b, rtol):
    """Relative Frobenius agreement ‖a − b‖ ≤ rtol·‖b‖ (both as float64)."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    err = float((a - b).norm() / b.norm().clamp_min(1e-300))
    assert err <= rtol, f"relative error {err:.3g} > {rtol:g}"


# ----------------------------------------------------------------------------- queue: T1–T3

def queue_path(seed):
    """A random sample path of E13 with a > 0, b ≥ 0, PL ≥ 0 (zeros, spikes, long runs)."""
    rng = random.Random(seed)
    a, D = 10 ** rng.uniform(-2, 1), 10 ** rng.uniform(-2, 1)
    b = rng.choice([0.0, rng.uniform(0, 1)])
    zmax = rng.choice([0.0, rng.uniform(0, 3)])
    Z = [zmax + rng.choice([0.0, rng.uniform(0, 3)])]
    pl = [rng.choice([0.0, rng.expovariate(1 / D), 5 * D * rng.random()])
          for _ in range(rng.randint(1, 300))]
    for p in pl:
        Z.append(L.queue_next(Z[-1], p, D, a, b, zmax))
    return pl, Z, a, b, D, zmax


@pytest.mark.parametrize("seed", range(300))
def test_queue_theorems_T1_T2_T3(seed):
    pl, Z, a, b, D, zmax = queue_path(seed)
    eps = 1e-12 * (1 + max(Z) + a * (max(pl) + D) + b) ** 2    # float rounding only
    for T in range(1, len(pl) + 1):                             # T1 on every prefix
        bound = D - b / a + (Z[T] - Z[0]) / (a * T)
        assert math.fsum(pl[:T]) / T <= bound + eps / a
    for t, p in enumerate(pl):
        x = a * (p - D) + b
        assert Z[t + 1] >= zmax                                                  # T2
        assert Z[t + 1] - Z[t] >= x - eps                                        # T2
        assert Z[t + 1] ** 2 / 2 - Z[t] ** 2 / 2 <= Z[t] * x + x * x / 2 + zmax ** 2 / 2 + eps  # T3


@pytest.mark.parametrize("seed", range(20))
def test_normalised_queue_is_raw_queue_scaled(seed):
    pl, _, _, _, D, _ = queue_path(seed)
    a = 1 / math.sqrt(D)
    Z, z = math.sqrt(D), 1.0            # code defaults: Z(0) = Zmax = √D, b = 0
    for p in pl:
        Z, z = L.queue_next(Z, p, D, a, 0.0, math.sqrt(D)), L.queue_next_normalised(z, p, D)
        assert abs(a * Z - z) <= 1e-12 * z


@pytest.mark.parametrize("seed", range(20))
def test_layer_queue_calibrates_after_step0_then_follows_E14(seed):
    pl, _, _, _, _, _ = queue_path(seed)
    alpha = 10 ** random.Random(seed).uniform(-1, 2)
    ls = L.LayerState()
    pl0 = 0.1 + pl[0]
    L.feed_queue(ls, pl0, alpha)
    assert ls.D_base == pl0 and ls.zmax == math.sqrt(alpha * pl0)
    assert abs(ls.a - 1 / math.sqrt(alpha * pl0)) <= 1e-15 * ls.a
    z = L.queue_next_normalised(1.0, pl0, alpha * pl0)     # E13 applies at step 0 too
    assert abs(ls.z - z) <= 1e-12 * z
    for p in pl:
        L.feed_queue(ls, p, alpha)
        z = L.queue_next_normalised(z, p, alpha * pl0)
        assert abs(ls.z - z) <= 1e-12 * z and ls.D_base == pl0


def test_feed_queue_adds_b_to_each_step_of_E13():
    """E13's b reaches the queue at every step, step 0's included (D = α·D_base = 2, a = 1/√2)."""
    ls = L.LayerState()
    L.feed_queue(ls, 2.0, 1.0, b=0.3)
    assert math.isclose(ls.Z, math.sqrt(2) + 0.3, rel_tol=1e-15)
    L.feed_queue(ls, 5.0, 1.0, b=0.3)
    assert math.isclose(ls.Z, math.sqrt(2) + 0.3 + 3 / math.sqrt(2) + 0.3, rel_tol=1e-15)


@pytest.mark.parametrize("seed", range(5))
def test_step_layer_feeds_its_queue_the_loss_of_the_updated_weights(seed):
    """The theorem tests above hold queue_next alone; this holds step_layer to them: each step's
    queue is fed PL(W + Δ) (E2 after the solve, computed here as tr(ΔCΔᵀ)), calibrated from step
    0's, and the queue leaves its floor under growing edits (a queue fed the PL before the update
    passed every theorem and closed-form test)."""
    g = torch.Generator().manual_seed(seed)
    d, m = 6, 8
    A = torch.randn(m, m, dtype=torch.float64, generator=g)
    C = A @ A.T + torch.eye(m, dtype=torch.float64)
    W0 = torch.randn(d, m, dtype=torch.float64, generator=g)
    W, ls, alpha = W0.clone(), L.LayerState(), 1.5
    hp = L.HParams(method="lyaplock", layers=(0,), lam=1.0, alpha=alpha)
    z = None
    for t in range(8):
        K1 = torch.randn(m, 3, dtype=torch.float64, generator=g)
        R = (t + 1) * torch.randn(d, 3, dtype=torch.float64, generator=g)
        W_new, pl = L.step_layer(W, W0, C, K1, R, ls, hp)
        delta = W_new - W0
        assert pl == pytest.approx(float(torch.trace(delta @ C @ delta.T)), rel=1e-12)
        z = 1.0 if t == 0 else z
        z = L.queue_next_normalised(z, pl, alpha * ls.D_base)                 # E14 on those PLs
        assert ls.z == pytest.approx(z, rel=1e-12), t
        W = W_new
    assert ls.z > 1.0                                       # the queue did leave its floor


def test_a_first_step_that_leaves_w0_defers_the_calibration_and_nan_is_refused():
    """PL exactly 0 after step 0 (the layer did not move): no threshold D = α·0; the next step
    that moves the layer calibrates the queue as step 0 would (was: a ValueError that locked
    an Editor whose weights had not changed)."""
    ls = L.LayerState()
    L.feed_queue(ls, 0.0, 2.0)
    assert ls.D_base is None and ls.z == 1.0
    L.feed_queue(ls, 0.5, 2.0)
    assert ls.D_base == 0.5 and ls.z == pytest.approx(1.0)
    with pytest.raises(ValueError, match="PL > 0"):
        L.feed_queue(L.LayerState(), float("nan"), 1.0)


def test_a_real_first_steps_loss_is_far_above_its_rounding():
    """loss_rounding's bound (a first PL within it leaves the queue uncalibrated) is orders of
    magnitude under a real first step's PL: the authors' first LyapLock batch on stories260K
    (measured 3.4e11 and 4.0e11 times it; 4e10-7e10 on the fact model)."""
    m = M.load(STORIES)
    o = json.loads((ORACLE / "oracle.json").read_text())
    st, b = load_file(ORACLE / "stats.safetensors"), load_file(ORACLE / "batch_00.safetensors")
    for l in o["layers"]:
        C, W = st[f"C32.{l}"].double(), b[f"W_after.{l}"]
        assert L.preservation_loss(W, m.edit_weight(l), C) > 1e9 * L.loss_rounding(W, m.edit_weight(l), C)


def test_an_editor_whose_first_batch_is_known_already_goes_on_and_calibrates_later(tmp_path):
    """The model already gives the first batch's targets (a saved edited model given its own
    edits): that step changes nothing, logs no D, and leaves the Editor usable, and a checkpoint
    of it restores (its memory holds the step, its queue is not calibrated); the next batch
    calibrates the queue (D = α·its PL), restored or not, to the same bits."""
    ed = L.Editor.open(FIX / "factmodel-ci", lam=30, alpha=10, stats_corpus=FIX / "factmodel-ci" / "corpus.txt")
    requests, _ = data.load_requests(FIX / "factmodel-ci" / "edits.json", limit=8)
    known = [dataclasses.replace(q, target_new=q.target_true, target_true=q.target_new) for q in requests[:1]]
    log = ed.edit(known)
    assert not ed.state.partial and all(v["pl"] == 0 and v["D"] is None and v["z"] == 1.0
                                        for v in log["layers"].values())
    assert all(torch.equal(ed.model.edit_weight(l), W) for l, W in ed.W0.items())
    ed.checkpoint(tmp_path / "run")                 # uncalibrated, with that step in its memory: resumable
    again = L.Editor(M.load(FIX / "factmodel-ci"), ed.hparams, ed.C, ed.templates)
    again.restore(tmp_path / "run")
    for editor in (ed, again):
        log = editor.edit(requests[4:])
        assert all(v["pl"] > 0 and v["D"] == pytest.approx(10 * v["pl"]) for v in log["layers"].values())
    assert all(torch.equal(ed.model.edit_weight(l), again.model.edit_weight(l)) for l in ed.hparams.layers)


# ----------------------------------------------------------------------------- T4 direction

def linear_stream(V, seed, T=30, d=6, m=16, n=2):
    """LyapLock on a synthetic linear stream; returns (mean editing loss, mean queue z)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, dtype=torch.float64, generator=g)
    W0, K0 = r(d, m), r(m, 200)
    C = K0 @ K0.T / 200
    W, ls, loss, zs = W0.clone(), L.LayerState(), [], []
    for _ in range(T):
        K1 = r(m, n)
        target = W0 @ K1 + 2 * r(d, n)
        zs.append(ls.z)
        W, _ = L.step_layer(W, W0, C, K1, target - W @ K1, ls, L.HParams(lam=1.0, alpha=1.0, V=V))
        loss.append(float(((W @ K1 - target) ** 2).sum()))
    return sum(loss[1:]) / (T - 1), sum(zs[1:]) / (T - 1)     # after calibration step 0


@pytest.mark.parametrize("seed", range(4))
def test_T4_larger_V_edits_better_and_queue_grows(seed):
    runs = [linear_stream(V, seed) for V in (0.3, 1.0, 3.0, 10.0)]
    losses, queues = zip(*runs)
    assert all(x > y for x, y in zip(losses, losses[1:])), losses
    assert all(x < y for x, y in zip(queues, queues[1:])), queues


# ----------------------------------------------------------------------------- closed forms

def problem(seed, past=None):
    """Random E8 instance with explicit K0 (C = K0K0ᵀ/N) and past edits (Kp, Vp)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, dtype=torch.float64, generator=g)
    u = lambda lo, hi: lo + (hi - lo) * float(torch.rand((), generator=g, dtype=torch.float64))
    d, m, n = int(u(2, 9)), int(u(3, 13)), int(u(1, 5))
    p = int(u(0, 7)) if past is None else past
    N = m + 20
    K0, W0, Kp, Vp = r(m, N), r(d, m), r(m, p), r(d, p)
    P = dict(K0=K0, N=N, W0=W0, W=W0 + 0.3 * r(d, m), K1=r(m, n), R=r(d, n), Kp=Kp, Vp=Vp,
             C=K0 @ K0.T / N, z=u(1, 5), lam=10 ** u(-1, 1), V=10 ** u(-1, 1))
    P["S_KK"], P["S_VK"] = (Kp @ Kp.T, Vp @ Kp.T) if p else (None, None)
    return P


def null_spaced(P, method):
    """P with C given a null space for AlphaEdit's family (its smaller half of eigenvalues at 1e-3,
    under E11's 2e-2): problem's C is well conditioned, so P would be 0 and every update zero."""
    if L.projected(method):
        ev, U = torch.linalg.eigh(P["C"])
        ev[:max(1, len(ev) // 2)] = 1e-3
        P["C"] = U @ torch.diag(ev) @ U.T
    return P


def solve(P, **over):
    Q = {**P, **over}
    return L.solve_lyaplock(Q["W"], Q["W0"], Q["C"], Q["K1"], Q["R"], Q["S_KK"], Q["S_VK"],
                            Q["z"], Q["lam"], Q["V"])


def edit_loss(P, delta):
    """The editing part of E8: ‖ΔK1 − R‖² + Σ_past ‖(W+Δ)Kp − Vp‖²."""
    return (((delta @ P["K1"] - P["R"]) ** 2).sum()
            + (((P["W"] + delta) @ P["Kp"] - P["Vp"]) ** 2).sum())


def e8(P, delta):
    """E8 written directly, PL by the Frobenius form on explicit K0."""
    pres = (((P["W"] + delta - P["W0"]) @ P["K0"]) ** 2).sum() / P["N"]
    return P["V"] * edit_loss(P, delta) + P["z"] * P["lam"] * pres


@pytest.mark.parametrize("seed", range(12))
def test_solution_zeroes_gradient_and_is_a_minimum(seed):
    P = problem(seed)
    zero = torch.zeros_like(P["W"], requires_grad=True)
    scale = 1 + float(torch.autograd.grad(e8(P, zero), zero)[0].norm())
    delta = solve(P).requires_grad_()
    f = e8(P, delta)
    (grad,) = torch.autograd.grad(f, delta)
    assert float(grad.norm()) <= 1e-11 * scale
    g = torch.Generator().manual_seed(seed)
    for eps in (1e-4, 1e-2, 1.0):
        for _ in range(10):
            E = torch.randn(delta.shape, dtype=torch.float64, generator=g)
            assert e8(P, delta.detach() + eps * E) >= f.detach()


@pytest.mark.parametrize("seed", range(12))
def test_joint_scaling_of_V_and_z_leaves_delta(seed):
    P = problem(seed)
    for c in (0.1, 7.0):
        close(solve(P, V=c * P["V"], z=c * P["z"]), solve(P), 1e-11)


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("past", [0, None])
def test_growing_z_trades_editing_for_preservation(seed, past):
    """As z grows, PL(W+Δ) does not rise and the editing term does not fall (with no memory:
    exactly ‖ΔK1 − R‖²)."""
    P = problem(seed, past)
    prev_pl, prev_edit = math.inf, -math.inf
    for z in (1.0, 1.5, 3.0, 10.0, 100.0, 1e4):
        delta = solve(P, z=z)
        pl = L.preservation_loss(P["W"] + delta, P["W0"], P["C"])
        edit = float(edit_loss(P, delta))
        assert pl <= prev_pl * (1 + 1e-12) and edit >= prev_edit * (1 - 1e-12)
        prev_pl, prev_edit = pl, edit


@pytest.mark.parametrize("seed", range(12))
def test_step0_is_memit(seed):
    P = problem(seed, past=0)
    K1, R, C, lam = P["K1"], P["R"], P["C"], P["lam"]
    memit = L.solve_memit(K1, R, C, lam)
    close(memit, R @ K1.T @ torch.linalg.inv(K1 @ K1.T + lam * C), 1e-11)     # E10, slowly
    close(solve(P, W=P["W0"], z=1.0, V=1.0), memit, 1e-12)
    W1, _ = L.step_layer(P["W0"], P["W0"], C, K1, R, L.LayerState(), L.HParams(lam=lam, V=P["V"]))
    close(W1 - P["W0"], memit, 1e-12)              # step 0 ignores V, as the authors' code


@pytest.mark.parametrize("seed", range(12))
def test_preservation_trace_form_equals_frobenius(seed):
    P = problem(seed)
    direct = float((((P["W"] - P["W0"]) @ P["K0"]) ** 2).sum() / P["N"])
    assert abs(L.preservation_loss(P["W"], P["W0"], P["C"]) - direct) <= 1e-12 * direct


@pytest.mark.parametrize("seed", range(12))
def test_loss_rounding_is_m_eps_times_the_norms_and_covers_the_measured_error(seed):
    """loss_rounding = m·ε·‖W − W0‖²·‖C‖ (Frobenius norms, summed here one entry at a time), and
    the float64 PL of a Δ in C's null space (exactly 0) is measured within it."""
    P = problem(seed)
    D, C, m = P["W"] - P["W0"], P["C"], P["C"].shape[0]
    want = m * 2.0 ** -52 * sum(float(x) ** 2 for x in D.flatten()) * math.sqrt(sum(float(x) ** 2 for x in C.flatten()))
    assert math.isclose(L.loss_rounding(P["W"], P["W0"], C), want, rel_tol=1e-12)   # (pytest.approx: abs 1e-12 passes it)
    ev, U = torch.linalg.eigh(C)
    ev[0] = 0.0
    C0 = U @ torch.diag(ev) @ U.T                       # singular; Δ along its null direction
    W = P["W0"] + torch.outer(P["W"][:, 0], U[:, 0])
    assert abs(L.preservation_loss(W, P["W0"], C0)) <= L.loss_rounding(W, P["W0"], C0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(4))
def test_solve_system_solves_and_factors_in_place_only_when_told(seed, device):
    """Δ·A = left to float64 rounding (against lstsq); overwrite=False leaves A as it was;
    overwrite=True gives the same Δ to the bit with the factor in A's own memory (its lower
    triangle is the Cholesky factor L of A = LLᵀ: no second m×m buffer; on CUDA the peak
    over the solve is under a quarter of one m×m matrix)."""
    g = torch.Generator().manual_seed(seed)
    m, d = 40 + 7 * seed, 30
    X = torch.randn(m, m + 5, dtype=torch.float64, generator=g)
    A = (X @ X.T + 0.1 * torch.eye(m, dtype=torch.float64)).to(device)
    left = torch.randn(d, m, dtype=torch.float64, generator=g).to(device)
    kept = A.clone()
    delta = L.solve_system(A, left)
    assert torch.equal(A, kept)
    want = torch.linalg.lstsq(kept.cpu(), left.T.cpu()).solution.T.to(device)   # A symmetric: A·Δᵀ = leftᵀ
    assert (delta - want).norm() <= 1e-10 * want.norm()
    assert (delta @ kept - left).norm() <= 1e-12 * left.norm() * torch.linalg.cond(kept)
    storage = A.data_ptr()
    if device == "cuda":
        big = torch.randn(2048, 2100, dtype=torch.float64, device=device)
        system = big @ big.T                                       # 32 MiB
        rhs = torch.randn(8, 2048, dtype=torch.float64, device=device)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        L.solve_system(system, rhs, overwrite=True)
        torch.cuda.synchronize()
        assert torch.cuda.max_memory_allocated() - before < system.nbytes / 4
    assert torch.equal(L.solve_system(A, left, overwrite=True), delta)
    assert A.data_ptr() == storage
    factor = torch.linalg.cholesky(kept)
    assert (A.tril() - factor).norm() <= 1e-12 * factor.norm()


def test_solve_system_rejects_indefinite():
    with pytest.raises(ValueError, match="positive definite"):
        L.solve_system(-torch.eye(3, dtype=torch.float64), torch.ones(2, 3, dtype=torch.float64))


@pytest.mark.parametrize("seed", range(12))
def test_alphaedit_projects_and_solves_its_equation(seed):
    P = problem(seed)
    g = torch.Generator().manual_seed(seed)
    m = P["C"].shape[0]
    U = torch.linalg.qr(torch.randn(m, m, dtype=torch.float64, generator=g))[0]
    ev = torch.rand(m, dtype=torch.float64, generator=g)
    small = ev < 0.5
    small[0] = True                                  # a null space of one direction at least
    ev[small] *= 1e-2                                # below the 2e-2 threshold
    C = U @ torch.diag(ev) @ U.T
    proj = L.alphaedit_projector(C)
    close(proj, U[:, small] @ U[:, small].T, 1e-10)                                   # E11
    delta = L.solve_alphaedit(P["K1"], P["R"], proj, P["S_KK"])
    KK = P["K1"] @ P["K1"].T + (0 if P["S_KK"] is None else P["S_KK"])
    M = KK @ proj + 10.0 * torch.eye(m, dtype=torch.float64)
    close(delta @ M, P["R"] @ P["K1"].T @ proj, 1e-12)                                # E12
    l2 = 0.5                                                                          # E12's L2
    M = KK @ proj + l2 * torch.eye(m, dtype=torch.float64)
    close(L.solve_alphaedit(P["K1"], P["R"], proj, P["S_KK"], l2) @ M, P["R"] @ P["K1"].T @ proj, 1e-12)
    at = torch.diag(torch.tensor([2e-2, 1.0], dtype=torch.float64))     # an eigenvalue at the threshold
    assert torch.equal(L.alphaedit_projector(at + torch.diag(torch.tensor([-1e-3, 0.0], dtype=torch.float64))),
                       torch.diag(torch.tensor([1.0, 0.0], dtype=torch.float64)))
    with pytest.raises(ValueError, match="no eigenvalue of C"):
        L.alphaedit_projector(at)                                    # E11: strictly below
    close(delta @ proj, delta, 1e-12)                # the update lies in P's subspace
    assert float((delta @ U[:, ~small]).norm()) <= 1e-12 * float(delta.norm())
    full = U @ torch.diag(ev + 0.05) @ U.T                          # no eigenvalue below 0.02
    with pytest.raises(ValueError, match="AlphaEdit: no eigenvalue of C is below the null-space threshold "
                                         "0.02 .*every update would be zero: raise the threshold \\(--nullspace-threshold; nullspace_threshold=\\)"):
        L.alphaedit_projector(full)                                  # no null space: P = 0, was silent
    hp = L.HParams(method="alphaedit", layers=(3, 5))                # the same, before a run (a Cholesky)
    L.check_null_spaces({3: C, 5: C}, hp)
    smallest = float(torch.linalg.eigvalsh(full)[0])
    with pytest.raises(ValueError, match=rf"no eigenvalue of C on layer 5 .*\(the smallest is {smallest:.3g}\)"):
        L.check_null_spaces({3: C, 5: full}, hp)
    L.check_null_spaces({3: C, 5: full}, dataclasses.replace(hp, nullspace_threshold=smallest * 1.01))
    L.check_null_spaces({3: full}, dataclasses.replace(hp, method="lyaplock", layers=(3,)))   # not projected


def test_step_layer_memory_per_method():
    P = null_spaced(problem(0, past=0), "alphaedit")
    args = (P["W"], P["W0"], P["C"], P["K1"], P["R"])
    KK = P["K1"] @ P["K1"].T
    ls = L.LayerState()
    W, pl = L.step_layer(*args, ls, L.HParams(method="memit", lam=P["lam"]))
    close(W - P["W"], L.solve_memit(P["K1"], P["R"], P["C"], P["lam"]), 1e-15)
    assert ls == L.LayerState() and pl == L.preservation_loss(W, P["W0"], P["C"])
    for _ in range(2):
        L.step_layer(*args, ls, L.HParams(method="alphaedit"))
    assert ls.S_VK is None and ls.D_base is None and torch.equal(ls.S_KK, KK + KK)
    with pytest.raises(ValueError, match="unknown method"):
        L.step_layer(*args, ls, L.HParams(method="no-such-method"))


@pytest.mark.parametrize("method", ["lyaplock", "alphaedit"])
def test_superseded_edits_leave_the_memory_exactly_when_removed(method):
    """E8a: re-editing a prompt takes its earlier keys and values out of the memory, so the memory
    equals the sums over the live edits only (a prompt one step edits twice: both of its columns
    live, both taken out when it comes again); with "keep" (the default) all stay."""
    P = null_spaced(problem(3, past=0), method)
    g = torch.Generator().manual_seed(3)
    m, d = P["C"].shape[0], P["W"].shape[0]
    steps = [(torch.randn(m, 2, dtype=torch.float64, generator=g), ["a", "b"]),
             (torch.randn(m, 2, dtype=torch.float64, generator=g), ["c", "a"]),     # "a" again
             (torch.randn(m, 3, dtype=torch.float64, generator=g), ["d", "b", "d"]),  # "b" again; "d" twice
             (torch.randn(m, 1, dtype=torch.float64, generator=g), ["d"])]          # "d" again: both go
    for mode in ("keep", "remove"):
        hp, ls, W, live = L.HParams(method=method, lam=1.0, alpha=10.0, superseded=mode), L.LayerState(), P["W0"], {}
        for K1, prompts in steps:
            R = torch.randn(d, K1.shape[1], dtype=torch.float64, generator=g)
            W, _ = L.step_layer(W, P["W0"], P["C"], K1, R, ls, hp, prompts)
            for q in prompts:
                live.pop(q, None)
            for j, q in enumerate(prompts):
                live.setdefault(q, []).append((K1[:, j], (W @ K1)[:, j]))
        live_cols = [kv for kvs in live.values() for kv in kvs]
        cols = live_cols if mode == "remove" else [(K1[:, j], None) for K1, _ in steps for j in range(K1.shape[1])]
        close(ls.S_KK, sum(torch.outer(k, k) for k, _ in cols), 1e-12)
        if mode == "remove":
            assert {q: len(kvs) for q, kvs in ls.edits.items()} == {"a": 1, "b": 1, "c": 1, "d": 1}
            if method == "lyaplock":
                close(ls.S_VK, sum(torch.outer(v, k) for k, v in live_cols), 1e-12)
        else:
            assert ls.edits == {}


@pytest.mark.parametrize("method", ["lyaplock", "alphaedit"])
def test_superseded_remove_keeps_only_the_recurring_prompts_and_edits_the_same(method):
    """Given the prompts the stream edits again (the command knows its stream), only their keys
    and values are kept: the same weights and memory to the bit, and no column of a prompt that
    is never taken out."""
    P = null_spaced(problem(4, past=0), method)
    g = torch.Generator().manual_seed(4)
    m, d = P["C"].shape[0], P["W"].shape[0]
    steps = [(torch.randn(m, 2, dtype=torch.float64, generator=g), torch.randn(d, 2, dtype=torch.float64, generator=g),
              prompts) for prompts in (["a", "b"], ["c", "a"], ["d", "e"])]
    recurring = L.recurring_prompts([Request(case_id=i, prompt="{} is in", subject=s, target_new="x", target_true="y",
                                             paraphrase_prompts=(), neighborhood_prompts=(), neighborhood_answers=())
                                     for i, s in enumerate("abcade")])
    assert recurring == {"a is in"}
    runs = []
    for known in (None, {"a"}):
        hp, ls, W = L.HParams(method=method, lam=1.0, alpha=10.0, superseded="remove"), L.LayerState(), P["W0"]
        for K1, R, prompts in steps:
            kept = [q if known is None or q in known else None for q in prompts]   # None: never again
            W, _ = L.step_layer(W, P["W0"], P["C"], K1, R, ls, hp, kept)
        runs.append((W, ls))
    (W_all, all_), (W_few, few) = runs
    assert torch.equal(W_all, W_few) and torch.equal(all_.S_KK, few.S_KK)
    assert set(all_.edits) == {"a", "b", "c", "d", "e"} and set(few.edits) == {"a"}
    assert torch.equal(all_.edits["a"][0][0], few.edits["a"][0][0])


@pytest.mark.parametrize("method", ["lyaplock", "alphaedit"])
def test_a_re_edit_is_solved_without_the_edit_it_supersedes(method):
    """E8a takes the earlier edit out of the memory before the step's solve (LYAPLOCK.md), so the
    step that re-edits a prompt is the one solved from a memory that holds only the live edits:
    the same step, with "keep", from a state that never held the superseded column."""
    P = null_spaced(problem(5, past=0), method)
    g = torch.Generator().manual_seed(5)
    m, d = P["C"].shape[0], P["W"].shape[0]
    r = lambda *s: torch.randn(*s, dtype=torch.float64, generator=g)
    K1, R1, K2, R2 = r(m, 2), r(d, 2), r(m, 1), r(d, 1)
    remove = L.HParams(method=method, lam=1.0, alpha=10.0, superseded="remove")
    keep = L.with_overrides(remove, superseded="keep")
    ls = L.LayerState()
    W1, _ = L.step_layer(P["W0"], P["W0"], P["C"], K1, R1, ls, remove, ["a", "b"])
    kb = K1[:, 1]
    live = L.LayerState(D_base=ls.D_base, Z=ls.Z, a=ls.a, zmax=ls.zmax, S_KK=torch.outer(kb, kb),
                        S_VK=torch.outer((W1 @ K1)[:, 1], kb) if method == "lyaplock" else None)
    stale = L.LayerState(D_base=ls.D_base, Z=ls.Z, a=ls.a, zmax=ls.zmax, S_KK=ls.S_KK.clone(),
                         S_VK=None if ls.S_VK is None else ls.S_VK.clone())
    W2, _ = L.step_layer(W1, P["W0"], P["C"], K2, R2, ls, remove, ["a"])
    W2_live, _ = L.step_layer(W1, P["W0"], P["C"], K2, R2, live, keep)
    W2_stale, _ = L.step_layer(W1, P["W0"], P["C"], K2, R2, stale, keep)
    close(W2 - W1, W2_live - W1, 1e-9)
    assert float((W2_stale - W2_live).norm()) > 1e-3 * float((W2_live - W1).norm())   # the test can tell


def test_the_command_keeps_superseded_columns_only_for_prompts_it_edits_again(tmp_path):
    edits = reedit_file(tmp_path, 3)
    out = tmp_path / "run"
    assert L.main(_cli(tmp_path, "--out", str(out), "--no-generation", "--superseded", "remove", "--batch-size", "2",
                       "--edits", str(edits), limit=None)) == 0
    d = out / json.loads((out / "latest.json").read_text())["checkpoint"]
    rewrite = json.loads(edits.read_text())[0]["requested_rewrite"]
    prompt = rewrite["prompt"].replace("{}", rewrite["subject"])
    assert all(kept == [prompt] for kept in json.loads((d / "state.json").read_text())["edits"].values())
    # the summary scores every edit, as the authors' summarize.py does (CounterFact edits some
    # prompts again, to other facts: 83 of EasyEdit's 10,000), and apart each prompt at its latest
    # target (where a re-edit corrects a fact, the superseded target counts as a failure of the
    # edit that replaced it), before and after on the same cases
    summary = json.loads((out / "summary.json").read_text())
    cases = [json.loads(l) for l in (out / "cases.jsonl").read_text().splitlines()]
    ids = [r["case_id"] for r in json.loads(edits.read_text())]
    assert [c["case_id"] for c in cases] == ids and summary["n_cases"] == summary["pre"]["n_cases"] == 4
    assert summary["latest_target"]["n_cases"] == summary["pre"]["latest_target"]["n_cases"] == 3
    latest = [c for c in cases if c["case_id"] != ids[0]]
    assert summary["latest_target"]["efficacy"] == pytest.approx(100 * sum(c["efficacy"] for c in latest) / 3)
    pre = [json.loads(l) for l in (out / "cases_pre.jsonl").read_text().splitlines()]
    assert summary["latest_target"] == L.ev.summarize(cases[1:]) != summary["pre"]["latest_target"]
    assert summary["pre"]["latest_target"] == L.ev.summarize(L.ev.with_locality(pre, pre)[1:])   # the same cases
    assert L.latest_edits(L.load_requests(L.Settings(model="m", edits=str(edits)))[0]) == [1, 2, 3]
    assert "latest_target" in (out / "summary.md").read_text()


def test_finish_after_a_stop_scores_the_edited_requests_latest_targets_with_the_run_s_seed(tmp_path, monkeypatch):
    """A run that --stop-below ended after 3 of 4 requests, the first prompt edited at requests
    0, 1 and again at 3 (after the stop): the latest targets are those among the 3 edited
    (request 1's, then 2's), not the stream's (request 3 was never edited), and the cases are
    scored with the run's --seed."""
    records = json.loads((FIX / "counterfact-rome.json").read_text())[:2]
    again = lambda cid, target: dict(records[0], case_id=cid, requested_rewrite=dict(
        records[0]["requested_rewrite"], target_new={"str": target}))
    (tmp_path / "edits.json").write_text(json.dumps([records[0], again(10 ** 6, "Oslo"), records[1],
                                                     again(10 ** 6 + 1, "Lima")]))
    requests, _ = data.load_requests(tmp_path / "edits.json")
    editor = L.Editor(M.load(STORIES), L.HParams(layers=(1, 2)), {l: torch.eye(172, dtype=torch.float64) for l in (1, 2)},
                      [["{}"]])
    editor.state.n_edits = 3
    out = tmp_path / "run"
    out.mkdir()
    data.write_jsonl(out / "cases_pre.jsonl", L.score_cases(editor.model, requests, False))
    data.write_jsonl(out / "ability.jsonl", [dict(step=0, edits=0, final=False, perplexity=4.0)])
    monkeypatch.setattr(L, "general_ability", lambda editor, settings, final=False: dict(perplexity=4.0, final=final))
    seeds, score_cases = [], L.score_cases
    monkeypatch.setattr(L, "score_cases", lambda *a, **k: seeds.append(a[4]) or score_cases(*a, **k))
    settings = L.Settings(model=str(STORIES), edits="e", hparams=editor.hparams, generation=False, seed=7)
    L.finish(editor, requests, settings, out, 0)
    summary = json.loads((out / "summary.json").read_text())
    cases = data.read_jsonl(out / "cases.jsonl")[0]
    assert seeds == [7] and [c["case_id"] for c in cases] == [r.case_id for r in requests[:3]]
    assert summary["latest_target"] == L.ev.summarize(cases[1:])


def test_editor_open_names_a_bad_state_device_before_the_statistics(tmp_path, monkeypatch):
    """The statistics are collected on the state device: a bad one was torch's RuntimeError there."""
    monkeypatch.setattr(L.stats, "load_or_collect_stats", lambda *a, **k: pytest.fail("statistics were computed"))
    with pytest.raises(ValueError, match="device 'gpu': "):
        L.Editor.open(STORIES, stats_cache=tmp_path, state_device="gpu")


def test_flags_the_method_does_not_read_are_refused(tmp_path, capsys, monkeypatch):
    """--lam for ROME or AlphaEdit, --alpha/--v for a method without a queue, --superseded without
    a memory, --l2 outside AlphaEdit's family: accepted, they changed nothing and were recorded as
    if they applied (config.json, the report's header). One line, before any work; likewise
    Editor.open's overrides."""
    monkeypatch.setattr(L.M, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    for flags, message in [(["--method", "rome", "--lam", "5"], "--lam: rome does not read it (its solve has no λ"),
                           (["--method", "alphaedit", "--lam", "5"], "--lam: alphaedit does not read it"),
                           (["--method", "memit", "--alpha", "5"], "--alpha: memit does not read it (it has no queue)"),
                           (["--method", "memit", "--superseded", "remove"], "--superseded: memit does not read it"),
                           (["--l2", "3"], "--l2: lyaplock does not read it (only AlphaEdit's family")]:
        assert L.main(_cli(tmp_path, "--out", str(tmp_path / "run"), *flags)) == 1, flags
        assert capsys.readouterr().err.startswith(f"error: {message}"), flags
        assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="lam: rome does not read it"):
        L.Editor.open(STORIES, "rome", lam=5.0)


def test_a_two_block_model_without_layers_is_asked_for_them_by_the_command(tmp_path, capsys):
    """The command, --plan and Editor.open on a 2-block checkpoint (the rule finds no layers): the
    message asks for --layers (it said "layers []: give increasing layer numbers")."""
    d = tmp_path / "two"
    shutil.copytree(STORIES, d)
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(config | {"num_hidden_layers": 2}))
    weights = load_file(d / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not re.search(r"layers\.[2-9]\.", k)}, d / "model.safetensors")
    message = "no edit layers: the preset's rule (n/8..n/4 of the depth, below the top block) finds none under 3 blocks"
    for flags in (["--plan"], ["--out", str(tmp_path / "run")]):
        assert L.main([*flags, "--model", str(d), "--edits", str(FIX / "counterfact-rome.json"), "--limit", "2"]) == 1
        assert capsys.readouterr().err.startswith(f"error: {message}")
    with pytest.raises(ValueError, match=re.escape(message)):
        L.Editor.open(d)
    assert L.main(["--plan", "--model", str(d), "--layers", "0"]) == 0
    assert L.main(["--plan", "--model", str(d), "--layers", "0,1"]) == 1        # 1 is the top block
    assert "the top block (1) passes a change at the subject's last token to no later token" in capsys.readouterr().err


def test_alphaedit_without_a_null_space_is_refused_before_the_run_directory(tmp_path, capsys):
    """AlphaEdit refused it at step 0, after the statistics, the templates and the scoring before
    editing, leaving a run directory that the same command then refused as existing."""
    out = tmp_path / "run"
    argv = _cli(tmp_path, "--out", str(out), "--method", "alphaedit", "--no-generation")
    assert L.main([*argv, "--nullspace-threshold", "1e-9"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: AlphaEdit: no eigenvalue of C on layer 1 is below the null-space threshold 1e-09")
    assert err.count("\n") == 1 and not out.exists()
    assert L.main([*argv, "--nullspace-threshold", "0"]) == 1
    assert capsys.readouterr().err.startswith("error: --nullspace-threshold must be positive")
    assert L.main(_cli(tmp_path, "--out", str(out), "--nullspace-threshold", "1")) == 1
    assert capsys.readouterr().err.startswith("error: --nullspace-threshold: lyaplock does not read it")
    assert L.main(argv) == 0 and json.loads((out / "config.json").read_text())["hparams"]["nullspace_threshold"] == 2e-2


POST_NORM_KINDS = ["gemma2", "gemma3-gqa-window-ropes", "olmo2", "olmo3", "glm4"]
# the MLP output joins the stream normed or scaled (Granite's logits / 16 leave a random model's
# loss nearly flat in δ: the other kind's / 2 lets the target-value test see E4b's scale)
MAPPED_KINDS = [*POST_NORM_KINDS, "granite", "granite-bias-untied"]


@pytest.fixture(scope="module")
def family_model(tmp_path_factory):
    """kind (test_models.KINDS) -> a tiny random model of that family."""
    from test_models import make_checkpoint
    made = {}

    def get(kind):
        if kind not in made:
            made[kind] = M.load(make_checkpoint(tmp_path_factory.mktemp(kind), kind))
        return made[kind]
    return get


def assert_nearest(s, p, T, rho2):
    """p = s ⊙ v is the point of {s ⊙ v: mean(v²) = rho2} nearest T (rows), by the global
    optimality conditions of this trust-region problem: (s² + μ) v = s ⊙ T for one μ ≥ −min s²;
    and no random point of the set is nearer."""
    v = p / s
    close(v.pow(2).mean(1, keepdim=True), rho2.expand(len(v), 1), 1e-9)
    mu = s * (T - p) / v                                             # each coordinate's μ
    assert (mu.std(1) <= 1e-6 * mu.abs().mean(1) + 1e-9).all() and (mu.mean(1) >= -(s ** 2).min() - 1e-9).all()
    g = torch.Generator().manual_seed(1)
    rand = torch.randn(500, *v.shape, generator=g, dtype=torch.float64)
    rand *= (rho2 / rand.pow(2).mean(-1, keepdim=True)).sqrt()
    assert ((s * rand - T).norm(dim=-1) >= (p - T).norm(dim=-1) - 1e-9).all()


def test_the_nearest_scaled_point_meets_the_optimality_conditions_also_at_a_zero_scale():
    """E6b's trust-region solve: at the optimum for random scales of both signs, targets near and
    far; T itself where T ⊘ s has the right length; with a zero scale (w = −1) and a target inside
    the reach of the rest, the missing length goes to the coordinate no output sees (the "hard
    case"), and so where T's part there is too small for the bisection to resolve; all zero for
    an all-zero output with nothing to reach."""
    g = torch.Generator().manual_seed(0)
    s = (0.2 + torch.rand(16, generator=g, dtype=torch.float64) * 2) * torch.tensor([1.0, -1.0]).repeat(8)  # OLMo's w < 0 too
    for size in (0.1, 1.0, 30.0):
        T = size * torch.randn(6, 16, generator=g, dtype=torch.float64)
        rho2 = torch.tensor([[0.9]], dtype=torch.float64)
        assert_nearest(s, s * L.nearest_scaled_point(s, T, rho2), T, rho2)
    v = torch.randn(3, 16, generator=g, dtype=torch.float64)
    rho2 = v.pow(2).mean(1, keepdim=True)
    close(L.nearest_scaled_point(s, s * v, rho2), v, 1e-9)
    s[4] = 0.0
    T = 0.01 * torch.randn(2, 16, generator=g, dtype=torch.float64)           # well inside the reach
    v = L.nearest_scaled_point(s, T, torch.tensor([[1.0]], dtype=torch.float64))
    close(v.pow(2).mean(1), torch.ones(2, dtype=torch.float64), 1e-9)
    mask = s != 0
    close((s * v)[:, mask], T[:, mask], 1e-9)                        # the rest meets T exactly
    s[4] = 1e-4                                                       # nearly so: T_4 below what μ resolves
    T[:, 4] = -1e-20
    v = L.nearest_scaled_point(s, T, torch.tensor([[1.0]], dtype=torch.float64))
    close(v.pow(2).mean(1), torch.ones(2, dtype=torch.float64), 1e-9)
    assert (v[:, 4] < 0).all()                                       # b_4 = s_4 T_4's sign
    zero = torch.zeros(1, 16, dtype=torch.float64)                   # an all-zero MLP output, R = 0
    assert torch.equal(L.nearest_scaled_point(s, zero, zero[:, :1]), zero)


@pytest.mark.parametrize("bias", [False, True])
def test_mlp_outputs_are_the_weight_times_the_keys_plus_the_bias(bias):
    """E6b's o = W k + b (the bias too, where the MLP has one), as float32."""
    g = torch.Generator().manual_seed(0)
    W, b, keys = (torch.randn(*shape, generator=g) for shape in ((5, 3), (5,), (4, 3)))
    stub = type("Stub", (), {"edit_weight": lambda self, l: W, "edit_bias": lambda self, l: b if bias else None})()
    close(L.mlp_outputs(stub, 0, keys.double()), keys @ W.T + (b if bias else 0), 1e-6)


@pytest.mark.parametrize("kind", POST_NORM_KINDS)
def test_e6b_moves_a_post_normed_mlp_output_to_the_target_or_the_nearest_reachable_point(family_model, kind):
    """Through the post-norm N (Gemma 2, 3), E6b's change o' − o puts N(o') at N(o) + R where that
    is reachable (N of another output of o's length), else at the reachable point nearest it,
    and keeps o's length."""
    m, layer, g = family_model(kind), 1, torch.Generator().manual_seed(0)
    o, other = (3 * torch.randn(5, m.cfg.d_model, generator=g, dtype=torch.float64) for _ in range(2))
    other *= o.norm(dim=1, keepdim=True) / other.norm(dim=1, keepdim=True)
    N = lambda x: m.mlp_contribution(layer, x.float()).double()
    norm = m.blocks[layer].mlp_output_norm
    s = norm.scale().double()
    new = o + L.mlp_change(m, layer, o, N(other) - N(o))
    close(N(new), N(other), 1e-6)
    close(new.norm(dim=1), o.norm(dim=1), 1e-12)
    R = 50 * torch.randn(o.shape, generator=g, dtype=torch.float64)          # far out of reach
    rho2 = o.pow(2).mean(1, keepdim=True) / (o.pow(2).mean(1, keepdim=True) + norm.eps)
    reached = s * (o + L.mlp_change(m, layer, o, R)) / (o.pow(2).mean(1, keepdim=True) + norm.eps).sqrt()
    close(reached, N(o + L.mlp_change(m, layer, o, R)), 1e-6)
    for row in range(len(o)):
        assert_nearest(s, reached[row:row + 1], (N(o) + R)[row:row + 1], rho2[row:row + 1])


@pytest.mark.parametrize("kind", MAPPED_KINDS)
@pytest.mark.parametrize("at_mlp", [False, True])
def test_target_values_on_a_post_norm_model_score_what_it_computes_with_delta_where_it_joins(family_model, kind, at_mlp):
    """E4 on a post-norm (or Granite's scaled) model, checked by hooks: δ added to the layer's output
    (MEMIT's) or to the MLP's output before the post-norm or the scale (ROME's, E4b), the model's mean target NLL per request,
    plus the weight decay wd·‖δ‖/‖h‖² (E4), is the loss compute_z reports for its final δ, and z* − h is δ."""
    m = family_model(kind)
    requests, _ = data.load_requests(FIX / "counterfact-rome.json")
    rows = L.z_rows(m.tokenizer, requests[:3], [["{}"], ["Then. {}", "So. {}"]])
    layer = 1
    hp = L.HParams(layers=(layer,), v_num_grad_steps=4, kl_factor=0.0, v_weight_decay=0.5, v_lr=0.5)
    z, info = L.compute_z(m, rows, 3, layer, hp, at_mlp=at_mlp)
    close(z - info["h_init"], info["delta"], 1e-6)
    assert float(info["delta"].norm()) > 0
    site = m.blocks[layer].mlp.down_proj if at_mlp else m.blocks[layer]
    nll = torch.zeros(3)
    for r in (r for r in rows if r.targets):
        def add(module, args, out, r=r):
            h = out if at_mlp else out[0]
            h = h.clone()
            h[0, r.lookup] += info["delta"][r.req]
            return h if at_mlp else (h, *out[1:])
        hook = site.register_forward_hook(add)
        try:
            with torch.no_grad():
                logp = m(torch.tensor([r.ids])).logits.log_softmax(-1)[0]
        finally:
            hook.remove()
        t = torch.arange(len(r.targets))
        nll[r.req] -= logp[r.first + t, torch.tensor(r.targets)].mean() / sum(q.req == r.req and bool(q.targets) for q in rows)
    decay = 0.5 * info["delta"].norm(dim=1) / info["h_init"].norm(dim=1) ** 2
    assert float(decay.min()) > 1e-3 * float(nll.max())                      # the test can tell
    close(torch.tensor([l[-1] for l in info["loss"]]), nll + decay, 1e-5)


@pytest.mark.parametrize("kind", ["llama", "olmo", "stablelm", "gpt-neox", "phi3", "phi", "smollm3", "glm", "mistral3", *MAPPED_KINDS])
def test_a_one_layer_step_with_no_penalty_meets_the_target_or_the_post_norms_nearest_point(family_model, kind):
    """MEMIT with λ → 0, one request, the bare prompt only (K1 is its key): the layer's output at
    the subject becomes z* (LLaMA; GPT-NeoX and Phi, their MLP beside attention; Phi-3, its fused
    gate and up; Granite, its MLP output scaled before the add: E6c), and on Gemma 2 and 3 and
    OLMo 2 the post-normed MLP output becomes the
    point it can reach nearest z* − (the output before the MLP), at the MLP output's length
    (E6b) — the old E6 added R to the MLP output as if it joined the residual stream as it is."""
    m = M.load(STORIES) if kind == "llama" else family_model(kind)
    layer, templates = 1, [["{}"]]
    before = {k: v.clone() for k, v in m.edit_tensors([layer]).items()}
    requests, _ = data.load_requests(FIX / "counterfact-rome.json")
    hp = L.with_overrides(L.preset(m.cfg, "memit"), layers=(layer,), lam=1e-6)
    rows = L.key_rows(m.tokenizer, requests[:1], templates)
    try:
        _, h, key = L.keys_and_outputs(m, rows, templates, layer, layer)
        o = L.mlp_outputs(m, layer, key)
        z, _ = L.compute_z(m, L.z_rows(m.tokenizer, requests[:1], templates), 1, layer, hp)
        C = {layer: torch.eye(m.cfg.d_mlp, dtype=torch.float64)}
        W0 = {layer: m.edit_weight(layer).detach().clone()}
        L.edit_batch(m, requests[:1], templates, hp, L.EditState.start("memit", (layer,)), C, W0)
        _, h_after, key_after = L.keys_and_outputs(m, rows, templates, layer, layer)
        if not m.cfg.post_norms:
            close(h_after, z, 1e-5)
            return
        o_after = L.mlp_outputs(m, layer, key_after)
        mid = h - m.mlp_contribution(layer, o)              # the stream before the MLP's add
        norm = m.blocks[layer].mlp_output_norm
        rho2 = o.double().pow(2).mean(1, keepdim=True) / (o.double().pow(2).mean(1, keepdim=True) + norm.eps)
        s = norm.scale().double()
        close(o_after.norm(), o.norm(), 1e-5)
        reached = s * o_after.double() / (o.double().pow(2).mean(1, keepdim=True) + norm.eps).sqrt()
        best = s * L.nearest_scaled_point(s, (z - mid).double(), rho2)
        close(reached, best, 1e-4)
        assert (reached - (z - mid)).norm() < (m.mlp_contribution(layer, o) - (z - mid)).norm()
    finally:
        m.load_edit_tensors(before)


def test_target_values_start_from_the_bare_rewriting_prompts_output_where_the_subject_is_mid_sentence():
    """E4's h_init (and z* = h_init + δ) is the edit layer's output at the subject's last token of
    the bare rewriting prompt (template "{}"), which is E6's h before any update: with the subject
    mid-sentence ("The mother tongue of {} is") it is not the KL prompt's "{subject} is a", whose
    subject starts the text (the oracle's prompts all start with the subject, where the two agree)."""
    m = M.load(STORIES)
    requests, _ = data.load_requests(FIX / "counterfact-rome.json")
    requests = requests[:2]                                    # "The mother tongue of {} is", ...
    templates, layer = [["{}"], ["Once upon a time. {}"]], 2
    hp = L.HParams(layers=(1, layer), v_num_grad_steps=1)       # one pass: δ = 0, z* = h_init
    z, info = L.compute_z(m, L.z_rows(m.tokenizer, requests, templates), 2, layer, hp)
    _, h, _ = L.keys_and_outputs(m, L.key_rows(m.tokenizer, requests, templates), templates, layer, layer)
    close(info["h_init"], h, 1e-5)
    close(z, h, 1e-5)
    kl = L.subject_row(m.tokenizer, "{} is a", requests[0].subject, 0)
    with torch.no_grad():
        h_kl = m(torch.tensor([kl.ids]), outs_at={layer}, stop_after=layer).outs[layer][0, kl.lookup]
    assert float((h_kl - h[0]).norm()) > 1e-2 * float(h[0].norm())            # the test can tell


def test_e6b_takes_each_edit_layers_own_mlp_output_at_the_bare_prompt(family_model, monkeypatch):
    """E6b in a two-layer step on a post-norm model (Gemma 2), with prefixed templates: each edit
    layer's R is the change of THAT layer's MLP output (its down_proj's output, read by a hook in a
    pass of the bare prompt alone, after the earlier layer's update) that moves its post-normed
    contribution by (z* − h) / (n − i), h the last edit layer's output there (E6, E6b); not the
    last layer's MLP output or norm, nor a prefixed template's output."""
    m = family_model("gemma2")
    requests, _ = data.load_requests(FIX / "counterfact-rome.json")
    requests = requests[:2]
    templates, layers = [["{}"], ["Then. {}", "So. {}"]], (1, 2)
    hp = L.HParams(method="memit", layers=layers, lam=1.0, v_num_grad_steps=3)
    before = {k: v.clone() for k, v in m.edit_tensors(list(layers)).items()}
    bare = L.key_rows(m.tokenizer, requests, [["{}"]])
    compute_z, update_layer, zs, checked = L.compute_z, L.update_layer, [], []
    monkeypatch.setattr(L, "compute_z", lambda *a, **k: (lambda r: zs.append(r[0]) or r)(compute_z(*a, **k)))

    def watched(model, layer, K1, R, *rest):
        o, h = [], []
        hooks = [m.blocks[layer].mlp.down_proj.register_forward_hook(lambda mod, a, out: o.append(out[0])),
                 m.blocks[layers[-1]].register_forward_hook(lambda mod, a, out: h.append(out[0][0]))]
        try:
            with torch.no_grad():
                for r in bare:
                    m(torch.tensor([r.ids]))
        finally:
            for hook in hooks:
                hook.remove()
        o = torch.stack([x[r.lookup] for x, r in zip(o, bare)]).double()
        h = torch.stack([x[r.lookup] for x, r in zip(h, bare)]).double()
        i = layers.index(layer)
        want = L.mlp_change(m, layer, o, (zs[-1].double() - h) / (len(layers) - i))
        close(R.T, want, 1e-4)
        checked.append(layer)
        return update_layer(model, layer, K1, R, *rest)
    monkeypatch.setattr(L, "update_layer", watched)
    try:
        L.edit_batch(m, requests, templates, hp, L.EditState.start("memit", layers),
                     {l: torch.eye(m.cfg.d_mlp, dtype=torch.float64) for l in layers},
                     {l: m.edit_weight(l).detach().clone() for l in layers})
    finally:
        m.load_edit_tensors(before)
    assert checked == list(layers)


def test_a_rome_step_on_a_model_with_an_mlp_bias_moves_the_mlp_output_by_its_delta(family_model, monkeypatch):
    """ROME on Phi (fc2 has a bias b, not edited): v* = W k* + b + δ (E19's base is the MLP output
    with its bias, docs/LYAPLOCK.md §10), so after the rank-one update the layer's MLP output at the
    subject's last token of the bare prompt (read by a hook on fc2) is the one before plus δ, the
    δ compute_z found; a base without b would leave it off by −b."""
    m, layer = family_model("phi"), 1
    assert m.edit_bias(layer) is not None and float(m.edit_bias(layer).norm()) > 0
    requests, _ = data.load_requests(FIX / "counterfact-rome.json")
    templates = [["{}"], ["Then. {}"]]
    hp = L.HParams(method="rome", layers=(layer,), v_num_grad_steps=3, v_lr=0.5)
    before = {k: v.clone() for k, v in m.edit_tensors([layer]).items()}
    (row,) = L.key_rows(m.tokenizer, requests[:1], [["{}"]])
    proj = m.get_submodule(m.cfg.edit_parameter_name(layer).removesuffix(".weight"))     # Phi's fc2

    def mlp_output():
        seen = []
        hook = proj.register_forward_hook(lambda mod, a, out: seen.append(out[0, row.lookup]))
        try:
            with torch.no_grad():
                m(torch.tensor([row.ids]))
        finally:
            hook.remove()
        return seen[0].double()
    compute_z, deltas = L.compute_z, []
    monkeypatch.setattr(L, "compute_z", lambda *a, **k: (lambda r: deltas.append(r[1]["delta"][0]) or r)(compute_z(*a, **k)))
    o = mlp_output()
    try:
        C = {layer: torch.eye(m.cfg.d_mlp, dtype=torch.float64)}
        L.edit_batch(m, requests[:1], templates, hp, L.EditState.start("rome", (layer,)), C,
                     {layer: m.edit_weight(layer).detach().clone()})
        close(mlp_output() - o, deltas[0], 1e-4)
    finally:
        m.load_edit_tensors(before)


def test_the_preset_rule_on_shallow_models():
    """The rule's layers (n/8..n/4, at least two, from layer 1 on, below the top block) as far as the
    depth allows: 3 blocks edit 0, 1 (it gave one layer, [1]); under 3 (ROME: 1) it has none, and
    the check asks for --layers (it said "layers []: give increasing layer numbers"); from 4 blocks
    on, as before."""
    stories = M.Config.from_hf(json.loads((STORIES / "config.json").read_text()))
    for n in range(1, 49):
        cfg = dataclasses.replace(stories, n_layers=n)
        for method in ("lyaplock", "memit", "alphaedit", "rome"):
            layers = L.preset(cfg, method).layers
            few = 2 if method == "rome" else 3
            if n < few:
                assert layers == ()
                example = "none: a layer below the top block is needed" if n == 1 else "e.g. --layers 0"
                with pytest.raises(ValueError, match=rf"no edit layers for a model of {n} block\(s\): .*\({example}"):
                    L.check_hparams(L.preset(cfg, method), n)
                continue
            L.check_hparams(L.preset(cfg, method), n)
            assert layers[-1] <= n - 2 and len(layers) == (1 if method == "rome" else max(2, len(layers)))
            if n >= 4:
                first = max(1, round(n / 8))
                last = min(n - 2, max(first + 1, round(n / 4)))
                assert layers == ((last,) if method == "rome" else tuple(range(first, last + 1)))
    weights = [(p.lam, p.alpha, p.l2) for p in (L.preset(stories, method) for method in ("lyaplock", "memit"))]
    assert weights == [(172 / 4, 60.0, 1.0), (172.0, 60.0, 1.0)]                # λ = m/4 and m


def test_plan_refuses_the_records_the_run_refuses(tmp_path, capsys):
    records = json.loads((FIX / "counterfact-rome.json").read_text())[:3]
    del records[1]["requested_rewrite"]["target_new"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(records))
    assert L.main(["--plan", "--model", str(STORIES), "--edits", str(bad)]) == 1
    assert "record 1 (case_id" in capsys.readouterr().err                         # it said "fits yes"
    assert L.main(["--plan", "--model", str(STORIES), "--edits", str(bad), "--skip-bad"]) == 0


def test_the_resume_command_runs_from_where_the_run_was_started(tmp_path, monkeypatch):
    assert L.resume_command(Path("runs/001")) == "python lyaplock.py --resume runs/001"    # in the repository
    monkeypatch.chdir(tmp_path)
    assert L.resume_command(Path("r")) == f"python {HERE.resolve() / 'lyaplock.py'} --resume r"


def test_runs_started_at_the_same_moment_take_different_run_directories(tmp_path, monkeypatch):
    """Without --out a run takes the next runs/NNN; one that read the same listing while another
    run made that directory takes the number after (was: FileExistsError)."""
    (tmp_path / "001").mkdir()
    (tmp_path / "002").mkdir()                   # the other run's, made after this one's listing
    assert L.new_run_dir(tmp_path) == tmp_path / "003"
    monkeypatch.setattr(Path, "iterdir", lambda self: iter([self / "001"]))
    assert L.new_run_dir(tmp_path) == tmp_path / "004"
    monkeypatch.undo()
    (tmp_path / "009").mkdir()                   # numbers freed below the largest are not taken again
    assert L.new_run_dir(tmp_path) == tmp_path / "010"


def test_a_new_run_directory_gets_its_config_json_only_after_its_other_files(tmp_path, monkeypatch):
    """config.json is what makes a directory a run --resume continues: written last, so a write that
    fails (a full disk) or a kill before the templates and input digests are in leaves no config.json
    (a resume would go on without the run's templates)."""
    out = tmp_path / "run"
    settings = L.Settings(model=str(STORIES), edits=str(FIX / "stories-edits.json"))
    real, written = L.data.write_atomic, []

    def full_at_inputs(path, text):
        if Path(path).name == "inputs.json":
            raise OSError(28, "No space left on device")
        written.append(Path(path).name)
        return real(path, text)
    monkeypatch.setattr(L.data, "write_atomic", full_at_inputs)
    with pytest.raises(OSError, match="No space left"):
        L.create_run_dir(out, settings, hold=lambda d: None, files={"templates.json": [["{}"]], "inputs.json": {}})
    assert written == ["templates.json"] and not (out / "config.json").exists()
    monkeypatch.setattr(L.data, "write_atomic", real)
    assert L.create_run_dir(tmp_path / "whole", settings, hold=lambda d: None,
                            files={"templates.json": [["{}"]], "inputs.json": {}}) == tmp_path / "whole"
    assert json.loads((tmp_path / "whole" / "config.json").read_text())["edits"] == settings.edits


def test_a_run_directory_is_run_by_one_process_at_a_time(tmp_path, capsys, monkeypatch):
    """A --resume of a run that another process is running (here: held by this test, as that
    process holds it) is refused before any work, and so is a new run into an --out that another
    run began writing after this one checked it (two runs into one directory mixed their logs
    and checkpoints); the directory is free again once its run ends."""
    out = tmp_path / "run"
    assert L.main(_cli(tmp_path, "--out", str(out), "--limit", "4", "--no-generation")) == 0
    capsys.readouterr()
    with L.holding(out):
        assert L.main(["--resume", str(out)]) == 1
    assert capsys.readouterr().err == (f"error: {out}: another process is running this run (started or "
                                       "resumed there); wait for it to end, or choose another --out\n")
    assert L.main(["--resume", str(out)]) == 0
    with monkeypatch.context() as patch:            # a file system without locks: the run goes on, with a note
        patch.setattr(L.fcntl, "flock", lambda *a: (_ for _ in ()).throw(OSError(38, "Function not implemented")))
        assert L.main(["--resume", str(out)]) == 0
    assert f"note: {out}: no lock on this file system (Function not implemented)" in capsys.readouterr().err
    other = tmp_path / "other"
    real = L.preservation_statistics

    def meanwhile(*a, **k):                   # another run writes its settings into --out meanwhile
        other.mkdir()
        (other / "config.json").write_text("{}")
        return real(*a, **k)
    monkeypatch.setattr(L, "preservation_statistics", meanwhile)
    assert L.main(_cli(tmp_path, "--out", str(other), "--limit", "4", "--no-generation")) == 1
    assert capsys.readouterr().err.endswith(f"error: --out {other}: another run began in this directory since "
                                            "this one checked it; choose another directory\n")
    assert (other / "config.json").read_text() == "{}"


def test_a_stream_that_re_edits_gets_a_note_unless_superseded_was_chosen():
    req = lambda subject, new: Request(case_id=subject + new, prompt="{} is in", subject=subject, target_new=new,
                                       target_true="y", paraphrase_prompts=(), neighborhood_prompts=(),
                                       neighborhood_answers=())
    stream = [req("a", "x"), req("b", "x"), req("a", "z"), req("a", "w")]
    note = L.superseded_note(stream, L.HParams(), chosen=False)
    assert note.startswith("note: 2 request(s) re-edit a prompt") and "--superseded remove" in note
    assert L.superseded_note(stream, L.HParams(), chosen=True) is None               # typed: no note
    assert L.superseded_note(stream, L.HParams(superseded="remove"), chosen=False) is None
    assert L.superseded_note(stream, L.HParams(method="memit"), chosen=False) is None  # no memory
    assert L.superseded_note(stream[:2], L.HParams(), chosen=False) is None           # nothing re-edited
    other = dataclasses.replace(stream[0], prompt="{} was born in")                   # its subject, another prompt
    assert L.superseded_note([stream[0], other], L.HParams(), chosen=False) is None   # not a re-edit


def assert_same_layers(back: L.EditState, state: L.EditState):
    """Every saved field of each layer bit for bit: the queue, S_KK and S_VK (float64), and the
    kept edits' keys and values in their order."""
    assert list(back.layers) == list(state.layers)
    for l, ls in state.layers.items():
        b = back.layers[l]
        assert [getattr(b, n) for n in L._QUEUE] == [getattr(ls, n) for n in L._QUEUE]
        for name in ("S_KK", "S_VK"):
            x, y = getattr(b, name), getattr(ls, name)
            assert (x is None and y is None) or (x.dtype == torch.float64 and torch.equal(x, y))
        assert list(b.edits) == list(ls.edits)
        for q, kvs in ls.edits.items():
            assert len(b.edits[q]) == len(kvs)
            assert all(torch.equal(k2, k) and torch.equal(v2, v) for (k, v), (k2, v2) in zip(kvs, b.edits[q]))


def test_superseded_memory_round_trips_through_the_state_file(tmp_path):
    state = L.EditState.start("lyaplock", [3])
    P, hp = problem(1, past=0), L.HParams(lam=1.0, alpha=10.0, superseded="remove")
    W = P["W0"]
    for prompts in (["x", "y"], ["y", "z"], ["w", "w"]):         # "w": twice in one step, two columns
        W, _ = L.step_layer(W, P["W0"], P["C"], P["K1"][:, :1].repeat(1, 2) * (1 + len(prompts[0])), P["R"][:, :1].repeat(1, 2),
                            state.layers[3], hp, prompts)
    state.save(tmp_path)
    back = L.EditState.load(tmp_path)
    assert list(back.layers[3].edits) == ["x", "y", "z", "w"] and len(back.layers[3].edits["w"]) == 2
    assert_same_layers(back, state)
    meta = json.loads((tmp_path / "state.json").read_text())
    meta["edits"]["3"] = ["x", "y"]                              # one prompt short
    (tmp_path / "state.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="edit_K/edit_V do not match 2 prompts"):
        L.EditState.load(tmp_path)


# ----------------------------------------------------------------------------- the oracle

def oracle():
    hp = json.loads((ORACLE / "oracle.json").read_text())
    stats = load_file(str(ORACLE / "stats.safetensors"))
    batches = [load_file(str(ORACLE / f"batch_{k:02d}.safetensors")) for k in range(hp["n_batches"])]
    return hp, stats, batches


def oracle_inputs(hp, b, i):
    """K1 (m, n) and R (d, n) of layer i as the authors' code forms them (E5, E6)."""
    l, n_layers = hp["layers"][i], len(hp["layers"])
    R = (b["z"] - b[f"cur_zs.{l}"]).double().T / (n_layers - i)   # z* − h in float32 (E6)
    return b[f"ks.{l}"].double().T, R


def authors_pl(W, stats, l):
    """The authors' PL: the expanded trace on their float32 caches of C, W0C, W0CW0ᵀ (E2)."""
    W = W.double()
    KK, VK, VV = (stats[f"{k}.{l}"].double() for k in ("C32", "V0K0_T", "V0V0_T"))
    return float(torch.trace(KK @ W.T @ W) - 2 * torch.trace(VK @ W.T) + torch.trace(VV))


@pytest.mark.parametrize("i", [0, 1])
def test_oracle_step_by_step(i):
    """Each quantity of each batch from the oracle's own inputs, to float64 rounding.

    The authors' code held C, W0·C and W0·C·W0ᵀ as float32 caches; C's rounding is ours too
    (we feed C32), the other two enter only the preservation terms and are undone explicitly.
    """
    hp, st, bs = oracle()
    l, lam, alpha, X = hp["layers"][i], hp["lam"], hp["alpha"], st["probe"]
    C, W0 = st[f"C32.{l}"].double(), bs[0][f"W_before.{l}"]
    W, ls = W0, L.LayerState()
    for k, b in enumerate(bs):
        K1, R = oracle_inputs(hp, b, i)
        z = ls.z                      # the queue after step k − 1 weighs step k (1 at k ≤ 1)
        assert (z > 1.0) == (k == 2)
        A, left = L.lyaplock_system(W, W0, C, K1, R, ls.S_KK, ls.S_VK, z, lam, hp["V"])
        close(A @ X, b[f"A_X.{l}"], 1e-13)                                            # E9
        left_authors = left - z * lam * (W0.double() @ C - st[f"V0K0_T.{l}"].double())
        close(left_authors @ X, b[f"left_X.{l}"], 1e-13)                              # E9
        delta = L.solve_system(A, left_authors)
        close(delta, b[f"upd.{l}"], 1e-12)
        close(L.solve_system(A, left), b[f"upd.{l}"], 1e-5)      # only the cache rounding
        W = W + delta.float()
        assert torch.equal(W, b[f"W_after.{l}"])
        fro = float(b[f"fro.{l}"][-1])
        assert abs(authors_pl(W, st, l) - fro) <= 1e-12 * fro
        assert abs(L.preservation_loss(W, W0, C) - fro) <= 1e-6 * fro               # E2
        L.feed_queue(ls, fro, alpha, hp["b"])                                       # E13
        for name in ("Z", "a", "zmax", "D_base"):
            assert abs(getattr(ls, name) - float(b[f"{name}.{l}"])) <= 1e-14 * getattr(ls, name)
        L.remember(ls, K1, W)                                                         # E7
        close(ls.S_KK @ X, b[f"KK_X.{l}"], 1e-15)
        close(ls.S_VK @ X, b[f"VK_X.{l}"], 1e-15)


@pytest.mark.parametrize("i", [0, 1])
def test_oracle_run_with_step_layer(i):
    """step_layer over the three batches tracks the authors' run (it measures PL itself, in
    float64 from C rather than from the float32 caches, hence the looser tolerance)."""
    hp, st, bs = oracle()
    l = hp["layers"][i]
    C, W0 = st[f"C32.{l}"].double(), bs[0][f"W_before.{l}"]
    W, ls = W0, L.LayerState()
    for b in bs:
        K1, R = oracle_inputs(hp, b, i)
        W_prev = W
        W, pl = L.step_layer(W, W0, C, K1, R, ls, L.HParams(lam=hp["lam"], alpha=hp["alpha"], V=hp["V"]))
        close(W - W_prev, b[f"upd.{l}"], 1e-5)
        close(W, b[f"W_after.{l}"], 1e-6)
        assert abs(pl - float(b[f"fro.{l}"][-1])) <= 1e-6 * pl
        assert abs(ls.a * ls.Z - float(b[f"a.{l}"] * b[f"Z.{l}"])) <= 1e-6 * ls.z


# ----------------------------------------------------------------------------- EditState

def edited_state(method, steps=2):
    state = L.EditState.start(method, [3, 5])
    probs = {l: null_spaced(problem(j, past=0), method) for j, l in enumerate(state.layers)}
    for s in range(steps):
        for l, ls in state.layers.items():
            P = probs[l]
            K1, R = (1 + s) * P["K1"], P["R"] / (1 + s)
            P["W"], _ = L.step_layer(P["W"], P["W0"], P["C"], K1, R, ls, L.HParams(method=method, lam=15.0, alpha=1.0))
        state.finish_step(4)
    return state


@pytest.mark.parametrize("method,steps", [("lyaplock", 2), ("lyaplock", 0), ("alphaedit", 2),
                                          ("memit", 1)])
def test_state_round_trip_is_exact(tmp_path, method, steps):
    state = edited_state(method, steps)
    state.save(tmp_path)
    back = L.EditState.load(tmp_path)
    assert (back.method, back.step, back.n_edits) == (method, steps, 4 * steps)
    assert_same_layers(back, state)


def corrupt_json(d, fn):
    meta = json.loads((d / "state.json").read_text())
    fn(meta)
    (d / "state.json").write_text(json.dumps(meta))


def corrupt_tensors(d, fn):
    t = load_file(str(d / "state.safetensors"))
    fn(t)
    save_file(t, str(d / "state.safetensors"))


CORRUPTIONS = {
    "cannot read": lambda d: (d / "state.safetensors").write_bytes(b"not a safetensors file"),
    "lacks method": lambda d: corrupt_json(d, lambda m: m.pop("method")),
    "unknown method": lambda d: corrupt_json(d, lambda m: m.update(method="knn")),
    "positive floats": lambda d: corrupt_json(d, lambda m: m["layers"]["3"].update(Z=-1.0)),
    "all positive floats": lambda d: corrupt_json(d, lambda m: m["layers"]["3"].update(D_base=0.0)),   # (D = α·0)
    "must be all present or all absent": lambda d: corrupt_tensors(d, lambda t: t.pop("5.S_VK")),
    "unexpected tensors": lambda d: corrupt_tensors(d, lambda t: t.update(x=torch.ones(1))),
    "does not match S_KK": lambda d: corrupt_tensors(
        d, lambda t: t.update({"3.S_VK": t["3.S_VK"][:, :-1].contiguous()})),
    "float64": lambda d: corrupt_tensors(d, lambda t: t.update({"3.S_KK": t["3.S_KK"].float()})),
    "lacks method/step/n_edits/layers": lambda d: corrupt_json(d, lambda m: m.pop("n_edits")),
    "step and n_edits must be non-negative": lambda d: corrupt_json(d, lambda m: m.update(step=-1)),
    "step and n_edits must be non-negative integers": lambda d: corrupt_json(d, lambda m: m.update(n_edits=True)),
    "layers must map layer numbers": lambda d: corrupt_json(d, lambda m: m["layers"].update({"03": m["layers"]["3"]})),
    "queue fields must be exactly": lambda d: corrupt_json(d, lambda m: m["layers"]["3"].update(b=1.0)),
    "positive floats, got .*'Z': nan": lambda d: corrupt_json(d, lambda m: m["layers"]["3"].update(Z=float("nan"))),
    "positive floats, got .*'a': inf": lambda d: corrupt_json(d, lambda m: m["layers"]["3"].update(a=float("inf"))),
    "all null or all positive floats, got .*'zmax': None": lambda d: corrupt_json(d, lambda m: m["layers"]["3"].update(zmax=None)),
    "present once the queue is calibrated": lambda d: corrupt_tensors(d, lambda t: [t.pop("3.S_KK"), t.pop("3.S_VK")]),
    "2-D float64 tensor, got torch.float64": lambda d: corrupt_tensors(d, lambda t: t.update({"3.S_KK": t["3.S_KK"][0].contiguous()})),
    "S_KK must be square": lambda d: corrupt_tensors(d, lambda t: t.update({"3.S_KK": t["3.S_KK"][:, :-1].contiguous()})),
    "edit_K/edit_V without the prompts": lambda d: corrupt_tensors(d, lambda t: t.update({"3.edit_V": t["3.S_VK"][:, :1].contiguous()})),
}


@pytest.mark.parametrize("message", CORRUPTIONS)
def test_state_load_rejects_corruption(tmp_path, message):
    edited_state("lyaplock").save(tmp_path)
    CORRUPTIONS[message](tmp_path)
    with pytest.raises(ValueError, match=message):
        L.EditState.load(tmp_path)


def hand_state():
    """An EditState with every saved field set by hand: a calibrated layer with E8a's columns (a
    prompt twice), and one whose first step left it at W0 (memory kept, queue not calibrated)."""
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    k, v = r(3, 4), r(5, 4)
    on = L.LayerState(D_base=0.1 + 1e-17, Z=1 / 3, a=2 ** 0.5, zmax=7.25, S_KK=r(3, 3), S_VK=r(5, 3))
    on.edits = {"x": [(k[:, 0], v[:, 0])], "y": [(k[:, 1], v[:, 1]), (k[:, 2], v[:, 2])], "z": [(k[:, 3], v[:, 3])]}
    return L.EditState("lyaplock", {3: on, 5: L.LayerState(S_KK=r(3, 3), S_VK=r(5, 3))}, step=7, n_edits=19)


def test_a_hand_built_state_round_trips_bit_for_bit(tmp_path):
    state = hand_state()
    state.save(tmp_path)
    back = L.EditState.load(tmp_path)
    assert (back.method, back.step, back.n_edits, list(back.layers)) == ("lyaplock", 7, 19, [3, 5])
    assert_same_layers(back, state)


@pytest.mark.parametrize("corrupt,message", [
    (lambda t: t.pop("5.S_VK"), "layer 5: memory tensors .* must be all present or all absent"),   # (not calibrated)
    (lambda t: t.pop("3.edit_V"), "edit_K/edit_V do not match 4 prompts"),
    (lambda t: t.update({"3.edit_V": t["3.edit_V"][:-1].contiguous()}), "edit_K/edit_V do not match 4 prompts"),
    (lambda t: t.update({"3.edit_K": t["3.edit_K"][:, :-1].contiguous()}), "edit_K/edit_V do not match 4 prompts"),
])
def test_a_hand_built_state_with_a_tensor_missing_or_cut_is_refused(tmp_path, corrupt, message):
    hand_state().save(tmp_path)
    corrupt_tensors(tmp_path, corrupt)
    with pytest.raises(ValueError, match=message):
        L.EditState.load(tmp_path)


def test_latest_checkpoint_is_the_one_latest_json_names(tmp_path):
    """Killed after latest.json moved but before the old one was removed, two checkpoints are
    there: the one latest.json names is continued from, older or newer."""
    for name in ("ckpt-000001", "ckpt-000002", "ckpt-000002-1", "ckpt-000003.tmp"):
        (tmp_path / name).mkdir()
    for name in ("ckpt-000002", "ckpt-000001", "ckpt-000002-1"):
        (tmp_path / "latest.json").write_text(json.dumps({"checkpoint": name, "step": 2}))
        assert L.latest_checkpoint(tmp_path) == tmp_path / name


def test_check_identity_names_statistics_of_other_layers():
    """An Editor on other layers (Editor.checkpoint into a run of another) differs in its
    statistics' layers too: named, not a KeyError."""
    now = dict(hparams={"lam": 15.0}, templates="t", statistics={"1": [1.0, 2.0], "2": [3.0, 4.0]},
               dtype="float32", original_weights="w")
    L.check_identity(Path("run"), now, now)
    for saved in ({**now, "statistics": {"1": [1.0, 2.0]}}, {**now, "statistics": {**now["statistics"], "3": [1.0, 1.0]}}):
        with pytest.raises(ValueError, match=r"run: written by an Editor with other settings: other statistics C"):
            L.check_identity(Path("run"), saved, now)


# ==================== lyaplock: locate step, statistics, the authors' code, the command


def _oracle_z_rows(b, n):
    """The authors' own target-value inputs (token ids, lookups, targets) as our Rows."""
    rows = []
    for j in range(n):
        ids, am, lk = b[f"cz.{j}.input_ids"], b[f"cz.{j}.attention_mask"], b[f"cz.{j}.lookup_idxs"]
        rt = b[f"cz.{j}.rewriting_targets"]
        for i in range(ids.shape[0]):
            r = L.Row(ids[i][am[i].bool()].tolist(), int(lk[i]), j)
            if i < rt.shape[0]:
                p = (rt[i] != -100).nonzero()[:, 0]
                r.first, r.targets = int(p[0]), rt[i][p].tolist()
            rows.append(r)
    return rows


@pytest.mark.parametrize("device", DEVICES)
def test_pipeline_matches_the_authors_code_batch_by_batch(device, monkeypatch):
    """Three sequential LyapLock batches on stories260K through edit_batch, the step a run takes,
    fed the same token ids, templates and statistics as the authors' run: z* (E4), keys (E5),
    current outputs (each seen as edit_batch computes it), and the weights and the queue after
    each batch agree with their recorded intermediates. The step goes on from their z* (ours
    within 1e-5 of it), so that each batch's error is its own (ours carried on: 1.1e-5 by the
    third batch). A residual divided by n instead of the layers left (E6) fails it."""
    m = M.load(STORIES, device)
    o = json.loads((ORACLE / "oracle.json").read_text())
    hp = L.HParams(layers=tuple(o["layers"]), lam=o["lam"], alpha=o["alpha"])
    st = load_file(ORACLE / "stats.safetensors", device=device)
    C = {l: st[f"C32.{l}"].double() for l in hp.layers}
    requests, _ = data.load_requests(ORACLE / "requests.json")
    templates = json.loads((ORACLE / "templates.json").read_text())
    state = L.EditState.start("lyaplock", hp.layers)
    W0 = {l: m.edit_weight(l).clone() for l in hp.layers}
    n = o["n_requests"]
    rel = lambda a, b: float((a - b).norm() / b.norm())
    compute_z, keys_and_outputs, seen = L.compute_z, L.keys_and_outputs, []

    def theirs_after_ours(*args, **kwargs):
        zs, rest = compute_z(*args, **kwargs)
        assert rel(zs, b["z"]) < 1e-5                                                   # E4, batched
        return b["z"], rest
    monkeypatch.setattr(L, "compute_z", theirs_after_ours)
    monkeypatch.setattr(L, "keys_and_outputs", lambda *a, **k: seen.append(keys_and_outputs(*a, **k)) or seen[-1])
    for k in range(o["n_batches"]):
        b = load_file(ORACLE / f"batch_{k:02d}.safetensors", device=device)
        monkeypatch.setattr(L, "z_rows", lambda tok, requests, templates: _oracle_z_rows(b, n))
        seen.clear()
        L.edit_batch(m, requests[k * n:(k + 1) * n], templates, hp, state, C, W0)
        for l, (K, cur, _) in zip(hp.layers, seen, strict=True):
            assert rel(K, b[f"ks.{l}"]) < 1e-5 and rel(cur, b[f"cur_zs.{l}"]) < 1e-5      # E5
            assert rel(m.edit_weight(l), b[f"W_after.{l}"]) < 1e-5
            assert abs(state.layers[l].Z - float(b[f"Z.{l}"])) < 1e-5 * float(b[f"Z.{l}"])


def test_keys_rows_equal_the_authors_token_ids_and_z_rows_fix_the_decode_quirk():
    m = M.load(STORIES)
    requests, _ = data.load_requests(ORACLE / "requests.json")
    templates = json.loads((ORACLE / "templates.json").read_text())
    b = load_file(ORACLE / "batch_00.safetensors")
    ours = L.z_rows(m.tokenizer, requests[:4], templates)
    theirs = _oracle_z_rows(b, 4)
    assert [r.lookup for r in ours] == [r.lookup for r in theirs]
    assert [r.targets for r in ours] == [r.targets for r in theirs]
    assert [r.first for r in ours] == [r.first for r in theirs]         # where targets[0] is predicted
    tok = m.tokenizer.tok
    # theirs rebuilds "…saw a" + decode("▁c") as text and loses the space ("…saw aca");
    # ours appends the target ids themselves ("…saw a cake" without its last token)
    assert [tok.id_to_token(i) for i in theirs[0].ids[-3:]] == ["▁a", "c", "a"]
    assert [tok.id_to_token(i) for i in ours[0].ids[-3:]] == ["▁a", "▁c", "a"]
    assert ours[3].ids == theirs[3].ids             # the KL prompt "{subject} is a"


def test_batched_target_values_equal_one_request_at_a_time():
    m = M.load(STORIES)
    requests, _ = data.load_requests(ORACLE / "requests.json")
    templates = [["{}"], ["Once upon a time. {}", "One day. {}"]]
    hp = L.HParams(layers=(1, 2), v_num_grad_steps=8)
    rows = L.z_rows(m.tokenizer, requests[:5], templates)
    together, _ = L.compute_z(m, rows, 5, 2, hp)
    small, _ = L.compute_z(m, rows, 5, 2, hp, max_tokens=40)       # --z-batch-tokens: memory only
    assert torch.allclose(together, small, rtol=1e-5, atol=1e-5)
    for j in range(5):
        alone, _ = L.compute_z(m, L.z_rows(m.tokenizer, requests[j:j + 1], templates), 1, 2, hp)
        assert torch.allclose(together[j], alone[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", [*DEVICES, *(["cpu,cuda"] if torch.cuda.is_available() else [])])
def test_target_values_pass_only_the_rows_of_requests_still_optimised(monkeypatch, device):
    """E4 stops a request when its loss is under 5e-2 (the authors leave that request's loop): its
    rows leave the later passes (whole chunks once none is left), and z* and every logged loss are
    those of passes over all rows. On the fact model with little decay and KL, three of five
    requests stop, at steps 2, 8 and 20 (measured on the CPU), two never. On a GPU, and with the
    blocks spread over the CPU and a GPU (a chunk's request indices on the first device, the
    outputs and caches of the layers it runs on theirs), the same to float tolerance."""
    m = M.load(FIX / "factmodel-ci", device)
    requests, _ = data.load_requests(FIX / "factmodel-ci" / "edits.json")
    requests = [requests[i] for i in (0, 6, 31, 39, 1)]
    templates = [["{}"], ["Once upon a time. {}", "One day. {}"]]
    hp = L.with_overrides(L.preset(m.cfg, "lyaplock"), v_lr=0.5, clamp_norm_factor=4.0,
                          v_weight_decay=0.0, kl_factor=0.005)
    rows = L.z_rows(m.tokenizer, requests, templates)
    fit_loss, passed = L._fit_loss, []
    monkeypatch.setattr(L, "_fit_loss", lambda model, chunks, *a: passed.append(
        (len(chunks), sorted(i for c in chunks for i in c.rows))) or fit_loss(model, chunks, *a))
    z, info = L.compute_z(m, rows, 5, hp.layers[-1], hp, max_tokens=64)
    pruned = passed
    passed = []
    monkeypatch.setattr(L, "_active_rows", lambda c, active: c)          # every row, every pass
    z_all, info_all = L.compute_z(m, rows, 5, hp.layers[-1], hp, max_tokens=64)
    stops = [next((i for i, x in enumerate(l) if x < 5e-2), None) for l in info_all["loss"]]
    if device == "cpu":
        assert stops == [None, 2, 8, 20, None]             # the case the test is for
    assert None in stops and len(set(stops) - {None}) >= 2
    tolerance = 1e-6 if device == "cpu" else 1e-4          # GPU kernels may sum another batch's rows in another order
    close(z.cpu(), z_all.cpu(), tolerance)
    close(torch.tensor(info["loss"]), torch.tensor(info_all["loss"]), tolerance)
    assert len(pruned) == len(passed) == hp.v_num_grad_steps
    passes = [hp.v_num_grad_steps if s is None else s + 1 for s in stops]
    assert L.fit_summary(info["loss"])["z_passes"] == sum(passes) / 5
    for step, (n_chunks, ran) in enumerate(pruned):
        optimised = {j for j, s in enumerate(stops) if s is None or s >= step}
        assert ran == [i for i, r in enumerate(rows) if r.req in optimised]
        assert n_chunks <= passed[step][0]
    assert pruned[-1][0] < passed[-1][0]                    # a chunk left whole


def test_target_values_end_their_passes_once_every_request_has_stopped(monkeypatch):
    """E4 stops a request at a loss under STOP_LOSS and ends once none is left: on the fact model
    (the settings of the test above) requests 6 and 31 stop, at different passes (2 and 8 of 25 on
    the CPU), so the passes end at the later stop, each request logs one loss a pass, the first's
    held from its stop on."""
    m = M.load(FIX / "factmodel-ci")
    requests, _ = data.load_requests(FIX / "factmodel-ci" / "edits.json")
    hp = L.with_overrides(L.preset(m.cfg, "lyaplock"), v_lr=0.5, clamp_norm_factor=4.0,
                          v_weight_decay=0.0, kl_factor=0.005)
    rows = L.z_rows(m.tokenizer, [requests[6], requests[31]], [["{}"], ["Once upon a time. {}", "One day. {}"]])
    fit_loss, passes = L._fit_loss, []
    monkeypatch.setattr(L, "_fit_loss", lambda *a: passes.append(1) or fit_loss(*a))
    _, info = L.compute_z(m, rows, 2, hp.layers[-1], hp, max_tokens=64)
    first, second = info["loss"]
    stops = [next((i for i, x in enumerate(l) if x < L.STOP_LOSS), None) for l in info["loss"]]
    assert None not in stops and stops[0] < stops[1]                        # the case the test is for
    assert len(passes) == len(first) == len(second) == stops[1] + 1 < hp.v_num_grad_steps
    assert len(set(first[stops[0]:])) == 1
    assert L.fit_summary(info["loss"]) == dict(z_loss=pytest.approx((first[-1] + second[-1]) / 2),
                                               z_passes=(stops[0] + stops[1] + 2) / 2)


def test_adam_on_the_active_rows_of_delta_is_torch_adam_on_each_request_alone():
    """E4's step (_adam_rows): each active row of δ moves as torch.optim.Adam moves that request's
    δ alone (moments, bias corrections, ε where the gradients are as small as it: rows 1 and 2),
    then into its ball ‖δ‖ ≤ max_norm (row 3's bites); a stopped row and its moments stay as they
    were (the active set only shrinks, as compute_z's, so every active row is at the same step)."""
    g = torch.Generator().manual_seed(0)
    scale = torch.tensor([1.0, 1e-8, 3e-9, 1.0, 0.1])[:, None]
    max_norm = torch.tensor([1e3, 1e3, 1e3, 0.6, 1e3])
    delta, moments = torch.zeros(5, 6), [torch.zeros(5, 6), torch.zeros(5, 6)]
    theirs = [torch.nn.Parameter(torch.zeros(6)) for _ in range(5)]
    optims = [torch.optim.Adam([p], lr=0.5) for p in theirs]
    for t, on in enumerate(([1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [0, 1, 1, 1, 0]), 1):
        active = torch.tensor(on, dtype=torch.bool)
        grad = scale * torch.randn(5, 6, generator=g)
        stopped = moments[0][~active].clone(), moments[1][~active].clone(), delta[~active].clone()
        delta[active] = L._adam_rows(delta, grad, moments, active, t, 0.5, max_norm[active])
        assert all(torch.equal(a, b) for a, b in zip(stopped, (moments[0][~active], moments[1][~active], delta[~active])))
        for j in active.nonzero()[:, 0].tolist():
            theirs[j].grad = grad[j].clone()
            optims[j].step()
            with torch.no_grad():
                theirs[j].mul_((max_norm[j] / theirs[j].norm()).clamp(max=1.0))
    assert float(delta[3].norm()) == pytest.approx(0.6, rel=1e-6)
    for j in range(5):
        close(delta[j], theirs[j].detach(), 1e-6)


@pytest.mark.parametrize("kind", ["llama", "gemma2"])
def test_a_chunks_kept_rows_score_as_they_did_among_all_its_rows(family_model, kind):
    """_active_rows keeps the rows of the requests still optimised: their loss and gradient at any δ
    are as in the whole chunks (KL rows included; on Gemma 2, δ through the post-norm, E4b, from
    the MLP outputs kept), and a chunk with none of them is gone."""
    m = M.load(STORIES) if kind == "llama" else family_model(kind)
    requests, _ = data.load_requests(FIX / "counterfact-rome.json")
    rows = L.z_rows(m.tokenizer, requests[:4], [["{}"], ["Then. {}", "So. {}"]])
    layer, n_rewrites = 1, torch.bincount(torch.tensor([r.req for r in rows if r.targets]), minlength=4).float()
    chunks = L._chunks(m, rows, layer, 200, mlp_mapped=kind != "llama")
    delta = 0.1 * torch.randn(4, m.cfg.d_model, generator=torch.Generator().manual_seed(0))
    fit, grad = L._fit_loss(m, chunks, delta, layer, n_rewrites, 0.5, True)    # sets the KL rows' start
    active = torch.tensor([False, True, True, False])
    kept = [k for c in chunks if (k := L._active_rows(c, active)) is not None]
    assert sorted(i for c in kept for i in c.rows) == [i for i, r in enumerate(rows) if active[r.req]]
    assert len(kept) < len(chunks)                                       # a chunk of request 3's rows only
    assert len(kept[0].kl) == 2 < len(chunks[0].kl)      # KL rows of requests 2, 0, 1, 3, then of 2 and 1
    fit_kept, grad_kept = L._fit_loss(m, kept, delta, layer, n_rewrites, 0.5, True)
    close(fit_kept[active], fit[active], 1e-6)
    close(grad_kept[active], grad[active], 1e-5)
    assert float(fit_kept[~active].abs().max()) == 0.0


def test_a_steps_log_gives_how_its_target_values_fit(monkeypatch):
    """log.jsonl's z_loss and z_passes: each request's last E4 loss (a stopped one's at its stop) and
    the passes it ran (its stop step + 1, else all), averaged over the step's requests, as compute_z
    reported them, for a MEMIT-family step (one optimisation for the batch) and ROME's (one per
    request, in order)."""
    fit = L.fit_summary([[3.0, 1.0, 0.04, 0.04], [2.0, 0.5, 0.2, 0.1], [0.01, 0.01, 0.01, 0.01]])
    assert fit == dict(z_loss=pytest.approx((0.04 + 0.1 + 0.01) / 3), z_passes=(3 + 4 + 1) / 3)
    fit = L.fit_summary([[1.0, 0.2, 0.3], [1.0, L.STOP_LOSS, 0.01]])      # the last loss, not the least;
    assert fit == dict(z_loss=pytest.approx((0.3 + 0.01) / 2), z_passes=3)   # at STOP_LOSS compute_z goes on
    requests, _ = data.load_requests(ORACLE / "requests.json")
    templates = [["{}"], ["Once upon a time. {}"]]
    compute_z, losses = L.compute_z, []
    monkeypatch.setattr(L, "compute_z", lambda *a, **k: (lambda r: losses.extend(r[1]["loss"]) or r)(compute_z(*a, **k)))
    for method, layers in (("lyaplock", (1, 2)), ("rome", (2,))):
        m = M.load(STORIES)
        hp = L.with_overrides(L.preset(m.cfg, method), layers=layers, v_num_grad_steps=6, v_lr=0.5)
        C = {l: torch.eye(m.cfg.d_mlp, dtype=torch.float64) for l in layers}
        W0 = {l: m.edit_weight(l).detach().clone() for l in layers}
        losses.clear()
        log = L.edit_batch(m, requests[:3], templates, hp, L.EditState.start(method, layers), C, W0)
        assert len(losses) == 3 and all(len(l) == 6 for l in losses)
        assert log["z_passes"] == 6 and log["z_loss"] == pytest.approx(sum(l[-1] for l in losses) / 3, rel=1e-12)
        assert log["z_loss"] < sum(l[0] for l in losses) / 3                  # δ fits
        json.dumps(log)                                                        # a log line


@pytest.mark.parametrize("seed", range(5))
def test_length_batches_cover_every_index_once_within_the_budget(seed):
    g = random.Random(seed)
    lengths = [g.randint(1, 50) for _ in range(g.randint(1, 60))]
    budget = g.randint(1, 200)
    batches = S.length_batches(lengths, budget)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(lengths)                                   # shortest first: little padding
    for b in batches:
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= budget
    for b, nxt in zip(batches, batches[1:]):                         # greedy: the next one would not fit
        assert (len(b) + 1) * lengths[nxt[0]] > budget


@pytest.mark.parametrize("seed", range(5))
def test_suffix_batches_cover_every_row_once_within_the_budget(seed):
    """E4's batches: every row once, sorted by the length from the subject on, each batch's
    count × (longest prefix + longest suffix) within the budget (or one row), greedy; a row longer
    than the budget alone in its batch (never an empty batch before it)."""
    g = random.Random(seed)
    rows = [L.Row(ids=[0] * g.randint(1, 40), lookup=0, req=0) for _ in range(g.randint(1, 60))]
    for r in rows:
        r.lookup = g.randrange(len(r.ids))
    budget = g.randint(1, 200)
    batches = L.suffix_batches(rows, budget)
    assert sorted(i for b in batches for i in b) == list(range(len(rows)))
    suffix = [len(rows[i].ids) - rows[i].lookup for b in batches for i in b]
    assert suffix == sorted(suffix)
    width = lambda b: len(b) * (max(rows[i].lookup for i in b) + max(len(rows[i].ids) - rows[i].lookup for i in b))
    assert all(len(b) == 1 or width(b) <= budget for b in batches)
    assert all(width(b + nxt[:1]) > budget for b, nxt in zip(batches, batches[1:]))
    assert [len(b) for b in L.suffix_batches(rows, 1)] == [1] * len(rows)     # each row over the budget: one a batch


@pytest.mark.parametrize("seed", range(6))
def test_lower_gram_blocks_mirrored_equal_the_full_product(seed):
    g = torch.Generator().manual_seed(seed)
    m, n, block = (int(x) for x in torch.randint(1, 40, (3,), generator=g))
    k, C = torch.randn(n, m, generator=g, dtype=torch.float64), torch.randn(m, m, generator=g, dtype=torch.float64)
    C = C + C.T
    acc = C.clone()
    S.add_gram_lower(acc, k, block)
    assert torch.allclose(acc.tril() + acc.tril(-1).T, C + k.T @ k, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_statistics_match_the_authors_and_are_cached(tmp_path, device):
    """C over the first 5,000 tokens of WikiText-2 test, each paragraph alone with BOS (E1):
    the authors' run recorded float32(C)."""
    m = M.load(STORIES, device)
    st = load_file(ORACLE / "stats.safetensors", device=device)
    seqs = S.stats_sequences(m.tokenizer, data.read_corpus(FIX / "wikitext-2-test-sample.txt"), 5000)
    assert sum(map(len, seqs)) == 5000
    C = S.collect_stats(m, seqs, [1, 2], batch_tokens=1000)
    for l in (1, 2):
        assert C[l].dtype == torch.float64
        assert float((C[l] - st[f"C32.{l}"].double()).norm() / C[l].norm()) < 1e-6
    direct = torch.zeros_like(C[1])      # the obvious way: one sequence at a time
    for s in seqs:
        k = m(torch.tensor([s], device=device), keys_at={1}, stop_after=1).keys[1][0].double()
        direct += k.T @ k
    assert float((C[1] - direct / 5000).norm() / C[1].norm()) < 1e-6   # float32 keys
    logs = []
    args = (m, STORIES, FIX / "wikitext-2-test-sample.txt", 3000, [1, 2], tmp_path)
    C1 = S.load_or_collect_stats(*args, log=lambda s, end="": logs.append(s))
    C2 = S.load_or_collect_stats(*args, log=lambda s, end="": logs.append(s))
    assert any("reusing" in s for s in logs) and all(torch.equal(C1[l], C2[l]) for l in (1, 2))
    f = next(tmp_path.glob("stats-*.safetensors"))
    f.write_bytes(f.read_bytes()[:1000])                    # a corrupt cache is recomputed
    C3 = S.load_or_collect_stats(*args, log=lambda s, end="": logs.append(s))
    assert any("unreadable" in s for s in logs) and torch.equal(C3[1], C1[1])


def test_context_templates_are_seeded():
    m = M.load(STORIES)
    t = L.context_templates(m, seed=1)
    assert t[0] == ["{}"] and len(t[1]) == 5 and all(s.endswith(". {}") for s in t[1])
    assert t == L.context_templates(m, seed=1) and t != L.context_templates(m, seed=2)
    assert all(s.startswith(w) for s, w in zip(t[1], ["The", "Therefore", "Because", "I", "You"]))
    for count in (3, 0):
        with pytest.raises(ValueError, match="each count a multiple of 5"):     # (was an empty group, silently)
            L.context_templates(m, 0, ((10, count),))


def test_each_group_of_context_templates_is_a_draw_of_its_own():
    """E3's groups are drawn apart (ROME's two): two groups of one shape are not the same texts, and
    ROME's ten-token group does not continue every text of its five-token one (one seed for both
    groups made each group the first group's stream again)."""
    m = M.load(STORIES)
    t = L.context_templates(m, 0, ((10, 5), (10, 5)))
    assert t[1] != t[2]
    rome = L.method_templates(m, 0, "rome")
    assert not all(b.startswith(a[:-len(". {}")]) for a, b in zip(rome[1], rome[2]))


def test_a_generated_brace_becomes_what_each_method_s_code_makes_of_it(monkeypatch):
    """A prefix the model writes with { or }: MEMIT's family (memit_main.py) puts a space, ROME's
    rome_main.py drops it; either way one "{}" is left, the subject's."""
    m = M.load(STORIES)
    monkeypatch.setattr(m.tokenizer, "decode", lambda ids: "The {x} y")
    memit, rome = L.method_templates(m, 0, "lyaplock"), L.method_templates(m, 0, "rome")
    assert memit[1] == ["The  x  y. {}"] * 5
    assert [len(g) for g in rome] == [1, 10, 10] and {t for g in rome[1:] for t in g} == {"The x y. {}"}


def test_subject_missing_from_prompt_is_a_clear_error():
    m = M.load(STORIES)
    with pytest.raises(ValueError, match="has no '{}'"):
        L.subject_row(m.tokenizer, "The capital is", "Paris", 0)


def _cli(tmp_path, *extra, edits="counterfact-rome.json", limit=8, batch=4, tokens=4000):
    """Arguments of a small run on stories260K (`extra` last, so it overrides; tokens 0: no
    --stats-tokens), its perplexity on short_heldout."""
    return ["--model", str(STORIES), "--edits", str(FIX / edits), *(["--limit", str(limit)] if limit else []),
            "--batch-size", str(batch), *(["--stats-tokens", str(tokens)] if tokens else []),
            "--stats-cache", str(tmp_path / "cache"), "--heldout", str(short_heldout(tmp_path)),
            "--checkpoint-every", "1", *extra]


def short_heldout(tmp_path) -> Path:
    """The default held-out text's first 8 paragraphs, one file beside the tests' directories: the
    small runs here measure perplexity as the command does, on fewer texts (its 64 took half of
    such a run's time, a minute of the suite)."""
    path = tmp_path.parent / "heldout-8.txt"
    if not path.exists():
        path.write_text("\n".join(data.read_corpus(L.DEFAULT_HELDOUT)[:8]) + "\n")
    return path


def reedit_file(tmp_path, n: int) -> Path:
    """The first n records of counterfact-rome.json and the first again with another target."""
    records = json.loads((FIX / "counterfact-rome.json").read_text())[:n]
    again = dict(records[0], case_id=10 ** 6, requested_rewrite=dict(records[0]["requested_rewrite"],
                                                                   target_new={"str": "Oslo"}))
    (tmp_path / "edits.json").write_text(json.dumps(records + [again]))
    return tmp_path / "edits.json"


def test_a_run_scores_general_ability_as_the_authors_glue_eval_does_when_asked(tmp_path):
    """--glue-protocol authors: every ability entry holds their figures (eval.authors_general_eval,
    checked item by item against their code in test_eval.py), the setting is the run's, and
    --stop-below reads the same headlines."""
    out = tmp_path / "run"
    assert L.main(_cli(tmp_path, "--out", str(out), "--limit", "2", "--batch-size", "2", "--no-generation",
                       "--glue-dir", str(FIX / "glue"), "--glue-n", "3", "--glue-protocol", "authors")) == 0
    ability = [json.loads(l) for l in (out / "ability.jsonl").read_text().splitlines()]
    assert all(set(a["general"]) == set(L.ev.AUTHORS_TASKS) for a in ability)
    assert all({"f1", "f1_new", "mcc", "invalid", "accuracy_new"} <= set(v) for a in ability for v in a["general"].values())
    assert json.loads((out / "config.json").read_text())["glue_protocol"] == "authors"
    assert L.ability_score(ability[0])[0] == "mean zero-shot score"
    assert L.main(["report", str(out)]) == 0                      # the report says which (it did not)
    assert "- general ability scored as the authors' glue_eval (--glue-protocol authors)" in (out / "report.md").read_text()
    assert "zero-shot general ability (the authors' glue_eval)" in (out / "general.svg").read_text()
    config = json.loads((out / "config.json").read_text())
    del config["glue_protocol"]                                   # a run begun before the setting was
    (out / "config.json").write_text(json.dumps(config))
    assert L.resumed_settings(L.parse_args(["--resume", str(out), "--glue-protocol", "likelihood"]), config,
                              M.checkpoint_config(STORIES)).glue_protocol == "likelihood"   # (was: None in the run)
    with pytest.raises(ValueError, match="glue_protocol: 'likelihood' in the run, 'authors' now"):
        L.resumed_settings(L.parse_args(["--resume", str(out), "--glue-protocol", "authors"]), config,
                           M.checkpoint_config(STORIES))


def _final_weights(out):
    latest = json.loads((out / "latest.json").read_text())["checkpoint"]
    return load_file(out / latest / "weights.safetensors")


def test_cli_run_writes_the_run_directory_and_the_edited_model(tmp_path, capsys):
    out = tmp_path / "run"
    snippets = tmp_path / "snippets.json"      # references that mention each new target
    snippets.write_text(json.dumps({str(q.case_id): [f"{q.target_new} is often said of {q.subject}."]
                                    for q in data.load_requests(FIX / "counterfact-rome.json")[0]}))
    assert L.main(_cli(tmp_path, "--out", str(out), "--save-model", str(tmp_path / "edited"), "--snippets", str(snippets),
                       "--glue-dir", str(FIX / "glue"), "--glue-n", "4", "--eval-every", "1")) == 0
    for f in ("config.json", "templates.json", "log.jsonl", "cases.jsonl", "cases_pre.jsonl",
              "summary.json", "summary.md", "ability.jsonl"):
        assert (out / f).exists(), f
    ability = [json.loads(l) for l in (out / "ability.jsonl").read_text().splitlines()]
    assert [a["step"] for a in ability] == [0, 1, 2] and all("sst2" in a["general"] for a in ability)
    assert {v["n"] for a in ability for v in a["general"].values()} == {4}        # --glue-n 4 items a task
    log = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [0, 1] and log[-1]["edits"] == 8
    assert set(log[0]["layers"]) == {"1", "2"} and all({"pl", "D", "z"} <= set(v) for v in log[0]["layers"].values())
    summary = json.loads((out / "summary.json").read_text())
    assert {"method", "model", "n_edits", "batch_size", "efficacy", "generalization", "specificity",
            "score"} <= set(summary)
    assert summary["n_edits"] == 8 and len((out / "cases.jsonl").read_text().splitlines()) == 8
    assert {"fluency", "perplexity", "general"} <= set(summary) and {"efficacy", "fluency"} <= set(summary["pre"])
    # general ability before and after: ability.jsonl's first entry and its final one (not step 1's)
    assert [(summary["pre"][k], summary[k]) for k in ("perplexity", "general")] == [
        (ability[0][k], ability[-1][k]) for k in ("perplexity", "general")] and ability[-1]["final"]
    assert not {"step", "edits", "final"} & (set(summary) | set(summary["pre"]))
    assert "consistency" in summary and 0 <= summary["consistency"] <= 100
    assert summary["pre"]["locality_top1"] == 100 and 0 <= summary["locality_top1"] <= 100   # EasyEdit's
    pre, post = ([json.loads(l) for l in (out / f).read_text().splitlines()]
                 for f in ("cases_pre.jsonl", "cases.jsonl"))
    same = lambda b, a: sum(sum(x == y for x, y in zip(p, q)) / len(p) for p, q in zip(b, a)) / len(b)   # by hand
    assert [c["locality_top1"] for c in post] == [     # each case's argmax against its own before editing
        pytest.approx(same(b["neighborhood_argmax"], a["neighborhood_argmax"])) for b, a in zip(pre, post)]
    edited = M.load(tmp_path / "edited")
    w = _final_weights(out)
    assert torch.equal(edited.edit_weight(1), w["model.layers.1.mlp.down_proj.weight"])
    assert not (tmp_path / "edited" / L.SAVING).exists()        # the save's marker goes with the save done
    assert "[8/8]" in capsys.readouterr().out
    assert L.main(_cli(tmp_path, "--out", str(out))) == 1            # never overwrite a run
    assert "not empty" in capsys.readouterr().err


def test_a_stream_whose_length_is_not_a_multiple_of_the_batch_size_edits_its_last_requests_too(tmp_path):
    """3 requests, 2 a step: two steps, the last a short one of 1 request; every request is edited
    and scored (was at risk: a step count rounded down drops the remainder)."""
    out = tmp_path / "run"
    assert L.main(_cli(tmp_path, "--out", str(out), "--no-generation", limit=3, batch=2)) == 0
    log = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [0, 1] and log[-1]["edits"] == 3
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_edits"] == 3 and len((out / "cases.jsonl").read_text().splitlines()) == 3


@pytest.mark.parametrize("device", DEVICES)
def test_cli_resume_after_an_interruption_gives_the_same_weights_and_log(tmp_path, monkeypatch, device):
    whole = tmp_path / "whole"
    assert L.main(_cli(tmp_path, "--out", str(whole), "--limit", "12", "--device", device)) == 0
    real, calls = L.edit_batch, []

    def dies_after_two(*a, **k):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*a, **k)
    monkeypatch.setattr(L, "edit_batch", dies_after_two)
    part = tmp_path / "part"
    assert L.main(_cli(tmp_path, "--out", str(part), "--limit", "12", "--device", device)) == 130   # stopped mid-stream
    monkeypatch.setattr(L, "edit_batch", real)
    assert L.main(["--resume", str(part), "--stats-cache", str(tmp_path / "cache"), "--device", device]) == 0
    a, b = _final_weights(whole), _final_weights(part)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda f: [{k: v for k, v in json.loads(l).items() if not k.startswith("seconds")}
                       for l in f.read_text().splitlines()]
    assert strip(whole / "log.jsonl") == strip(part / "log.jsonl")


def test_a_resumed_run_saves_the_model_where_the_run_was_told_to(tmp_path, monkeypatch, capsys):
    """--save-model is a setting of the run: interrupted, the run continues with the command it
    prints (only --resume), and that writes the edited model where the first command said; a
    resume may name another directory."""
    real = interrupt_after_one_step(monkeypatch)
    out, edited = tmp_path / "run", tmp_path / "edited"
    assert L.main(_cli(tmp_path, "--out", str(out), "--limit", "4", "--batch-size", "2", "--no-generation",
                       "--save-model", str(edited))) == 130
    assert not edited.exists() and f"continue with: python lyaplock.py --resume {out}" in capsys.readouterr().err
    monkeypatch.setattr(L, "edit_batch", real)
    assert L.main(["--resume", str(out)]) == 0
    assert f"edited model written to {edited}" in capsys.readouterr().out
    saved, final = load_file(edited / "model.safetensors"), _final_weights(out)
    assert final and all(torch.equal(saved[name], w) for name, w in final.items())   # the run's last weights
    elsewhere = tmp_path / "elsewhere"
    assert L.main(["--resume", str(out), "--save-model", str(elsewhere)]) == 0
    assert (elsewhere / "config.json").exists()


def test_a_run_stopped_by_sigterm_says_how_to_go_on_and_does(tmp_path, monkeypatch, capsys):
    """A cluster's time limit (SIGTERM, then SIGKILL after a grace period): the run leaves through
    Python's shutdown (exit 143) and, as after Ctrl-C, prints the command that continues it; that
    command finishes the run."""
    import signal
    real = L.edit_batch
    def killed_in_step_1(*a, **k):
        monkeypatch.setattr(L, "edit_batch", lambda *a, **k: os.kill(os.getpid(), signal.SIGTERM))
        return real(*a, **k)
    monkeypatch.setattr(L, "edit_batch", killed_in_step_1)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:         # (not a return: a script calling main in a loop stops too)
        L.main(_cli(tmp_path, "--out", str(out), "--limit", "4", "--batch-size", "2", "--no-generation"))
    assert stop.value.code == 128 + signal.SIGTERM and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert capsys.readouterr().err.endswith(f"stopped (SIGTERM); continue with: python lyaplock.py --resume {out}\n")
    monkeypatch.setattr(L, "edit_batch", real)
    assert L.main(["--resume", str(out)]) == 0 and (out / "summary.json").exists()


@pytest.mark.parametrize("flag,value,message", [
    ("--z-batch-tokens", "0", "--z-batch-tokens must be at least 1, got 0"),
    ("--stats-batch-tokens", "-5", "--stats-batch-tokens must be at least 1, got -5"),
    ("--batch-size", "0", "--batch-size must be at least 1, got 0"),
    ("--lam", "0", "--lam must be positive, got 0.0"),
    ("--checkpoint-every", "0", "--checkpoint-every must be at least 1, got 0"),
    ("--layers", "2,1", "--layers '2,1': give increasing layer numbers in 0..4, e.g. --layers 1,2 "
                        "(or leave the flag out for the model's preset)"),
    ("--layers", "", "--layers '': give increasing layer numbers in 0..4, e.g. --layers 1,2 "
                     "(or leave the flag out for the model's preset)"),
    *[("--layers", text, f"--layers '{text}': give increasing layer numbers in 0..4, e.g. --layers 1,2 "
                         "(or leave the flag out for the model's preset)") for text in ("1,1", "5")],
    ("--stats-tokens", "10", "--stats-tokens 10: C (172×172) needs at least d_mlp = 172 tokens, or it is singular"),
    ("--stats-tokens", "171", "--stats-tokens 171: C (172×172) needs at least d_mlp = 172 tokens, or it is singular"),
    ("--stop-below", "0.5", "--stop-below 0.5: give a fraction between 0 and 1, with --eval-every K"),
    ("--l2", "-1", "--l2 must be positive, got -1.0"),
    ("--lam", "inf", "--lam must be positive, got inf (not a finite number)"),
    ("--alpha", "nan", "--alpha must be positive, got nan (not a finite number)"),
    ("--limit", "0", "--limit must be at least 1, got 0"),
    ("--seed", str(10 ** 23), f"--seed {10 ** 23}: give a whole number from -2**63 to 2**63 - 1"),
    ("--eval-every", "-1", "--eval-every must be at least 0, got -1"),
    ("--stats-tokens", "-1", "--stats-tokens must be at least 0, got -1"),
    ("--glue-n", "0", "--glue-n must be at least 1, got 0"),
    ("--glue-dir", "{tmp}/glue", "--glue-dir {tmp}/glue: no such directory"),
    ("--glue-dir", "README.md", "--glue-dir README.md: a file: give the directory of the task files"),
    ("--glue-dir", str(FIX), f"--glue-dir {FIX}: lacks sst2.json, mrpc.json, cola.json, rte.json, nli.json, "
                             "mmlu.json (it holds one JSON file per task: sst2, mrpc, cola, rte, nli, mmlu; e.g. fixtures/glue)"),
    ("--heldout", "{tmp}/heldout.txt", "--heldout {tmp}/heldout.txt: no such file or directory"),
    ("--snippets", "{tmp}/snippets.json", "--snippets {tmp}/snippets.json: no such file or directory"),
])
def test_cli_rejects_bad_settings_with_one_line(tmp_path, capsys, flag, value, message):
    """{tmp}: a path in this test's own directory, which does not exist."""
    value, message = value.replace("{tmp}", str(tmp_path)), message.replace("{tmp}", str(tmp_path))
    assert L.main(_cli(tmp_path, "--out", str(tmp_path / "run"), flag, value)) == 1
    err = capsys.readouterr().err
    assert err == f"error: {message}\n"
    assert not (tmp_path / "run").exists()


def test_bad_snippets_and_class_ids_out_of_range_are_refused_before_any_work(tmp_path, capsys):
    """A --snippets file of the wrong shape, of none of the edited cases or with --no-generation
    (no consistency, without a word), a general-ability item whose class id is not one of its
    task's classes (-1 scored as the last class, silently; 9 an IndexError after the statistics),
    and a --glue-n above a task file's items (recorded as typed, the file's items scored) are
    named before the model loads and before a run directory is made."""
    snippets = tmp_path / "snippets.json"
    snippets.write_text("[1]")
    glue = tmp_path / "glue"
    shutil.copytree(FIX / "glue", glue)
    sst2, mmlu = json.loads((glue / "sst2.json").read_text()), json.loads((glue / "mmlu.json").read_text())
    sst2[0]["label"], mmlu[3]["answer"] = -1, 9
    (glue / "sst2.json").write_text(json.dumps(sst2))
    elsewhere = tmp_path / "elsewhere.json"             # references of cases this run does not edit
    elsewhere.write_text(json.dumps({"123456": ["a text"], "x": ["b"]}))
    cases = [(["--snippets", str(snippets)], f"--snippets {snippets}: expected an object {{case_id: [text, ...]}}"),
             (["--glue-dir", str(glue)], f"{glue}/sst2.json: item 0: label -1 is not a class id 0..1 (the answers negative, positive, in order)"),
             (["--snippets", str(elsewhere)], f"--snippets {elsewhere}: none of its 2 case ids is one of the edits' "
                                              "(first: 0): no consistency would be scored"),
             (["--snippets", str(elsewhere), "--no-generation"], "--snippets with --no-generation: consistency is "
              "scored on the generated text; the snippets would be recorded, not used"),
             (["--glue-dir", str(FIX / "glue"), "--glue-n", "111"], f"--glue-n 111: {FIX / 'glue' / 'sst2'}.json "
              "holds 110 items; give --glue-n 110 or less"),
             (["--glue-dir", str(FIX / "glue"), "--glue-n", "101", "--glue-protocol", "authors"],   # theirs: from 10
              f"--glue-n 101: {FIX / 'glue' / 'sst2'}.json holds 100 items past the first 10; give --glue-n 100 or less")]
    for flags, message in cases:
        assert L.main(_cli(tmp_path, "--out", str(tmp_path / "run"), *flags)) == 1
        assert capsys.readouterr().err == f"error: {message}\n"
        assert not (tmp_path / "run").exists()
    texts = tmp_path / "texts.json"                     # case ids as text, in the file and the snippets
    texts.write_text(json.dumps([dict(r, case_id=str(r["case_id"])) for r in json.loads((FIX / "counterfact-rome.json").read_text())[:4]]))
    snippets.write_text(json.dumps({"0": ["a text"]}))
    requests, _ = L.load_requests(L.Settings(model=str(STORIES), edits=str(texts), snippets=str(snippets)))
    assert requests[0].case_id == "0"                   # (was: none of its case ids is one of the edits')
    (glue / "sst2.json").write_text((FIX / "glue" / "sst2.json").read_text())
    (glue / "mmlu.json").write_text(json.dumps(mmlu))
    with pytest.raises(ValueError, match=r"mmlu.json: item 3: answer 9 is not a class id 0..3 \(the answers A, B, C, D, in order\)"):
        L.ev.read_task(glue, "mmlu", 100)


def test_cli_resume_refuses_another_configuration(tmp_path, capsys):
    out = tmp_path / "run"
    assert L.main(_cli(tmp_path, "--out", str(out), "--limit", "4")) == 0
    assert L.main(_cli(tmp_path, "--resume", str(out), "--limit", "4", "--alpha", "3")) == 1
    err = capsys.readouterr().err
    assert f"configuration differs: hparams.alpha: {_stories_preset().alpha} in the run, 3.0 now" in err


def _stories_preset():
    return L.preset(M.Config.from_hf(json.loads((STORIES / "config.json").read_text())), "lyaplock")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 4-edit run, for the resumes that are refused (they leave it as it is)."""
    tmp_path = tmp_path_factory.mktemp("finished")
    assert L.main(_cli(tmp_path, "--out", str(tmp_path / "run"), "--limit", "4")) == 0
    return tmp_path / "run"


@pytest.mark.parametrize("flags,named", [
    (["--method", "memit"], ["hparams.method: 'lyaplock' in the run, 'memit' now"]),
    (["--alpha", "5", "--lam", "3"], [f"hparams.alpha: {_stories_preset().alpha} in the run, 5.0 now",
                                      f"hparams.lam: {_stories_preset().lam} in the run, 3.0 now"]),
    (["--edits", str(FIX / "counterfact-easyedit.json")], ["edits: ", "edits_sha256: "]),
    (["--batch-size", "2", "--seed", "3"], ["hparams.batch_size: 4 in the run, 2 now", "seed: 0 in the run, 3 now"]),
    (["--no-generation"], ["generation: True in the run, False now"]),
])
def test_cli_resume_without_model_refuses_every_typed_flag_that_differs(finished_run, capsys, flags, named):
    out = finished_run
    files = lambda: {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    before = files()
    capsys.readouterr()
    assert L.main(["--resume", str(out), *flags]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: --resume {out}: the configuration differs: ") and err.count("\n") == 1
    assert all(n in err for n in named), err
    assert files() == before                            # refused: the run left as it was


def test_the_flag_rules_of_a_resume_and_of_stop_below_hold_at_their_edges(tmp_path):
    """What check_settings takes and refuses before any work: --resume with --out (the run stays in
    its own directory), --glue-n or the run's own --stop-below on a resume (the run recorded its
    --glue-dir and --eval-every), --plan-gib without --plan also on a resume, --stats-tokens with
    --stats, --stop-below 0 or 1 (no fraction) even with --eval-every; --stats-tokens of d_mlp taken
    (C is not singular)."""
    run = str(tmp_path / "run")
    check = lambda *argv: L.check_settings(L.parse_args(list(argv)))
    for argv in (["--resume", run, "--glue-n", "5"], ["--resume", run, "--stop-below", "0.5"],
                 ["--stop-below", "0.01", "--eval-every", "1"], ["--stop-below", "0.99", "--eval-every", "1"],
                 ["--plan", "--plan-gib", f"{2 ** -20},{2 ** 30}"]):
        check(*argv)
    for argv, message in ((["--resume", run, "--out", run], "--out and --resume: a resumed run stays in its own"),
                          (["--resume", run, "--plan-gib", "80"], "--plan-gib without --plan"),
                          (["--stats", run, "--stats-tokens", "5"], "--stats-tokens with --stats: the file holds"),
                          (["--stats", run, "--stats-batch-tokens", "5"], "--stats-batch-tokens with --stats"),
                          (["--state-device", "gpu"], "device 'gpu'"),
                          (["--method", "memit", "--v", "2"], "--v: memit does not read it (it has no queue)"),
                          (["--plan", "--plan-gib", str(2 ** 31)], "--plan-gib: each device's memory must be from"),
                          (["--stop-below", "0", "--eval-every", "1"], "--stop-below 0.0: give a fraction"),
                          (["--stop-below", "1", "--eval-every", "1"], "--stop-below 1.0: give a fraction")):
        with pytest.raises(ValueError, match=re.escape(message)):
            check(*argv)
    out, settings, _ = L.open_run(L.parse_args(_cli(tmp_path, "--out", run, tokens=172)))    # d_mlp tokens: enough
    assert (out, settings.stats_tokens) == (Path(run), 172)


def test_the_parser_s_defaults_are_the_settings_defaults_and_paths_are_recorded_absolute(monkeypatch):
    """A run's flags left out record what Settings says they default to (a run begun before a setting
    was recorded resumes with Settings' default: the two must agree), and its path flags, typed
    relative, as absolute paths (a --resume from another directory reads the same files); a --glue-n
    of exactly a task file's items is taken."""
    defaults = vars(L.parse_args([]))
    for f in dataclasses.fields(L.Settings):
        if defaults.get(f.name) is not None and f.name != "device" and f.default is not dataclasses.MISSING:
            assert defaults[f.name] == f.default, f.name
    assert defaults["batch_size"] == L.HParams().batch_size
    monkeypatch.chdir(HERE)
    args = L.parse_args(["--model", "fixtures/stories260K-hf", "--edits", "fixtures/stories-edits.json",
                         "--heldout", "fixtures/wikitext-2-valid-sample.txt", "--glue-dir", "fixtures/glue",
                         "--glue-n", "110"])
    L.check_inputs(args)
    settings = L.new_settings(args, M.checkpoint_config(STORIES))
    assert [settings.model, settings.edits, settings.heldout, settings.glue_dir] == [str((FIX / name).resolve())
            for name in ("stories260K-hf", "stories-edits.json", "wikitext-2-valid-sample.txt", "glue")]


def test_a_resume_takes_the_resumable_flags_and_compares_the_others_with_the_run_s_settings(tmp_path):
    """resumed_settings on a run's config.json: --z-batch-tokens and --checkpoint-every change the
    settings; --seed (it draws other context templates) is compared and refused; a setting the
    run's config.json lacks (a run begun before it was recorded) compares as its default; an edits
    file the run recorded a digest of and that is gone is refused."""
    cfg = M.checkpoint_config(STORIES)
    saved = json.loads(L.Settings(model=str(STORIES), edits=str(FIX / "stories-edits.json")).to_json())
    del saved["glue_n"]
    resumed = lambda *flags: L.resumed_settings(L.parse_args(["--resume", "run", *flags]), saved, cfg)
    settings = resumed("--z-batch-tokens", "512", "--checkpoint-every", "3", "--glue-n", "100", "--seed", "0")
    assert (settings.z_batch_tokens, settings.checkpoint_every, settings.glue_n) == (512, 3, 100)
    for flags, named in ((["--seed", "3"], "seed: 0 in the run, 3 now"),
                         (["--superseded", "remove"], "hparams.superseded: 'keep' in the run, 'remove' now"),
                         (["--dtype", "bfloat16"], "dtype: 'float32' in the run, 'bfloat16' now"),
                         (["--layers", "1,2"], r"hparams.layers: \[4, 5, 6, 7, 8\] in the run, \[1, 2\] now"),
                         (["--stop-below", "0.5"], "stop_below: None in the run, 0.5 now")):
        with pytest.raises(ValueError, match=f"the configuration differs: {named}"):
            resumed(*flags)
    saved.update(edits=str(tmp_path / "gone.json"), edits_sha256="0" * 64)
    with pytest.raises(ValueError, match="is missing or has changed since the run began"):
        resumed()
    saved.update(stats_file=str(tmp_path / "stats.safetensors"), edits_sha256="")
    with pytest.raises(ValueError, match="--stats-batch-tokens: the run reads its statistics from its --stats file"):
        resumed("--stats-batch-tokens", "100")     # (resumable, but a run given --stats reads no corpus)


def test_a_resume_drops_what_was_logged_after_its_checkpoint_and_keeps_what_it_holds(tmp_path, capsys):
    """start_or_resume on a run directory written by hand, its checkpoint after step 2 of 2-request
    steps over 3 requests (the last step a short one): log lines of steps 0 and 1 kept, 2 and 3
    dropped; the measurement before editing and the one after step 2 kept, a final one (of a
    finished run resumed again) and a later one dropped; a --stop-below record of step 2 kept, of
    a later step removed."""
    from types import SimpleNamespace

    class Editor:
        state = SimpleNamespace(step=2, n_edits=3)
        restore = lambda self, out: None
    settings = L.Settings(model=str(STORIES), hparams=L.HParams(batch_size=2))
    (tmp_path / "latest.json").write_text("{}")
    data.write_jsonl(tmp_path / "cases_pre.jsonl", [{}] * 3)
    for stop_step, kept in ((2, True), (3, False)):
        data.write_jsonl(tmp_path / "log.jsonl", [dict(step=s) for s in range(4)])
        data.write_jsonl(tmp_path / "ability.jsonl", [dict(step=0, final=False), dict(step=2, final=False),
                                                      dict(step=2, final=True), dict(step=3, final=False)])
        (tmp_path / "stop.json").write_text(json.dumps(dict(step=stop_step)))
        L.start_or_resume(Editor(), [None] * 3, settings, tmp_path)
        assert [e["step"] for e in data.read_jsonl(tmp_path / "log.jsonl")[0]] == [0, 1]
        assert [(a["step"], a["final"]) for a in data.read_jsonl(tmp_path / "ability.jsonl")[0]] == [
            (0, False), (2, False)]
        assert (tmp_path / "stop.json").exists() == kept
    assert f"resuming {tmp_path} at step 2 (3 edits done)" in capsys.readouterr().out


def test_cli_resume_allows_device_and_batch_tokens_and_repeating_the_settings(tmp_path, capsys):
    out = tmp_path / "run"
    argv = _cli(tmp_path, "--out", str(out), "--limit", "4", "--no-generation")
    assert L.main(argv) == 0
    again = [x for x in argv if x != "--out" and x != str(out)]
    assert L.main(["--resume", str(out), "--device", "cpu", "--z-batch-tokens", "512", "--checkpoint-every", "3",
                   *again]) == 0, capsys.readouterr().err
    recorded = json.loads((out / "config.json").read_text())      # the latest start's: --resume DIR alone
    assert (recorded["z_batch_tokens"], recorded["limit"]) == (512, 4)


def _long_prompt_edits(tmp_path):
    recs = json.loads((FIX / "counterfact-rome.json").read_text())[:3]
    recs[1]["requested_rewrite"]["prompt"] = "Once upon a time " * 200 + recs[1]["requested_rewrite"]["prompt"]
    f = tmp_path / "long.json"
    f.write_text(json.dumps(recs))
    return f, recs[1]["case_id"]


def test_a_prompt_longer_than_the_model_positions_is_named_before_any_model_work(tmp_path, capsys, monkeypatch):
    edits, cid = _long_prompt_edits(tmp_path)
    monkeypatch.setattr(L.stats, "load_or_collect_stats", lambda *a, **k: pytest.fail("statistics were computed"))
    argv = _cli(tmp_path, "--out", str(tmp_path / "run"), "--edits", str(edits), "--limit", "3", "--no-generation")
    assert L.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {edits}: case_id {cid}: its rewrite prompt in a context template, with its target is ")
    assert "longer than the model's 512 positions (max_position_embeddings); shorten it or use --skip-bad" in err
    assert not (tmp_path / "run").exists()         # refused before it edits: nothing to clear away
    monkeypatch.undo()
    assert L.main(_cli(tmp_path, "--out", str(tmp_path / "run"), "--edits", str(edits), "--limit", "3",
                       "--no-generation", "--skip-bad")) == 0
    assert f"skipped 1 bad record(s):\n  {edits}: case_id {cid}: its " in capsys.readouterr().out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (summary["n_edits"], summary["skipped"]) == (2, 1)             # the summary says how many were skipped


@pytest.mark.parametrize("kind, very, limit, field", [("gpt2", 80, 64, "n_positions"),
                                                      ("phi3-longrope-window", 8, 8, "original_max_position_embeddings")])
def test_the_positions_field_is_named_as_the_checkpoint_names_it(tmp_path, kind, very, limit, field):
    """GPT-2 and GPT-J configs call it n_positions (the message said max_position_embeddings).
    LongRoPE's limit is its trained length (8 here, of 64 positions): past it a pass turns every
    row by the long factors, and an edit's keys would hang on its batch's longest row."""
    from types import SimpleNamespace
    from test_models import make_checkpoint
    model = M.load(make_checkpoint(tmp_path / kind, kind))
    q = data.Request(case_id=7, prompt="{} is " + "very " * very + "in", subject="Paris", target_new=" France",
                     target_true=" Spain", paraphrase_prompts=(), neighborhood_prompts=(), neighborhood_answers=())
    settings = SimpleNamespace(generation=False, skip_bad=True, edits="e.json")
    _, (msg,) = L.fit_context(model, [q], [["{}"]], settings)
    assert msg.startswith("e.json: case_id 7: its ") and msg.endswith(f"longer than the model's {limit} positions ({field})")
    short = dataclasses.replace(q, prompt="{}", subject="a", target_new=" b")              # 6 tokens
    assert L.fit_context(model, [short], [["{}"]], settings) == ([short], [])


def test_a_long_answer_counts_with_the_prompts_it_is_scored_after(tmp_path):
    """A neighbourhood answer is scored after the neighbourhood prompts only, the edit's targets
    after the rewrite and paraphrase prompts: a long answer is named with its prompt (it was
    counted, and named, as the rewrite prompt's target), and a long rewrite prompt beside it no
    longer makes a request too long that no input is (it was refused)."""
    from types import SimpleNamespace
    from test_models import make_checkpoint
    gpt2 = M.load(make_checkpoint(tmp_path / "gpt2", "gpt2", n_positions=64))
    settings = SimpleNamespace(generation=False, skip_bad=True, edits="e.json")
    q = data.Request(case_id=3, prompt="{} is " + "very " * 40 + "in", subject="Paris", target_new=" France",
                     target_true=" Spain", paraphrase_prompts=(), neighborhood_prompts=("Rome is in",),
                     neighborhood_answers=(" Italy" * 40,))
    assert L.fit_context(gpt2, [q], [["{}"]], settings) == ([q], [])            # 44, 44 tokens: fit (with the answer: 84)
    long = dataclasses.replace(q, neighborhood_answers=(" Italy" * 70,))
    _, (msg,) = L.fit_context(gpt2, [long], [["{}"]], settings)
    assert msg == "e.json: case_id 3: its neighbourhood prompt with its answer is 74 tokens, longer than the model's 64 positions (n_positions)"
    # generative efficacy decodes len(target) + 2 tokens after the rewrite prompt (feeding back all
    # but the last), each batch only as far as its own prompts need: a 63-token prompt with a
    # 1-token target was accepted (63 + 1) and failed scoring before editing ("a sequence of 65
    # tokens is longer than ..."); 62 tokens take 62 + 2 positions: accepted, and they run
    near = dataclasses.replace(q, prompt="{} is " + "very " * 60 + "in", neighborhood_answers=(" Italy",))
    assert len(gpt2.tokenizer.encode(near.rewrite_prompt())) == 63
    _, (msg,) = L.fit_context(gpt2, [near], [["{}"]], settings)
    assert msg == ("e.json: case_id 3: its rewrite or paraphrase prompt with the 2 tokens greedy decoding feeds "
                   "back (generative efficacy) is 65 tokens, longer than the model's 64 positions (n_positions)")
    with pytest.raises(ValueError, match="a sequence of 65 tokens is longer than"):
        L.ev.generative_eval(gpt2, [near])
    fits = dataclasses.replace(near, prompt="{} is " + "very " * 59 + "in")
    assert L.fit_context(gpt2, [fits], [["{}"]], settings) == ([fits], [])
    longer = dataclasses.replace(q, prompt="{} is in", target_new=" France" * 5)     # 7 tokens decoded after it
    assert len(L.ev.generative_eval(gpt2, [fits, longer])) == 2       # 62 + 2 positions (in one batch: 62 + 6)


def test_a_prompt_counts_in_its_longest_context_template_with_its_longer_target(tmp_path):
    """E4 runs each context template on the rewrite prompt followed by a target, and the rewrite
    and paraphrase prompts are scored with target_new and target_true after them: each input is
    counted at its full length (a GPT-2 of 64 positions; the bare prompt "Paris is in" is 3
    tokens), one token past the limit refused, naming it, and the limit itself accepted."""
    from types import SimpleNamespace
    from test_models import make_checkpoint
    gpt2 = M.load(make_checkpoint(tmp_path / "gpt2", "gpt2", n_positions=64))
    settings = SimpleNamespace(generation=False, skip_bad=True, edits="e.json")
    q = data.Request(case_id=3, prompt="{} is in", subject="Paris", target_new=" France", target_true=" Spain",
                     paraphrase_prompts=(), neighborhood_prompts=(), neighborhood_answers=())
    too_long = "e.json: case_id 3: its {} is 65 tokens, longer than the model's 64 positions (n_positions)"
    template = lambda n: [["{}"], ["very " * n + ". {}"]]               # n + 1 tokens before the prompt
    assert L.fit_context(gpt2, [q], template(59), settings) == ([q], [])                # 59 + 1 + 3 + 1
    assert L.fit_context(gpt2, [q], template(60), settings)[1] == [
        too_long.format("rewrite prompt in a context template, with its target")]
    true = lambda n: dataclasses.replace(q, target_true=" Spain" * n)                 # n tokens
    assert L.fit_context(gpt2, [true(61)], [["{}"]], settings) == ([true(61)], [])      # 3 + 61
    assert L.fit_context(gpt2, [true(62)], [["{}"]], settings)[1] == [
        too_long.format("rewrite prompt in a context template, with its target")]
    para = lambda n: dataclasses.replace(true(5), paraphrase_prompts=("Paris is " + "very " * n + "in",))
    assert L.fit_context(gpt2, [para(56)], [["{}"]], settings) == ([para(56)], [])     # 59 + 5
    assert L.fit_context(gpt2, [para(57)], [["{}"]], settings)[1] == [too_long.format("paraphrase prompt with its target")]


def test_a_generation_prompt_counts_with_the_tokens_its_batch_may_sample_after_it(tmp_path):
    """Fluency samples each batch until its shortest prompt's text is 100 tokens long, so a longer
    prompt beside it goes on by up to 100 tokens: a GPT-2 of 160 learned positions fails mid-run on
    an 80-token prompt beside a short one (counted as 100 tokens, it passed validation); it is
    now refused before any model work, naming the generation."""
    from types import SimpleNamespace
    from test_models import make_checkpoint
    gpt2 = M.load(make_checkpoint(tmp_path / "gpt2", "gpt2", n_positions=160))
    long = "word " * 79
    assert len(gpt2.tokenizer.encode(long)) == 80
    with pytest.raises(ValueError, match="160 learned positions"):
        L.ev.generate_texts(gpt2, ["A", long])
    q = data.Request(case_id=3, prompt="{} is in", subject="Paris", target_new=" France", target_true=" Spain",
                     paraphrase_prompts=(), neighborhood_prompts=(), neighborhood_answers=(), generation_prompts=(long,))
    _, (msg,) = L.fit_context(gpt2, [q], [["{}"]], SimpleNamespace(generation=True, skip_bad=True, edits="e.json"))
    assert msg == ("e.json: case_id 3: its generation prompt with up to 100 tokens sampled after it (fluency: a batch "
                   "samples for its shortest prompt) is 180 tokens, longer than the model's 160 positions (n_positions)")
    short = dataclasses.replace(q, generation_prompts=("word " * 59,))                # 60 + 100 tokens: fits
    assert L.fit_context(gpt2, [short], [["{}"]], SimpleNamespace(generation=True, skip_bad=True, edits="e.json"))[1] == []
    assert len(L.ev.generate_texts(gpt2, ["A", "word " * 59])) == 2


def test_without_model_or_edits_the_command_names_what_is_missing_and_the_quick_start(capsys):
    assert L.main([]) == 2
    assert capsys.readouterr().out.startswith("LyapLock: give --model and --edits (see --help). Quick start:")
    assert L.main(["--model", str(STORIES)]) == 2
    out = capsys.readouterr().out
    assert out.startswith("LyapLock: give --edits (see --help)") and out.endswith(f"  {L.QUICKSTART}\n")


def test_plan_gib_that_is_not_a_number_is_named(capsys):
    with pytest.raises(SystemExit):
        L.parse_args(["--plan", "--model", str(STORIES), "--plan-gib", "80GB"])
    assert "argument --plan-gib: '80GB': give each device's memory in GiB, a number, e.g. 80,80" in capsys.readouterr().err


@pytest.mark.parametrize("flags, companion", [(["--glue-n", "5"], ["--glue-dir", "fixtures/glue"]),
                                              (["--glue-protocol", "authors"], ["--glue-dir", "fixtures/glue"]),
                                              (["--plan-gib", "80"], ["--plan"]), (["--plan-host-gib", "5"], ["--plan"])])
def test_a_flag_whose_companion_is_missing_is_refused(flags, companion):
    """--glue-n without --glue-dir ran and recorded glue_n; --plan-gib and --plan-host-gib without
    --plan were ignored: refused by name, as other flags the run would not read."""
    edit = ["--model", str(STORIES), "--edits", str(FIX / "counterfact-rome.json"), *flags]
    with pytest.raises(ValueError, match=f"^{flags[0]} without {companion[0]}: it would be recorded, not used$"):
        L.check_settings(L.parse_args(edit))
    L.check_settings(L.parse_args(edit + companion))


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"),
                                   L.SafetensorError("Error while serializing: No space left on device")])
def test_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(tmp_path, capsys, monkeypatch, error):
    out, real = tmp_path / "run", M.save_file

    def fails_at_step_2(tensors, path, **k):      # checkpoints of steps 0, 1 pass; step 2's fails
        if "ckpt-000002" in path and path.endswith("weights.safetensors"):
            raise error
        return real(tensors, path, **k)
    monkeypatch.setattr(M, "save_file", fails_at_step_2)
    assert L.main(_cli(tmp_path, "--out", str(out), "--limit", "12", "--no-generation")) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: writing the checkpoint of step 2 to {out / 'ckpt-000002'} failed (")
    assert err.endswith("); the last checkpoint (ckpt-000001, step 1) is intact\n") and "No space left" in err
    assert sorted(p.name for p in out.glob("ckpt-*")) == ["ckpt-000001"]
    monkeypatch.undo()
    assert L.main(["--resume", str(out), "--stats-cache", str(tmp_path / "cache")]) == 0
    assert json.loads((out / "summary.json").read_text())["n_edits"] == 12


def test_a_full_disk_during_the_stream_says_how_to_continue(tmp_path, monkeypatch, capsys):
    out, real = tmp_path / "run", data.append_jsonl

    def full_at_step_2(path, entry):
        if entry.get("step") == 2:
            raise OSError(28, "No space left on device", str(path))
        return real(path, entry)
    monkeypatch.setattr(data, "append_jsonl", full_at_step_2)
    assert L.main(_cli(tmp_path, "--out", str(out), "--limit", "12", "--no-generation")) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device" in err
    assert err.endswith(f"; the run's latest checkpoint is intact: once that is fixed, continue with: "
                        f"{L.resume_command(out)}\n")
    monkeypatch.undo()
    assert L.main(["--resume", str(out), "--stats-cache", str(tmp_path / "cache")]) == 0
    assert [e["step"] for e in data.read_jsonl(out / "log.jsonl")[0]] == [0, 1, 2]


def test_log_lines_reach_the_disk_before_the_checkpoint_that_keeps_them(tmp_path, monkeypatch):
    """A power loss after a checkpoint must not lose the log lines of the steps it holds (a resume
    keeps them and edits on): each latest.json is written after log.jsonl was flushed with them."""
    out, synced, real_fsync, real_write = tmp_path / "run", {}, os.fsync, data.write_atomic

    def fsync(fd):
        path = Path(os.readlink(f"/proc/self/fd/{fd}"))
        if path.name == "log.jsonl":
            synced["log"] = len(path.read_text().splitlines())
        return real_fsync(fd)

    def write_atomic(path, text):
        if path.name == "latest.json":
            assert synced.get("log", 0) == json.loads(text)["step"]      # step k: k lines on the disk
        return real_write(path, text)
    monkeypatch.setattr(data.os, "fsync", fsync)
    monkeypatch.setattr(data, "write_atomic", write_atomic)
    assert L.main(_cli(tmp_path, "--out", str(out), "--limit", "12", "--no-generation")) == 0
    assert synced["log"] == 3


def test_checkpoints_come_every_k_steps_at_a_ctrl_c_and_at_the_end(tmp_path, monkeypatch):
    """--checkpoint-every 4 on 6 one-request steps, Ctrl-C during step 2: checkpoints before
    editing (0), after the interrupted step (2: the step finishes, saves, the run stops), after
    step 4 and at the end (6, no multiple of 4); general ability (--eval-every 2) before editing, after steps 2 and 4
    and at the end (once); the resumed run's log holds each step once and its --stop-below rule compares with the
    measurement before editing (not the latest before it, after step 2); ability at exactly the threshold
    goes on. (The suite's other runs checkpoint every step.)"""
    import signal
    out, saved, real_checkpoint, real_edit, calls = tmp_path / "run", [], L.Editor.checkpoint, L.edit_batch, []

    def checkpoint(editor, run_dir):
        saved.append(editor.state.step)
        return real_checkpoint(editor, run_dir)

    def ctrl_c_in_the_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)          # (DeferInterrupt: the step goes on)
        return real_edit(*a, **k)
    def collapsed(settings, before, now):
        compared.append(before["step"])
        return real_collapsed(settings, before, now)
    real_collapsed, compared = L.collapsed, []
    monkeypatch.setattr(L, "collapsed", collapsed)
    monkeypatch.setattr(L.Editor, "checkpoint", checkpoint)
    monkeypatch.setattr(L, "edit_batch", ctrl_c_in_the_second)
    argv = _cli(tmp_path, "--out", str(out), "--no-generation", "--checkpoint-every", "4", "--eval-every", "2",
                "--stop-below", "1e-9", limit=6, batch=1, tokens=3000)
    assert L.main(argv) == 130 and saved == [0, 2]
    assert L.main(["--resume", str(out)]) == 0 and saved == [0, 2, 4, 6]
    assert [e["step"] for e in data.read_jsonl(out / "log.jsonl")[0]] == [0, 1, 2, 3, 4, 5]
    assert [(a["step"], a["final"]) for a in data.read_jsonl(out / "ability.jsonl")[0]] == [
        (0, False), (2, False), (4, False), (6, True)]
    assert compared == [0, 0, 0, 0] and not (out / "stop.json").exists()   # the resumed run's rule: before editing
    perplexity = lambda p, step=0: dict(step=step, edits=step, perplexity=p)
    settings = L.Settings(model="m", stop_below=0.5)
    assert L.collapsed(settings, perplexity(2.0), perplexity(4.0, 1)) is None           # at the threshold: goes on
    assert L.collapsed(settings, perplexity(2.0), perplexity(4.5, 1))["threshold"] == 0.25    # below it: stops


def test_stop_below_ends_the_run_at_the_collapse_point_and_resume_keeps_it(tmp_path, capsys):
    """(--checkpoint-every 5 on 3 steps: the stop's own checkpoint is what a resume finds; without
    it a resume goes back to step 0 and edits again, to the same end.)"""
    out = tmp_path / "run"
    argv = _cli(tmp_path, "--out", str(out), "--limit", "12", "--no-generation", "--eval-every", "1",
                "--stop-below", "0.9999", "--checkpoint-every", "5")
    assert L.main(argv) == 0
    stop = json.loads((out / "stop.json").read_text())
    ability = [json.loads(l) for l in (out / "ability.jsonl").read_text().splitlines()]
    before = ability[0]["perplexity"]
    k = next(i for i, a in enumerate(ability) if a["perplexity"] > before / 0.9999)   # 1/ppl below 0.9999×
    assert 1 <= k < 3 and ability[k]["step"] == k and ability[k + 1]["final"]
    assert stop == dict(step=k, edits=4 * k, metric="1/perplexity", value=1 / ability[k]["perplexity"],
                        before=1 / before, threshold=0.9999 / before)
    assert "the collapse point" in capsys.readouterr().out
    assert json.loads((out / "latest.json").read_text())["step"] == k      # its checkpoint, at the stop
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_edits"] == 4 * k and len((out / "log.jsonl").read_text().splitlines()) == k
    # scored on the edited requests only, before and after (all 12 were, the unedited ones with them)
    assert summary["n_cases"] == summary["pre"]["n_cases"] == 4 * k
    assert len((out / "cases.jsonl").read_text().splitlines()) == 4 * k
    assert L.main(["--resume", str(out), "--stats-cache", str(tmp_path / "cache")]) == 0   # stays stopped
    assert json.loads((out / "summary.json").read_text())["n_edits"] == 4 * k
    capsys.readouterr()
    assert L.main(["--resume", str(out), "--stop-below", "0.5"]) == 1         # (was: "with --eval-every K")
    assert "the configuration differs: stop_below: 0.9999 in the run, 0.5 now" in capsys.readouterr().err
    for text in ("{}", '{"step": "x"}', "[1]", "garbage"):                     # (KeyError, TypeError)
        (out / "stop.json").write_text(text)
        assert L.main(["--resume", str(out)]) == 1
        assert f"{out / 'stop.json'}" in capsys.readouterr().err


def test_stop_below_counts_the_end_of_the_stream_as_an_evaluation_point(tmp_path, capsys):
    """Ability below the threshold at the last step: the run ends there anyway, but it went unrecorded
    (no stop.json; the report said only "finished")."""
    out = tmp_path / "run"
    assert L.main(_cli(tmp_path, "--out", str(out), "--limit", "8", "--batch-size", "4", "--no-generation",
                       "--eval-every", "1", "--stop-below", "0.9999")) == 0
    stop = json.loads((out / "stop.json").read_text())
    final = [json.loads(l) for l in (out / "ability.jsonl").read_text().splitlines()][-1]
    assert final["final"] and stop["step"] == 2 and stop["value"] == 1 / final["perplexity"]
    assert "at the end of the stream" in capsys.readouterr().out
    report = L.ev.report(out)
    assert "below --stop-below at the end of the stream at step 2 (8 edits)" in report
    assert "the stream ended at step 2 (8 edits), the collapse point" in report


def test_a_kill_right_after_the_stop_steps_checkpoint_still_stops_there(tmp_path, monkeypatch):
    """stop.json is written before the checkpoint of the collapse step: killed right after that
    checkpoint, the resumed run stays stopped (it went on past the collapse when the checkpoint came
    first and the kill fell between them)."""
    out = tmp_path / "run"
    monkeypatch.setattr(L, "collapsed", lambda settings, before, now: dict(
        step=now["step"], edits=now["edits"], metric="1/perplexity", value=0.0, before=1.0, threshold=0.5)
        if now["step"] == 2 else None)
    real = L.Editor.checkpoint

    def checkpoint_then_killed(editor, run_dir):
        real(editor, run_dir)
        if editor.state.step == 2:
            raise RuntimeError("killed")
    monkeypatch.setattr(L.Editor, "checkpoint", checkpoint_then_killed)
    with pytest.raises(RuntimeError, match="killed"):
        L.main(_cli(tmp_path, "--out", str(out), "--limit", "12", "--no-generation", "--eval-every", "1",
                    "--stop-below", "0.5"))
    monkeypatch.setattr(L.Editor, "checkpoint", real)
    assert L.main(["--resume", str(out), "--stats-cache", str(tmp_path / "cache")]) == 0
    assert json.loads((out / "summary.json").read_text())["n_edits"] == 8
    assert json.loads((out / "stop.json").read_text())["step"] == 2


def test_a_resumed_run_s_stop_rule_compares_with_the_ability_before_editing(tmp_path, monkeypatch):
    """After a resume, --stop-below still measures each evaluation point against the value before the
    first edit (ability.jsonl's first entry), not against the last one the run measured before it
    stopped: perplexity 10, 15 (step 1, then Ctrl-C), 25 at step 2: 1/25 < 0.5 × 1/10 stops there
    (against 1/15 it would not, and the run would edit on to the end)."""
    perplexity = {0: 10.0, 1: 15.0, 2: 25.0, 3: 25.0, 4: 25.0}
    monkeypatch.setattr(L, "general_ability", lambda editor, settings, final=False: dict(
        step=editor.state.step, edits=editor.state.n_edits, final=final, perplexity=perplexity[editor.state.step]))
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        interrupt_after_one_step(patch)
        assert L.main(_cli(tmp_path, "--out", str(out), "--batch-size", "2", "--no-generation",
                           "--eval-every", "1", "--stop-below", "0.5")) == 130
    assert [a["step"] for a in data.read_jsonl(out / "ability.jsonl")[0]] == [0, 1]
    assert L.main(["--resume", str(out)]) == 0
    stop = json.loads((out / "stop.json").read_text())
    assert (stop["step"], stop["edits"], stop["before"]) == (2, 4, 0.1) and "end" not in stop
    assert json.loads((out / "summary.json").read_text())["n_edits"] == 4


def test_a_resume_whose_edits_file_changed_is_refused(tmp_path, capsys):
    """The run's edits file (or its model's config.json) changed on disk since the run began: the
    resume would edit another stream against the scores before editing; refused, naming the file."""
    edits = tmp_path / "edits.json"
    records = json.loads((FIX / "counterfact-rome.json").read_text())
    edits.write_text(json.dumps(records[:8]))
    out, model = tmp_path / "run", tmp_path / "model"
    shutil.copytree(STORIES, model)
    assert L.main(_cli(tmp_path, "--out", str(out), "--edits", str(edits), "--model", str(model), "--no-generation",
                       limit=None)) == 0
    edits.write_text(json.dumps(records[8:16]))
    assert L.main(["--resume", str(out), "--stats-cache", str(tmp_path / "cache")]) == 1
    err = capsys.readouterr().err
    assert f"the run's edits file {edits.resolve()} is missing or has changed since the run began" in err
    edits.unlink()
    assert L.main(["--resume", str(out)]) == 1 and "is missing or has changed" in capsys.readouterr().err
    edits.write_text(json.dumps(records[:8]))            # the edits back; the model's config.json changed
    config = model / "config.json"
    config.write_text(config.read_text().replace("1e-05", "1e-06"))
    assert L.main(["--resume", str(out)]) == 1
    assert (f"the run's model's config.json {(model / 'config.json').resolve()} is missing or has changed since the "
            "run began") in capsys.readouterr().err


def test_a_resume_whose_weights_or_statistics_source_changed_is_refused_naming_them(tmp_path, capsys):
    """What the run read beyond its settings changed on disk between the interruption and the
    resume — the weights (another model of the same shape copied over them), the statistics
    corpus (C recomputed from it) — : the resume would go on with other data
    (was: silently, to other results); refused, naming each; put back, it resumes. Its context
    templates unreadable: named."""
    model, corpus = tmp_path / "model", tmp_path / "corpus.txt"
    shutil.copytree(STORIES, model)
    shutil.copy(L.DEFAULT_CORPUS, corpus)
    out = tmp_path / "run"
    assert L.main(_cli(tmp_path, "--out", str(out), "--model", str(model), "--stats-corpus", str(corpus),
                       "--limit", "4", "--no-generation")) == 0
    assert {*json.loads((out / "inputs.json").read_text())} == {
        "model weights through layer 2", "tokenizer", f"statistics corpus {corpus}", f"held-out text {short_heldout(tmp_path)}"}
    weights, text = (model / "model.safetensors").read_bytes(), corpus.read_bytes()
    other = load_file(model / "model.safetensors")
    other["model.layers.0.mlp.down_proj.weight"] += 1e-3
    save_file(other, model / "model.safetensors", metadata={"format": "pt"})
    corpus.write_bytes(b"\n".join(reversed(text.splitlines())))
    assert L.main(["--resume", str(out)]) == 1
    assert capsys.readouterr().err == (f"error: --resume {out}: the run's model weights through layer 2; statistics "
                                       f"corpus {corpus} changed since the run began (its sha256 differs): the run "
                                       "would go on with other data; put it back or start a new run\n")
    (model / "model.safetensors").write_bytes(weights)
    corpus.write_bytes(text)
    last = load_file(model / "model.safetensors")            # the last edit layer's block alone (not its edit
    last["model.layers.2.self_attn.q_proj.weight"] += 1e-3      # weight, which the checkpoint's identity holds)
    save_file(last, model / "model.safetensors", metadata={"format": "pt"})
    assert L.main(["--resume", str(out)]) == 1
    assert capsys.readouterr().err.startswith(f"error: --resume {out}: the run's model weights through layer 2 changed")
    (model / "model.safetensors").write_bytes(weights)
    templates = (out / "templates.json").read_text()
    for bad in ('[["{}"], ["The cat', '[["The cat"]]', '[["The cat. {}"], ["{}"]]'):   # cut short; not a template
        #   (was: a bare JSON error); the bare prompt not first (was: E4-E6 read a prefixed prompt's row)
        (out / "templates.json").write_text(bad)
        assert L.main(["--resume", str(out)]) == 1
        assert capsys.readouterr().err.startswith(f"error: --resume {out}: {out / 'templates.json'}")
    (out / "templates.json").write_text(templates)
    assert L.main(["--resume", str(out)]) == 0


def test_out_of_gpu_memory_outside_a_step_is_one_line(tmp_path, capsys, monkeypatch):
    """torch.cuda.OutOfMemoryError is a RuntimeError, not a MemoryError: where no stage names the
    phase (the context templates here) it was a traceback."""
    monkeypatch.setattr(L, "context_templates", lambda *a, **k: (_ for _ in ()).throw(
        torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")))
    assert L.main(_cli(tmp_path, "--out", str(tmp_path / "run"))) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: out of GPU memory (loading, the context templates or the scoring): use --dtype "
                          "bfloat16") and err.count("\n") == 1


def test_cli_refuses_before_any_work_what_would_fail_later(tmp_path, capsys, monkeypatch):
    """Each a one-line error before the model loads and no run directory: ROME on two layers (it
    failed at the first step, after the scoring and checkpoint 0), a malformed task file in
    --glue-dir (a TypeError after the first scoring), an empty --heldout, and --resume on a model
    checkpoint's directory (a KeyError: its config.json has no run settings)."""
    monkeypatch.setattr(L.M, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    glue = tmp_path / "glue"
    glue.mkdir()
    for task in ("sst2", "mrpc", "cola", "rte", "nli", "mmlu"):
        (glue / f"{task}.json").write_text((FIX / "glue" / f"{task}.json").read_text())
    (glue / "mrpc.json").write_text('{"a": 1}')
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    for flags, message in [(["--method", "rome", "--layers", "1,2"], "layers [1, 2]: ROME edits one layer (--layers L)"),
                           (["--glue-dir", str(glue)], f"{glue / 'mrpc.json'}: expected a JSON list of items"),
                           (["--heldout", str(empty)], f"{empty}: corpus has no text")]:
        assert L.main(_cli(tmp_path, "--out", str(tmp_path / "run"), *flags)) == 1, flags
        err = capsys.readouterr().err
        assert err.startswith(f"error: {message}") and err.count("\n") == 1, (flags, err)
        assert not (tmp_path / "run").exists()
    assert L.main(["--resume", str(STORIES)]) == 1
    assert capsys.readouterr().err == (f"error: --resume {STORIES}: not a run directory (its config.json holds no "
                                       "run settings: model, edits, hparams)\n")
    (tmp_path / "latin1").mkdir()
    (tmp_path / "latin1" / "config.json").write_bytes(b'{"model": "caf\xe9"}')    # (was the codec's error alone)
    assert L.main(["--resume", str(tmp_path / "latin1")]) == 1
    assert capsys.readouterr().err.startswith(f"error: --resume {tmp_path / 'latin1'}: not a run directory (config.json: "
                                              "'utf-8' codec can't decode byte 0xe9")


def test_a_path_flag_given_as_an_empty_string_is_refused_naming_it(tmp_path, capsys, monkeypatch):
    """'' is no path: --resume '' (with --model and --edits) started a new run, its resume ignored,
    --stats '' read the working directory as the statistics' and --heldout '' named '.' in its
    error; each is a one-line error naming the flag, before the model loads."""
    monkeypatch.setattr(L.M, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.chdir(tmp_path)                         # (a new run without --out: runs/NNN here)
    for flag, kind in (("--resume", "directory"), ("--stats", "file or directory"), ("--heldout", "file"),
                       ("--stats-corpus", "file"), ("--glue-dir", "directory"), ("--snippets", "file"),
                       ("--save-model", "directory")):    # (each path flag but --model and --edits: asked for)
        extra = () if flag == "--resume" else ("--out", str(tmp_path / "run"))
        assert L.main(_cli(tmp_path, *extra, flag, "", tokens=0)) == 1, flag
        assert capsys.readouterr().err == f"error: {flag} '': give a {kind}\n"
        assert not (tmp_path / "run").exists() and not (tmp_path / "runs").exists()


def test_a_bad_statistics_source_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    """A --stats-corpus that is a directory or holds no text, and a --stats file that is no
    statistics file or a directory without the layers' files, were found only after the weights
    loaded (minutes on a large checkpoint; --plan checked --stats, the run did not): now before,
    and before a run directory is made."""
    monkeypatch.setattr(L.M, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    folder = tmp_path / "folder"
    folder.mkdir()
    for flags, message in [(["--stats-corpus", str(folder)], f"{folder}: cannot read corpus as UTF-8 text"),
                           (["--stats-corpus", str(empty)], f"{empty}: corpus has no text"),
                           (["--stats", str(empty)], f"{empty}: not a readable statistics file"),
                           (["--stats", str(folder)], f"--stats {folder}: no statistics for layer")]:
        assert L.main(_cli(tmp_path, "--out", str(tmp_path / "run"), *flags, tokens=0)) == 1, flags
        err = capsys.readouterr().err
        assert err.startswith(f"error: {message}") and err.count("\n") == 1, (flags, err)
        assert not (tmp_path / "run").exists()


def test_a_stats_cache_inside_save_model_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    """The statistics cached into --save-model (or a folder of it) made it non-empty, so the save
    at the end of the run was refused after all the editing: both are named at the start."""
    monkeypatch.setattr(L.M, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    save = tmp_path / "edited"
    for cache in (save, save / "cache"):
        assert L.main(_cli(tmp_path, "--out", str(tmp_path / "run"), "--save-model", str(save),
                           "--stats-cache", str(cache))) == 1
        assert capsys.readouterr().err == (f"error: --stats-cache {cache} is inside --save-model {save}: keep the "
                                           "cache apart from the edited model's directory\n")
        assert not (tmp_path / "run").exists() and not save.exists()


def test_general_ability_score_for_the_stop_rule():
    general = {"sst2": {"f1": 0.6}, "cola": {"mcc": 0.2, "f1": 0.9}, "mmlu": {"accuracy": 0.4, "f1": 0.1}}
    assert L.ability_score({"perplexity": 8.0, "general": general}) == ("mean zero-shot score", pytest.approx(0.4))
    assert L.ability_score({"general": {"sst2": {"f1": 0.6}, "cola": {"mcc": 0.2}}})[1] == pytest.approx(0.4)  # of 2
    assert L.ability_score({"perplexity": 8.0}) == ("1/perplexity", 0.125)
    settings = L.Settings(model="m", edits="e", hparams=L.HParams(), stop_below=0.5)
    before = {"step": 0, "edits": 0, "perplexity": 10.0}
    assert L.collapsed(settings, before, {"step": 3, "edits": 30, "perplexity": 19.0}) is None
    assert L.collapsed(settings, before, {"step": 3, "edits": 30, "perplexity": 21.0})["edits"] == 30
    with pytest.raises(ValueError, match="before editing is 0: the rule needs a positive value|needs a positive"):
        L.collapsed(settings, {"general": {"cola": {"mcc": 0.0}}}, {"general": {"cola": {"mcc": 0.0}}})


def test_ability_exactly_at_the_stop_below_threshold_has_not_collapsed():
    """--stop-below F stops once ability falls *below* F × its value before editing: a value equal to
    the threshold goes on (1/perplexity 0.25 against 0.5 × 0.5, exact in binary), one just under stops."""
    settings = L.Settings(model="m", edits="e", hparams=L.HParams(), stop_below=0.5)
    before = {"step": 0, "edits": 0, "perplexity": 2.0}
    assert L.collapsed(settings, before, {"step": 1, "edits": 4, "perplexity": 4.0}) is None
    assert L.collapsed(settings, before, {"step": 1, "edits": 4, "perplexity": 4.5})["threshold"] == 0.25


def test_a_value_before_editing_the_stop_rule_cannot_use_is_refused_before_the_first_step(tmp_path, capsys,
                                                                                           monkeypatch):
    """A model whose ability before editing is 0 (zero-shot scores of 0; a perplexity of inf) gave
    --stop-below's error only at the first evaluation point, after --eval-every steps of editing
    (and again on each resume); then, in a run directory it left that no resume could use."""
    monkeypatch.setattr(L, "general_ability", lambda editor, settings, final=False: dict(
        step=editor.state.step, edits=editor.state.n_edits, final=final, perplexity=math.inf))
    monkeypatch.setattr(L, "edit_batch", lambda *a, **k: pytest.fail("a step was edited"))
    assert L.main(_cli(tmp_path, "--out", str(tmp_path / "run"), "--eval-every", "1", "--stop-below", "0.5")) == 1
    assert capsys.readouterr().err.splitlines()[-1] == ("error: --stop-below: the 1/perplexity before editing is 0; "
                                                        "the rule needs a positive value")
    assert not (tmp_path / "run").exists()        # (was left behind, not empty and never resumable)
    monkeypatch.setattr(L, "score_cases", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    monkeypatch.setattr(L, "general_ability", lambda editor, settings, final=False: dict(
        step=editor.state.step, edits=editor.state.n_edits, final=final, perplexity=1.0))
    assert L.main(_cli(tmp_path, "--out", str(tmp_path / "run"), "--eval-every", "1", "--stop-below", "0.5")) == 130
    assert not (tmp_path / "run" / "latest.json").exists()       # stopped before its checkpoint 0: resumed,
    monkeypatch.setattr(L, "general_ability", lambda editor, settings, final=False: dict(  # it starts anew
        step=editor.state.step, edits=editor.state.n_edits, final=final, perplexity=math.inf))
    monkeypatch.setattr(L, "score_cases", lambda *a, **k: [])
    assert L.main(["--resume", str(tmp_path / "run")]) == 1 and not (tmp_path / "run" / "latest.json").exists()
    assert capsys.readouterr().err.splitlines()[-1].endswith("before editing is 0; the rule needs a positive value")


def test_readme_python_api_example_runs(tmp_path, capsys, monkeypatch):
    text = (HERE / "README.md").read_text()
    code = text.split("## Python API", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(HERE)
    scope = {}
    exec(code.replace('"runs/', f'"{tmp_path}/'), scope)
    first, z_and_log, last = capsys.readouterr().out.splitlines()
    assert float(first) == 0.0 and float(last) == 70.0 and z_and_log.startswith("1.0 {'pl': ")
    original, edited = M.load(FIX / "factmodel-ci"), M.load(tmp_path / "edited-factmodel")
    assert not torch.equal(edited.edit_weight(2), original.edit_weight(2))
    editor = scope["editor"]            # reset, then restore: back where the two steps left off
    assert editor.state.step == 2 and editor.state.layers[2].D_base is not None
    assert all(torch.equal(editor.model.edit_weight(l), edited.edit_weight(l)) for l in (1, 2))
    assert all(torch.equal(editor.W0[l], original.edit_weight(l)) for l in (1, 2))
    editor.reset()                      # the original weights, a fresh state
    assert all(torch.equal(editor.model.edit_weight(l), original.edit_weight(l)) for l in (1, 2))
    assert editor.state.step == 0 and editor.state.layers[2].D_base is None


def test_editor_refuses_what_is_not_a_request_by_name(tmp_path):
    m = M.load(STORIES)
    C = S.load_or_collect_stats(m, STORIES, L.DEFAULT_CORPUS, 2000, (1, 2), tmp_path, log=lambda *a, **k: None)
    editor = L.Editor(m, L.HParams(layers=(1, 2)), C, [["{}"]])
    with pytest.raises(ValueError, match="edit: no requests"):
        editor.edit([])
    with pytest.raises(ValueError, match="evaluate: no requests"):      # (it returned {'n_cases': 0})
        editor.evaluate([])
    record = json.loads((FIX / "counterfact-rome.json").read_text())[0]
    with pytest.raises(TypeError, match=r"a \(requests, skipped\) pair, as data.load_requests and "
                                        r"data.requests_from return; pass its first item"):
        editor.edit(data.requests_from([record]))
    for call in (editor.edit, editor.evaluate):
        with pytest.raises(TypeError, match=r"request 0 is a dict, not a data.Request: .*data.requests_from"):
            call([record])
    long = dataclasses.replace(data.requests_from([record])[0][0], paraphrase_prompts=("Once upon a time " * 150,))
    for name in ("edit", "evaluate"):            # as the command's validation, before any work
        with pytest.raises(ValueError, match=rf"^{name}: case_id {long.case_id}: its rewrite or paraphrase prompt "
                                             r"with the \d+ tokens greedy decoding feeds back .generative efficacy. is "
                                             r"\d+ tokens, longer than the model's 512 positions"):
            getattr(editor, name)([long])
    prompt = "Once upon a time " * 105                                    # 421 tokens: with 100 sampled, 521
    talks = dataclasses.replace(data.requests_from([record])[0][0], generation_prompts=(prompt,))
    with pytest.raises(ValueError, match=r"^evaluate: case_id \d+: its generation prompt with up to 100 tokens "
                                         r"sampled after it .* is 521 tokens, longer than the model's 512 positions"):
        editor.evaluate([talks], generation=True)
    assert editor.fitting([talks], "evaluate") == [talks]                 # without generation it fits
    one = data.requests_from([record])[0][0]
    for given, message in ((one, r"got Request \(one request: \[request\]\)"), (None, "got NoneType"),
                           (record, "got dict")):
        with pytest.raises(TypeError, match=f"requests: a list of data.Request is needed, {message}"):
            editor.edit(given)
    with pytest.raises(ValueError, match=r"seed 2361183241434822606848: give a whole number from -2\*\*63"):
        editor.evaluate([one], seed=2 ** 71)              # (torch's 'Overflow when unpacking long long')
    hp = editor.hparams
    for change, message in ((dict(alpha=0.0), "hyper-parameter alpha must be positive"),  # (a ZeroDivisionError)
                            (dict(layers=(1, 2, 3)), r"layers \[1, 2, 3\]\) are not the method and layers"),  # (KeyError)
                            (dict(method="alphaedit"), r"hparams \(alphaedit, .* are not the method and layers .*\(lyaplock")):
        editor.hparams = dataclasses.replace(hp, **change)
        with pytest.raises(ValueError, match=message):
            editor.edit([one])
    editor.hparams = hp
    assert editor.state.step == 0
    with pytest.raises(ValueError, match="hparams: an HParams is needed .* got dict"):
        L.Editor(m, dict(layers=(1, 2)), C, [["{}"]])
    with pytest.raises(ValueError, match="seed 1180591620717411303424: give a whole number"):
        L.Editor.open(STORIES, seed=2 ** 70)             # before the model loads
    float32_sum = {l: c + 1e-5 * float(c.abs().max()) * torch.ones_like(c).triu(1) for l, c in C.items()}
    L.Editor(m, hp, float32_sum, [["{}"]])              # rounding of a float32 sum: 1e-5 of the largest, accepted
    editor.evaluate([one], seed=np.int64(2))             # numpy's ints are whole numbers
    skewed = {l: c.clone() for l, c in C.items()}
    skewed[2][0, 1] += 100.0                         # (PL then grew to 1e11 without a word)
    for bad, message in ((skewed, r"C\[2\] is not symmetric"),
                         ({l: c.clone().requires_grad_() for l, c in C.items()}, r"C\[1\] is a tensor autograd tracks"),
                         ({l: c.to("meta") for l, c in C.items()}, r"C\[1\] is on the meta device")):
        with pytest.raises(ValueError, match=message):
            L.Editor(m, hp, bad, [["{}"]])
    with pytest.raises(ValueError, match="save: model_path .* holds another model than this Editor's"):
        L.Editor(m, hp, C, [["{}"]], model_path=FIX / "factmodel-ci").save(tmp_path / "mixed")


def test_a_step_that_fails_half_way_must_be_restored_before_the_next(tmp_path, monkeypatch):
    """A step that fails after its first layer changed weights and state (here layer 2's solve)
    leaves the Editor half-way through it: the next edit is refused until reset or restore (it
    applied layer 1 twice), and so are a checkpoint and a save (they recorded the half step as
    whole); a step that fails before writing anything leaves it usable."""
    m = M.load(STORIES)
    C = S.load_or_collect_stats(m, STORIES, L.DEFAULT_CORPUS, 2000, (1, 2), tmp_path, log=lambda *a, **k: None)
    requests, _ = data.load_requests(FIX / "counterfact-rome.json", limit=4)
    editor = L.Editor(m, L.HParams(layers=(1, 2), lam=15.0, v_num_grad_steps=3), C, [["{}"]])
    editor.edit(requests[:2])
    editor.checkpoint(tmp_path / "run")
    real, calls = L.step_layer, []

    def second_fails(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("system matrix is not positive definite")
        return real(*args, **kw)
    monkeypatch.setattr(L, "step_layer", second_fails)
    with pytest.raises(ValueError, match="step 1, layer 2"):
        editor.edit(requests[2:])
    monkeypatch.setattr(L, "step_layer", real)
    editor.model_path = STORIES
    for call, do in (("edit", lambda: editor.edit(requests[2:])), ("checkpoint", lambda: editor.checkpoint(tmp_path / "run")),
                     ("save", lambda: editor.save(tmp_path / "saved"))):   # (the last two recorded it as whole)
        with pytest.raises(ValueError, match=rf"{call}: step 1 failed after it changed some layers' weights or state, so "
                                             r"they are no step's; restore\(run_dir\) from a checkpoint or reset\(\) first"):
            do()
    assert not (tmp_path / "saved").exists() and json.loads((tmp_path / "run" / "latest.json").read_text())["step"] == 1
    editor.restore(tmp_path / "run")
    assert editor.edit(requests[2:])["step"] == 1
    monkeypatch.setattr(L, "compute_z", lambda *a, **k: (_ for _ in ()).throw(FloatingPointError("early")))
    with pytest.raises(FloatingPointError, match="early"):          # before any write: still usable
        editor.edit(requests[:1])
    assert not editor.state.partial


def test_restore_refuses_an_editor_with_other_settings_templates_or_original_weights(tmp_path):
    """A checkpoint continues to the same bits only on an Editor built as its own was: one with
    another λ, other context templates, or built on an edited model (PL measured from the wrong
    W0) was accepted and went on silently; refused, naming what differs. Alike, it restores."""
    m = M.load(STORIES)
    C = S.load_or_collect_stats(m, STORIES, L.DEFAULT_CORPUS, 2000, (1, 2), tmp_path, log=lambda *a, **k: None)
    requests, _ = data.load_requests(FIX / "counterfact-rome.json", limit=4)
    hp = L.HParams(layers=(1, 2), lam=15.0, v_num_grad_steps=3)
    editor = L.Editor(m, hp, C, [["{}"]], model_path=STORIES)
    editor.edit(requests[:2])
    editor.checkpoint(tmp_path / "run")
    editor.save(tmp_path / "edited")
    others = [(M.load(STORIES), dataclasses.replace(hp, lam=16.0), [["{}"]], "lam 15.0 there, 16.0 here"),
              (M.load(STORIES), hp, [["{}"], ["A. {}"]], "other context templates"),
              (M.load(tmp_path / "edited"), hp, [["{}"]], "other original weights W0"),
              (M.load(STORIES, dtype="bfloat16"), hp, [["{}"]], r"weights in float32 there, bfloat16 here")]
    others.append((M.load(STORIES), hp, [["{}"]], r"other statistics C .another corpus or token count"))
    for (model, hparams, templates, message), stats in zip(others, [C] * 4 + [{l: c * 1.01 for l, c in C.items()}]):
        other = L.Editor(model, hparams, stats, templates)
        with pytest.raises(ValueError, match=f"ckpt-000001: written by an Editor with other settings: .*{message}"):
            other.restore(tmp_path / "run")
        assert other.state.step == 0 and all(torch.equal(model.edit_weight(l), W) for l, W in other.W0.items())
    alike = L.Editor(M.load(STORIES), dataclasses.replace(hp, batch_size=7), {l: c * (1 + 1e-7) for l, c in C.items()},
                     [["{}"]])                          # (another batch_size: an Editor's step is each edit())
    alike.restore(tmp_path / "run")                     # (C collected again elsewhere: its last digits)
    assert alike.state.step == 1 and all(torch.equal(alike.model.edit_weight(l), editor.model.edit_weight(l))
                                         for l in hp.layers)
    other = L.Editor(M.load(STORIES), dataclasses.replace(hp, method="memit"), C, [["{}"]])
    with pytest.raises(ValueError, match=r"checkpoint: .*method 'lyaplock' there, 'memit' here.*; it would be "
                                         "replaced: choose another directory"):
        other.checkpoint(tmp_path / "run")                 # (it removed the run's checkpoint)
    (tmp_path / "run" / "ckpt-mine").mkdir()                # a directory of the user's: never removed
    alike.edit(requests[2:])
    alike.checkpoint(tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run").glob("ckpt-*")) == ["ckpt-000002", "ckpt-mine"]


def test_evaluate_refuses_generation_without_prompts_and_snippets_of_another_shape():
    """Both scored nothing, silently (zsRE has no generation prompts: no fluency; snippets as
    {id: text} gave consistency 0)."""
    editor = L.Editor(M.load(STORIES), L.HParams(layers=(1, 2)), {l: torch.eye(172, dtype=torch.float64) for l in (1, 2)},
                      [["{}"]])
    zsre, _ = data.load_requests(FIX / "zsre-mend.json", limit=2)
    with pytest.raises(ValueError, match=r"evaluate\(generation=True\): none of these requests has generation prompts"):
        editor.evaluate(zsre, generation=True)
    counterfact, _ = data.load_requests(FIX / "counterfact-rome.json", limit=1)
    with pytest.raises(ValueError, match=r"snippets: give \{case_id: \[text, ...\]\}"):
        editor.evaluate(counterfact, generation=True, snippets={counterfact[0].case_id: "a text"})
    one = [dataclasses.replace(counterfact[0], generation_prompts=counterfact[0].generation_prompts[:1])]
    snippets = {str(one[0].case_id): [f"{one[0].target_new} is often said of {one[0].subject}."]}
    want = L.ev.summarize([c | g | t for c, g, t in zip(          # taken: the means of eval.py's scores,
        L.ev.edit_eval(editor.model, one), L.ev.generative_eval(editor.model, one),    # its seed and snippets
        L.ev.generation_eval(editor.model, one, snippets, seed=3))])
    assert editor.evaluate(one, generation=True, snippets=snippets, seed=3) == want
    assert {"fluency", "consistency"} <= set(want)


@pytest.mark.parametrize("change,message", [
    (dict(lam=-1.0), "hyper-parameter lam must be positive, got -1.0"),
    (dict(alpha=0.0), "hyper-parameter alpha must be positive, got 0.0"),
    (dict(v_num_grad_steps=0), "hyper-parameter v_num_grad_steps must be at least 1, got 0"),
    (dict(kl_factor=-0.5), "hyper-parameter kl_factor must be at least 0, got -0.5"),
    (dict(V=float("inf")), r"hyper-parameter V must be positive, got inf \(not a finite number\)"),
    (dict(layers=(2, 1)), r"layers \[2, 1\]: give increasing layer numbers"),
    (dict(layers=(1, 5)), r"layers \[1, 5\]: give increasing layer numbers in 0..4"),
    (dict(layers=()), r"no edit layers.*give them \(e.g. --layers 0,1\)"),
    (dict(method="rome", layers=(1, 2)), r"layers \[1, 2\]: ROME edits one layer"),
    (dict(layers=(1, 4)), r"layers \[1, 4\]: the last edit layer is where the target values are found .* top block \(4\)"),
    (dict(method="rome", layers=(4,)), r"layers \[4\]: the last edit layer .* top block \(4\)"),   # it edited nothing
    (dict(layers=2), r"layers 2: give the edit layers as a tuple of layer numbers"),          # a TypeError
    (dict(lam="30"), r"hyper-parameter lam must be a number \(a Python int or float\), got '30'"),   # a TypeError
    (dict(lam=torch.tensor(30.0)), r"hyper-parameter lam must be a number .*, got tensor"),            # accepted
    (dict(v_num_grad_steps=2.5), r"hyper-parameter v_num_grad_steps must be a whole number \(a Python int\), got 2.5"),
    (dict(method="rome", layers=(1,), mom2_adjustment="no"), "mom2_adjustment must be True or False, got 'no'"),
    (dict(lam=True), r"hyper-parameter lam must be a number \(a Python int or float\), got True"),
    (dict(v_num_grad_steps=True), r"hyper-parameter v_num_grad_steps must be a whole number \(a Python int\), got True"),
    (dict(layers=(False, True)), r"layers \[False, True\]: give increasing layer numbers"),
    (dict(layers=(-1, 2)), r"layers \[-1, 2\]: give increasing layer numbers"),
    (dict(layers=(1, 1)), r"layers \[1, 1\]: give increasing layer numbers"),
    (dict(v_lr=0.0), "hyper-parameter v_lr must be positive, got 0.0"),
    (dict(method="rome", layers=(1,), mom2_adjustment=1), "hyper-parameter mom2_adjustment must be True or False, got 1"),
    (dict(superseded="delete"), "superseded 'delete': choose 'keep' or 'remove'"),
])
def test_the_api_refuses_hyper_parameters_out_of_range_before_the_statistics(tmp_path, monkeypatch, change, message):
    """Editor.open's overrides and an Editor built from parts: a ValueError naming the field
    (a negative λ was a failed Cholesky, α = 0 a ZeroDivisionError, layers 5 an IndexError in
    the statistics, decreasing layers accepted and edited wrongly). A bool is no number or layer,
    layer -1 would edit the top block, a repeated layer twice, v_lr 0 no target value;
    mom2_adjustment and superseded take only their own values."""
    monkeypatch.setattr(L.stats, "load_or_collect_stats", lambda *a, **k: pytest.fail("statistics were computed"))
    with pytest.raises(ValueError, match=message):
        L.Editor.open(STORIES, stats_cache=tmp_path, **change)
    m = M.load(STORIES)
    with pytest.raises(ValueError, match=message):
        L.Editor(m, L.replace(L.HParams(layers=(1, 2)), **change), {}, [["{}"]])


def test_with_overrides_names_an_unknown_hyper_parameter():
    with pytest.raises(ValueError, match=r"unknown hyper-parameter\(s\) lamda; known: "):
        L.with_overrides(L.HParams(), lamda=1.0)


def test_a_config_json_without_the_edits_is_no_run_directory(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model": str(STORIES), "hparams": {}}))
    with pytest.raises(ValueError, match=r"not a run directory \(its config.json holds no run settings"):
        L.read_run_config(tmp_path)


def test_a_resume_s_save_model_inside_its_run_directory_is_refused(tmp_path):
    (tmp_path / "run").mkdir()
    args = L.parse_args(["--resume", str(tmp_path / "run"), "--save-model", str(tmp_path / "run" / "model")])
    with pytest.raises(ValueError, match="one holds the other"):
        L.check_outputs(args, STORIES)


def test_parse_layers_refuses_a_negative_layer():
    """Layer -1 (typed --layers=-1,2: after a space argparse takes -1,2 for a flag) is refused, not
    read as the top block."""
    with pytest.raises(ValueError, match=r"--layers '-1,2': give increasing layer numbers in 0..4"):
        L.parse_layers("-1,2", 5)


def test_asymmetry_is_the_largest_skew_over_the_largest_magnitude_block_by_block():
    """max |C − Cᵀ| / max |C| as computed whole, with blocks of 2 rows on 5×5 (a skew in a corner
    no diagonal block holds), also where the largest magnitude is a negative entry."""
    sym = torch.tensor([[float(min(i, j) + 1) for j in range(5)] for i in range(5)])
    for c in (sym, -4 * sym):
        c = c.clone()
        c[0, 4] += 0.5
        want = float((c - c.T).abs().max()) / float(c.abs().max())
        assert L.asymmetry(c, rows=2) == L.asymmetry(c) == pytest.approx(want, rel=1e-12) and want > 0


def test_the_api_takes_numpy_s_numbers_as_python_s():
    """Overrides of numpy's types (np.int64 layers and steps, a np.float32 λ): as Python's, so a
    checkpoint's identity can be written (a TypeError) and the steps count (np.int64 crashed in
    the target values); an Editor built from parts is given Python's or told so."""
    import numpy as np
    hp = L.with_overrides(L.HParams(), layers=tuple(np.array([1, 2])), lam=np.float32(15), v_num_grad_steps=np.int64(3))
    assert hp.layers == (1, 2) and (hp.lam, hp.v_num_grad_steps) == (15.0, 3)
    assert {type(v) for v in (*hp.layers, hp.v_num_grad_steps)} == {int} and type(hp.lam) is float
    with pytest.raises(ValueError, match=r"v_num_grad_steps must be a whole number \(a Python int\), got "):
        L.check_hparams(L.replace(L.HParams(), v_num_grad_steps=np.int64(3)))
    with pytest.raises(ValueError, match=r"layers array\(\[1, 2\]\): give the edit layers as a tuple"):
        L.with_overrides(L.HParams(), layers=np.array([1, 2]))             # an array is not made a scalar


def test_an_editor_from_parts_or_open_refuses_bad_statistics_templates_and_settings_by_name(tmp_path):
    """Each was a traceback from inside torch after the target values (a KeyError, a size
    mismatch, bincount on floats), a misleading message, or silently wrong (stats_tokens -5
    took 251 tokens); AlphaEdit without a null space failed at the first edit, locking the
    Editor. --device cpu:0 was blamed on the checkpoint file."""
    m = M.load(STORIES, "cpu:0")                                   # (was: "unreadable safetensors file")
    hp = L.HParams(layers=(1, 2))
    C = {1: torch.eye(172, dtype=torch.float64) * 0.05, 2: torch.eye(172, dtype=torch.float64) * 0.05}
    bad = [(dict(C={1: C[1]}), "C: no statistics for edit layer 2"),
           (dict(C={1: C[1], 2: torch.eye(10)}), r"C\[2\] is float32 \(10, 10\); a float \(172, 172\) matrix"),
           (dict(C={1: C[1], 2: C[2].numpy()}), r"C\[2\] is a ndarray; give torch tensors"),
           (dict(C={1: C[1], 2: C[2].clone().fill_diagonal_(float("nan"))}), r"C\[2\] holds values that are not finite"),
           (dict(templates=[]), "templates: not context templates"),
           (dict(templates=["{}", "The cat. {}"]), "templates: not context templates"),
           (dict(templates=[["{}"], ["The {} cat. {}"]]), "templates: not context templates"),   # two {}
           (dict(templates=[["The cat. {}"], ["{}"]]), r"templates: the first group .* is \['The cat. {}'\], not"),
           (dict(templates=[["{}", "The cat. {}"]]), "templates: the first group"),
           (dict(z_batch_tokens=0), "z_batch_tokens 0: give a whole number of tokens, at least 1"),
           (dict(hparams=L.HParams(method="alphaedit", layers=(1, 2), nullspace_threshold=0.01)),
            "AlphaEdit: no eigenvalue of C on layer 1 is below the null-space threshold")]
    if not torch.cuda.is_available():
        bad.append((dict(state_device="cuda"), "device 'cuda': this machine has no CUDA GPU"))
    for change, message in bad:
        parts = dict(model=m, hparams=hp, C=C, templates=[["{}"]]) | change
        with pytest.raises(ValueError, match=message):
            L.Editor(**parts)
    for change, message in ((dict(stats_tokens=-5), "stats_tokens -5: give a whole number of tokens, at least 0"),
                            (dict(stats_tokens=2.5), "stats_tokens 2.5: give a whole number"),
                            (dict(batch_size=5), "batch_size: an Editor edits what each edit.. is given as one step")):
        with pytest.raises(ValueError, match=message):
            L.Editor.open(STORIES, stats_cache=tmp_path, **change)


def test_the_same_step_saved_again_never_removes_the_checkpoint_latest_names_first(tmp_path, monkeypatch):
    """Editor.checkpoint twice at one step: the second goes to a new name and latest.json moves to
    it before the first is removed; killed before latest.json moved, the first is whole (it was
    removed before the rename)."""
    m = M.load(STORIES)
    C = S.load_or_collect_stats(m, STORIES, L.DEFAULT_CORPUS, 2000, (1, 2), tmp_path, log=lambda *a, **k: None)
    requests, _ = data.load_requests(FIX / "counterfact-rome.json", limit=2)
    editor = L.Editor(m, L.HParams(layers=(1, 2), lam=15.0, v_num_grad_steps=3), C, [["{}"]])
    editor.edit(requests)
    run = tmp_path / "run"
    editor.checkpoint(run)
    real = data.write_atomic
    monkeypatch.setattr(L.data, "write_atomic", lambda *a: (_ for _ in ()).throw(SystemExit("killed")))
    with pytest.raises(SystemExit):
        editor.checkpoint(run)                                     # killed before latest.json moved
    monkeypatch.setattr(L.data, "write_atomic", real)
    assert json.loads((run / "latest.json").read_text())["checkpoint"] == "ckpt-000001"
    L.Editor(M.load(STORIES), editor.hparams, C, [["{}"]]).restore(run)       # whole
    editor.checkpoint(run)
    assert [p.name for p in run.glob("ckpt-*")] == [json.loads((run / "latest.json").read_text())["checkpoint"]]


def test_latest_json_never_names_a_checkpoint_still_being_written(tmp_path):
    """ckpt-NNNNNN.tmp is a checkpoint being written (save_checkpoint renames it once whole): one
    that latest.json names (by hand) is refused, even where it exists."""
    (tmp_path / "ckpt-000003.tmp").mkdir()
    (tmp_path / "latest.json").write_text(json.dumps({"checkpoint": "ckpt-000003.tmp", "step": 3}))
    with pytest.raises(ValueError, match=r"latest.json names 'ckpt-000003.tmp', not one of the run's own checkpoints"):
        L.latest_checkpoint(tmp_path)
    assert L.latest_identity(tmp_path) is None


def test_a_checkpoint_killed_before_its_rename_leaves_latest_json_on_the_last_whole_one(tmp_path, monkeypatch):
    """latest.json moves to a checkpoint only once it is renamed from its .tmp, whole: a kill
    between the two (here: at the rename) leaves latest.json on the one before, which restores."""
    m = M.load(STORIES)
    C = S.load_or_collect_stats(m, STORIES, L.DEFAULT_CORPUS, 2000, (1, 2), tmp_path, log=lambda *a, **k: None)
    requests, _ = data.load_requests(FIX / "counterfact-rome.json", limit=4)
    editor = L.Editor(m, L.HParams(layers=(1, 2), lam=15.0, v_num_grad_steps=3), C, [["{}"]])
    editor.edit(requests[:2])
    run = tmp_path / "run"
    editor.checkpoint(run)
    editor.edit(requests[2:])
    real = Path.rename
    with monkeypatch.context() as patch:
        patch.setattr(Path, "rename", lambda self, to: (_ for _ in ()).throw(SystemExit("killed"))
                      if self.name.endswith(".tmp") else real(self, to))
        with pytest.raises(SystemExit):
            editor.checkpoint(run)                                 # killed at the rename
    assert json.loads((run / "latest.json").read_text())["checkpoint"] == "ckpt-000001"
    again = L.Editor(M.load(STORIES), editor.hparams, C, [["{}"]])
    again.restore(run)
    assert again.state.step == 1


def test_restore_refuses_a_missing_or_foreign_checkpoint_and_leaves_the_model(tmp_path):
    m = M.load(STORIES)
    C = S.load_or_collect_stats(m, STORIES, L.DEFAULT_CORPUS, 2000, (1, 2), tmp_path, log=lambda *a, **k: None)
    requests, _ = data.load_requests(FIX / "counterfact-rome.json", limit=2)
    templates = [["{}"]]
    editor = L.Editor(m, L.HParams(layers=(1, 2), lam=15.0, v_num_grad_steps=3), C, templates)
    with pytest.raises(ValueError, match=r"no checkpoint to continue from \(latest.json"):
        editor.restore(tmp_path / "nothing")
    editor.edit(requests)
    editor.checkpoint(tmp_path / "run")
    for hp in (L.HParams(method="memit", layers=(1, 2)), L.HParams(layers=(2,))):
        other = L.Editor(M.load(STORIES), hp, C, templates)
        before = {l: other.model.edit_weight(l).clone() for l in (1, 2)}
        with pytest.raises(ValueError, match=r"a checkpoint of lyaplock on layers \[1, 2\]; this Editor runs"):
            other.restore(tmp_path / "run")
        assert all(torch.equal(before[l], other.model.edit_weight(l)) for l in (1, 2))   # untouched
    (tmp_path / "run" / "ckpt-000001" / "weights.safetensors").write_bytes(b"torn")
    with pytest.raises(ValueError, match="cannot read the edited weights"):
        L.Editor(M.load(STORIES), editor.hparams, C, templates).restore(tmp_path / "run")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["lyaplock", "alphaedit", "rome", "lyaplock+prune"])
def test_state_kept_in_host_memory_gives_the_same_edits(tmp_path, device, method):
    """--state-device cpu: C, the edit memory and W0 live on the host and come to the weights'
    device for each solve. On a CPU-only machine both runs are on the host (the flag's plumbing)
    and the result is bitwise that of the on-device run, and so is the restrained model
    PRUNE-style methods are scored on. On a CUDA machine the state moves every step and C and
    S_KK are used a block of rows at a time, whose products sum in another order: the same to
    rounding (test_multidevice.py checks the blocks on the CPU, method by method)."""
    requests, _ = data.load_requests(FIX / "counterfact-rome.json", limit=9)
    runs = []
    for state_device in (None, "cpu"):
        m = M.load(STORIES, device)
        C = S.load_or_collect_stats(m, STORIES, L.DEFAULT_CORPUS, 2000, (1, 2), tmp_path, log=lambda *a, **k: None)
        layers = (2,) if method == "rome" else (1, 2)
        hp = L.HParams(method=method, layers=layers, lam=15.0, alpha=1.0, l2=1.0, v_num_grad_steps=4)
        editor = L.Editor(m, hp, C, [["{}"], ["Once upon a time. {}"]], state_device=state_device)
        assert {W.device.type for W in editor.W0.values()} == {"cpu" if state_device else device}
        logs = [editor.edit(requests[k:k + 3]) for k in (0, 3, 6)]
        with editor.restrained() as used:
            scored = {l: used.edit_weight(l).cpu() for l in layers}
        runs.append((logs, {l: m.edit_weight(l).cpu() for l in layers}, editor.state.layers[2].S_KK, scored))

    def same(a, b):                     # bitwise on one device; to rounding from the host to CUDA
        if device == "cpu":
            assert torch.equal(a, b)
        else:
            close(a, b, 1e-5)
    for l in layers:
        same(runs[0][1][l], runs[1][1][l])
        same(runs[0][3][l], runs[1][3][l])
    pls = [[[v["pl"] for v in e["layers"].values()] for e in run[0]] for run in runs]
    assert pls[0] == pls[1] if device == "cpu" else pls[1] == [pytest.approx(p, rel=1e-4) for p in pls[0]]
    if method != "rome":
        assert runs[1][2].device.type == "cpu"
        same(runs[0][2].cpu(), runs[1][2])


def test_cli_without_arguments_points_to_the_quickstart(capsys):
    assert L.main([]) == 2
    assert L.QUICKSTART in capsys.readouterr().out
    assert L.QUICKSTART.startswith("python lyaplock.py --model fixtures/factmodel-ci ")
    first_block = (HERE / "README.md").read_text().split("```bash\n", 1)[1].split("```", 1)[0]
    assert L.QUICKSTART in first_block.splitlines()[0]                         # the first command


def test_quickstart_edits_the_fact_model(tmp_path, capsys):
    """The README's first command, cut to 20 edits: real edits take on the real trained model."""
    argv = L.QUICKSTART.split()[2:]
    argv[argv.index("--limit") + 1] = "20"
    assert L.main(argv + ["--out", str(tmp_path / "run"), "--stats-cache", str(tmp_path / "c")]) == 0
    after = json.loads((tmp_path / "run" / "summary.json").read_text())
    before = after["pre"]
    assert before["efficacy"] <= 10 and after["efficacy"] >= 70
    assert after["specificity"] >= 80




def test_an_unusable_device_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(ValueError, match="device 'tpu': use cpu, cuda or cuda:N"):
        M.load(STORIES, "tpu")
    with pytest.raises(ValueError, match="device 'cuda:99'"):      # no GPU here, or not 100 of them
        M.load(STORIES, "cuda:99")
    assert L.main(_cli(tmp_path, "--out", str(tmp_path / "run"), "--device", "cuda:99")) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: device 'cuda:99'") and "Traceback" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("device,dtype", [("cpu", "float32")] + [(d, "bfloat16") for d in DEVICES if d != "cpu"])
def test_one_batch_makes_the_new_targets_more_likely_than_the_old(tmp_path, device, dtype):
    """End to end on the real tiny model: before, every true target beats the new one on its
    rewrite prompt; after one LyapLock batch (the preset for small models), every new one wins."""
    out = tmp_path / "run"
    assert L.main(_cli(tmp_path, "--out", str(out), "--no-generation", "--device", device, "--dtype", dtype,
                       edits="stories-edits.json", limit=None, tokens=20000)) == 0
    pre = [json.loads(l) for l in (out / "cases_pre.jsonl").read_text().splitlines()]
    post = [json.loads(l) for l in (out / "cases.jsonl").read_text().splitlines()]
    assert [c["efficacy"] for c in pre] == [0, 0, 0, 0]
    assert [c["efficacy"] for c in post] == [1, 1, 1, 1]


# ==================== reliability: kills, interrupts, bad numbers, out of memory
def _run_args(tmp_path, out, *extra):
    return [sys.executable, str(HERE / "lyaplock.py"),
            *_cli(tmp_path, "--no-generation", "--out", str(out), *extra, limit=10, batch=2, tokens=3000)]


def _env():
    import os
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _log_without_times(out):
    return [{k: v for k, v in json.loads(l).items() if not k.startswith("seconds")}
            for l in (out / "log.jsonl").read_text().splitlines()]


def _resume(tmp_path, out):
    r = subprocess.run([sys.executable, str(HERE / "lyaplock.py"), "--resume", str(out), "--stats-cache",
                        str(tmp_path / "cache")], capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == 0, r.stderr


def test_a_run_killed_at_any_point_resumes_to_the_same_result(tmp_path):
    """SIGKILL a real run at several points (before its first checkpoint, between the log line
    and the checkpoint of a step, during the final evaluation); each resumed
    run ends with bit-identical weights and the same log as the uninterrupted one. (The runs, one
    thread each, go side by side: the kill points are read from their files, not from time.)"""
    import time
    lines = lambda out: len((out / "log.jsonl").read_text().splitlines()) if (out / "log.jsonl").exists() else 0
    points = {"start": lambda out: (out / "config.json").exists(),
              "step1": lambda out: lines(out) >= 1,
              "final": lambda out: lines(out) >= 5}
    start = lambda out: subprocess.Popen(_run_args(tmp_path, out), stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL, env=_env())
    whole = start(tmp_path / "whole")
    running = {name: start(tmp_path / name) for name in points}
    while running:
        for name, p in list(running.items()):
            if p.poll() is None and not points[name](tmp_path / name):
                continue
            p.kill()
            p.wait()
            del running[name]
        time.sleep(0.005)
    resumes = [subprocess.Popen([sys.executable, str(HERE / "lyaplock.py"), "--resume", str(tmp_path / name),
                                 "--stats-cache", str(tmp_path / "cache")], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, env=_env()) for name in points]
    assert whole.wait(timeout=300) == 0
    want_w, want_log = _final_weights(tmp_path / "whole"), _log_without_times(tmp_path / "whole")
    for name, p in zip(points, resumes):
        assert p.wait(timeout=300) == 0, p.stderr.read()
        out = tmp_path / name
        got = _final_weights(out)
        assert got.keys() == want_w.keys() and all(torch.equal(got[k], want_w[k]) for k in got), name
        assert _log_without_times(out) == want_log, name
        assert (out / "summary.json").exists()


def test_ctrl_c_finishes_the_step_saves_and_resumes(tmp_path):
    import signal
    import time
    out = tmp_path / "run"
    p = subprocess.Popen(_run_args(tmp_path, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    while p.poll() is None and not ((out / "log.jsonl").exists() and (out / "log.jsonl").read_text()):
        time.sleep(0.005)
    p.send_signal(signal.SIGINT)
    stdout, _ = p.communicate(timeout=300)
    assert p.returncode == 130 and "--resume" in stdout
    step = json.loads((out / "latest.json").read_text())["step"]
    assert step == len((out / "log.jsonl").read_text().splitlines()) and 1 <= step < 5
    _resume(tmp_path, out)
    assert len(_log_without_times(out)) == 5


def test_defer_interrupt_defers_the_first_ctrl_c_stops_at_the_second_and_puts_the_handler_back(capsys):
    """DeferInterrupt: a first SIGINT only marks the step to finish (and says so), a second raises
    KeyboardInterrupt at once, and on leaving the handler that was there before is back."""
    import signal
    outer = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        with L.DeferInterrupt() as interrupt:
            signal.raise_signal(signal.SIGINT)
            assert interrupt.hit
            assert "finishing this step, then saving" in capsys.readouterr().out
            signal.raise_signal(signal.SIGINT)
            pytest.fail("a second Ctrl-C did not stop at once")
    assert signal.getsignal(signal.SIGINT) is outer


def test_ctrl_c_outside_a_step_is_one_line_that_says_how_to_continue(tmp_path, monkeypatch, capsys):
    """Before the run directory exists there is nothing to continue; after it (here: while the
    model is scored before editing) the run continues with --resume (was a traceback)."""
    def interrupt(*a, **k):
        raise KeyboardInterrupt
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(L, "preservation_statistics", interrupt)
        assert _small_run(tmp_path, out) == 130
    assert capsys.readouterr().err.endswith("interrupted; before the run directory was made: nothing to continue\n")
    assert not out.exists()
    with monkeypatch.context() as patch:
        patch.setattr(L, "score_cases", interrupt)
        assert _small_run(tmp_path, out) == 130
    assert capsys.readouterr().err.endswith(f"interrupted; continue with: python lyaplock.py --resume {out}\n")
    assert L.main(["--resume", str(out)]) == 0
    assert (out / "summary.json").exists()


def test_ctrl_c_while_a_resume_loads_or_the_model_is_saved_says_how_to_continue(tmp_path, monkeypatch, capsys):
    """The run directory exists from the start of a --resume: a Ctrl-C during its statistics (minutes
    on a large model) said there was nothing to continue; so did one while --save-model wrote."""
    def interrupt(*a, **k):
        raise KeyboardInterrupt
    out, edited = tmp_path / "run", tmp_path / "edited"
    with monkeypatch.context() as patch:
        patch.setattr(L.Editor, "save", interrupt)
        assert _small_run(tmp_path, out, "--save-model", str(edited)) == 130
    assert capsys.readouterr().err.endswith(f"interrupted; continue with: python lyaplock.py --resume {out}\n")
    with monkeypatch.context() as patch:
        patch.setattr(L, "preservation_statistics", interrupt)
        assert L.main(["--resume", str(out)]) == 130
    assert capsys.readouterr().err.endswith(f"interrupted; continue with: python lyaplock.py --resume {out}\n")
    assert L.main(["--resume", str(out)]) == 0 and (edited / "model.safetensors").exists()


def test_a_full_disk_while_the_model_is_saved_says_how_to_continue(tmp_path, monkeypatch, capsys):
    """safetensors' own error on a full disk (was a traceback after the whole run): one line, with
    the command that writes the model again, also where a --resume named --save-model (it is
    recorded: --resume DIR alone writes it there); the saved files are readable as the process's
    others (safetensors writes them owner-only)."""
    out, edited, real = tmp_path / "run", tmp_path / "edited", M.save_file

    def full(tensors, path, **k):
        if Path(path).parent == edited:
            raise L.SafetensorError("Error while serializing: No space left on device")
        return real(tensors, path, **k)
    assert _small_run(tmp_path, out) == 0
    with monkeypatch.context() as patch:
        patch.setattr(M, "save_file", full)
        assert L.main(["--resume", str(out), "--save-model", str(edited)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {edited / 'model.safetensors'}: Error while serializing")
    assert err.endswith(f"continue with: python lyaplock.py --resume {out}\n")
    assert L.main(["--resume", str(out)]) == 0
    umask = os.umask(0)
    os.umask(umask)
    for file in (edited / "model.safetensors", *out.glob("ckpt-*/*.safetensors")):
        assert file.stat().st_mode & 0o777 == 0o666 & ~umask, file


@pytest.mark.parametrize("change,message", [
    (lambda d: _edit_json(d / "config.json", lambda c: c["hparams"].update(batch_size=3)),
     "its checkpoint holds 2 edits after step 1; config.json's settings .batch_size 3, 8 requests. make 3"),
    (lambda d: _edit_json(d / "config.json", lambda c: c.update(limit="10")),
     "its config.json's limit '10' is not an int . None"),
    (lambda d: (d / "cases_pre.jsonl").unlink(), "cases_pre.jsonl holds 0 of 8 scores"),
    (lambda d: (d / "ability.jsonl").write_text(""), "ability.jsonl holds no measurement before editing"),
    (lambda d: (d / "latest.json").write_text(json.dumps({"checkpoint": "../other/ckpt-000001", "step": 1})),
     "latest.json names '../other/ckpt-000001', not one of the run's own checkpoints"),
    (lambda d: _edit_json(d / "config.json", lambda c: c["hparams"].update(layers=[1, 4])),  # (or begun before
     r"--resume .*: its layers \[1, 4\]: the last edit layer .* top block \(4\).*; it cannot go on: start a new run"),  # the check)
])
def test_a_run_directory_changed_by_hand_is_refused_on_resume(stopped_run, tmp_path, capsys, change, message):
    """What no kill can leave (each file is whole before checkpoint 0) but a hand can: refused,
    naming it (were: a stream cut into other steps, silently; tracebacks, one after the whole
    stream; a checkpoint of another run followed)."""
    out = tmp_path / "run"
    shutil.copytree(stopped_run, out)
    change(out)
    capsys.readouterr()
    assert L.main(["--resume", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(message, err), err


def test_a_resume_whose_scores_before_editing_hold_more_lines_than_requests_is_refused(stopped_run, tmp_path, capsys):
    """cases_pre.jsonl holds exactly one score a request: one line too many (a hand, another run's
    file) is refused like one too few, naming the counts (was at risk: only a short file refused)."""
    out = tmp_path / "run"
    shutil.copytree(stopped_run, out)
    with open(out / "cases_pre.jsonl", "a") as f:
        f.write((out / "cases_pre.jsonl").read_text().splitlines()[0] + "\n")
    capsys.readouterr()
    assert L.main(["--resume", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cases_pre.jsonl holds 9 of 8 scores" in err, err


def test_a_resumed_run_s_progress_line_counts_the_edits_it_made_itself(stopped_run, tmp_path, capsys, monkeypatch):
    """stopped_run resumed (2 of 8 edits done, 2 a step) on a clock that reads 100 s at the
    stream's start and 110 s ever after: a line after its first step and one at the end (at most a
    line a second, the last always), each [edits done/total], the rate of the edits this process
    made over the 10 s, the ETA at that rate, and each layer's PL/D and z from the step's log; a
    layer whose D is 0 (its queue not calibrated, or none) shows its PL alone."""
    import time
    from types import SimpleNamespace
    out = tmp_path / "run"
    shutil.copytree(stopped_run, out)
    clock = iter([100.0])
    monkeypatch.setattr(L, "time", SimpleNamespace(time=lambda: next(clock, 110.0), perf_counter=time.perf_counter))
    capsys.readouterr()
    assert L.main(["--resume", str(out)]) == 0
    log = data.read_jsonl(out / "log.jsonl")[0]
    per = lambda e: " | ".join(f"L{l} PL/D {v['pl'] / v['D']:.3f} z {v['z']:.2f}" for l, v in e["layers"].items())
    assert [l for l in capsys.readouterr().out.splitlines() if l.startswith("[")] == [
        f"[4/8] 0.20 edits/s, ETA 20 s | {per(log[1])}", f"[8/8] 0.60 edits/s, ETA 0 s | {per(log[3])}"]
    first = dict(layers={"1": dict(pl=0.25, D=0.0, z=1.0), "2": dict(pl=3.0, D=2.0, z=1.25)})
    assert L.progress_line(first, SimpleNamespace(n_edits=2), 8, 0.5) == (
        "[2/8] 0.50 edits/s, ETA 12 s | L1 PL 0.25 | L2 PL/D 1.500 z 1.25")


def interrupt_after_one_step(patch):
    """edit_batch as a Ctrl-C during the second step: the first runs, then every later one is
    interrupted (DeferInterrupt lets it finish the first's checkpoint); returns the real one."""
    real = L.edit_batch

    def dies_after_one(*a, **k):
        patch.setattr(L, "edit_batch", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
        return real(*a, **k)
    patch.setattr(L, "edit_batch", dies_after_one)
    return real


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A run of 8 requests, 2 a step, stopped by Ctrl-C after its step 1 (read-only: copy it)."""
    tmp_path = tmp_path_factory.mktemp("stopped")
    with pytest.MonkeyPatch.context() as patch:
        interrupt_after_one_step(patch)
        assert L.main(_cli(tmp_path, "--out", str(tmp_path / "run"), "--batch-size", "2", "--no-generation")) == 130
    return tmp_path / "run"


def _edit_json(file: Path, change):
    content = json.loads(file.read_text())
    change(content)
    file.write_text(json.dumps(content))


def _small_run(tmp_path, out, *extra):
    return L.main(_cli(tmp_path, "--out", str(out), "--no-generation", *extra, edits="stories-edits.json",
                       limit=None, batch=2, tokens=3000))


def test_non_finite_target_values_stop_the_step_and_keep_the_checkpoint(tmp_path, monkeypatch, capsys):
    real, calls = L.compute_z, []

    def nan_on_second_step(*a, **k):
        z, info = real(*a, **k)
        calls.append(1)
        return (z * float("nan"), info) if len(calls) == 2 else (z, info)
    monkeypatch.setattr(L, "compute_z", nan_on_second_step)
    out = tmp_path / "run"
    assert _small_run(tmp_path, out) == 1
    err = capsys.readouterr().err
    assert "step 1, layer 2: non-finite target values (case ids 2, 3)" in err
    assert "last checkpoint (step 1) is intact" in err
    assert json.loads((out / "latest.json").read_text())["step"] == 1


def test_a_failed_cholesky_names_step_layer_and_cases(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(S, "load_or_collect_stats", lambda model, *a, **k: {
        l: -torch.eye(model.cfg.d_mlp, dtype=torch.float64) for l in (1, 2)})
    assert _small_run(tmp_path, tmp_path / "run") == 1
    err = capsys.readouterr().err
    assert "step 0, layer 1 (case ids 0, 1): system matrix is not positive definite" in err


def test_where_names_the_step_layer_and_cases_of_each_non_finite_tensor_and_of_a_failed_solve():
    """Where's messages: every tensor checked, NaN, +inf and −inf alike, the first bad one named with
    the step, the layer and the step's case ids; a solve's error the same way; finite tensors pass."""
    from types import SimpleNamespace
    where = L.Where(4, [SimpleNamespace(case_id=7), SimpleNamespace(case_id="b9")])
    fine = torch.ones(3)
    where.check_finite(2, keys=fine, residual=fine.double())
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(FloatingPointError, match=r"^step 4, layer 2: non-finite residual \(case ids 7, b9\)$"):
            where.check_finite(2, keys=fine, residual=torch.tensor([0.0, bad]))
    assert str(where.failed(1, ValueError("no factor"))) == "step 4, layer 1 (case ids 7, b9): no factor"


def test_a_non_finite_residual_ends_the_step_before_its_layer_is_written(monkeypatch):
    """edit_batch checks each layer's keys and residual (E5, E6) before its solve: a current output
    gone infinite at the second edit layer's pass ends the step there, naming its step, layer and
    cases and the residual (not the update it would have made), layer 1 updated, layer 2 not."""
    m = M.load(STORIES)
    requests, _ = data.load_requests(ORACLE / "requests.json")
    layers, templates = (1, 2), [["{}"]]
    hp = L.HParams(layers=layers, v_num_grad_steps=2)
    before = {k: v.clone() for k, v in m.edit_tensors(list(layers)).items()}
    keys_and_outputs, calls = L.keys_and_outputs, []

    def inf_at_layer_2(*a, **k):
        K, cur, bare = keys_and_outputs(*a, **k)
        calls.append(1)
        return (K, cur + float("inf"), bare) if len(calls) == 2 else (K, cur, bare)
    monkeypatch.setattr(L, "keys_and_outputs", inf_at_layer_2)
    try:
        with pytest.raises(FloatingPointError, match=r"^step 0, layer 2: non-finite residual \(case ids 0, 1\)$"):
            L.edit_batch(m, requests[:2], templates, hp, L.EditState.start("lyaplock", layers),
                         {l: torch.eye(m.cfg.d_mlp, dtype=torch.float64) for l in layers},
                         {l: m.edit_weight(l).detach().clone() for l in layers})
        assert not torch.equal(m.edit_weight(1), before[m.cfg.edit_parameter_name(1)])
        assert torch.equal(m.edit_weight(2), before[m.cfg.edit_parameter_name(2)])
    finally:
        m.load_edit_tensors(before)


@pytest.mark.parametrize("fails", ["solve", "update"])
def test_a_rome_step_names_the_request_whose_solve_failed(monkeypatch, fails):
    """ROME edits a step's requests one at a time: a failed solve (E18-E20) of the second, or a
    non-finite update from it, names that request's case id alone, with the step and layer; the
    first's edit is written, the second's not."""
    m = M.load(STORIES)
    requests, _ = data.load_requests(ORACLE / "requests.json")
    hp = L.HParams(method="rome", layers=(2,), v_num_grad_steps=2)
    W, solve_rome, after = m.edit_weight(2).detach().clone(), L.B.solve_rome, []

    def second_fails(*a):
        after.append(m.edit_weight(2).clone())
        if len(after) < 2:
            return solve_rome(*a)
        if fails == "solve":
            raise ValueError("the key is orthogonal to C⁻¹k̄")
        return solve_rome(*a) * float("nan")
    monkeypatch.setattr(L.B, "solve_rome", second_fails)
    with pytest.raises(ValueError if fails == "solve" else FloatingPointError) as error:
        L.edit_batch(m, requests[:3], [["{}"]], hp, L.EditState.start("rome", (2,)),
                     {2: torch.eye(m.cfg.d_mlp, dtype=torch.float64)}, {2: W.clone()})
    want = (f"step 0, layer 2 (case ids {requests[1].case_id}): the key is orthogonal to C⁻¹k̄" if fails == "solve" else
            f"step 0, layer 2: non-finite update (case ids {requests[1].case_id})")
    assert str(error.value) == want
    assert not torch.equal(after[1], W) and torch.equal(m.edit_weight(2), after[1])


def test_a_steps_clock_adds_up_each_phases_laps_and_its_log_their_total(monkeypatch):
    """Clock: each lap counts from the one before, a phase timed twice (ROME's per request) is
    the sum of its laps; step_log gives them as seconds_<phase>, their sum as seconds, the step just
    done and the edits so far."""
    ticks = iter([10.0, 11.0, 13.0, 16.0, 20.0])
    monkeypatch.setattr(L.time, "perf_counter", lambda: next(ticks))
    clock = L.Clock("cpu")
    for phase in ("keys", "z", "keys", "solve"):
        clock.lap(phase)
    state = L.EditState.start("lyaplock", (1,))
    state.finish_step(3)
    state.finish_step(2)
    assert L.step_log(state, {1: "layer"}, clock) == dict(step=1, layers={1: "layer"}, seconds_keys=4.0, seconds_z=2.0,
                                                         seconds_solve=4.0, edits=5, seconds=10.0)


def test_out_of_memory_says_which_stage_and_what_to_change(tmp_path, monkeypatch, capsys):
    def oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    monkeypatch.setattr(L, "compute_z", oom)
    assert _small_run(tmp_path, tmp_path / "run") == 1
    err = capsys.readouterr().err
    assert ("out of GPU memory during editing step 0: lower --z-batch-tokens (now 2048) or --batch-size (now 2), "
            "or use --dtype bfloat16") in err
    assert "Traceback" not in err


def test_a_statistics_cache_that_does_not_match_is_recomputed(tmp_path):
    m = M.load(STORIES)
    logs = []
    args = (m, STORIES, FIX / "wikitext-2-test-sample.txt", 2000, [1, 2], tmp_path)
    C = S.load_or_collect_stats(*args, log=lambda s, end="": logs.append(s))
    f = next(tmp_path.glob("stats-*.safetensors"))
    with safe_open(str(f), "pt") as h:
        meta = h.metadata()
    save_file({"C.1": torch.zeros(3, 3, dtype=torch.float64), "C.2": C[2]}, str(f), metadata=meta)  # wrong shape
    C2 = S.load_or_collect_stats(*args, log=lambda s, end="": logs.append(s))
    assert any("does not match" in s for s in logs) and torch.equal(C2[1], C[1])
    key = json.loads(meta["key"]) | {"n_tokens": 1}                                   # another key
    save_file({k: v for k, v in C.items() for k in [f"C.{k}"]}, str(f), metadata={"key": json.dumps(key)})
    logs.clear()
    S.load_or_collect_stats(*args, log=lambda s, end="": logs.append(s))
    assert any("does not match" in s for s in logs)


def test_the_library_never_unpickles():
    """No torch.load, pickle or unpickling numpy load anywhere in the library (words about
    pickles, in messages, are allowed)."""
    unpickles = re.compile(r"torch\.load\b|import pickle|from pickle|pickle\.|allow_pickle=True|np\.load\((?!.*allow_pickle=False)")
    for f in ("model.py", "data.py", "lyaplock.py", "eval.py", "stats.py", "baselines.py"):
        found = [line for line in (HERE / f).read_text().splitlines() if unpickles.search(line)]
        assert not found, (f, found)


def test_save_model_says_which_files_of_the_input_it_left_out(tmp_path, capsys):
    """A checkpoint shipped with pytorch_model.bin beside its safetensors: the saved model leaves the
    unedited .bin out (M.save), and the command says so."""
    src = tmp_path / "model"
    shutil.copytree(STORIES, src)
    for name in ("pytorch_model.bin", "optimizer.pt"):
        (src / name).write_bytes(b"unedited")
    argv = _cli(tmp_path, "--out", str(tmp_path / "run"), "--no-generation", "--save-model", str(tmp_path / "edited"),
                edits="stories-edits.json", limit=2, batch=2, tokens=3000)
    assert L.main(["--model", str(src), *argv[2:]]) == 0
    assert (f"not copied from {src}: optimizer.pt, pytorch_model.bin (weights in other formats, which hold the "
            "unedited model, and training state)") in capsys.readouterr().out
    assert not {"optimizer.pt", "pytorch_model.bin"} & {p.name for p in (tmp_path / "edited").iterdir()}


def test_a_bfloat16_editor_saves_the_model_it_evaluated_in_the_checkpoints_dtype(tmp_path):
    """A float32 checkpoint edited in bfloat16: the save keeps float32, its edit layers hold the
    bfloat16 values the Editor evaluated (not W0's float32 digits plus the edit), so the save
    loaded in bfloat16 is the edited model bit for bit, and its other tensors are the input's."""
    src = FIX / "factmodel-ci"
    ed = L.Editor.open(src, dtype="bfloat16", lam=30, alpha=10, stats_corpus=src / "corpus.txt",
                       stats_cache=tmp_path / "cache")
    ed.edit(data.load_requests(src / "edits.json", limit=4)[0])
    with pytest.raises(ValueError, match=f"checkpoint: {src} is the input checkpoint's directory"):
        ed.checkpoint(src)                                 # (its latest.json went into every later save)
    ed.save(tmp_path / "edited")
    stored = {code for _, code, _ in M.tensor_headers(M.weight_files(tmp_path / "edited")).values()}
    assert stored == {code for _, code, _ in M.tensor_headers(M.weight_files(src)).values()} == {"F32"}
    saved, wide, original = (M.load(tmp_path / "edited", dtype="bfloat16"), M.load(tmp_path / "edited"), M.load(src))
    mine = ed.model.state_dict()
    assert saved.state_dict().keys() == mine.keys()
    assert all(torch.equal(t, mine[n]) for n, t in saved.state_dict().items())
    edited = {n for l in ed.hparams.layers for n in wide.edit_tensors([l])}
    assert edited and edited <= wide.state_dict().keys()
    for n, t in wide.state_dict().items():
        assert t.dtype == torch.float32
        if n in edited:
            assert torch.equal(t, t.bfloat16().float()) and not torch.equal(t, original.state_dict()[n])
        else:
            assert torch.equal(t, original.state_dict()[n]), n


def test_save_model_never_writes_into_the_input_checkpoint_or_the_run_directory(tmp_path, monkeypatch, capsys):
    assert _small_run(tmp_path, tmp_path / "run", "--save-model", str(STORIES)) == 1
    assert "--save-model must not be the input checkpoint's directory" in capsys.readouterr().err
    monkeypatch.setattr(L.M, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    for out, save in (("run", "run"), ("run", "."), ("run", "run/model")):     # (was: refused after the run)
        assert _small_run(tmp_path, tmp_path / out, "--save-model", str(tmp_path / save)) == 1
        assert "and the run directory" in capsys.readouterr().err and not (tmp_path / "run").exists()
    monkeypatch.chdir(tmp_path)                 # no --out: the next runs/NNN
    for save in ("runs", "runs/001", "runs/007/model", "."):
        assert L.main(_cli(tmp_path, "--save-model", save)) == 1
        assert "and the run directory runs/NNN: one holds the other" in capsys.readouterr().err


def test_a_save_cut_short_is_the_run_s_own_only_with_its_own_marker(tmp_path):
    """own_save_target on a claim of an unfinished save (written None): the --save-model directory is
    the run's to write again only while the marker there holds the run's own token; a marker with
    another token (another run's save cut short there) is refused, its files left."""
    out, d = tmp_path / "run", tmp_path / "saved"
    out.mkdir()
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"torn")
    (out / L.SAVE_CLAIM).write_text(json.dumps(dict(directory=str(d.resolve()), written=None, token="mine")))
    (d / L.SAVING).write_text("mine")
    assert L.own_save_target(str(d), out) is True
    (d / L.SAVING).write_text("another run's")
    with pytest.raises(ValueError, match="holds files this run has no record of writing"):
        L.own_save_target(str(d), out)


def test_a_resume_never_writes_over_another_run_s_model_in_its_save_model(tmp_path, monkeypatch, capsys):
    """--save-model's checks saw only a typed directory: a resumed run wrote its model over the one
    another run had saved there meanwhile (so did the later of two runs given one new directory).
    save-model.json records the directory a run writes, before (a save cut short, torn files and
    all, stays its own) and after (what it wrote: files put there later are not its own)."""
    out, shared = tmp_path / "run", tmp_path / "shared"
    with monkeypatch.context() as patch:
        interrupt_after_one_step(patch)
        assert _small_run(tmp_path, out, "--save-model", str(shared)) == 130
    shared.mkdir()                                       # another run's model lands there
    (shared / "model.safetensors").write_bytes(b"another run's edited model")
    capsys.readouterr()
    with monkeypatch.context() as patch:                 # refused before the model loads
        patch.setattr(L, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
        assert L.main(["--resume", str(out)]) == 1
    assert capsys.readouterr().err.startswith(f"error: --save-model {shared} holds files this run has no record "
                                              "of writing")
    assert (shared / "model.safetensors").read_bytes() == b"another run's edited model"
    mine = tmp_path / "mine"
    with monkeypatch.context() as patch:                 # a save cut short, a file torn: the resume writes it
        real_save = L.M.save

        def torn(src, to, tensors, replace=False):
            real_save(src, to, tensors, replace)
            weights = Path(to) / "model.safetensors"
            weights.write_bytes(weights.read_bytes()[:1000])
            raise OSError(28, "No space left on device")
        patch.setattr(L.M, "save", torn)
        assert L.main(["--resume", str(out), "--save-model", str(mine)]) == 1
    assert L.main(["--resume", str(out)]) == 0
    assert json.loads((out / "save-model.json").read_text())["directory"] == str(mine.resolve())
    saved = M.load(mine)
    assert L.main(["--resume", str(out), "--save-model", str(mine)]) == 0      # its own save, typed: written again
    shutil.move(mine, tmp_path / "kept")                 # its model moved away, another run's saved there:
    shutil.copytree(shared, mine)                        # not its own any more
    assert L.main(["--resume", str(out)]) == 1
    assert "holds files this run has no record of writing" in capsys.readouterr().err
    assert torch.equal(M.load(tmp_path / "kept").edit_weight(1), saved.edit_weight(1))
    cut = tmp_path / "cut"                               # a save stopped before it wrote a file, its directory
    with monkeypatch.context() as patch:                 # then cleared and another run's model saved there
        patch.setattr(L.M, "save", lambda *a, **k: (_ for _ in ()).throw(OSError(5, "Input/output error")))
        assert L.main(["--resume", str(out), "--save-model", str(cut)]) == 1
    assert json.loads((out / "save-model.json").read_text())["written"] is None
    shutil.rmtree(cut, ignore_errors=True)
    shutil.copytree(shared, cut)
    assert L.main(["--resume", str(out)]) == 1
    assert "holds files this run has no record of writing" in capsys.readouterr().err
    assert (cut / "model.safetensors").read_bytes() == b"another run's edited model"
    later, real_finish = tmp_path / "later", L.finish

    def finish_as_another_run_saves(*a, **k):            # two runs given one new directory: the other first
        real_finish(*a, **k)
        later.mkdir()
        (later / "model.safetensors").write_bytes(b"the other run's edited model")
    with monkeypatch.context() as patch:
        patch.setattr(L, "finish", finish_as_another_run_saves)
        assert _small_run(tmp_path, tmp_path / "second", "--save-model", str(later), "--limit", "2") == 1
    assert (later / "model.safetensors").read_bytes() == b"the other run's edited model"


def test_cli_refuses_outputs_it_would_overwrite_before_the_model_loads(tmp_path, monkeypatch, capsys):
    """A file, or a directory that holds something, as --out or --save-model: refused, naming the
    flag, before any model work (a --save-model that was a file used to fail after the whole
    stream; one holding another checkpoint was written into, mixing their files)."""
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "model.safetensors").write_text("x")
    monkeypatch.setattr(L.M, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    for extra, message in [
            (("--out", f"{tmp_path}/a-file"), f"--out {tmp_path}/a-file is a file, not a directory; choose a new "
                                              "directory or --resume it"),
            (("--out", f"{tmp_path}/full"), f"--out {tmp_path}/full exists and is not empty; choose a new "
                                            "directory or --resume it"),
            (("--out", f"{tmp_path}/run", "--save-model", f"{tmp_path}/a-file"),
             f"--save-model {tmp_path}/a-file is a file, not a directory; choose a new directory"),
            (("--out", f"{tmp_path}/run", "--save-model", f"{tmp_path}/full"),
             f"--save-model {tmp_path}/full exists and is not empty; choose a new directory"),
            (("--out", f"{tmp_path}/a-file/run"),            # (these three failed late, naming no flag)
             f"--out {tmp_path}/a-file/run: {tmp_path}/a-file is a file, so no directory can be made there"),
            (("--out", f"{tmp_path}/run", "--save-model", f"{tmp_path}/a-file/x/y"),
             f"--save-model {tmp_path}/a-file/x/y: {tmp_path}/a-file is a file, so no directory can be made there"),
            (("--out", f"{tmp_path}/run", "--stats-cache", f"{tmp_path}/a-file"),
             f"--stats-cache {tmp_path}/a-file is a file, not a directory; give a directory (made where missing)"),
            (("--out", f"{tmp_path}/run", "--save-model", ""), "--save-model '': give a directory"),  # (it saved into
            (("--out", ""), "--out '': give a directory"),                                        # the working dir)
            (("--out", f"{tmp_path}/run", "--stats-cache", ""), "--stats-cache '': give a directory"),
            (("--out", f"{tmp_path}/run", "--stats-cache", f"{STORIES}/cache"),     # (added stats-*.safetensors
             f"--stats-cache {STORIES}/cache is inside --model {STORIES}: keep the cache apart from the "  # to it)
             "checkpoint (its files would add to the checkpoint's)")]:
        assert L.main(_cli(tmp_path, *extra)) == 1
        assert capsys.readouterr().err == f"error: {message}\n"
    assert not (tmp_path / "run").exists()
    (tmp_path / "ro").mkdir()                   # a read-only mount (was: the whole run, then a bare OSError)
    monkeypatch.setattr(L.os, "access", lambda path, mode: Path(path) != tmp_path / "ro")
    for extra, message in [
            (("--out", f"{tmp_path}/ro/run"), f"--out {tmp_path}/ro/run: {tmp_path}/ro cannot be written (read-only, "
                                              "or not yours); choose a new directory or --resume it"),
            (("--out", f"{tmp_path}/run", "--save-model", f"{tmp_path}/ro"),
             f"--save-model {tmp_path}/ro: {tmp_path}/ro cannot be written (read-only, or not yours); choose a new "
             "directory")]:
        assert L.main(_cli(tmp_path, *extra)) == 1
        assert capsys.readouterr().err == f"error: {message}\n"
    with pytest.raises(pytest.fail.Exception, match="the model was loaded"):   # a read-only statistics cache
        L.main(_cli(tmp_path, "--out", f"{tmp_path}/run", "--stats-cache", f"{tmp_path}/ro"))   # serves what it holds


# ==================== bench: the CPU smoke preset
@pytest.mark.parametrize("flags, message", [
    (["--edits", "0"], "--edits 0: give a whole number of at least 1"),
    (["--batch1", "-1"], "--batch1 -1: give a whole number of at least 0"),
    (["--z-batch-tokens", "0"], "--z-batch-tokens 0: give a whole number of at least 1"),
    (["--json", "{tmp}"], "--json {tmp} is a directory; give a file name"),
    (["--json", "{tmp}/missing/x.json"], "--json {tmp}/missing/x.json: no directory {tmp}/missing to write it in"),
    (["--edits", "151"], "--edits 151, --batch1 0: counterfact-easyedit.json holds 300 requests, for --edits up "
                         "to 150 (the timed step edits the second n) and --batch1 up to 299"),
    (["--device", "tpu"], "--device: device 'tpu': use cpu, cuda or cuda:N"),
    (["--state-device", "tpu"], "--state-device: device 'tpu': use cpu, cuda or cuda:N"),
    (["--device", "cpu", "--memory-gib", "20"], "--memory-gib caps a GPU's memory: give it with a cuda --device "
                                                "(here cpu)")])     # (it silently did nothing)
def test_bench_refuses_bad_numbers_and_a_directory_as_json_before_any_work(tmp_path, capsys, flags, message):
    import bench
    with pytest.raises(SystemExit):
        bench.main(["--preset", "tiny", *[f.replace("{tmp}", str(tmp_path)) for f in flags]])
    assert capsys.readouterr().err.endswith(f"error: {message.replace('{tmp}', str(tmp_path))}\n")


@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="no sysfs, a directory that takes no new file")
def test_bench_json_where_no_file_can_be_made_is_one_line(capsys, monkeypatch):
    """--json /sys/x.json (sysfs takes no new file, from root either) ran the first preset, then a
    PermissionError traceback; a write that fails later (a disk full) is one line too."""
    import bench
    monkeypatch.setattr(bench, "run_presets", lambda args: pytest.fail("the benchmark ran"))
    with pytest.raises(SystemExit):
        bench.main(["--preset", "tiny", "--json", "/sys/x.json"])
    assert re.search(r"\n\S+: error: --json /sys/x.json: /sys cannot be written \(.+\)\n$", capsys.readouterr().err)
    with pytest.raises(SystemExit, match=r"^error: --json /sys/x.json cannot be written: .+$"):
        bench.write_json("/sys/x.json", [])


def test_bench_refuses_a_preset_whose_weights_the_host_cannot_hold(capsys, monkeypatch):
    """--preset llama3-8b --device cpu built 30 GiB of random weights in host memory and was killed:
    on the CPU our model holds them, transformers' copy beside it (unless --no-hf), and C."""
    import bench
    monkeypatch.setattr(bench, "run_presets", lambda args: pytest.fail("the benchmark ran"))
    monkeypatch.setattr(M, "device_free", lambda device: 30 * 2 ** 30)
    with pytest.raises(SystemExit):
        bench.main(["--preset", "tiny", "--preset", "llama3-8b", "--device", "cpu", "--dtype", "bfloat16"])
    assert capsys.readouterr().err.endswith("error: --preset llama3-8b: its random bfloat16 checkpoint takes 37.6 GiB "
                                            "of host memory (2 copies of the weights and C) and 30.0 GiB is available "
                                            "(--no-hf takes one copy less)\n")
    with pytest.raises(pytest.fail.Exception, match="the benchmark ran"):     # without transformers' copy it fits
        bench.main(["--preset", "llama3-8b", "--device", "cpu", "--dtype", "bfloat16", "--no-hf"])
    monkeypatch.undo()
    assert 0 < M.device_free(torch.device("cpu")) <= M.device_memory(torch.device("cpu"))


def test_bench_tiny_preset_runs_and_reports_every_phase(tmp_path):
    import bench
    out = tmp_path / "bench.json"
    r = bench.main(["--preset", "tiny", "--edits", "4", "--stats-tokens", "700", "--json", str(out)])[0]
    assert json.loads(out.read_text())[0]["preset"] == "tiny"
    assert r["forward"]["ours_tok_s"] > 0 and r["forward"]["ratio"] > 0 and r["stats"]["tok_s"] > 0
    for method in ("lyaplock", "memit", "alphaedit"):
        s = r["steps"][method]
        assert s["total"] == pytest.approx(s["target_values"] + s["keys"] + s["solve_pl_queue"])
        assert s["first_step"] > 0 and s["eval"] > 0
    assert r["projection_10k_edits_hours"]["editing"] > 0
    assert bench.methods_to_run(["lyaplock"]) == ["lyaplock"] and bench.methods_to_run(["rome"]) == ["lyaplock", "rome"]
    assert bench.methods_to_run(None) == ["lyaplock", "memit", "alphaedit"] and len(bench.methods_to_run(["all"])) == len(L.METHODS)
    assert bench.methods_to_run(["memit", "lyaplock"]) == ["lyaplock", "memit"]     # LyapLock always first
    alone = bench.table([dict(r, steps={"lyaplock": r["steps"]["lyaplock"]})]).splitlines()[-1].split("|")
    assert alone[5].strip().startswith(f"{r['steps']['lyaplock']['total']:.2f} = ")
    assert [c.strip() for c in alone[6:8]] == ["-", "-"]                  # MEMIT, AlphaEdit: not run
    planned = r["steps"]["lyaplock"]["planned_gib"]                        # --plan's figure, beside the peak
    assert 0 < planned and alone[9].strip() == f"- / {planned:.1f}"        # (no peak on the CPU)


def test_bench_json_keeps_each_part_as_it_ends_and_one_request_steps_follow_lyaplock(tmp_path, monkeypatch):
    """--json is rewritten as each part ends, so a run stopped in its second method (a `timeout`)
    keeps the forward pass, the statistics, LyapLock's step and the one-request steps, which run
    right after LyapLock's step; --no-hf skips transformers' forward. (The steps are stubs: this
    is the driver's order and bookkeeping; the smoke test above runs them.)"""
    import bench
    out = tmp_path / "bench.json"
    seen = []
    stop = ["memit"]
    written = lambda: json.loads(out.read_text())[0] if out.exists() else {}

    def step(m, ckpt, layers, method, *a, **k):
        seen.append((method, sorted(written()), list(written().get("steps", {}))))
        if method in stop:
            raise InterruptedError("stopped here")                     # as a `timeout` would
        return dict.fromkeys(["first_step", "target_values", "keys", "solve_pl_queue", "total", "planned_gib",
                              "eval"], 1.0)

    def single(*a, **k):
        seen.append(("batch1", sorted(written()), list(written().get("steps", {}))))
        return dict(steps=1)
    monkeypatch.setattr(bench, "edit_step", step)
    monkeypatch.setattr(bench, "single_edits", single)
    monkeypatch.setattr(bench, "hf_seconds", lambda *a: 1.0)
    args = ["--preset", "tiny", "--stats-tokens", "300", "--batch1", "1", "--json", str(out)]
    with pytest.raises(InterruptedError, match="stopped here"):
        bench.main(args + ["--method", "memit"])
    head = ["date", "device", "dtype", "forward", "layers", "preset"]
    assert seen == [("lyaplock", sorted(head + ["stats"]), []),
                    ("batch1", sorted(head + ["stats", "steps"]), ["lyaplock"]),
                    ("memit", sorted(head + ["batch_size_1", "stats", "steps"]), ["lyaplock"])]
    r = written()
    assert r["forward"]["hf_eager_tok_s"] == 2 * 64 and r["batch_size_1"] == {"steps": 1}
    monkeypatch.setattr(bench, "hf_seconds", lambda *a: pytest.fail("transformers' forward ran"))
    stop.clear()
    r = bench.main(args + ["--no-hf"])[0]
    assert list(r["forward"]) == ["ours_tok_s"] and list(r["steps"]) == ["lyaplock", "memit", "alphaedit"]
    assert json.loads(out.read_text()) == [r]


def test_bench_stopped_by_sigterm_removes_its_checkpoint(tmp_path):
    """`timeout` sends SIGTERM: the run leaves through Python's shutdown, so the temporary
    directory holding the preset's checkpoint (16 GB for llama3-8b) is removed."""
    import signal
    import time
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    run = subprocess.Popen([sys.executable, "bench.py", "--preset", "tiny", "--edits", "2", "--stats-tokens", "300",
                            "--no-hf"], cwd=Path(__file__).parent, env={**__import__("os").environ, "TMPDIR": str(tmp)},
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while not list(tmp.glob("*/tiny/tokenizer_config.json")):     # the checkpoint's last file
            assert run.poll() is None and time.time() < deadline, "the checkpoint never appeared"
            time.sleep(0.05)
        run.send_signal(signal.SIGTERM)
        err = run.communicate(timeout=60)[1]
    finally:
        run.kill()
    assert run.returncode == 143 and err.endswith("\nstopped (SIGTERM): the temporary checkpoint removed\n"), err
    assert list(tmp.iterdir()) == []


def test_bench_presets_layers_are_the_layers_its_steps_edit():
    """A preset's layers are what the JSON's "layers" reports; for a published shape the steps edit
    the published ones (bench_layers): qwen2.5-7b said 4-8 and edited 7-11 (SasyaTitech/NAS's)."""
    import types
    import bench
    for name, (config, layers) in bench.PRESETS.items():
        m = types.SimpleNamespace(cfg=M.Config.from_hf(config))
        assert bench.bench_layers(m, layers, "lyaplock") == layers, name


def test_bench_scoring_is_timed_after_a_warm_up(tmp_path, monkeypatch):
    """The first method's scoring held the process's first calls (on an H100, LyapLock's 0.82 s
    against MEMIT's 0.49 and a later LyapLock run's 0.50, the same work): a first call's cost is
    not in a method's "eval"."""
    import time
    import bench
    import eval as E
    calls = []

    def edit_eval(m, batch):
        calls.append(len(batch))
        time.sleep(1.0 if len(calls) == 1 else 0.0)        # a cost the first call alone pays
    monkeypatch.setattr(E, "edit_eval", edit_eval)
    r = bench.main(["--preset", "tiny", "--edits", "2", "--stats-tokens", "300", "--method", "lyaplock", "--no-hf"])[0]
    assert calls and set(calls) == {2} and r["steps"]["lyaplock"]["eval"] < 0.5
