"""Spherical interpolation between learned concepts (Directional TI, seeds/002).

DTI keeps every vector on a sphere of fixed radius, so concepts can be blended along the great
circle between their directions: slerp(v0, v1; a) = sin((1-a) w)/sin w v0 + sin(a w)/sin w v1,
w = arccos(v0 . v1), with the norm interpolated linearly (equal norms stay equal).
"""

from __future__ import annotations

import torch

from ..embedding import LearnedEmbedding, validate_name

__all__ = ["slerp", "slerp_embeddings"]


def _orthogonal(u: torch.Tensor) -> torch.Tensor:
    """A unit vector orthogonal to each row of ``u`` (unit rows), the same for the same ``u``: the axis
    where ``u`` is smallest, with its ``u`` component removed (Gram-Schmidt)."""
    axis = torch.zeros_like(u).scatter_(-1, u.abs().argmin(-1, keepdim=True), 1.0)
    p = axis - (axis * u).sum(-1, keepdim=True) * u
    return p / p.norm(dim=-1, keepdim=True)


def slerp(v0: torch.Tensor, v1: torch.Tensor, alpha: float, eps: float = 1e-7) -> torch.Tensor:
    """Row-wise spherical interpolation of directions, linear interpolation of norms.

    Nearly parallel rows (sin w < 1e-4, w small) interpolate linearly, then renormalise. Opposite rows
    (w = pi) have no single great circle between them, and the linear path passes through zero; they
    take the half circle through ``_orthogonal(u0)``: u(a) = cos(a pi) u0 + sin(a pi) p, a unit vector
    for every a (from u0 at a = 0 to -u0 = u1 at a = 1)."""
    n0, n1 = v0.norm(dim=-1, keepdim=True), v1.norm(dim=-1, keepdim=True)
    u0, u1 = v0 / n0.clamp_min(eps), v1 / n1.clamp_min(eps)
    dot = (u0 * u1).sum(-1, keepdim=True).clamp(-1.0, 1.0)
    omega = torch.arccos(dot)
    so = torch.sin(omega)
    near = so.abs() < 1e-4
    w0 = torch.where(near, torch.full_like(so, 1 - alpha), torch.sin((1 - alpha) * omega) / so.clamp_min(eps))
    w1 = torch.where(near, torch.full_like(so, alpha), torch.sin(alpha * omega) / so.clamp_min(eps))
    u = w0 * u0 + w1 * u1
    opposite = near & (dot < 0)
    if bool(opposite.any()):
        half = torch.cos(torch.tensor(alpha * torch.pi)) * u0 + torch.sin(torch.tensor(alpha * torch.pi)) * _orthogonal(u0)
        u = torch.where(opposite, half.to(u.dtype), u)
    u = u / u.norm(dim=-1, keepdim=True).clamp_min(eps)
    return u * ((1 - alpha) * n0 + alpha * n1)


def slerp_embeddings(a: LearnedEmbedding, b: LearnedEmbedding, alpha: float, name: str | None = None) -> LearnedEmbedding:
    """A new concept between ``a`` (alpha = 0) and ``b`` (alpha = 1); same encoders and k needed."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if set(a.vectors) != set(b.vectors):
        raise ValueError(f"cannot interpolate {a.name!r} ({sorted(a.vectors)}) and {b.name!r} ({sorted(b.vectors)}): "
                         "they were trained for different text encoders (models)")
    for k in a.vectors:
        if a.vectors[k].shape != b.vectors[k].shape:
            raise ValueError(f"cannot interpolate {a.name!r} and {b.name!r}: {k} shapes {tuple(a.vectors[k].shape)} "
                             f"and {tuple(b.vectors[k].shape)} differ; both need the same number of vectors")
    name = validate_name(name or f"{a.name}-{b.name}-{alpha:.2f}")
    vectors = {k: slerp(a.vectors[k].float(), b.vectors[k].float(), float(alpha)) for k in a.vectors}
    meta = {"method": "slerp", "slerp_from": a.name, "slerp_to": b.name, "slerp_alpha": f"{alpha:g}"}
    for key in ("model_family",):
        if key in a.metadata:
            meta[key] = a.metadata[key]
    return LearnedEmbedding(name, vectors, f"<{name}>", meta)
