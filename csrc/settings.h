// Process-wide settings of the kernels (exposed to Python by edkm._C).
#pragma once

namespace edkm {

// CUDA scatter-add of dkm's backward: deterministic (fixed-point integer atomics: the same bits
// on every run) or fast (float64 atomics, order-dependent rounding). Default: deterministic.
// torch.use_deterministic_algorithms(True) forces the deterministic kernel.
void set_deterministic_scatter(bool deterministic);
bool deterministic_scatter();

// U-domain iterations on CPU: fused loops (csrc/cpu/udomain_kernel.cpp, the default) or the
// composition of ATen ops that every device runs (udomain.cpp). The switch exists so tests can
// compare the two.
void set_fused_udomain(bool fused);
bool fused_udomain();

// U-domain iterations on CUDA: the kernels of cuda/udomain_kernels.cu (a few launches, no host
// sync) or the ATen composition (the default until those kernels have run on a GPU).
void set_fused_udomain_cuda(bool fused);
bool fused_udomain_cuda();

// Which domain dkm and dkm_linear iterate in on CPU: "auto" (the N-domain for groups of at most
// ndomain.h's ndomain_max_group(dtype) weights, the U-domain otherwise), "always" N-domain, "never"
// (always the U-domain). Other devices always take the U-domain.
enum class NDomainMode { kAuto, kAlways, kNever };
void set_ndomain_mode(NDomainMode mode);
NDomainMode ndomain_mode();

// The attention passes of the CPU N-domain and fused U-domain loops for float32 / bfloat16 /
// float16 weights (compute dtype float32): float32 AVX2 kernels (cpu/attention_avx2.cpp, the
// default where the CPU has AVX2 and FMA) or the scalar float64 loops (always for float64
// weights). The switch exists so tests can compare the two.
void set_simd_attention(bool simd);
bool simd_attention();

// CUDA slot histogram and gradient scatter-add (cuda/slot_privatized.cuh): per-block
// shared-memory histograms and warp-aggregated atomics, with the deterministic scatter's scale
// found on the device (no host sync), or one global atomic per weight (the default until the
// privatized kernels have run on a GPU).
void set_privatized_slot_atomics(bool privatized);
bool privatized_slot_atomics();

// Marks, for the current thread while it lives, that the slot passes it runs use a slot table
// known to hold every value of their weight: dkm's forward gather (the table was just built
// from that weight) and its backward gradient pass (the scatter-add before it checked the same
// weight). CUDA kernels then skip reading their missing-slot flag back, a host sync per pass.
class TrustedSlotTable {
 public:
  TrustedSlotTable();
  ~TrustedSlotTable();
  TrustedSlotTable(const TrustedSlotTable&) = delete;
  TrustedSlotTable& operator=(const TrustedSlotTable&) = delete;

 private:
  bool previous_;
};
bool slot_table_trusted();

}  // namespace edkm
