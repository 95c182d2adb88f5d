"""Prepare a model for clustering-aware training (:func:`palettize_`) and hard-assign it
(:func:`finalize`)."""

from __future__ import annotations

import re
from typing import Dict, Iterator, List, Mapping, Optional, Tuple

import torch
from torch import nn

from edkm.config import Config
from edkm.modules import ClusteredMixin, clustered_class


def clustered_modules(model: nn.Module) -> Iterator[Tuple[str, ClusteredMixin]]:
    """(qualified name, module) for every clustered module, tied followers included."""
    for name, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, ClusteredMixin):
            yield name, m


def palettize_(
    model: nn.Module,
    config: Optional[Config] = None,
    *,
    sensitivity: Optional[Mapping[str, torch.Tensor]] = None,
    progress: bool = False,
) -> nn.Module:
    """Make every nn.Linear and nn.Embedding of ``model`` clustered, in place, per ``config``.

    Each module's config comes from ``config.for_module(name, module)`` (name regexes first,
    then module types, then the global fields); ``None`` there leaves the module as it is. The
    original weight stays the trainable Parameter; centroids are buffers in ``state_dict``.
    A weight tied between modules (e.g. lm_head and the input embedding) is clustered once, with
    one set of centroids; the tied modules must get the same config. Returns ``model``.

    ``sensitivity`` maps module names (as in ``named_modules``; for a tied weight, the name of
    any module that holds it) to a per-weight importance tensor of the weight's shape, e.g. the
    Fisher information from :func:`edkm.fisher`. Configs with ``init="sensitivity"`` or
    ``outlier_criterion="sensitivity"`` need it for every module they apply to.
    """
    config = Config() if config is None else config
    if not isinstance(config, Config):
        raise TypeError(f"edkm.palettize_: config must be an edkm.Config, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"edkm.palettize_: model must be an nn.Module, got {type(model).__name__}")
    if any(True for _ in clustered_modules(model)):
        raise ValueError("edkm.palettize_: the model is already palettized")
    modules = list(model.named_modules(remove_duplicate=False))
    names = [n for n, _ in modules]
    for pattern in config.module_names:
        if not any(re.fullmatch(pattern, n) for n in names):
            raise ValueError(
                f"edkm.palettize_: module_names pattern {pattern!r} matches no module of "
                f"the model (e.g. {', '.join(repr(n) for n in names[1:4])})"
            )

    plans: List[Tuple[str, nn.Module, Optional[Config], type]] = []
    owners: Dict[int, List[int]] = {}  # weight Parameter id -> plan indices
    seen_modules = set()
    for name, m in modules:
        cls = clustered_class(type(m))
        if cls is None or id(m) in seen_modules:
            continue
        seen_modules.add(id(m))
        w = getattr(m, "weight", None)
        if not isinstance(w, torch.Tensor):
            continue
        plans.append((name, m, config.for_module(name, m), cls))
        owners.setdefault(id(w), []).append(len(plans) - 1)

    # Tied weights: one leader (the first module), followers share its centroids.
    leader_of: Dict[int, int] = {}
    for idxs in owners.values():
        cfgs = [plans[i][2] for i in idxs]
        if len(idxs) > 1 and any(c != cfgs[0] for c in cfgs[1:]):
            desc = ", ".join(
                f"{plans[i][0]}: {'skip' if plans[i][2] is None else 'bits=%d' % plans[i][2].bits}" for i in idxs
            )
            raise ValueError(
                f"edkm.palettize_: {' and '.join(plans[i][0] + '.weight' for i in idxs)} are "
                f"one tied tensor but got different configs ({desc}); give the tied "
                f"modules the same config or skip all of them"
            )
        for i in idxs[1:]:
            leader_of[i] = idxs[0]

    sens = _check_sensitivity(sensitivity, plans, owners)
    todo = [(i, p) for i, p in enumerate(plans) if p[2] is not None]
    iterator = todo
    if progress:
        from tqdm import tqdm

        iterator = tqdm(todo, desc="edkm: initializing centroids", unit="matrix")
    for i, (name, m, cfg, cls) in iterator:
        leader = plans[leader_of[i]][1] if i in leader_of else None
        m.__class__ = cls
        m._edkm_setup(name, cfg, leader, sensitivity=None if leader is not None else sens.get(id(m.weight)))
    return model


def _check_sensitivity(sensitivity, plans, owners) -> Dict[int, torch.Tensor]:
    """Sensitivities by weight Parameter id, checked against the modules that need them."""
    if sensitivity is None:
        sensitivity = {}
    if not isinstance(sensitivity, Mapping):
        raise TypeError(
            f"edkm.palettize_: sensitivity must be a mapping {{module name: tensor}}, got {type(sensitivity).__name__}"
        )
    by_name = {p[0]: p for p in plans}
    out: Dict[int, torch.Tensor] = {}
    for name, t in sensitivity.items():
        key = name[: -len(".weight")] if isinstance(name, str) and name.endswith(".weight") else name
        if key not in by_name:
            raise ValueError(f"edkm.palettize_: sensitivity key {name!r} names no Linear/Embedding module of the model")
        w = by_name[key][1].weight
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(w.shape):
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(
                f"edkm.palettize_: sensitivity[{name!r}] must be a tensor of the weight's "
                f"shape {tuple(w.shape)}, got {got}"
            )
        if not t.is_floating_point() or not torch.isfinite(t).all() or bool((t < 0).any()):
            raise ValueError(f"edkm.palettize_: sensitivity[{name!r}] must hold finite values >= 0")
        out[id(w)] = t.detach()
    for name, m, cfg, _ in plans:
        if cfg is None:
            continue
        needs = cfg.init == "sensitivity" or (cfg.outlier_fraction > 0 and cfg.outlier_criterion == "sensitivity")
        if needs and id(m.weight) not in out:
            raise ValueError(
                f"edkm.palettize_: {name} is configured with init={cfg.init!r}, "
                f"outlier_criterion={cfg.outlier_criterion!r}, which needs its sensitivity: "
                f"pass sensitivity={{'{name}': tensor}} (e.g. from edkm.fisher)"
            )
    return out


@torch.no_grad()
def finalize(model: nn.Module, *, progress: bool = False) -> nn.Module:
    """Hard-assign every clustered weight to its nearest centroid (LUTs rounded to fp16, the
    exported precision). Afterwards each weight takes at most K values per LUT group and the
    model computes exactly what :func:`edkm.save` + :func:`edkm.load` will give."""
    mods = [(n, m) for n, m in clustered_modules(model) if m.edkm_leader is None]
    if not mods:
        raise ValueError("edkm.finalize: the model has no clustered modules; call edkm.palettize_ first")
    iterator = mods
    if progress:
        from tqdm import tqdm

        iterator = tqdm(mods, desc="edkm: finalizing", unit="matrix")
    for _, m in iterator:
        m.edkm_finalize()
    return model


def clustered_weight(module: nn.Module) -> torch.Tensor:
    """The weight a clustered module computes with now (soft in training, hard in eval)."""
    if not isinstance(module, ClusteredMixin):
        raise TypeError(f"edkm.clustered_weight: expected a clustered module, got {type(module).__name__}")
    return module.clustered_weight()
