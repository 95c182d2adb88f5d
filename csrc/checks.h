// Input validation shared by every kernel of every backend: Python calls torch.ops.edkm.* and
// never passes through the C++ API, so each entry point checks what it is given.
#pragma once

#include <string>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

namespace edkm {

enum class Distance { kSquared, kAbsolute };

// Parses "squared" / "absolute"; anything else is an error naming the op.
Distance parse_distance(const char* op, c10::string_view distance);

bool is_16bit(at::ScalarType t);

// The dtype the U-domain arithmetic runs in: float64 for float64 weights, float32 otherwise.
at::ScalarType compute_dtype(at::ScalarType weight_dtype);

// All argument checks of dkm / dkm_reference; raises one clear error naming the argument.
// Does not look at values (NaN/Inf): the caller checks them where it reads them.
void check_dkm_args(const char* op, const at::Tensor& weight, const at::Tensor& centroids, double temperature,
                    int64_t max_iter, double epsilon);

// _slot_table's checks: a 16-bit weight whose numel `groups` divides.
void check_slot_table_args(const char* op, const at::Tensor& weight, int64_t groups);

// Checks for the slot primitives: a contiguous 16-bit weight, int32 slots [G, Ucap] on the
// weight's device with G dividing numel.
void check_slot_args(const char* op, const at::Tensor& weight, const at::Tensor& slots);

// Raises when centroids hold NaN or Inf (reads K*G values).
void check_finite_centroids(const char* op, const at::Tensor& centroids);

// Ucap for a group of M values: distinct 16-bit patterns can't exceed either.
inline int64_t slot_capacity(int64_t group_size) { return group_size < 65536 ? group_size : 65536; }

// Sentinel slot value for unused table entries; sorts after every real bit pattern.
constexpr int32_t kEmptySlot = 65536;

}  // namespace edkm
