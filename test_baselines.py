"""Tests of baselines.py: each comparison method's defining property on random matrices, the
plug-ins' identities, and agreement with the authors' code (fixtures/oracle-baselines)."""
import hashlib
import json
import math

import pytest
import torch
from safetensors.torch import load_file

import baselines as B
import data
import eval as E
import lyaplock as L
import stats as S
import model as M
from test_lyaplock import DEVICES, FIX, ORACLE, STORIES, _oracle_z_rows, close

BASE = FIX / "oracle-baselines"
EPS32 = 2.0 ** -24            # float32 unit roundoff
SVD32 = 32 * EPS32            # float32 SVD: |σ − σ̂| ≤ c·ε32·‖A‖ (backward stable, Weyl); c ≈ 8 seen


# ----------------------------------------------------------------------------- random problems

def rnd(seed, past=3):
    """A random editing problem: W0, W, C = K0K0ᵀ/N, keys K1, residuals R, past keys Kp."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, dtype=torch.float64, generator=g)
    u = lambda lo, hi: lo + (hi - lo) * float(torch.rand((), generator=g, dtype=torch.float64))
    d, m, n = int(u(2, 9)), int(u(4, 14)), int(u(1, 5))
    N = m + 20
    K0, W0, Kp = r(m, N), r(d, m), r(m, past)
    return dict(d=d, m=m, n=n, K0=K0, N=N, C=K0 @ K0.T / N, W0=W0, W=W0 + 0.3 * r(d, m),
                K1=r(m, n), R=r(d, n), Kp=Kp, S_KK=Kp @ Kp.T if past else None,
                z=u(1, 5), lam=10 ** u(-1, 1), V=10 ** u(-1, 1), g=g)


def pl(P, W):
    """PL(W) by its Frobenius form on the explicit K0 (E2)."""
    return (((W - P["W0"]) @ P["K0"]) ** 2).sum() / P["N"]


def assert_minimum(f, delta, g, directions=lambda E: E):
    """∇f(Δ) = 0 by autograd (projected onto the allowed directions) and no random allowed
    perturbation lowers f."""
    x = delta.clone().requires_grad_()
    value = f(x)
    (grad,) = torch.autograd.grad(value, x)
    zero = torch.zeros_like(delta, requires_grad=True)
    scale = 1 + float(directions(torch.autograd.grad(f(zero), zero)[0]).norm())
    assert float(directions(grad).norm()) <= 1e-11 * scale
    for eps in (1e-4, 1e-2, 1.0):
        for _ in range(10):
            E = directions(torch.randn(delta.shape, dtype=torch.float64, generator=g))
            assert f(delta + eps * E) >= value.detach()


# ----------------------------------------------------------------------------- memit-seq (E15)

@pytest.mark.parametrize("seed", range(10))
def test_memit_seq_solves_its_normal_equation_and_minimises_its_objective(seed):
    P = rnd(seed)
    K1, R, C, lam, S = P["K1"], P["R"], P["C"], P["lam"], P["S_KK"]
    delta = B.solve_memit_seq(K1, R, C, lam, S)
    A = lam * C + S + K1 @ K1.T
    close(delta @ A, R @ K1.T, 1e-12)                                         # E15
    f = lambda D: ((D @ K1 - R) ** 2).sum() + ((D @ P["Kp"]) ** 2).sum() + lam * ((D @ P["K0"]) ** 2).sum() / P["N"]
    assert_minimum(f, delta, P["g"])


@pytest.mark.parametrize("seed", range(10))
def test_memit_seq_is_memit_at_step_0_and_holds_past_keys_after_it(seed):
    P = rnd(seed)
    K1, R, C, lam = P["K1"], P["R"], P["C"], P["lam"]
    close(B.solve_memit_seq(K1, R, C, lam), L.solve_memit(K1, R, C, lam), 1e-13)
    moved = [float((B.solve_memit_seq(K1, R, C, lam, c * P["S_KK"]) @ P["Kp"]).norm())
             for c in (0.0, 1.0, 10.0, 1e3)]
    assert all(a >= b * (1 - 1e-10) for a, b in zip(moved, moved[1:])), moved  # past outputs held
    assert moved[-1] < 0.1 * moved[0]


def test_memit_seq_solves_in_float64_from_float32_keys():
    """The pipeline hands over float32 keys (E5): the algebra is float64 all the same (E15)."""
    P = rnd(0)
    K1, R = P["K1"].float(), P["R"].float()
    ours = B.solve_memit_seq(K1, R, P["C"], P["lam"], P["S_KK"])
    want = B.solve_memit_seq(K1.double(), R.double(), P["C"], P["lam"], P["S_KK"])
    assert ours.dtype == torch.float64
    close(ours, want, 1e-13)


# ----------------------------------------------------------------------------- RECT (E16)

@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("percent", [40, 10, 75.5, 99.99, 100, 0])
def test_rect_keeps_exactly_the_entries_their_threshold_counts(seed, percent):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(64, 172, generator=g)                                      # float32, as stored
    delta = torch.randn(64, 172, dtype=torch.float64, generator=g)
    mask, threshold = B.rect_mask(delta, W, percent)
    ratio = (delta / (W + 1e-8).double()).abs()
    k = int(W.numel() * (100 - percent) / 100)
    assert int(mask.sum()) == (W.numel() - k + 1 if k else W.numel())         # no ties here
    assert k or threshold == 0.0                                              # keep all: τ = 0
    if k:
        assert threshold == float(ratio.flatten().sort().values[k - 1])
        assert float(ratio[mask].min()) >= float(ratio[~mask].max() if (~mask).any() else 0)
    kept = B.rect_update(delta, W, percent)
    assert torch.equal(kept[mask], delta[mask]) and not kept[~mask].any()


def test_rect_their_40_percent_and_ties():
    g = torch.Generator().manual_seed(0)
    W, delta = torch.ones(64, 172), torch.randn(64, 172, dtype=torch.float64, generator=g)
    assert int(B.rect_mask(delta, W)[0].sum()) == 4405          # 11008 − int(0.6·11008) + 1
    ties = torch.arange(11008, dtype=torch.float64).reshape(64, 172) // 100      # 100 equal ratios each
    mask, threshold = B.rect_mask(ties, W)                      # W + 1e-8 = 1 in float32
    assert threshold == 66.0 and int(mask.sum()) == 11008 - 6600   # every tie at the threshold kept
    assert torch.equal(mask, ties >= 66)
    few = torch.arange(1.0, 21.0, dtype=torch.float64).reshape(4, 5)     # k = int(20·10/100) = 2, not
    assert int(B.rect_mask(few, torch.ones(4, 5), 90)[0].sum()) == 19     # int(20·(1 − 0.9)) = int(1.99…)


def test_rect_with_a_float32_update_is_the_float64_rule():
    """A float32 Δ: the ratio, threshold and kept entries are those of the same Δ in float64 (E16)."""
    g = torch.Generator().manual_seed(3)
    W, delta = torch.randn(64, 172, generator=g), torch.randn(64, 172, generator=g)
    mask, threshold = B.rect_mask(delta, W)
    mask64, threshold64 = B.rect_mask(delta.double(), W)
    assert torch.equal(mask, mask64) and threshold == threshold64
    kept = B.rect_update(delta, W)
    assert kept.dtype == torch.float64 and torch.equal(kept, B.rect_update(delta.double(), W))


def test_rect_eps_separates_zero_weights():
    """Entries where W is exactly 0 get the ratio |Δ|/1e-8 (their eps), not ∞: they are ranked
    by |Δ| among themselves, so the count kept stays numel − k + 1 (E16)."""
    g = torch.Generator().manual_seed(4)
    W = torch.randn(20, 50, generator=g)
    W[:, :30] = 0.0                                             # 60% of W zero: the threshold among them
    delta = torch.randn(20, 50, dtype=torch.float64, generator=g)
    mask, threshold = B.rect_mask(delta, W)
    assert math.isfinite(threshold) and int(mask.sum()) == 1000 - 600 + 1
    assert not mask[:, 30:].any()                               # the zero weights' entries rank first


def test_rect_rejects_bad_input():
    with pytest.raises(B.BaselineError, match="keep_percent"):
        B.rect_mask(torch.ones(2, 3), torch.ones(2, 3), 140)
    with pytest.raises(B.BaselineError, match="differ"):
        B.rect_mask(torch.ones(2, 3), torch.ones(3, 2))


# ----------------------------------------------------------------------------- PRUNE (E17)

def svd_problem(seed, d=7, m=12):
    """W0 and an update U diag(S) Vᵀ whose singular values lie on both sides of σ_max(W0)."""
    g = torch.Generator().manual_seed(seed)
    W0 = torch.randn(d, m, dtype=torch.float64, generator=g)
    smax = float(torch.linalg.matrix_norm(W0, ord=2))
    U = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=g))[0]
    V = torch.linalg.qr(torch.randn(m, d, dtype=torch.float64, generator=g))[0]
    S = (smax * torch.linspace(3.0, 0.1, d, dtype=torch.float64)).sort(descending=True).values
    return W0, smax, U, S, V


@pytest.mark.parametrize("seed", range(10))
def test_prune_shrinks_by_the_log_rule_and_leaves_the_rest(seed):
    W0, smax, U, S, V = svd_problem(seed)
    update = (U * S) @ V.T
    restrained = B.prune_restrain(update, smax)
    rule = torch.where(S > smax, torch.log(S) - math.log(smax) + smax, S)
    close(torch.linalg.svdvals(restrained), rule, 1e-13)                       # E17
    close(restrained, (U * rule) @ V.T, 1e-13)                                # same singular vectors
    small = S <= smax
    close(restrained @ V[:, small], U[:, small] * S[small], 1e-13)             # untouched
    assert bool(((rule[~small] > smax) & (rule[~small] < S[~small])).all())    # shrunk, not capped
    W = W0 + update
    close(B.prune_weight(W, W0) - W0, restrained, 1e-13)                      # W0 + restrained
    at = torch.tensor([smax], dtype=torch.float64)
    assert torch.equal(B.prune_singular_values(at, smax), at)                # continuous at σ_max
    below = (U[:, small] * S[small]) @ V[:, small].T
    close(B.prune_weight(W0 + below, W0), W0 + below, 1e-14)                  # nothing above: no-op


def test_prune_keeps_the_weight_dtype_and_rejects_bad_input():
    W0, smax, U, S, V = svd_problem(0)
    W = (W0 + (U * S) @ V.T).float()
    assert B.prune_weight(W, W0.float()).dtype == torch.float32
    with pytest.raises(B.BaselineError, match="differ"):
        B.prune_weight(W, W0.T)
    with pytest.raises(B.BaselineError, match="original weight is zero"):
        B.prune_weight(W, torch.zeros_like(W))
    for sigma_max in (0.0, -1.0, math.nan, math.inf):   # ln σ_max: not a math domain error, not a no-op
        with pytest.raises(B.BaselineError, match="σ_max must be positive"):
            B.prune_singular_values(S, sigma_max)


def test_prune_is_float64_algebra_whatever_the_input_dtype():
    """float32 weights (as stored), a float64 W0 or float32 inputs to the rule's pieces: the same
    float64 algebra, cast back to W's dtype only at the end (E17), bit for bit."""
    W0, smax, U, S, V = svd_problem(1, d=24, m=40)
    W = W0 + (U * S) @ V.T
    W32, W0_32 = W.float(), W0.float()
    want = B.prune_weight(W32.double(), W0_32.double())
    assert torch.equal(B.prune_weight(W32, W0_32), want.float())               # W − W0 in float64
    assert B.prune_weight(W32, W0).dtype == torch.float32                      # W's dtype, not W0's
    upd = (W32 - W0_32)
    close(B.prune_restrain(upd, smax), B.prune_restrain(upd.double(), smax), 1e-13)
    S32 = S.float()
    out = B.prune_singular_values(S32, smax)
    assert out.dtype == torch.float64 and torch.equal(out, B.prune_singular_values(S32.double(), smax))


# ----------------------------------------------------------------------------- ROME (E18–E20)

@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("bias", [False, True])
def test_rome_is_rank_one_and_maps_the_edited_key_to_its_target(seed, bias):
    P = rnd(seed)
    g, d, m = P["g"], P["d"], P["m"]
    k_mean, k_star, v_star = (torch.randn(s, dtype=torch.float64, generator=g) for s in (m, m, d))
    b = torch.randn(d, dtype=torch.float64, generator=g) if bias else None
    delta = B.solve_rome(P["W"], L.cholesky_factor(L.f64(P["C"])), k_mean, k_star, v_star, b)
    s = torch.linalg.svdvals(delta)
    assert float(s[1] / s[0]) <= 1e-14                                        # rank one (E20)
    close((P["W"] + delta) @ k_star + (0 if b is None else b), v_star, 1e-12)   # W'k* + b = v*
    u = B.rome_left_vector(k_mean, L.cholesky_factor(L.f64(P["C"])))          # E18
    assert abs(float(u.norm()) - 1) <= 1e-14
    close(P["C"] @ u / (P["C"] @ u).norm(), k_mean / k_mean.norm(), 1e-11)     # u ∝ C⁻¹k̄
    close(delta, torch.outer(delta @ u, u), 1e-13)                            # Δ = v uᵀ


@pytest.mark.parametrize("seed", range(6))
def test_rome_with_the_edited_key_as_mean_is_the_smallest_preserving_change(seed):
    """With k̄ = k*, Δ = v uᵀ minimises tr(ΔCΔᵀ) over all Δ with (W + Δ)k* = v* (ROME's claim)."""
    P = rnd(seed)
    g, d, m, C = P["g"], P["d"], P["m"], P["C"]
    k, v_star = torch.randn(m, dtype=torch.float64, generator=g), torch.randn(d, dtype=torch.float64, generator=g)
    delta = B.solve_rome(P["W"], L.cholesky_factor(C), k, k, v_star)
    feasible = lambda E: E - torch.outer(E @ k, k) / (k @ k)                   # E k* = 0
    assert_minimum(lambda D: ((D @ C) * D).sum(), delta, g, feasible)


def test_rome_rejects_an_orthogonal_key():
    C = torch.eye(3, dtype=torch.float64)
    with pytest.raises(B.BaselineError, match="orthogonal"):
        B.solve_rome(torch.zeros(2, 3), L.cholesky_factor(C), torch.tensor([1.0, 0, 0]), torch.tensor([0, 1.0, 0]), torch.ones(2))
    with pytest.raises(B.BaselineError, match="zero"):
        B.rome_left_vector(torch.zeros(3), L.cholesky_factor(C))
    for bad in (math.inf, math.nan):                  # an overflowed mean key: not a NaN/zero u
        with pytest.raises(B.BaselineError, match="not finite"):
            B.rome_left_vector(torch.tensor([bad, 1.0, 0]), L.cholesky_factor(C))
    for bad in (math.inf, math.nan):                  # a key that overflowed is not called orthogonal
        with pytest.raises(B.BaselineError, match="not finite"):
            B.rome_right_vector(torch.zeros(2), torch.tensor([bad, 0, 0]), torch.ones(2), torch.tensor([1.0, 0, 0]))


# ----------------------------------------------------------------------------- plug-ins (E21, E22)

def lyaplock_memit_seq_objective(P, D):
    """E21 written directly: V[‖ΔK1 − R‖² + ‖ΔKp‖²] + zλ·PL(W + Δ)."""
    edit = ((D @ P["K1"] - P["R"]) ** 2).sum() + ((D @ P["Kp"]) ** 2).sum()
    return P["V"] * edit + P["z"] * P["lam"] * pl(P, P["W"] + D)


def lm_seq(P, **over):
    Q = {**P, **over}
    return B.solve_lyaplock_memit_seq(Q["W"], Q["W0"], Q["C"], Q["K1"], Q["R"], Q["S_KK"], Q["z"], Q["lam"], Q["V"])


@pytest.mark.parametrize("seed", range(10))
def test_lyaplock_memit_seq_minimises_its_objective(seed):
    P = rnd(seed)
    assert_minimum(lambda D: lyaplock_memit_seq_objective(P, D), lm_seq(P), P["g"])
    # E9 with the past edits' values taken as their current outputs W·Kp
    close(lm_seq(P), L.solve_lyaplock(P["W"], P["W0"], P["C"], P["K1"], P["R"], P["S_KK"],
                                      P["W"] @ P["S_KK"], P["z"], P["lam"], P["V"]), 1e-11)


@pytest.mark.parametrize("seed", range(10))
def test_lyaplock_memit_seq_at_the_floor(seed):
    """First step (W = W0, no memory, z = V = 1): memit-seq's first step. At the floor later on it
    is memit-seq measured from the current weight (W0 := W), not memit-seq itself."""
    P = rnd(seed)
    first = lm_seq(P, W=P["W0"], S_KK=None, z=1.0, V=1.0)
    close(first, B.solve_memit_seq(P["K1"], P["R"], P["C"], P["lam"]), 1e-12)
    memit_seq = B.solve_memit_seq(P["K1"], P["R"], P["C"], P["lam"], P["S_KK"])
    close(lm_seq(P, W0=P["W"], z=1.0, V=1.0), memit_seq, 1e-11)
    assert float((lm_seq(P, z=1.0, V=1.0) - memit_seq).norm()) > 1e-6 * float(memit_seq.norm())


@pytest.mark.parametrize("seed", range(10))
def test_lyaplock_rect_and_prune_first_step_at_the_floor_is_theirs(seed):
    """lyaplock+rect: E9 then RECT's mask; lyaplock+prune: E9 steps, PRUNE's restraint at the
    end. Their first steps at the floor (z = 1, W = W0, no memory) are MEMIT's (E10), so they
    equal RECT's and PRUNE's first steps."""
    P = rnd(seed, past=0)
    W0, K1, R, C, lam = P["W0"], P["K1"], P["R"], P["C"], P["lam"]
    ours = L.solve_lyaplock(W0, W0, C, K1, R, None, None, 1.0, lam, 1.0)
    theirs = L.solve_memit(K1, R, C, lam)
    m1, _ = B.rect_mask(ours, W0)
    m2, _ = B.rect_mask(theirs, W0)
    assert torch.equal(m1, m2)
    close(B.rect_update(ours, W0), B.rect_update(theirs, W0), 1e-12)
    close(B.prune_weight(W0 + ours, W0), B.prune_weight(W0 + theirs, W0), 1e-12)


def projector(seed, m):
    g = torch.Generator().manual_seed(1000 + seed)
    U = torch.linalg.qr(torch.randn(m, m, dtype=torch.float64, generator=g))[0][:, :max(1, m // 2)]
    return U @ U.T


def lm_alpha(P, Pr, **over):
    Q = {**P, **over}
    return B.solve_lyaplock_alphaedit(Q["W"], Q["W0"], Q["C"], Q["K1"], Q["R"], Pr, Q["S_KK"],
                                      Q["z"], Q["lam"], Q["V"], Q.get("l2", 0.7))


@pytest.mark.parametrize("seed", range(10))
def test_lyaplock_alphaedit_minimises_its_objective_over_projected_updates(seed):
    P = rnd(seed)
    Pr, l2 = projector(seed, P["m"]), 0.7
    delta = lm_alpha(P, Pr)
    close(delta @ Pr, delta, 1e-12)                                           # Δ = ΔP
    M, right = B.lyaplock_alphaedit_system(P["W"], P["W0"], P["C"], P["K1"], P["R"], Pr, P["S_KK"],
                                           P["z"], P["lam"], P["V"], l2)
    close(delta @ M, right, 1e-12)                                            # E22

    def objective(D):      # over Δ̃ with Δ = Δ̃P (E22)
        D = D @ Pr
        edit = ((D @ P["K1"] - P["R"]) ** 2).sum() + ((D @ P["Kp"]) ** 2).sum() + l2 * (D ** 2).sum()
        return P["V"] * edit + (P["z"] - 1) * P["lam"] * pl(P, P["W"] + D)
    assert_minimum(objective, delta, P["g"], lambda E: E @ Pr)


@pytest.mark.parametrize("seed", range(10))
def test_lyaplock_alphaedit_at_the_floor_is_alphaedit_at_any_step(seed):
    P = rnd(seed)
    Pr = projector(seed, P["m"])
    for S_KK in (None, P["S_KK"]):
        close(lm_alpha(P, Pr, z=1.0, S_KK=S_KK), L.solve_alphaedit(P["K1"], P["R"], Pr, S_KK, 0.7), 1e-11)
    pls = [float(pl(P, P["W"] + lm_alpha(P, Pr, z=z))) for z in (1.0, 2.0, 10.0, 1e3)]
    assert all(a >= b * (1 - 1e-12) for a, b in zip(pls, pls[1:])), pls      # the queue protects
    for z in (0.5, math.nan):                        # NaN is not past the floor either
        with pytest.raises(B.BaselineError, match="at least 1"):
            lm_alpha(P, Pr, z=z)
    ls = L.LayerState()                      # the floor as the queue computes it: a·Z, rounded
    L.feed_queue(ls, 0.3, 7.0)
    close(lm_alpha(P, Pr, z=ls.z), lm_alpha(P, Pr, z=1.0), 1e-12)


def test_lyaplock_alphaedit_just_under_the_floor_is_the_floor_exactly():
    """A z rounded just below 1 adds no negative multiple of C (excess clamped at 0); a float32 P
    and the default L2 (their 10) give AlphaEdit's E12 (E22)."""
    P = rnd(2)
    Pr = projector(2, P["m"])
    assert torch.equal(lm_alpha(P, Pr, z=1 - 1e-10), lm_alpha(P, Pr, z=1.0))
    close(lm_alpha(P, Pr.float().double(), z=1.0), lm_alpha(P, Pr.float(), z=1.0), 1e-13)
    default = B.solve_lyaplock_alphaedit(P["W"], P["W0"], P["C"], P["K1"], P["R"], Pr, P["S_KK"], 1.0, P["lam"])
    close(default, L.solve_alphaedit(P["K1"], P["R"], Pr, P["S_KK"], 10.0), 1e-11)


@pytest.mark.parametrize("seed", range(5))
def test_lyaplock_alphaedit_in_a_singular_cs_null_space_leaves_the_queue_uncalibrated(seed):
    """C of rank m − 2 (dead units, a repetitive corpus, an Editor's own C): E22's Δ lies in its
    null space, where PL is 0 but measured as float64 rounding of either sign (±1e-18): the queue
    stays at its floor, uncalibrated, as after a step that left W0 (was: an error for a negative
    rounding, or D calibrated on rounding, a ≈ 1e9). A C whose small eigenvalues are real (1e-6)
    calibrates on the PL they give."""
    g = torch.Generator().manual_seed(seed)
    d, m = 4, 6
    K0 = torch.randn(m, m - 2, dtype=torch.float64, generator=g)
    W0, K1, R = (torch.randn(*shape, dtype=torch.float64, generator=g) for shape in ((d, m), (m, 2), (d, 2)))
    hp = L.HParams(method="lyaplock+alphaedit", lam=1.0, alpha=1.0)
    singular = K0 @ K0.T / (m - 2)
    for C, calibrates in ((singular, False), (singular + 1e-6 * torch.eye(m, dtype=torch.float64), True)):
        ls = L.LayerState()
        W1, loss = L.step_layer(W0, W0, C, K1, R, ls, hp)
        assert (W1 - W0).norm() > 0.1                          # the layer did move
        assert (ls.D_base is not None) == calibrates, (loss, L.loss_rounding(W1, W0, C))
        assert calibrates or (ls.z == 1.0 and abs(loss) < 1e-15)
        assert not calibrates or ls.D_base == loss > 1e-9


# ----------------------------------------------------------------------------- the authors' code

def base(method):
    """(hyper-parameters and hashes, tensors) of one method's trimmed oracle."""
    return json.loads((BASE / "oracle.json").read_text())[method], load_file(BASE / f"{method}.safetensors")


def lyaplock_inputs():
    """C (float32, as their caches held it), the probe X and W0, from fixtures/oracle (build.py
    checked them equal to this oracle's)."""
    st, b0 = load_file(ORACLE / "stats.safetensors"), load_file(ORACLE / "batch_00.safetensors")
    return {l: st[f"C32.{l}"].double() for l in (1, 2)}, st["probe"], {l: b0[f"W_before.{l}"] for l in (1, 2)}


def sha(W) -> str:
    return hashlib.sha256(W.contiguous().numpy().tobytes()).hexdigest()


def inputs(t, k, l, i, n_layers=2):
    """K1 (m, n) and R = (z* − h)/(L − i) (d, n), the difference in float32, as their code (E6)."""
    return t[f"{k}.ks.{l}"].double().T, (t[f"{k}.z"] - t[f"{k}.cur_zs.{l}"]).double().T / (n_layers - i)


@pytest.mark.parametrize("method", ["MEMIT", "MEMIT_seq", "MEMIT_rect", "MEMIT_prune"])
@pytest.mark.parametrize("i", [0, 1])
def test_oracle_memit_family_batch_by_batch(method, i):
    """Their keys and residuals into our rules: Δ to float64 rounding (their solve is float64
    LU, ours Cholesky), the weights after each batch bitwise, RECT's threshold and mask exactly.
    memit-seq's memory is their float32 cache_c, replayed in float32."""
    info, t = base(method)
    C, X, W0 = lyaplock_inputs()
    l, lam = info["hparams"]["layers"][i], info["hparams"]["mom2_update_weight"]
    W, cache, memory = W0[l], None, None
    for k in range(info["n_batches"]):
        K1, R = inputs(t, k, l, i)
        if method == "MEMIT_seq":
            delta = B.solve_memit_seq(K1, R, C[l], lam, None if cache is None else cache.double())   # E15
            ours = B.solve_memit_seq(K1, R, C[l], lam, memory)       # our float64 memory instead
            close(ours @ X, t[f"{k}.upd_X.{l}"], 1e-5)              # their cache's rounding
            memory = K1 @ K1.T if memory is None else memory + K1 @ K1.T
        else:
            delta = L.solve_memit(K1, R, C[l], lam)                                                 # E10
        close(delta @ X, t[f"{k}.upd_X.{l}"], 1e-12)
        if method == "MEMIT_rect":
            mask, threshold = B.rect_mask(delta, W)                                                 # E16
            assert torch.equal(mask, t[f"{k}.rect_mask.{l}"]) and int(mask.sum()) == 4405
            assert abs(threshold - float(t[f"{k}.rect_threshold.{l}"])) <= 1e-12 * threshold
            delta = B.rect_update(delta, W)
        W = W + delta.float()
        if method == "MEMIT_prune" and k == info["n_batches"] - 1:
            assert sha(W) == info["sha256"][f"{k}.W_memit.{l}"]
            check_prune_restraint(info, t, k, l, W, W0[l], X)
        else:
            assert sha(W) == info["sha256"][f"{k}.W_after.{l}"]
        ks = t[f"{k}.ks.{l}"]
        cache = ks.T @ ks if cache is None else cache + ks.T @ ks          # their cache_c (float32)
        if method == "MEMIT_seq":
            close(cache.double() @ X, t[f"{k}.cache_c_X.{l}"], 1e-15)


def check_prune_restraint(info, t, k, l, W_memit, W0, X):
    """PRUNE after the last batch (E17): σ_max(W0), the singular values of W − W0, the log rule
    and the restrained update, against their float32 SVDs; then their quirk: they ADD the
    restrained update to the already-updated weight, while ours puts W0 + restrained."""
    S_W0, S_upd, S_adj = (t[f"{k}.prune.{n}.{l}"].double() for n in ("S_W0", "S_upd", "S_adj"))
    theirs = t[f"{k}.prune.upd_restrained.{l}"]
    sigma_max = float(torch.linalg.matrix_norm(W0.double(), ord=2))
    svd_tol = SVD32 * float(S_upd[0])
    assert abs(sigma_max - float(S_W0.max())) <= SVD32 * sigma_max
    upd = W_memit.double() - W0.double()
    S = torch.linalg.svdvals(upd)
    assert float((S - S_upd).abs().max()) <= svd_tol
    close(B.prune_singular_values(S_upd, float(S_W0.max())), S_adj, 4 * EPS32)       # their rule, f32
    n_big = int((S > sigma_max).sum())
    assert n_big == int((S_upd > S_W0.max()).sum()) == {1: 6, 2: 5}[l]
    close(B.prune_singular_values(S, sigma_max)[:n_big], S_adj[:n_big], svd_tol / sigma_max)
    # the restrained update: their float32 SVD's singular vectors move by ‖E‖/gap (layer 1 has
    # σ = 5.95 and 5.79, so a gap of 0.16); measured 1.1e-6
    close(B.prune_restrain(upd, sigma_max), theirs, 1e-5)
    assert sha(W_memit + theirs) == info["sha256"][f"{k}.W_after.{l}"]        # their W + restrained
    close(t[f"{k}.W_after_X.{l}"], (W_memit + theirs).double() @ X, 1e-15)
    intended = B.prune_weight(W_memit, W0)                                    # ours: W0 + restrained
    close(intended.double() - W0.double(), theirs, 1e-5)
    sig = lambda A: float(torch.linalg.matrix_norm(A.double() - W0.double(), ord=2))
    assert sig(intended) < sig(W_memit) < sig(W_memit + theirs)    # theirs grows W − W0


@pytest.mark.parametrize("i", [0, 1])
def test_oracle_alphaedit_batch_by_batch(i):
    """AlphaEdit's E11/E12 with their keys, residuals and (float32) cache_c. Their projector comes
    from a float32 SVD (subspace error ≤ ε32‖C‖/gap, Davis–Kahan) and their solve is float32
    (error ≤ cond(M)·ε32), which bound the agreement; the float64 algebra is ours."""
    info, t = base("AlphaEdit")
    C, X, _ = lyaplock_inputs()
    l, l2 = info["hparams"]["layers"][i], info["hparams"]["L2"]
    P = L.alphaedit_projector(C[l], info["hparams"]["nullspace_threshold"])         # E11
    ev = torch.linalg.eigvalsh(C[l])
    rank = int((ev < 2e-2).sum())
    assert rank == info["projector_rank"][str(l)]
    close(P @ X, t[f"P_X.{l}"], EPS32 * float(ev[-1]) / float(ev[rank] - ev[rank - 1]))
    cache = None
    for k in range(info["n_batches"]):
        K1, R = inputs(t, k, l, i)
        S = None if cache is None else cache.double()
        delta = L.solve_alphaedit(K1, R, P, S, l2)                                    # E12
        M = (K1 @ K1.T + (0 if S is None else S)) @ P + l2 * torch.eye(P.shape[0], dtype=torch.float64)
        close(delta @ X, t[f"{k}.upd_X.{l}"], float(torch.linalg.cond(M)) * EPS32)
        ks = t[f"{k}.ks.{l}"]
        cache = ks.T @ ks if cache is None else cache + ks.T @ ks
        close(cache.double() @ X, t[f"{k}.cache_c_X.{l}"], 1e-15)


def test_oracle_rome_one_request_at_a_time():
    """ROME over 12 requests, one rank-one update each (their batches of 1): the flat key mean,
    u, the current output W k*, v, and the weight after each edit (bitwise from their u, v)."""
    info, t = base("ROME_batch1")
    C, X, W0 = lyaplock_inputs()
    C, W = C[2], W0[2]
    cond = float(torch.linalg.cond(C))
    for k in range(info["n_batches"]):
        k_mean, k_star, v_star = t[f"{k}.u.k_mean"], t[f"{k}.k_star"], t[f"{k}.v_star"]
        assert torch.equal(t[f"{k}.u.k_ctx"].mean(0), k_mean)              # flat mean over templates
        u = B.rome_left_vector(k_mean, L.cholesky_factor(C))                                  # E18
        close(u, t[f"{k}.u"], cond * EPS32)                                # their float32 inverse
        current = W.double() @ k_star.double()
        close(current, t[f"{k}.v_cur_output"], 172 * EPS32)               # their float32 forward
        close(current, t[f"{k}.cv.target_init"], 172 * EPS32)             # compute_v's norm base: W k*
        v = B.rome_right_vector(t[f"{k}.v_cur_output"], k_star, v_star, t[f"{k}.u"])   # E19
        close(v, t[f"{k}.v"], 8 * EPS32)
        delta = B.solve_rome(W, L.cholesky_factor(C), k_mean, k_star, v_star)                 # E20, all ours
        close((W.double() + delta) @ k_star.double(), v_star, 1e-12)       # W′k* = v*
        # u's error, and v's from our W k* against their float32 one, amplified by ‖v*‖/‖v* − Wk*‖ (≤ 2 here)
        close(delta @ X, t[f"{k}.W_after_X.2"] - W.double() @ X, cond * EPS32 + 2 * 172 * EPS32)
        W = W + torch.outer(t[f"{k}.v"].double(), t[f"{k}.u"].double()).float()   # their v uᵀ
        assert sha(W) == info["sha256"][f"{k}.W_after.2"]


# ----------------------------------------------------------------------------- end to end

def hp_of(hparams) -> L.HParams:
    """Our HParams for their target-value step (E4)."""
    return L.HParams(layers=tuple(hparams["layers"]), v_num_grad_steps=hparams["v_num_grad_steps"],
                     v_lr=hparams["v_lr"], v_weight_decay=hparams["v_weight_decay"],
                     clamp_norm_factor=hparams["clamp_norm_factor"], kl_factor=hparams["kl_factor"])


# Agreement end to end: float32 forward noise (1e-6) through 25 Adam steps; v_lr 0.5 (PRUNE's
# settings) amplifies it (Adam's first step is −lr·sign(g)); AlphaEdit's float32 solve (1e-5)
# carries into the next batches' targets.
PIPELINE_TOL = {"MEMIT_seq": 1e-5, "MEMIT_rect": 1e-5, "MEMIT_prune": 1e-4, "AlphaEdit": 5e-5}


def check_pipeline(method, step, device="cpu"):
    """Replay one method's three batches end to end on stories260K with their token ids: our
    compute_z (E4), keys (E5) and current outputs, then `step(layer, W, K1, R)` →
    (W seen by the batch's later layers, W kept); each compared with their run."""
    info, t = base(method)
    m = M.load(STORIES, device)
    C, _, W0 = lyaplock_inputs()
    X = load_file(ORACLE / "stats.safetensors")["probe"]
    hp = hp_of(info["hparams"])
    requests, _ = data.load_requests(ORACLE / "requests.json")
    templates = json.loads((ORACLE / "templates.json").read_text())
    n, layers = info["batch_size"], hp.layers
    rel = lambda a, b: float((a.cpu().double() - b.double()).norm() / b.double().norm())
    tol = PIPELINE_TOL[method]
    for k in range(info["n_batches"]):
        b = load_file(ORACLE / f"batch_{k:02d}.safetensors")          # their token ids (same for all)
        zs, _ = L.compute_z(m, _oracle_z_rows(b, n), n, layers[-1], hp)
        assert rel(zs, t[f"{k}.z"]) < tol                                                # E4
        rows = L.key_rows(m.tokenizer, requests[k * n:(k + 1) * n], templates)
        kept = {}
        for i, l in enumerate(layers):
            K, cur, _ = L.keys_and_outputs(m, rows, templates, l, layers[-1])
            assert rel(K, t[f"{k}.ks.{l}"]) < tol and rel(cur, t[f"{k}.cur_zs.{l}"]) < tol    # E5
            R = L.f64(t[f"{k}.z"].to(device) - cur) / (len(layers) - i)                      # E6
            seen, kept[l] = step(l, m.edit_weight(l), K.T, R.T)
            m.edit_weight(l).copy_(seen)
        for l in layers:
            m.edit_weight(l).copy_(kept[l])
            name = f"{k}.W_memit_X.{l}" if f"{k}.W_memit_X.{l}" in t else f"{k}.W_after_X.{l}"
            assert rel(m.edit_weight(l).double() @ X.to(device), t[name]) < tol    # PRUNE: before it
    return m, W0


OURS = {"MEMIT": "memit", "MEMIT_seq": "memit-seq", "MEMIT_rect": "rect", "MEMIT_prune": "prune",
        "AlphaEdit": "alphaedit"}


def registry_step(method, info, C, W0):
    """Our method registry's rule (lyaplock.step_layer with --method OURS[method]) as a
    `check_pipeline` step; for RECT the batch's later layers see the full update, replaying their
    quirk 6 (ours let them see the masked one: docs/LYAPLOCK.md §10)."""
    hp = L.HParams(method=OURS[method], lam=info["hparams"].get("mom2_update_weight", 15.0),
                   l2=info["hparams"].get("L2", 10.0))
    states = {}

    def step(l, W, K1, R):
        ls, Cl = states.setdefault(l, L.LayerState()), C[l].to(W.device)
        kept, _ = L.step_layer(W, W0[l].to(W.device), Cl, K1, R, ls, hp)
        if method == "MEMIT_rect":
            return W + L.memit_step(W, None, Cl, K1, R, ls, hp).to(W.dtype), kept
        return kept, kept
    return step


@pytest.mark.parametrize("method", ["MEMIT_seq", "MEMIT_rect", "MEMIT_prune", "AlphaEdit"])
def test_pipeline_matches_the_authors_code(method):
    info, _ = base(method)
    C, _, W0 = lyaplock_inputs()
    m, W0 = check_pipeline(method, registry_step(method, info, C, W0))
    if method == "MEMIT_prune":          # the restraint after the last batch, ours and theirs
        _, t = base(method)
        for l in info["hparams"]["layers"]:
            W = m.edit_weight(l)
            restrained = B.prune_weight(W, W0[l]).double() - W0[l].double()
            close(restrained, t[f"2.prune.upd_restrained.{l}"], 1e-4)


def check_rome_pipeline(edit, device="cpu", tol=1e-5):
    """ROME over their 12 requests, one rank-one update each, end to end on stories260K:
    `edit(model, j, request, templates)` → dict(k_mean, k_star, v_star, W) (W: the edited layer's
    weight after request j); each compared with their run (float32 forward noise). Before each
    request the layer holds THEIR weight (W0 + their v uᵀ so far, bitwise as their run), so the
    comparison of one request does not compound the noise of the earlier ones."""
    info, t = base("ROME_batch1")
    m = M.load(STORIES, device)
    X = load_file(ORACLE / "stats.safetensors")["probe"]
    requests, _ = data.load_requests(ORACLE / "requests.json")
    templates = json.loads((ORACLE / "templates.json").read_text())
    rel = lambda a, b: float((a.cpu().double() - b.double()).norm() / b.double().norm())
    layer = info["hparams"]["layers"][0]
    theirs_W = m.edit_weight(layer).detach().cpu().clone()
    for j in range(info["n_batches"]):
        m.edit_weight(layer).copy_(theirs_W)
        out = edit(m, j, requests[j], templates)
        for name, theirs in (("k_mean", "u.k_mean"), ("k_star", "k_star"), ("v_star", "v_star")):
            assert rel(out[name], t[f"{j}.{theirs}"]) < tol, (j, name)
        assert rel(out["W"].double() @ X.to(device), t[f"{j}.W_after_X.{layer}"]) < tol
        theirs_W = theirs_W + torch.outer(t[f"{j}.v"], t[f"{j}.u"])                 # their v uᵀ
        assert sha(theirs_W) == info["sha256"][f"{j}.W_after.{layer}"]


def rome_edit(C, target):
    """ROME's locate step with our forward pass: the subject's last-token key in each template
    (flat mean k̄ for u, E18; the bare prompt's for k*), then E18–E20. `target(m, j, request)` gives
    v*: here their own (the lead's compute_z, run at the edit layer with the MLP output
    W k* as the norm base, replaces it)."""
    def edit(m, j, q, templates):
        layer = 2
        rows = L.key_rows(m.tokenizer, [q], templates)          # one row per template, "{}" first
        ids, mask = m.tokenizer.pad([r.ids for r in rows], device=m.embed.weight.device)
        look = torch.tensor([r.lookup for r in rows], device=ids.device)
        with torch.no_grad():
            keys = m(ids, mask, keys_at={layer}, stop_after=layer).keys[layer]
        keys = keys[torch.arange(len(rows), device=ids.device), look].float()       # (templates, m)
        k_mean, k_star, v_star = keys.mean(0), keys[0], target(m, j, q)
        W = m.edit_weight(layer)
        delta = B.solve_rome(W, L.cholesky_factor(C[layer].to(W.device)), k_mean, k_star, v_star)       # E18–E20
        return dict(k_mean=k_mean, k_star=k_star, v_star=v_star, W=W + delta.to(W.dtype))
    return edit


def test_rome_pipeline_with_their_targets():
    _, t = base("ROME_batch1")
    C, _, _ = lyaplock_inputs()
    check_rome_pipeline(rome_edit(C, lambda m, j, q: t[f"{j}.v_star"]))


def their_rome_rows(j):
    """Request j's target-value rows as their code built them (token ids, the decode quirk)."""
    b = load_file(ORACLE / f"batch_{j // 4:02d}.safetensors")
    rows = [r for r in _oracle_z_rows(b, 4) if r.req == j % 4]
    for r in rows:
        r.req = 0
    return rows


def our_rome_pieces(m, j, q, templates):
    """lyaplock's ROME locate step on their token ids: rome_keys, compute_z at the edit layer with
    the MLP output as the norm base (ROME's compute_v), then E18-E20."""
    info, _ = base("ROME_batch1")
    hp = hp_of(info["hparams"])
    C, _, _ = lyaplock_inputs()
    layer = hp.layers[0]
    W = m.edit_weight(layer)
    k_mean, k_star = L.rome_keys(m, q, templates, layer)
    current = W.float() @ k_star
    _, z_info = L.compute_z(m, their_rome_rows(j), 1, layer, hp, norm_base=current[None])
    v_star = current + z_info["delta"][0]
    delta = B.solve_rome(W, L.cholesky_factor(C[layer].to(W.device)), k_mean, k_star, v_star)
    return dict(k_mean=k_mean, k_star=k_star, v_star=v_star, W=W + delta.to(W.dtype))


def test_rome_pipeline_end_to_end():
    """Their 12 requests through our ROME locate step (keys, v* from compute_z with the MLP
    output as the norm base) and E18-E20: k̄, k*, v* and the weight after each request. The
    losses agree to 5e-7 at the first pass; ROME's v_lr 0.5 amplifies float32 forward noise to
    ~1e-5 over 25 Adam steps (as PRUNE's settings, PIPELINE_TOL)."""
    check_rome_pipeline(our_rome_pieces, tol=1e-4)


def test_rome_method_edits_every_request_of_a_batch_in_order(monkeypatch):
    """--method rome in batches of 4 edits every request, one rank-one update each, in order: the
    weights after each batch are those of the pieces run one request at a time (their run edits
    only the first request of a batch: the quirk we do not copy), and stay within the compounded
    float32 noise (v_lr 0.5, 12 sequential edits) of their batch-of-1 run."""
    info, t = base("ROME_batch1")
    C, X, W0 = lyaplock_inputs()
    hp = L.replace(hp_of(info["hparams"]), method="rome", batch_size=4)
    requests, _ = data.load_requests(ORACLE / "requests.json")
    templates = json.loads((ORACLE / "templates.json").read_text())
    alone = M.load(STORIES)
    one_by_one = []
    for j in range(12):
        alone.edit_weight(2).copy_(our_rome_pieces(alone, j, requests[j], templates)["W"])
        one_by_one.append(alone.edit_weight(2).clone())
    m, j = M.load(STORIES), iter(range(12))
    monkeypatch.setattr(L, "z_rows", lambda tok, reqs, tpl: their_rome_rows(next(j)))
    state = L.EditState.start("rome", hp.layers)
    for k in range(3):
        log = L.edit_batch(m, requests[4 * k:4 * k + 4], templates, hp, state, C, W0)
        W = m.edit_weight(2)
        assert torch.equal(W, one_by_one[4 * k + 3])
        theirs = t[f"{4 * k + 3}.W_after_X.2"]
        assert float((W.double() @ X - theirs).norm() / theirs.norm()) < 1e-3
        assert log["layers"][2]["pl"] == pytest.approx(L.preservation_loss(W, W0[2], C[2]), rel=1e-12)
    assert state.n_edits == 12 and state.layers[2].S_KK is None


# ----------------------------------------------------------------------------- in the registry

@pytest.mark.parametrize("plugin,theirs", [("lyaplock+memit-seq", "memit-seq"), ("lyaplock+rect", "rect"),
                                           ("lyaplock+prune", "prune"), ("lyaplock+alphaedit", "alphaedit")])
def test_registry_first_step_of_a_plugin_at_the_floor_is_theirs(plugin, theirs):
    """Through lyaplock.step_layer: step 0 of lyaplock+X (z = 1, empty memory, W = W0) is X's
    step 0 — for alphaedit with the same L2; the others' λ is LyapLock's, so X runs with it too."""
    P = rnd(5, past=0)
    evals, U = torch.linalg.eigh(P["C"])
    P["C"] = U @ torch.diag(torch.where(torch.arange(P["m"]) < P["m"] // 2, 1e-3, evals)) @ U.T   # a null space
    for_both = dict(lam=P["lam"], l2=0.7)
    W_plugin, _ = L.step_layer(P["W0"], P["W0"], P["C"], P["K1"], P["R"], L.LayerState(), L.HParams(method=plugin, **for_both))
    W_theirs, _ = L.step_layer(P["W0"], P["W0"], P["C"], P["K1"], P["R"], L.LayerState(), L.HParams(method=theirs, **for_both))
    close(W_plugin, W_theirs, 1e-11)


@pytest.mark.parametrize("plugin", ["lyaplock+memit-seq", "lyaplock+alphaedit"])
def test_registry_plugin_steps_take_the_queue_the_memory_and_v(plugin):
    """Through lyaplock.step_layer, two steps of a queue plug-in: step 0 with z = V = 1 whatever
    hp.V (the calibration step), step 1 with the queue value after it (α < 1: above the floor),
    hp.V and the memory S_KK = K1K1ᵀ of step 0, measured from W0 (E21, E22)."""
    P = rnd(6, past=0)
    evals, U = torch.linalg.eigh(P["C"])
    P["C"] = U @ torch.diag(torch.where(torch.arange(P["m"]) < P["m"] // 2, 1e-3, evals)) @ U.T   # a null space
    W0, C, lam, g = P["W0"], P["C"], P["lam"], P["g"]
    hp = L.HParams(method=plugin, lam=lam, V=2.5, alpha=0.25, l2=0.7)
    ls = L.LayerState()
    solve = lambda W, K1, R, S_KK, z, V: (
        B.solve_lyaplock_memit_seq(W, W0, C, K1, R, S_KK, z, lam, V) if plugin == "lyaplock+memit-seq"
        else B.solve_lyaplock_alphaedit(W, W0, C, K1, R, ls.P, S_KK, z, lam, V, 0.7))
    W1, _ = L.step_layer(W0, W0, C, P["K1"], P["R"], ls, hp)
    close(W1 - W0, solve(W0, P["K1"], P["R"], None, 1.0, 1.0), 1e-11)
    close(ls.S_KK, P["K1"] @ P["K1"].T, 1e-15)
    assert ls.z > 2                                                # 1 + (1 − α)/α = 4 here
    K1, R = (torch.randn(*s, dtype=torch.float64, generator=g) for s in ((P["m"], 2), (P["d"], 2)))
    S_KK, z = ls.S_KK.clone(), ls.z
    W2, _ = L.step_layer(W1, W0, C, K1, R, ls, hp)
    close(W2 - W1, solve(W1, K1, R, S_KK, z, 2.5), 1e-11)
    assert L.unread(plugin, "lam") is None and L.unread(plugin, "V") is None      # both weigh the solve


@pytest.mark.parametrize("method", list(L.METHODS))
def test_every_method_runs_through_the_command(tmp_path, method):
    from test_lyaplock import _cli
    extra = (["--layers", "2"] if method == "rome" else []) + (["--l2", "1"] if L.projected(method) else [])
    out = tmp_path / "run"
    assert L.main(_cli(tmp_path, "--out", str(out), "--limit", "4", "--batch-size", "2", "--no-generation",
                       "--method", method, *extra)) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == method and summary["n_edits"] == 4
    recorded = json.loads((out / "config.json").read_text())["hparams"]        # what the method reads, only
    assert {k for k in recorded if L.unread(method, k)} == set() and {"method", "layers", "batch_size"} <= set(recorded)
    log = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    queue = L.METHODS[method].queue
    assert all((v["z"] is not None) == queue for e in log for v in e["layers"].values())


def assert_the_command_scores_the_restrained_weights(editor, requests, restrained, tmp_path, monkeypatch):
    """finish: the final cases and general ability (perplexity on the held-out text's first 64
    paragraphs, of 65 here) are the restrained model's, as Editor.evaluate's."""
    texts = [f"Once upon a time there was a {w}." for w in ("cat", "dog", "girl", "boy") * 16]
    (tmp_path / "heldout.txt").write_text("\n".join(texts + ["The 65th paragraph."]) + "\n")
    with editor.restrained() as model:
        cases = L.score_cases(model, requests, False)
    seen = []
    monkeypatch.setattr(E, "perplexity", lambda model, given: seen.append(
        (given, [model.edit_weight(l).clone() for l in (1, 2)])) or 5.0)
    out = tmp_path / "run"
    out.mkdir()
    data.write_jsonl(out / "cases_pre.jsonl", cases)
    data.write_jsonl(out / "ability.jsonl", [dict(step=0, edits=0, final=False, perplexity=4.0)])
    settings = L.Settings(model=str(STORIES), edits="e", hparams=editor.hparams, generation=False,
                          heldout=str(tmp_path / "heldout.txt"))
    L.finish(editor, requests, settings, out, 0)
    summary, want = json.loads((out / "summary.json").read_text()), E.summarize(cases)
    assert {k: summary[k] for k in want} == want and summary["n_cases"] == len(requests) == 12
    (given, weights), = seen
    assert given == texts and all(torch.equal(W, restrained[l]) for l, W in zip((1, 2), weights))
    assert (summary["perplexity"], summary["pre"]["perplexity"]) == (5.0, 4.0)


@pytest.mark.parametrize("method", ["prune", "lyaplock+prune"])
def test_prune_evaluates_and_saves_the_restrained_weights_and_streams_the_others(tmp_path, method, monkeypatch):
    """PRUNE's restraint (E17) is applied to a copy: evaluation and the saved model see
    W0 + restrain(W − W0), the stream (and its checkpoints) keeps W; lyaplock+prune as PRUNE."""
    m = M.load(STORIES)
    C = S.load_or_collect_stats(m, STORIES, L.DEFAULT_CORPUS, 2000, (1, 2), tmp_path, log=lambda *a, **k: None)
    hp = L.HParams(method=method, layers=(1, 2), lam=15.0, v_lr=0.5, clamp_norm_factor=4.0)   # the oracle's
    editor = L.Editor(m, hp, C, [["{}"], ["Once upon a time. {}"]], model_path=STORIES)
    requests, _ = data.load_requests(ORACLE / "requests.json")
    for k in (0, 4, 8):
        editor.edit(requests[k:k + 4])
    stream = {l: m.edit_weight(l).clone() for l in (1, 2)}
    restrained = {l: B.prune_weight(stream[l], editor.W0[l]) for l in (1, 2)}
    sigma = lambda W: float(torch.linalg.matrix_norm(W.double(), ord=2))
    assert all(sigma(stream[l] - editor.W0[l]) > sigma(editor.W0[l]) for l in (1, 2))   # it acts here
    with editor.restrained() as model:
        assert all(torch.equal(model.edit_weight(l), restrained[l]) for l in (1, 2))
    assert all(torch.equal(m.edit_weight(l), stream[l]) for l in (1, 2))     # back to the stream
    editor.save(tmp_path / "saved")
    saved = M.load(tmp_path / "saved")
    assert all(torch.equal(saved.edit_weight(l), restrained[l]) for l in (1, 2))
    with editor.restrained() as model:                                        # evaluate: the restrained model's
        want = E.summarize(L.score_cases(model, requests[:1], False))
    assert editor.evaluate(requests[:1]) == want != E.summarize(L.score_cases(m, requests[:1], False))
    if method == "prune":           # (the command's scoring is one code for both methods)
        assert_the_command_scores_the_restrained_weights(editor, requests, restrained, tmp_path, monkeypatch)
        assert all(torch.equal(m.edit_weight(l), stream[l]) for l in (1, 2))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method,superseded", [(m, "keep") for m in L.METHODS] + [("lyaplock", "remove")])
def test_every_method_resumes_from_a_checkpoint_to_the_same_bits(tmp_path, method, superseded, device):
    """Three steps straight, and two steps, a checkpoint, a new model and Editor restored from it,
    then the third: the same weights and state to the bit, for every method (AlphaEdit's projector
    is rebuilt from C, not saved; with --superseded remove the third step re-edits a prompt of the
    first, so the per-prompt keys and values of the saved memory are used). The restored state
    lives where C does (on a GPU: not on the host, where the checkpoint is read)."""
    layers = (2,) if method == "rome" else (1, 2)
    hp = L.HParams(method=method, layers=layers, lam=15.0, v_lr=0.5, clamp_norm_factor=4.0, l2=1.0,
                   v_num_grad_steps=5, superseded=superseded)
    requests, _ = data.load_requests(ORACLE / "requests.json")
    steps = [requests[0:2], requests[2:4], [requests[4], requests[0]]]
    quiet = lambda *a, **k: None

    def editor():
        m = M.load(STORIES, device)
        C = S.load_or_collect_stats(m, STORIES, L.DEFAULT_CORPUS, 2000, layers, tmp_path / "cache", log=quiet)
        return L.Editor(m, hp, C, [["{}"], ["Once upon a time. {}"]], model_path=STORIES)
    straight = editor()
    for batch in steps:
        straight.edit(batch)
    first = editor()
    for batch in steps[:2]:
        first.edit(batch)
    first.checkpoint(tmp_path / "run")
    resumed = editor()
    resumed.restore(tmp_path / "run")
    for l, ls in resumed.state.layers.items():
        tensors = [getattr(ls, k) for k in L.STATE_TENSORS] + [t for kvs in ls.edits.values() for kv in kvs for t in kv]
        assert all(t.device == resumed.C[l].device for t in tensors if t is not None)
    resumed.edit(steps[2])
    assert all(torch.equal(straight.model.edit_weight(l), resumed.model.edit_weight(l)) for l in layers)
    for l in layers:
        a, b = straight.state.layers[l], resumed.state.layers[l]
        assert (a.D_base, a.Z, a.a, a.zmax) == (b.D_base, b.Z, b.a, b.zmax)
        for name in ("S_KK", "S_VK", "P"):
            x, y = getattr(a, name), getattr(b, name)
            assert (x is None and y is None) or torch.equal(x, y), name
        assert a.edits.keys() == b.edits.keys()
    if superseded == "remove":
        assert straight.state.layers[1].edits     # the memory kept per-prompt columns
