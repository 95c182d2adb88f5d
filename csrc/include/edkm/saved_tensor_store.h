// eDKM's saved-tensor store (docs/DESIGN.md section 3): what autograd saves for backward is offloaded
// to host memory (M), deduplicated by storage and version, and optionally uniquified (U: a
// table of distinct values or rows plus the narrowest index that fits). Any autograd graph can
// use it through saved-tensor hooks (Python: edkm.saved_tensors()).
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <unordered_map>

#include <ATen/core/Tensor.h>

namespace edkm {

struct StoreOptions {
  bool offload = true;          // copy to host at pack (pinned, non-blocking from CUDA)
  bool dedup = true;            // one copy per (storage, version); views are geometry only
  bool uniquify = false;        // distinct values / rows + index, when that is smaller
  bool keep_parameters = true;  // leaves that require grad (and views of them) are referenced
};

struct StoreCounters {
  int64_t packed = 0;                  // tensors packed
  int64_t device_bytes = 0;            // bytes held on a device by live entries
  int64_t host_bytes = 0;              // bytes held in host memory by live entries
  int64_t referenced_bytes = 0;        // parameters (or views of them) kept by reference
  int64_t dedup_hits = 0;              // packs served by an existing copy
  int64_t dedup_bytes_avoided = 0;     // bytes those hits did not copy
  int64_t uniquify_bytes_avoided = 0;  // raw bytes minus table + index bytes
  int64_t shard_bytes_avoided = 0;     // index bytes other ranks keep (sharding)
};

class SavedTensorStore {
 public:
  explicit SavedTensorStore(StoreOptions options = {});
  ~SavedTensorStore();

  // Stores `tensor` and returns a handle for unpack/release.
  int64_t pack(const at::Tensor& tensor);
  // The saved tensor, on its original device with its dtype, shape, strides and requires_grad.
  at::Tensor unpack(int64_t handle);
  // Forgets a handle (its copy is freed when no other handle shares it).
  void release(int64_t handle);

  // Sharding across L ranks that all saved the same tensor (the caller runs the collectives):
  // fingerprint() describes the handle's payload (the index of a uniquified copy, else the raw
  // bytes) as int64 [shardable, numel, element size, hash] so ranks can check they agree;
  // shard() keeps this rank's 1/L of the payload; shard_part() is that part padded to the
  // common chunk length; unshard() puts back the all-gathered payload before unpack.
  at::Tensor fingerprint(int64_t handle);
  void shard(int64_t handle, int64_t rank, int64_t world);
  bool is_sharded(int64_t handle) const;
  at::Tensor shard_part(int64_t handle);
  void unshard(int64_t handle, const at::Tensor& gathered);

  StoreCounters counters() const;
  int64_t live_handles() const;
  const StoreOptions& options() const { return options_; }

  struct Blob;
  struct Entry;

 private:
  StoreOptions options_;
  mutable std::mutex mutex_;
  int64_t next_handle_ = 1;
  std::unordered_map<int64_t, std::shared_ptr<Entry>> entries_;
  struct KeyHash {
    size_t operator()(const std::pair<const void*, uint32_t>& k) const;
  };
  std::unordered_map<std::pair<const void*, uint32_t>, std::weak_ptr<Blob>, KeyHash> by_storage_;
  StoreCounters counters_;
};

}  // namespace edkm
