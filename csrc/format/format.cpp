// The compressed-model file (docs/FORMAT.md): safetensors container, edkm metadata, clustered
// tensors. Every number read from a file is checked before it is used as a size or an offset;
// allocations are bounded by the file's real size.
#include <edkm/format.h>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <limits>
#include <memory>
#include <set>
#include <tuple>
#include <utility>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <edkm/edkm.h>

#include "format/json.h"

namespace edkm {

namespace {

constexpr uint64_t kMaxHeaderBytes = 100000000;  // safetensors' limit
constexpr int64_t kMaxNumel = int64_t(1) << 48;
constexpr size_t kMaxDims = 64;
const char* const kReservedMetadata[] = {"format", "edkm.version", "edkm.layout", "edkm.aliases"};
const char* const kOutlierSuffixes[] = {".outlier_index", ".outlier_values"};

struct DtypeInfo {
  const char* code;
  at::ScalarType type;
  int64_t itemsize;
};
constexpr DtypeInfo kDtypes[] = {
    {"BOOL", at::kBool, 1}, {"U8", at::kByte, 1},    {"I8", at::kChar, 1},  {"I16", at::kShort, 2},
    {"I32", at::kInt, 4},   {"I64", at::kLong, 8},   {"F16", at::kHalf, 2}, {"BF16", at::kBFloat16, 2},
    {"F32", at::kFloat, 4}, {"F64", at::kDouble, 8},
};

const DtypeInfo* dtype_by_code(const std::string& code) {
  for (const auto& d : kDtypes) {
    if (code == d.code) return &d;
  }
  return nullptr;
}

const DtypeInfo* dtype_by_type(at::ScalarType t) {
  for (const auto& d : kDtypes) {
    if (t == d.type) return &d;
  }
  return nullptr;
}

struct WeightDtype {
  const char* name;
  at::ScalarType type;
};
constexpr WeightDtype kWeightDtypes[] = {
    {"bfloat16", at::kBFloat16}, {"float16", at::kHalf}, {"float32", at::kFloat}, {"float64", at::kDouble}};

const char* weight_dtype_name(at::ScalarType t) {
  for (const auto& d : kWeightDtypes) {
    if (t == d.type) return d.name;
  }
  return nullptr;
}

std::string dims_str(const std::vector<int64_t>& v) { return c10::str(c10::IntArrayRef(v)); }

// Python-style repr of a name for messages ('name', with control characters escaped).
std::string q(const std::string& s) {
  std::string out = "'";
  for (const char ch : s) {
    const auto c = static_cast<unsigned char>(ch);
    if (c < 0x20 || c == 0x7F) {
      const char* hex = "0123456789abcdef";
      out += "\\x";
      out += hex[c >> 4];
      out += hex[c & 15];
    } else if (ch == '\'' || ch == '\\') {
      out += '\\';
      out += ch;
    } else {
      out += ch;
    }
  }
  return out + "'";
}

// numel of `shape` or -1 when it exceeds kMaxNumel (no overflow: each factor is bounded).
int64_t checked_numel(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (const int64_t s : shape) {
    if (s == 0) return 0;
  }
  for (const int64_t s : shape) {
    if (s < 0 || s > kMaxNumel || n > kMaxNumel / s) return -1;
    n *= s;
  }
  return n;
}

// ------------------------------------------------------------------------------ reading

class Reader {
 public:
  explicit Reader(const std::string& path) : path_(path) {}

  CompressedFile read() {
    open_file();
    read_header();
    read_entries();
    read_data();
    apply_metadata();
    return std::move(out_);
  }

 private:
  struct Entry {
    std::string name;
    const DtypeInfo* dtype;
    std::vector<int64_t> shape;
    int64_t begin, end;
  };

  [[noreturn]] void bad(const std::string& what) const {
    TORCH_CHECK_VALUE(false, "edkm::load_compressed: ", path_, ": ", what);
  }

  void open_file() {
    fd_ = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC);
    TORCH_CHECK(fd_ >= 0, "edkm::load_compressed: cannot open ", path_, ": ", std::strerror(errno));
    guard_.reset(&fd_);
    struct stat st{};
    TORCH_CHECK(::fstat(fd_, &st) == 0, "edkm::load_compressed: cannot stat ", path_, ": ",
                std::strerror(errno));
    if (S_ISDIR(st.st_mode)) bad("is a directory; expected an edkm .safetensors file");
    if (!S_ISREG(st.st_mode)) bad("is not a regular file");
    size_ = static_cast<uint64_t>(st.st_size);
  }

  void read_exact(void* dst, uint64_t n, uint64_t offset, const char* what) {
    auto* p = static_cast<char*>(dst);
    while (n > 0) {
      const size_t chunk = static_cast<size_t>(std::min<uint64_t>(n, uint64_t(1) << 30));
      const ssize_t got = ::pread(fd_, p, chunk, static_cast<off_t>(offset));
      if (got < 0 && errno == EINTR) continue;
      TORCH_CHECK(got >= 0, "edkm::load_compressed: reading ", path_, " failed: ", std::strerror(errno));
      if (got == 0) bad(std::string("file ended inside ") + what + " (was it truncated while reading?)");
      p += got;
      n -= static_cast<uint64_t>(got);
      offset += static_cast<uint64_t>(got);
    }
  }

  void read_header() {
    if (size_ < 8) bad("too short (" + std::to_string(size_) + " bytes) to be a safetensors file");
    unsigned char len[8];
    read_exact(len, 8, 0, "the header length");
    uint64_t n = 0;
    for (int b = 7; b >= 0; --b) n = (n << 8) | len[b];
    if (n > size_ - 8) {
      bad("header length " + std::to_string(n) + " exceeds the file (" + std::to_string(size_) + " bytes)");
    }
    if (n > kMaxHeaderBytes) {
      bad("header length " + std::to_string(n) + " exceeds the limit of " + std::to_string(kMaxHeaderBytes) +
          " bytes");
    }
    header_len_ = n;
    std::string text(static_cast<size_t>(n), '\0');
    read_exact(text.data(), n, 8, "the header");
    try {
      header_ = json::parse(text);
    } catch (const json::ParseError& e) {
      bad(std::string("header is not valid JSON: ") + e.what());
    }
    if (!header_.is_object())
      bad(std::string("header must be a JSON object, got ") + json::type_name(header_));
    data_start_ = 8 + header_len_;
    data_len_ = size_ - data_start_;
  }

  int64_t as_int(const json::Value& v, const std::string& name, const char* what) const {
    if (v.type != json::Value::Type::kNumber || !v.is_integer) {
      bad("tensor " + q(name) + ": " + what + " must be an integer, got " +
          (v.type == json::Value::Type::kNumber ? "a non-integer or out-of-range number"
                                                : std::string("a ") + json::type_name(v)));
    }
    return v.integer;
  }

  void read_entries() {
    std::vector<std::tuple<int64_t, int64_t, size_t>> spans;
    for (const auto& member : header_.object) {
      const std::string& name = member.first;
      const json::Value& e = member.second;
      if (name == "__metadata__") {
        read_metadata(e);
        continue;
      }
      if (!e.is_object()) bad("tensor " + q(name) + ": entry must be an object, got " + json::type_name(e));
      const json::Value* dtype = e.find("dtype");
      const json::Value* shape = e.find("shape");
      const json::Value* offsets = e.find("data_offsets");
      if (!dtype || !shape || !offsets || e.object.size() != 3) {
        bad("tensor " + q(name) + ": entry must have exactly the keys dtype, shape, data_offsets");
      }
      Entry entry{name, nullptr, {}, 0, 0};
      if (!dtype->is_string()) bad("tensor " + q(name) + ": dtype must be a string");
      entry.dtype = dtype_by_code(dtype->string);
      if (!entry.dtype) {
        bad("tensor " + q(name) + ": unsupported dtype " + q(dtype->string) +
            " (expected BOOL, U8, I8, I16, I32, I64, F16, BF16, F32 or F64)");
      }
      if (!shape->is_array() || shape->array.size() > kMaxDims) {
        bad("tensor " + q(name) + ": shape must be an array of at most " + std::to_string(kMaxDims) +
            " integers");
      }
      for (const auto& d : shape->array) {
        const int64_t s = as_int(d, name, "every shape dimension");
        if (s < 0 || s >= kMaxNumel) {
          bad("tensor " + q(name) + ": shape dimension " + std::to_string(s) +
              " is negative or absurdly large");
        }
        entry.shape.push_back(s);
      }
      const int64_t numel = checked_numel(entry.shape);
      if (numel < 0) bad("tensor " + q(name) + ": shape " + dims_str(entry.shape) + " is absurdly large");
      if (!offsets->is_array() || offsets->array.size() != 2) {
        bad("tensor " + q(name) + ": data_offsets must be an array [begin, end]");
      }
      entry.begin = as_int(offsets->array[0], name, "data_offsets");
      entry.end = as_int(offsets->array[1], name, "data_offsets");
      if (entry.begin < 0 || entry.begin > entry.end || static_cast<uint64_t>(entry.end) > data_len_) {
        bad("tensor " + q(name) + ": data_offsets [" + std::to_string(entry.begin) + ", " +
            std::to_string(entry.end) + "] outside the data section (" + std::to_string(data_len_) +
            " bytes)");
      }
      const int64_t nbytes = numel * entry.dtype->itemsize;
      if (entry.end - entry.begin != nbytes) {
        bad("tensor " + q(name) + ": " + std::to_string(entry.end - entry.begin) + " bytes do not hold " +
            entry.dtype->code + " " + dims_str(entry.shape) + " (" + std::to_string(nbytes) + " bytes)");
      }
      spans.emplace_back(entry.begin, entry.end, entries_.size());
      entries_.push_back(std::move(entry));
    }
    std::sort(spans.begin(), spans.end());
    int64_t pos = 0;
    for (const auto& [begin, end, k] : spans) {
      if (begin != pos) {
        bad("tensor " + q(entries_[k].name) + " starts at byte " + std::to_string(begin) +
            " of the data section, expected " + std::to_string(pos) +
            " (tensors must tile the data section without gaps or overlaps)");
      }
      pos = end;
    }
    if (static_cast<uint64_t>(pos) != data_len_) {
      bad("the data section has " + std::to_string(data_len_) + " bytes but the tensors cover " +
          std::to_string(pos) + " (truncated file or trailing data)");
    }
  }

  void read_metadata(const json::Value& m) {
    if (m.is_null()) return;
    if (!m.is_object()) bad("__metadata__ must be an object mapping strings to strings");
    for (const auto& [k, v] : m.object) {
      if (!v.is_string()) {
        bad("__metadata__[" + q(k) + "] must be a string, got " + json::type_name(v));
      }
      metadata_[k] = v.string;
    }
  }

  void read_data() {
    // In file order, so the reads are sequential.
    std::vector<size_t> order(entries_.size());
    for (size_t k = 0; k < order.size(); ++k) order[k] = k;
    std::sort(order.begin(), order.end(),
              [&](size_t a, size_t b) { return entries_[a].begin < entries_[b].begin; });
    for (const size_t k : order) {
      const Entry& e = entries_[k];
      auto t = at::empty(e.shape, at::TensorOptions().dtype(e.dtype->type));
      const uint64_t nbytes = static_cast<uint64_t>(e.end - e.begin);
      if (nbytes > 0) {
        read_exact(t.mutable_data_ptr(), nbytes, data_start_ + static_cast<uint64_t>(e.begin),
                   ("tensor " + q(e.name)).c_str());
      }
      out_.tensors.emplace(e.name, std::move(t));
    }
  }

  // Layout JSON value -> integer, with the layout entry named in errors.
  int64_t layout_int(const json::Value& d, const std::string& name, const char* key) const {
    const json::Value* v = d.find(key);
    if (!v) bad("edkm.layout entry for " + q(name) + ": missing " + q(key));
    if (v->type != json::Value::Type::kNumber || !v->is_integer) {
      bad("edkm.layout entry for " + q(name) + ": " + key + " must be an integer");
    }
    return v->integer;
  }

  json::Value parse_metadata_json(const char* key) const {
    auto it = metadata_.find(key);
    if (it == metadata_.end()) return json::parse("{}");
    json::Value v;
    try {
      v = json::parse(it->second);
    } catch (const json::ParseError& e) {
      bad(std::string("__metadata__[") + q(key) + "] is not valid JSON: " + e.what());
    }
    if (!v.is_object()) bad(std::string("__metadata__[") + q(key) + "] must be a JSON object");
    return v;
  }

  void apply_metadata() {
    auto fmt = metadata_.find("format");
    if (fmt == metadata_.end() || fmt->second != "edkm") {
      out_.metadata = std::move(metadata_);  // a plain safetensors file
      return;
    }
    auto version = metadata_.find("edkm.version");
    if (version == metadata_.end() || (version->second != "1" && version->second != "2")) {
      bad("edkm format version " +
          (version == metadata_.end() ? std::string("(missing)") : q(version->second)) +
          "; this edkm reads versions 1, 2");
    }
    version_ = std::stoi(version->second);
    const json::Value layout = parse_metadata_json("edkm.layout");
    const json::Value aliases = parse_metadata_json("edkm.aliases");
    for (const auto& [name, d] : layout.object) read_layout(name, d);
    for (const auto& [alias, target] : aliases.object) {
      if (!target.is_string()) bad("edkm.aliases[" + q(alias) + "] must be a string");
      const std::string& t = target.string;
      if (!out_.tensors.count(t) && !out_.clustered.count(t)) {
        bad("alias " + q(alias) + " points to unknown tensor " + q(t));
      }
      if (out_.tensors.count(alias) || out_.clustered.count(alias)) {
        bad("alias " + q(alias) + " is also the name of a stored tensor");
      }
      out_.aliases[alias] = t;
    }
    for (const char* key : kReservedMetadata) metadata_.erase(key);
    out_.metadata = std::move(metadata_);
  }

  void read_layout(const std::string& name, const json::Value& d) {
    const auto fail = [&](const std::string& what) { bad("edkm.layout entry for " + q(name) + ": " + what); };
    if (!d.is_object()) fail("expected an object");
    ClusteredTensor c;
    c.bits = layout_int(d, name, "bits");
    if (c.bits < 1 || c.bits > 8) fail("bits must be in 1..8, got " + std::to_string(c.bits));
    c.groups = layout_int(d, name, "groups");
    c.cluster_dim = layout_int(d, name, "cluster_dim");
    const json::Value* shape = d.find("shape");
    if (!shape) fail("missing 'shape'");
    if (!shape->is_array() || shape->array.empty() || shape->array.size() > kMaxDims) {
      fail("shape must be a non-empty array of positive integers");
    }
    for (const auto& s : shape->array) {
      if (s.type != json::Value::Type::kNumber || !s.is_integer || s.integer <= 0) {
        fail("shape must be a non-empty array of positive integers");
      }
      c.shape.push_back(s.integer);
    }
    const json::Value* dtype = d.find("dtype");
    if (!dtype) fail("missing 'dtype'");
    bool known = false;
    if (dtype->is_string()) {
      for (const auto& w : kWeightDtypes) {
        if (dtype->string == w.name) {
          c.dtype = w.type;
          known = true;
        }
      }
    }
    if (!known) fail("dtype must be one of bfloat16, float16, float32, float64");
    int64_t outliers = 0;
    if (d.find("outliers")) {
      if (version_ < 2) fail("'outliers' needs edkm format version 2");
      outliers = layout_int(d, name, "outliers");
      if (outliers < 0) fail("outliers must be >= 0, got " + std::to_string(outliers));
    }
    if (out_.tensors.count(name)) fail("a plain tensor of the same name is also stored");
    std::vector<std::string> parts = {".lut", ".indices"};
    if (outliers > 0) {
      parts.insert(parts.end(), std::begin(kOutlierSuffixes), std::end(kOutlierSuffixes));
    } else if (version_ >= 2) {
      for (const char* suffix : kOutlierSuffixes) {
        if (out_.tensors.count(name + suffix)) {
          fail("the file stores " + q(name + suffix) + " but the layout has no outliers");
        }
      }
    }
    for (const auto& suffix : parts) {
      if (!out_.tensors.count(name + suffix)) {
        fail("the file has no tensor " + q(name + suffix));
      }
    }
    c.lut = out_.tensors.at(name + ".lut");
    c.packed = out_.tensors.at(name + ".indices");
    if (outliers > 0) {
      c.outlier_index = out_.tensors.at(name + ".outlier_index");
      c.outlier_values = out_.tensors.at(name + ".outlier_values");
      if (c.outlier_index.dim() != 1 || c.outlier_index.numel() != outliers) {
        fail("the layout has " + std::to_string(outliers) + " outliers but " + q(name + ".outlier_index") +
             " has shape " + dims_str(c.outlier_index.sizes().vec()));
      }
    }
    try {
      c.check(name);
    } catch (const c10::Error& e) {
      bad(e.what_without_backtrace());
    }
    for (const auto& suffix : parts) out_.tensors.erase(name + suffix);
    out_.clustered.emplace(name, std::move(c));
  }

  struct Closer {
    void operator()(int* fd) const {
      if (fd && *fd >= 0) ::close(*fd);
    }
  };

  std::string path_;
  int fd_ = -1;
  std::unique_ptr<int, Closer> guard_;
  uint64_t size_ = 0, header_len_ = 0, data_start_ = 0, data_len_ = 0;
  int version_ = 1;
  json::Value header_;
  std::vector<Entry> entries_;
  std::map<std::string, std::string> metadata_;
  CompressedFile out_;
};

// ------------------------------------------------------------------------------ writing

std::string json_ints(const std::vector<int64_t>& v) {
  std::string out = "[";
  for (size_t k = 0; k < v.size(); ++k) out += (k ? "," : "") + std::to_string(v[k]);
  return out + "]";
}

std::string json_str(const char* op, const std::string& s, const std::string& what) {
  try {
    return json::quote(s);
  } catch (const std::invalid_argument&) {
    TORCH_CHECK_VALUE(false, op, ": ", what, " ", q(s), " is not valid UTF-8");
  }
}

class TempFile {
 public:
  explicit TempFile(const std::string& path) : path_(path) {
    const auto slash = path.find_last_of('/');
    const std::string dir = slash == std::string::npos ? "." : (slash == 0 ? "/" : path.substr(0, slash));
    const std::string base = slash == std::string::npos ? path : path.substr(slash + 1);
    dir_ = dir;
    std::string tmpl = dir + "/." + base + ".tmp.XXXXXX";
    std::vector<char> buf(tmpl.begin(), tmpl.end());
    buf.push_back('\0');
    fd_ = ::mkstemp(buf.data());
    TORCH_CHECK(fd_ >= 0, "edkm::save_compressed: cannot create a temporary file in ", dir, ": ",
                std::strerror(errno));
    tmp_ = buf.data();
    // mkstemp makes the file private (0600); give it the mode a plain open() would.
    (void)::fchmod(fd_, 0666 & ~current_umask());
  }

  // The process umask, read without changing it (umask() would, racing other threads).
  static mode_t current_umask() {
    std::ifstream status("/proc/self/status");
    std::string line;
    while (std::getline(status, line)) {
      if (line.rfind("Umask:", 0) == 0) return static_cast<mode_t>(std::stoul(line.substr(6), nullptr, 8));
    }
    return 022;
  }

  ~TempFile() {
    if (fd_ >= 0) ::close(fd_);
    if (!committed_) ::unlink(tmp_.c_str());
  }

  void write(const void* data, size_t n) {
    const char* p = static_cast<const char*>(data);
    while (n > 0) {
      const ssize_t put = ::write(fd_, p, std::min<size_t>(n, size_t(1) << 30));
      if (put < 0 && errno == EINTR) continue;
      TORCH_CHECK(put > 0, "edkm::save_compressed: writing ", tmp_, " failed: ", std::strerror(errno));
      p += put;
      n -= static_cast<size_t>(put);
    }
  }

  void commit() {
    TORCH_CHECK(::fsync(fd_) == 0, "edkm::save_compressed: fsync of ", tmp_,
                " failed: ", std::strerror(errno));
    const int fd = fd_;
    fd_ = -1;
    TORCH_CHECK(::close(fd) == 0, "edkm::save_compressed: closing ", tmp_, " failed: ", std::strerror(errno));
    TORCH_CHECK(::rename(tmp_.c_str(), path_.c_str()) == 0, "edkm::save_compressed: renaming ", tmp_, " to ",
                path_, " failed: ", std::strerror(errno));
    committed_ = true;
    // Make the rename itself durable (best effort: some file systems refuse fsync on a directory).
    const int dfd = ::open(dir_.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd >= 0) {
      (void)::fsync(dfd);
      ::close(dfd);
    }
  }

 private:
  std::string path_, dir_, tmp_;
  int fd_ = -1;
  bool committed_ = false;
};

}  // namespace

// ------------------------------------------------------------------------------ ClusteredTensor

int64_t ClusteredTensor::numel() const {
  const int64_t n = checked_numel(shape);
  TORCH_CHECK_VALUE(n >= 0, "ClusteredTensor: shape ", dims_str(shape), " is absurdly large");
  return n;
}

void ClusteredTensor::check(const std::string& name) const {
  const std::string who = "clustered tensor " + q(name);
  TORCH_CHECK_VALUE(bits >= 1 && bits <= 8, who, ": bits must be in 1..8, got ", bits);
  TORCH_CHECK_VALUE(!shape.empty() && shape.size() <= kMaxDims, who, ": shape must have 1 to ", kMaxDims,
                    " dimensions, got ", dims_str(shape));
  for (const int64_t s : shape) {
    TORCH_CHECK_VALUE(s > 0, who, ": every shape dimension must be > 0, got ", dims_str(shape));
  }
  const int64_t n = checked_numel(shape);
  TORCH_CHECK_VALUE(n > 0, who, ": shape ", dims_str(shape), " is absurdly large");
  TORCH_CHECK_VALUE(weight_dtype_name(dtype) != nullptr, who,
                    ": dtype must be bfloat16, float16, float32 or float64, got ", dtype);
  TORCH_CHECK_VALUE(groups >= 1 && groups <= n, who, ": groups must be in 1..numel, got ", groups);
  TORCH_CHECK_VALUE(cluster_dim >= 1 && cluster_dim <= shape.back(), who,
                    ": cluster_dim must be in 1..shape[-1], got ", cluster_dim);
  TORCH_CHECK_VALUE(shape.back() % cluster_dim == 0 && n % (groups * cluster_dim) == 0, who, ": shape ",
                    dims_str(shape), " cannot be cut into ", groups, " groups of ", cluster_dim, "-vectors");
  const int64_t k = int64_t(1) << bits;
  TORCH_CHECK_VALUE(lut.defined(), who, ": lut is missing");
  TORCH_CHECK_VALUE(lut.scalar_type() == at::kHalf, who, ": lut must be float16, got ", lut.scalar_type());
  TORCH_CHECK_VALUE(lut.dim() == 3 && lut.size(0) == groups && lut.size(1) == k && lut.size(2) == cluster_dim,
                    who, ": lut must have shape [groups, 2^bits, cluster_dim] = [", groups, ", ", k, ", ",
                    cluster_dim, "], got ", lut.sizes());
  TORCH_CHECK_VALUE(at::isfinite(lut).all().item<bool>(), who, ": lut has NaN or Inf values");
  const int64_t nbytes = (n / cluster_dim * bits + 7) / 8;
  TORCH_CHECK_VALUE(packed.defined(), who, ": packed indices are missing");
  TORCH_CHECK_VALUE(packed.scalar_type() == at::kByte && packed.dim() == 1 && packed.numel() == nbytes, who,
                    ": packed indices must be uint8 [ceil(", n / cluster_dim, " * ", bits, " / 8)] = [",
                    nbytes, "], got ", packed.scalar_type(), " ", packed.sizes());
  const int64_t used = (n / cluster_dim * bits) % 8;
  if (used != 0) {
    const int last = packed[nbytes - 1].item<int>();
    TORCH_CHECK_VALUE((last >> used) == 0, who,
                      ": the unused high bits of the last packed byte must be zero, got byte ", last);
  }
  check_outliers(who);
}

at::ScalarType ClusteredTensor::outlier_index_dtype() const {
  return numel() <= (int64_t(1) << 31) ? at::kInt : at::kLong;
}

void ClusteredTensor::check_outliers(const std::string& who) const {
  TORCH_CHECK_VALUE(outlier_index.defined() == outlier_values.defined(), who,
                    ": outlier_index and outlier_values must both be given or both be absent");
  if (!outlier_index.defined()) return;
  const int64_t n = numel();
  const int64_t count = outlier_index.numel();
  TORCH_CHECK_VALUE(cluster_dim == 1 || count == 0, who, ": outliers need cluster_dim 1, got ", cluster_dim);
  TORCH_CHECK_VALUE(outlier_index.scalar_type() == outlier_index_dtype(), who, ": outlier_index must be ",
                    outlier_index_dtype(), " for ", n, " elements, got ", outlier_index.scalar_type());
  TORCH_CHECK_VALUE(
      outlier_index.dim() == 1 && outlier_values.dim() == 1 && outlier_values.numel() == count && count <= n,
      who, ": outlier_index and outlier_values must be 1-D of the same length (at most ", n, "), got ",
      outlier_index.sizes(), " and ", outlier_values.sizes());
  const bool sixteen = dtype == at::kHalf || dtype == at::kBFloat16;
  const at::ScalarType vt = outlier_values.scalar_type();
  TORCH_CHECK_VALUE(sixteen ? vt == dtype : (vt == at::kHalf || vt == at::kBFloat16), who,
                    ": outlier_values must be ", sixteen ? c10::toString(dtype) : "Half or BFloat16",
                    " for a ", dtype, " weight, got ", vt);
  if (count == 0) return;
  const auto idx = outlier_index.cpu().to(at::kLong).contiguous();
  const int64_t* p = idx.const_data_ptr<int64_t>();
  TORCH_CHECK_VALUE(p[0] >= 0 && p[count - 1] < n, who, ": outlier positions must be in [0, ", n, "), got ",
                    p[0], "..", p[count - 1]);
  for (int64_t k = 1; k < count; ++k) {
    TORCH_CHECK_VALUE(p[k] > p[k - 1], who,
                      ": outlier positions must be strictly increasing (sorted, no repeats); "
                      "position ",
                      k, " is ", p[k], " after ", p[k - 1]);
  }
  TORCH_CHECK_VALUE(at::isfinite(outlier_values).all().item<bool>(), who,
                    ": outlier_values has NaN or Inf values");
}

at::Tensor ClusteredTensor::dequantize() const {
  check("(dequantize)");
  const int64_t n_idx = num_indices();
  auto idx = unpack_indices(packed.cpu(), bits, n_idx);
  auto table = lut.cpu().to(at::kFloat);  // [G, K, d]; exact, as Python's reader does
  at::Tensor w;
  if (cluster_dim == 1) {
    w = edkm::dequantize(idx.view(shape), table.select(2, 0).contiguous(), dtype);
  } else {
    auto index =
        idx.to(at::kLong).view({groups, n_idx / groups, 1}).expand({groups, n_idx / groups, cluster_dim});
    w = table.gather(1, index).to(dtype).reshape(shape);
  }
  if (num_outliers() > 0) {
    w = w.contiguous();
    w.view({-1}).index_copy_(0, outlier_index.cpu().to(at::kLong), outlier_values.cpu().to(dtype));
  }
  return w;
}

std::map<std::string, at::Tensor> CompressedFile::state_dict() const {
  std::map<std::string, at::Tensor> out = tensors;
  for (const auto& [name, c] : clustered) {
    try {
      out[name] = c.dequantize();
    } catch (const c10::Error& e) {
      TORCH_CHECK_VALUE(false, "CompressedFile::state_dict: cannot rebuild ", q(name), ": ",
                        e.what_without_backtrace());
    }
  }
  for (const auto& [alias, target] : aliases) {
    auto it = out.find(target);
    TORCH_CHECK_VALUE(it != out.end(), "CompressedFile::state_dict: alias ", q(alias),
                      " points to unknown tensor ", q(target));
    out[alias] = it->second;
  }
  return out;
}

CompressedFile load_compressed(const std::string& path) { return Reader(path).read(); }

void save_compressed(const std::string& path, const CompressedFile& file) {
  const char* op = "edkm::save_compressed";
  struct Out {
    at::Tensor tensor;
    const DtypeInfo* dtype;
  };
  std::map<std::string, Out> entries;
  std::string layout = "{";
  // The lowest version that describes the file: files without outliers stay version 1.
  std::string version = "1";
  for (const auto& [name, c] : file.clustered) {
    TORCH_CHECK_VALUE(!name.empty(), op, ": a clustered tensor has an empty name");
    try {
      c.check(name);
    } catch (const c10::Error& e) {
      TORCH_CHECK_VALUE(false, op, ": ", e.what_without_backtrace());
    }
    TORCH_CHECK_VALUE(!file.tensors.count(name), op, ": ", q(name),
                      " is both a clustered and a plain tensor");
    entries[name + ".lut"] = {c.lut.contiguous().cpu(), dtype_by_type(at::kHalf)};
    entries[name + ".indices"] = {c.packed.contiguous().cpu(), dtype_by_type(at::kByte)};
    const int64_t outliers = c.num_outliers();
    if (outliers > 0) {
      entries[name + ".outlier_index"] = {c.outlier_index.contiguous().cpu(),
                                          dtype_by_type(c.outlier_index.scalar_type())};
      entries[name + ".outlier_values"] = {c.outlier_values.contiguous().cpu(),
                                           dtype_by_type(c.outlier_values.scalar_type())};
      version = "2";
    }
    layout += (layout.size() > 1 ? "," : "") + json_str(op, name, "clustered tensor name") +
              ":{\"bits\":" + std::to_string(c.bits) + ",\"shape\":" + json_ints(c.shape) + ",\"dtype\":\"" +
              weight_dtype_name(c.dtype) + "\",\"groups\":" + std::to_string(c.groups) +
              ",\"cluster_dim\":" + std::to_string(c.cluster_dim) +
              (outliers > 0 ? ",\"outliers\":" + std::to_string(outliers) : std::string()) + "}";
  }
  layout += "}";
  for (const auto& [name, t] : file.tensors) {
    TORCH_CHECK_VALUE(!name.empty(), op, ": a tensor has an empty name");
    TORCH_CHECK_VALUE(name != "__metadata__", op, ": '__metadata__' is reserved, not a tensor name");
    TORCH_CHECK_VALUE(t.defined(), op, ": tensor ", q(name), " is undefined");
    const DtypeInfo* d = dtype_by_type(t.scalar_type());
    TORCH_CHECK_VALUE(d != nullptr, op, ": tensor ", q(name), " has dtype ", t.scalar_type(),
                      ", which the file cannot store (bool, uint8, int8/16/32/64, float16, "
                      "bfloat16, float32, float64)");
    TORCH_CHECK_VALUE(!entries.count(name), op, ": tensor ", q(name),
                      " collides with the stored form of a clustered tensor");
    for (const char* suffix : kOutlierSuffixes) {
      const std::string s(suffix);
      TORCH_CHECK_VALUE(!(name.size() > s.size() && name.compare(name.size() - s.size(), s.size(), s) == 0 &&
                          file.clustered.count(name.substr(0, name.size() - s.size()))),
                        op, ": tensor ", q(name), " collides with the stored form of a clustered tensor");
    }
    entries[name] = {t.contiguous().cpu(), d};
  }
  TORCH_CHECK_VALUE(!entries.count("__metadata__"), op, ": '__metadata__' is reserved");
  std::string aliases = "{";
  for (const auto& [alias, target] : file.aliases) {
    TORCH_CHECK_VALUE(file.tensors.count(target) || file.clustered.count(target), op, ": alias ", q(alias),
                      " points to ", q(target), ", which is not a stored tensor");
    TORCH_CHECK_VALUE(!file.tensors.count(alias) && !file.clustered.count(alias) && !entries.count(alias), op,
                      ": alias ", q(alias), " is also the name of a stored tensor");
    aliases += (aliases.size() > 1 ? "," : "") + json_str(op, alias, "alias") + ":" +
               json_str(op, target, "alias target");
  }
  aliases += "}";

  std::string header = "{\"__metadata__\":{\"format\":\"edkm\",\"edkm.version\":\"" + version +
                       "\",\"edkm.layout\":" + json::quote(layout);
  if (!file.aliases.empty()) header += ",\"edkm.aliases\":" + json::quote(aliases);
  for (const auto& [k, v] : file.metadata) {
    for (const char* reserved : kReservedMetadata) {
      TORCH_CHECK_VALUE(k != reserved, op, ": metadata key ", q(k), " is reserved (edkm writes it itself)");
    }
    header += "," + json_str(op, k, "metadata key") + ":" + json_str(op, v, "metadata value");
  }
  header += "}";
  int64_t offset = 0;
  for (const auto& [name, e] : entries) {
    const int64_t nbytes = e.tensor.numel() * e.dtype->itemsize;
    header += "," + json_str(op, name, "tensor name") + ":{\"dtype\":\"" + e.dtype->code +
              "\",\"shape\":" + json_ints(e.tensor.sizes().vec()) + ",\"data_offsets\":[" +
              std::to_string(offset) + "," + std::to_string(offset + nbytes) + "]}";
    offset += nbytes;
  }
  header += "}";
  header.append((8 - header.size() % 8) % 8, ' ');  // 8 + N is a multiple of 8
  TORCH_CHECK_VALUE(header.size() <= kMaxHeaderBytes, op, ": the header would take ", header.size(),
                    " bytes, over safetensors' limit of ", kMaxHeaderBytes);

  struct stat st{};
  TORCH_CHECK_VALUE(!(::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode)), op, ": path ", q(path),
                    " is a directory; expected a file name");
  TempFile out(path);
  unsigned char len[8];
  uint64_t n = header.size();
  for (int b = 0; b < 8; ++b) len[b] = static_cast<unsigned char>(n >> (8 * b));
  out.write(len, 8);
  out.write(header.data(), header.size());
  for (const auto& [name, e] : entries) {
    const size_t nbytes = static_cast<size_t>(e.tensor.numel() * e.dtype->itemsize);
    if (nbytes > 0) out.write(e.tensor.const_data_ptr(), nbytes);
  }
  out.commit();
}

}  // namespace edkm
