#include <edkm/saved_tensor_store.h>

#include <optional>

#include <ATen/ATen.h>
#include <c10/core/Event.h>
#include <c10/core/StorageImpl.h>
#include <c10/core/impl/VirtualGuardImpl.h>

namespace edkm {

namespace {

// Integer dtype with the same element size, to compare and hash values bit for bit.
at::ScalarType bits_dtype(const at::Tensor& t) {
  switch (t.element_size()) {
    case 1:
      return at::kByte;
    case 2:
      return at::kShort;
    case 4:
      return at::kInt;
    default:
      return at::kLong;
  }
}

at::ScalarType index_dtype_for(int64_t distinct) {
  if (distinct <= 256) return at::kByte;
  if (distinct <= 32768) return at::kShort;
  return at::kInt;
}

at::Tensor storage_bytes(const at::Tensor& t) {
  return at::empty({0}, t.options().dtype(at::kByte))
      .set_(t.storage(), 0, {static_cast<int64_t>(t.storage().nbytes())}, {1});
}

}  // namespace

struct SavedTensorStore::Blob {
  at::Tensor bytes;         // raw: the storage's bytes, uint8 [nbytes]
  at::Tensor table, index;  // uniquified: distinct rows (as integers) and one index per row
  at::ScalarType dtype = at::kByte;
  int64_t numel = 0;   // uniquified: elements of the storage
  int64_t nbytes = 0;  // bytes of the original storage
  c10::Device device{at::kCPU};
  std::optional<c10::weak_intrusive_ptr<c10::StorageImpl>> source;    // keeps the dedup key unique
  std::optional<c10::weak_intrusive_ptr<c10::StorageImpl>> restored;  // unpack cache
  // Sharding: this rank keeps payload elements [shard_start, shard_start + shard_chunk).
  bool sharded = false;
  int64_t full_len = 0, shard_start = 0, shard_chunk = 0;

  // Set while an asynchronous device-to-host copy into this blob may still be running.
  std::shared_ptr<c10::Event> copying;

  at::Tensor& payload() { return bytes.defined() ? bytes : index; }

  // Host copy of t: pinned + non-blocking from a GPU (an event marks its end), a clone on CPU.
  at::Tensor to_host(const at::Tensor& t) {
    if (t.device().is_cpu()) return t.clone();
    auto host = at::empty(t.sizes(), t.options().device(at::kCPU).pinned_memory(true));
    host.copy_(t, /*non_blocking=*/true);
    c10::impl::VirtualGuardImpl impl(t.device().type());
    copying = std::make_shared<c10::Event>(t.device().type());
    copying->record(impl.getStream(t.device()));
    return host;
  }

  // Before the host reads a host copy.
  void wait_for_copy() {
    if (copying) {
      copying->synchronize();
      copying.reset();
    }
  }

  int64_t held_bytes() const {
    if (bytes.defined()) return bytes.nbytes();
    return table.nbytes() + index.nbytes();
  }
  bool on_host() const { return (bytes.defined() ? bytes : table).device().is_cpu(); }

  c10::Storage restore() {
    TORCH_CHECK(!sharded, "saved_tensors: a sharded tensor must be unsharded (all-gathered) before unpack");
    if (restored) {
      if (auto alive = restored->lock()) return c10::Storage(std::move(alive));
    }
    wait_for_copy();
    at::Tensor flat;
    if (bytes.defined()) {
      flat = bytes.to(device, /*non_blocking=*/true);
      // Never hand out the store's own buffer: a caller writing into what it unpacked
      // would change every later unpack.
      if (flat.is_alias_of(bytes)) flat = flat.clone();
    } else {
      auto rows = table.index_select(0, index.to(table.device(), at::kLong));
      flat = rows.view(dtype).reshape({-1}).to(device, /*non_blocking=*/true);
    }
    c10::Storage storage = flat.storage();
    restored = storage.getWeakStorageImpl();
    return storage;
  }
};

struct SavedTensorStore::Entry {
  std::shared_ptr<Blob> blob;  // null for referenced tensors
  at::Tensor referenced;       // parameters, or everything when nothing is copied
  uint32_t version = 0;
  bool check_version = false;
  at::ScalarType dtype;
  std::vector<int64_t> sizes, strides;
  int64_t offset = 0;
  c10::Device device{at::kCPU};
  bool requires_grad = false;
  bool parameter = false;  // referenced because it is (a view of) a parameter
};

size_t SavedTensorStore::KeyHash::operator()(const std::pair<const void*, uint32_t>& k) const {
  return std::hash<const void*>()(k.first) ^ (static_cast<size_t>(k.second) * 0x9E3779B97F4A7C15ull);
}

SavedTensorStore::SavedTensorStore(StoreOptions options) : options_(options) {}
SavedTensorStore::~SavedTensorStore() = default;

namespace {

// Distinct values (row = 1) or rows (the last dimension, when <= 1024) of a contiguous tensor
// that fills its storage, compared bit for bit; nothing when that would not be smaller.
bool uniquify_into(const at::Tensor& t, SavedTensorStore::Blob& blob, bool offload) {
  if (!t.is_floating_point() || t.numel() == 0) return false;
  const int64_t row = (t.dim() >= 2 && t.size(-1) <= 1024) ? t.size(-1) : 1;
  auto bits = t.reshape({-1, row}).view(bits_dtype(t));
  const int64_t n = bits.size(0);
  at::Tensor table, inverse;
  if (row == 1) {
    auto [uniq, inv, counts] = at::_unique2(bits.view(-1), /*sorted=*/false, /*return_inverse=*/true);
    table = uniq.view({-1, 1});
    inverse = inv;
  } else {
    // Hash each row, take distinct hashes, then check the rows really are equal per hash.
    auto wide = bits.to(at::kLong);
    auto weights = at::arange(1, row + 1, wide.options()).mul_(0x100000001B3LL).bitwise_xor_(0x5bd1e995);
    auto hash = (wide * weights).sum(1);
    auto [uniq, inv, counts] = at::_unique2(hash, /*sorted=*/false, /*return_inverse=*/true);
    auto first = at::empty({uniq.size(0)}, inv.options()).scatter_(0, inv, at::arange(n, inv.options()));
    table = bits.index_select(0, first);
    if (!at::equal(table.index_select(0, inv), bits)) return false;  // hash collision
    inverse = inv;
  }
  const int64_t distinct = table.size(0);
  const auto idx_dtype = index_dtype_for(distinct);
  const int64_t packed = table.nbytes() + n * static_cast<int64_t>(c10::elementSize(idx_dtype));
  if (packed >= t.nbytes()) return false;
  auto index = inverse.to(idx_dtype);
  blob.table = offload ? blob.to_host(table) : table;
  blob.index = offload ? blob.to_host(index) : index;
  blob.dtype = t.scalar_type();
  blob.numel = t.numel();
  return true;
}

}  // namespace

int64_t SavedTensorStore::pack(const at::Tensor& tensor) {
  TORCH_CHECK_VALUE(tensor.defined(), "saved_tensors: cannot pack an undefined tensor");
  std::lock_guard<std::mutex> lock(mutex_);
  auto entry = std::make_shared<Entry>();
  entry->dtype = tensor.scalar_type();
  entry->sizes = tensor.sizes().vec();
  entry->strides = tensor.strides().vec();
  entry->offset = tensor.storage_offset();
  entry->device = tensor.device();
  entry->requires_grad = tensor.requires_grad();
  ++counters_.packed;
  const int64_t handle = next_handle_++;

  const bool inference = tensor.is_inference();
  // A parameter, or a view of one (F.linear saves weight.t()): kept alive by its module anyway.
  const at::TensorBase& root = tensor.is_view() ? tensor._base() : static_cast<const at::TensorBase&>(tensor);
  const bool parameter = root.is_leaf() && root.requires_grad();
  const bool copy = options_.offload || options_.uniquify;
  if ((parameter && options_.keep_parameters) || !copy || !tensor.has_storage()) {
    // Kept as autograd would keep it; versions checked at unpack as autograd does.
    entry->referenced = tensor;
    entry->check_version = !inference;
    if (!inference) entry->version = tensor._version();
    entry->parameter = parameter && options_.keep_parameters;
    entries_.emplace(handle, std::move(entry));
    return handle;
  }

  const c10::Storage& storage = tensor.storage();
  const std::pair<const void*, uint32_t> key{storage.unsafeGetStorageImpl(),
                                             inference ? 0u : static_cast<uint32_t>(tensor._version())};
  const bool keyed = options_.dedup && !inference;
  if (keyed) {
    auto it = by_storage_.find(key);
    if (it != by_storage_.end()) {
      if (auto blob = it->second.lock()) {
        entry->blob = std::move(blob);
        ++counters_.dedup_hits;
        counters_.dedup_bytes_avoided += tensor.nbytes();
        entries_.emplace(handle, std::move(entry));
        return handle;
      }
      by_storage_.erase(it);
    }
  }

  auto blob = std::make_shared<Blob>();
  blob->device = tensor.device();
  blob->nbytes = static_cast<int64_t>(storage.nbytes());
  const bool fills_storage = tensor.is_contiguous() && tensor.storage_offset() == 0 &&
                             tensor.nbytes() == static_cast<size_t>(blob->nbytes);
  bool registered = false;
  if (options_.uniquify && fills_storage && uniquify_into(tensor, *blob, options_.offload)) {
    counters_.uniquify_bytes_avoided += blob->nbytes - blob->held_bytes();
    registered = true;
  } else if (2 * tensor.nbytes() >= static_cast<size_t>(blob->nbytes)) {
    // The whole storage once; this tensor and any other view of it are geometry on top.
    auto bytes = storage_bytes(tensor);
    blob->bytes = options_.offload ? blob->to_host(bytes) : bytes.clone();
    registered = true;
  } else {
    // A small view of a large storage: copy just the view.
    auto compact = tensor.contiguous();
    if (compact.is_same(tensor)) compact = tensor.clone();
    blob->bytes = options_.offload ? blob->to_host(storage_bytes(compact)) : storage_bytes(compact);
    blob->nbytes = static_cast<int64_t>(compact.storage().nbytes());
    entry->strides = compact.strides().vec();
    entry->offset = 0;
  }
  if (registered && keyed) {
    blob->source = storage.getWeakStorageImpl();
    by_storage_[key] = blob;
  }
  entry->blob = std::move(blob);
  entries_.emplace(handle, std::move(entry));
  return handle;
}

at::Tensor SavedTensorStore::unpack(int64_t handle) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = entries_.find(handle);
  TORCH_CHECK_VALUE(it != entries_.end(), "saved_tensors: unknown or released handle ", handle,
                    " (was the graph already freed, or the store cleared?)");
  Entry& e = *it->second;
  if (!e.blob) {
    TORCH_CHECK(!e.check_version || e.referenced._version() == e.version,
                "saved_tensors: a tensor needed for gradient computation has been modified by an "
                "inplace operation after it was saved (version ",
                e.referenced._version(), ", expected ", e.version, ")");
    return e.referenced;
  }
  c10::Storage storage = e.blob->restore();
  auto out = at::empty({0}, at::TensorOptions().dtype(e.dtype).device(e.device))
                 .set_(storage, e.offset, e.sizes, e.strides);
  if (e.requires_grad && out.is_floating_point()) out.requires_grad_(true);
  return out;
}

void SavedTensorStore::release(int64_t handle) {
  std::lock_guard<std::mutex> lock(mutex_);
  entries_.erase(handle);
}

namespace {
SavedTensorStore::Entry& find_entry(
    std::unordered_map<int64_t, std::shared_ptr<SavedTensorStore::Entry>>& entries, int64_t handle) {
  auto it = entries.find(handle);
  TORCH_CHECK_VALUE(it != entries.end(), "saved_tensors: unknown or released handle ", handle);
  return *it->second;
}
}  // namespace

at::Tensor SavedTensorStore::fingerprint(int64_t handle) {
  std::lock_guard<std::mutex> lock(mutex_);
  Entry& e = find_entry(entries_, handle);
  auto out = at::zeros({4}, at::kLong);
  if (!e.blob) return out;  // referenced: nothing to shard
  Blob& b = *e.blob;
  b.wait_for_copy();
  const at::Tensor& p = b.sharded ? at::Tensor() : b.payload();
  if (!p.defined()) {
    out[0] = 1;
    out[1] = b.full_len;
    return out;
  }
  auto bytes = p.contiguous().view(at::kByte).reshape({-1}).to(at::kLong);
  auto weights = at::arange(bytes.numel(), bytes.options()).remainder_(1000003).add_(1);
  out[0] = 1;
  out[1] = p.numel();
  out[2] = static_cast<int64_t>(p.element_size());
  out[3] = (bytes * weights).sum().item<int64_t>();
  return out;
}

void SavedTensorStore::shard(int64_t handle, int64_t rank, int64_t world) {
  std::lock_guard<std::mutex> lock(mutex_);
  TORCH_CHECK_VALUE(world >= 1 && rank >= 0 && rank < world, "saved_tensors: rank ", rank,
                    " is not in a group of ", world);
  Entry& e = find_entry(entries_, handle);
  if (!e.blob || e.blob->sharded) return;  // referenced, or a dedup hit on a sharded copy
  Blob& b = *e.blob;
  b.wait_for_copy();
  at::Tensor& p = b.payload();
  b.full_len = p.numel();
  b.shard_chunk = (b.full_len + world - 1) / world;
  b.shard_start = std::min(rank * b.shard_chunk, b.full_len);
  const int64_t len = std::min(b.shard_chunk, b.full_len - b.shard_start);
  const int64_t before = p.nbytes();
  p = p.reshape({-1}).narrow(0, b.shard_start, len).clone();
  b.sharded = true;
  counters_.shard_bytes_avoided += before - static_cast<int64_t>(p.nbytes());
}

bool SavedTensorStore::is_sharded(int64_t handle) const {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = entries_.find(handle);
  return it != entries_.end() && it->second->blob && it->second->blob->sharded;
}

at::Tensor SavedTensorStore::shard_part(int64_t handle) {
  std::lock_guard<std::mutex> lock(mutex_);
  Entry& e = find_entry(entries_, handle);
  TORCH_CHECK_VALUE(e.blob && e.blob->sharded, "saved_tensors: handle ", handle, " is not sharded");
  Blob& b = *e.blob;
  auto part = at::zeros({b.shard_chunk}, b.payload().options());
  part.narrow(0, 0, b.payload().numel()).copy_(b.payload());
  return part;
}

void SavedTensorStore::unshard(int64_t handle, const at::Tensor& gathered) {
  std::lock_guard<std::mutex> lock(mutex_);
  Entry& e = find_entry(entries_, handle);
  TORCH_CHECK_VALUE(e.blob && e.blob->sharded, "saved_tensors: handle ", handle, " is not sharded");
  Blob& b = *e.blob;
  TORCH_CHECK_VALUE(gathered.numel() >= b.full_len && gathered.scalar_type() == b.payload().scalar_type(),
                    "saved_tensors: the gathered shards have ", gathered.numel(), " elements of ",
                    gathered.scalar_type(), ", expected at least ", b.full_len, " of ",
                    b.payload().scalar_type());
  b.payload() = gathered.reshape({-1}).narrow(0, 0, b.full_len).to(b.payload().device()).clone();
  b.sharded = false;
}

StoreCounters SavedTensorStore::counters() const {
  std::lock_guard<std::mutex> lock(mutex_);
  StoreCounters c = counters_;
  std::unordered_map<const Blob*, bool> seen;
  for (const auto& [handle, entry] : entries_) {
    if (entry->blob) {
      if (!seen.emplace(entry->blob.get(), true).second) continue;
      (entry->blob->on_host() ? c.host_bytes : c.device_bytes) += entry->blob->held_bytes();
    } else if (entry->referenced.defined()) {
      if (entry->parameter) {
        c.referenced_bytes += entry->referenced.nbytes();
      } else {
        (entry->referenced.is_cpu() ? c.host_bytes : c.device_bytes) += entry->referenced.nbytes();
      }
    }
  }
  return c;
}

int64_t SavedTensorStore::live_handles() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return static_cast<int64_t>(entries_.size());
}

}  // namespace edkm
