// CPU kernels of lut_linear / lut_embedding (contract in lut_linear.h). Everything accumulates in
// float32; the weight is never rebuilt as a whole.
//
// * Small batches (decode, up to kGemvMaxBatch = 16 rows of input): one pass over the packed
//   indices per block of up to 4 input rows. Eight indices at a time are unpacked into AVX2
//   lanes (one load, a variable shift, a mask), looked up in a LUT held in registers (K <= 64:
//   permutes and a tree of blends; larger K: a gather from the float LUT) and multiplied into
//   the accumulators. Decoding is memory-bound, so reading `bits` bits per weight instead of 16
//   is the point.
// * Larger batches (prefill): a tile of output rows is unpacked into a cache-sized float32
//   buffer (threads over rows), then one BLAS GEMM multiplies it (at::mm, multithreaded).
// * No AVX2, cluster_dim > 1, or float64: the scalar row decoder (or the generic ATen code for
//   float64), same results up to float32 summation order.
// Runtime dispatch: the AVX2 functions carry target attributes and run only when the CPU has
// AVX2 + FMA (checked once), as attention_avx2.cpp does. There is no AVX-512 variant yet: the
// machines this is developed and tested on have no AVX-512 to test it.
#include <algorithm>
#include <cstring>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../lut_linear.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define EDKM_LUT_X86 1
#define EDKM_AVX2 __attribute__((target("avx2,fma")))
#endif

namespace edkm {

namespace {

// The rows of input up to which the register GEMV runs (in blocks of up to 4); beyond, a tile
// of the weight is unpacked and BLAS does the multiply. Measured on one core (3-bit, 4096x4096):
// the GEMV takes 3.5 / 5.2 / 10.3 ms for 1 / 4 / 8 rows, the tiles 22 / 25 ms for 9 / 16 rows
// (unpacking alone costs about what one GEMV pass does), so the GEMV runs up to 16 rows.
constexpr int64_t kGemvMaxBatch = 16;
// Floats per unpacked tile (1 MiB): fits L2 with room for the input.
constexpr int64_t kTileFloats = int64_t(1) << 18;

// What a kernel needs of one packed weight, on the host.
struct Packed {
  const uint8_t* bytes = nullptr;
  int64_t nbytes = 0;
  const float* lut = nullptr;  // [G, K, d] float32
  LutWeight w;
  const int64_t* o_pos = nullptr;  // outliers: sorted flat positions and float32 values
  const float* o_val = nullptr;
  int64_t n_out = 0;
};

// Index j of the bit stream (a scalar read of at most two bytes).
inline uint32_t index_at(const Packed& p, int64_t j) {
  const int64_t bit = j * p.w.bits;
  const int64_t byte = bit >> 3;
  uint32_t two = p.bytes[byte];
  if (byte + 1 < p.nbytes) two |= uint32_t(p.bytes[byte + 1]) << 8;
  return (two >> (bit & 7)) & uint32_t(p.w.k - 1);
}

// The outliers of row r: [first, last) into o_pos.
inline std::pair<int64_t, int64_t> row_outliers(const Packed& p, int64_t r) {
  if (p.n_out == 0) return {0, 0};
  const int64_t lo = r * p.w.cols, hi = lo + p.w.cols;
  const int64_t a = std::lower_bound(p.o_pos, p.o_pos + p.n_out, lo) - p.o_pos;
  const int64_t b = std::lower_bound(p.o_pos + a, p.o_pos + p.n_out, hi) - p.o_pos;
  return {a, b};
}

// LUT value of flat element e (the weight before outliers).
inline float lut_value(const Packed& p, int64_t e) {
  const int64_t d = p.w.cluster_dim;
  const int64_t g = e / p.w.group_numel;
  return p.lut[(g * p.w.k + index_at(p, e / d)) * d + e % d];
}

// Row r of W into out[cols] (scalar; any bits, groups, cluster_dim).
void decode_row_scalar(const Packed& p, int64_t r, float* out) {
  const int64_t d = p.w.cluster_dim, cols = p.w.cols, base = r * cols;
  for (int64_t e = 0; e < cols; e += d) {
    const int64_t g = (base + e) / p.w.group_numel;
    const float* v = p.lut + (g * p.w.k + index_at(p, (base + e) / d)) * d;
    for (int64_t t = 0; t < d; ++t) out[e + t] = v[t];
  }
  const auto [a, b] = row_outliers(p, r);
  for (int64_t i = a; i < b; ++i) out[p.o_pos[i] - base] = p.o_val[i];
}

#if EDKM_LUT_X86

bool cpu_has_avx2_fma() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

bool avx2_available() {
  static const bool yes = cpu_has_avx2_fma();
  return yes;
}

// Eight consecutive indices starting at index j (cluster_dim 1) as int32 lanes, in order.
// Bits <= 3: the 8 indices and the first one's bit offset fit 31 bits of one 4-byte load, so
// a broadcast and one variable shift place them. Bits >= 4: an 8-byte load shifted to the first
// index's bit (8 * bits + offset <= 64: for 8 bits the offset is 0), broadcast to four 64-bit
// lanes; shifting by (0, 2, 4, 6) * bits and (1, 3, 5, 7) * bits puts the even and odd indices
// in the low halves, and one blend interleaves them. Loads past the stream's end read zeros.
template <int B>
struct Unpack8 {
  __m256i s0, s1, s32, mask;
  EDKM_AVX2 Unpack8() {
    s32 = _mm256_setr_epi32(0, B, 2 * B, 3 * B, 4 * B, 5 * B, 6 * B, 7 * B);
    if constexpr (B <= 3) {
      s0 = _mm256_setr_epi32(0, B, 2 * B, 3 * B, 4 * B, 5 * B, 6 * B, 7 * B);
      s1 = s0;
    } else {
      s0 = _mm256_setr_epi64x(0, 2 * B, 4 * B, 6 * B);
      s1 = _mm256_setr_epi64x(B, 3 * B, 5 * B, 7 * B);
    }
    mask = _mm256_set1_epi32((1 << B) - 1);
  }
  EDKM_AVX2 inline __m256i operator()(const uint8_t* bytes, int64_t nbytes, int64_t j) const {
    const int64_t bit = j * B;
    const int64_t byte = bit >> 3;
    if constexpr (B <= 3) {
      uint32_t v = 0;
      if (byte + 4 <= nbytes) {
        std::memcpy(&v, bytes + byte, 4);
      } else {  // the stream's last bytes (a loop, not a call: a call would spill the lanes)
        for (int64_t i = 0; byte + i < nbytes; ++i) v |= uint32_t(bytes[byte + i]) << (8 * i);
      }
      v >>= (bit & 7);
      const __m256i x = _mm256_set1_epi32(static_cast<int>(v));
      return _mm256_and_si256(_mm256_srlv_epi32(x, s0), mask);
    } else {
      if constexpr (B == 4) {
        // Eight 4-bit indices from an even index are exactly one aligned 32-bit word.
        if ((bit & 7) == 0 && byte + 4 <= nbytes) {
          uint32_t u;
          std::memcpy(&u, bytes + byte, 4);
          const __m256i x = _mm256_set1_epi32(static_cast<int>(u));
          return _mm256_and_si256(_mm256_srlv_epi32(x, s32), mask);
        }
      }
      uint64_t v = 0;
      if (byte + 8 <= nbytes) {
        std::memcpy(&v, bytes + byte, 8);
      } else {
        for (int64_t i = 0; byte + i < nbytes; ++i) v |= uint64_t(bytes[byte + i]) << (8 * i);
      }
      v >>= (bit & 7);
      const __m256i x = _mm256_set1_epi64x(static_cast<long long>(v));
      const __m256i even = _mm256_srlv_epi64(x, s0);
      const __m256i odd = _mm256_slli_epi64(_mm256_srlv_epi64(x, s1), 32);
      return _mm256_and_si256(_mm256_blend_epi32(even, odd, 0xAA), mask);
    }
  }
};

// The aligned fast path (every chunk of eight indices starts on a byte: row widths and group
// sizes multiples of 8): one 16-byte load serves C = 16 / bits chunks. A byte shuffle gives
// lane i of chunk u the two bytes that hold its index, a variable shift and a mask finish it:
// three vector instructions per chunk instead of a scalar load, shift and broadcast.
template <int B>
struct Window16 {
  static constexpr int C = 16 / B;
  __m256i shuf[C], shift, mask;
  EDKM_AVX2 Window16() {
    alignas(32) int8_t s[32];
    alignas(32) int32_t sh[8];
    for (int u = 0; u < C; ++u) {
      for (int i = 0; i < 8; ++i) {
        const int b0 = B * u + (B * i) / 8;  // the index's first byte in the window
        const int off = (i % 4) * 4 + (i / 4) * 16;
        s[off] = static_cast<int8_t>(b0);
        // The second byte, when inside the window (past it the index never reaches: C * B <= 16).
        s[off + 1] = static_cast<int8_t>(b0 + 1 < 16 ? b0 + 1 : -128);
        s[off + 2] = s[off + 3] = -128;  // zero
      }
      shuf[u] = _mm256_load_si256(reinterpret_cast<const __m256i*>(s));
    }
    for (int i = 0; i < 8; ++i) sh[i] = (B * i) % 8;
    shift = _mm256_load_si256(reinterpret_cast<const __m256i*>(sh));
    mask = _mm256_set1_epi32((1 << B) - 1);
  }
  EDKM_AVX2 inline __m256i load(const uint8_t* at) const {
    return _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(at)));
  }
  EDKM_AVX2 inline __m256i chunk(__m256i win, int u) const {
    const __m256i t = _mm256_srlv_epi32(_mm256_shuffle_epi8(win, shuf[u]), shift);
    // For 3-6 bits the lookup reads only the index's own bits (the permutes its low 3, the blend
    // tree bits 3-5 moved to the sign), so the bits above need no mask.
    if constexpr (B >= 3 && B <= 6) return t;
    return _mm256_and_si256(t, mask);
  }
};

// A group's LUT in registers (KC = 8, 16 or 32 entries) or gathered from memory (KC = 0).
template <int KC>
struct Lookup {
  __m256 r[KC == 0 ? 1 : KC / 8];
  const float* table = nullptr;
  EDKM_AVX2 void load(const float* lut, int64_t k) {
    table = lut;
    if constexpr (KC == 0) {
      (void)k;
    } else {
      alignas(32) float pad[KC] = {};
      for (int64_t i = 0; i < k; ++i) pad[i] = lut[i];
      for (int i = 0; i < KC / 8; ++i) r[i] = _mm256_load_ps(pad + 8 * i);
    }
  }
  EDKM_AVX2 inline __m256 operator()(__m256i idx) const {
    if constexpr (KC == 8) {
      return _mm256_permutevar8x32_ps(r[0], idx);
    } else if constexpr (KC == 16) {
      const __m256 a = _mm256_permutevar8x32_ps(r[0], idx);
      const __m256 b = _mm256_permutevar8x32_ps(r[1], idx);
      return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
    } else if constexpr (KC == 32 || KC == 64) {
      // A tree of blends on index bits 3, 4 (and 5) over the eight-entry permutes.
      const __m256 sel3 = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28));
      const __m256 sel4 = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 27));
      __m256 q[KC / 32];
      for (int h = 0; h < KC / 32; ++h) {
        const __m256 a = _mm256_blendv_ps(_mm256_permutevar8x32_ps(r[4 * h], idx),
                                          _mm256_permutevar8x32_ps(r[4 * h + 1], idx), sel3);
        const __m256 b = _mm256_blendv_ps(_mm256_permutevar8x32_ps(r[4 * h + 2], idx),
                                          _mm256_permutevar8x32_ps(r[4 * h + 3], idx), sel3);
        q[h] = _mm256_blendv_ps(a, b, sel4);
      }
      if constexpr (KC == 32) {
        return q[0];
      } else {
        return _mm256_blendv_ps(q[0], q[1], _mm256_castsi256_ps(_mm256_slli_epi32(idx, 26)));
      }
    } else {
      return _mm256_i32gather_ps(table, idx, 4);
    }
  }
};

EDKM_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// y[m, r] for m < M and rows [r0, r1): x is [M, cols] (row stride ldx), y is [M, rows] (ldy).
// cluster_dim 1. Each row is cut where its group changes; whole blocks of 8 run in lanes, the
// few columns before a group boundary or the row end run scalar.
template <int B>
constexpr int lut_regs() {
  return B <= 3 ? 8 : B == 4 ? 16 : B == 5 ? 32 : B == 6 ? 64 : 0;
}

template <int M, int B>
EDKM_AVX2 void gemv_rows(const Packed& p, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t r0,
                         int64_t r1) {
  constexpr int KC = lut_regs<B>();
  const int64_t cols = p.w.cols, gn = p.w.group_numel, k = p.w.k, nb = p.nbytes;
  const uint8_t* bytes = p.bytes;
  const Unpack8<B> unpack;
  const Window16<B> window;
  const bool aligned = cols % 8 == 0 && gn % 8 == 0;
  Lookup<KC> look;
  int64_t loaded = -1;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t base = r * cols;
    // U independent accumulator sets per input row hide the FMA latency (4 cycles) when M is
    // small: one chain per row would cap a core at one block of 8 per 4 cycles.
    constexpr int U = M >= 3 ? 1 : 4 / M;
    __m256 acc[U][M];
    float tail[M];
#pragma GCC unroll 4
    for (int m = 0; m < M; ++m) {
#pragma GCC unroll 4
      for (int u = 0; u < U; ++u) acc[u][m] = _mm256_setzero_ps();
      tail[m] = 0.f;
    }
    int64_t c = 0;
    while (c < cols) {
      const int64_t g = (base + c) / gn;
      const int64_t end = std::min(cols, (g + 1) * gn - base);
      if (g != loaded) {
        look.load(p.lut + g * k, k);
        loaded = g;
      }
      if (aligned) {
        constexpr int C = Window16<B>::C;
        for (; c + 8 * C <= end && (base + c) * B / 8 + 16 <= nb; c += 8 * C) {
          const __m256i win = window.load(bytes + (base + c) * B / 8);
#pragma GCC unroll 16
          for (int u = 0; u < C; ++u) {
            const __m256 w = look(window.chunk(win, u));
#pragma GCC unroll 4
            for (int m = 0; m < M; ++m) {
              acc[u % U][m] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + m * ldx + c + 8 * u), acc[u % U][m]);
            }
          }
        }
      }
      for (; c + 8 * U <= end; c += 8 * U) {
#pragma GCC unroll 4
        for (int u = 0; u < U; ++u) {
          const __m256 w = look(unpack(bytes, nb, base + c + 8 * u));
#pragma GCC unroll 4
          for (int m = 0; m < M; ++m) {
            acc[u][m] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + m * ldx + c + 8 * u), acc[u][m]);
          }
        }
      }
      for (; c + 8 <= end; c += 8) {
        const __m256 w = look(unpack(bytes, nb, base + c));
#pragma GCC unroll 4
        for (int m = 0; m < M; ++m) {
          acc[0][m] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + m * ldx + c), acc[0][m]);
        }
      }
      for (; c < end; ++c) {
        const float w = p.lut[g * k + index_at(p, base + c)];
#pragma GCC unroll 4
        for (int m = 0; m < M; ++m) tail[m] += w * x[m * ldx + c];
      }
    }
    const auto [a, b] = row_outliers(p, r);
    for (int64_t i = a; i < b; ++i) {
      const int64_t col = p.o_pos[i] - base;
      const float delta = p.o_val[i] - lut_value(p, p.o_pos[i]);
#pragma GCC unroll 4
      for (int m = 0; m < M; ++m) tail[m] += delta * x[m * ldx + col];
    }
#pragma GCC unroll 4
    for (int m = 0; m < M; ++m) {
      __m256 sum = acc[0][m];
#pragma GCC unroll 4
      for (int u = 1; u < U; ++u) sum = _mm256_add_ps(sum, acc[u][m]);
      y[m * ldy + r] = hsum(sum) + tail[m];
    }
  }
}

// Row r of W into out[cols] (cluster_dim 1, lanes of 8).
template <int B>
EDKM_AVX2 void decode_row_avx2(const Packed& p, int64_t r, float* out) {
  constexpr int KC = lut_regs<B>();
  const int64_t cols = p.w.cols, gn = p.w.group_numel, k = p.w.k, base = r * cols;
  const Unpack8<B> unpack;
  const Window16<B> window;
  const bool aligned = cols % 8 == 0 && gn % 8 == 0;
  Lookup<KC> look;
  int64_t c = 0;
  while (c < cols) {
    const int64_t g = (base + c) / gn;
    const int64_t end = std::min(cols, (g + 1) * gn - base);
    look.load(p.lut + g * k, k);
    if (aligned) {
      constexpr int C = Window16<B>::C;
      for (; c + 8 * C <= end && (base + c) * B / 8 + 16 <= p.nbytes; c += 8 * C) {
        const __m256i win = window.load(p.bytes + (base + c) * B / 8);
#pragma GCC unroll 16
        for (int u = 0; u < C; ++u) _mm256_storeu_ps(out + c + 8 * u, look(window.chunk(win, u)));
      }
    }
    for (; c + 8 <= end; c += 8) _mm256_storeu_ps(out + c, look(unpack(p.bytes, p.nbytes, base + c)));
    for (; c < end; ++c) out[c] = p.lut[g * k + index_at(p, base + c)];
  }
  const auto [a, b] = row_outliers(p, r);
  for (int64_t i = a; i < b; ++i) out[p.o_pos[i] - base] = p.o_val[i];
}

template <typename F>
void with_bits(int64_t bits, F&& f) {
  switch (bits) {
    case 1:
      return f(std::integral_constant<int, 1>{});
    case 2:
      return f(std::integral_constant<int, 2>{});
    case 3:
      return f(std::integral_constant<int, 3>{});
    case 4:
      return f(std::integral_constant<int, 4>{});
    case 5:
      return f(std::integral_constant<int, 5>{});
    case 6:
      return f(std::integral_constant<int, 6>{});
    case 7:
      return f(std::integral_constant<int, 7>{});
    default:
      return f(std::integral_constant<int, 8>{});
  }
}

#else
bool avx2_available() { return false; }
#endif  // EDKM_LUT_X86

bool fast_path(const Packed& p) { return avx2_available() && p.w.cluster_dim == 1; }

void decode_row(const Packed& p, int64_t r, float* out) {
#if EDKM_LUT_X86
  if (fast_path(p)) {
    with_bits(p.w.bits, [&](auto b) { decode_row_avx2<decltype(b)::value>(p, r, out); });
    return;
  }
#endif
  decode_row_scalar(p, r, out);
}

// Rows per parallel task: at least ~32k weights each.
int64_t row_grain(const LutWeight& w) { return std::max<int64_t>(1, (int64_t(1) << 15) / w.cols); }

// y [M, rows] = x [M, cols] W^T by the row-at-a-time path (small M).
void gemv(const Packed& p, const float* x, int64_t m_rows, float* y) {
  const int64_t cols = p.w.cols, rows = p.w.rows;
  at::parallel_for(0, rows, row_grain(p.w), [&](int64_t r0, int64_t r1) {
#if EDKM_LUT_X86
    if (fast_path(p)) {
      for (int64_t m0 = 0; m0 < m_rows; m0 += 4) {
        const int64_t mb = std::min<int64_t>(4, m_rows - m0);
        const float* xb = x + m0 * cols;
        float* yb = y + m0 * rows;
        with_bits(p.w.bits, [&](auto b) {
          constexpr int B = decltype(b)::value;
          switch (mb) {
            case 1:
              return gemv_rows<1, B>(p, xb, cols, yb, rows, r0, r1);
            case 2:
              return gemv_rows<2, B>(p, xb, cols, yb, rows, r0, r1);
            case 3:
              return gemv_rows<3, B>(p, xb, cols, yb, rows, r0, r1);
            default:
              return gemv_rows<4, B>(p, xb, cols, yb, rows, r0, r1);
          }
        });
      }
      return;
    }
#endif
    std::vector<float> row(static_cast<size_t>(cols));
    for (int64_t r = r0; r < r1; ++r) {
      decode_row_scalar(p, r, row.data());
      for (int64_t m = 0; m < m_rows; ++m) {
        const float* xm = x + m * cols;
        float s = 0.f;
        for (int64_t c = 0; c < cols; ++c) s += row[c] * xm[c];
        y[m * rows + r] = s;
      }
    }
  });
}

// y [M, rows] = x [M, cols] W^T by unpacked tiles + BLAS (large M).
void tiled(const Packed& p, const at::Tensor& x, at::Tensor& y) {
  const int64_t cols = p.w.cols, rows = p.w.rows;
  const int64_t tile = std::clamp<int64_t>(kTileFloats / cols, 8, rows);
  auto buf = at::empty({tile, cols}, x.options());
  float* b = buf.data_ptr<float>();
  for (int64_t r0 = 0; r0 < rows; r0 += tile) {
    const int64_t n = std::min(tile, rows - r0);
    at::parallel_for(0, n, std::max<int64_t>(1, row_grain(p.w) / 4), [&](int64_t a, int64_t e) {
      for (int64_t i = a; i < e; ++i) decode_row(p, r0 + i, b + i * cols);
    });
    y.narrow(1, r0, n).copy_(at::mm(x, buf.narrow(0, 0, n).t()));
  }
}

// The weight's host view; keeps the converted tensors alive in `keep`.
Packed make_packed(const char* op, const at::Tensor& packed, const at::Tensor& lut, const LutWeight& w,
                   const std::optional<at::Tensor>& oi, const std::optional<at::Tensor>& ov,
                   std::vector<at::Tensor>& keep) {
  Packed p;
  keep.push_back(packed.contiguous());
  p.bytes = keep.back().data_ptr<uint8_t>();
  p.nbytes = keep.back().numel();
  keep.push_back(lut.to(at::kFloat).contiguous());
  p.lut = keep.back().data_ptr<float>();
  p.w = w;
  if (oi.has_value() && oi->defined() && oi->numel() > 0) {
    keep.push_back(oi->to(at::kLong).contiguous());
    p.o_pos = keep.back().data_ptr<int64_t>();
    keep.push_back(ov->to(at::kFloat).contiguous());
    p.o_val = keep.back().data_ptr<float>();
    p.n_out = oi->numel();
  }
  check_lut_values_host(op, w, p.lut, p.o_pos, p.o_val, p.n_out);
  return p;
}

at::Tensor lut_linear_cpu(const at::Tensor& input, const at::Tensor& packed, const at::Tensor& lut,
                          int64_t bits, int64_t out_features, const std::optional<at::Tensor>& bias,
                          const std::optional<at::Tensor>& outlier_index,
                          const std::optional<at::Tensor>& outlier_values) {
  TORCH_CHECK_VALUE(input.defined(), "lut_linear: input must be a tensor, got None");
  if (input.scalar_type() == at::kDouble) {
    return generic::lut_linear(input, packed, lut, bits, out_features, bias, outlier_index, outlier_values);
  }
  const char* op = "lut_linear";
  const auto w = check_lut_weight(op, packed, lut, bits, out_features, input.dim() >= 1 ? input.size(-1) : 0,
                                  outlier_index, outlier_values, /*check_values=*/false);
  check_lut_linear_input(input, w, bias);
  std::vector<at::Tensor> keep;
  const Packed p = make_packed(op, packed, lut, w, outlier_index, outlier_values, keep);
  auto x = lut_linear_rows(input, w);
  const int64_t m = x.size(0);
  auto y = at::empty({m, w.rows}, x.options());
  if (m > 0) {
    if (m <= kGemvMaxBatch) {
      gemv(p, x.data_ptr<float>(), m, y.data_ptr<float>());
    } else {
      tiled(p, x, y);
    }
  }
  return lut_linear_output(y, bias, input);
}

at::Tensor lut_embedding_cpu(const at::Tensor& indices, const at::Tensor& packed, const at::Tensor& lut,
                             int64_t bits, int64_t num_embeddings, int64_t embedding_dim,
                             const std::optional<at::Tensor>& outlier_index,
                             const std::optional<at::Tensor>& outlier_values,
                             std::optional<at::ScalarType> dtype) {
  const auto out_t = dtype.value_or(lut.scalar_type());
  if (out_t == at::kDouble) {
    return generic::lut_embedding(indices, packed, lut, bits, num_embeddings, embedding_dim, outlier_index,
                                  outlier_values, dtype);
  }
  const char* op = "lut_embedding";
  const auto w = check_lut_weight(op, packed, lut, bits, num_embeddings, embedding_dim, outlier_index,
                                  outlier_values, /*check_values=*/false);
  TORCH_CHECK_TYPE(out_t == at::kFloat || out_t == at::kHalf || out_t == at::kBFloat16,
                   "lut_embedding: dtype must be a floating type, got ", out_t);
  TORCH_CHECK_VALUE(indices.defined(), op, ": indices must be a tensor, got None");
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kInt || indices.scalar_type() == at::kLong, op,
                   ": indices must be int32 or int64, got ", indices.scalar_type());
  std::vector<at::Tensor> keep;
  const Packed p = make_packed(op, packed, lut, w, outlier_index, outlier_values, keep);
  auto ids = indices.reshape(-1).to(at::kLong).contiguous();
  const int64_t n = ids.numel();
  auto out = at::empty({n, w.cols}, lut.options().dtype(at::kFloat));
  const int64_t* id = ids.data_ptr<int64_t>();
  if (n > 0) {
    const auto [lo, hi] = std::minmax_element(id, id + n);
    TORCH_CHECK_INDEX(*lo >= 0 && *hi < w.rows, op,
                      ": indices must lie in [0, num_embeddings) = "
                      "[0, ",
                      w.rows, "), got values in [", *lo, ", ", *hi, "]");
  }
  float* o = out.data_ptr<float>();
  at::parallel_for(0, n, std::max<int64_t>(1, row_grain(w) / 4), [&](int64_t a, int64_t e) {
    for (int64_t i = a; i < e; ++i) decode_row(p, id[i], o + i * w.cols);
  });
  auto sizes = indices.sizes().vec();
  sizes.push_back(w.cols);
  return out.to(out_t).view(sizes);
}

}  // namespace

TORCH_LIBRARY_IMPL(edkm, CPU, m) {
  m.impl("lut_linear", &lut_linear_cpu);
  m.impl("lut_embedding", &lut_embedding_cpu);
}

}  // namespace edkm
