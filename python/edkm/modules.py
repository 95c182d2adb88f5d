"""Clustered versions of nn.Linear and nn.Embedding, made by :func:`edkm.palettize_`.

A clustered module keeps its original ``weight`` Parameter as the trainable one (optimizers,
FSDP and ``state_dict`` see it unchanged) and adds a ``edkm_centroids`` buffer plus a small
extra state (step, temperature, flags) so training stops and resumes exactly. Its forward:

* before the milestone: the plain module (the weight trains unclustered);
* training: DKM soft clustering every step, warm-started from the previous centroids. Linear
  layers use :func:`edkm.dkm_linear`, which rebuilds the clustered weight in backward instead of
  keeping it, so a clustered layer costs about what a plain one does;
* eval: the hard assignment to the current centroids (what :func:`edkm.finalize` and the
  exported file give), cached until the weight or the centroids change;
* finalized: the weight holds its look-up-table values; the plain module's forward.

Under activation checkpointing (``torch.utils.checkpoint``, reentrant or not) the forward runs
again inside backward. That recomputation replays the step instead of taking another one: the
step counter does not move and DKM starts again from the centroids the step started from, so
the recomputed weight, the gradients and the centroids are those of the plain run.

With ``outlier_fraction > 0`` (dense-and-sparse, see :mod:`edkm.outliers`) the largest (or most
sensitive) weights are chosen once, when the centroids are initialized, and kept as the buffer
``edkm_outlier_index`` (sorted flat positions, in ``state_dict``). Clustering sees the weight with
those positions zeroed (and the initial k-means gives them no mass at all); the weight the
module computes with is the clustered one with the outlier positions holding the weight's own,
still trainable, values (16-bit: rounded to the stored dtype in eval and at finalize). Linear
layers with outliers take the unfused path (``dkm`` then ``F.linear``), which keeps one
weight-sized tensor for backward.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from edkm import ops
from edkm.config import Config
from edkm.init import init_centroids
from edkm.outliers import choose_outliers, dense_part, gather_outliers, merge_outliers, outlier_count, outlier_dtype
from edkm.vector_dkm import vector_assign, vector_dequantize, vector_dkm

_16BIT = (torch.bfloat16, torch.float16)


class ClusteredMixin:
    """Shared machinery; combined with nn.Linear / nn.Embedding (or a subclass of them)."""

    edkm_config: Config
    edkm_name: str

    # ---- set-up (called by palettize_) ------------------------------------------------------
    def _edkm_setup(
        self,
        name: str,
        config: Config,
        leader: Optional["ClusteredMixin"] = None,
        sensitivity: Optional[torch.Tensor] = None,
    ):
        self.edkm_config = config
        self.edkm_name = name
        # Per-weight sensitivity (e.g. Fisher information), same shape as the weight, for
        # init="sensitivity" and outlier_criterion="sensitivity"; a plain attribute, not state.
        object.__setattr__(self, "_edkm_sensitivity", sensitivity)
        # A tied follower shares its leader's weight Parameter and centroids (e.g. lm_head tied
        # to the input embedding); it is kept out of the module tree to avoid a cycle.
        object.__setattr__(self, "_edkm_leader", leader)
        self._edkm_state: Dict[str, Any] = {"step": 0, "tau": 0.0, "initialized": False, "finalized": False}
        self._edkm_cache = None
        self._edkm_replay = None  # the centroids this step started from (activation checkpointing)
        self._edkm_indices = None
        w = self.weight
        if w.dim() != 2:
            raise ValueError(f"edkm: {name}.weight must be 2-D, got shape {tuple(w.shape)}")
        if not w.is_floating_point():
            raise ValueError(f"edkm: {name}.weight must be floating point, got {w.dtype}")
        rows, cols = w.shape
        gs = config.group_size
        if gs is not None and rows % gs:
            raise ValueError(f"edkm: group_size {gs} must divide {name}'s {rows} output channels (rows)")
        if cols % config.cluster_dim:
            raise ValueError(
                f"edkm: cluster_dim {config.cluster_dim} must divide {name}'s {cols} input channels (columns)"
            )
        groups = rows // gs if gs else 1
        shape = (groups, config.k) if config.cluster_dim == 1 else (groups, config.k, config.cluster_dim)
        # The compute dtype of what gets clustered: float64 only for float64 weights clustered
        # as they are (a cluster_dtype rounding makes them 16-bit, computed in float32).
        clusters_own_dtype = config.cluster_dtype is None or w.dtype in _16BIT
        cdt = torch.float64 if w.dtype == torch.float64 and clusters_own_dtype else torch.float32
        if leader is None:
            self.register_buffer("edkm_centroids", torch.zeros(shape, dtype=cdt, device=w.device))
            if config.outlier_fraction > 0:
                # Filled when the centroids are initialized (the weight at the milestone).
                n = outlier_count(config.outlier_fraction, w.numel())
                self.register_buffer("edkm_outlier_index", torch.zeros(n, dtype=torch.int64, device=w.device))
        if config.milestone == 0 and leader is None:
            self.edkm_initialize()

    @property
    def edkm_leader(self) -> Optional["ClusteredMixin"]:
        return self.__dict__.get("_edkm_leader")

    @property
    def edkm_groups(self) -> int:
        gs = self.edkm_config.group_size
        return self.weight.shape[0] // gs if gs else 1

    @property
    def edkm_step(self) -> int:
        return self._owner._edkm_state["step"]

    @property
    def edkm_initialized(self) -> bool:
        return self._owner._edkm_state["initialized"]

    @property
    def edkm_finalized(self) -> bool:
        return self._owner._edkm_state["finalized"]

    @property
    def edkm_temperature(self) -> float:
        """The absolute temperature tau used in the softmax (temperature * var(w) at init)."""
        return self._owner._edkm_state["tau"]

    @property
    def _owner(self) -> "ClusteredMixin":
        return self.edkm_leader or self

    @property
    def centroids(self) -> torch.Tensor:
        return self._owner.edkm_centroids

    @property
    def edkm_outlier_positions(self) -> Optional[torch.Tensor]:
        """Sorted flat positions of the outliers (int64), or None when the module keeps none
        or its centroids are not initialized yet."""
        owner = self._owner
        idx = owner._buffers.get("edkm_outlier_index")
        if idx is None or idx.numel() == 0 or not owner._edkm_state["initialized"]:
            return None
        return idx

    @property
    def edkm_outlier_dtype(self) -> torch.dtype:
        """The dtype outlier values are stored in (the file's NAME.outlier_values)."""
        return outlier_dtype(self._owner._edkm_source_dtype())

    def __getstate__(self):
        # deepcopy / pickle: the per-step caches may hold autograd graph tensors; drop them.
        state = super().__getstate__()
        state = dict(state)
        state["_edkm_cache"] = None
        state["_edkm_replay"] = None
        return state

    # ---- state_dict: step, tau and flags travel with the centroids --------------------------
    def get_extra_state(self):
        if self.edkm_leader is not None:
            return {"leader": self.edkm_leader.edkm_name}
        return dict(self._edkm_state, config=self.edkm_config.to_dict())

    def set_extra_state(self, state):
        if self.edkm_leader is not None:
            return
        if not isinstance(state, dict) or not {"step", "tau", "initialized", "finalized"} <= set(state):
            raise ValueError(f"edkm: {self.edkm_name}: the state_dict's edkm state is not one edkm wrote")
        saved = state.get("config")
        if saved is not None and saved != self.edkm_config.to_dict():
            raise ValueError(
                f"edkm: {self.edkm_name}: the state_dict was saved with config {saved}, "
                f"this module has {self.edkm_config.to_dict()}"
            )
        self._edkm_state = {
            k: state[k] for k in ("step", "tau", "initialized", "finalized", "init_method") if k in state
        }
        self._edkm_cache = None
        self._edkm_indices = None

    # ---- the weight that gets clustered ----------------------------------------------------
    def edkm_source(self) -> torch.Tensor:
        """The weight as clustered: rounded to cluster_dtype when it is wider (differentiably)."""
        w = self.weight
        cd = self.edkm_config.cluster_dtype
        if cd is not None and w.dtype not in _16BIT:
            w = w.to(cd)
        return w

    def _edkm_source_dtype(self) -> torch.dtype:
        """edkm_source().dtype without rounding the whole weight."""
        dt = self.weight.dtype
        cd = self.edkm_config.cluster_dtype
        return cd if cd is not None and dt not in _16BIT else dt

    def edkm_dense_source(self) -> torch.Tensor:
        """What gets clustered: :meth:`edkm_source` with the outlier positions zeroed."""
        src = self._owner.edkm_source()
        idx = self.edkm_outlier_positions
        return src if idx is None else dense_part(src, idx)

    @torch.no_grad()
    def edkm_initialize(self) -> None:
        """Choose the outliers (if any), initialize the centroids from the current weight
        (config.init) and fix tau."""
        owner = self._owner
        cfg = owner.edkm_config
        name = f"{owner.edkm_name}.weight"
        sens = owner.__dict__.get("_edkm_sensitivity")
        weights = None
        if cfg.init == "sensitivity":
            weights = sens
            if weights is None:
                raise ValueError(
                    f"edkm: {owner.edkm_name}: init='sensitivity' needs per-weight "
                    f"sensitivities: pass palettize_(model, config, sensitivity=edkm.fisher(...))"
                )
        src = owner.edkm_source().detach()
        method = cfg.init
        buf = owner._buffers.get("edkm_outlier_index")
        if buf is not None and buf.numel():
            idx = choose_outliers(src, buf.numel(), cfg.outlier_criterion, sens, name)
            buf.copy_(idx.to(buf.device))
            src = dense_part(src, idx)
            if cfg.init != "kmeans++":
                # The outliers get no mass in the initial k-means (their zeros in D would pull
                # a centroid towards 0); "auto" is the exact 1-D k-means, as it picks it anyway.
                mass = torch.ones_like(src, dtype=torch.float64) if weights is None else weights.double().clone()
                weights = mass.reshape(-1).index_fill_(0, idx.to(mass.device), 0.0).view(src.shape)
                method = "sensitivity"
        init = init_centroids(
            src, owner.edkm_groups, cfg.k, cfg.cluster_dim, method, cfg.seed, name=name, weights=weights
        )
        owner.edkm_centroids.copy_(init.centroids.to(owner.edkm_centroids))
        owner._edkm_state["tau"] = cfg.temperature * (init.variance if init.variance > 0 else 1.0)
        owner._edkm_state["initialized"] = True
        owner._edkm_state["init_method"] = (
            init.method if method == cfg.init else "optimal" if cfg.init in ("auto", "optimal") else cfg.init
        )
        owner._edkm_cache = None

    def _edkm_step_centroids(self) -> torch.Tensor:
        """The centroids this step's DKM starts from: the current ones, remembered, or in a
        recomputation under activation checkpointing (a forward run by backward) the ones the
        step started from."""
        if _recomputing() and getattr(self, "_edkm_replay", None) is not None:
            return self._edkm_replay
        self._edkm_replay = self.edkm_centroids.detach().clone()
        return self._edkm_replay

    def _edkm_move_centroids(self, new_c: torch.Tensor) -> None:
        """The warm start: the next step begins where this one's DKM ended (not again when the
        step is recomputed)."""
        if not _recomputing():
            with torch.no_grad():
                self.edkm_centroids.copy_(new_c.detach().to(self.edkm_centroids.dtype))

    def _soft_weight(self) -> torch.Tensor:
        """DKM-clustered weight (differentiable); moves the centroids (warm start)."""
        cfg = self.edkm_config
        src = self.edkm_source()
        idx = self.edkm_outlier_positions
        dense = src if idx is None else dense_part(src, idx)
        c = self._edkm_step_centroids()
        tau = self._edkm_state["tau"]
        if cfg.cluster_dim == 1:
            clustered, new_c, _ = ops.dkm(dense, c, tau, cfg.max_iter, cfg.epsilon, cfg.distance)
        else:
            clustered, new_c = vector_dkm(dense, c, tau, cfg.max_iter, cfg.epsilon)
        self._edkm_move_centroids(new_c)
        if idx is not None:
            clustered = merge_outliers(clustered, gather_outliers(src, idx), idx)
        return clustered.to(self.weight.dtype)

    @torch.no_grad()
    def edkm_indices(self, centroids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Index of each weight's (or d-vector's) nearest centroid, flattened."""
        owner = self._owner
        c = owner.edkm_centroids if centroids is None else centroids
        src = owner.edkm_dense_source().detach()
        if owner.edkm_config.cluster_dim == 1:
            return ops.assign(src, c).reshape(-1)
        return vector_assign(src, c)

    @torch.no_grad()
    def _hard_weight(self) -> torch.Tensor:
        owner = self._owner
        out_idx = owner.edkm_outlier_positions
        key = (
            owner.weight._version,
            owner.weight.data_ptr(),
            owner.edkm_centroids._version,
            None if out_idx is None else out_idx._version,
        )
        if owner._edkm_cache is not None and owner._edkm_cache[0] == key:
            return owner._edkm_cache[1]
        idx = owner.edkm_indices()
        w = owner.weight
        if owner.edkm_config.cluster_dim == 1:
            hard = ops.dequantize(idx.reshape(w.shape), owner.edkm_centroids, w.dtype)
        else:
            hard = vector_dequantize(idx, owner.edkm_centroids, w.shape, w.dtype)
        if out_idx is not None:
            hard = merge_outliers(hard, owner._edkm_stored_outliers(), out_idx)
        owner._edkm_cache = (key, hard)
        return hard

    @torch.no_grad()
    def _edkm_stored_outliers(self) -> torch.Tensor:
        """The outlier values as the file stores them (16-bit), checked to be finite."""
        owner = self._owner
        # Rounded as edkm_source rounds the whole weight (elementwise, so gathering first is the same).
        vals = gather_outliers(owner.weight.detach(), owner.edkm_outlier_positions).to(owner._edkm_source_dtype())
        stored = vals.to(outlier_dtype(vals.dtype))
        if not torch.isfinite(stored).all():
            raise ValueError(
                f"edkm: {owner.edkm_name}: an outlier exceeds {stored.dtype}'s range; "
                f"the file format stores outliers in 16 bits (set cluster_dtype=torch.bfloat16)"
            )
        return stored

    def clustered_weight(self) -> torch.Tensor:
        """The weight this module computes with now (see the module docstring)."""
        owner = self._owner
        st = owner._edkm_state
        if st["finalized"] or not st["initialized"]:
            return self.weight
        if not self.training:
            return self._hard_weight()
        if self.edkm_leader is not None:
            cached = owner._edkm_cache
            key = ("soft", st["step"], owner.weight._version)
            if cached is not None and cached[0] == key:
                return cached[1]
            return owner._soft_weight()
        return self._soft_weight()

    def _edkm_advance(self) -> bool:
        """Count a training step; True when clustering is active for it."""
        owner = self._owner
        st = owner._edkm_state
        if st["finalized"]:
            return False
        if self.edkm_leader is None and self.training and not _recomputing():
            st["step"] += 1
            if not st["initialized"] and st["step"] > self.edkm_config.milestone:
                self.edkm_initialize()
        return st["initialized"]

    def _edkm_remember(self, soft: torch.Tensor) -> torch.Tensor:
        """Keep this step's soft weight for a tied follower."""
        self._edkm_cache = (("soft", self._edkm_state["step"], self.weight._version), soft)
        return soft

    @torch.no_grad()
    def edkm_finalize(self) -> None:
        """Hard-assign the weight to its nearest centroid, with the LUT rounded to fp16 (the
        exported precision), so the exported file reproduces this module exactly."""
        if self.edkm_leader is not None:
            return
        if self._edkm_state["finalized"]:
            return
        if not self._edkm_state["initialized"]:
            self.edkm_initialize()
        c = self.edkm_centroids
        if not torch.isfinite(c).all():
            raise ValueError(f"edkm: {self.edkm_name} has non-finite centroids; cannot finalize")
        lut = c.to(torch.float16)
        if not torch.isfinite(lut).all():
            raise ValueError(
                f"edkm: {self.edkm_name}: a centroid exceeds float16's range (65504); "
                f"the file format stores LUTs in float16"
            )
        c.copy_(lut.to(c.dtype))
        idx = self.edkm_indices()
        w = self.weight
        if self.edkm_config.cluster_dim == 1:
            hard = ops.dequantize(idx.reshape(w.shape), c, w.dtype)
        else:
            hard = vector_dequantize(idx, c, w.shape, w.dtype)
        out_idx = self.edkm_outlier_positions
        if out_idx is not None:
            hard = merge_outliers(hard, self._edkm_stored_outliers(), out_idx)
        w.copy_(hard)
        self._edkm_indices = idx
        self._edkm_state["finalized"] = True
        self._edkm_cache = None

    def extra_repr(self) -> str:
        cfg = self.edkm_config
        tied = f", tied to {self.edkm_leader.edkm_name}" if self.edkm_leader is not None else ""
        outliers = f", outliers={cfg.outlier_fraction:g}" if cfg.outlier_fraction else ""
        return (
            f"{super().extra_repr()}, bits={cfg.bits}, groups={self.edkm_groups}, "
            f"cluster_dim={cfg.cluster_dim}{outliers}{tied}"
        )


def _recomputing() -> bool:
    """True in a forward that the autograd engine runs during backward: the recomputation of
    activation checkpointing (both of torch.utils.checkpoint's modes run it there)."""
    return torch._C._current_autograd_node() is not None


class ClusteredLinear(ClusteredMixin, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._edkm_advance():
            return F.linear(x, self.weight, self.bias)
        if not self.training:
            return F.linear(x, self._hard_weight(), self.bias)
        cfg = self.edkm_config
        fused = (
            self.edkm_leader is None
            and cfg.cluster_dim == 1
            and x.dtype == self.weight.dtype
            and self.edkm_source() is self.weight
            and self.edkm_outlier_positions is None
        )
        if fused:
            out, new_c, _ = ops.dkm_linear(
                x,
                self.weight,
                self._edkm_step_centroids(),
                self.bias,
                self._edkm_state["tau"],
                cfg.max_iter,
                cfg.epsilon,
                cfg.distance,
            )
            self._edkm_move_centroids(new_c)
            return out
        w = self.clustered_weight()
        if self.edkm_leader is None:
            self._edkm_remember(w)
        return F.linear(x, w, self.bias)


class ClusteredEmbedding(ClusteredMixin, nn.Embedding):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._edkm_advance():
            w = self.clustered_weight()
            if self.training and self.edkm_leader is None:
                self._edkm_remember(w)
        else:
            w = self.weight
        return F.embedding(x, w, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse)


_CLASSES: Dict[type, type] = {nn.Linear: ClusteredLinear, nn.Embedding: ClusteredEmbedding}


def clustered_class(cls: type) -> Optional[type]:
    """The clustered class for a module class (subclasses of Linear/Embedding get their own)."""
    if cls in _CLASSES:
        return _CLASSES[cls]
    if issubclass(cls, ClusteredMixin):
        return None
    for base, mixed in ((nn.Linear, ClusteredLinear), (nn.Embedding, ClusteredEmbedding)):
        if issubclass(cls, base):
            _CLASSES[cls] = type(f"Clustered{cls.__name__}", (mixed, cls), {"forward": mixed.forward})
            return _CLASSES[cls]
    return None
