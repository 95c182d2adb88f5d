#include "settings.h"

#include <atomic>

#include <ATen/Context.h>

namespace edkm {

namespace {
std::atomic<bool> g_deterministic_scatter{true};
std::atomic<bool> g_fused_udomain{true};
std::atomic<bool> g_fused_udomain_cuda{false};
}

void set_fused_udomain_cuda(bool fused) { g_fused_udomain_cuda = fused; }

bool fused_udomain_cuda() { return g_fused_udomain_cuda; }

void set_fused_udomain(bool fused) { g_fused_udomain = fused; }

bool fused_udomain() { return g_fused_udomain; }

void set_deterministic_scatter(bool deterministic) { g_deterministic_scatter = deterministic; }

bool deterministic_scatter() {
  return g_deterministic_scatter || at::globalContext().deterministicAlgorithms();
}

}  // namespace edkm
