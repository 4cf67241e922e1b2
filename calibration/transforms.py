"""2-D point transforms named by their frames, composable with `@`.

`b_from_a @ a_from_c` is `b_from_c`: `(f @ g)(xy) == f(g(xy))`. Points are float arrays of
shape (N, 2) holding (x, y) in the units of the frame (pixels or millimetres).

Frames used by the calibration:
- `distorted`: pixels of the raw frame as the C-arm delivers it (x right, y down, pixel centres
  at integer coordinates).
- `ideal`: pixels of the corrected frame: straight lines straight, one pixel spacing everywhere,
  same size as the raw frame, matched to the raw frame at the field-of-view centre.
- `phantom`: millimetres in the phantom plane, lattice-aligned (bead (i, j) at (i, j) * pitch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np


class Transform2D(Protocol):
    def __call__(self, xy: np.ndarray) -> np.ndarray: ...


def _as_points(xy: np.ndarray) -> np.ndarray:
    pts = np.asarray(xy, dtype=np.float64)
    if pts.ndim == 1 and pts.shape[0] == 2:
        pts = pts[None, :]
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise ValueError(f"expected points of shape (N, 2), got {pts.shape}")
    return pts


class _Composable:
    def __matmul__(self, other: Transform2D) -> Composed:
        return Composed(self, other)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Composed(_Composable):
    """outer @ inner: apply `inner` first."""

    outer: Transform2D
    inner: Transform2D

    def __call__(self, xy: np.ndarray) -> np.ndarray:
        return self.outer(self.inner(xy))


def polynomial_exponents(order: int) -> list[tuple[int, int]]:
    """Term order of `Polynomial2D`: by total degree d = 0..order, then u^(d-k) v^k for k = 0..d.

    order 2 -> 1, u, v, u^2, uv, v^2.
    """
    return [(d - k, k) for d in range(order + 1) for k in range(d + 1)]


def n_terms(order: int) -> int:
    return (order + 1) * (order + 2) // 2


def design_matrix(u: np.ndarray, v: np.ndarray, order: int) -> np.ndarray:
    """Columns u^a v^b in `polynomial_exponents(order)` order, for normalised u, v."""
    upow = [np.ones_like(u)]
    vpow = [np.ones_like(v)]
    for _ in range(order):
        upow.append(upow[-1] * u)
        vpow.append(vpow[-1] * v)
    return np.stack([upow[a] * vpow[b] for a, b in polynomial_exponents(order)], axis=-1)


@dataclass(frozen=True)
class Polynomial2D(_Composable):
    """Global 2-D polynomial: out = sum_k coef[k] * u^a_k * v^b_k, with normalised input
    u = (x - cx) / s, v = (y - cy) / s.

    Normalising the input keeps the least-squares system well conditioned for orders up to ~7.
    """

    order: int
    center_xy: tuple[float, float]
    scale: float
    coef_x: tuple[float, ...]
    coef_y: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.coef_x) != n_terms(self.order) or len(self.coef_y) != n_terms(self.order):
            raise ValueError(f"order {self.order} needs {n_terms(self.order)} coefficients per axis")

    def _normalised(self, pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return (pts[:, 0] - self.center_xy[0]) / self.scale, (pts[:, 1] - self.center_xy[1]) / self.scale

    def __call__(self, xy: np.ndarray) -> np.ndarray:
        pts = _as_points(xy)
        a = design_matrix(*self._normalised(pts), self.order)
        return np.stack([a @ np.asarray(self.coef_x), a @ np.asarray(self.coef_y)], axis=-1)

    def evaluate_grid(self, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Evaluate on the grid xs (W,) x ys (H,) -> two (H, W) float32 planes, without building
        an (H*W, terms) design matrix (memory) — Horner-like over the powers of u and v."""
        u = ((np.asarray(xs, dtype=np.float64) - self.center_xy[0]) / self.scale)[None, :]
        v = ((np.asarray(ys, dtype=np.float64) - self.center_xy[1]) / self.scale)[:, None]
        upow = [np.ones_like(u)]
        vpow = [np.ones_like(v)]
        for _ in range(self.order):
            upow.append(upow[-1] * u)
            vpow.append(vpow[-1] * v)
        out_x = np.zeros((v.shape[0], u.shape[1]), dtype=np.float64)
        out_y = np.zeros_like(out_x)
        for k, (a, b) in enumerate(polynomial_exponents(self.order)):
            term = vpow[b] * upow[a]
            out_x += self.coef_x[k] * term
            out_y += self.coef_y[k] * term
        return out_x.astype(np.float32), out_y.astype(np.float32)

    def jacobian(self, xy: np.ndarray) -> np.ndarray:
        """d(out)/d(xy), shape (N, 2, 2): [[dX/dx, dX/dy], [dY/dx, dY/dy]]."""
        pts = _as_points(xy)
        u, v = self._normalised(pts)
        cx, cy = np.asarray(self.coef_x), np.asarray(self.coef_y)
        du = np.zeros((pts.shape[0], len(cx)))
        dv = np.zeros_like(du)
        for k, (a, b) in enumerate(polynomial_exponents(self.order)):
            if a:
                du[:, k] = a * u ** (a - 1) * v**b
            if b:
                dv[:, k] = b * u**a * v ** (b - 1)
        jac = np.empty((pts.shape[0], 2, 2))
        jac[:, 0, 0], jac[:, 0, 1] = du @ cx, dv @ cx
        jac[:, 1, 0], jac[:, 1, 1] = du @ cy, dv @ cy
        return jac / self.scale

    @classmethod
    def fit(
        cls,
        src_xy: np.ndarray,
        dst_xy: np.ndarray,
        order: int,
        center_xy: tuple[float, float] | None = None,
        scale: float | None = None,
    ) -> Polynomial2D:
        """Least squares dst ~ P(src)."""
        src, dst = _as_points(src_xy), _as_points(dst_xy)
        if src.shape != dst.shape:
            raise ValueError("source and destination point counts differ")
        if center_xy is None:
            center_xy = (float(src[:, 0].mean()), float(src[:, 1].mean()))
        if scale is None:
            scale = float(np.max(np.hypot(src[:, 0] - center_xy[0], src[:, 1] - center_xy[1])))
            scale = scale if scale > 0 else 1.0
        u, v = (src[:, 0] - center_xy[0]) / scale, (src[:, 1] - center_xy[1]) / scale
        a = design_matrix(u, v, order)
        coef, *_ = np.linalg.lstsq(a, dst, rcond=None)
        return cls(
            order,
            (float(center_xy[0]), float(center_xy[1])),
            float(scale),
            tuple(float(c) for c in coef[:, 0]),
            tuple(float(c) for c in coef[:, 1]),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": "polynomial2d",
            "order": self.order,
            "center_xy": list(self.center_xy),
            "scale": self.scale,
            "coef_x": list(self.coef_x),
            "coef_y": list(self.coef_y),
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Polynomial2D:
        return cls(
            int(obj["order"]),
            (float(obj["center_xy"][0]), float(obj["center_xy"][1])),
            float(obj["scale"]),
            tuple(float(c) for c in obj["coef_x"]),
            tuple(float(c) for c in obj["coef_y"]),
        )


@dataclass(frozen=True)
class Similarity2D(_Composable):
    """out = scale * R(angle) @ xy + translation (no reflection)."""

    scale: float
    angle_rad: float
    translation: tuple[float, float]

    @property
    def matrix(self) -> np.ndarray:
        c, s = math.cos(self.angle_rad), math.sin(self.angle_rad)
        return self.scale * np.array([[c, -s], [s, c]])

    def __call__(self, xy: np.ndarray) -> np.ndarray:
        return _as_points(xy) @ self.matrix.T + np.asarray(self.translation)

    def inverse(self) -> Similarity2D:
        inv_scale = 1.0 / self.scale
        c, s = math.cos(-self.angle_rad), math.sin(-self.angle_rad)
        tx, ty = self.translation
        t = -inv_scale * np.array([c * tx - s * ty, s * tx + c * ty])
        return Similarity2D(inv_scale, -self.angle_rad, (float(t[0]), float(t[1])))

    def compose_polynomial(self, poly: Polynomial2D) -> Polynomial2D:
        """self @ poly as one polynomial (a similarity of a polynomial is a polynomial)."""
        m = self.matrix
        cx, cy = np.asarray(poly.coef_x), np.asarray(poly.coef_y)
        new_x = m[0, 0] * cx + m[0, 1] * cy
        new_y = m[1, 0] * cx + m[1, 1] * cy
        new_x[0] += self.translation[0]
        new_y[0] += self.translation[1]
        return Polynomial2D(
            poly.order,
            poly.center_xy,
            poly.scale,
            tuple(float(c) for c in new_x),
            tuple(float(c) for c in new_y),
        )


def fit_rigid(src_xy: np.ndarray, dst_xy: np.ndarray, with_scale: bool = False) -> Similarity2D:
    """Least-squares rotation + translation (+ scale) taking src onto dst (Umeyama)."""
    src, dst = _as_points(src_xy), _as_points(dst_xy)
    ms, md = src.mean(axis=0), dst.mean(axis=0)
    a, b = src - ms, dst - md
    # complex-number form of the 2-D Procrustes problem
    za, zb = a[:, 0] + 1j * a[:, 1], b[:, 0] + 1j * b[:, 1]
    z = np.vdot(za, zb)  # sum conj(za) * zb
    angle = float(np.angle(z))
    scale = float(abs(z) / np.vdot(za, za).real) if with_scale else 1.0
    rot = Similarity2D(scale, angle, (0.0, 0.0))
    t = md - rot(ms[None, :])[0]
    return Similarity2D(scale, angle, (float(t[0]), float(t[1])))
