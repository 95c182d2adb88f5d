"""Error-compensated assignment (GPTQ over a look-up table): which centroid each weight takes.

Nearest-centroid rounding minimizes each weight's own error, but what the model sees is the
layer's output. For a Linear layer with inputs X the output error of a quantized weight Q is
``||(W - Q) X^T||^2 = tr((W - Q) H (W - Q)^T)`` with ``H = X^T X`` (the input Hessian). GPTQ
(Frantar et al., 2023) quantizes one input column at a time and moves the columns not yet
quantized to absorb the error just made, using the inverse Hessian (the Optimal Brain Surgeon
update), so the errors of correlated inputs cancel. Here each weight is rounded to the nearest
value of its own row's LUT (the LUT group the row belongs to) instead of a uniform grid, and the
outliers kept exact (dense-and-sparse) take their updated value with no error.

Use: collect :func:`input_hessians` on the unclustered model (calibration blocks, forward
only), :func:`edkm.palettize_` it, then :func:`gptq_` writes the error-compensated quantized
values into each clustered Linear's weight. The centroids stay as they are; the weight now sits
on them, so the eval-mode hard weight, :func:`edkm.finalize` and the saved file give exactly
this assignment, and clustering-aware training starts from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, Mapping, Optional, Tuple, Union

import torch
from torch import nn


@dataclass
class GptqStats:
    """Per weight: the output error ``tr(D H D^T)`` (H undamped, summed over the modules that
    use the weight) of nearest rounding and of the error-compensated assignment, and the
    damping that made H invertible (a fraction of its mean diagonal)."""

    nearest_error: float
    gptq_error: float
    damp: float

    @property
    def ratio(self) -> float:
        return self.gptq_error / self.nearest_error if self.nearest_error > 0 else 1.0


def median_ratio(stats: Mapping[str, GptqStats]) -> Optional[float]:
    """The median over the weights of gptq_error / nearest_error (None for no weights)."""
    ratios = sorted(st.ratio for st in stats.values())
    return ratios[len(ratios) // 2] if ratios else None


@torch.no_grad()
def input_hessians(
    model: nn.Module,
    batches: Union[torch.Tensor, Iterable[torch.Tensor]],
    *,
    progress: bool = True,
) -> Dict[str, torch.Tensor]:
    """``H = sum_t x_t x_t^T`` (float64, CPU, [in, in]) over every input row x_t reaching each
    nn.Linear of ``model``, keyed by module name (``named_modules``, tied modules each under
    their own name), for the token-id ``batches`` ([n, B, L] or an iterable of [B, L]).

    The model runs in eval mode under no_grad and is left as it was."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"edkm.input_hessians: model must be an nn.Module, got {type(model).__name__}")
    linears = [(n, m) for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("edkm.input_hessians: the model has no nn.Linear module")
    sums: Dict[str, torch.Tensor] = {}
    seen_modules = {}
    handles = []

    def hook_for(name):
        def hook(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double().cpu()
            h = x.T @ x
            if name in sums:
                sums[name] += h
            else:
                sums[name] = h

        return hook

    for name, m in linears:
        if id(m) in seen_modules:  # the same module object under two names: one hook, copied after
            continue
        seen_modules[id(m)] = name
        handles.append(m.register_forward_pre_hook(hook_for(name)))
    was_training = model.training
    bar = None
    count = 0
    try:
        model.eval()
        total = len(batches) if hasattr(batches, "__len__") else None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=total, desc="edkm: input Hessians", unit="batch")
        device = next(model.parameters()).device
        for i, batch in enumerate(batches):
            if not isinstance(batch, torch.Tensor) or batch.dtype not in (torch.int64, torch.int32):
                raise ValueError(f"edkm.input_hessians: batch {i} must be an integer tensor of token ids [B, L]")
            if batch.dim() == 1:
                batch = batch[None]
            model(input_ids=batch.long().to(device))
            count += 1
            if bar is not None:
                bar.update(1)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
        if bar is not None:
            bar.close()
    if count == 0:
        raise ValueError("edkm.input_hessians: the calibration set is empty; pass at least one batch of token ids")
    out = {}
    for name, m in linears:
        first = seen_modules[id(m)]
        if first in sums:
            out[name] = sums[first]
    return out


def _row_luts(centroids: torch.Tensor, rows: int) -> torch.Tensor:
    """[rows, K] float64: each row's LUT (groups of rows // G consecutive rows)."""
    c = centroids.detach().double().cpu()
    if c.dim() != 2:
        raise ValueError(f"edkm.gptq_quantize: centroids must be [groups, K] (1-D clustering), got {list(c.shape)}")
    g = c.shape[0]
    if rows % g:
        raise ValueError(f"edkm.gptq_quantize: {g} LUT groups do not divide the weight's {rows} rows")
    return c.repeat_interleave(rows // g, dim=0)


def _nearest(col: torch.Tensor, luts: torch.Tensor) -> torch.Tensor:
    """Each row's nearest LUT value to ``col`` [R] (ties to the lower index)."""
    return luts.gather(1, (col[:, None] - luts).abs().argmin(dim=1, keepdim=True))[:, 0]


def _inverse_cholesky(h: torch.Tensor, damp: float) -> Tuple[torch.Tensor, float]:
    """Upper Cholesky factor of H^-1 after adding ``damp`` * mean(diag H) to the diagonal
    (the damping grows tenfold, up to 1, while H stays not positive definite)."""
    mean_diag = float(torch.diagonal(h).mean())
    scale = mean_diag if mean_diag > 0 else 1.0
    d = damp
    while True:
        hd = h.clone()
        hd.diagonal().add_(d * scale)
        chol, info = torch.linalg.cholesky_ex(hd)
        if int(info) == 0:
            inv = torch.cholesky_inverse(chol)
            upper, info = torch.linalg.cholesky_ex(inv, upper=True)
            if int(info) == 0:
                return upper, d
        if d >= 1.0:
            raise ValueError("edkm.gptq_quantize: the input Hessian is not positive definite even with damping 1")
        d = min(1.0, d * 10 if d > 0 else 1e-6)


def output_error(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr((W - Q) H (W - Q)^T)``: the summed squared output error over the calibration inputs."""
    d = weight.double() - quantized.double()
    return float(((d @ hessian.double()) * d).sum())


@torch.no_grad()
def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    centroids: torch.Tensor,
    *,
    outliers: Optional[torch.Tensor] = None,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = True,
) -> Tuple[torch.Tensor, float]:
    """The error-compensated quantization of ``weight`` [R, C] (float64 result, same shape):
    every weight a value of its row's LUT (``centroids`` [G, K], rows // G rows per group),
    except the positions in ``outliers`` (flat row-major indices), which keep their updated
    value. ``hessian`` [C, C]: the input Hessian. ``act_order``: quantize columns in decreasing
    order of H's diagonal. Returns (Q, the damping used)."""
    if weight.dim() != 2:
        raise ValueError(f"edkm.gptq_quantize: weight must be 2-D, got shape {list(weight.shape)}")
    rows, cols = weight.shape
    if tuple(hessian.shape) != (cols, cols):
        raise ValueError(
            f"edkm.gptq_quantize: hessian must be [{cols}, {cols}] (the weight's input size), got {list(hessian.shape)}"
        )
    if not torch.isfinite(hessian).all():
        raise ValueError("edkm.gptq_quantize: the hessian has NaN or Inf values")
    if not (isinstance(damp, (int, float)) and 0 <= damp <= 1):
        raise ValueError(f"edkm.gptq_quantize: damp must be a number in [0, 1], got {damp!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"edkm.gptq_quantize: block_size must be an integer >= 1, got {block_size!r}")
    luts = _row_luts(centroids, rows)
    w = weight.detach().double().cpu().clone()
    if not torch.isfinite(w).all():
        raise ValueError("edkm.gptq_quantize: the weight has NaN or Inf values")
    h = hessian.detach().double().cpu().clone()
    dead = torch.diagonal(h) <= 0
    h[dead, :] = 0
    h[:, dead] = 0
    h[dead, dead] = 1  # an input that never fires: its column is rounded, nothing propagates
    exact = torch.zeros(rows, cols, dtype=torch.bool)
    if outliers is not None and outliers.numel():
        exact.view(-1)[outliers.detach().cpu().long()] = True
    perm = torch.argsort(torch.diagonal(h), descending=True, stable=True) if act_order else torch.arange(cols)
    w, h, exact = w[:, perm], h[perm][:, perm], exact[:, perm]
    hinv, used = _inverse_cholesky(h, float(damp))
    q = torch.empty_like(w)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.empty_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w1[:, i]
            qc = torch.where(exact[:, i1 + i], col, _nearest(col, luts))
            q[:, i1 + i] = qc
            e = (col - qc) / hinv1[i, i]
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    out = torch.empty_like(q)
    out[:, perm] = q
    return out, used


@torch.no_grad()
def refit_luts(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    quantized: torch.Tensor,
    centroids: torch.Tensor,
    *,
    outliers: Optional[torch.Tensor] = None,
    chunk_rows: int = 256,
) -> torch.Tensor:
    """The LUTs [G, K] (float64) that minimize the output error ``tr((W - Q) H (W - Q)^T)`` when
    every weight keeps the LUT entry it has in ``quantized`` (an assignment onto ``centroids``)
    and the outliers keep their values: per group the K x K normal equations
    ``sum_r O_r^T H O_r c = sum_r O_r^T H (w_r - s_r)`` (O_r: row r's one-hot assignment, s_r:
    its outliers). An entry no weight uses keeps its value; the entries keep their order, so
    entry j of the result replaces entry j of ``centroids``."""
    rows, cols = weight.shape
    luts = centroids.detach().double().cpu()
    g, k = luts.shape
    per = rows // g
    w = weight.detach().double().cpu()
    qd = quantized.detach().double().cpu()
    h = hessian.detach().double().cpu()
    row_luts = _row_luts(luts, rows)
    exact = torch.zeros(rows, cols, dtype=torch.bool)
    if outliers is not None and outliers.numel():
        exact.view(-1)[outliers.detach().cpu().long()] = True
    idx = (qd[..., None] - row_luts[:, None, :]).abs().argmin(-1)  # [R, C]: the entry each weight holds
    fixed = torch.where(exact, qd, torch.zeros_like(qd))  # s_r: the outliers' own values
    a = torch.zeros(g, k, k, dtype=torch.float64)
    b = torch.zeros(g, k, dtype=torch.float64)
    eye = torch.eye(k, dtype=torch.float64)
    for r0 in range(0, rows, chunk_rows):
        r1 = min(r0 + chunk_rows, rows)
        onehot = eye[idx[r0:r1]] * (~exact[r0:r1, :, None])  # [n, C, K], outliers in no cluster
        ho = torch.einsum("ij,njk->nik", h, onehot)  # H O_r: [n, C, K]
        grp = torch.arange(r0, r1) // per
        a.index_add_(0, grp, torch.einsum("nik,nil->nkl", onehot, ho))
        resid = w[r0:r1] - fixed[r0:r1]  # what the clustered part has to give: w_r - s_r
        b.index_add_(0, grp, torch.einsum("nik,ni->nk", ho, resid))
    used = torch.diagonal(a, dim1=1, dim2=2) > 0
    out = luts.clone()
    for gi in range(g):
        u = used[gi]
        if not bool(u.any()):
            continue
        sub = a[gi][u][:, u]
        rhs = b[gi][u]
        sub = sub + torch.eye(int(u.sum()), dtype=torch.float64) * 1e-12 * float(torch.diagonal(sub).mean())
        sol = torch.linalg.lstsq(sub, rhs[:, None]).solution[:, 0]
        if torch.isfinite(sol).all():
            out[gi, u] = sol
    return out


def _with_luts(quantized: torch.Tensor, old: torch.Tensor, new: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """``quantized`` (an assignment onto the LUTs ``old``) with each weight's entry replaced by
    the same entry of ``new``; the positions in ``exact`` (outliers) kept."""
    rows = quantized.shape[0]
    old_rows, new_rows = _row_luts(old, rows), _row_luts(new, rows)
    idx = (quantized[..., None] - old_rows[:, None, :]).abs().argmin(-1)
    return torch.where(exact, quantized, new_rows.gather(1, idx))


@torch.no_grad()
def gptq_(
    model: nn.Module,
    hessians: Mapping[str, torch.Tensor],
    *,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = True,
    refit_rounds: int = 0,
    progress: bool = False,
) -> Dict[str, GptqStats]:
    """Write the error-compensated assignment (:func:`gptq_quantize`) into every clustered
    Linear weight of a palettized ``model`` that has an entry in ``hessians`` (module name ->
    input Hessian, e.g. from :func:`input_hessians` on the model before ``palettize_``). A
    weight shared by several Linear modules (tied) uses the sum of their Hessians; a tied
    weight read by an Embedding too is compensated for its Linear use (the embedding rows take
    the same values). Matrices clustered as vectors (cluster_dim > 1) are left to nearest
    rounding. ``refit_rounds`` > 0: that many times, refit the LUTs to the assignment
    (:func:`refit_luts`, least squares on the output error) and assign again with the refit
    LUTs; the module's centroids become the LUTs of the lowest-error result. Returns the output
    errors per weight, by the name of the module that owns it."""
    from edkm.modules import ClusteredLinear, ClusteredMixin

    if not isinstance(hessians, Mapping):
        raise TypeError(
            f"edkm.gptq_: hessians must be a mapping {{module name: tensor}}, got {type(hessians).__name__}"
        )
    if isinstance(refit_rounds, bool) or not isinstance(refit_rounds, int) or refit_rounds < 0:
        raise ValueError(f"edkm.gptq_: refit_rounds must be an integer >= 0, got {refit_rounds!r}")
    modules = dict(model.named_modules(remove_duplicate=False))
    for name in hessians:
        if name not in modules:
            raise ValueError(f"edkm.gptq_: hessians key {name!r} names no module of the model")
    if not any(isinstance(m, ClusteredMixin) for m in modules.values()):
        raise ValueError("edkm.gptq_: the model has no clustered modules; call edkm.palettize_ first")
    owners: Dict[int, Tuple[ClusteredMixin, torch.Tensor]] = {}
    for name, m in modules.items():
        if not isinstance(m, ClusteredLinear) or name not in hessians:
            continue
        owner = m._owner
        cfg = owner.edkm_config
        if cfg.cluster_dim != 1 or owner.edkm_finalized:
            continue
        h = hessians[name]
        if not isinstance(h, torch.Tensor) or tuple(h.shape) != (m.in_features, m.in_features):
            raise ValueError(
                f"edkm.gptq_: hessians[{name!r}] must be a [{m.in_features}, {m.in_features}] tensor "
                f"(the module's input size)"
            )
        prev = owners.get(id(owner))
        owners[id(owner)] = (owner, h.double().cpu() if prev is None else prev[1] + h.double().cpu())
    todo = list(owners.values())
    iterator = todo
    if progress:
        from tqdm import tqdm

        iterator = tqdm(todo, desc="edkm: error-compensated assignment", unit="matrix")
    stats: Dict[str, GptqStats] = {}
    for owner, h in iterator:
        if not owner.edkm_initialized:
            owner.edkm_initialize()
        src = owner.edkm_source().detach()
        idx = owner.edkm_outlier_positions
        w = src.double().cpu()
        nearest = owner._hard_weight().double().cpu()
        luts = owner.edkm_centroids.detach().double().cpu()
        q, used = gptq_quantize(w, h, luts, outliers=idx, damp=damp, block_size=block_size, act_order=act_order)
        if refit_rounds:
            exact = torch.zeros(w.shape, dtype=torch.bool)
            if idx is not None:
                exact.view(-1)[idx.cpu()] = True
            best = (output_error(w, q, h), q, luts)
            for _ in range(refit_rounds):
                new = refit_luts(w, h, q, luts, outliers=idx)
                refit_q = _with_luts(q, luts, new, exact)
                again, used = gptq_quantize(
                    w, h, new, outliers=idx, damp=damp, block_size=block_size, act_order=act_order
                )
                for cand in (refit_q, again):
                    err = output_error(w, cand, h)
                    if err < best[0]:
                        best = (err, cand, new)
                q, luts = again, new
            _, q, luts = best
            owner.edkm_centroids.copy_(luts.sort(dim=1).values.to(owner.edkm_centroids))
        owner.weight.copy_(q.to(owner.weight.dtype).to(owner.weight.device))
        if idx is not None:  # the outliers as the file stores them (16-bit), so weight = hard weight
            flat = owner.weight.view(-1)
            flat.index_copy_(0, idx, owner._edkm_stored_outliers().to(flat.dtype))
        owner._edkm_cache = None
        written = owner.weight.detach().double().cpu()
        stats[owner.edkm_name] = GptqStats(output_error(w, nearest, h), output_error(w, written, h), used)
    return stats
