"""Pure tensor math of the subspace-aware merges: isotropic spectra (ISO-C, ISO-CTS), task
singular vectors (TSV-M) and interference minimisation in the task vectors' own row space
(WUDI). Every function takes task vectors of one 2-D weight and returns the merged task vector;
callers handle other tensors and the base."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD U S Vᵀ in float32 or float64 (bf16/fp16 have no SVD kernel)."""
    work = matrix if matrix.dtype in (torch.float32, torch.float64) else matrix.float()
    u, s, vh = torch.linalg.svd(work, full_matrices=False)
    return u, s, vh


def orthogonalise(columns: torch.Tensor) -> torch.Tensor:
    """The orthonormal matrix nearest to ``columns`` (polar factor P Qᵀ of P Σ Qᵀ)."""
    p, _, qh = _svd(columns)
    return p @ qh


def isotropic_merge(task_vectors: Sequence[torch.Tensor]) -> torch.Tensor:
    """ISO-C: Σ τ_i = U S Vᵀ, every singular value replaced by their mean (flat spectrum)."""
    total = torch.stack(list(task_vectors)).sum(dim=0)
    u, s, vh = _svd(total)
    return (u * s.mean()) @ vh


def _task_specific(
    tau: torch.Tensor, common_u: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` singular triplets of τ projected off the common left subspace."""
    residual = tau - common_u @ (common_u.T @ tau)
    u, s, vh = _svd(residual)
    return u[:, :rank], s[:rank], vh[:rank]


def isotropic_common_task_merge(
    task_vectors: Sequence[torch.Tensor], common_fraction: float
) -> torch.Tensor:
    """ISO-CTS: a common subspace (the top ``common_fraction`` of Σ τ_i's rank) plus each
    task's strongest directions outside it, orthogonalised, with one flat spectrum.

    The flat value is the mean of the kept singular values (common and task-specific)."""
    taus = list(task_vectors)
    total = torch.stack(taus).sum(dim=0)
    u, s, vh = _svd(total)
    full_rank = s.numel()
    common = max(1, min(full_rank, round(common_fraction * full_rank)))
    per_task = (full_rank - common) // len(taus)
    if per_task == 0:
        return (u[:, :common] * s[:common].mean()) @ vh[:common]
    us, ss, vs = [u[:, :common]], [s[:common]], [vh[:common]]
    for tau in taus:
        tu, ts, tv = _task_specific(tau.to(u.dtype), u[:, :common], per_task)
        us.append(tu)
        ss.append(ts)
        vs.append(tv)
    big_u = orthogonalise(torch.cat(us, dim=1))
    big_v = orthogonalise(torch.cat(vs, dim=0).T)
    return (big_u * torch.cat(ss).mean()) @ big_v.T


def task_singular_vector_merge(task_vectors: Sequence[torch.Tensor]) -> torch.Tensor:
    """TSV-M: each τ_i's top k = max(1, rank // T) singular triplets, the concatenated U's
    and V's orthogonalised (decorrelating the tasks), reassembled with the kept spectra."""
    taus = list(task_vectors)
    rank = min(taus[0].shape)
    k = max(1, rank // len(taus))
    us, ss, vs = [], [], []
    for tau in taus:
        u, s, vh = _svd(tau)
        us.append(u[:, :k])
        ss.append(s[:k])
        vs.append(vh[:k])
    big_u = orthogonalise(torch.cat(us, dim=1))
    big_v = orthogonalise(torch.cat(vs, dim=0).T)
    return (big_u * torch.cat(ss)) @ big_v.T


def interference_loss(merged: torch.Tensor, task_vectors: Sequence[torch.Tensor]) -> torch.Tensor:
    """WUDI's data-free loss Σ_i ‖(τ_m - τ_i) τ_iᵀ‖²_F / ‖τ_i‖²_F (rows of τ_i stand in for
    the layer's inputs)."""
    loss = merged.new_zeros(())
    for tau in task_vectors:
        norm = tau.pow(2).sum().clamp_min(1e-30)
        loss = loss + ((merged - tau) @ tau.T).pow(2).sum() / norm
    return loss


def wudi_merge(task_vectors: Sequence[torch.Tensor], *, steps: int, lr: float) -> torch.Tensor:
    """WUDI: minimise ``interference_loss`` by Adam from τ_m = Σ τ_i; returns τ_m.

    Deterministic (no randomness); computed in float32."""
    taus = [t.float().detach() for t in task_vectors]
    merged = torch.stack(taus).sum(dim=0).clone().requires_grad_(True)
    optimiser = torch.optim.Adam([merged], lr=lr)
    for _ in range(steps):
        optimiser.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss = interference_loss(merged, taus)
            loss.backward()
        optimiser.step()
    return merged.detach()


def shared_subspace(task_vectors: Sequence[torch.Tensor], rank: int) -> torch.Tensor:
    """An orthonormal basis (rows x rank) of the directions the task vectors share: each
    τ_i's top-``rank`` left singular vectors, concatenated and re-decomposed."""
    tops = [_svd(tau)[0][:, :rank] for tau in task_vectors]
    u, _, _ = _svd(torch.cat(tops, dim=1))
    return u[:, :rank]


def doge_loss(merged: torch.Tensor, task_vectors: Sequence[torch.Tensor]) -> torch.Tensor:
    """DOGE's data-free surrogate Σ_j ‖rowsum(τ_j ⊙ (τ_j - τ_m))‖²."""
    loss = merged.new_zeros(())
    for tau in task_vectors:
        loss = loss + (tau * (tau - merged)).sum(dim=1).pow(2).sum()
    return loss


def doge_merge(
    task_vectors: Sequence[torch.Tensor],
    *,
    scale: float,
    density: float,
    subspace_rank: float,
    steps: int,
    lr: float,
) -> torch.Tensor:
    """DOGE-TA for one 2-D weight; returns τ_m = Σ_i λ_i (m_i ⊙ τ_i + δ).

    λ_i = scale·mean_j‖τ_j‖ / ‖τ_i‖ (every task vector brought to the mean norm); m_i keeps
    the top ``density`` magnitudes of τ_i; the shared correction δ starts at 0 and takes
    ``steps`` Adam steps on ``doge_loss`` with its gradient projected off the shared
    subspace (rank = ``subspace_rank`` x the matrix rank), so shared knowledge is kept."""
    taus = [t.float().detach() for t in task_vectors]
    norms = torch.stack([t.norm() for t in taus]).clamp_min(1e-30)
    lambdas = scale * norms.mean() / norms
    masked = [_top_magnitudes(t, density) for t in taus]
    k = max(1, round(subspace_rank * min(taus[0].shape)))
    basis = shared_subspace(taus, k)
    delta = torch.zeros_like(taus[0], requires_grad=True)
    optimiser = torch.optim.Adam([delta], lr=lr)

    def merged_of(correction: torch.Tensor) -> torch.Tensor:
        return sum((lam * (m + correction) for lam, m in zip(lambdas, masked, strict=True)),
                   torch.zeros_like(taus[0]))  # fmt: skip

    for _ in range(steps):
        optimiser.zero_grad(set_to_none=True)
        with torch.enable_grad():
            doge_loss(merged_of(delta), taus).backward()
        assert delta.grad is not None
        delta.grad -= basis @ (basis.T @ delta.grad)
        optimiser.step()
        with torch.no_grad():  # Adam's per-entry scaling leaves the subspace: project back
            delta -= basis @ (basis.T @ delta)
    return merged_of(delta.detach())


def _top_magnitudes(tau: torch.Tensor, density: float) -> torch.Tensor:
    """τ with all but its ``density`` share of largest magnitudes zeroed (ties kept)."""
    if density >= 1:
        return tau
    keep = max(1, int(density * tau.numel()))
    threshold = tau.abs().reshape(-1).kthvalue(tau.numel() - keep + 1).values
    return tau * (tau.abs() >= threshold)
