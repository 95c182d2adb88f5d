#include "settings.h"

#include <atomic>

#include <ATen/Context.h>

namespace edkm {

namespace {
std::atomic<bool> g_deterministic_scatter{true};
std::atomic<bool> g_fused_udomain{true};
std::atomic<bool> g_fused_udomain_cuda{false};
std::atomic<bool> g_privatized_slot_atomics{false};
std::atomic<NDomainMode> g_ndomain_mode{NDomainMode::kAuto};
std::atomic<bool> g_simd_attention{true};
thread_local bool t_slot_table_trusted = false;
}  // namespace

void set_privatized_slot_atomics(bool privatized) { g_privatized_slot_atomics = privatized; }

bool privatized_slot_atomics() { return g_privatized_slot_atomics; }

TrustedSlotTable::TrustedSlotTable() : previous_(t_slot_table_trusted) { t_slot_table_trusted = true; }

TrustedSlotTable::~TrustedSlotTable() { t_slot_table_trusted = previous_; }

bool slot_table_trusted() { return t_slot_table_trusted; }

void set_fused_udomain_cuda(bool fused) { g_fused_udomain_cuda = fused; }

bool fused_udomain_cuda() { return g_fused_udomain_cuda; }

void set_ndomain_mode(NDomainMode mode) { g_ndomain_mode = mode; }

NDomainMode ndomain_mode() { return g_ndomain_mode; }

void set_simd_attention(bool simd) { g_simd_attention = simd; }

bool simd_attention() { return g_simd_attention; }

void set_fused_udomain(bool fused) { g_fused_udomain = fused; }

bool fused_udomain() { return g_fused_udomain; }

void set_deterministic_scatter(bool deterministic) { g_deterministic_scatter = deterministic; }

bool deterministic_scatter() {
  return g_deterministic_scatter || at::globalContext().deterministicAlgorithms();
}

}  // namespace edkm
