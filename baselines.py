"""The comparison methods' update rules, and LyapLock plugged into them, as pure functions.

The paper compares LyapLock with ROME, MEMIT (with memory), PRUNE, RECT and AlphaEdit, and
plugs its virtual queue into some of them. Each function here is the math of one rule, checked
against the authors' code (wpwpwpyo/LyapLock @ c5e6186; fixtures/oracle-baselines) and by its
defining property (test_baselines.py). Equation tags (E15…) are in docs/LYAPLOCK.md §10; E2–E14
(LyapLock itself, MEMIT's E10, AlphaEdit's E11–E12) stay in lyaplock.py, E1 (C) in stats.py.

Shapes as in lyaplock.py: weight W (d, m) as stored; keys K1 (m, B) as columns, one per
request; residuals R (d, B); statistics C (m, m); S_KK (m, m) the sum of past steps' K1K1ᵀ. Algebra in float64.
"""
from __future__ import annotations

import math

import torch

import lyaplock as L        # its math helpers, read at call time (lyaplock imports this module)


class BaselineError(ValueError):
    """Bad input to one of the comparison methods' rules."""


# ----------------------------------------------------------------------------- memit-seq

def solve_memit_seq(K1, R, C, lam, S_KK=None):
    """MEMIT with memory (their memit_seq_main.py): Δ (λC + S_KK + K1K1ᵀ) = R K1ᵀ (E15).

    S_KK is the sum of past steps' K1K1ᵀ (their cache_c), so past keys' outputs are held at
    their current values; with S_KK None (step 0) this is MEMIT's E10.
    """
    K1, R = L.f64(K1), L.f64(R)
    A = L.add_scaled(K1 @ K1.T, C, lam)                     # E15: K1K1ᵀ + λC
    if S_KK is not None:
        L.add_scaled(A, S_KK)                               # E15: + S_KK
    return L.solve_system(A, R @ K1.T, overwrite=True)      # E15


# ----------------------------------------------------------------------------- RECT

def rect_mask(delta, W, keep_percent=40.0, eps=1e-8):
    """RECT's mask (their memit_rect_main.py): keep the entries of Δ with the largest relative
    change |Δ / (W + eps)| (E16). Returns (mask (d, m) bool, threshold).

    Their rule, exactly: the threshold is the k-th smallest ratio with
    k = int(numel·(100 − keep_percent)/100), and every ratio ≥ it is kept, i.e.
    numel − k + 1 entries (more on ties): keep_percent 40 keeps 4405 of 11008, not 4403.
    W + eps is formed in W's own dtype, as theirs (float32: 1e-8 vanishes unless |W| is tiny).
    """
    if not 0 <= keep_percent <= 100:
        raise BaselineError(f"RECT keep_percent must be in [0, 100], got {keep_percent}")
    if delta.shape != W.shape:
        raise BaselineError(f"RECT: update {tuple(delta.shape)} and weight {tuple(W.shape)} differ")
    ratio = (L.f64(delta) / (W + eps).to(torch.float64)).abs()                 # E16
    k = int(ratio.numel() * (100 - keep_percent) / 100)
    if k == 0:                                            # keep everything
        return torch.ones_like(ratio, dtype=torch.bool), 0.0
    threshold = torch.kthvalue(ratio.reshape(-1), k).values                  # E16
    return ratio >= threshold, float(threshold)                               # E16


def rect_update(delta, W, keep_percent=40.0):
    """Δ with RECT's mask applied: the entries outside it set to 0 (E16)."""
    mask, _ = rect_mask(delta, W, keep_percent)
    return torch.where(mask, L.f64(delta), 0.0)


# ----------------------------------------------------------------------------- PRUNE

def prune_singular_values(S, sigma_max):
    """PRUNE's log rule (E17): σ > σ_max becomes ln σ − ln σ_max + σ_max; the others stay.
    σ_max must be positive and finite (ln σ_max)."""
    if not 0 < sigma_max < math.inf:
        raise BaselineError(f"PRUNE: σ_max must be positive and finite, got {sigma_max}")
    S = L.f64(S)
    return torch.where(S > sigma_max, S.log() - math.log(sigma_max) + sigma_max, S)   # E17


def prune_restrain(update, sigma_max):
    """U diag(S_adj) Vᵀ for the SVD U diag(S) Vᵀ of an accumulated update (d, m) (E17)."""
    U, S, Vh = torch.linalg.svd(L.f64(update), full_matrices=False)
    return (U * prune_singular_values(S, sigma_max)) @ Vh                     # E17


def prune_weight(W, W0):
    """PRUNE applied to a weight (their MEMIT_prune branch of evaluate.py, intended form):
    W0 + restrain(W − W0) with σ_max = the largest singular value of W0 (E17), in W's dtype.

    Their code writes W + restrain(W − W0) instead, adding the restrained update on top of the
    unrestrained one (docs/LYAPLOCK.md §10); that is not replayed.
    """
    if W.shape != W0.shape:
        raise BaselineError(f"PRUNE: weight {tuple(W.shape)} and original {tuple(W0.shape)} differ")
    sigma_max = float(torch.linalg.matrix_norm(L.f64(W0), ord=2))              # σ_max(W0)
    if not sigma_max > 0:
        raise BaselineError("PRUNE: the original weight is zero; σ_max(W0) must be positive")
    return (L.f64(W0) + prune_restrain(L.f64(W) - L.f64(W0), sigma_max)).to(W.dtype)   # E17


# ----------------------------------------------------------------------------- ROME

def rome_left_vector(k_mean, C_factor):
    """ROME's u = C⁻¹k̄ / ‖C⁻¹k̄‖ (E18), k̄ (m,) the flat mean of the subject's keys over all
    context templates (not MEMIT's two-level mean E5); C_factor is C's Cholesky factor
    (L.cholesky_factor, once for a step's requests, as their code keeps C⁻¹): two triangular
    solves, not their float32 inverse."""
    c = L.solve_factored(C_factor, L.f64(k_mean)[None, :])[0]   # C symmetric: (C⁻¹k̄)ᵀ = k̄ᵀC⁻¹
    norm = c.norm()
    if not torch.isfinite(norm) or norm == 0:
        raise BaselineError("ROME: C⁻¹k̄ is zero or not finite; the mean key is zero?")
    return c / norm                                       # E18


def rome_right_vector(current, k_star, v_star, u):
    """ROME's v = (v* − current) / (k*·u) (E19): k* the key at the subject's last token of the
    bare prompt, current = W k* (+ b) the projection's output there, v* its target value."""
    k_star, u = L.f64(k_star), L.f64(u)
    scale = float(k_star @ u)
    if not math.isfinite(scale):
        raise BaselineError(f"ROME: k*·u = {scale}; the edited key or u is not finite")
    if scale == 0:
        raise BaselineError("ROME: k*·u = 0; the edited key is orthogonal to u")
    return (L.f64(v_star) - L.f64(current)) / scale           # E19


def solve_rome(W, C_factor, k_mean, k_star, v_star, bias=None):
    """ROME's rank-one update Δ = v uᵀ (E20), so that (W + Δ) k* + b = v*; b is the edited
    projection's bias (GPT-J's fc_out; it is not edited); C_factor: L.cholesky_factor(C)."""
    u = rome_left_vector(k_mean, C_factor)                                     # E18
    current = L.f64(W) @ L.f64(k_star)                                             # (d,)
    if bias is not None:
        current = current + L.f64(bias)
    v = rome_right_vector(current, k_star, v_star, u)                          # E19
    return torch.outer(v, u)                                                   # E20


# ----------------------------------------------------------------------------- plug-ins (ours)

def solve_lyaplock_memit_seq(W, W0, C, K1, R, S_KK, z, lam, V=1.0):
    """LyapLock over memit-seq (our definition, E21): minimise
    V[‖ΔK1 − R‖² + ‖ΔKp‖²] + zλ·PL(W + Δ), i.e.
    Δ [V(K1K1ᵀ + S_KK) + zλC] = V R K1ᵀ − zλ(W − W0)C.

    E9 with memit-seq's memory: past keys' outputs are held at their current values (no S_VK).
    """
    A, left = L.lyaplock_system(W, W0, C, K1, R, None, None, z, lam, V)   # E9 without memory
    if S_KK is not None:
        L.add_scaled(A, S_KK, V)                                            # E21: + V S_KK
    return L.solve_system(A, left, overwrite=True)                          # E21


def lyaplock_alphaedit_system(W, W0, C, K1, R, P, S_KK, z, lam, V=1.0, l2=10.0):
    """E22 as (M, right) with Δ·M = right:
    M = (V(K1K1ᵀ + S_KK) + (z − 1)λC) P + V·L2·I, right = (V R K1ᵀ − (z − 1)λ(W − W0)C) P."""
    if not z >= 1 - 1e-9:            # a·Z at the floor is 1 up to rounding (a = 1/√(αD), Z = √(αD))
        raise BaselineError(f"the queue value z must be at least 1 (its floor), got {z}")
    K1, R, P = L.f64(K1), L.f64(R), L.f64(P)
    excess = max(z - 1.0, 0.0) * lam                      # the queue's excess over its floor
    A = (K1 @ K1.T).mul_(V)                               # E22: V K1K1ᵀ
    drift = L.add_scaled_and_times(A, C, excess, L.f64(W) - L.f64(W0))   # E22: A += (z − 1)λC; (W − W0)C
    if S_KK is not None:
        L.add_scaled(A, S_KK, V)                            # E22: + V S_KK
    right = (R @ K1.T).mul_(V).sub_(drift, alpha=excess) @ P                          # E22
    del drift
    M = A @ P                                             # E22: (…) P
    del A                                                 # (two m×m at most, with the solve's LU)
    M.diagonal().add_(V * l2)                             # E22: + V·L2·I
    return M, right


def solve_lyaplock_alphaedit(W, W0, C, K1, R, P, S_KK, z, lam, V=1.0, l2=10.0):
    """LyapLock over AlphaEdit (our definition, E22): over AlphaEdit's projected updates
    (Δ = ΔP), minimise V[‖ΔK1 − R‖² + ‖ΔKp‖² + L2‖Δ‖²] + (z − 1)λ·PL(W + Δ). At the queue's
    floor (z = 1) this is AlphaEdit's E12 at any step; the solution satisfies Δ = ΔP. M is not
    symmetric: LU."""
    M, right = lyaplock_alphaedit_system(W, W0, C, K1, R, P, S_KK, z, lam, V, l2)
    return torch.linalg.solve(M, right, left=False)                          # E22: Δ·M = right
