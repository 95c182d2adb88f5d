"""What to cluster and how: :class:`Config`, with per-module-type and per-module-name overrides."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Type, Union

import torch
from torch import nn

DISTANCES = ("squared", "absolute")
INITS = ("auto", "optimal", "kmeans++", "sensitivity")
OUTLIER_CRITERIA = ("magnitude", "sensitivity")
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class Config:
    """How one weight matrix is clustered.

    bits: 1..8, K = 2**bits centroids per look-up table (LUT).
    group_size: output channels (rows) that share one LUT; ``None`` = one LUT per matrix.
        Must divide the number of rows.
    cluster_dim: 1 for scalar clustering; d > 1 clusters vectors of d consecutive weights along
        the input dimension (must divide it; distance must be "squared").
    temperature: softness of the assignment, relative to the weight's variance: the softmax
        uses tau = temperature * var(w), fixed when the centroids are initialized.
    max_iter, epsilon, distance: the DKM iteration limit, early-stop tolerance on the largest
        centroid move, and distance ("squared" or "absolute").
    cluster_dtype: cluster the rounding of a wider weight to this 16-bit dtype (the U-domain
        is exact and almost free for 16-bit values); ``None`` clusters the weight's own dtype.
        Weights already 16 bits wide are clustered as they are.
    milestone: training-mode forward passes of the module before clustering starts (the
        weight trains unclustered until then; centroids are initialized at the milestone).
    init: "optimal" (exact 1-D k-means over the distinct values, scalar only), "kmeans++"
        (seeded k-means++ then Lloyd), "auto": the one with the lower within-cluster error, or
        "sensitivity": exact 1-D k-means in which every weight counts by its sensitivity (e.g.
        the Fisher information from :func:`edkm.fisher`), passed as ``palettize_(...,
        sensitivity=...)`` (SqueezeLLM's weighted k-means; scalar only).
    seed: for k-means++.
    outlier_fraction: fraction of each matrix's weights (0 .. 0.1) kept exactly in 16 bits as a
        sparse side tensor (dense-and-sparse); they are left out of the clustering and added
        back in the forward pass, stored in the file and counted in its size.
    outlier_criterion: which weights are the outliers: "magnitude" (the largest |w|) or
        "sensitivity" (the largest sensitivity * w**2; needs ``palettize_(..., sensitivity=...)``).
    module_types / module_names: overrides. Keys of ``module_names`` are regular expressions
        matched in full against qualified module names (first match wins, before types);
        keys of ``module_types`` are module classes (or their names). A value is a Config,
        a dict of fields to change, or ``None`` to leave the module unclustered.
    """

    bits: int = 3
    group_size: Optional[int] = None
    cluster_dim: int = 1
    temperature: float = 0.02
    max_iter: int = 3
    epsilon: float = 0.0
    distance: str = "squared"
    cluster_dtype: Optional[torch.dtype] = torch.bfloat16
    milestone: int = 0
    init: str = "auto"
    seed: int = 0
    outlier_fraction: float = 0.0
    outlier_criterion: str = "magnitude"
    module_types: Mapping[Union[Type[nn.Module], str], Any] = field(default_factory=dict)
    module_names: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        def bad(name, expected, got):
            raise ValueError(f"edkm.Config: {name} must be {expected}, got {got!r}")

        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 1 <= self.bits <= 8:
            bad("bits", "an integer in 1..8", self.bits)
        if self.group_size is not None and (
            isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1
        ):
            bad("group_size", "None or a positive integer", self.group_size)
        if isinstance(self.cluster_dim, bool) or not isinstance(self.cluster_dim, int) or self.cluster_dim < 1:
            bad("cluster_dim", "a positive integer", self.cluster_dim)
        if (
            not isinstance(self.temperature, (int, float))
            or not self.temperature > 0
            or self.temperature == float("inf")
        ):
            bad("temperature", "a finite number > 0", self.temperature)
        if isinstance(self.max_iter, bool) or not isinstance(self.max_iter, int) or self.max_iter < 1:
            bad("max_iter", "an integer >= 1", self.max_iter)
        if not isinstance(self.epsilon, (int, float)) or not self.epsilon >= 0:
            bad("epsilon", "a number >= 0", self.epsilon)
        if self.distance not in DISTANCES:
            bad("distance", f"one of {DISTANCES}", self.distance)
        if self.cluster_dim > 1 and self.distance != "squared":
            bad("distance", "'squared' when cluster_dim > 1", self.distance)
        if isinstance(self.cluster_dtype, str):
            if self.cluster_dtype not in _DTYPES:
                bad("cluster_dtype", f"None or one of {tuple(_DTYPES)}", self.cluster_dtype)
            object.__setattr__(self, "cluster_dtype", _DTYPES[self.cluster_dtype])
        if self.cluster_dtype not in (None, torch.bfloat16, torch.float16):
            bad("cluster_dtype", "None, torch.bfloat16 or torch.float16", self.cluster_dtype)
        if isinstance(self.milestone, bool) or not isinstance(self.milestone, int) or self.milestone < 0:
            bad("milestone", "an integer >= 0", self.milestone)
        if self.init not in INITS:
            bad("init", f"one of {INITS}", self.init)
        if self.init == "optimal" and self.cluster_dim > 1:
            bad("init", "'kmeans++' or 'auto' when cluster_dim > 1 (optimal k-means is 1-D)", self.init)
        if self.init == "sensitivity" and self.cluster_dim > 1:
            bad("init", "not 'sensitivity' when cluster_dim > 1 (weighted k-means here is 1-D)", self.init)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            bad("seed", "an integer", self.seed)
        if (
            isinstance(self.outlier_fraction, bool)
            or not isinstance(self.outlier_fraction, (int, float))
            or not 0.0 <= self.outlier_fraction <= 0.1
        ):
            bad("outlier_fraction", "a number in [0, 0.1]", self.outlier_fraction)
        if self.outlier_criterion not in OUTLIER_CRITERIA:
            bad("outlier_criterion", f"one of {OUTLIER_CRITERIA}", self.outlier_criterion)
        if self.outlier_fraction > 0 and self.cluster_dim > 1:
            bad("outlier_fraction", "0 when cluster_dim > 1 (outliers are single weights)", self.outlier_fraction)
        if not isinstance(self.module_types, Mapping):
            bad("module_types", "a mapping {module class: Config | dict | None}", self.module_types)
        if not isinstance(self.module_names, Mapping):
            bad("module_names", "a mapping {regex: Config | dict | None}", self.module_names)
        for key, value in self.module_names.items():
            if not isinstance(key, str):
                bad("module_names", "keyed by regular-expression strings", key)
            try:
                re.compile(key)
            except re.error as e:
                raise ValueError(
                    f"edkm.Config: module_names key {key!r} is not a valid regular expression: {e}"
                ) from None
            self._override(value, f"module_names[{key!r}]")
        for key, value in self.module_types.items():
            if not (isinstance(key, str) or (isinstance(key, type) and issubclass(key, nn.Module))):
                bad("module_types", "keyed by nn.Module subclasses or their names", key)
            self._override(value, f"module_types[{key!r}]")

    @property
    def k(self) -> int:
        return 1 << self.bits

    def _override(self, value, where: str) -> Optional["Config"]:
        if value is None:
            return None
        if isinstance(value, Config):
            return value
        if isinstance(value, Mapping):
            return self.replace(**value, _where=where)
        raise ValueError(
            f"edkm.Config: {where} must be a Config, a dict of Config fields or None, got {type(value).__name__}"
        )

    def replace(self, _where: str = "edkm.Config.replace", **changes) -> "Config":
        """A copy with some fields changed (overrides are not inherited)."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"{_where}: unknown config key(s) {unknown}; known: {sorted(known)}")
        base = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        base.update(module_types={}, module_names={})
        base.update(changes)
        return Config(**base)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Config":
        """Build from plain data (e.g. parsed JSON/YAML); unknown keys are an error."""
        if not isinstance(d, Mapping):
            raise ValueError(f"edkm.Config.from_dict: expected a mapping, got {type(d).__name__}")
        return cls().replace(_where="edkm.Config.from_dict", **dict(d))

    def for_module(self, name: str, module: nn.Module) -> Optional["Config"]:
        """The config that applies to ``module`` (qualified ``name``), or None to skip it."""
        for pattern, value in self.module_names.items():
            if re.fullmatch(pattern, name):
                return self._override(value, f"module_names[{pattern!r}]")
        for cls in type(module).__mro__:
            for key in (cls, cls.__name__):
                if key in self.module_types:
                    return self._override(self.module_types[key], f"module_types[{key!r}]")
        return self.replace(_where="edkm.Config")

    def to_dict(self) -> Dict[str, Any]:
        """The scalar fields as plain data (dtype as its name); overrides are omitted."""
        out = {}
        for f in dataclasses.fields(self):
            if f.name in ("module_types", "module_names"):
                continue
            v = getattr(self, f.name)
            out[f.name] = str(v).replace("torch.", "") if isinstance(v, torch.dtype) else v
        return out
