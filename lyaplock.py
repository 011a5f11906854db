"""LyapLock: sequential knowledge editing with a virtual queue (arXiv 2505.15702).

    python lyaplock.py --model CHECKPOINT --edits FILE [--method lyaplock|memit|alphaedit] ...

Read top to bottom: the closed-form math (solver, queue), the run state, hyper-parameters, the
locate step (context templates, target values, keys), preservation statistics, one editing step,
run checkpoints, and the command (its memory plan, --plan, is plan.py). Equation tags (E1..E22)
refer to docs/LYAPLOCK.md. Shapes: edited weight W (d, m) as stored ([d_out, d_in]); keys K1
(m, B) as columns, one per request of the step; residuals R (d, B); statistics C (m, m). All
algebra runs in float64 on the inputs' device.
"""
from __future__ import annotations

import argparse
import copy
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import signal
import sys
import time
import uuid
import warnings
from collections import Counter
from contextlib import ExitStack, contextmanager
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

if __name__ == "__main__":      # one module whether run or imported (baselines.py, plan.py import it)
    sys.modules.setdefault("lyaplock", sys.modules["__main__"])
import baselines as B  # noqa: E402
import data
import eval as ev
import model as M
import plan
import stats

DEFAULT_CORPUS = Path(__file__).parent / "fixtures" / "wikitext-2-test-sample.txt"   # statistics text


# ----------------------------------------------------------------------------- the math

def f64(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float64)


# A layer's m×m float64 state (C, S_KK) may live on the host (--state-device cpu) while its
# solve runs on a GPU. The algebra uses it only through five operations (add_scaled, times,
# add_scaled_and_times, add_gram, subtract_outers), which then bring it over BLOCK_BYTES of rows
# at a time, so the GPU never holds it whole beside the system; where it lives on the solve's
# device they are the plain expressions, to the bit.
BLOCK_BYTES = 256 * 2 ** 20


def elsewhere(X, device) -> bool:
    """Whether X lives off `device` (then it is used a block of rows at a time)."""
    return X.device != torch.device(device)


def row_blocks(X, device):
    """(rows, a float64 copy of X[rows] on `device`) for consecutive blocks of X's rows."""
    step = max(1, BLOCK_BYTES // (8 * X.shape[1]))
    for i in range(0, X.shape[0], step):
        yield slice(i, i + step), X[i:i + step].to(device, torch.float64, non_blocking=True, copy=True)


def add_scaled(A, X, alpha=1.0):
    """A += αX in place (A on the solve's device, X anywhere); elementwise, so blocks change no bit."""
    if not elsewhere(X, A.device):
        return A.add_(f64(X), alpha=alpha)
    for rows, block in row_blocks(X, A.device):
        A[rows].add_(block, alpha=alpha)
    return A


def times(Y, X):
    """Y X for Y (d, m) on the solve's device and X (m, m) anywhere; from the host, the sum over
    X's row blocks of Y[:, rows] X[rows] (the same product, summed in another order)."""
    if not elsewhere(X, Y.device):
        return Y @ f64(X)
    out = torch.zeros(Y.shape[0], X.shape[1], dtype=torch.float64, device=Y.device)
    for rows, block in row_blocks(X, Y.device):
        out.addmm_(Y[:, rows], block)
    return out


def add_scaled_and_times(A, X, alpha, Y):
    """A += αX in place and return Y X, reading X once: from the host, one pass of its row blocks
    serves both (E9 and E22 use C, and E9 S_KK, both ways)."""
    if not elsewhere(X, A.device):
        A.add_(f64(X), alpha=alpha)
        return Y @ f64(X)
    out = torch.zeros(Y.shape[0], X.shape[1], dtype=torch.float64, device=Y.device)
    for rows, block in row_blocks(X, A.device):
        A[rows].add_(block, alpha=alpha)
        out.addmm_(Y[:, rows], block)
    return out


def update_rows(S, device, update):
    """update(block, rows) on S in place: on S itself (rows = all) where it lives on `device`, else
    on each block of its rows brought over, which then goes back."""
    if not elsewhere(S, device):
        update(S, slice(None))
        return S
    for rows, block in row_blocks(S, device):
        update(block, rows)
        S[rows].copy_(block)
    return S


def add_gram(S, K):
    """S += K Kᵀ in place (K (m, n) on the solve's device, S (m, m) anywhere)."""
    return update_rows(S, K.device, lambda block, rows: block.addmm_(K[rows], K.T))


def subtract_outers(S, pairs):
    """S −= a bᵀ for each (a, b) in `pairs`, in order (a, b on the solve's device, S anywhere); a
    block of rows takes every subtraction before it goes back, so blocks change no bit."""
    def update(block, rows):
        for a, b in pairs:
            block.sub_(torch.outer(a[rows], b))
    return update_rows(S, pairs[0][0].device, update) if pairs else S


def preservation_loss(W, W0, C) -> float:
    """PL(W) = tr((W − W0) C (W − W0)ᵀ) (E2), in float64."""
    D = f64(W) - f64(W0)                                  # (d, m)
    return float((times(D, C) * D).sum())                 # E2


def loss_rounding(W, W0, C) -> float:
    """How far float64 rounding may take preservation_loss from its exact value, m·ε·‖W − W0‖²·‖C‖
    (Frobenius norms: the rounding of (W − W0)C and of the sum, by Cauchy–Schwarz). A PL within it
    may be a 0: a step that moved the layer only where C does not see it (lyaplock+alphaedit's Δ,
    projected into a singular C's null space, measured ±1e-18)."""
    D = f64(W) - f64(W0)
    return C.shape[0] * torch.finfo(torch.float64).eps * float(D.pow(2).sum()) * float(C.norm())


def solve_system(A, left, overwrite: bool = False):
    """Δ with Δ·A = left for symmetric positive definite A: A = UᵀU (Cholesky, from A's lower
    triangle), then two triangular solves (no inverse). The factor is computed in the memory of a
    column-major view, so nothing m×m is allocated beside it; overwrite=True lets it take A's own
    memory (A is then destroyed: pass only a matrix built for this solve). Against cholesky +
    cholesky_solve, which copies the factor again, two m×m buffers fewer on the CPU (measured;
    3.1 GiB at d_mlp = 14336); the CUDA tests measure it there."""
    return solve_factored(cholesky_factor(A, overwrite), left)


def cholesky_factor(A, overwrite: bool = False):
    """U upper triangular with A = UᵀU (solve_system's factor, to solve with A again)."""
    U = (A if overwrite else A.clone()).mT                # (m, m) column-major: factored in place
    info = torch.empty((), dtype=torch.int32, device=A.device)
    torch.linalg.cholesky_ex(U, upper=True, out=(U, info))
    if info.item() != 0:
        raise ValueError(f"system matrix is not positive definite (leading minor {info.item()}); "
                         "is C full rank and lam > 0?")
    return U


def solve_factored(U, left):
    """Δ with Δ·UᵀU = left: two triangular solves."""
    Y = torch.linalg.solve_triangular(U, left, upper=True, left=False)            # Y·U = left
    return torch.linalg.solve_triangular(U.mT, Y, upper=False, left=False)        # Δ·Uᵀ = Y


def lyaplock_system(W, W0, C, K1, R, S_KK, S_VK, z, lam, V=1.0):
    """The LyapLock normal equations (E9) as (A, left) with Δ·A = left.

    z is the normalised queue value (z ≥ 1), lam is λ, V the editing weight; S_KK/S_VK is the
    edit memory (None when empty).
    """
    W, K1, R = f64(W), f64(K1), f64(R)
    zl = z * lam          # in place below: the m×m A and at most three d×m temporaries beside W
    A = (K1 @ K1.T).mul_(V)                               # E9: V K1K1ᵀ
    drift = add_scaled_and_times(A, C, zl, W - f64(W0))   # E9: A += zλC; (W − W0)C
    left = (R @ K1.T).mul_(V).sub_(drift, alpha=zl)       # E9: V R K1ᵀ − zλ(W − W0)C
    del drift
    if S_KK is not None:
        kept = add_scaled_and_times(A, S_KK, V, W)        # E9: A += V S_KK; W S_KK
        left.add_(f64(S_VK), alpha=V).sub_(kept, alpha=V)             # E9: + V(S_VK − W S_KK)
    return A, left


def solve_lyaplock(W, W0, C, K1, R, S_KK, S_VK, z, lam, V=1.0):
    """Closed-form minimiser Δ of the drift-plus-penalty subproblem E8 (via E9)."""
    A, left = lyaplock_system(W, W0, C, K1, R, S_KK, S_VK, z, lam, V)
    return solve_system(A, left, overwrite=True)


def solve_memit(K1, R, C, lam):
    """MEMIT: Δ = R K1ᵀ (K1K1ᵀ + λC)⁻¹ (E10)."""
    K1, R = f64(K1), f64(R)
    return solve_system(add_scaled(K1 @ K1.T, C, lam), R @ K1.T, overwrite=True)        # E10


def alphaedit_projector(C, threshold=2e-2):
    """P = U0 U0ᵀ over the eigenvectors U0 of C with eigenvalue < threshold (E11). None below the
    threshold (keys far larger than the authors' 8B-scale ones) would make P = 0 and every update
    zero: refused, saying so (check_null_spaces does before a run)."""
    evals, U = torch.linalg.eigh(f64(C))
    U0 = U[:, evals < threshold]                          # (m, k)
    if U0.shape[1] == 0:
        raise no_null_space(float(evals[0]), threshold)
    return U0 @ U0.T                                      # E11


def no_null_space(smallest: float, threshold: float, layer: int | None = None) -> ValueError:
    at = f" on layer {layer}" if layer is not None else ""
    return ValueError(f"AlphaEdit: no eigenvalue of C{at} is below the null-space threshold {threshold:.3g} "
                      f"(the smallest is {smallest:.3g}), so its projector (E11) is 0 and every update would "
                      f"be zero: raise the threshold (--nullspace-threshold; nullspace_threshold=) above {smallest:.3g} (the "
                      "authors' 2e-2 is set for 8B-scale keys), or use another method")


def check_null_spaces(C: dict, hp) -> None:
    """Before a run of AlphaEdit's family, every edit layer's E11 projector is not 0: some
    eigenvalue of C is below the threshold, i.e. C − threshold·I is not positive definite (one
    Cholesky each, in one m×m copy; the eigendecomposition waits for step 0)."""
    if not projected(hp.method):
        return
    for l in hp.layers:
        if stats.definite_above(C[l], hp.nullspace_threshold):     # no eigenvalue below: no null space
            raise no_null_space(float(torch.linalg.eigvalsh(f64(C[l]))[0]), hp.nullspace_threshold, l)


def solve_alphaedit(K1, R, P, S_KK=None, l2=10.0):
    """AlphaEdit: Δ = R K1ᵀ P [(K1K1ᵀ + S_KK) P + L2·I]⁻¹ (E12); not symmetric, so LU."""
    K1, R, P = f64(K1), f64(R), f64(P)
    KK = K1 @ K1.T if S_KK is None else add_scaled(K1 @ K1.T, S_KK)
    M = KK @ P                                            # E12 (in place below: two m×m at most)
    del KK
    M.diagonal().add_(l2)                                 # E12: + L2·I
    return torch.linalg.solve(M, R @ K1.T @ P, left=False)                    # E12: Δ·M = R K1ᵀ P


def queue_next(Z, pl, D, a, b=0.0, zmax=0.0):
    """Raw virtual queue Z(t+1) = max(Z(t) + a(PL − D) + b, Zmax) (E13); Zmax is a floor."""
    return max(Z + a * (pl - D) + b, zmax)                # E13


def queue_next_normalised(z, pl, D):
    """z ← max(z + PL/D − 1, 1) (E14): E13 with z = a·Z, a = 1/√D, Zmax = √D, b = 0."""
    return max(z + pl / D - 1.0, 1.0)                     # E14


# ----------------------------------------------------------------------------- run state

@dataclass
class LayerState:
    """What one edited layer carries from step to step: the queue and the edit memory."""
    D_base: float | None = None   # PL right after step 0; threshold D = α·D_base
    Z: float | None = None        # raw queue value (E13); None until step 0 ends
    a: float | None = None        # queue step size (code default 1/√(αD_base))
    zmax: float | None = None     # queue floor (code default √(αD_base))
    S_KK: torch.Tensor | None = None   # Σ K1K1ᵀ over past steps (E7), float64 (m, m)
    S_VK: torch.Tensor | None = None   # Σ (W K1)K1ᵀ over past steps (E7), float64 (d, m)
    P: torch.Tensor | None = field(default=None, repr=False)  # AlphaEdit projector; not saved
    edits: dict = field(default_factory=dict, repr=False)  # prompt -> [(k (m,), v (d,) | None), ...]
    #   in the memory (a prompt edited twice in one step: two), kept to take a superseded edit out
    #   again (E8a; HParams.superseded "remove")

    @property
    def z(self) -> float:
        """Normalised queue value a·Z that weighs λ in E8 (1 until D_base is known)."""
        return 1.0 if self.D_base is None else self.a * self.Z


def feed_queue(ls: LayerState, pl: float, alpha: float, b: float = 0.0, rounding: float = 0.0):
    """Feed one step's PL into the layer's queue (E13), calibrating it after step 0.

    As the authors' code does: D_base is the PL measured after step 0's update, then
    a = 1/√(αD_base), Z = Zmax = √(αD_base), and E13 is applied already at step 0 (a no-op for
    α ≥ 1, b = 0). The queue value after step t weighs the solve of step t + 1. A first step
    that left the layer at W0 (PL 0 to within `rounding`, loss_rounding: its targets were the
    model's already, or it moved only where C does not see) gives no threshold (D = α·0 would
    hold every later step at W0; their code divides by zero): the queue stays uncalibrated and
    the next step that moves the layer calibrates it (it is solved as a step 0 again: z = V = 1).
    """
    if ls.D_base is None:
        if abs(pl) <= rounding:
            return
        if not pl > 0:
            raise ValueError(f"PL {pl} after the first step that moved the layer; the threshold D = α·PL "
                             "needs PL > 0 (is C positive semi-definite?)")
        ls.D_base = pl
        ls.a = 1.0 / math.sqrt(alpha * pl)
        ls.Z = ls.zmax = math.sqrt(alpha * pl)
    ls.Z = queue_next(ls.Z, pl, alpha * ls.D_base, ls.a, b, ls.zmax)      # E13


def remember(ls: LayerState, K1, W_new=None, prompts=None):
    """Add a step to the edit memory: S_KK += K1K1ᵀ, and S_VK += (W_new K1)K1ᵀ if W_new (E7);
    with `prompts` (one per column of K1) also each column's key and value, for `forget` (a None
    prompt: a column that will never be taken out, so not kept)."""
    K1 = f64(K1)
    ls.S_KK = K1 @ K1.T if ls.S_KK is None else add_gram(ls.S_KK, K1)            # E7
    WK = None
    if W_new is not None:
        WK = f64(W_new) @ K1
        ls.S_VK = WK @ K1.T if ls.S_VK is None else ls.S_VK.addmm_(WK, K1.T)     # E7
    for j, prompt in enumerate(prompts or ()):
        if prompt is not None:
            ls.edits.setdefault(prompt, []).append((K1[:, j].clone(), None if WK is None else WK[:, j].clone()))


def forget(ls: LayerState, prompts, device=None):
    """Take the earlier edits of these prompts out of the memory (E8a): S_KK −= kkᵀ and
    S_VK −= vkᵀ with the key k and value v each was remembered with (every one of them: a prompt
    the same step edited twice left two), computed on `device` (the solve's; default: where they are)."""
    gone = [pair_on(kv, device) for prompt in dict.fromkeys(prompts) for kv in ls.edits.pop(prompt, [])]
    subtract_outers(ls.S_KK, [(k, k) for k, _ in gone])                              # E8a
    subtract_outers(ls.S_VK, [(v, k) for k, v in gone if v is not None])             # E8a


# ----------------------------------------------------------------------------- the methods

@dataclass(frozen=True)
class Method:
    """One row of the comparison. Every method shares the locate step, the statistics, the
    evaluation and the run directory; only this differs: how a layer's keys K1 and residual R
    become an update, and what the method carries from step to step."""
    solve: Callable                    # (W, W0, C, K1, R, ls, hp) -> Δ (d, m), float64
    memory: tuple = ()                 # edit memory kept in the LayerState: "S_KK", "S_VK" (E7)
    queue: bool = False                # LyapLock's virtual queue (E13) weighs the solve
    mask: Callable | None = None       # (Δ, W) -> Δ, applied after the solve (RECT)
    restrain: Callable | None = None   # (W, W0) -> W, applied to a copy to evaluate (PRUNE)
    locate: str = "memit"              # "memit": z* at the last edit layer, spread over the
                                       # layers (E4-E6); "rome": one layer, one request per update
    preset: str = "memit"              # whose published settings it takes: lyaplock | memit | rome
    templates: tuple = ((10, 5),)      # context templates (E3): (length, count) per group
    brace: str = " "                   # what a generated prefix's { and } become (ROME's code: "")


def editing_weight(ls: LayerState, hp) -> float:
    """V of E8 for this step: 1 at step 0, the authors' calibration step (their code ignores V
    there; the paper does not single it out), hp.V after it."""
    return 1.0 if ls.D_base is None else hp.V


def lyaplock_step(W, W0, C, K1, R, ls: LayerState, hp) -> torch.Tensor:
    """E9 with the queue value after the previous step (drift-plus-penalty decides step t with
    Z(t)). Step 0 is the calibration step: z = 1 and V = 1, i.e. MEMIT (E10)."""
    return solve_lyaplock(W, W0, C, K1, R, ls.S_KK, ls.S_VK, ls.z, hp.lam, editing_weight(ls, hp))


def memit_step(W, W0, C, K1, R, ls: LayerState, hp) -> torch.Tensor:
    return solve_memit(K1, R, C, hp.lam)                                           # E10


def projector(ls: LayerState, C, hp, device) -> torch.Tensor:
    """The layer's E11 projector, made at its first step (from C whole, on the solve's device)."""
    if ls.P is None:
        ls.P = alphaedit_projector(C.to(device), hp.nullspace_threshold)          # E11
    return ls.P


def alphaedit_step(W, W0, C, K1, R, ls: LayerState, hp) -> torch.Tensor:
    return solve_alphaedit(K1, R, projector(ls, C, hp, K1.device), ls.S_KK, hp.l2)    # E12


def memit_seq_step(W, W0, C, K1, R, ls: LayerState, hp) -> torch.Tensor:
    return B.solve_memit_seq(K1, R, C, hp.lam, ls.S_KK)                           # E15


def lyaplock_memit_seq_step(W, W0, C, K1, R, ls: LayerState, hp) -> torch.Tensor:
    V = editing_weight(ls, hp)
    return B.solve_lyaplock_memit_seq(W, W0, C, K1, R, ls.S_KK, ls.z, hp.lam, V)  # E21


def lyaplock_alphaedit_step(W, W0, C, K1, R, ls: LayerState, hp) -> torch.Tensor:
    P, V = projector(ls, C, hp, K1.device), editing_weight(ls, hp)
    return B.solve_lyaplock_alphaedit(W, W0, C, K1, R, P, ls.S_KK, ls.z, hp.lam, V, hp.l2)   # E22


def prune_weight(W, W0) -> torch.Tensor:      # (deferred: baselines imports this module)
    return B.prune_weight(W, W0)                                                   # E17


def rect_update(delta, W) -> torch.Tensor:
    return B.rect_update(delta, W)                                                 # E16


# (baselines.py imports this module back; the entries reach it only when called)
LYAPLOCK_MEMORY = ("S_KK", "S_VK")
METHODS = {
    "lyaplock": Method(lyaplock_step, memory=LYAPLOCK_MEMORY, queue=True, preset="lyaplock"),
    # the comparison (baselines.py, LYAPLOCK.md §10)
    "memit": Method(memit_step),                  # memoryless: E10 on the current W each step
    "memit-seq": Method(memit_seq_step, memory=("S_KK",)),       # the "MEMIT" of AlphaEdit's tables
    "alphaedit": Method(alphaedit_step, memory=("S_KK",)),
    "prune": Method(memit_step, restrain=prune_weight),
    "rect": Method(memit_step, mask=rect_update),
    "rome": Method(None, locate="rome", preset="rome", templates=((5, 10), (10, 10)), brace=""),
    # LyapLock's queue over them (our definitions, §10)
    "lyaplock+memit-seq": Method(lyaplock_memit_seq_step, memory=("S_KK",), queue=True, preset="lyaplock"),
    "lyaplock+alphaedit": Method(lyaplock_alphaedit_step, memory=("S_KK",), queue=True, preset="lyaplock"),
    "lyaplock+prune": Method(lyaplock_step, memory=LYAPLOCK_MEMORY, queue=True, restrain=prune_weight,
                             preset="lyaplock"),
    "lyaplock+rect": Method(lyaplock_step, memory=LYAPLOCK_MEMORY, queue=True, mask=rect_update,
                            preset="lyaplock"),
}


# The hyper-parameters only some methods read, with the rule and why not (the rest, the
# target-value optimisation's, every method reads): one set for a method that ignores it would
# be recorded as if it applied (the command and Editor.open refuse it; so does testbed's --methods).
READ_BY = {
    "lam": (lambda name, m: m.solve not in (None, alphaedit_step), "its solve has no λ (E12; ROME E18)"),
    "alpha": (lambda name, m: m.queue, "it has no queue"),
    "V": (lambda name, m: m.queue, "it has no queue"),
    "superseded": (lambda name, m: bool(m.memory), "it keeps no edit memory"),
    "l2": (lambda name, m: projected(name), "only AlphaEdit's family (E12, E22) has it"),
    "nullspace_threshold": (lambda name, m: projected(name), "only AlphaEdit's family (E11) has it"),
    "mom2_adjustment": (lambda name, m: m.locate == "rome", "only ROME has it"),
}


def unread(method: str, field: str) -> str | None:
    """Why `method` does not read the hyper-parameter `field` (None: it does)."""
    reads, why = READ_BY.get(field, (lambda *_: True, ""))
    return None if reads(method, method_of(method)) else why


def check_reads(method: str, fields: dict):
    """A ValueError for the first hyper-parameter set explicitly ({label: HParams field}) that
    `method` does not read."""
    for label, name in fields.items():
        if why := unread(method, name):
            raise ValueError(f"{label}: {method} does not read it ({why}); leave it out")


def projected(name: str) -> bool:
    """AlphaEdit's family (E11, E12, E22): a projector P in the state and a non-symmetric system,
    solved by LU."""
    return method_of(name).solve in (alphaedit_step, lyaplock_alphaedit_step)


def method_of(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; expected one of {', '.join(METHODS)}")
    return METHODS[name]


def step_layer(W, W0, C, K1, R, ls: LayerState, hp, prompts=None) -> tuple[torch.Tensor, float]:
    """One layer's part of an editing step: solve → W + Δ → PL → queue → memory, for the method
    hp.method with the hyper-parameters hp (an HParams). `prompts` names the requests (columns
    of K1), for hp.superseded "remove" (E8a); None for one the stream never edits again. Returns
    (W_new, PL(W_new)); W_new has W's dtype and device; ls is updated in place."""
    method = method_of(hp.method)
    prompts = prompts if method.memory and hp.superseded == "remove" else None
    if prompts:
        forget(ls, prompts, W.device)                     # E8a: the stale values leave first
    delta = method.solve(W, W0, C, K1, R, ls, hp)
    if method.mask is not None:
        delta = method.mask(delta, W)
    W_new = W + delta.to(W.dtype)                         # as the authors: cast Δ, then add
    pl = preservation_loss(W_new, W0, C)
    if method.queue:                                      # (uncalibrated: a PL of rounding is a 0)
        feed_queue(ls, pl, hp.alpha, rounding=loss_rounding(W_new, W0, C) if ls.D_base is None else 0.0)
    if method.memory:
        remember(ls, K1, W_new if "S_VK" in method.memory else None, prompts)     # E7
    return W_new, pl


# ----------------------------------------------------------------------------- hyper-parameters

@dataclass
class HParams:
    """Editing hyper-parameters (the authors' names in comments)."""
    method: str = "lyaplock"
    layers: tuple = (4, 5, 6, 7, 8)
    lam: float = 1000.0             # mom2_update_weight λ
    alpha: float = 60.0             # threshold D = α·D_base (the authors' evaluate.py: 60)
    V: float = 1.0                  # editing weight of E8
    v_num_grad_steps: int = 25      # forward passes of the target-value optimisation (E4)
    v_lr: float = 0.1
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 0.75
    kl_factor: float = 0.0625
    batch_size: int = 100
    l2: float = 10.0                # AlphaEdit's L2 (E12)
    nullspace_threshold: float = 2e-2   # AlphaEdit's: P over C's eigenvalues below it (E11)
    mom2_adjustment: bool = True    # ROME: u = C⁻¹k̄ (False: u = k̄)
    superseded: str = "keep"        # a re-edited prompt's earlier edit: "keep" it in the memory
                                    # (the authors') or "remove" it (E8a)


# Published settings by model shape (arch, d_model, n_layers, d_mlp) and preset family (Method.preset).
# LyapLock's own files exist for Llama-3-8B, GPT-J-6B and GPT2-XL; where none exists, LyapLock takes
# that model's MEMIT file with λ divided by 15, the authors' LyapLock/MEMIT ratio (1000 / 15000).
LAYERS_4_8 = (4, 5, 6, 7, 8)
PUBLISHED = {
    # wpwpwpyo/LyapLock @ c5e6186: hparams/{LyapLock,MEMIT,AlphaEdit,ROME}/Llama3-8B.json
    ("llama", 4096, 32, 14336): {
        "lyaplock": dict(layers=LAYERS_4_8, lam=1000.0, v_lr=0.1),
        "memit": dict(layers=LAYERS_4_8, lam=15000.0, v_lr=0.1),
        "rome": dict(layers=(5,), v_lr=0.5, v_weight_decay=1e-3, clamp_norm_factor=4.0)},
    # wpwpwpyo/LyapLock @ c5e6186: hparams/{LyapLock,MEMIT,AlphaEdit,ROME}/EleutherAI_gpt-j-6B.json
    ("gptj", 4096, 28, 16384): {
        "lyaplock": dict(layers=(3, 4, 5, 6, 7, 8), lam=1000.0, v_lr=0.5),
        "memit": dict(layers=(3, 4, 5, 6, 7, 8), lam=15000.0, v_lr=0.5),
        "rome": dict(layers=(5,), v_lr=0.5, clamp_norm_factor=4.0, v_num_grad_steps=20)},
    # wpwpwpyo/LyapLock @ c5e6186: hparams/{LyapLock,MEMIT,AlphaEdit,ROME}/gpt2-xl.json
    ("gpt2", 1600, 48, 6400): {
        "lyaplock": dict(layers=(13, 14, 15, 16, 17), lam=1000.0, v_lr=0.5, v_num_grad_steps=20),
        "memit": dict(layers=(13, 14, 15, 16, 17), lam=20000.0, v_lr=0.5, v_num_grad_steps=20),
        "rome": dict(layers=(17,), v_lr=0.5, clamp_norm_factor=4.0, v_num_grad_steps=20)},
    # SasyaTitech/NAS @ 5acab48: hparams/{MEMIT,AlphaEdit,ROME}/Qwen2p5-7B.json (no LyapLock file)
    ("qwen2", 3584, 28, 18944): {
        "lyaplock": dict(layers=(7, 8, 9, 10, 11), lam=1000.0, v_lr=0.1),
        "memit": dict(layers=(7, 8, 9, 10, 11), lam=15000.0, v_lr=0.1),
        "rome": dict(layers=(11,), v_lr=0.5, v_weight_decay=1e-3, clamp_norm_factor=4.0, mom2_adjustment=False)},
    # zjunlp/EasyEdit: hparams/MEMIT/mistral-7b.yaml @ 6ddaffc, hparams/ROME/mistral-7b.yaml @ b0413f2
    ("mistral", 4096, 32, 14336): {
        "lyaplock": dict(layers=LAYERS_4_8, lam=1000.0, v_lr=0.5, v_weight_decay=1e-3, clamp_norm_factor=4.0),
        "memit": dict(layers=LAYERS_4_8, lam=15000.0, v_lr=0.5, v_weight_decay=1e-3, clamp_norm_factor=4.0),
        "rome": dict(layers=(5,), v_lr=0.5, v_weight_decay=1e-3, clamp_norm_factor=4.0, mom2_adjustment=False)},
    # Phi-3-mini's shape (also Phi-3.5-mini's, Phi-4-mini's): JoveReCode/OrthoEdit @ 9212a67
    # hparams/MEMIT/phi-3.json (no LyapLock or ROME file: LyapLock λ / 15, ROME by the rule)
    ("phi3", 3072, 32, 8192): {
        "lyaplock": dict(layers=LAYERS_4_8, lam=1000.0, v_lr=0.1, v_num_grad_steps=30),
        "memit": dict(layers=LAYERS_4_8, lam=15000.0, v_lr=0.1, v_num_grad_steps=30)},
    # GPT-NeoX-20B: JoveReCode/OrthoEdit @ 9212a67 hparams/MEMIT/EleutherAI_gpt-neox-20b.json (no LyapLock
    # file); wpwpwpyo/LyapLock @ c5e6186 hparams/ROME/EleutherAI_gpt-neox-20b.json
    ("gpt_neox", 6144, 44, 24576): {
        "lyaplock": dict(layers=(6, 7, 8, 9, 10), lam=400.0, v_lr=0.5, v_num_grad_steps=20, clamp_norm_factor=0.8),
        "memit": dict(layers=(6, 7, 8, 9, 10), lam=6000.0, v_lr=0.5, v_num_grad_steps=20, clamp_norm_factor=0.8),
        "rome": dict(layers=(15,), v_lr=0.5, clamp_norm_factor=4.0, v_num_grad_steps=20)},
}


def preset(cfg: M.Config, method: str) -> HParams:
    """The published settings of this model's shape (PUBLISHED), else the rule for other sizes.

    Other sizes: edit layers from n/8 to n/4 of the depth (at least two, from layer 1 on and below
    the top block where the depth allows; ROME: the last of them); none where no such layers
    exist (under 3 blocks; ROME: under 2), and check_hparams asks for --layers. ROME takes
    Llama-3-8B's published v settings (learning rate 0.5, weight decay 1e-3, clamp 4, as Qwen2.5-7B's
    and Mistral-7B's files; GPT-J-6B's, GPT2-XL's and GPT-NeoX-20B's decay by 0.5). λ in units of the
    MLP width m = d_mlp, α = 60 (the paper's) and AlphaEdit's L2 = 1.
    λ is free of the activations' scale (K1K1ᵀ and C scale alike); what it sets is the share
    s/(1 + s) of a key's gap one step closes, s = kᵀ(λC)⁻¹k, which is m/λ on average for keys
    distributed as C's tokens (E[kᵀC⁻¹k] = m). The MEMIT family takes λ = m (s = 1; the published
    MEMIT λ is 1.05 m on Llama-3-8B, 0.92 m on GPT-J-6B), LyapLock λ = m/4 (s = 4; its queue
    raises the weight z·λ as PL outgrows its budget; published 0.07 m and 0.16 m on GPT2-XL).
    Measured (README "Hyper-parameters": 20-step sweeps of λ, α and L2 on both bundled models,
    balance = harmonic mean of efficacy and retention): LyapLock's m/4 is the best on the fact
    model and 1.6 points below the best (m/2) on stories260K, MEMIT's m the best on the fact model
    and 5.7 below the best (4m) on stories260K. L2 is not scale-free (it weighs ‖Δ‖² against
    K1K1ᵀ); 1 is the best of 0.1, 1, 10 on both (the authors' 10, set for 8B-scale keys, takes
    almost no edit there).
    """
    family = method_of(method).preset
    shape = (cfg.arch, cfg.d_model, cfg.n_layers, cfg.d_mlp)
    if family in PUBLISHED.get(shape, {}):
        return HParams(method=method, **PUBLISHED[shape][family])
    first = min(max(1, round(cfg.n_layers / 8)), cfg.n_layers - 3)       # 3 blocks: layers 0, 1
    last = min(cfg.n_layers - 2, max(first + 1, round(cfg.n_layers / 4)))
    layers = tuple(range(first, last + 1)) if cfg.n_layers >= 3 else ()  # fewer: --layers (check_hparams)
    if family == "rome":
        return HParams(method=method, layers=(last,) if cfg.n_layers >= 2 else (), v_lr=0.5,
                       v_weight_decay=1e-3, clamp_norm_factor=4.0)
    lam = cfg.d_mlp / 4 if family == "lyaplock" else float(cfg.d_mlp)
    return HParams(method=method, layers=layers, lam=lam, alpha=60.0, l2=1.0)


# ----------------------------------------------------------------------------- the locate step

def context_templates(model: M.CausalLM, seed: int, groups=((10, 5),), brace: str = " ") -> list[list[str]]:
    """E3: "{}", then for each (length, count) of `groups` a group of `count` prefixes the model
    writes itself from "The", "Therefore", "Because", "I", "You" (count/5 each; `length` tokens,
    top-k 5, seeded), each as prefix + ". {}", its braces made `brace`. MEMIT's family: one group
    (10, 5), braces as spaces; ROME: (5, 10) and (10, 10), 21 templates, braces dropped."""
    if any(count < 5 or count % 5 for _, count in groups):
        raise ValueError(f"context template groups {groups!r}: each count a multiple of 5 (a template per "
                         "start word)")
    out = [["{}"]]
    for g, (length, count) in enumerate(groups):          # (ROME's generate_fast, as fluency's texts)
        texts = ev.generate_texts(model, ["The", "Therefore", "Because", "I", "You"] * (count // 5), length,
                                  top_k=5, seed=seed + g, batch_size=count)
        out.append([t.replace("{", brace).replace("}", brace) + ". {}" for t in texts])
    return out


def method_templates(model: M.CausalLM, seed: int, method: str) -> list[list[str]]:
    """The context templates `method`'s code uses (its groups and braces)."""
    m = method_of(method)
    return context_templates(model, seed, m.templates, m.brace)


@dataclass
class Row:
    """One prompt of a batch: its token ids and the subject's last-token position; for the
    target-value rows also the request it belongs to and the targets it scores."""
    ids: list
    lookup: int
    req: int
    targets: list = field(default_factory=list)   # target ids; empty for a KL / key row
    first: int = 0                                 # position whose logits predict targets[0]


def subject_row(tok, template: str, subject: str, req: int) -> Row:
    """A prompt template (with "{}") filled with the subject; lookup = subject's last token."""
    if "{}" not in template:
        raise ValueError(f"prompt {template!r} has no '{{}}' for the subject")
    prefix = template[:template.index("{}")]
    return Row(tok.encode(template.replace("{}", subject, 1)), len(tok.encode(prefix + subject)) - 1, req)


def z_rows(tok, requests, templates) -> list[Row]:
    """E4's inputs, built from token ids (not decoded text, LYAPLOCK.md §9): each template
    applied to the prompt, then the target's ids but the last; then a KL row "{subject} is a"."""
    rows = []
    for r, q in enumerate(requests):
        tgt = ev.target_ids(tok, q.target_new)
        for t in (t for group in templates for t in group):
            row = subject_row(tok, t.replace("{}", q.prompt, 1), q.subject, r)
            row.first = len(row.ids) - 1
            row.targets = tgt
            row.ids = row.ids + tgt[:-1]
            rows.append(row)
        rows.append(subject_row(tok, "{} is a", q.subject, r))
    return rows


@dataclass
class _Chunk:
    """Rows of one padded forward pass of the target-value optimisation, as tensors."""
    rows: list            # indices into the batch's rows
    ids: torch.Tensor     # (b, T) right-padded
    mask: torch.Tensor
    look: torch.Tensor    # (b,) subject's last token (0 once split at it)
    req: torch.Tensor     # (b,) request of each row
    pos: torch.Tensor     # (b, k) positions whose logits the loss reads
    lab: torch.Tensor     # (b, k) target ids there
    w: torch.Tensor       # (b, k) 1/len(target) on real targets, else 0
    kl: torch.Tensor      # (n_kl,) indices of the KL rows
    h0: torch.Tensor | None = None        # (b, S, d) output of the target layer, δ = 0, from the subject on
    out0: torch.Tensor | None = None      # (b, d) E4b's models: the MLP output at the subject, δ = 0
    prefix: M.KVCache | None = None       # keys and values of the tokens before the subject, layers above (b, P)
    kl_init: torch.Tensor | None = None   # (n_kl, V) the KL rows' log-probs at their position, first pass


def suffix_batches(rows: list[Row], max_tokens: int) -> list[list[int]]:
    """Row indices in batches for E4's passes, sorted by the length from the subject on (what each
    step runs: _split_at_subject), then by the length before it, and cut so that count ×
    (longest prefix + longest suffix), the batch's cache and attention width, stays within
    max_tokens (at least one row a batch). Against batches by whole length, the steps run 24-35%
    fewer padded tokens (CounterFact and zsRE, 100 requests, GPT-2's BPE, 1,024 or 2,048 tokens a
    pass; at 8,192 one or two batches hold every row and pad alike)."""
    prefix = [r.lookup for r in rows]
    suffix = [len(r.ids) - r.lookup for r in rows]
    out, batch, P, S = [], [], 0, 0
    for i in sorted(range(len(rows)), key=lambda i: (suffix[i], prefix[i])):
        P, S = max(P, prefix[i]), max(S, suffix[i])
        if batch and (len(batch) + 1) * (P + S) > max_tokens:
            out.append(batch)
            batch, P, S = [], prefix[i], suffix[i]
        batch.append(i)
    return out + [batch]


def _chunks(model: M.CausalLM, rows: list[Row], layer: int, max_tokens: int, mlp_mapped: bool = False) -> list[_Chunk]:
    """Rows in suffix_batches, each run once through the layers up to `layer` (mlp_mapped: δ joins
    an MLP output the model normalises or scales before the residual add, so the MLP outputs at
    the subjects are kept, E4b)."""
    dev = model.embed.weight.device
    out = []
    for idx in suffix_batches(rows, max_tokens):
        batch = [rows[i] for i in idx]
        k = max(1, max(len(r.targets) for r in batch))
        pos = torch.zeros(len(batch), k, dtype=torch.long)
        lab = torch.zeros(len(batch), k, dtype=torch.long)
        w = torch.zeros(len(batch), k)
        for b, r in enumerate(batch):
            t = len(r.targets)
            pos[b, :t] = torch.arange(r.first, r.first + t)
            lab[b, :t] = torch.tensor(r.targets, dtype=torch.long)
            w[b, :t] = 1.0 / max(t, 1)
            if not t:
                pos[b, 0] = r.lookup          # KL rows: next-token distribution at the subject
        ids, mask = model.tokenizer.pad([r.ids for r in batch], device=dev)
        c = _Chunk(rows=idx, ids=ids, mask=mask,
                   look=torch.tensor([r.lookup for r in batch], device=dev),
                   req=torch.tensor([r.req for r in batch], device=dev),
                   pos=pos.to(dev), lab=lab.to(dev), w=w.to(dev),
                   kl=torch.tensor([b for b, r in enumerate(batch) if not r.targets], dtype=torch.long, device=dev))
        with torch.no_grad():
            o = model(ids, mask, stop_after=layer, outs_at={layer}, keys_at={layer} if mlp_mapped else ())
            if mlp_mapped:                                                     # E4b: δ joins the MLP output
                c.out0 = mlp_outputs(model, layer, o.keys[layer][torch.arange(len(batch), device=dev), c.look])
            _split_at_subject(model, c, o.outs[layer], layer)
        out.append(c)
    return out


@torch.no_grad()
def _split_at_subject(model: M.CausalLM, c: _Chunk, h0, layer: int):
    """δ enters at each row's subject token and attention is causal, so nothing before that token
    depends on δ: the layers above `layer` run over those prefixes once, into a key/value cache
    (c.prefix, P slots: the longest prefix), and each step of E4 runs only the suffixes, from the
    subject token on, extending a copy of it. The chunk keeps the suffixes left-aligned, (b, S) with the subject token at 0, its
    loss positions shifted to match, and the mask (b, P + S): prefix part, then suffix part
    (positions count real tokens, so each suffix token keeps its place in its sentence)."""
    b, T = c.ids.shape
    lengths = c.mask.sum(1)
    P, S = int(c.look.max()), int((lengths - c.look).max())
    at = torch.arange(max(P, S), device=c.ids.device)
    before = (at[None, :P] < c.look[:, None]).to(c.mask.dtype)                   # (b, P)
    idx = c.look[:, None] + at[None, :S]                                        # (b, S)
    after = (idx < lengths[:, None]).to(c.mask.dtype)
    idx = idx.clamp(max=T - 1)
    c.prefix = M.KVCache(model.cfg, b, P, model.placement, model.embed.weight.dtype, first=layer + 1)
    if P:
        model(c.ids[:, :P], before, start=(layer, h0[:, :P]), cache=c.prefix, stop_after=model.cfg.n_layers - 1)
    c.h0 = h0.gather(1, idx[..., None].expand(-1, -1, h0.shape[-1]))
    c.ids, c.mask = c.ids.gather(1, idx), torch.cat((before, after), 1)
    c.pos = (c.pos - c.look[:, None]).clamp(min=0)           # padded slots (weight 0) read the subject
    c.look = torch.zeros_like(c.look)


def _active_rows(c: _Chunk, active) -> _Chunk | None:
    """The chunk's rows whose request E4 still optimises (active: (n,) per request), None if no
    row is left: a stopped request's δ no longer moves, so its rows need no more passes (the
    authors optimise one request at a time and leave its loop there)."""
    keep = active[c.req]
    if bool(keep.all()):
        return c
    if not keep.any():
        return None
    at = keep.nonzero()[:, 0]
    kl_kept = keep[c.kl]
    pick = lambda t, index=at: None if t is None else t[index.to(t.device)]      # h0 may sit on another device
    return _Chunk(rows=[c.rows[i] for i in at.tolist()], ids=pick(c.ids), mask=pick(c.mask), look=pick(c.look),
                  req=pick(c.req), pos=pick(c.pos), lab=pick(c.lab), w=pick(c.w),
                  kl=(keep.cumsum(0) - 1)[c.kl[kl_kept]],           # the KL rows' places among the kept
                  h0=pick(c.h0), out0=pick(c.out0), prefix=c.prefix.rows(at),
                  kl_init=pick(c.kl_init, kl_kept))


STOP_LOSS = 5e-2        # E4: a request's optimisation ends at a loss under it


def fit_summary(losses: list[list[float]]) -> dict:
    """A step's target values in its log: z_loss, the mean of each request's last E4 loss (the
    targets' NLL with the KL and decay terms; a stopped request's at its stop), and
    z_passes, the mean number of passes a request ran (v_num_grad_steps unless it stopped early).
    losses: compute_z's info["loss"], per request its loss at each pass."""
    passes = [next((i + 1 for i, x in enumerate(l) if x < STOP_LOSS), len(l)) for l in losses]
    return dict(z_loss=sum(l[-1] for l in losses) / len(losses), z_passes=sum(passes) / len(passes))


def compute_z(model: M.CausalLM, rows: list[Row], n_req: int, layer: int, hp: HParams,
              max_tokens: int = 2048, norm_base=None, at_mlp: bool = False):
    """E4: target values z* = h + δ at `layer`'s output, subject's last token, for all requests
    of a batch in one optimisation (one δ per request; requests are independent, so this equals
    one at a time). The layers up to `layer` run once, and so do the layers above over the tokens
    before each subject (_split_at_subject); each step runs only the layers above over the tokens
    from the subject on, with logits only where the loss reads them, chunk by chunk (gradients
    summed), so memory stays bounded. norm_base (n, d): the vectors whose norms bound δ and scale its weight decay
    (default h, MEMIT's; ROME passes the MLP output there, E18-E20). at_mlp: δ joins the MLP's
    output (ROME's compute_v), not the layer's (MEMIT's), which is one place but on a model that
    normalises or scales the MLP output before the residual add (Gemma 2, 3, OLMo 2, 3, GLM-4-0414;
    Granite): there h is the MLP output and δ reaches the residual stream through the norm or the
    scale (E4b). Returns (z* (n, d) float32, info with the losses, h and δ)."""
    dev = model.embed.weight.device
    chunks = _chunks(model, rows, layer, max_tokens, at_mlp and model.cfg.mlp_output_mapped)
    place = {i: (c, b) for c in chunks for b, i in enumerate(c.rows)}        # row -> (its chunk, its index there)
    firsts = [place[next(i for i, r in enumerate(rows) if r.req == j)] for j in range(n_req)]
    h_init = torch.stack([c.h0[b, c.look[b]] if c.out0 is None else c.out0[b] for c, b in firsts]).float()
    base_norm = (h_init if norm_base is None else norm_base.float()).norm(dim=1)  # (n,)
    n_rewrites = torch.bincount(torch.tensor([r.req for r in rows if r.targets], device=dev),
                                minlength=n_req).float()
    delta = torch.zeros_like(h_init)
    moments = [torch.zeros_like(delta), torch.zeros_like(delta)]                 # Adam's m, v
    active = torch.ones(n_req, dtype=torch.bool, device=dev)
    fit = torch.zeros(n_req, device=dev)
    losses = []
    for it in range(hp.v_num_grad_steps):
        update = it < hp.v_num_grad_steps - 1                 # the last pass only measures
        # 1. per request: mean target NLL over its rewriting prompts + KL, and the gradient in δ
        #    (the active requests' rows only; a stopped request's δ, and so its loss, stay as they were)
        fit_now, grad = _fit_loss(model, chunks, delta, layer, n_rewrites, hp.kl_factor, update)
        fit = torch.where(active, fit_now, fit)
        # 2. the weight decay, in the authors' form wd·‖δ‖/‖base‖²
        d = delta.clone().requires_grad_(update)
        decay = hp.v_weight_decay * d.norm(dim=1) / base_norm ** 2
        loss = fit + decay.detach()                                                       # E4
        losses.append(loss)
        # 3. a request stops when its loss is under 5e-2
        active &= loss >= STOP_LOSS
        if not update or not active.any():
            break
        grad += torch.autograd.grad(decay.sum(), d)[0]
        # 4. Adam on the active rows only (why it is written out: torch.optim.Adam would move the
        #    stopped requests' δ and moments too), then the projection into ‖δ‖ ≤ clamp·‖base‖
        delta[active] = _adam_rows(delta, grad, moments, active, it + 1, hp.v_lr,
                                   hp.clamp_norm_factor * base_norm[active])
        chunks = [kept for c in chunks if (kept := _active_rows(c, active)) is not None]
    return h_init + delta, dict(loss=torch.stack(losses).T.tolist(), h_init=h_init, delta=delta)


def _fit_loss(model, chunks: list[_Chunk], delta, layer: int, n_rewrites, kl_factor: float, need_grad: bool):
    """E4's data terms per request (n,) and their gradient in δ (n, d) (zeros unless need_grad):
    δ is added at each row's subject token in `layer`'s output (E4b: through the post-norm), the
    layers above run from there (over the suffixes, reading the prefixes' cached keys and values)."""
    total, grad = torch.zeros_like(n_rewrites), torch.zeros_like(delta)
    for c in chunks:
        d = delta.clone().requires_grad_(need_grad)
        in_chunk = torch.arange(len(c.rows), device=delta.device)
        change = d[c.req] if c.out0 is None else \
            model.mlp_contribution(layer, c.out0 + d[c.req]) - model.mlp_contribution(layer, c.out0)  # E4b
        h = c.h0.index_put((in_chunk, c.look), change.to(c.h0.dtype), accumulate=True)         # (b, S, d)
        logp = model(c.ids, c.mask, start=(layer, h), logits_at=c.pos,
                     cache=c.prefix.copy(extend=c.ids.shape[1])).logits.log_softmax(-1)    # (b, k, V)
        nll = -(logp.gather(-1, c.lab[..., None])[..., 0] * c.w).sum(1)               # (b,) mean per token
        at_kl = logp[c.kl, 0]                                                           # (n_kl, V)
        c.kl_init = at_kl.detach() if c.kl_init is None else c.kl_init
        kl = (at_kl.exp() * (at_kl - c.kl_init)).sum(-1)                              # KL(current ‖ initial)
        per_row = (nll / n_rewrites[c.req]).index_put((c.kl,), kl_factor * kl)       # a KL row scores its KL
        part = torch.zeros_like(total).index_add(0, c.req, per_row)   # E4: mean NLL over prompts + KL
        total += part.detach()
        if need_grad:
            grad += torch.autograd.grad(part.sum(), d)[0]
    return total, grad


def _adam_rows(delta, grad, moments, active, t: int, lr: float, max_norm, b1=0.9, b2=0.999, eps=1e-8):
    """One Adam step (torch.optim.Adam's arithmetic) on the `active` rows of δ (a mask), updating
    their moments in place, then each projected into its ball ‖δ‖ ≤ max_norm. Returns the new rows of δ."""
    p, g = delta[active], grad[active]
    m, v = moments[0][active], moments[1][active]
    m.lerp_(g, 1 - b1)
    v.mul_(b2).addcmul_(g, g, value=1 - b2)
    p.addcdiv_(m, (v.sqrt() / math.sqrt(1 - b2 ** t)).add_(eps), value=-lr / (1 - b1 ** t))
    moments[0][active], moments[1][active] = m, v
    norm = p.norm(dim=1, keepdim=True)
    return torch.where(norm > max_norm[:, None], p * (max_norm[:, None] / norm).clamp(max=1.0), p)


def key_rows(tok, requests, templates) -> list[Row]:
    """E5's inputs: every template applied to each request's bare prompt."""
    return [subject_row(tok, t.replace("{}", q.prompt, 1), q.subject, r)
            for r, q in enumerate(requests) for group in templates for t in group]


def longest_input(tok, q, templates, generation_tokens: int = 0) -> tuple[str, int]:
    """The longest sequence a request puts through the model (editing, scoring, and generation:
    texts of generation_tokens tokens, their prompt included, ev.generate_texts, whose batch
    samples as many tokens as its shortest prompt needs, so a prompt may go on by up to
    generation_tokens): (what it is, its length in tokens)."""
    longest = lambda *targets: max(len(ev.target_ids(tok, t)) for t in targets)
    edit = longest(q.target_new, q.target_true or q.target_new)        # the rewrite and paraphrase prompts'
    answer = longest(q.target_new, *q.neighborhood_answers)            # the neighbourhood prompts'
    found = [("rewrite prompt in a context template, with its target",
              len(tok.encode(t.replace("{}", q.rewrite_prompt(), 1))) + edit)
             for group in templates for t in group]
    found += [("paraphrase prompt with its target", len(tok.encode(p)) + edit) for p in q.paraphrase_prompts]
    fed = len(ev.target_ids(tok, q.target_new)) + ev.GREEDY_SPARE - 1     # ev.generative_eval's (the last unfed)
    found += [(f"rewrite or paraphrase prompt with the {fed} tokens greedy decoding feeds back (generative "
               "efficacy)", len(tok.encode(p)) + fed) for p in (q.rewrite_prompt(), *q.paraphrase_prompts)]
    found += [("neighbourhood prompt with its answer", len(tok.encode(p)) + answer) for p in q.neighborhood_prompts]
    found += [(f"generation prompt with up to {generation_tokens} tokens sampled after it (fluency: a batch "
               "samples for its shortest prompt)", len(tok.encode(p)) + generation_tokens)
              for p in q.generation_prompts if generation_tokens]
    return max(found, key=lambda f: f[1])


def length_problem(model: M.CausalLM, q, templates, generation_tokens: int = 0) -> str | None:
    """Why request q is too long for the model (its longest input, named, past the model's
    position limit: M.Config.position_limit), or None."""
    limit, field = model.cfg.position_limit
    what, n = longest_input(model.tokenizer, q, templates, generation_tokens)
    if n <= limit:
        return None
    return f"case_id {q.case_id}: its {what} is {n} tokens, longer than the model's {limit} positions ({field})"


def mlp_change(model: M.CausalLM, layer: int, out, R) -> torch.Tensor:
    """The change of the MLP outputs `out` (n, d) at `layer` that moves their contributions to the
    residual stream by R (n, d) float64: R / mult on Granite, whose MLP output joins the stream
    times its residual_multiplier mult (E6c); else (E6b), on a model that normalises the MLP output before the
    residual add (Gemma 2, 3, OLMo 2, 3, GLM-4-0414), as near as the norm allows. N(o) = s ⊙ o / r(o) with
    s the norm's scale (Gemma: 1 + w; OLMo 2: w), r(o) = sqrt(mean(o²) + ε): for every o' of
    o's length N(o') = s ⊙ v with rms(v) = ρ = rms(o) / r(o) (≈ 1), so the MLP can turn its
    contribution, not stretch it. The target T = N(o) + R is met at the nearest such point (T
    itself where reachable), and o' = r(o) v."""
    if not model.cfg.post_norms:
        return R / model.cfg.residual_multiplier                                  # E6c
    norm = model.blocks[layer].mlp_output_norm
    o, s = out.to(R), norm.scale().to(R)
    r = (o.pow(2).mean(1, keepdim=True) + norm.eps).sqrt()                          # (n, 1)
    v = nearest_scaled_point(s, s * o / r + R, o.pow(2).mean(1, keepdim=True) / r ** 2)
    return r * v - o


def nearest_scaled_point(s, T, rho2, steps: int = 200) -> torch.Tensor:
    """Per row of T (n, d): the v minimising ‖s ⊙ v − T‖ subject to mean(v²) = rho2 (n, 1), s (d,)
    (E6b). Stationarity gives v = s ⊙ T / (s² + μ) with μ ≥ −min s² (the global minimum of this
    trust-region problem), and mean(v²) falls as μ rises: μ by bisection. Where even the least μ
    leaves mean(v²) short (T has nothing on the least-scaled coordinate k, as when s_k = 0), the
    rest of the length goes to v_k, which moves s ⊙ v least."""
    b, s2 = s * T, s ** 2
    lo = (-s2.min()).expand_as(rho2).clone()
    hi = lo + 2 * (b.pow(2).mean(1, keepdim=True) / rho2.clamp_min(torch.finfo(b.dtype).tiny)).sqrt() + 1
    # at hi mean(v²) < rho2: the root lies in (lo, hi]
    solve = lambda mu: b / (s2 + mu).clamp_min(torch.finfo(b.dtype).tiny)
    for _ in range(steps):
        mid = (lo + hi) / 2
        long = solve(mid).pow(2).mean(1, keepdim=True) > rho2
        lo, hi = torch.where(long, mid, lo), torch.where(long, hi, mid)
    v = solve(hi)
    short = (rho2 - v.pow(2).mean(1, keepdim=True)).clamp_min(0) * T.shape[1]            # (n, 1)
    k = int(s2.argmin())
    fill = short > 1e-12 * rho2 * T.shape[1]           # the length v_k must take (v_k's own sign: b_k's)
    v_k = torch.where(b[:, k:k + 1] < 0, -1.0, 1.0) * (v[:, k:k + 1].pow(2) + short).sqrt()
    v[:, k:k + 1] = torch.where(fill, v_k, v[:, k:k + 1])
    return v


def mlp_outputs(model: M.CausalLM, layer: int, keys) -> torch.Tensor:
    """The MLP outputs W k + b (n, d) of keys (n, m) at `layer`, computed as the model does (in
    its dtype), as float32 on the keys' device."""
    W, b = model.edit_weight(layer), model.edit_bias(layer)
    return (keys.to(W) @ W.T + (0 if b is None else b)).to(keys.device, torch.float32)


def keys_and_outputs(model: M.CausalLM, rows: list[Row], templates, layer: int, z_layer: int):
    """K1 at `layer` (E5: mean within each template group, then across groups), the current
    output of z_layer at the bare prompts (the "{}" group) and their keys at `layer`, in one
    forward pass."""
    dev = model.embed.weight.device
    ids, mask = model.tokenizer.pad([r.ids for r in rows], device=dev)
    look = torch.tensor([r.lookup for r in rows], device=dev)
    with torch.no_grad():
        out = model(ids, mask, keys_at={layer}, outs_at={z_layer}, stop_after=max(layer, z_layer))
    ar = torch.arange(len(rows), device=dev)
    keys, outs = out.keys[layer][ar, look].float(), out.outs[z_layer][ar, look].float()
    per = sum(len(g) for g in templates)
    keys, outs = keys.view(-1, per, keys.shape[-1]), outs.view(-1, per, outs.shape[-1])
    bounds = torch.tensor([0] + [len(g) for g in templates]).cumsum(0).tolist()
    K = torch.stack([keys[:, s:e].mean(1) for s, e in zip(bounds, bounds[1:])], 1).mean(1)   # E5
    return K, outs[:, 0], keys[:, 0]                      # template 0 is "{}": the bare prompt


# ----------------------------------------------------------------------------- one editing step

def edit_batch(model: M.CausalLM, requests, templates, hp: HParams, state: EditState, C, W0,
               z_tokens: int = 2048) -> dict:
    """One step t: target values (E4) at the last edit layer, then for each edit layer in order
    keys (E5), residual (E6), the solve, the queue and the memory (update_layer). Returns the
    step's log. z_tokens bounds the tokens per pass of the target-value optimisation (memory)."""
    if method_of(hp.method).locate == "rome":
        return rome_batch(model, requests, templates, hp, state, C, W0, z_tokens)
    clock = Clock(model.embed.weight.device)
    where = Where(state.step, requests)
    z_layer = hp.layers[-1]
    n = len(hp.layers)
    zs, z_info = compute_z(model, z_rows(model.tokenizer, requests, templates), len(requests), z_layer, hp, z_tokens)
    where.check_finite(z_layer, **{"target values": zs})
    clock.lap("z")
    rows = key_rows(model.tokenizer, requests, templates)
    prompts = [q.rewrite_prompt() for q in requests]          # E8a's names of K1's columns
    if state.recurring is not None:                            # only prompts edited again are taken out
        prompts = [p if p in state.recurring else None for p in prompts]
    layers = {}
    for i, layer in enumerate(hp.layers):
        K, cur, bare = keys_and_outputs(model, rows, templates, layer, z_layer)    # E5
        R = f64(zs - cur) / (n - i)             # E6: formed in float32 first, as the authors
        if model.cfg.mlp_output_mapped:         # E6b, E6c: R reaches the residual stream through a norm
            R = mlp_change(model, layer, mlp_outputs(model, layer, bare), R)             # or a scale
        where.check_finite(layer, keys=K, residual=R)
        clock.lap("keys")
        layers[layer] = update_layer(model, layer, K.T, R.T, hp, state, C, W0, prompts, where)
        clock.lap("solve")
    state.finish_step(len(requests))
    return step_log(state, layers, clock) | fit_summary(z_info["loss"])


def rome_batch(model: M.CausalLM, requests, templates, hp: HParams, state: EditState, C, W0,
               z_tokens: int = 2048) -> dict:
    """One step of ROME (E18-E20): a rank-one update of its one layer per request, in order,
    each on the model the previous one left (the authors' code edits only the first request of a
    batch; every request is edited here). Per request: the keys k̄ (flat mean over the
    templates) and k* (bare prompt); v* = W k* + b + δ, δ from E4 at the layer with the MLP
    output W k* + b as the norm base (ROME's compute_v); then W += v uᵀ."""
    (layer,) = hp.layers                              # one layer (check_hparams)
    clock = Clock(model.embed.weight.device)
    W = model.edit_weight(layer)
    bias = model.edit_bias(layer)
    W0_here = W0[layer].to(W.device)
    m = W.shape[1]                                    # one m×m factor on the device through the step (plan.py
    C_u = C[layer].to(W.device, torch.float64, copy=True) if hp.mom2_adjustment else \
        torch.eye(m, dtype=torch.float64, device=W.device)                       # counts it); PL streams C
    C_factor = cholesky_factor(C_u, overwrite=True)   # once a step: E18 solves with C for every request
    losses = []
    for q in requests:
        where = Where(state.step, [q])
        k_mean, k_star = (k.to(W.device) for k in rome_keys(model, q, templates, layer))   # E18's k̄, k*
        base = W.float() @ k_star + (0 if bias is None else bias.float())       # (d,) the MLP output
        clock.lap("keys")
        _, info = compute_z(model, z_rows(model.tokenizer, [q], templates), 1, layer, hp, z_tokens,
                            norm_base=base[None].to(model.embed.weight.device), at_mlp=True)
        v_star = base + info["delta"][0].to(W.device)
        losses += info["loss"]
        where.check_finite(layer, **{"target value": v_star})
        clock.lap("z")
        try:
            delta = B.solve_rome(W, C_factor, k_mean, k_star, v_star, bias)            # E18-E20
        except ValueError as e:
            raise where.failed(layer, e) from None
        W_new = W + delta.to(W.dtype)
        pl = preservation_loss(W_new, W0_here, C[layer])
        where.check_finite(layer, update=W_new, **{"preservation loss": torch.tensor(pl)})
        state.partial = True
        W.copy_(W_new)
        clock.lap("solve")
    state.finish_step(len(requests))
    return step_log(state, {layer: dict(pl=pl, D=None, z=None)}, clock) | fit_summary(losses)


def rome_keys(model: M.CausalLM, q, templates, layer: int):
    """The subject's last-token key at `layer` in every template: their flat mean k̄ (ROME's u,
    not MEMIT's two-level mean E5) and the bare prompt's k* (template "{}")."""
    rows = key_rows(model.tokenizer, [q], templates)
    ids, mask = model.tokenizer.pad([r.ids for r in rows], device=model.embed.weight.device)
    look = torch.tensor([r.lookup for r in rows], device=ids.device)
    with torch.no_grad():
        keys = model(ids, mask, keys_at={layer}, stop_after=layer).keys[layer]
    keys = keys[torch.arange(len(rows), device=ids.device), look].float()          # (templates, m)
    return keys.mean(0), keys[0]


def update_layer(model, layer, K1, R, hp: HParams, state: EditState, C, W0, prompts, where) -> dict:
    """Solve, check and write one layer's update (step_layer; `prompts`: its E8a names of K1's
    columns); its log entry (pl, D, z)."""
    W = model.edit_weight(layer)
    ls = state.layers[layer]
    K1, R = K1.to(W.device), R.to(W.device)        # the layer's device (--device cuda:0,cuda:1)
    state.partial = True                           # from here the step changes the state (E8a, E13, E7)
    try:
        with solving_on(W.device, ls, C[layer].device):
            W_new, pl = step_layer(W, W0[layer].to(W.device), C[layer], K1, R, ls, hp, prompts)
    except ValueError as e:   # e.g. a failed Cholesky: say where, write nothing more
        raise where.failed(layer, e) from None
    where.check_finite(layer, update=W_new, **{"preservation loss": torch.tensor(pl)})
    W.copy_(W_new)
    queue = method_of(hp.method).queue
    calibrated = queue and ls.D_base is not None                 # (not before a step moved the layer)
    return dict(pl=pl, D=hp.alpha * ls.D_base if calibrated else None, z=ls.z if queue else None)


STATE_TENSORS = ("S_KK", "S_VK", "P")
WHOLE = ("S_VK", "P")          # brought over whole for a solve; C and S_KK stay (row_blocks)


@contextmanager
def solving_on(device, ls: LayerState, home):
    """The layer's state for one solve on its weight's device, from `home`, where it lives
    (--state-device): the d×m memory S_VK and AlphaEdit's projector come over whole; C and S_KK
    stay, used a block of rows at a time (add_scaled, times, ...), and so do the kept edits (forget
    brings over only those it takes out). After, S_VK goes back into its old host tensor (no new
    allocation, pinned memory stays pinned), a projector or an S_KK the step created joins it, the
    projector read stays as it was (it never changes), and the step's new edits go home."""
    if home == device:
        yield
        return
    kept = {k: getattr(ls, k) for k in STATE_TENSORS}
    for k in WHOLE:
        setattr(ls, k, None if kept[k] is None else kept[k].to(device, non_blocking=True))
    try:
        yield
    finally:
        for k, old in kept.items():
            setattr(ls, k, old if k == "P" and old is not None else _back_home(getattr(ls, k), old, home))
        ls.edits = edits_on(ls.edits, home)              # (a no-op for those already there)


def edits_on(edits: dict, device) -> dict:
    """E8a's per-prompt (key, value) columns of a layer, on `device`."""
    return {p: [pair_on(kv, device) for kv in kvs] for p, kvs in edits.items()}


def pair_on(kv: tuple, device) -> tuple:
    """One remembered (key, value) column pair on `device` (None: where it is; a value may be None)."""
    return kv if device is None else tuple(None if t is None else t.to(device) for t in kv)


def _back_home(new, old, home: torch.device):
    """A state tensor from the solve's device back where the state lives: into its old tensor when
    the shape still fits, else a new one (pinned on the host when it comes from a GPU)."""
    if new is None or new is old:                      # (S_KK, updated where it lives)
        return new
    if old is not None and old.shape == new.shape:
        return old.copy_(new)
    return new.to(home).pin_memory() if home.type == "cpu" and new.is_cuda else new.to(home)


def step_log(state: EditState, layers: dict, clock: "Clock") -> dict:
    return dict(step=state.step - 1, layers=layers, **{f"seconds_{k}": v for k, v in clock.laps.items()},
                edits=state.n_edits, seconds=sum(clock.laps.values()))


class Clock:
    """Seconds per named phase (synchronising the GPU so each phase gets its own time)."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.laps = {}
        self.t = time.perf_counter()

    def lap(self, name):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t = time.perf_counter()
        self.laps[name] = self.laps.get(name, 0.0) + t - self.t
        self.t = t


@dataclass
class Where:
    """The step and requests an error message names."""
    step: int
    requests: list

    @property
    def ids(self) -> str:
        return ", ".join(str(q.case_id) for q in self.requests)

    def failed(self, layer: int, error: Exception) -> ValueError:
        """A solve's error (e.g. a failed Cholesky), saying where."""
        return ValueError(f"step {self.step}, layer {layer} (case ids {self.ids}): {error}")

    def check_finite(self, layer, **tensors):
        for name, t in tensors.items():
            if not bool(torch.isfinite(t).all()):
                raise FloatingPointError(f"step {self.step}, layer {layer}: non-finite {name} "
                                         f"(case ids {self.ids})")


# ----------------------------------------------------------------------------- the Python API

class Editor:
    """The library's front door: one model, edited step after step, and everything that edits it.

        import data, lyaplock
        editor = lyaplock.Editor.open("fixtures/factmodel-ci", lam=30, alpha=10,
                                      stats_corpus="fixtures/factmodel-ci/corpus.txt")
        requests, _ = data.load_requests("fixtures/factmodel-ci/edits.json", limit=20)
        editor.edit(requests[:10])          # one step; returns its log (PL, D, z per layer)
        editor.edit(requests[10:])          # the next step sees the edited model
        editor.state.layers[2].z            # the queue of layer 2
        editor.evaluate(requests)           # efficacy, generalization, ... (×100)
        editor.save("edited-model")         # an HF checkpoint in the input's layout
        editor.checkpoint("run")            # state + edited weights; later, on a new Editor
        editor.restore("run")               #   built the same way, continue from there

    `editor.model` is edited in place, as a sequential editor must: every `edit` builds on the
    previous ones. `editor.W0` holds the original edit weights (where the state lives);
    `reset()` puts them back and starts a fresh state. For PRUNE-style methods (a `restrain`
    rule) `evaluate` and `save` see the restrained weights while the stream itself continues
    unrestrained.
    """

    def __init__(self, model: M.CausalLM, hparams: HParams, C: dict, templates, model_path=None,
                 z_batch_tokens: int = 2048, state_device=None):
        """state_device: where C, the edit memory and W0 live between solves (default: with the
        weights); "cpu" keeps them in host memory and brings one layer's to the GPU per solve."""
        check_hparams(hparams, model.cfg.n_layers)
        check_statistics(C, hparams.layers, model.cfg.d_mlp)
        check_templates(templates, "templates")
        if not isinstance(z_batch_tokens, int) or z_batch_tokens < 1:
            raise ValueError(f"z_batch_tokens {z_batch_tokens!r}: give a whole number of tokens, at least 1")
        if state_device is not None:
            M.check_device(state_device)
        check_null_spaces(C, hparams)                    # AlphaEdit's family: a projector that is not 0
        where = stats.state_devices(model, {*C, *hparams.layers}, state_device)
        pin = state_device is not None and torch.device(state_device).type == "cpu" and torch.cuda.is_available()

        def kept(t, l, copy=False):                      # where layer l's state lives (pinned on the host)
            t = t.to(where[l], copy=copy)
            return t.pin_memory() if pin else t
        self.C = {l: kept(c, l) for l, c in C.items()}
        self.W0 = {l: kept(model.edit_weight(l).detach(), l, copy=True) for l in hparams.layers}   # PL's reference
        self.model = model
        self.hparams = hparams
        self.templates = templates
        self.model_path = model_path
        self.z_batch_tokens = z_batch_tokens
        self.state = EditState.start(hparams.method, hparams.layers)     # (restore brings a run's in)
        self._original = None                 # the sha256 of W0 (identity), once asked for
        self._statistics = None               # C's trace and norm per layer (identity), once asked for

    @classmethod
    def open(cls, model_path, method: str = "lyaplock", *, device: str = "cpu", dtype: str = "float32",
             stats_corpus=None, stats_tokens: int = 0, stats_cache="runs/stats-cache", seed: int = 0,
             z_batch_tokens: int = 2048, state_device=None, log=lambda *a, **k: None, **hparams) -> "Editor":
        """Load a checkpoint, its preset (hparams overrides the fields of HParams the method reads;
        not batch_size: each edit() is one step), context templates (seeded) and statistics (cached)."""
        check_reads(method, {name: name for name, value in hparams.items() if value is not None})
        if "batch_size" in hparams:
            raise ValueError("batch_size: an Editor edits what each edit() is given as one step; batch the "
                             "requests yourself (editor.edit(requests[i:i + k]))")
        M.check_seed(seed)
        if state_device is not None:
            M.check_device(state_device)                # (the statistics are collected there: before them)
        if not isinstance(stats_tokens, int) or stats_tokens < 0:
            raise ValueError(f"stats_tokens {stats_tokens!r}: give a whole number of tokens, at least 0 (0: the "
                             "whole corpus)")
        cfg = M.checkpoint_config(model_path)
        hp = with_overrides(preset(cfg, method), **hparams)
        check_hparams(hp, cfg.n_layers)                 # before the model loads
        model = M.load(model_path, device, dtype, placement=lambda shares: plan.plan_stages(
            plan.memory_plan(cfg, hp, dtype, z_batch_tokens, shares, state_on_host=state_device is not None)))
        C = stats.load_or_collect_stats(model, model_path, stats_corpus or DEFAULT_CORPUS, stats_tokens,
                                        hp.layers, stats_cache, log=log, state_device=state_device)
        return cls(model, hp, C, method_templates(model, seed, method), model_path, z_batch_tokens,
                   state_device=state_device)

    def edit(self, requests) -> dict:
        """One editing step with all `requests` (data.Request records); returns the step's log. A
        step that fails after it began writing (a failed solve on a later layer, non-finite
        values) leaves the model and state half-way: the next edit is refused until restore or
        reset."""
        requests = self.fitting(checked_requests(requests), "edit")
        if not requests:
            raise ValueError("edit: no requests; a step edits at least one")
        self.check_whole("edit")
        check_hparams(self.hparams, self.model.cfg.n_layers)       # (changed since it was built?)
        if sorted(self.hparams.layers) != sorted(self.state.layers) or self.hparams.method != self.state.method:
            raise ValueError(f"edit: hparams ({self.hparams.method}, layers {list(self.hparams.layers)}) are not the "
                             f"method and layers this Editor's state and statistics are for ({self.state.method}, "
                             f"{sorted(self.state.layers)}): build a new Editor")
        return edit_batch(self.model, requests, self.templates, self.hparams, self.state, self.C,
                          self.W0, self.z_batch_tokens)

    @contextmanager
    def restrained(self):
        """The weights a user of this method gets (PRUNE: W0 + restrain(W − W0)), for the block."""
        restrain = method_of(self.hparams.method).restrain
        if restrain is None:
            yield self.model
            return
        stream = {l: self.model.edit_weight(l).detach().clone() for l in self.hparams.layers}
        try:
            for l, W in stream.items():
                self.model.edit_weight(l).copy_(restrain(W, self.W0[l].to(W.device)))
            yield self.model
        finally:
            for l, W in stream.items():
                self.model.edit_weight(l).copy_(W)

    def evaluate(self, requests, generation: bool = False, snippets=None, seed: int = 0) -> dict:
        """Means over the requests (×100): CounterFact or zsRE metrics, with fluency (and
        consistency, given snippets) when `generation`."""
        M.check_seed(seed)
        requests = self.fitting(checked_requests(requests), "evaluate", ev.FLUENCY_TOKENS if generation else 0)
        if not requests:
            raise ValueError("evaluate: no requests; the metrics are means over at least one")
        if generation and not any(q.generation_prompts for q in requests):
            raise ValueError("evaluate(generation=True): none of these requests has generation prompts (CounterFact's "
                             "generation_prompts), which fluency and consistency are scored on")
        if snippets is not None and not (isinstance(snippets, dict) and all(
                isinstance(v, list) and all(isinstance(t, str) for t in v) for v in snippets.values())):
            raise ValueError("snippets: give {case_id: [text, ...]} (data.read_snippets reads such a file)")
        with self.restrained():
            return ev.summarize(score_cases(self.model, requests, generation, snippets, seed))

    def fitting(self, requests, call: str, generation_tokens: int = 0) -> list:
        """The requests, or a ValueError naming the first too long for the model (length_problem),
        before any work."""
        for q in requests:
            if problem := length_problem(self.model, q, self.templates, generation_tokens):
                raise ValueError(f"{call}: {problem}")
        return requests

    def save(self, directory, replace: bool = False) -> list[str]:
        """The edited model as an HF checkpoint in the input's own layout; returns the input's files
        left out of it (M.save: weights in other formats, which hold the unedited model, and
        training state). `replace`: M.save's."""
        if self.model_path is None:
            raise ValueError("this Editor was built without a model_path to copy the checkpoint from")
        if M.checkpoint_config(self.model_path) != self.model.cfg:
            raise ValueError(f"save: model_path {self.model_path} holds another model than this Editor's (its "
                             "config.json differs): the save would mix the two")
        self.check_whole("save")
        with self.restrained():
            return M.save(self.model_path, directory, self.model.edit_tensors(self.hparams.layers), replace)

    def checkpoint(self, run_dir):
        """Save the state and the edited weights into run_dir (save_checkpoint: atomic, the latest
        one kept), to continue later with `restore`; never into the input checkpoint's directory."""
        self.check_whole("checkpoint")
        if self.model_path is not None and Path(run_dir).resolve() == Path(self.model_path).resolve():
            raise ValueError(f"checkpoint: {run_dir} is the input checkpoint's directory (a later save would copy "
                             "the run's files with the model's); choose another directory")
        if earlier := latest_identity(Path(run_dir)):          # another Editor's checkpoint would be replaced
            try:
                check_identity(Path(run_dir), earlier, self.identity())
            except ValueError as e:
                raise ValueError(f"checkpoint: {e}; it would be replaced: choose another directory") from None
        save_checkpoint(Path(run_dir), self.state, self.model, self.hparams.layers, self.identity())

    def check_whole(self, call: str):
        """A ValueError if the last step failed half-way (its model and state are no step's)."""
        if self.state.partial:
            raise ValueError(f"{call}: step {self.state.step} failed after it changed some layers' weights or "
                             "state, so they are no step's; restore(run_dir) from a checkpoint or reset() first")

    def identity(self) -> dict:
        """What a checkpoint continues only on an Editor alike: the settings its method reads (not
        batch_size: each edit() is a step), the context templates and the original weights W0
        (PL's reference) and their dtype, the templates and W0 as sha256, and the statistics C
        as each layer's trace and norm (compared to 1e-4: C collected again on another device
        differs in its last digits, another corpus or token count in the first)."""
        if self._original is None:
            digest = hashlib.sha256()
            for l in sorted(self.W0):
                digest.update(self.W0[l].detach().cpu().contiguous().view(torch.uint8).numpy())
            self._original = digest.hexdigest()
        if self._statistics is None:
            self._statistics = {str(l): [float(self.C[l].diagonal().sum()), float(self.C[l].norm())]
                                for l in self.hparams.layers}
        hp = self.hparams
        read = {k: v for k, v in asdict(hp).items() if k != "batch_size" and not unread(hp.method, k)}
        return dict(hparams=json.loads(json.dumps(read)), original_weights=self._original,
                    dtype=str(next(iter(self.W0.values())).dtype).removeprefix("torch."),
                    templates=hashlib.sha256(json.dumps(self.templates).encode()).hexdigest(),
                    statistics=self._statistics)

    def restore(self, run_dir):
        """Continue where run_dir's latest checkpoint left off: its edited weights into the model,
        its state (queues, edit memory) beside each layer's C. Build the Editor as the run's was
        (the same settings and templates), on the original checkpoint: W0 (the reference of PL) is
        the weights it was built on; another is refused, naming what differs."""
        self.state = load_checkpoint(Path(run_dir), self.model, self.hparams, self.identity())   # (partial: False)
        for l, ls in self.state.layers.items():
            for k in STATE_TENSORS:
                if getattr(ls, k) is not None:
                    setattr(ls, k, getattr(ls, k).to(self.C[l].device))
            ls.edits = edits_on(ls.edits, self.C[l].device)

    def reset(self):
        """The original weights back, and a fresh state (queues and memory)."""
        for l, W in self.W0.items():
            self.model.edit_weight(l).copy_(W)
        self.state = EditState.start(self.hparams.method, self.hparams.layers)


def check_statistics(C: dict, layers, m: int):
    """C holds every edit layer's statistics: a finite float (m, m) torch tensor; else a
    ValueError naming the first layer whose is not (an Editor built from parts)."""
    for l in layers:
        c = C.get(l) if isinstance(C, dict) else None
        if not isinstance(c, torch.Tensor):
            raise ValueError(f"C: no statistics for edit layer {l}" if c is None else
                             f"C[{l}] is a {type(c).__name__}; give torch tensors (torch.from_numpy for numpy's)")
        if tuple(c.shape) != (m, m) or not c.is_floating_point():
            raise ValueError(f"C[{l}] is {str(c.dtype).removeprefix('torch.')} {tuple(c.shape)}; a float ({m}, {m}) "
                             f"matrix is needed (d_mlp = {m})")
        if c.device.type == "meta" or c.requires_grad:
            raise ValueError(f"C[{l}] is " + ("on the meta device, without values" if c.device.type == "meta" else
                                              "a tensor autograd tracks: give C[l].detach()"))
        if not bool(torch.isfinite(c).all()):
            raise ValueError(f"C[{l}] holds values that are not finite (NaN or inf)")
        if (skew := asymmetry(c)) > torch.finfo(torch.float32).eps ** 0.5:
            raise ValueError(f"C[{l}] is not symmetric (C = KKᵀ/n is, E1; here |C − Cᵀ| reaches {skew:.2g} of its "
                             "largest value): the solves would take it for another; (C + C.T) / 2 if it is rounding")


def asymmetry(c: torch.Tensor, rows: int = 2048) -> float:
    """max |C − Cᵀ| / max |C|, a block of rows against its block of columns at a time, on and
    above the diagonal (no m×m temporary). Allowed up to float32's √ε (3.5e-4; a sum a GPU
    made in float32 need not be bitwise symmetric, nor stay so cast to float64)."""
    largest = max(float(c.max()), -float(c.min()))
    skew = max(float((c[i:i + rows, i:] - c[i:, i:i + rows].T).abs().max()) for i in range(0, c.shape[0], rows))
    return skew / largest if largest else 0.0


def check_templates(templates, where: str):
    """Context templates as context_templates makes them: a list of groups, each a list of texts
    with one "{}", the first group ["{}"], the bare prompt (E4's norm base and E6's h read its row,
    ROME's k* its key) (a ValueError naming `where` otherwise)."""
    if not (isinstance(templates, list) and templates and all(
            isinstance(g, list) and g and all(isinstance(t, str) and t.count("{}") == 1 for t in g) for g in templates)):
        raise ValueError(f"{where}: not context templates: a list of groups, each a list of texts with one {{}} "
                         "(as context_templates makes them, e.g. [['{}'], ['The cat. {}', ...]])")
    if templates[0] != ["{}"]:
        raise ValueError(f"{where}: the first group of context templates is {templates[0]!r}, not ['{{}}']: the "
                         "bare prompt comes first (E4-E6 read it there), e.g. [['{}'], ['The cat. {}', ...]]")


def checked_requests(requests) -> list:
    """The requests as a list, each a data.Request (a TypeError naming the first that is not)."""
    if isinstance(requests, tuple) and len(requests) == 2 and isinstance(requests[0], list):
        raise TypeError("requests: a (requests, skipped) pair, as data.load_requests and data.requests_from "
                        "return; pass its first item")
    if requests is None or isinstance(requests, (data.Request, str, dict)) or not hasattr(requests, "__iter__"):
        raise TypeError(f"requests: a list of data.Request is needed, got {type(requests).__name__}"
                        + (" (one request: [request])" if isinstance(requests, data.Request) else ""))
    requests = list(requests)
    for i, q in enumerate(requests):
        if not isinstance(q, data.Request):
            raise TypeError(f"request {i} is a {type(q).__name__}, not a data.Request: read them with "
                            "data.load_requests(file), or data.requests_from(records) for dicts in memory")
    return requests


def with_overrides(hp: HParams, **changes) -> HParams:
    """hp with the given fields changed (unknown names and bad values are errors)."""
    names = {f.name for f in fields(HParams)}
    if unknown := sorted(set(changes) - names):
        raise ValueError(f"unknown hyper-parameter(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    def python(v):          # numpy's scalars as Python's: they go to config.json and a checkpoint's identity
        return v.item() if type(v).__module__ == "numpy" and getattr(v, "ndim", 1) == 0 else v
    hp = replace(hp, **{k: python(v) for k, v in changes.items() if v is not None})
    if isinstance(hp.layers, (list, tuple)):
        hp.layers = tuple(python(l) for l in hp.layers)
    check_hparams(hp)
    return hp


HPARAM_TYPES = {f.name: str(f.type) for f in fields(HParams)}     # "int", "float", ... as annotated
KINDS = {"str": str, "int": int, "bool": bool, "float": (int, float), "None": type(None)}


def of_kind(value, annotation: str) -> bool:
    """value is of a kind its field's annotation ("int", "float | None", ...) names: a bool only
    where "bool" is named (Python takes it for an int), an int where "float" is."""
    kinds = annotation.split(" | ")
    return isinstance(value, tuple(KINDS[k] for k in kinds)) and (not isinstance(value, bool) or "bool" in kinds)


# the range of each numeric hyper-parameter (the command's flags for them share it: check_settings)
RANGES = dict(lam="positive", alpha="positive", V="positive", l2="positive", nullspace_threshold="positive",
              v_lr="positive", clamp_norm_factor="positive", v_num_grad_steps="at least 1", batch_size="at least 1",
              v_weight_decay="at least 0", kl_factor="at least 0")


def range_problem(value, need: str) -> str | None:
    """None if `value` meets `need` ("positive" or "at least N", and finite: an infinite λ passes
    a comparison but not a solve), else the end of the message: "must be positive, got 0"."""
    if not math.isfinite(value):
        return f"must be {need}, got {value} (not a finite number)"
    if not (value > 0 if need == "positive" else value >= int(need.split()[-1])):
        return f"must be {need}, got {value}"
    return None


def check_hparams(hp: HParams, n_layers: int | None = None):
    """A ValueError naming the first hyper-parameter out of its range: the method known, the
    layers increasing (the last is where the target values are found, E4-E6) and, given the
    model's depth, within it and below the top block; weights and rates positive, step counts at
    least 1."""
    if not isinstance(hp, HParams):
        raise ValueError(f"hparams: an HParams is needed (lyaplock.HParams(...), or preset(cfg, method)), got "
                         f"{type(hp).__name__}")
    method_of(hp.method)
    layers = hp.layers
    if not isinstance(layers, (list, tuple)):
        raise ValueError(f"layers {layers!r}: give the edit layers as a tuple of layer numbers, e.g. (1, 2)")
    if not layers:                  # the preset's rule on a model of under 3 blocks (ROME: 2)
        blocks = f" for a model of {n_layers} block(s)" if n_layers is not None else ""
        example = "none: a layer below the top block is needed" if n_layers == 1 else \
            "e.g. --layers 0" if n_layers == 2 else "e.g. --layers 0,1"
        raise ValueError(f"no edit layers{blocks}: the preset's rule (n/8..n/4 of the depth, below the top "
                         f"block) finds none under 3 blocks (ROME: 2); give them ({example})")
    if not all(isinstance(l, int) and not isinstance(l, bool) for l in layers) or list(layers) != sorted(set(layers)) \
            or layers[0] < 0 or (n_layers is not None and layers[-1] >= n_layers):
        depth = f" in 0..{n_layers - 1}" if n_layers is not None else ""
        raise ValueError(f"layers {list(layers)}: give increasing layer numbers{depth}")
    if method_of(hp.method).locate == "rome" and len(layers) != 1:
        raise ValueError(f"layers {list(layers)}: ROME edits one layer (--layers L)")
    if n_layers is not None and layers[-1] == n_layers - 1:
        raise ValueError(f"layers {list(layers)}: the last edit layer is where the target values are found (E4), "
                         f"and the top block ({n_layers - 1}) passes a change at the subject's last token to no later "
                         "token (no attention above it): the edit could not reach the target; choose layers below it")
    for name, need in RANGES.items():
        value, whole = getattr(hp, name), HPARAM_TYPES[name] == "int"                     # (counts)
        if not of_kind(value, HPARAM_TYPES[name]):
            raise ValueError(f"hyper-parameter {name} must be a {'whole ' * whole}number (a Python "
                             f"{'int' if whole else 'int or float'}), got {value!r}")
        if problem := range_problem(value, need):
            raise ValueError(f"hyper-parameter {name} {problem}")
    if not isinstance(hp.mom2_adjustment, bool):
        raise ValueError(f"hyper-parameter mom2_adjustment must be True or False, got {hp.mom2_adjustment!r}")
    if hp.superseded not in ("keep", "remove"):
        raise ValueError(f"superseded {hp.superseded!r}: choose 'keep' or 'remove'")


def score_cases(model, requests, generation: bool, snippets=None, seed: int = 0) -> list[dict]:
    """Per-case metrics (and fluency where the data has generation prompts)."""
    with stage("evaluation", "evaluate with fewer requests or a smaller dtype"):
        cases = ev.edit_eval(model, requests)
        cases = [c | g for c, g in zip(cases, ev.generative_eval(model, requests))]   # greedy decoding
        if generation and any(q.generation_prompts for q in requests):
            cases = [c | g for c, g in zip(cases, ev.generation_eval(model, requests, snippets, seed=seed))]
    return cases


# ----------------------------------------------------------------------------- run state on disk

_QUEUE = ("D_base", "Z", "a", "zmax")


@dataclass
class EditState:
    """Everything that lives across editing steps; save()/load() as safetensors + JSON."""
    method: str
    layers: dict[int, LayerState]
    step: int = 0       # editing steps (batches) done
    n_edits: int = 0    # requests edited so far
    recurring: frozenset | None = None   # prompts the stream edits more than once, where known
    #   (the command knows its stream; not saved): only their E8a columns are kept
    partial: bool = False   # a step began changing weights or state and did not finish (not saved)

    @classmethod
    def start(cls, method: str, layers) -> "EditState":
        method_of(method)
        return cls(method, {int(l): LayerState() for l in layers})

    def finish_step(self, n_requests: int):
        self.step += 1
        self.n_edits += n_requests
        self.partial = False

    def save(self, directory):
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        layers = {str(l): {k: getattr(ls, k) for k in _QUEUE} for l, ls in self.layers.items()}
        tensors = {f"{l}.{k}": getattr(ls, k).detach().cpu().contiguous()
                   for l, ls in self.layers.items() for k in method_of(self.method).memory
                   if getattr(ls, k) is not None}
        edits = {str(l): [p for p, kvs in ls.edits.items() for _ in kvs] for l, ls in self.layers.items() if ls.edits}
        for l, ls in self.layers.items():              # E8a's per-prompt keys and values, a column each
            if ls.edits:
                ks, vs = zip(*(kv for kvs in ls.edits.values() for kv in kvs))
                tensors[f"{l}.edit_K"] = torch.stack(ks, 1).cpu()
                if vs[0] is not None:
                    tensors[f"{l}.edit_V"] = torch.stack(vs, 1).cpu()
        M.write_safetensors(tensors, d / "state.safetensors")
        meta = dict(method=self.method, step=self.step, n_edits=self.n_edits, layers=layers,
                    **({"edits": edits} if edits else {}))
        (d / "state.json").write_text(json.dumps(meta, indent=1))

    @classmethod
    def load(cls, directory, device="cpu") -> "EditState":
        d = Path(directory)
        try:
            meta = json.loads((d / "state.json").read_text())
            tensors = load_file(str(d / "state.safetensors"), device=str(device))
        except (OSError, ValueError, SafetensorError) as e:
            raise ValueError(f"cannot read edit state in {d}: {e}") from e
        return cls._from(meta, tensors, d)

    @classmethod
    def _from(cls, meta, tensors, d) -> "EditState":
        """Rebuild and validate a saved state; every problem is a ValueError naming it."""
        def bad(msg):
            raise ValueError(f"edit state in {d}: {msg}")
        check_state_meta(meta, bad)
        method = meta["method"]
        keeps = METHODS[method].memory
        layers, seen = {}, set()
        for l, q in meta["layers"].items():
            vals = [q[k] for k in _QUEUE]
            names = [f"{l}.{k}" for k in keeps]
            have = [n in tensors for n in names]
            calibrated = vals[0] is not None
            # a calibrated queue had a step, which the memory keeps; steps before it that left the
            # layer at W0 (feed_queue) are kept in the memory of an uncalibrated one too
            if len(set(have)) > 1 or (METHODS[method].queue and calibrated and not all(have)):
                bad(f"layer {l}: memory tensors {names} must be all present or all absent, and present once "
                    f"the queue is calibrated (present: {have}, D_base: {q['D_base']})")
            ls = LayerState(**q, **{k: tensors.get(n) for k, n in zip(keeps, names)})
            _check_memory(ls, lambda m: bad(f"layer {l}: {m}"))
            ls.edits = _edits_from(meta.get("edits", {}).get(l, []), tensors, l, ls, bad)
            layers[int(l)] = ls
            seen.update(names + [f"{l}.edit_K", f"{l}.edit_V"])
        if set(tensors) - seen:
            bad(f"unexpected tensors {sorted(set(tensors) - seen)}")
        return cls(method, layers, meta["step"], meta["n_edits"])


def check_state_meta(meta, bad):
    """What state.json must hold, checked without its tensors (the report reads it so): method,
    step, n_edits and each layer's queue fields, all null or all positive floats, finite
    (json reads a hand-written Infinity as a float)."""
    if not isinstance(meta, dict) or {"method", "step", "n_edits", "layers"} - set(meta):
        bad("state.json lacks method/step/n_edits/layers")
    if not isinstance(meta["method"], str) or meta["method"] not in METHODS:
        bad(f"unknown method {meta['method']!r}")
    if not all(type(meta[k]) is int and meta[k] >= 0 for k in ("step", "n_edits")):
        bad("step and n_edits must be non-negative integers")
    layers = meta["layers"]
    if not isinstance(layers, dict) or not all(re.fullmatch(r"[0-9]+", l) for l in layers) \
            or len({int(l) for l in layers}) < len(layers):              # ("01" beside "1": one layer twice)
        bad("layers must map layer numbers to queue fields")
    for l, q in meta["layers"].items():
        if not isinstance(q, dict) or set(q) != set(_QUEUE):
            bad(f"layer {l}: queue fields must be exactly {_QUEUE}")
        vals = [q[k] for k in _QUEUE]
        if not (all(v is None for v in vals) or all(isinstance(v, float) and math.isfinite(v) and v > 0 for v in vals)):
            bad(f"layer {l}: queue fields must be all null or all positive floats, got {q}")


def _edits_from(prompts, tensors, l, ls: LayerState, bad) -> dict:
    """E8a's prompt -> (k, v) of one layer from the saved columns, checked against the memory."""
    K, V = tensors.get(f"{l}.edit_K"), tensors.get(f"{l}.edit_V")
    if not prompts:
        if K is not None or V is not None:
            bad(f"layer {l}: edit_K/edit_V without the prompts they belong to")
        return {}
    m = None if ls.S_KK is None else ls.S_KK.shape[0]
    d = None if ls.S_VK is None else ls.S_VK.shape[0]
    if K is None or tuple(K.shape) != (m, len(prompts)) or (V is None) != (d is None) \
            or (V is not None and tuple(V.shape) != (d, len(prompts))):
        bad(f"layer {l}: edit_K/edit_V do not match {len(prompts)} prompts and the memory's shapes")
    edits = {}
    for j, p in enumerate(prompts):                   # a prompt edited twice in a step: two columns
        edits.setdefault(p, []).append((K[:, j], None if V is None else V[:, j]))
    return edits


def _check_memory(ls: LayerState, bad):
    """S_KK must be float64 (m, m); S_VK float64 (d, m) with the same m."""
    for name, t in (("S_KK", ls.S_KK), ("S_VK", ls.S_VK)):
        if t is not None and (t.dtype != torch.float64 or t.dim() != 2):
            bad(f"{name} must be a 2-D float64 tensor, got {t.dtype} {tuple(t.shape)}")
    if ls.S_KK is not None and ls.S_KK.shape[0] != ls.S_KK.shape[1]:
        bad(f"S_KK must be square, got {tuple(ls.S_KK.shape)}")
    if ls.S_VK is not None and (ls.S_KK is None or ls.S_VK.shape[1] != ls.S_KK.shape[0]):
        bad(f"S_VK {tuple(ls.S_VK.shape)} does not match S_KK")


CHECKPOINT_NAME = re.compile(r"ckpt-\d{6}(-\d+)?(\.tmp)?")


def save_checkpoint(out: Path, state: EditState, model: M.CausalLM, layers, identity: dict | None = None):
    """Atomically: write ckpt-<step>.tmp/ (edit state + current edited weights) and flush it to
    the disk, rename it to ckpt-<step>/, point latest.json at it, then drop older checkpoints. A
    kill (or a power loss) at any moment leaves a valid one; a failed write (a full disk) removes
    its partial directory and says which checkpoint is intact. The same step saved again (the
    API) gets a new name, ckpt-<step>-1, so the one latest.json names is never removed first."""
    d = out / f"ckpt-{state.step:06d}"
    again = 0
    while d.exists():
        again += 1
        d = out / f"ckpt-{state.step:06d}-{again}"
    tmp = d.with_name(d.name + ".tmp")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        state.save(tmp)
        if identity is not None:
            (tmp / "identity.json").write_text(json.dumps(identity))
        M.write_safetensors({n: t.detach().cpu().contiguous() for n, t in model.edit_tensors(layers).items()},
                            tmp / "weights.safetensors")
        data.sync_files(tmp)
        tmp.rename(d)
        data.write_atomic(out / "latest.json", json.dumps({"checkpoint": d.name, "step": state.step}))
    except (OSError, SafetensorError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        last = read_run_file(out / "latest.json")
        intact = f"the last checkpoint ({last['checkpoint']}, step {last['step']}) is intact" if last \
            else "no checkpoint was written before"
        raise ValueError(f"writing the checkpoint of step {state.step} to {d} failed ({e}); {intact}") from None
    for old in out.glob("ckpt-*"):
        if old != d and CHECKPOINT_NAME.fullmatch(old.name):   # (not a ckpt-mine/ of the user's)
            shutil.rmtree(old)


def load_checkpoint(out: Path, model: M.CausalLM, hp: HParams | None = None, identity: dict | None = None) -> EditState:
    """The run state of the latest checkpoint (on the host) and its edit weights (into the model);
    with hp, a state of another method or other layers is refused before the model is touched,
    and with `identity` (Editor.identity) one whose identity.json differs (checkpoints written
    before it was recorded are not checked)."""
    d = latest_checkpoint(out)
    state = EditState.load(d)
    if hp is not None and (state.method, sorted(state.layers)) != (hp.method, sorted(hp.layers)):
        raise ValueError(f"{d}: a checkpoint of {state.method} on layers {sorted(state.layers)}; this "
                         f"Editor runs {hp.method} on layers {sorted(hp.layers)}")
    if identity is not None and (saved := read_run_file(d / "identity.json")) is not None:
        check_identity(d, saved, identity)
    try:
        weights = load_file(str(d / "weights.safetensors"))
    except (OSError, SafetensorError) as e:
        raise ValueError(f"{d}: cannot read the edited weights ({e})") from None
    model.load_edit_tensors(weights)
    return state


def read_checkpoint_headers(directory: Path) -> dict:
    """A checkpoint's state.json, once its tensor files read whole as far as their headers tell
    (a cut file is found without reading its tensors), or a ValueError naming the file."""
    for name in ("state.safetensors", "weights.safetensors"):
        try:
            with safe_open(str(directory / name), framework="pt"):
                pass
        except (OSError, SafetensorError) as e:
            raise ValueError(f"{directory / name} is unreadable ({e})") from None
    try:
        state = json.loads((directory / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{directory / 'state.json'} is unreadable ({e})") from None

    def bad(msg):
        raise ValueError(f"{directory}: {msg}")
    check_state_meta(state, bad)
    return state


def latest_checkpoint(out: Path) -> Path:
    """The directory latest.json names (one of out's own checkpoints, ckpt-NNNNNN), or a
    ValueError saying there is none to continue from."""
    try:
        name = json.loads((out / "latest.json").read_text())["checkpoint"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{out}: no checkpoint to continue from (latest.json: {e})") from None
    if not isinstance(name, str) or not CHECKPOINT_NAME.fullmatch(name) or name.endswith(".tmp"):
        raise ValueError(f"{out}: no checkpoint to continue from (latest.json names {name!r}, not one of the "
                         "run's own checkpoints, ckpt-NNNNNN)")
    return out / name


def latest_identity(out: Path) -> dict | None:
    """The identity.json of out's latest checkpoint (None: no checkpoint, or one without it)."""
    try:
        return read_run_file(latest_checkpoint(out) / "identity.json")
    except ValueError:
        return None


def read_run_file(file: Path, where: str = ""):
    """A run's JSON file, or None where it is absent (a run or checkpoint written before it was
    recorded); a ValueError naming it (after `where`) when it is unreadable."""
    if not file.exists():
        return None
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{where}{file} is unreadable ({e})") from None


def check_identity(d: Path, saved: dict, now: dict):
    """A ValueError naming what differs between the Editor a checkpoint was written by and this
    one (Editor.identity): it would go on from that state by other rules, or measure PL from
    other weights."""
    was, hp = saved.get("hparams", {}), now["hparams"]        # (a field one of them lacks: not compared)
    differ = [f"{k} {v!r} there, {hp[k]!r} here" for k, v in was.items() if k in hp and hp[k] != v]
    if saved.get("templates") != now["templates"]:
        differ.append("other context templates (another seed?)")
    was_C, now_C = saved.get("statistics", now["statistics"]), now["statistics"]      # (older checkpoints: none)
    if was_C.keys() != now_C.keys() or any(not math.isclose(a, b, rel_tol=1e-4)
                                           for l in now_C for a, b in zip(was_C[l], now_C[l])):
        differ.append("other statistics C (another corpus or token count?)")
    if saved.get("dtype", now["dtype"]) != now["dtype"]:
        differ.append(f"weights in {saved['dtype']} there, {now['dtype']} here (the model's dtype)")
    elif saved.get("original_weights") != now["original_weights"]:
        differ.append("other original weights W0 (build the Editor on the unedited checkpoint the run "
                      "began from, not on an edited one)")
    if differ:
        raise ValueError(f"{d}: written by an Editor with other settings: {'; '.join(differ)}")


# ----------------------------------------------------------------------------- the command

DEFAULT_HELDOUT = Path(__file__).parent / "fixtures" / "wikitext-2-valid-sample.txt"
QUICKSTART = ("python lyaplock.py --model fixtures/factmodel-ci --edits fixtures/factmodel-ci/edits.json"
              " --stats-corpus fixtures/factmodel-ci/corpus.txt --limit 100 --batch-size 10")
HEADLINE = ("efficacy", "generalization", "specificity", "score", "efficacy_generative",
            "generalization_generative", "efficacy_top1", "generalization_top1", "specificity_top1", "locality_top1",
            "fluency", "consistency", "perplexity",
            "general.sst2.f1", "general.mrpc.f1", "general.cola.mcc", "general.rte.f1", "general.nli.f1",
            "general.mmlu.accuracy")


@dataclass
class Settings:
    """Everything one run of the command depends on; config.json is its JSON form."""
    model: str
    edits: str = ""                  # (empty only for --plan without --edits)
    hparams: HParams = field(default_factory=HParams)
    model_config_sha256: str = ""
    edits_sha256: str = ""
    limit: int | None = None
    skip_bad: bool = False
    stats_corpus: str = str(DEFAULT_CORPUS)
    stats_tokens: int = 0
    stats_file: str | None = None
    dtype: str = "float32"
    seed: int = 0
    glue_dir: str | None = None
    glue_n: int = 100
    glue_protocol: str = "likelihood"
    heldout: str = str(DEFAULT_HELDOUT)
    eval_every: int = 0
    stop_below: float | None = None
    generation: bool = True
    snippets: str | None = None
    # these may change when a run is resumed: they change speed, memory or places, not results
    device: str = "cpu"
    z_batch_tokens: int = 2048
    stats_batch_tokens: int = 8192
    stats_cache: str = "runs/stats-cache"
    checkpoint_every: int = 10
    state_device: str | None = None
    save_model: str | None = None       # where the edited model goes at the end (a resume may name another)

    def to_json(self) -> str:
        """config.json's text: the settings, and of the hyper-parameters those the method reads (a
        run given --stats records no statistics corpus: it reads none)."""
        hp = {k: v for k, v in asdict(self.hparams).items() if not unread(self.hparams.method, k)}
        unused = STATS_CORPUS_FIELDS if self.stats_file else ()
        settings = {k: v for k, v in asdict(self).items() if k not in unused}
        return json.dumps(settings | {"hparams": hp | {"layers": list(self.hparams.layers)}}, indent=1)

    @classmethod
    def from_flat(cls, flat: dict) -> "Settings":
        """From dotted keys as ev.flat writes them ("hparams.lam": ...); unknown top-level keys are
        ignored, an unknown "hparams." key refused (with_overrides names it)."""
        hp = {k.split(".", 1)[1]: v for k, v in flat.items() if k.startswith("hparams.")}
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in flat.items() if k in names},
                   hparams=with_overrides(HParams(), **hp))


STATS_CORPUS_FIELDS = ("stats_corpus", "stats_tokens", "stats_batch_tokens")   # read only without --stats
RESUMABLE = ("device", "z_batch_tokens", "stats_batch_tokens", "stats_cache", "checkpoint_every", "state_device",
             "save_model")
FLAG_FIELDS = {"method": "hparams.method", "batch_size": "hparams.batch_size", "layers": "hparams.layers",
               "alpha": "hparams.alpha", "lam": "hparams.lam", "v": "hparams.V", "l2": "hparams.l2",
               "nullspace_threshold": "hparams.nullspace_threshold",
               "stats": "stats_file", "no_generation": "generation", "superseded": "hparams.superseded"}
FLAG_RANGES = {flag: RANGES[field.removeprefix("hparams.")] for flag, field in FLAG_FIELDS.items()
               if field.removeprefix("hparams.") in RANGES} | dict(
    z_batch_tokens="at least 1", stats_batch_tokens="at least 1", checkpoint_every="at least 1",
    limit="at least 1", glue_n="at least 1", eval_every="at least 0", stats_tokens="at least 0")
PATHS = dict(model="directory", edits="file", stats_corpus="file", stats="file or directory", heldout="file",
             glue_dir="directory", snippets="file", save_model="directory")        # the path flags, and what each takes
NOT_SETTINGS = ("resume", "out", "given", "plan", "plan_gib", "plan_host_gib")


def gib_list(text: str) -> list[float]:
    """--plan-gib's devices: GiB numbers separated by commas."""
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give each device's memory in GiB, a number, "
                                         "e.g. 80,80") from None


def gib_problem(gib: float) -> str | None:
    """None for a memory figure from a kibibyte to an exbibyte, else the end of a message (beyond
    them the plan's arithmetic overflows: 1e300 GiB in bytes is infinite, a share of 1e-320 next to
    1e10 is 0)."""
    return None if 2 ** -20 <= gib <= 2 ** 30 else f"must be from 2**-20 GiB (a KiB) to 2**30 GiB (an EiB), got {gib}"


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Sequential knowledge editing with LyapLock (or the baselines in the same frame).",
        epilog=f"Subcommands: 'stats' (a statistics file: lyaplock.py stats --help), 'report RUN_DIR' "
               f"(figures and the queue's audit). On --resume only {', '.join('--' + k.replace('_', '-') for k in RESUMABLE)} "
               f"may differ from the run's settings. Quick start (CPU, under a minute): {QUICKSTART}")
    p.add_argument("--model", help="HF checkpoint directory (config.json, *.safetensors, tokenizer.json)")
    p.add_argument("--edits", help="requests: CounterFact (ROME or EasyEdit layout) or zsRE (MEND): a JSON list "
                   "or JSON Lines")
    p.add_argument("--method", choices=list(METHODS), default="lyaplock", help="the update rule (README "
                   "\"Methods\"): lyaplock, the baselines of the paper's comparison, and LyapLock's queue "
                   "plugged into some of them (default lyaplock)")
    p.add_argument("--batch-size", type=int, default=100, help="requests per editing step (default 100)")
    p.add_argument("--limit", type=int, help="edit only the first N requests (with --skip-bad: the first N "
                                             "valid records, of which any too long for the model are then skipped)")
    p.add_argument("--skip-bad", action="store_true", help="skip invalid records instead of stopping")
    p.add_argument("--layers", help="edit layers, e.g. 4,5,6,7,8 (default: the model's preset)")
    p.add_argument("--alpha", type=float, help="threshold multiplier α: D = α·D_base (preset: 60)")
    p.add_argument("--lam", type=float, help="preservation weight λ (preset: the published value for "
                   "the model's shape, e.g. Llama-3-8B 1000, its MEMIT family 15000; other shapes "
                   "d_mlp/4, the MEMIT family d_mlp; README \"Hyper-parameters\")")
    p.add_argument("--v", type=float, help="editing weight V of the subproblem (default 1)")
    p.add_argument("--l2", type=float, help="AlphaEdit's regulariser L2 (E12; preset: 10 for the "
                   "published shapes, else 1)")
    p.add_argument("--nullspace-threshold", type=float, help="AlphaEdit's null space: C's eigenvectors "
                   "with eigenvalue below it (E11; default 2e-2, the authors')")
    p.add_argument("--superseded", choices=("keep", "remove"), help="a request that re-edits a prompt an "
                   "earlier step edited: keep that edit's key and value in the edit memory (the "
                   "authors'), or remove them first (E8a; better on streams that re-edit, README \"Testbed\"; "
                   "it keeps the key and value of each edit whose prompt comes again: --plan shows the memory); "
                   "default keep, and a note when the edits re-edit a prompt")
    p.add_argument("--stats", help="a statistics file (lyaplock.py stats), or a directory of the "
                   "MEMIT/ROME code's layer statistics; checked against the model")
    p.add_argument("--stats-corpus", default=str(DEFAULT_CORPUS), help="text for the statistics C "
                   "(default: the bundled WikiText-2 sample)")
    p.add_argument("--stats-tokens", type=int, default=0, help="tokens for C (default: whole corpus)")
    p.add_argument("--stats-batch-tokens", type=int, default=8192, help="tokens per statistics batch (default 8192)")
    p.add_argument("--stats-cache", default="runs/stats-cache", help="where C is cached (default runs/stats-cache)")
    p.add_argument("--z-batch-tokens", type=int, default=2048, help="tokens per pass of the target-value "
                   "optimisation (default 2048; lower it to fit a smaller GPU; --plan shows what it takes)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, "
                   "cuda:N, a list (cuda:0,cuda:1: the layers are placed across them by their memory, the "
                   "float64 state of each edit layer with it) or auto (every visible GPU)")
    p.add_argument("--state-device", help="where the float64 statistics, the edit memory and W0 live between "
                   "solves: 'cpu' keeps them in host memory and brings one layer's to the GPU per solve "
                   "(same results; for a card too small to hold them; see the README)")
    p.add_argument("--dtype", default="float32", choices=list(M.DTYPES), help="the model's weights and "
                   "activations whatever the checkpoint stores (default float32; bfloat16 halves the memory); "
                   "statistics and solves are float64 either way; --save-model keeps the checkpoint's dtype, "
                   "its edit layers holding the values the run evaluated (bfloat16's, exactly)")
    p.add_argument("--plan", action="store_true", help="print what the run needs on each device (weights, "
                   "statistics and edit memory, the target values, a solve, collecting C) from config.json alone, "
                   "and whether it fits; load nothing (exit 1 if it does not fit)")
    p.add_argument("--plan-gib", type=gib_list, help="with --plan: the "
                   "memory of the devices to plan for, in GiB (e.g. 80,80), instead of this machine's")
    p.add_argument("--plan-host-gib", type=float, help="with --plan and --state-device cpu or a cpu device: "
                   "the host memory to plan for, in GiB, instead of this machine's (the cpu devices and the host "
                   "state share it)")
    p.add_argument("--seed", type=int, default=0, help="seed of the context templates (E3; default 0)")
    p.add_argument("--out", help="run directory (default: a new runs/NNN)")
    p.add_argument("--resume", metavar="DIR", help="continue the interrupted run in DIR")
    p.add_argument("--checkpoint-every", type=int, default=10, help="save run state every k steps (default 10)")
    p.add_argument("--save-model", metavar="DIR", help="write the edited checkpoint here (HF layout)")
    p.add_argument("--glue-dir", help="general-ability sets (sst2, mrpc, cola, rte, nli, mmlu .json), "
                   "e.g. fixtures/glue; scored before, after, and every --eval-every steps")
    p.add_argument("--glue-n", type=int, default=100, help="items per general-ability task (default 100)")
    p.add_argument("--glue-protocol", choices=list(ev.GENERAL), help="likelihood (default): the answer words' "
                   "likelihood after this code's prompts, items 0..; authors: the authors' glue_eval (their prompts, "
                   "items 10.., F1 of a parsed greedy answer), for figures comparable with the paper's")
    p.add_argument("--heldout", default=str(DEFAULT_HELDOUT), help="text for held-out perplexity")
    p.add_argument("--eval-every", type=int, default=0, help="general ability every k steps (0: "
                   "before and after only)")
    p.add_argument("--stop-below", type=float, help="end the run (and record the collapse point) when "
                   "general ability falls below this fraction of its value before editing; needs "
                   "--eval-every. Ability: the mean headline score of the --glue-dir tasks, else 1/perplexity")
    p.add_argument("--no-generation", action="store_true", help="skip fluency (top-k generations)")
    p.add_argument("--snippets", help="consistency references: JSON {case_id: [text, ...]} (e.g. "
                   "Wikipedia snippets about each new target)")
    args = p.parse_args(argv)
    quiet = copy.deepcopy(p)               # the same parser with no defaults: what was typed
    for action in quiet._actions:
        action.default = argparse.SUPPRESS
    args.given = set(vars(quiet.parse_args(argv)))
    return args


def check_settings(args):
    """Numeric flags out of range, and a path flag given as '' (the working directory, else: --resume ''
    started a new run): a ValueError naming the flag, before any work."""
    data.refuse_empty_paths(args, PATHS | dict(resume="directory"))
    for name, need in FLAG_RANGES.items():
        if getattr(args, name) is not None and (problem := range_problem(getattr(args, name), need)):
            raise ValueError(f"--{name.replace('_', '-')} {problem}")
    M.check_seed(args.seed, "--seed")
    if args.stop_below is not None and not (0 < args.stop_below < 1 and (args.eval_every > 0 or args.resume)):
        raise ValueError(f"--stop-below {args.stop_below}: give a fraction between 0 and 1"
                         + ("" if args.resume else ", with --eval-every K"))
    if args.state_device:
        M.check_device(args.state_device)
    for gib in args.plan_gib or ():
        if problem := range_problem(gib, "positive") or gib_problem(gib):
            raise ValueError(f"--plan-gib: each device's memory {problem}")
    if args.plan_host_gib is not None and (problem := range_problem(args.plan_host_gib, "positive")
                                           or gib_problem(args.plan_host_gib)):
        raise ValueError(f"--plan-host-gib {problem}")
    if not args.resume:                           # typed for a new run: the method must read it
        check_reads(args.method, {f"--{flag.replace('_', '-')}": FLAG_FIELDS[flag].removeprefix("hparams.")
                                  for flag in args.given if flag in FLAG_FIELDS})
    if args.resume and args.out:
        raise ValueError("--out and --resume: a resumed run stays in its own directory; give only --resume")
    for flag, needs in (("glue_n", "glue_dir"), ("glue_protocol", "glue_dir"), ("plan_gib", "plan"),
                        ("plan_host_gib", "plan")):
        resumed = args.resume and needs == "glue_dir"          # (a resumed run recorded its --glue-dir)
        if flag in args.given and needs not in args.given and not resumed:
            raise ValueError(f"--{flag.replace('_', '-')} without --{needs.replace('_', '-')}: it would be "
                             "recorded, not used")
    if args.snippets and args.no_generation:
        raise ValueError("--snippets with --no-generation: consistency is scored on the generated text; the "
                         "snippets would be recorded, not used")
    if args.stats and (unread := sorted(set(STATS_CORPUS_FIELDS) & args.given)):
        raise ValueError(f"--{unread[0].replace('_', '-')} with --stats: the file holds the statistics (and "
                         "the corpus and token count they came from); the flag would be recorded, not used")


def check_inputs(args):
    """Every file and directory the flags name exists, and the general-ability tasks and held-out
    text read as the scoring will read them, before any model work and before a run directory is
    made: a mistyped --glue-dir or a malformed task file would otherwise surface only after the
    statistics and the first scoring. A ValueError (DataError) naming the flag or the file."""
    for name in ("edits", "stats_corpus", "heldout", "snippets", "stats"):
        path = getattr(args, name, None)
        if path is not None and not Path(path).exists():
            raise ValueError(f"--{name.replace('_', '-')} {path}: no such file or directory")
    if args.glue_dir is not None and not Path(args.glue_dir).is_dir():
        why = "a file: give the directory of the task files" if Path(args.glue_dir).exists() else "no such directory"
        raise ValueError(f"--glue-dir {args.glue_dir}: {why}")
    if args.glue_dir is not None:
        missing = [f"{t}.json" for t in ev.TASKS if not (Path(args.glue_dir) / f"{t}.json").is_file()]
        if missing:
            raise ValueError(f"--glue-dir {args.glue_dir}: lacks {', '.join(missing)} (it holds one JSON file "
                             f"per task: {', '.join(ev.TASKS)}; e.g. fixtures/glue)")
        start = ev.AUTHORS_FIRST_ITEM if args.glue_protocol == "authors" else 0
        for task in ev.TASKS:                       # every item read as the scoring will read it
            items = ev.read_items(args.glue_dir, task, args.glue_n or 100, start)
            if "glue_n" in args.given and len(items) < args.glue_n:     # (the default: what there is)
                raise ValueError(f"--glue-n {args.glue_n}: {Path(args.glue_dir) / task}.json holds "
                                 f"{len(items)} items" + f" past the first {start}" * bool(start) +
                                 f"; give --glue-n {len(items)} or less")
    if args.heldout is not None:
        data.read_corpus(args.heldout)              # a corpus with text, or a DataError naming it
    if args.stats is None and not args.resume:   # the statistics' corpus too (was read after the model loaded)
        data.read_corpus(args.stats_corpus)
    if args.snippets is not None:
        data.read_snippets(args.snippets)           # (was read only after the statistics)


def parse_layers(text: str, n_layers: int) -> tuple:
    try:
        layers = tuple(int(x) for x in text.split(","))
    except ValueError:
        layers = ()
    if not layers or not all(0 <= l < n_layers for l in layers) or list(layers) != sorted(set(layers)):
        raise ValueError(f"--layers {text!r}: give increasing layer numbers in 0..{n_layers - 1}, e.g. "
                         "--layers 1,2 (or leave the flag out for the model's preset)")
    return layers


def typed_settings(args, names, cfg: M.Config) -> dict:
    """The settings (dotted keys, as config.json holds them) that the flags `names` set."""
    out = {}
    for name in sorted(set(names) - set(NOT_SETTINGS)):
        value = getattr(args, name)
        if name in PATHS and value is not None:
            value = str(Path(value).resolve())
        if name in ("model", "edits"):
            out[f"{name}_sha256" if name == "edits" else "model_config_sha256"] = data.file_sha256(
                Path(value) / "config.json" if name == "model" else value)
        if name == "layers":
            value = list(parse_layers(value, cfg.n_layers))
        out[FLAG_FIELDS.get(name, name)] = (not value) if name == "no_generation" else value
    return out


def new_settings(args, cfg: M.Config) -> Settings:
    """A new run's settings: the method's preset, then every flag (None leaves the preset)."""
    flat = typed_settings(args, [k for k, v in vars(args).items() if v is not None], cfg)
    preset_hp = {f"hparams.{k}": v for k, v in asdict(preset(cfg, args.method)).items()}
    return Settings.from_flat(preset_hp | flat)


def resumed_settings(args, saved: dict, cfg: M.Config) -> Settings:
    """A resumed run's settings: its own, with the typed flags that may change; any other typed
    flag that differs from the run's setting is refused, naming each, and so is an edits file or
    a model config.json that changed on disk since the run began (it would edit another stream)."""
    defaults = {f.name: f.default for f in fields(Settings) if f.default is not MISSING}
    was = defaults | ev.flat(saved)                       # (a setting newer than the run: its default)
    if saved.get("stats_file") and (unread := sorted(set(STATS_CORPUS_FIELDS) & args.given)):
        raise ValueError(f"--{unread[0].replace('_', '-')}: the run reads its statistics from its --stats file "
                         f"{saved['stats_file']}; the flag would be recorded, not used")
    now = typed_settings(args, args.given, cfg)
    if diff := [f"{k}: {was.get(k)!r} in the run, {v!r} now" for k, v in now.items()
                if k not in RESUMABLE and was.get(k) != v]:
        raise ValueError(f"--resume {args.resume}: the configuration differs: " + "; ".join(diff))
    for what, file, digest in (("edits file", Path(saved["edits"]), saved.get("edits_sha256")),
                               ("model's config.json", Path(saved["model"]) / "config.json",
                                saved.get("model_config_sha256"))):
        if digest and (not file.exists() or data.file_sha256(file) != digest):
            raise ValueError(f"--resume {args.resume}: the run's {what} {file} is missing or has changed since the "
                             "run began (its sha256 differs): the run would go on with other data; put it back "
                             "or start a new run")
    settings = Settings.from_flat(was | {k: v for k, v in now.items() if k in RESUMABLE})
    if problem := settings_problem(settings):
        raise ValueError(f"--resume {args.resume}: its config.json's {problem} (changed by hand?)")
    return settings


def settings_problem(settings: Settings) -> str | None:
    """The first of a run's settings (not hparams: check_hparams) whose value is not of its
    annotated kind, e.g. "limit '10' is not an int | None"."""
    for f in fields(Settings):
        value = getattr(settings, f.name)
        if f.name != "hparams" and not of_kind(value, f.type):
            return f"{f.name} {value!r} is not {'an' if f.type[0] in 'aeiou' else 'a'} {f.type}"
    return None


def read_run_config(run_dir) -> dict:
    """The config.json of a run directory (--resume), or a ValueError saying it is none: a model
    checkpoint's config.json, for one, has no run settings."""
    try:
        saved = json.loads((Path(run_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:        # (unreadable, not UTF-8, not JSON)
        raise ValueError(f"--resume {run_dir}: not a run directory (config.json: {e})") from None
    if not isinstance(saved, dict) or {"model", "edits", "hparams"} - set(saved):
        raise ValueError(f"--resume {run_dir}: not a run directory (its config.json holds no run settings: "
                         "model, edits, hparams)")
    return saved


def open_run(args) -> tuple[Path | None, Settings, M.Config]:
    """(run directory, settings, the checkpoint's config): the run --resume names, or a new run's
    --out (None for the next runs/NNN), checked to be empty but not made yet (create_run_dir);
    from the flags, the run's config.json and the checkpoint's (M.checkpoint_config: its files
    checked, as load will), before any weights are read."""
    check_settings(args)
    check_inputs(args)
    saved = read_run_config(args.resume) if args.resume else None
    check_outputs(args, args.model or saved["model"])
    cfg = M.checkpoint_config(args.model or saved["model"])
    settings = resumed_settings(args, saved, cfg) if saved else new_settings(args, cfg)
    try:
        check_hparams(settings.hparams, cfg.n_layers)     # the model's depth, before any weights
    except ValueError as e:                             # (a resumed run begun before a check it fails)
        raise ValueError(f"--resume {args.resume}: its {e}; it cannot go on: start a new run" if saved else str(e)) from None
    if settings.stats_tokens and not settings.stats_file and settings.stats_tokens < cfg.d_mlp:
        raise ValueError(f"--stats-tokens {settings.stats_tokens}: C ({cfg.d_mlp}×{cfg.d_mlp}) "
                         f"needs at least d_mlp = {cfg.d_mlp} tokens, or it is singular")
    if settings.stats_file:             # --stats: what config.json can check, before the weights load
        source, layers = Path(settings.stats_file), settings.hparams.layers
        if stats.is_authors_stats(source):
            stats.check_authors_files(source, cfg, layers)
        else:
            stats.check_shape(source, stats.read_meta(source)[1], layers, cfg.d_mlp)
    if settings.save_model and not settings.stats_file and (
            (cache := Path(settings.stats_cache).resolve()) == (save := Path(settings.save_model).resolve())
            or save in cache.parents):      # (the cache's file in it: the save refused at the end of the run)
        raise ValueError(f"--stats-cache {settings.stats_cache} is inside --save-model {settings.save_model}: keep "
                         "the cache apart from the edited model's directory")
    if saved:
        return Path(args.resume), settings, cfg
    return Path(args.out) if args.out else None, settings, cfg


def load_model(settings: Settings, cfg: M.Config, requests) -> M.CausalLM:
    """The checkpoint on the run's devices, its blocks where the run's memory plan puts them."""
    with stage("loading the model", "use --dtype bfloat16, more GPUs (--device cuda:0,cuda:1) or --state-device cpu"):
        def placement(shares):           # (asked only with several devices)
            stream = plan.run_stream_tokens(settings, cfg, requests)
            return plan.plan_stages(plan.run_memory_plan(settings, cfg, requests, shares, stream))
        return M.load(settings.model, settings.device, settings.dtype, placement=placement)


def check_outputs(args, model_path):
    """--out and --save-model name new or empty directories (the edited model never the input
    checkpoint), writable, --stats-cache a directory (one that cannot be written serves what it
    holds), each makeable where missing: checked before the model loads rather than after hours
    of editing."""
    for flag, path, advice in (("--out", args.out, "choose a new directory or --resume it"),
                               ("--save-model", args.save_model, "choose a new directory"),
                               ("--stats-cache", args.stats_cache, "give a directory (made where missing)")):
        if path is None:
            continue
        if not path:                     # (--save-model '' wrote the edited model into the working directory)
            raise ValueError(f"{flag} '': give a directory")
        path = Path(path)
        if flag == "--stats-cache" and Path(model_path).resolve() in (path.resolve(), *path.resolve().parents):
            raise ValueError(f"--stats-cache {path} is inside --model {model_path}: keep the cache apart from the "
                             "checkpoint (its files would add to the checkpoint's)")
        here = path if path.exists() else existing_parent(path)          # where it is, or will be made
        if not path.exists() and not here.is_dir():
            raise ValueError(f"{flag} {path}: {here} is a file, so no directory can be made there")
        # (a statistics cache that cannot take C is only not filled: load_or_collect_stats)
        if flag != "--stats-cache" and here.is_dir() and not os.access(here, os.W_OK | os.X_OK):
            raise ValueError(f"{flag} {path}: {here} cannot be written (read-only, or not yours); {advice}")
        if not path.exists():
            continue
        if flag == "--save-model" and path.resolve() == Path(model_path).resolve():
            raise ValueError("--save-model must not be the input checkpoint's directory")
        if not path.is_dir():
            raise ValueError(f"{flag} {path} is a file, not a directory; {advice}")
        own = flag == "--save-model" and args.resume and own_save(path, Path(args.resume))
        if flag != "--stats-cache" and any(path.iterdir()) and not own:
            raise ValueError(f"{flag} {path} exists and is not empty; {advice}")
    if args.save_model and nested_in_run(Path(args.save_model).resolve(), args.out or args.resume):
        raise ValueError(f"--save-model {args.save_model} and the run directory {args.out or args.resume or 'runs/NNN'}: "
                         "one holds the other (the edited model's files would mix with the run's); choose a "
                         "directory beside it")


def own_save(path: Path, out: Path) -> bool:
    """own_save_target as a yes or no (a run begun before runs recorded their saves: no)."""
    try:
        return own_save_target(path, out)
    except ValueError:
        return False


def nested_in_run(saved: Path, run_dir) -> bool:
    """`saved` (resolved) is the run directory, in it or holds it: the given one, or where none is
    given the next runs/NNN, any of them."""
    if run_dir:
        run = Path(run_dir).resolve()
        return saved == run or saved in run.parents or run in saved.parents
    runs = Path("runs").resolve()
    return saved == runs or saved in runs.parents or any(p.parent == runs and p.name.isdigit()
                                                          for p in (saved, *saved.parents))


def input_digests(settings: Settings, model: M.CausalLM, known=None) -> dict[str, str]:
    """sha256 digests of what a run reads beyond its settings and its edits file (Settings keeps
    that one's): the model's weights through the last edit layer (the tensors the statistics'
    key reads; a whole checkpoint would take minutes to read at every start) and its tokenizer,
    the statistics' source (a statistics file's header, which holds its tensors' digests, or the
    MEMIT-layout files, or the corpus), the held-out text, the general-ability tasks and the
    snippets. Recorded at a run's start (inputs.json) and compared when it is resumed. (`known`:
    stats.tensor_digests'.)"""
    path, last = Path(settings.model), max(settings.hparams.layers)
    sha = lambda parts: hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    weights = stats.tensor_digests(path, model.names_through_layer(last), known)
    out = {f"model weights through layer {last}": sha(weights),
           "tokenizer": stats.tokenizer_sha(path)}
    if settings.stats_file:
        source = Path(settings.stats_file)
        authors = stats.is_authors_stats(source)           # (as load_stats_file tells them apart)
        out[f"statistics {source}"] = sha([data.file_sha256(f) for f, _ in stats.authors_files(
            source, model.cfg, settings.hparams.layers).values()]) if authors else sha(stats.file_metadata(source))
    else:
        out[f"statistics corpus {settings.stats_corpus}"] = data.file_sha256(settings.stats_corpus)
    out[f"held-out text {settings.heldout}"] = data.file_sha256(settings.heldout)
    if settings.glue_dir:
        out[f"general-ability tasks {settings.glue_dir}"] = sha(
            [data.file_sha256(Path(settings.glue_dir) / f"{task}.json") for task in ev.TASKS])
    if settings.snippets:
        out[f"snippets {settings.snippets}"] = data.file_sha256(settings.snippets)
    return out


def check_inputs_unchanged(out: Path, inputs: dict):
    """A resumed run reads what it began with (input_digests, against its inputs.json; a run begun
    before runs recorded them is not checked): else a ValueError naming each input that changed."""
    began = read_run_file(out / "inputs.json", f"--resume {out}: ") or {}
    if changed := [name for name, digest in began.items() if inputs.get(name) != digest]:
        raise ValueError(f"--resume {out}: the run's {'; '.join(changed)} changed since the run began (its "
                         "sha256 differs): the run would go on with other data; put it back or start a new run")


def existing_parent(path: Path) -> Path:
    """The nearest directory above `path` that exists (the working directory at the end)."""
    return next(p for p in path.absolute().parents if p.exists())


def create_run_dir(out: Path | None, settings: Settings, hold: Callable, files: dict) -> Path:
    """A new run's directory (`out`, or the next runs/NNN), made only once its requests, templates
    and statistics are in hand, so a run refused before it edits leaves nothing to clear away;
    held (`hold`: holding) before anything is written, then `files` ({name: JSON value}: the
    templates, the inputs' digests), then config.json, which makes it a run --resume can
    continue. A run that took the same --out after this one checked it (check_outputs) is found
    here: this one is refused, not mixed into it."""
    out = out or new_run_dir()
    out.mkdir(parents=True, exist_ok=True)
    hold(out)
    if any((out / name).exists() for name in (*files, "config.json")):
        raise ValueError(f"--out {out}: another run began in this directory since this one checked it; "
                         "choose another directory")
    for name, value in files.items():
        data.write_atomic(out / name, json.dumps(value, indent=1))
    data.write_atomic(out / "config.json", settings.to_json())
    return out


@contextmanager
def holding(out: Path, what: str = "this run (started or resumed there)", on_directory: bool = False):
    """This process's hold on run directory `out` while its run goes on: an exclusive lock on
    out/run.lock (on_directory: on `out` itself, no file added, as among a model's files), which
    the system releases when the process ends (killed or not). A second run or --resume of the
    directory meanwhile is refused: both would write its log and checkpoints."""
    fd = os.open(out, os.O_RDONLY) if on_directory else os.open(out / "run.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ValueError(f"{out}: another process is running {what}; wait for it to end, or choose "
                         "another --out") from None
    except OSError as e:             # a file system without locks (some network and FUSE mounts)
        print(f"note: {out}: no lock on this file system ({e.strerror}): nothing keeps a second process "
              "from running this run at the same time", file=sys.stderr)
    try:
        yield
    finally:
        os.close(fd)


def new_run_dir(root=Path("runs")) -> Path:
    """The next runs/NNN, made here: a run that takes the same number at the same moment leaves
    this one the next free number."""
    root.mkdir(parents=True, exist_ok=True)
    n = max([int(p.name) for p in root.iterdir() if p.name.isdigit()], default=0)
    while True:
        n += 1
        try:
            (d := root / f"{n:03d}").mkdir()
            return d
        except FileExistsError:
            pass


@contextmanager
def stage(name: str, advice: str):
    """Turn running out of GPU memory into a message that says where and what to change."""
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        raise MemoryError(f"out of GPU memory during {name}: {advice}") from None


def resume_command(out: Path) -> str:
    """The command that continues run `out`, runnable from where this one was started: the
    script's path as seen from here (lyaplock.py in the repository, else its absolute path)."""
    script = Path(__file__).resolve()
    here = os.path.relpath(script)
    return f"python {script if here.startswith('..') else here} --resume {out}"


@contextmanager
def resume_hint(out: Path):
    """A Ctrl-C outside the steps' deferral (loading and the statistics of a resumed run, the
    scoring before editing, the final evaluation, --save-model), a second one within a step, or a
    failed read or write (a full disk): the latest checkpoint is intact (save_checkpoint replaces
    it whole), so say how to continue."""
    try:
        yield
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"continue with: {resume_command(out)}") from None
    except data.Terminated as e:                             # SIGTERM: a cluster's time limit, say
        e.hint = f"continue with: {resume_command(out)}"
        raise
    except OSError as e:
        raise OSError(f"{e}; the run's latest checkpoint is intact: once that is fixed, continue with: "
                      f"{resume_command(out)}") from None


class DeferInterrupt:
    """Ctrl-C finishes the current step (then the run saves and stops); a second one stops at once."""

    def __enter__(self):
        self.hit = False
        self.old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, *_):
        if self.hit:
            raise KeyboardInterrupt
        self.hit = True
        print("\ninterrupted: finishing this step, then saving (Ctrl-C again stops at once)", flush=True)

    def __exit__(self, *_):
        signal.signal(signal.SIGINT, self.old)


def general_ability(editor: Editor, settings: Settings, final=False) -> dict:
    """Held-out perplexity and, with --glue-dir, the zero-shot tasks (eval.py), of the weights a
    user of the method gets (editor.restrained)."""
    state = editor.state
    with editor.restrained() as model:
        r = dict(step=state.step, edits=state.n_edits, final=final,
                 perplexity=ev.perplexity(model, data.read_corpus(settings.heldout)[:64]))
        if settings.glue_dir:
            r["general"] = ev.GENERAL[settings.glue_protocol](model, settings.glue_dir, settings.glue_n)
    return r


def ability_score(entry: dict) -> tuple[str, float]:
    """The general ability --stop-below watches: the mean headline score of the zero-shot tasks
    (F1, MCC for CoLA, accuracy for MMLU), or 1/perplexity without them."""
    if "general" in entry:
        heads = [v[ev.headline_of(k)] for k, v in entry["general"].items()]
        return "mean zero-shot score", sum(heads) / len(heads)
    return "1/perplexity", 1.0 / entry["perplexity"]


def ability_before(editor: Editor, settings: Settings) -> dict:
    """General ability before editing, refused (collapsed's ValueError) where --stop-below's rule
    cannot use it."""
    first = general_ability(editor, settings)
    if settings.stop_below:
        collapsed(settings, first, first)
    return first


def collapsed(settings: Settings, before: dict, now: dict) -> dict | None:
    """The stop record (stop.json) when ability fell below --stop-below × its value before."""
    metric, b = ability_score(before)
    _, v = ability_score(now)
    if b <= 0:
        raise ValueError(f"--stop-below: the {metric} before editing is {b:.4g}; the rule needs a positive value")
    if v >= settings.stop_below * b:
        return None
    return dict(step=now["step"], edits=now["edits"], metric=metric, value=v, before=b,
                threshold=settings.stop_below * b)


def main(argv=None):
    with data.sigterm_exits():         # `kill`, `timeout`, torchrun's agent: the finally blocks clean up
        return command(sys.argv[1:] if argv is None else list(argv))


def command(argv: list) -> int:
    """main's work: the editing run, or the stats or report command."""
    if argv[:1] == ["stats"]:
        return stats.main(argv[1:])
    if argv[:1] == ["report"]:
        return report(argv[1:])
    args = parse_args(argv)
    if args.plan and not (args.model or args.resume):
        print("error: --plan needs --model (or --resume DIR)", file=sys.stderr)
        return 2
    if args.plan:
        try:
            return plan.print_plan(args)
        except (M.CheckpointError, data.DataError, ValueError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    if not args.resume and not (args.model and args.edits):
        missing = " and ".join(f"--{k}" for k in ("model", "edits") if not getattr(args, k))
        print(f"LyapLock: give {missing} (see --help). Quick start: 100 real CounterFact edits into the "
              f"bundled fact model (README, 'Testbed'), CPU, under a minute:\n  {QUICKSTART}")
        return 2
    try:
        return run(args)
    except (M.CheckpointError, data.DataError, ValueError, FloatingPointError, MemoryError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except torch.cuda.OutOfMemoryError:            # outside the stages that say where (stage)
        print("error: out of GPU memory (loading, the context templates or the scoring): use --dtype bfloat16, "
              "more GPUs (--device cuda:0,cuda:1) or --state-device cpu; --plan shows what each part needs",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:      # with a run directory, resume_hint names it
        where = e.args[0] if e.args else "before the run directory was made: nothing to continue"
        print(f"\ninterrupted; {where}", file=sys.stderr)
        return 130
    except data.Terminated as e:        # (the finally blocks have run: no temporary file is left)
        print(f"\nstopped (SIGTERM); {e.hint or 'before the run directory was made: nothing to continue'}",
              file=sys.stderr)
        raise                           # (exit 143: a script calling main in a loop stops too)


def report(argv) -> int:
    p = argparse.ArgumentParser(prog="lyaplock.py report", description="Figures, the audit of the queue "
                                "(theorem T1) and a verdict, written into a run directory and printed.")
    p.add_argument("run_dir")
    run_dir = Path(p.parse_args(argv).run_dir)
    try:
        print(ev.report(run_dir))
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (TypeError, AttributeError, KeyError, IndexError) as e:    # a file edited by hand, or of another code
        print(f"error: {run_dir}: a run file holds something a run does not write ({type(e).__name__}: {e})",
              file=sys.stderr)
        return 1
    return 0


def run(args) -> int:
    out, settings, cfg = open_run(args)
    with ExitStack() as held:
        if args.resume:                          # (a Ctrl-C or a full disk from here on: how to continue)
            held.enter_context(holding(out))
            if args.given & set(RESUMABLE):      # what this start typed, so that --resume DIR alone goes on so
                data.write_atomic(out / "config.json", settings.to_json())
            held.enter_context(resume_hint(out))
        if args.resume and settings.save_model:
            own_save_target(settings.save_model, out)
        requests, skipped = load_requests(settings)
        model = load_model(settings, cfg, requests)
        hashed = {}                 # the weights' digests, for inputs.json and then the statistics' key
        inputs = input_digests(settings, model, hashed)
        if args.resume:
            check_inputs_unchanged(out, inputs)
        saved = saved_templates(out) if args.resume else None
        templates = saved or method_templates(model, settings.seed, settings.hparams.method)
        requests, too_long = fit_context(model, requests, templates, settings)
        skipped += too_long
        if skipped:
            print(f"skipped {len(skipped)} bad record(s):\n  " + "\n  ".join(skipped[:10]))
        if note := superseded_note(requests, settings.hparams, "superseded" in args.given):
            print(note, file=sys.stderr)
        editor = Editor(model, settings.hparams, preservation_statistics(model, settings, hashed), templates,
                        settings.model, settings.z_batch_tokens, state_device=settings.state_device)
        # a value before editing --stop-below cannot use: said before a run directory is made (none could resume)
        first = ability_before(editor, settings) if not args.resume and settings.stop_below else None
        if not args.resume:
            out = create_run_dir(out, settings, hold=lambda d: held.enter_context(holding(d)),
                                 files={"templates.json": templates, "inputs.json": inputs})
            held.enter_context(resume_hint(out))
        start_or_resume(editor, requests, settings, out, first)
        editor.state.recurring = recurring_prompts(requests)
        if not (out / "stop.json").exists() and not edit_stream(editor, requests, settings, out):
            print(f"stopped after step {editor.state.step}; continue with: {resume_command(out)}")
            return 130
        finish(editor, requests, settings, out, len(skipped))
        if settings.save_model:                  # typed, or recorded by the run a --resume continues
            left_out = save_edited_model(editor, settings.save_model, out)
            print(f"edited model written to {settings.save_model}")
            if left_out:
                print(f"not copied from {settings.model}: {', '.join(left_out)} (weights in other formats, "
                      "which hold the unedited model, and training state)")
    return 0


SAVE_CLAIM = "save-model.json"      # in a run directory: the --save-model it writes, and what it wrote


def directory_stamp(d: Path) -> list:
    """The files of directory d as [name, size, modification time], sorted: what a save left there."""
    return sorted([f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in d.iterdir() if f.is_file())


SAVING = ".lyaplock-saving"          # in --save-model while a run writes it: the run's token


def own_save_target(save_model, out: Path) -> bool:
    """Whether --save-model holds this run's own save (SAVE_CLAIM: one it began, its SAVING marker
    still there, or one it finished whose files are as it left them): it may be written again.
    False where the directory is missing or empty; a ValueError where another run's model (or
    anyone's files) is there: two runs given one directory, a run resumed after another saved
    there, a copy."""
    d = Path(save_model)
    if not d.is_dir() or not any(d.iterdir()):
        return False
    claim = read_run_file(out / SAVE_CLAIM, f"{out}: ")
    if isinstance(claim, dict) and claim.get("directory") == str(d.resolve()):
        marker = d / SAVING
        if claim.get("written") is None and marker.is_file() and marker.read_text() == claim.get("token"):
            return True
        if claim.get("written") == directory_stamp(d):
            return True
    raise ValueError(f"--save-model {save_model} holds files this run has no record of writing (another run's "
                     f"model, or files changed since): writing over them could lose a model; go on with "
                     f"{resume_command(out)} --save-model NEW_DIR")


def save_edited_model(editor: Editor, save_model, out: Path) -> list[str]:
    """Editor.save into --save-model, recorded in SAVE_CLAIM and marked in the directory (SAVING)
    before (a save cut short, torn files and all, is this run's to write again while its marker
    is there) and recorded after (what it wrote, so that files put there later are not)."""
    own = own_save_target(save_model, out)
    d = Path(save_model).resolve()
    token = uuid.uuid4().hex
    data.write_atomic(out / SAVE_CLAIM, json.dumps(dict(directory=str(d), written=None, token=token)))
    d.mkdir(parents=True, exist_ok=True)
    data.write_atomic(d / SAVING, token)
    left_out = editor.save(save_model, replace=own)
    (d / SAVING).unlink()
    data.write_atomic(out / SAVE_CLAIM, json.dumps(dict(directory=str(d), written=directory_stamp(d))))
    return left_out


def saved_templates(out: Path) -> list[list[str]] | None:
    """The context templates a run recorded (templates.json), or None for a run that has none."""
    file = out / "templates.json"
    if (templates := read_run_file(file, f"--resume {out}: ")) is not None:
        check_templates(templates, f"--resume {out}: {file}")
    return templates


def start_or_resume(editor: Editor, requests, settings: Settings, out: Path, first: dict | None = None):
    """A run with a checkpoint continues from it; a new one scores the model before editing (its
    general ability `first` where measured already) and writes checkpoint 0. Either way, what was
    logged after the checkpoint's step is dropped (it is done again), and so is a --stop-below
    record of a later step."""
    if (out / "latest.json").exists():
        editor.restore(out)
        check_run_files(out, editor.state, settings, len(requests))
        print(f"resuming {out} at step {editor.state.step} ({editor.state.n_edits} edits done)")
    else:
        data.write_jsonl(out / "cases_pre.jsonl", score_cases(editor.model, requests, settings.generation,
                                                              snippets_of(settings), settings.seed))
        data.write_jsonl(out / "ability.jsonl", [first or ability_before(editor, settings)])   # (a resumed run
                                                                       # stopped before its checkpoint 0: unchecked)
        editor.checkpoint(out)
    step = editor.state.step
    data.trim_jsonl(out / "log.jsonl", lambda e: e["step"] < step)
    data.trim_jsonl(out / "ability.jsonl", lambda e: e["step"] <= step and not e["final"])
    stop = out / "stop.json"
    record = read_run_file(stop, f"--resume {out}: ")
    if record is not None and not (isinstance(record, dict) and M.whole_number(record.get("step"))):
        raise ValueError(f"--resume {out}: {stop} is not a --stop-below record (changed by hand?): remove it to "
                         "edit on from the checkpoint")
    if record is not None and record["step"] > step:
        stop.unlink()


def check_run_files(out: Path, state: EditState, settings: Settings, n_requests: int):
    """What a resumed run reads besides its checkpoint, as the run left it: the scores before
    editing (one a request) and general ability before editing, and a checkpoint whose edits the
    settings' steps make (a batch_size changed in config.json would edit another stream). A
    ValueError naming the file otherwise: a kill cannot cause it (each is whole before checkpoint
    0), a hand can."""
    made = min(state.step * settings.hparams.batch_size, n_requests)
    if state.n_edits != made:
        raise ValueError(f"--resume {out}: its checkpoint holds {state.n_edits} edits after step {state.step}; "
                         f"config.json's settings (batch_size {settings.hparams.batch_size}, {n_requests} requests) "
                         f"make {made}: the run's config.json was changed; put it back or start a new run")
    pre, _ = data.read_jsonl(out / "cases_pre.jsonl")
    abilities, _ = data.read_jsonl(out / "ability.jsonl")
    for file, problem in (("cases_pre.jsonl", len(pre) != n_requests and f"holds {len(pre)} of {n_requests} scores"),
                          ("ability.jsonl", not abilities and "holds no measurement before editing")):
        if problem:
            raise ValueError(f"--resume {out}: {file} {problem} (the run wrote them whole before its first "
                             "checkpoint: removed or changed since); the scores before editing cannot be made "
                             "again from the edited weights: start a new run")


def latest_edits(requests) -> list[int]:
    """The indices of the requests that hold each prompt's latest target: of the requests that edit
    the same prompt, the last (where a re-edit corrects a fact, an earlier target is superseded:
    scoring it counts the edit that replaced it as a failure); in stream order."""
    last = {q.rewrite_prompt(): i for i, q in enumerate(requests)}
    return sorted(last.values())


def recurring_prompts(requests) -> frozenset:
    """The prompts (subject filled in) that more than one of the requests edits."""
    counts = Counter(q.rewrite_prompt() for q in requests)
    return frozenset(p for p, n in counts.items() if n > 1)


def superseded_note(requests, hp: HParams, chosen: bool) -> str | None:
    """A warning when the stream re-edits prompts, the method keeps an edit memory and the user
    left --superseded at its default: the stale values stay defended (E8a). Measured on the
    testbed's 2,230-edit rewrite stream (README "Testbed"): LyapLock with "remove" ends at latest-
    target efficacy 81.2 / retention 29.4, with "keep" at 24.2 / 50.7 (MEMIT 55.6 / 0.4). On streams
    that edit each prompt once the two are identical and "keep" stores nothing more; CounterFact,
    the paper's, edits a few prompts again to other facts of a many-valued relation (83 of
    EasyEdit's 10,000: "the twin city of Lyon"), which "keep" defends: hence the default."""
    if chosen or not method_of(hp.method).memory or hp.superseded != "keep":
        return None
    again = len(requests) - len({q.rewrite_prompt() for q in requests})
    return (f"note: {again} request(s) re-edit a prompt edited earlier; {hp.method} keeps the earlier value "
            "in its edit memory and defends it (--superseded keep, the default and the authors'); "
            "--superseded remove takes it out first (E8a; README \"Testbed\": far higher efficacy "
            "on re-edit streams)") if again else None


def load_requests(settings: Settings) -> tuple[list, list[str]]:
    """The run's requests and the messages of skipped records; data warnings printed, a line each."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", data.DataWarning)
        requests, skipped = data.load_requests(settings.edits, settings.skip_bad, settings.limit)
    noted = [str(w.message) for w in caught if issubclass(w.category, data.DataWarning)]
    for line in noted[:10] + ([f"... and {len(noted) - 10} more warnings"] if len(noted) > 10 else []):
        print(f"warning: {line}")
    if not requests:
        raise ValueError(f"{settings.edits}: no requests to edit")
    snippets = snippets_of(settings) or {}
    if settings.snippets and not {str(q.case_id) for q in requests} & set(snippets):
        raise ValueError(f"--snippets {settings.snippets}: none of its {len(snippets)} case ids is one of the "
                         f"edits' (first: {requests[0].case_id!r}): no consistency would be scored")
    return requests, skipped


def fit_context(model, requests, templates, settings: Settings) -> tuple[list, list[str]]:
    """Requests whose every input fits the model's positions; the others are an error naming the
    record and its length (or, with --skip-bad, skipped with that message)."""
    gen = ev.FLUENCY_TOKENS if settings.generation else 0
    ok, bad = [], []
    for q in requests:
        problem = length_problem(model, q, templates, gen)
        if problem is None:
            ok.append(q)
            continue
        msg = f"{settings.edits}: {problem}"
        if not settings.skip_bad:
            raise data.DataError(msg + "; shorten it or use --skip-bad")
        bad.append(msg)
    return ok, bad


def snippets_of(settings: Settings):
    return data.read_snippets(settings.snippets) if settings.snippets else None


def preservation_statistics(model, settings: Settings, known=None) -> dict:
    """C per edit layer: from --stats, else from the cache or a pass over the corpus. (`known`:
    stats.tensor_digests'.)"""
    layers = settings.hparams.layers
    with stage("the preservation statistics", f"lower --stats-batch-tokens (now {settings.stats_batch_tokens})"):
        if settings.stats_file:
            return stats.load_stats_file(settings.stats_file, model, settings.model, layers,
                                         state_device=settings.state_device, known=known)
        return stats.load_or_collect_stats(model, settings.model, Path(settings.stats_corpus), settings.stats_tokens,
                                           layers, settings.stats_cache, log=lambda s, end="\n": print(s, end=end, flush=True),
                                           batch_tokens=settings.stats_batch_tokens, state_device=settings.state_device,
                                           known=known)


def edit_stream(editor: Editor, requests, settings: Settings, out: Path) -> bool:
    """The editing steps from the state's step on, a checkpoint every --checkpoint-every steps
    and at the end, general ability every --eval-every steps (and the --stop-below rule).
    Returns False if Ctrl-C stopped it (after saving)."""
    state = editor.state
    bs = settings.hparams.batch_size
    n_steps = -(-len(requests) // bs)
    t_start = time.time()
    done0 = state.n_edits
    saved = state.step
    shown = 0.0
    abilities, _ = data.read_jsonl(out / "ability.jsonl")
    before = abilities[0]                     # measured before the first edit
    with DeferInterrupt() as interrupt:
        while state.step < n_steps:
            batch = requests[state.step * bs:(state.step + 1) * bs]
            try:
                with stage(f"editing step {state.step}", f"lower --z-batch-tokens (now {settings.z_batch_tokens}) "
                           f"or --batch-size (now {bs}), or use --dtype bfloat16"):
                    log = editor.edit(batch)
            except (ValueError, FloatingPointError, MemoryError) as e:
                raise type(e)(f"{e}; the step was abandoned and the run stopped; its last checkpoint "
                              f"(step {saved}) is intact") from None
            data.append_jsonl(out / "log.jsonl", log)
            if time.time() - shown >= 1 or state.step == n_steps:         # at most a line a second
                shown = time.time()
                print(progress_line(log, state, len(requests), (state.n_edits - done0) / (shown - t_start)), flush=True)
            stop = None
            if settings.eval_every and state.step % settings.eval_every == 0 and state.step < n_steps:
                now = general_ability(editor, settings)
                data.append_jsonl(out / "ability.jsonl", now)
                stop = settings.stop_below and collapsed(settings, before, now)
            if stop:            # before the checkpoint: a kill between them resumes from the one before
                data.write_atomic(out / "stop.json", json.dumps(stop))     # (start_or_resume drops it)
            if state.step % settings.checkpoint_every == 0 or state.step == n_steps or interrupt.hit or stop:
                data.sync_files(out)        # the log lines the checkpoint keeps reach the disk before it
                editor.checkpoint(out)
                saved = state.step
            if stop:
                print(f"general ability fell below {settings.stop_below} of its value before editing "
                      f"({stop['metric']} {stop['value']:.4g} < {stop['threshold']:.4g}): the run ends "
                      f"at step {stop['step']} ({stop['edits']} edits), the collapse point")
                return True
            if interrupt.hit:
                return False
    return True


def progress_line(log: dict, state: EditState, total: int, rate: float) -> str:
    per = " | ".join(f"L{l} PL/D {v['pl'] / v['D']:.3f} z {v['z']:.2f}" if v["D"] else f"L{l} PL {v['pl']:.4g}"
                     for l, v in log["layers"].items())
    return f"[{state.n_edits}/{total}] {rate:.2f} edits/s, ETA {(total - state.n_edits) / rate:.0f} s | {per}"


def finish(editor: Editor, requests, settings: Settings, out: Path, n_skipped: int):
    """Score the final model on the requests it edited (all, unless --stop-below ended the run
    early), every one as the authors' summarize.py does, a prompt the stream edits again at each
    of its targets; write cases.jsonl, summary.json/md (before and after, on those cases; where a
    prompt was edited again, also on each prompt's latest target alone: latest_edits, under
    "latest_target"); print the headline table."""
    edited = requests[:editor.state.n_edits]
    with editor.restrained() as model:
        cases = score_cases(model, edited, settings.generation, snippets_of(settings), settings.seed)
    pre, _ = data.read_jsonl(out / "cases_pre.jsonl")
    pre = ev.with_locality(pre[:len(edited)], pre[:len(edited)])  # cases_pre: every request, in order; locality 100
    cases = ev.with_locality(pre, cases)                  # EasyEdit's: argmax tokens as before editing
    data.write_jsonl(out / "cases.jsonl", cases)
    abilities, _ = data.read_jsonl(out / "ability.jsonl")
    first = abilities[0]
    final = general_ability(editor, settings, final=True)
    data.append_jsonl(out / "ability.jsonl", final)
    if settings.stop_below and not (out / "stop.json").exists() and (stop := collapsed(settings, first, final)):
        data.write_atomic(out / "stop.json", json.dumps(stop | {"end": True}))    # (the last evaluation point)
        print(f"general ability fell below {settings.stop_below} of its value before editing at the end of the "
              f"stream ({stop['metric']} {stop['value']:.4g} < {stop['threshold']:.4g}, step {stop['step']})")
    strip = lambda r: {k: v for k, v in r.items() if k not in ("step", "edits", "final")}
    summary, summary_pre = ev.summarize(cases) | strip(final), ev.summarize(pre) | strip(first)
    latest = latest_edits(edited)
    if again := len(edited) - len(latest):                # the prompts edited again: their earlier targets out
        summary["latest_target"] = ev.summarize([cases[i] for i in latest])
        summary_pre["latest_target"] = ev.summarize([pre[i] for i in latest])
    header = dict(method=settings.hparams.method, model=settings.model, n_edits=editor.state.n_edits,
                  batch_size=settings.hparams.batch_size, skipped=n_skipped, templates=editor.templates)
    ev.write_summary(out, summary, header, pre=summary_pre)
    after, before = ev.flat(summary), ev.flat(summary_pre)
    print(f"\n{'metric':<26}{'before':>10}{'after':>10}")
    for k in HEADLINE:
        if k in after:
            print(f"{k:<26}{before.get(k, float('nan')):>10.2f}{after[k]:>10.2f}")
    if again:
        print(f"({again} of the {len(edited)} edits re-edit a prompt edited earlier: every edit is "
              f"scored, as the authors do; on each prompt's latest target alone ({len(latest)} cases) efficacy is "
              f"{summary['latest_target']['efficacy']:.2f}: summary.md's latest_target rows)")
    print(f"(all metrics: {out / 'summary.md'})\nrun directory: {out}")


if __name__ == "__main__":
    sys.exit(main())
