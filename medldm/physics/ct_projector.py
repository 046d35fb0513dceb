"""The parallel-beam projector of the CT operators, one per geometry (slice shape, view angles, dtype, device).

Each ray sums bilinear samples of the slice at unit (pixel) spacing (``grid_sample``, align_corners=False,
zeros outside). For slices up to a bound (training patches, evaluation crops) the same sums are held as a
sparse system matrix, built once per geometry and shared by every operator instance with that geometry:
projection and its exact transpose are then sparse products, several times faster than ``grid_sample`` and
the autograd pass that transposes it (TV-iterative estimates call both hundreds of times per batch; run
``python benchmarks/ct_projector.py``). Larger slices keep ``grid_sample``: the matrix of a 256^2 slice at
120 views would hold ~16M entries. Both paths give the same sums to float rounding (tests).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F

_CHUNK_SAMPLES = 2**24  # bound on grid_sample output elements per chunk (~64 MB in float32)
SPARSE_MAX_SAMPLES = 2**22  # views x detectors x ray samples at or below which the matrix is built (~4 entries each)


def n_detectors(shape: Sequence[int]) -> int:
    return int(math.ceil(math.hypot(*shape) - 1e-9))


def _sample_points(shape: tuple[int, int], theta: torch.Tensor) -> torch.Tensor:
    """(V, T, S, 2) grid_sample coordinates (width, height) of every ray sample: view, along-ray, detector."""
    nx, ny = shape
    d = n_detectors(shape)
    s = torch.arange(d, dtype=torch.float64) - (d - 1) / 2  # detector offset, pixels
    t = s.clone()  # position along the ray, pixels
    cos, sin = torch.cos(theta)[:, None, None], torch.sin(theta)[:, None, None]
    dx = s[None, None, :] * cos - t[None, :, None] * sin  # (V, T, S) offsets along X
    dy = s[None, None, :] * sin + t[None, :, None] * cos
    # align_corners=False: pixel i's centre sits at (2 i + 1) / n - 1, i.e. 2 * offset / n.
    return torch.stack((2 * dy / ny, 2 * dx / nx), dim=-1)


class _Linear(torch.autograd.Function):
    """y = M x for a sparse M whose transpose is at hand; differentiable to any order."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, m: torch.Tensor, m_t: torch.Tensor) -> torch.Tensor:
        ctx.mats = (m, m_t)
        # autocast would run the product in bf16 (grid_sample it keeps in float32): HU lose ~10 units and the
        # backward pass, run outside autocast, would no longer be the forward's transpose
        with torch.autocast(x.device.type, enabled=False):
            return m @ x

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        m, m_t = ctx.mats
        return _Linear.apply(g.contiguous(), m_t, m), None, None


class Projector:
    """Radon transform of (M, 1, X, Y) slices to (M, D, V) sinograms (detector, view) and its transpose."""

    def __init__(self, shape: tuple[int, int], theta: torch.Tensor, dtype: torch.dtype, device: torch.device,
                 sparse: bool):
        self.shape, self.views, self.d = shape, int(theta.numel()), n_detectors(shape)
        self.dtype, self.device = dtype, device
        points = _sample_points(shape, theta)
        self.sparse = bool(sparse)
        if self.sparse:
            coo = self._system_matrix(points).to(dtype=dtype, device=device)
            with warnings.catch_warnings():  # "CSR support is in beta": products and transposes are all we use
                warnings.simplefilter("ignore", UserWarning)
                self.matrix, self.matrix_t = coo.to_sparse_csr(), coo.t().to_sparse_csr()
        else:
            self.grid = points.reshape(1, self.views * self.d, self.d, 2).to(dtype=dtype, device=device)

    def _system_matrix(self, points: torch.Tensor, views_per_chunk: int = 8) -> torch.Tensor:
        """(D V, X Y) coalesced COO: row s V + v sums, over its ray's samples, the bilinear weights that
        grid_sample gives the (up to four) pixels around each sample inside the slice. Built a few views at a
        time: the float64 temporaries of all views at once would take ~1 GB for 128^2 slices at 120 views."""
        nx, ny = self.shape
        rows, cols, vals = [], [], []
        for first in range(0, self.views, views_per_chunk):
            p = points[first:first + views_per_chunk]
            ix = ((p[..., 0] + 1) * ny - 1) / 2  # unnormalised as grid_sample does: width index (Y)
            iy = ((p[..., 1] + 1) * nx - 1) / 2  # height index (X)
            x0, y0 = torch.floor(ix), torch.floor(iy)
            fx, fy = ix - x0, iy - y0
            v, _, s = torch.meshgrid(torch.arange(first, first + p.shape[0]), torch.arange(self.d),
                                     torch.arange(self.d), indexing="ij")
            row = (s * self.views + v).reshape(-1)
            for cx, cy, w in ((x0, y0, (1 - fx) * (1 - fy)), (x0 + 1, y0, fx * (1 - fy)),
                              (x0, y0 + 1, (1 - fx) * fy), (x0 + 1, y0 + 1, fx * fy)):
                cx, cy, w = cx.reshape(-1).long(), cy.reshape(-1).long(), w.reshape(-1)
                keep = (cx >= 0) & (cx < ny) & (cy >= 0) & (cy < nx) & (w != 0)
                rows.append(row[keep]); cols.append(cy[keep] * ny + cx[keep]); vals.append(w[keep])
        index = torch.stack((torch.cat(rows), torch.cat(cols)))
        return torch.sparse_coo_tensor(index, torch.cat(vals), (self.d * self.views, nx * ny),
                                       check_invariants=True).coalesce()

    def radon(self, s: torch.Tensor) -> torch.Tensor:
        m = s.shape[0]
        if self.sparse:
            r = _Linear.apply(s.reshape(m, -1).t().contiguous(), self.matrix, self.matrix_t)  # (D V, M)
            return r.t().reshape(m, self.d, self.views)
        outs = []
        for a, b in self._chunks(m):
            smp = F.grid_sample(s[a:b], self.grid.expand(b - a, -1, -1, -1), mode="bilinear", padding_mode="zeros",
                                align_corners=False)
            outs.append(smp.reshape(b - a, self.views, self.d, self.d).sum(dim=2).transpose(1, 2))
        return torch.cat(outs, dim=0)

    def backproject(self, sino: torch.Tensor) -> torch.Tensor:
        m = sino.shape[0]
        if self.sparse:
            r = _Linear.apply(sino.reshape(m, -1).t().contiguous(), self.matrix_t, self.matrix)  # (X Y, M)
            return r.t().reshape(m, 1, *self.shape)
        outs = []  # the exact transpose: the vjp of grid_sample
        for a, b in self._chunks(m):
            with torch.enable_grad():
                z = torch.zeros((b - a, 1, *self.shape), dtype=sino.dtype, device=sino.device, requires_grad=True)
                (g,) = torch.autograd.grad(self.radon(z), z, grad_outputs=sino[a:b], create_graph=sino.requires_grad)
            outs.append(g)
        return torch.cat(outs, dim=0)

    @functools.cached_property
    def norm_squared(self) -> float:
        """||R||^2 by 30 power iterations from a fixed start, a hair (1%) above the estimate: 1 / it is a safe
        gradient step."""
        g = torch.Generator(device="cpu").manual_seed(0)
        v = torch.rand((1, 1, *self.shape), generator=g, dtype=torch.float64).to(self.dtype).to(self.device)
        lam = 1.0
        with torch.autocast(self.device.type, enabled=False), torch.no_grad():  # cached: keep it full precision
            for _ in range(30):
                w = self.backproject(self.radon(v))
                lam = float(torch.linalg.vector_norm(w))
                v = w / lam
        return lam * 1.01

    def _chunks(self, m: int):
        per = max(1, _CHUNK_SAMPLES // (self.views * self.d * self.d))
        return [(i, min(m, i + per)) for i in range(0, m, per)]


def is_small(shape: Sequence[int], views: int) -> bool:
    """Whether a geometry gets the sparse matrix (views x detectors x ray samples within the bound)."""
    return views * n_detectors(shape) ** 2 <= SPARSE_MAX_SAMPLES


def projector(shape: tuple[int, int], angles: tuple[float, ...] | int, dtype: torch.dtype, device: str) -> Projector:
    """The projector of a geometry: ``angles`` in degrees, or a number of views evenly over 180. Small
    geometries share one sparse projector per process (its matrix takes seconds to build); larger ones get a
    grid_sample projector of their own, which their operator keeps and frees with itself (a 512^2 grid at 180
    views holds ~0.8 GB)."""
    views = angles if isinstance(angles, int) else len(angles)
    if is_small(shape, views):
        return _shared(tuple(shape), angles, dtype, device)
    return Projector(tuple(shape), _theta(angles), dtype, torch.device(device), sparse=False)


@functools.lru_cache(maxsize=12)
def _shared(shape: tuple[int, int], angles: tuple[float, ...] | int, dtype: torch.dtype, device: str) -> Projector:
    return Projector(shape, _theta(angles), dtype, torch.device(device), sparse=True)


def _theta(angles: tuple[float, ...] | int) -> torch.Tensor:
    if isinstance(angles, int):
        return torch.arange(angles, dtype=torch.float64) * (math.pi / angles)
    return torch.tensor(angles, dtype=torch.float64) * (math.pi / 180.0)
