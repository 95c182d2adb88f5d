"""Mixed precision by budget: bits per matrix that minimize the total damage for a target file size.

Each clusterable matrix (every nn.Linear / nn.Embedding weight, a tied one once) gets a number
of bits from ``bits_choices`` (1..8, or 16 = left unclustered, stored in its own dtype). The
damage of a choice is measured, not modelled: the matrix is clustered post-training exactly as
``palettize_`` + ``finalize`` would do it, and its cost is the Fisher-weighted squared error
``sum_i F_i (w_i - q_b(w_i))**2`` (SqueezeLLM's second-order estimate of the loss increase,
twice the expected KL to first order). The sizes are the file's own accounting
(:func:`edkm.format.save`): per clustered tensor the bit-packed indices, ceil(n * bits / 8)
bytes, the fp16 LUTs, 2 * G * K * d bytes, and its outliers (position + 16-bit value); every
other tensor (norms, biases, matrices left unclustered) at its dtype's size; a tied tensor once.
The budget counts the file's tensor data; the header (a few KB of JSON) is not in it.

The choice is a multiple-choice knapsack, solved twice: a greedy over each matrix's convex hull
of (bytes, cost) by cost saved per byte, and a dynamic program over bytes (exact when the slack
fits in ``max_buckets`` one-byte buckets, otherwise over buckets of sizes rounded up, so its
answer always fits); the cheaper of the two is kept.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import re
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from edkm.config import Config

UNCLUSTERED = 16
DEFAULT_BITS = (2, 3, 4, 5, 6, 7, 8, UNCLUSTERED)
_16BIT = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Unit:
    """One weight that gets a bit width: the module names holding it (tied: several, the
    first is the one ``palettize_`` clusters) and its base config (None: the base config leaves
    it unclustered, so it is not a choice)."""

    names: Tuple[str, ...]
    shape: Tuple[int, ...]
    dtype: torch.dtype
    config: Optional[Config]

    @property
    def name(self) -> str:
        return self.names[0]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class MixedPrecision:
    """The outcome of :func:`choose_bits`.

    config: apply with ``palettize_(model, config)``; every clusterable module has an explicit
        ``module_names`` entry (``{"bits": b, ...}`` or None for 16 = unclustered).
    bits: unit name -> bits (16: unclustered; units the base config skips are 16 too).
    data_bytes: the tensor bytes of the file ``edkm.save`` writes after ``finalize`` (the file
        size minus its header); bits_per_weight = 8 * data_bytes / weights.
    weights: parameters of the model (tied ones once), the denominator of bits/weight.
    cost: the summed Fisher-weighted error of the choice; method: "greedy" or "dp", the solver
        whose answer was kept; min_bits_per_weight: the smallest achievable with these choices.
    """

    config: Config
    bits: Dict[str, int]
    data_bytes: int
    weights: int
    bits_per_weight: float
    cost: float
    method: str
    min_bits_per_weight: float


def _check_model(model, who: str) -> None:
    from edkm.modules import ClusteredMixin

    if not isinstance(model, nn.Module):
        raise TypeError(f"{who}: model must be an nn.Module, got {type(model).__name__}")
    if any(isinstance(m, ClusteredMixin) for m in model.modules()):
        raise ValueError(f"{who}: the model is already palettized; pass the unclustered model")


def _check_bits_choices(bits_choices, who: str) -> Tuple[int, ...]:
    try:
        choices = tuple(bits_choices)
    except TypeError:
        choices = None
    if not choices or not all(
        isinstance(b, int) and not isinstance(b, bool) and (1 <= b <= 8 or b == UNCLUSTERED) for b in choices
    ):
        raise ValueError(
            f"{who}: bits_choices must be a non-empty sequence of integers in 1..8 or "
            f"{UNCLUSTERED} (unclustered), got {bits_choices!r}"
        )
    return tuple(sorted(set(choices)))


def clusterable_units(model: nn.Module, config: Optional[Config] = None) -> List[Unit]:
    """Every nn.Linear / nn.Embedding weight of ``model`` (as ``palettize_`` finds them), a tied
    weight once, with the config ``config`` gives its first module."""
    from edkm.modules import clustered_class

    config = Config() if config is None else config
    by_weight: Dict[int, Tuple[List[str], nn.Module, torch.Tensor]] = {}
    seen_modules = set()
    for name, m in model.named_modules(remove_duplicate=False):
        if clustered_class(type(m)) is None or id(m) in seen_modules:
            continue
        seen_modules.add(id(m))
        w = getattr(m, "weight", None)
        if not isinstance(w, torch.Tensor):
            continue
        if id(w) in by_weight:
            by_weight[id(w)][0].append(name)
        else:
            by_weight[id(w)] = ([name], m, w)
    return [
        Unit(tuple(names), tuple(w.shape), w.dtype, config.for_module(names[0], m))
        for names, m, w in by_weight.values()
    ]


def _groups(unit: Unit, cfg: Config) -> int:
    rows = unit.shape[0]
    if cfg.group_size is not None and rows % cfg.group_size:
        raise ValueError(f"edkm.mixed_precision: group_size {cfg.group_size} must divide {unit.name}'s {rows} rows")
    return rows // cfg.group_size if cfg.group_size else 1


def clustered_bytes(unit: Unit, cfg: Config) -> int:
    """Bytes of ``unit`` in the file when clustered with ``cfg`` (indices + LUT + outliers), from
    the format's own entries (:func:`edkm.format.clustered_entries`)."""
    from edkm import format as fmt
    from edkm.outliers import outlier_count, outlier_dtype

    groups = _groups(unit, cfg)
    outliers = outlier_count(cfg.outlier_fraction, unit.numel) if cfg.outlier_fraction > 0 else 0
    if outliers:
        layout = fmt.Layout(cfg.bits, unit.shape, unit.dtype, groups, cfg.cluster_dim, outliers)
        src = unit.dtype if cfg.cluster_dtype is None or unit.dtype in _16BIT else cfg.cluster_dtype
        entries = fmt.clustered_entries(unit.name, layout, outlier_dtype(src))
    else:
        entries = fmt.clustered_entries(
            unit.name, fmt.Layout(cfg.bits, unit.shape, unit.dtype, groups, cfg.cluster_dim)
        )
    return sum(fmt._tensor_bytes(dtype, shape) for _, dtype, shape in entries)


def unit_sizes(
    model: nn.Module, config: Optional[Config] = None, bits_choices: Sequence[int] = DEFAULT_BITS
) -> Tuple[List[Unit], List[Dict[int, int]], int, int]:
    """(units, per unit {bits: bytes}, fixed bytes, weights). A unit the base config skips has
    only {16: bytes}; the fixed bytes are every other tensor of the file (norms, biases, ...)."""
    _check_model(model, "edkm.mixed_precision")
    choices = _check_bits_choices(bits_choices, "edkm.mixed_precision")
    from edkm import format as fmt

    store = fmt.plain_store_dtype(model, "auto")  # what edkm.save does by default
    units = clusterable_units(model, config)
    weight_keys = {}
    for u in units:
        for n in u.names:
            weight_keys[f"{n}.weight" if n else "weight"] = u
    sizes: List[Dict[int, int]] = []
    for u in units:
        plain = (
            u.numel
            * torch.empty((), dtype=fmt.stored_plain_dtype(torch.empty((), dtype=u.dtype), store, True)).element_size()
        )
        if u.config is None:
            sizes.append({UNCLUSTERED: plain})
            continue
        sizes.append({b: plain if b == UNCLUSTERED else clustered_bytes(u, u.config.replace(bits=b)) for b in choices})
    fixed = 0
    seen = set()
    for key, t in _file_tensors(model):
        ident = _ident(t)
        if ident is not None and ident in seen:
            continue
        if ident is not None:
            seen.add(ident)
        if key not in weight_keys:
            fixed += t.numel() * torch.empty((), dtype=fmt.stored_plain_dtype(t, store, True)).element_size()
    weights = sum(p.numel() for p in model.parameters())
    return units, sizes, fixed, weights


def _file_tensors(model: nn.Module):
    """The state_dict entries edkm.save stores (edkm's training state left out)."""
    for key, t in model.state_dict().items():
        if key.endswith("_extra_state") or not isinstance(t, torch.Tensor):
            continue
        yield key, t


def _ident(t: torch.Tensor):
    """What edkm.save dedupes tensors by (a tied tensor is stored once)."""
    if not t.numel():
        return None
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def predicted_file_bytes(model: nn.Module, config: Optional[Config] = None) -> int:
    """The tensor bytes of the file ``palettize_(model, config)``, ``finalize`` and ``edkm.save``
    write (the file size minus its header), computed without clustering anything."""
    units, sizes, fixed, _ = unit_sizes(model, config, (UNCLUSTERED,))
    total = fixed
    for u, size in zip(units, sizes):
        total += size[UNCLUSTERED] if u.config is None else clustered_bytes(u, u.config)
    return total


# ---- per-matrix costs ---------------------------------------------------------------------------


@torch.no_grad()
def post_training_weight(
    weight: torch.Tensor, config: Config, sensitivity: Optional[torch.Tensor] = None, name: str = "weight"
) -> torch.Tensor:
    """``weight`` after post-training clustering with ``config`` (its overrides ignored), exactly
    as ``palettize_`` + ``finalize`` leave it: through the clustered module itself, on a copy."""
    from edkm.palettize import finalize, palettize_

    if weight.dim() != 2:
        raise ValueError(f"edkm.mixed_precision: {name} must be 2-D, got shape {tuple(weight.shape)}")
    shell = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    shell.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
    cfg = config.replace(_where="edkm.mixed_precision")
    palettize_(shell, cfg, sensitivity=None if sensitivity is None else {"": sensitivity})
    finalize(shell)
    return shell.weight.detach()


def _sensitivity_of(unit: Unit, sensitivity: Mapping[str, torch.Tensor]) -> Optional[torch.Tensor]:
    for n in unit.names:
        for key in (n, f"{n}.weight"):
            if key in sensitivity:
                return sensitivity[key]
    return None


def matrix_costs(
    model: nn.Module,
    sensitivity: Mapping[str, torch.Tensor],
    bits_choices: Sequence[int] = DEFAULT_BITS,
    config: Optional[Config] = None,
    *,
    progress: bool = True,
) -> Dict[str, Dict[int, float]]:
    """Per unit name, per bit width: ``sum_i F_i (w_i - q_b(w_i))**2`` in float64, with F the
    unit's ``sensitivity`` (e.g. :func:`edkm.fisher`) and q_b the post-training clustering at b
    bits with the unit's config (:func:`post_training_weight`: its init, LUT groups, outliers,
    fp16 LUT); 0 for 16 (unclustered). Units the config skips get {16: 0.0}."""
    _check_model(model, "edkm.matrix_costs")
    choices = _check_bits_choices(bits_choices, "edkm.matrix_costs")
    if not isinstance(sensitivity, Mapping):
        raise TypeError(
            f"edkm.matrix_costs: sensitivity must be a mapping {{module name: tensor}}, got "
            f"{type(sensitivity).__name__}"
        )
    units = clusterable_units(model, config)
    params = {}
    for name, m in model.named_modules(remove_duplicate=False):
        if name not in params and isinstance(getattr(m, "weight", None), torch.Tensor):
            params[name] = m.weight
    todo = []
    for u in units:
        if u.config is None:
            continue
        f = _sensitivity_of(u, sensitivity)
        if f is None:
            raise ValueError(
                f"edkm.matrix_costs: no sensitivity for {u.name} (keys are module names, e.g. "
                f"from edkm.fisher); got keys like {list(sensitivity)[:3]}"
            )
        if not isinstance(f, torch.Tensor) or tuple(f.shape) != u.shape:
            raise ValueError(
                f"edkm.matrix_costs: sensitivity[{u.name!r}] must be a tensor of the weight's "
                f"shape {u.shape}, got {tuple(f.shape) if isinstance(f, torch.Tensor) else f!r}"
            )
        todo.append((u, f))
    out: Dict[str, Dict[int, float]] = {u.name: {UNCLUSTERED: 0.0} for u in units if u.config is None}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(todo) * len(choices), desc="edkm: per-matrix costs", unit="clustering")
    try:
        for u, f in todo:
            w = params[u.name].detach()
            f64 = f.detach().to(w.device, torch.float64)
            costs = {}
            for b in choices:
                if b == UNCLUSTERED:
                    costs[b] = 0.0
                else:
                    q = post_training_weight(w, u.config.replace(bits=b), f, f"{u.name}.weight")
                    costs[b] = float((f64 * (w.double() - q.double()).square()).sum())
                if bar is not None:
                    bar.update(1)
            out[u.name] = costs
    finally:
        if bar is not None:
            bar.close()
    return out


# ---- the knapsack ---------------------------------------------------------------------------


def _hull(options: List[Tuple[int, float, int]]) -> List[Tuple[int, float, int]]:
    """The lower convex hull of (bytes, cost, choice) options, from the smallest, keeping only
    options that lower the cost."""
    pts = []
    for s, c, k in sorted(options, key=lambda o: (o[0], o[1])):
        if pts and c >= pts[-1][1]:
            continue  # bigger and no better
        if pts and s == pts[-1][0]:
            pts[-1] = (s, c, k)
            continue
        while len(pts) >= 2:
            (s0, c0, _), (s1, c1, _) = pts[-2], pts[-1]
            if (c1 - c0) * (s - s0) >= (c - c0) * (s1 - s0):  # pts[-1] lies on or above the chord
                pts.pop()
            else:
                break
        pts.append((s, c, k))
    return pts


def _greedy(options: List[List[Tuple[int, float, int]]], budget: int) -> Optional[List[int]]:
    """Start every unit at its smallest option, then take hull upgrades by cost saved per byte
    while they fit; finally any single change that lowers the cost and fits, best first."""
    hulls = [_hull(o) for o in options]
    pos = [0] * len(hulls)
    used = sum(h[0][0] for h in hulls)
    if used > budget:
        return None
    heap = []

    def push(u):
        if pos[u] + 1 < len(hulls[u]):
            (s0, c0, _), (s1, c1, _) = hulls[u][pos[u]], hulls[u][pos[u] + 1]
            heapq.heappush(heap, ((c1 - c0) / (s1 - s0), u, pos[u]))

    for u in range(len(hulls)):
        push(u)
    while heap:
        _, u, p = heapq.heappop(heap)
        if p != pos[u]:
            continue
        extra = hulls[u][p + 1][0] - hulls[u][p][0]
        if used + extra <= budget:
            used += extra
            pos[u] += 1
            push(u)
    choice = [hulls[u][pos[u]] for u in range(len(hulls))]
    while True:  # fill what the hull walk left over with any improving change that fits
        best = None
        for u, opts in enumerate(options):
            s_now, c_now, _ = choice[u]
            for s, c, k in opts:
                if c < c_now and used - s_now + s <= budget:
                    gain = c_now - c
                    if best is None or gain > best[0]:
                        best = (gain, u, (s, c, k))
        if best is None:
            break
        _, u, opt = best
        used += opt[0] - choice[u][0]
        choice[u] = opt
    return [k for _, _, k in choice]


def _dp(options: List[List[Tuple[int, float, int]]], budget: int, max_buckets: int) -> Optional[List[int]]:
    """Multiple-choice knapsack over the bytes above each unit's smallest option, in buckets of
    ``r`` bytes (1 when the slack fits in ``max_buckets``: exact); sizes round up, so the answer
    always fits the budget."""
    import numpy as np

    base = [min(s for s, _, _ in o) for o in options]
    slack = budget - sum(base)
    if slack < 0:
        return None
    r = max(1, -(-slack // max_buckets))
    nb = slack // r
    dp = np.zeros(nb + 1)  # min cost with at most j buckets used, over the units so far
    picks = []
    for o, b0 in zip(options, base):
        new = np.full(nb + 1, np.inf)
        pick = np.zeros(nb + 1, dtype=np.int32)
        for i, (s, c, _) in enumerate(o):
            w = -(-(s - b0) // r)
            if w > nb:
                continue
            cand = np.full(nb + 1, np.inf)
            cand[w:] = dp[: nb + 1 - w] + c
            better = cand < new
            new[better] = cand[better]
            pick[better] = i
        dp = new
        picks.append(pick)
    if not np.isfinite(dp[nb]):
        return None
    j = nb
    out = [0] * len(options)
    for u in range(len(options) - 1, -1, -1):
        i = int(picks[u][j])
        out[u] = options[u][i][2]
        j -= -(-(options[u][i][0] - base[u]) // r)
    return out


def solve(
    costs: Sequence[Mapping[int, float]], sizes: Sequence[Mapping[int, int]], budget: int, max_buckets: int = 20000
) -> Tuple[List[int], str]:
    """The choice per unit (a key of its ``sizes``) that minimizes the summed cost with the summed
    size <= ``budget``: the better of the greedy and the DP ("greedy" or "dp"). Infeasible:
    ValueError."""
    if len(costs) != len(sizes):
        raise ValueError(f"edkm.mixed_precision: {len(costs)} cost entries for {len(sizes)} units")
    options = []
    for u, (c, s) in enumerate(zip(costs, sizes)):
        missing = sorted(set(s) - set(c))
        if missing:
            raise ValueError(f"edkm.mixed_precision: unit {u} has no cost for bits {missing}")
        options.append([(int(s[k]), float(c[k]), k) for k in s])
    if sum(min(s for s, _, _ in o) for o in options) > budget:
        raise ValueError("edkm.mixed_precision: no choice fits the budget")
    found = []
    for method, pick in (("dp", _dp(options, budget, max_buckets)), ("greedy", _greedy(options, budget))):
        if pick is None:
            continue
        size = sum(sizes[u][k] for u, k in enumerate(pick))
        if size <= budget:
            found.append((sum(costs[u][k] for u, k in enumerate(pick)), method, pick))
    found.sort(key=lambda x: x[0])
    return found[0][2], found[0][1]


def choose_bits(
    model: nn.Module,
    target_bits: float,
    costs: Mapping[str, Mapping[int, float]],
    config: Optional[Config] = None,
    *,
    max_buckets: int = 20000,
) -> MixedPrecision:
    """Bits per matrix for a file of at most ``target_bits`` bits per weight (the file's tensor
    bytes * 8 / the model's parameters, tied ones once), minimizing the summed ``costs``
    (from :func:`matrix_costs`; the bit widths offered are its keys). ``config`` supplies
    everything but the bits (LUT groups, init, outliers, ...; units it skips stay unclustered).
    A target below the smallest achievable: ValueError stating it."""
    _check_model(model, "edkm.choose_bits")
    if (
        isinstance(target_bits, bool)
        or not isinstance(target_bits, (int, float))
        or not math.isfinite(target_bits)
        or target_bits <= 0
    ):
        raise ValueError(f"edkm.choose_bits: target_bits must be a finite number > 0, got {target_bits!r}")
    config = Config() if config is None else config
    if not isinstance(costs, Mapping):
        raise TypeError(
            f"edkm.choose_bits: costs must be a mapping {{unit name: {{bits: cost}}}} "
            f"(edkm.matrix_costs), got {type(costs).__name__}"
        )
    choices = set()
    for v in costs.values():
        choices |= set(v)
    units, sizes, fixed, weights = unit_sizes(model, config, _check_bits_choices(choices, "edkm.choose_bits"))
    unit_costs = []
    for u, s in zip(units, sizes):
        if u.config is None:
            unit_costs.append({UNCLUSTERED: 0.0})
            continue
        if u.name not in costs:
            raise ValueError(f"edkm.choose_bits: costs has no entry for {u.name}")
        c = costs[u.name]
        for k in list(s):
            if k not in c:
                del s[k]  # a width not priced for this unit is not offered for it
        if not s:
            raise ValueError(f"edkm.choose_bits: costs[{u.name!r}] prices none of the bit widths {sorted(choices)}")
        unit_costs.append({k: float(c[k]) for k in s})
    budget = int(math.floor(target_bits * weights / 8 + 1e-9)) - fixed
    min_bytes = fixed + sum(min(s.values()) for s in sizes)
    min_bpw = 8 * min_bytes / weights
    if min_bytes > budget + fixed:
        raise ValueError(
            f"edkm.choose_bits: target_bits {target_bits:g} cannot be met: the smallest "
            f"achievable file is {min_bpw:.4f} bits/weight (every matrix at "
            f"{min(choices)} bits, the rest as stored)"
        )
    pick, method = solve(unit_costs, sizes, budget, max_buckets)
    bits = {u.name: k for u, k in zip(units, pick)}
    data_bytes = fixed + sum(s[k] for s, k in zip(sizes, pick))
    return MixedPrecision(
        config=_config_for(config, units, pick),
        bits=bits,
        data_bytes=data_bytes,
        weights=weights,
        bits_per_weight=8 * data_bytes / weights,
        cost=sum(c[k] for c, k in zip(unit_costs, pick)),
        method=method,
        min_bits_per_weight=min_bpw,
    )


def _config_for(config: Config, units: Sequence[Unit], pick: Sequence[int]) -> Config:
    """``config`` with an explicit module_names entry for every module of every unit: the
    fields where the unit's own config differs from the global one, and its bits; None when
    it stays unclustered."""
    names: Dict[str, object] = {}
    plain = config.replace(_where="edkm.mixed_precision")
    for u, b in zip(units, pick):
        if u.config is None or b == UNCLUSTERED:
            value = None
        else:
            value = {
                f.name: getattr(u.config, f.name)
                for f in dataclasses.fields(Config)
                if f.name not in ("module_types", "module_names")
                and getattr(u.config, f.name) != getattr(plain, f.name)
            }
            value["bits"] = b
        for n in u.names:
            names[re.escape(n)] = value
    return dataclasses.replace(config, module_names=names)


def mixed_precision_config(
    model: nn.Module,
    target_bits: float,
    sensitivity: Mapping[str, torch.Tensor],
    config: Optional[Config] = None,
    bits_choices: Sequence[int] = DEFAULT_BITS,
    *,
    progress: bool = True,
) -> MixedPrecision:
    """:func:`matrix_costs` then :func:`choose_bits`: the whole recipe in one call."""
    costs = matrix_costs(model, sensitivity, bits_choices, config, progress=progress)
    return choose_bits(model, target_bits, costs, config)
