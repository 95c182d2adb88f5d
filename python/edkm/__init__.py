"""edkm: train-time weight clustering (eDKM) for large language models, on LibTorch.

The ops live in a C++/CUDA library shared with C++ users; this package loads it and adds
fake kernels (torch.compile / torch.export), the Python API and the benchmarks.
"""

from edkm import _native
from edkm import _fake  # noqa: F401  (registers fake kernels)
from edkm.ops import (
    DkmResult,
    KMeans1dResult,
    assign,
    dequantize,
    dkm,
    dkm_linear,
    dkm_reference,
    lut_embedding,
    lut_linear,
    optimal_kmeans_1d,
    optimal_kmeans_1d_grouped,
    pack_indices,
    unpack_indices,
)
from edkm.store import SavedTensorStore, saved_tensors
from edkm.config import Config
from edkm.settings import get_settings, set_settings, settings
from edkm.modules import ClusteredEmbedding, ClusteredLinear
from edkm.palettize import clustered_modules, clustered_weight, finalize, palettize_
from edkm.format import FormatError, info, load, load_state_dict, save
from edkm.hf_export import export_hf
from edkm.coreml_export import export_coreml
from edkm.sensitivity import calibration_batches, fisher
from edkm.gptq import gptq_, gptq_quantize, input_hessians
from edkm.mixed_precision import choose_bits, matrix_costs, mixed_precision_config
from edkm.finetune import FinetuneResult, TrainConfig
from edkm.distill import distillation_loss
from edkm.datafree import generate_blocks
from edkm.recipe import compress_model
from edkm.evaluate import teacher_agreement

__version__ = _native._C.__version__
cuda_compiled = _native.cuda_compiled

__all__ = [
    "ClusteredEmbedding",
    "ClusteredLinear",
    "Config",
    "FormatError",
    "clustered_modules",
    "clustered_weight",
    "export_coreml",
    "get_settings",
    "set_settings",
    "settings",
    "export_hf",
    "finalize",
    "info",
    "load",
    "load_state_dict",
    "palettize_",
    "save",
    "DkmResult",
    "KMeans1dResult",
    "SavedTensorStore",
    "assign",
    "cuda_compiled",
    "dequantize",
    "dkm",
    "dkm_linear",
    "dkm_reference",
    "optimal_kmeans_1d",
    "pack_indices",
    "saved_tensors",
    "unpack_indices",
    "optimal_kmeans_1d_grouped",
    "calibration_batches",
    "fisher",
    "gptq_",
    "gptq_quantize",
    "input_hessians",
    "choose_bits",
    "matrix_costs",
    "mixed_precision_config",
    "FinetuneResult",
    "TrainConfig",
    "distillation_loss",
    "generate_blocks",
    "compress_model",
    "teacher_agreement",
    "lut_linear",
    "lut_embedding",
]
