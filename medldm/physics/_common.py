"""Small shared pieces of the physics operators: tensor checks, private noise generators, CG solvers."""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch

from medldm.errors import InputError


class KeptForLastMeasurement:
    """What an operator derives from a measurement ``y``, kept for the last ``y`` it saw (POCS and the refiner's
    cascades ask dozens of times with the same one), recognised by identity and version counter: edits behind
    torch's back (``.data``, a shared numpy array) go unseen, so replace y instead. An inference-mode tensor keeps
    no version counter and is not kept. Not pickled (a weak reference): operators travel to DataLoader workers."""

    def __init__(self):
        self._kept: tuple | None = None

    def get(self, y: torch.Tensor, key: tuple, compute: Callable[[], object]):
        """``compute()``, or what it gave for this same ``y`` and ``key`` last time."""
        try:
            key = (y._version, *key)
        except RuntimeError:
            return compute()
        if self._kept is None or self._kept[0]() is not y or self._kept[1] != key:
            self._kept = (weakref.ref(y), key, compute())
        return self._kept[2]

    def __getstate__(self) -> dict:
        return {"_kept": None}


def check_image(x: torch.Tensor, ndims: tuple[int, ...] = (4, 5), what: str = "image") -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise InputError(None, f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim not in ndims:
        shapes = " or ".join({4: "(B, C, X, Y)", 5: "(B, C, X, Y, Z)"}[n] for n in ndims)
        raise InputError(None, f"{what} must be shaped {shapes}, got {tuple(x.shape)}")
    if x.is_complex() or not x.is_floating_point():
        raise InputError(None, f"{what} must be a real floating tensor, got {x.dtype}")
    return x


def noise_generator(generator: torch.Generator | None, noise_seed: int) -> torch.Generator:
    """The caller's generator, or a private one seeded from the operator's own ``noise_seed``.

    Never the global RNG: an operator built from the same params gives the same noisy measurement.
    """
    if generator is not None:
        return generator
    return torch.Generator(device="cpu").manual_seed(int(noise_seed))


def randn(shape, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """Standard normal samples drawn on the generator's device, then moved next to ``like``."""
    real = like.real if like.is_complex() else like
    out = torch.randn(tuple(shape), generator=generator, device=generator.device, dtype=real.dtype)
    return out.to(like.device)


def rdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Real inner product Re<a, b>: the one under which a real-to-complex operator has an exact adjoint."""
    if a.is_complex() and b.is_complex():
        return torch.sum(a.real * b.real) + torch.sum(a.imag * b.imag)
    return torch.sum((a.real if a.is_complex() else a) * (b.real if b.is_complex() else b))


def _tol(t: torch.Tensor, tol: float | None) -> float:
    # 10 ulps: below this a step only stirs rounding noise, and stopping makes a second projection a no-op.
    return 10 * torch.finfo(t.real.dtype if t.is_complex() else t.dtype).eps if tol is None else tol


def cgls(A: Callable, AH: Callable, r: torch.Tensor, like: torch.Tensor, iters: int = 50,
         tol: float | None = None) -> torch.Tensor:
    """Minimum-norm least-squares solution of A d = r, started at 0 (CGLS keeps iterates in range(A^H)).

    So x + cgls(A, AH, y - A x) is the orthogonal projection of x onto {A x = y} when y is attainable,
    and onto the least-squares set otherwise, which makes it idempotent.
    """
    tol = _tol(like, tol)
    d = torch.zeros_like(like)
    s = AH(r)
    scale = torch.linalg.vector_norm(like) + torch.linalg.vector_norm(s) + 1e-30
    gamma = rdot(s, s)
    p = s.clone()
    for _ in range(iters):
        if torch.sqrt(gamma) <= tol * scale:
            break
        q = A(p)
        qq = rdot(q, q)
        if qq <= 0:
            break
        alpha = gamma / qq
        d = d + alpha * p
        r = r - alpha * q
        s = AH(r)
        gamma_new = rdot(s, s)
        p = s + (gamma_new / gamma) * p
        gamma = gamma_new
    return d


def cg(op: Callable, b: torch.Tensor, x0: torch.Tensor, iters: int = 50, tol: float | None = None) -> torch.Tensor:
    """Conjugate gradients for a symmetric positive-definite ``op`` (real tensors)."""
    tol = _tol(b, tol)
    x = x0.clone()
    r = b - op(x)
    p = r.clone()
    rr = rdot(r, r)
    scale = torch.linalg.vector_norm(b) + 1e-30
    for _ in range(iters):
        if torch.sqrt(rr) <= tol * scale:
            break
        q = op(p)
        alpha = rr / rdot(p, q)
        x = x + alpha * p
        r = r - alpha * q
        rr_new = rdot(r, r)
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x
