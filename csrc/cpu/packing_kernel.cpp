// CPU kernels of pack_indices / unpack_indices. Eight indices of `bits` bits fill exactly `bits`
// bytes, so the work splits over threads in byte-aligned chunks of eight indices; the value
// range check is fused into the packing pass (one OR per index).
#include <atomic>
#include <cstdint>
#include <type_traits>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "packing.h"

namespace edkm {

namespace {

constexpr int64_t kGrain = 1 << 13;  // chunks of eight indices per task

// Unsigned 64-bit view of an index: negative values become huge, so one `>> bits` test
// catches both ends of the range.
template <typename T>
inline uint64_t as_u64(T v) {
  return static_cast<uint64_t>(static_cast<int64_t>(v));
}

template <int Bits>
inline void store_bytes(uint8_t* dst, uint64_t acc) {
  for (int b = 0; b < Bits; ++b) dst[b] = static_cast<uint8_t>(acc >> (8 * b));
}

template <int Bits>
inline uint64_t load_bytes(const uint8_t* src) {
  uint64_t acc = 0;
  for (int b = 0; b < Bits; ++b) acc |= static_cast<uint64_t>(src[b]) << (8 * b);
  return acc;
}

// Returns true when every index lies in [0, 2^Bits).
template <int Bits, typename T>
bool pack_impl(const T* src, int64_t n, uint8_t* dst) {
  const int64_t full = n / 8;
  std::atomic<bool> bad{false};
  at::parallel_for(0, full, kGrain, [&](int64_t begin, int64_t end) {
    uint64_t over = 0;
    for (int64_t c = begin; c < end; ++c) {
      const T* s = src + c * 8;
      uint64_t acc = 0;
      for (int j = 0; j < 8; ++j) {
        const uint64_t v = as_u64(s[j]);
        over |= v;
        acc |= (v & ((uint64_t(1) << Bits) - 1)) << (j * Bits);
      }
      store_bytes<Bits>(dst + c * Bits, acc);
    }
    if (over >> Bits) bad = true;
  });
  const int64_t rest = n - full * 8;
  if (rest > 0) {
    uint64_t acc = 0, over = 0;
    for (int64_t j = 0; j < rest; ++j) {
      const uint64_t v = as_u64(src[full * 8 + j]);
      over |= v;
      acc |= (v & ((uint64_t(1) << Bits) - 1)) << (j * Bits);
    }
    uint8_t* d = dst + full * Bits;
    for (int64_t b = 0; b < (rest * Bits + 7) / 8; ++b) d[b] = static_cast<uint8_t>(acc >> (8 * b));
    if (over >> Bits) bad = true;
  }
  return !bad;
}

template <int Bits>
void unpack_impl(const uint8_t* src, int64_t count, uint8_t* dst) {
  constexpr uint64_t mask = (uint64_t(1) << Bits) - 1;
  const int64_t full = count / 8;
  at::parallel_for(0, full, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const uint64_t acc = load_bytes<Bits>(src + c * Bits);
      uint8_t* d = dst + c * 8;
      for (int j = 0; j < 8; ++j) d[j] = static_cast<uint8_t>((acc >> (j * Bits)) & mask);
    }
  });
  const int64_t rest = count - full * 8;
  if (rest > 0) {
    const uint8_t* s = src + full * Bits;
    uint64_t acc = 0;
    for (int64_t b = 0; b < (rest * Bits + 7) / 8; ++b) acc |= static_cast<uint64_t>(s[b]) << (8 * b);
    for (int64_t j = 0; j < rest; ++j) dst[full * 8 + j] = static_cast<uint8_t>((acc >> (j * Bits)) & mask);
  }
}

// Calls f(std::integral_constant<int, bits>) for bits in 1..8 (checked by the caller).
template <typename F>
void with_bits(int64_t bits, const F& f) {
  switch (bits) {
    case 1:
      f(std::integral_constant<int, 1>{});
      break;
    case 2:
      f(std::integral_constant<int, 2>{});
      break;
    case 3:
      f(std::integral_constant<int, 3>{});
      break;
    case 4:
      f(std::integral_constant<int, 4>{});
      break;
    case 5:
      f(std::integral_constant<int, 5>{});
      break;
    case 6:
      f(std::integral_constant<int, 6>{});
      break;
    case 7:
      f(std::integral_constant<int, 7>{});
      break;
    default:
      f(std::integral_constant<int, 8>{});
      break;
  }
}

at::Tensor pack_indices_cpu(const at::Tensor& indices, int64_t bits) {
  check_pack_args(indices, bits);
  auto idx = indices.contiguous();
  const int64_t n = idx.numel();
  auto out = at::empty({packed_bytes(n, bits)}, idx.options().dtype(at::kByte));
  if (n == 0) return out;
  uint8_t* dst = out.mutable_data_ptr<uint8_t>();
  bool ok = true;
  with_bits(bits, [&](auto b) {
    constexpr int B = decltype(b)::value;
    switch (idx.scalar_type()) {
      case at::kByte:
        ok = pack_impl<B>(idx.const_data_ptr<uint8_t>(), n, dst);
        break;
      case at::kChar:
        ok = pack_impl<B>(idx.const_data_ptr<int8_t>(), n, dst);
        break;
      case at::kShort:
        ok = pack_impl<B>(idx.const_data_ptr<int16_t>(), n, dst);
        break;
      case at::kInt:
        ok = pack_impl<B>(idx.const_data_ptr<int32_t>(), n, dst);
        break;
      default:
        ok = pack_impl<B>(idx.const_data_ptr<int64_t>(), n, dst);
        break;
    }
  });
  if (!ok) fail_index_range(indices, bits);
  return out;
}

at::Tensor unpack_indices_cpu(const at::Tensor& packed, int64_t bits, int64_t count) {
  check_unpack_args(packed, bits, count);
  auto src = packed.contiguous();
  auto out = at::empty({count}, src.options());
  if (count == 0) return out;
  const int64_t used = (count * bits) % 8;
  const uint8_t last = src.const_data_ptr<uint8_t>()[src.numel() - 1];
  if (used != 0 && (last >> used) != 0) fail_padding_bits(bits, count, last);
  with_bits(bits, [&](auto b) {
    unpack_impl<decltype(b)::value>(src.const_data_ptr<uint8_t>(), count, out.mutable_data_ptr<uint8_t>());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(edkm, CPU, m) {
  m.impl("pack_indices", &pack_indices_cpu);
  m.impl("unpack_indices", &unpack_indices_cpu);
}

}  // namespace edkm
