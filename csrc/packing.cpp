// pack_indices / unpack_indices: argument checks and the generic ATen implementation, which
// serves every device without its own kernel (CUDA included; CPU has cpu/packing_kernel.cpp).
#include "packing.h"

#include <limits>

#include <ATen/ATen.h>
#include <torch/library.h>

namespace edkm {

namespace {

bool is_index_dtype(at::ScalarType t) {
  return t == at::kByte || t == at::kChar || t == at::kShort || t == at::kInt || t == at::kLong;
}

void check_bits(const char* op, int64_t bits) {
  TORCH_CHECK_VALUE(bits >= 1 && bits <= 8, op, ": bits must be in 1..8, got ", bits);
}

}  // namespace

void check_pack_args(const at::Tensor& indices, int64_t bits) {
  const char* op = "pack_indices";
  TORCH_CHECK_VALUE(indices.defined(), op, ": indices must be a tensor, got None");
  TORCH_CHECK_TYPE(is_index_dtype(indices.scalar_type()), op,
                   ": indices must be an integer tensor (uint8, int8, int16, int32 or int64), "
                   "got ",
                   indices.scalar_type());
  check_bits(op, bits);
}

void check_unpack_args(const at::Tensor& packed, int64_t bits, int64_t count) {
  const char* op = "unpack_indices";
  TORCH_CHECK_VALUE(packed.defined(), op, ": packed must be a tensor, got None");
  TORCH_CHECK_TYPE(packed.scalar_type() == at::kByte, op, ": packed must be uint8, got ",
                   packed.scalar_type());
  TORCH_CHECK_VALUE(packed.dim() == 1, op, ": packed must be 1-D, got shape ", packed.sizes());
  check_bits(op, bits);
  TORCH_CHECK_VALUE(count >= 0 && count <= (std::numeric_limits<int64_t>::max() - 7) / 8, op,
                    ": count must be >= 0 (and below 2^60), got ", count);
  TORCH_CHECK_VALUE(packed.numel() == packed_bytes(count, bits), op, ": ", count, " indices of ", bits,
                    " bits take ceil(", count, " * ", bits, " / 8) = ", packed_bytes(count, bits),
                    " bytes, but packed has ", packed.numel());
}

void fail_index_range(const at::Tensor& indices, int64_t bits) {
  auto range = at::aminmax(indices.reshape(-1).to(at::kLong));
  TORCH_CHECK_VALUE(false, "pack_indices: indices must lie in [0, 2^bits) = [0, ", int64_t(1) << bits,
                    ") for bits = ", bits, ", got values in [", std::get<0>(range).item<int64_t>(), ", ",
                    std::get<1>(range).item<int64_t>(), "]");
}

void fail_padding_bits(int64_t bits, int64_t count, uint8_t last_byte) {
  TORCH_CHECK_VALUE(false,
                    "unpack_indices: the unused high bits of packed's last byte must be "
                    "zero (",
                    count, " indices of ", bits, " bits use ", (count * bits) % 8, " bits of it), got byte ",
                    static_cast<int>(last_byte));
}

namespace generic {

at::Tensor pack_indices(const at::Tensor& indices, int64_t bits) {
  check_pack_args(indices, bits);
  const int64_t n = indices.numel();
  const auto byte_opts = indices.options().dtype(at::kByte);
  if (n == 0) return at::empty({0}, byte_opts);
  auto flat = indices.reshape(-1).to(at::kLong);
  auto range = at::aminmax(flat);
  if (std::get<0>(range).item<int64_t>() < 0 || std::get<1>(range).item<int64_t>() >= (int64_t(1) << bits)) {
    fail_index_range(indices, bits);
  }
  if (bits == 8) return flat.to(at::kByte);
  // Eight indices fill `bits` whole bytes: build each group of eight as one integer (< 2^56).
  const int64_t n8 = (n + 7) / 8;
  auto padded = at::zeros({n8 * 8}, flat.options());
  padded.narrow(0, 0, n).copy_(flat);
  auto shifts = at::arange(0, 8 * bits, bits, flat.options());
  auto acc = padded.view({n8, 8}).bitwise_left_shift(shifts).sum(1);
  auto byte_shifts = at::arange(0, 8 * bits, 8, flat.options());
  auto bytes = acc.unsqueeze(1).bitwise_right_shift(byte_shifts).bitwise_and(255).to(at::kByte);
  return bytes.reshape(-1).narrow(0, 0, packed_bytes(n, bits)).clone();
}

at::Tensor unpack_indices(const at::Tensor& packed, int64_t bits, int64_t count) {
  check_unpack_args(packed, bits, count);
  if (count == 0) return at::empty({0}, packed.options());
  const int64_t used = (count * bits) % 8;
  if (used != 0) {
    const auto last = packed[packed.numel() - 1].item<uint8_t>();
    if ((last >> used) != 0) fail_padding_bits(bits, count, last);
  }
  if (bits == 8) return packed.clone(at::MemoryFormat::Contiguous);
  const int64_t n8 = (count + 7) / 8;
  const auto long_opts = packed.options().dtype(at::kLong);
  auto padded = at::zeros({n8 * bits}, long_opts);
  padded.narrow(0, 0, packed.numel()).copy_(packed);
  auto byte_shifts = at::arange(0, 8 * bits, 8, long_opts);
  auto acc = padded.view({n8, bits}).bitwise_left_shift(byte_shifts).sum(1);
  auto shifts = at::arange(0, 8 * bits, bits, long_opts);
  auto idx = acc.unsqueeze(1).bitwise_right_shift(shifts).bitwise_and((int64_t(1) << bits) - 1);
  return idx.reshape(-1).narrow(0, 0, count).to(at::kByte);
}

}  // namespace generic

TORCH_LIBRARY_IMPL(edkm, CompositeExplicitAutograd, m) {
  m.impl("pack_indices", &generic::pack_indices);
  m.impl("unpack_indices", &generic::unpack_indices);
}

}  // namespace edkm
