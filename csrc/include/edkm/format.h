// Reading and writing the edkm compressed-model file (docs/FORMAT.md, versions 1 and 2): one
// safetensors file with, per clustered tensor NAME, its fp16 look-up table `NAME.lut` [G, K, d],
// its bit-packed indices `NAME.indices` (uint8) and, in version 2, its outliers kept exact
// (`NAME.outlier_index`, `NAME.outlier_values`), and every other tensor as is.
// Files written here open with any safetensors reader (Python's `safetensors.safe_open`) and
// with Python's `edkm.load`; files from `edkm.save` load here.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

namespace edkm {

// One clustered tensor as stored.
struct ClusteredTensor {
  at::Tensor lut;                     // float16 [groups, 2^bits, cluster_dim]
  at::Tensor packed;                  // uint8 [ceil(numel / cluster_dim * bits / 8)], FORMAT.md packing
  int64_t bits = 0;                   // 1..8
  std::vector<int64_t> shape;         // the weight's shape (every dimension > 0)
  at::ScalarType dtype = at::kFloat;  // the weight's dtype: bfloat16, float16, float32, float64
  int64_t groups = 1;                 // G: numel splits into G equal contiguous groups, one LUT each
  int64_t cluster_dim = 1;            // d: vectors of d consecutive elements (d divides shape.back())
  // Outliers kept exact (format version 2; both undefined when there are none): flat row-major
  // positions, 1-D, strictly increasing, in [0, numel) -- int32 when numel <= 2^31, else int64 --
  // and their values, 1-D of the same length, finite, in the weight's dtype when that is 16-bit,
  // else float16 or bfloat16. Only with cluster_dim 1.
  at::Tensor outlier_index;
  at::Tensor outlier_values;

  int64_t numel() const;
  int64_t num_indices() const { return numel() / cluster_dim; }
  int64_t num_outliers() const { return outlier_index.defined() ? outlier_index.numel() : 0; }
  // The dtype outlier_index must have for this shape (int32 when numel <= 2^31, else int64).
  at::ScalarType outlier_index_dtype() const;

  // Raises (c10::ValueError, naming `name`) when the fields do not describe a valid tensor:
  // bits, shape, dtype, groups/cluster_dim divisibility, lut and packed dtypes and shapes, the
  // outliers' dtypes, lengths, order, range and finiteness.
  void check(const std::string& name) const;

  // The weight rebuilt as FORMAT.md says: lut[g, index].to(dtype), then each outlier value
  // (.to(dtype)) at its position; shape `shape`, on the CPU.
  at::Tensor dequantize() const;

 private:
  void check_outliers(const std::string& who) const;
};

struct CompressedFile {
  std::map<std::string, at::Tensor> tensors;  // stored as is
  // stored as NAME.lut + NAME.indices (+ NAME.outlier_index + NAME.outlier_values)
  std::map<std::string, ClusteredTensor> clustered;
  std::map<std::string, std::string> aliases;  // alias name -> stored name (tied tensors)
  // __metadata__ entries besides those edkm writes itself ("format", "edkm.version",
  // "edkm.layout", "edkm.aliases"). Loading a plain (non-edkm) safetensors file keeps all of
  // its metadata here.
  std::map<std::string, std::string> metadata;

  // Every tensor under its model name: plain ones, clustered ones dequantized, aliases
  // (sharing their target's tensor).
  std::map<std::string, at::Tensor> state_dict() const;
};

// Reads and validates a file (any safetensors file; edkm's metadata when present). Raises
// c10::ValueError naming the file (and tensor) for anything malformed: header length beyond the
// file or 100 MB, invalid JSON, unknown dtype, negative or overflowing shapes, data_offsets
// outside the data section, byte sizes that differ from numel * itemsize, tensors that do not
// tile the data section exactly, inconsistent edkm layouts; c10::Error when it cannot be read.
// Tensors are on the CPU.
CompressedFile load_compressed(const std::string& path);

// Writes `file` to `path` (tensors in name order, header padded with spaces to 8 bytes; format
// version 2 when some clustered tensor has outliers, else version 1): into a
// temporary file in the same directory, fsync, then rename over `path`, so an error never
// leaves a half-written file under `path`. Validates everything first (names unique after
// expansion to NAME.lut / NAME.indices / NAME.outlier_*, clustered tensors consistent, dtypes storable,
// aliases pointing at stored names, no reserved metadata keys); raises c10::ValueError naming
// the tensor, or c10::Error for I/O failures.
void save_compressed(const std::string& path, const CompressedFile& file);

// Run a clustered 2-D weight as stored, without rebuilding it (the edkm::lut_linear op):
// linear(input, W, bias) for W = weight.dequantize() ([out, in]; input [..., in]); computed in
// float32 (float64 for float64 input), returned in input's dtype. Small batches run a packed
// GEMV (AVX2 where the CPU has it), larger ones unpacked tiles + BLAS. Memory: the packed
// indices and the LUT, never the dense weight.
at::Tensor lut_linear(const at::Tensor& input, const ClusteredTensor& weight,
                      const std::optional<at::Tensor>& bias = std::nullopt);

// Rows `indices` (int32/int64, any shape) of a clustered 2-D weight (edkm::lut_embedding), in
// the weight's dtype; only those rows are unpacked.
at::Tensor lut_embedding(const at::Tensor& indices, const ClusteredTensor& weight);

}  // namespace edkm
