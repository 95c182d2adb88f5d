// Bit packing of cluster indices (docs/FORMAT.md): index j occupies bits [j*bits, (j+1)*bits)
// of a little-endian bit stream, LSB first; unused high bits of the last byte are zero.
#pragma once

#include <cstdint>

#include <ATen/core/Tensor.h>

namespace edkm {

// Bytes that `count` indices of `bits` bits take: ceil(count * bits / 8).
inline int64_t packed_bytes(int64_t count, int64_t bits) { return (count * bits + 7) / 8; }

// Argument checks that do not read values (dtype, shape, bits, count); one clear error each.
void check_pack_args(const at::Tensor& indices, int64_t bits);
void check_unpack_args(const at::Tensor& packed, int64_t bits, int64_t count);

// The error for indices outside [0, 2^bits), with their actual range (reads the values).
[[noreturn]] void fail_index_range(const at::Tensor& indices, int64_t bits);
// The error for non-zero unused high bits in the last byte.
[[noreturn]] void fail_padding_bits(int64_t bits, int64_t count, uint8_t last_byte);

namespace generic {
// Plain ATen implementations: any device (CUDA uses these; O(n) temporaries of int64).
at::Tensor pack_indices(const at::Tensor& indices, int64_t bits);
at::Tensor unpack_indices(const at::Tensor& packed, int64_t bits, int64_t count);
}  // namespace generic

}  // namespace edkm
