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

}  // namespace edkm
