// The compressed-model file (docs/FORMAT.md) from C++: the strict JSON parser, save/load round
// trips, and malformed files (every truncation, lying headers, random corruption) giving clear
// errors instead of crashes.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <limits>
#include <random>
#include <set>
#include <string>
#include <vector>

#include <edkm/edkm.h>
#include <edkm/format.h>

#include "format/json.h"

namespace {

namespace json = edkm::json;

template <typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const c10::Error& e) {
    return e.what_without_backtrace();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "<no error>";
}

#define EXPECT_ERROR_HAS(stmt, text)                                                             \
  do {                                                                                           \
    const std::string msg_ = error_of([&] { stmt; });                                            \
    EXPECT_NE(msg_.find(text), std::string::npos) << "expected '" << (text) << "' in: " << msg_; \
  } while (0)

// A fresh scratch directory per test.
class TempDir {
 public:
  TempDir() {
    char tmpl[] = "/tmp/edkm_format_test.XXXXXX";
    path_ = ::mkdtemp(tmpl);
  }
  ~TempDir() {
    for (const auto& f : files()) ::unlink((path_ + "/" + f).c_str());
    ::rmdir(path_.c_str());
  }
  std::string file(const std::string& name) const { return path_ + "/" + name; }
  std::vector<std::string> files() const {
    std::vector<std::string> out;
    if (DIR* d = ::opendir(path_.c_str())) {
      while (dirent* e = ::readdir(d)) {
        const std::string n = e->d_name;
        if (n != "." && n != "..") out.push_back(n);
      }
      ::closedir(d);
    }
    return out;
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

std::string read_all(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

void write_all(const std::string& path, const std::string& bytes) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

// A safetensors file from a header text and raw data bytes.
std::string raw_file(const std::string& header, const std::string& data) {
  std::string out(8, '\0');
  const uint64_t n = header.size();
  for (int b = 0; b < 8; ++b) out[b] = static_cast<char>(n >> (8 * b));
  return out + header + data;
}

// A clustered tensor of `shape` with random indices and LUT.
edkm::ClusteredTensor make_clustered(std::vector<int64_t> shape, int bits, int64_t groups, int64_t d,
                                     at::ScalarType dtype) {
  edkm::ClusteredTensor c;
  c.bits = bits;
  c.shape = shape;
  c.dtype = dtype;
  c.groups = groups;
  c.cluster_dim = d;
  const int64_t numel = c.numel();
  c.lut = torch::randn({groups, int64_t(1) << bits, d}).to(torch::kHalf);
  auto idx = torch::randint(0, int64_t(1) << bits, {numel / d}, torch::kLong);
  c.packed = edkm::pack_indices(idx, bits);
  return c;
}

// Outliers (format version 2) at `positions` with random values of dtype `vdtype`.
void add_outliers(edkm::ClusteredTensor& c, const std::vector<int64_t>& positions, at::ScalarType vdtype) {
  c.outlier_index = torch::tensor(positions, torch::kLong).to(c.outlier_index_dtype());
  c.outlier_values = (torch::randn({static_cast<int64_t>(positions.size())}) * 10).to(vdtype);
}

edkm::CompressedFile sample_file() {
  torch::manual_seed(0);
  edkm::CompressedFile f;
  f.tensors["bias"] = torch::randn({6});
  f.tensors["norm.weight"] = torch::randn({4, 3}).to(torch::kBFloat16);
  f.tensors["step"] = torch::tensor({7}, torch::kLong);
  f.tensors["mask"] = torch::tensor({true, false, true});
  f.tensors["empty"] = torch::zeros({0, 5}, torch::kHalf);
  f.clustered["layer.weight"] = make_clustered({6, 10}, 3, 2, 1, torch::kBFloat16);
  f.clustered["emb.weight"] = make_clustered({4, 8}, 2, 1, 2, torch::kFloat);
  f.aliases["lm_head.weight"] = "emb.weight";
  f.metadata["note"] = "caf\xc3\xa9 \"quoted\"\n";
  return f;
}

// ------------------------------------------------------------------------------ JSON

TEST(Json, ParsesEveryValueKind) {
  const auto v = json::parse(
      " {\"a\": [1, -2, 3.5, -0.25e2, 1E+2, 0], \"s\": \"x\\\"\\\\\\/\\b\\f\\n\\r\\t\\u00e9\\ud83d\\ude00\","
      " \"t\": true, \"f\": false, \"n\": null, \"o\": {}, \"e\": [],"
      " \"big\": 9223372036854775807, \"neg\": -9223372036854775808, \"huge\": 9223372036854775808} ");
  ASSERT_TRUE(v.is_object());
  const auto& a = v.find("a")->array;
  ASSERT_EQ(a.size(), 6u);
  EXPECT_TRUE(a[0].is_integer);
  EXPECT_EQ(a[0].integer, 1);
  EXPECT_EQ(a[1].integer, -2);
  EXPECT_FALSE(a[2].is_integer);
  EXPECT_EQ(a[2].number, 3.5);
  EXPECT_EQ(a[3].number, -25.0);
  EXPECT_FALSE(a[4].is_integer);
  EXPECT_EQ(a[4].number, 100.0);
  EXPECT_EQ(v.find("s")->string, "x\"\\/\b\f\n\r\t\xc3\xa9\xf0\x9f\x98\x80");
  EXPECT_TRUE(v.find("t")->boolean);
  EXPECT_FALSE(v.find("f")->boolean);
  EXPECT_TRUE(v.find("n")->is_null());
  EXPECT_TRUE(v.find("o")->is_object());
  EXPECT_TRUE(v.find("e")->is_array());
  EXPECT_EQ(v.find("big")->integer, INT64_MAX);
  EXPECT_EQ(v.find("neg")->integer, INT64_MIN);
  EXPECT_FALSE(v.find("huge")->is_integer);  // does not fit: a number, not an integer
  EXPECT_EQ(v.find("missing"), nullptr);
}

TEST(Json, RejectsEverythingOutsideTheGrammar) {
  const std::vector<std::string> bad = {"",
                                        " ",
                                        "{",
                                        "}",
                                        "[1,]",
                                        "{\"a\":1,}",
                                        "{\"a\" 1}",
                                        "{a:1}",
                                        "[1 2]",
                                        "01",
                                        "-",
                                        "1.",
                                        ".5",
                                        "1e",
                                        "+1",
                                        "NaN",
                                        "Infinity",
                                        "tru",
                                        "nul",
                                        "\"abc",
                                        "\"\\x\"",
                                        "\"\\u12\"",
                                        "\"\\u12G4\"",
                                        "\"\\ud800\"",
                                        "\"\\udc00\"",
                                        "\"\\ud800\\u0041\"",
                                        "\"a\nb\"",
                                        "\"\xff\"",
                                        "\"\xc0\xaf\"",
                                        "\"\xed\xa0\x80\"",
                                        "\"\xf4\x90\x80\x80\"",
                                        "\"\xe2\x82\"",
                                        "{\"a\":1,\"a\":2}",
                                        "[1] x",
                                        "// c\n1",
                                        "'a'",
                                        std::string("[1\0]", 4),
                                        "[-]",
                                        "[1e+]"};
  for (const auto& text : bad) {
    EXPECT_THROW(json::parse(text), json::ParseError) << "accepted: " << text;
  }
}

TEST(Json, LimitsDepthValuesAndSize) {
  std::string deep(65, '[');
  deep += std::string(65, ']');
  EXPECT_ERROR_HAS(json::parse(deep), "nested deeper than 64");
  std::string ok(64, '[');
  ok += std::string(64, ']');
  EXPECT_NO_THROW(json::parse(ok));
  // Very deep input fails fast (no stack overflow).
  EXPECT_THROW(json::parse(std::string(1000000, '[')), json::ParseError);
  json::Limits small;
  small.max_values = 10;
  EXPECT_ERROR_HAS(json::parse("[1,2,3,4,5,6,7,8,9,10]", small), "more than 10 JSON values");
  EXPECT_NO_THROW(json::parse("[1,2,3,4,5,6,7,8,9]", small));
  small.max_bytes = 4;
  EXPECT_ERROR_HAS(json::parse("[1,2]", small), "exceeds the limit of 4");
}

TEST(Json, QuoteRoundTripsAndRejectsInvalidUtf8) {
  const std::string s = std::string("a\"b\\c\n\x01\x1f/\xc3\xa9", 11);
  EXPECT_EQ(json::parse(json::quote(s)).string, s);
  EXPECT_EQ(json::quote("\x01"), "\"\\u0001\"");
  EXPECT_THROW(json::quote("\xff"), std::invalid_argument);
}

// ------------------------------------------------------------------------------ round trip

TEST(Format, RoundTripKeepsEveryTensorAndField) {
  TempDir dir;
  const auto f = sample_file();
  const auto path = dir.file("m.safetensors");
  edkm::save_compressed(path, f);
  EXPECT_EQ(dir.files(), std::vector<std::string>{"m.safetensors"});  // no temp file left
  const std::string bytes = read_all(path);
  uint64_t header_len = 0;
  for (int b = 7; b >= 0; --b) header_len = (header_len << 8) | static_cast<unsigned char>(bytes[b]);
  EXPECT_EQ((8 + header_len) % 8, 0u);  // header padded to 8 bytes
  EXPECT_EQ(bytes[8 + header_len - 1] == ' ' || bytes[8 + header_len - 1] == '}', true);

  const auto g = edkm::load_compressed(path);
  ASSERT_EQ(g.tensors.size(), f.tensors.size());
  for (const auto& [name, t] : f.tensors) {
    ASSERT_TRUE(g.tensors.count(name)) << name;
    EXPECT_EQ(g.tensors.at(name).scalar_type(), t.scalar_type()) << name;
    EXPECT_TRUE(torch::equal(g.tensors.at(name), t)) << name;
  }
  ASSERT_EQ(g.clustered.size(), 2u);
  for (const auto& [name, c] : f.clustered) {
    const auto& d = g.clustered.at(name);
    EXPECT_EQ(d.bits, c.bits);
    EXPECT_EQ(d.shape, c.shape);
    EXPECT_EQ(d.dtype, c.dtype);
    EXPECT_EQ(d.groups, c.groups);
    EXPECT_EQ(d.cluster_dim, c.cluster_dim);
    EXPECT_TRUE(torch::equal(d.lut, c.lut));
    EXPECT_TRUE(torch::equal(d.packed, c.packed));
  }
  EXPECT_EQ(g.aliases, f.aliases);
  EXPECT_EQ(g.metadata, f.metadata);

  const auto sd = g.state_dict();
  EXPECT_EQ(sd.size(), f.tensors.size() + 2 + 1);
  EXPECT_TRUE(sd.at("lm_head.weight").is_same(sd.at("emb.weight")));
  EXPECT_EQ(sd.at("layer.weight").scalar_type(), torch::kBFloat16);
  EXPECT_EQ(sd.at("layer.weight").sizes(), torch::IntArrayRef({6, 10}));
}

TEST(Format, DequantizeFollowsTheFormatIndexOrder) {
  // Scalar: groups of rows, one LUT each.
  torch::manual_seed(1);
  auto c = make_clustered({6, 10}, 3, 3, 1, torch::kBFloat16);
  auto idx = edkm::unpack_indices(c.packed, 3, 60).to(torch::kLong);
  auto w = c.dequantize();
  for (int64_t i = 0; i < 60; ++i) {
    const int64_t g = i / 20;
    const float want = c.lut[g][idx[i].item<int64_t>()][0].item<float>();
    ASSERT_EQ(w.view(-1)[i].item<float>(), c10::BFloat16(want)) << i;
  }
  // Vectors of d = 2 consecutive elements.
  auto v = make_clustered({4, 8}, 2, 2, 2, torch::kFloat);
  auto vidx = edkm::unpack_indices(v.packed, 2, 16).to(torch::kLong);
  auto vw = v.dequantize().view(-1);
  for (int64_t j = 0; j < 16; ++j) {
    const int64_t g = j / 8;
    for (int64_t e = 0; e < 2; ++e) {
      ASSERT_EQ(vw[j * 2 + e].item<float>(), v.lut[g][vidx[j].item<int64_t>()][e].item<float>());
    }
  }
}

TEST(Format, PlainSafetensorsWithAnyTensorOrderLoads) {
  // Tensors in a different order than their names (as safetensors' writer sorts by dtype).
  TempDir dir;
  std::string data(4 * 2 + 3, '\0');
  float vals[2] = {1.5f, -2.0f};
  std::memcpy(&data[3], vals, 8);
  data[0] = 1, data[1] = 2, data[2] = 3;
  const std::string header =
      "{\"z\":{\"dtype\":\"U8\",\"shape\":[3],\"data_offsets\":[0,3]},"
      "\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[3,11]},"
      "\"__metadata__\":{\"format\":\"pt\"}}";
  write_all(dir.file("p.safetensors"), raw_file(header, data));
  const auto f = edkm::load_compressed(dir.file("p.safetensors"));
  EXPECT_TRUE(torch::equal(f.tensors.at("z"), torch::tensor({1, 2, 3}, torch::kUInt8)));
  EXPECT_TRUE(torch::equal(f.tensors.at("a"), torch::tensor({1.5f, -2.0f})));
  EXPECT_EQ(f.metadata.at("format"), "pt");
  EXPECT_TRUE(f.clustered.empty());
}

TEST(Format, OutliersRoundTripAsVersion2) {
  TempDir dir;
  auto f = sample_file();
  const auto v1 = dir.file("v1.safetensors");
  edkm::save_compressed(v1, f);
  EXPECT_NE(read_all(v1).find("\"edkm.version\":\"1\""), std::string::npos);  // none: still v1

  auto& c = f.clustered.at("layer.weight");  // bfloat16 [6, 10]
  const auto without = c.dequantize().view(-1);
  add_outliers(c, {0, 7, 59}, torch::kBFloat16);
  f.clustered["f32.weight"] = make_clustered({3, 4}, 2, 1, 1, torch::kFloat);
  const auto f32_without = f.clustered.at("f32.weight").dequantize().view(-1);
  add_outliers(f.clustered.at("f32.weight"), {5}, torch::kHalf);
  const auto path = dir.file("v2.safetensors");
  edkm::save_compressed(path, f);
  const std::string bytes = read_all(path);
  EXPECT_NE(bytes.find("\"edkm.version\":\"2\""), std::string::npos);
  EXPECT_NE(bytes.find("\\\"outliers\\\":3"), std::string::npos);

  const auto g = edkm::load_compressed(path);
  EXPECT_FALSE(g.tensors.count("layer.weight.outlier_index"));
  EXPECT_FALSE(g.tensors.count("layer.weight.outlier_values"));
  const auto& d = g.clustered.at("layer.weight");
  EXPECT_EQ(d.num_outliers(), 3);
  EXPECT_EQ(d.outlier_index.scalar_type(), torch::kInt);
  EXPECT_TRUE(torch::equal(d.outlier_index, c.outlier_index));
  EXPECT_TRUE(torch::equal(d.outlier_values, c.outlier_values));
  EXPECT_EQ(g.clustered.at("emb.weight").num_outliers(), 0);

  const auto w = d.dequantize().view(-1);
  for (int64_t i = 0; i < 60; ++i) {
    const int64_t k = i == 0 ? 0 : i == 7 ? 1 : i == 59 ? 2 : -1;
    const auto want = k >= 0 ? c.outlier_values[k] : without[i];
    ASSERT_TRUE(torch::equal(w[i], want)) << i;
  }
  const auto sd = g.state_dict();
  EXPECT_TRUE(torch::equal(sd.at("layer.weight").view(-1), w));
  auto f32 = sd.at("f32.weight").view(-1);
  EXPECT_EQ(f32[5].item<float>(), f.clustered.at("f32.weight").outlier_values[0].item<float>());
  f32[5] = f32_without[5];
  EXPECT_TRUE(torch::equal(f32, f32_without));
}

TEST(Format, OutlierFileEveryTruncationIsAClearError) {
  TempDir dir;
  auto f = sample_file();
  add_outliers(f.clustered.at("layer.weight"), {1, 2, 30, 44}, torch::kBFloat16);
  const auto path = dir.file("m.safetensors");
  edkm::save_compressed(path, f);
  const std::string bytes = read_all(path);
  const auto cut = dir.file("cut.safetensors");
  for (size_t len = 0; len < bytes.size(); ++len) {
    write_all(cut, bytes.substr(0, len));
    const std::string msg = error_of([&] { edkm::load_compressed(cut); });
    ASSERT_NE(msg.find(cut), std::string::npos) << len << ": " << msg;
  }
}

TEST(Format, BadOutliersAreRefusedOnSave) {
  TempDir dir;
  const auto path = dir.file("m.safetensors");
  struct Case {
    std::vector<int64_t> positions;
    std::function<void(edkm::CompressedFile&)> edit;
    std::string expect;
  };
  const auto none = [](edkm::CompressedFile&) {};
  const std::vector<Case> cases = {
      {{7, 0, 59}, none, "outlier positions must be strictly increasing"},
      {{0, 7, 7}, none, "outlier positions must be strictly increasing"},
      {{0, 7, 60}, none, "outlier positions must be in [0, 60)"},
      {{-1, 7, 8}, none, "outlier positions must be in [0, 60)"},
      {{0, 1},
       [](edkm::CompressedFile& f) {
         auto& c = f.clustered.at("layer.weight");
         c.outlier_index = c.outlier_index.to(torch::kLong);
       },
       "outlier_index must be Int for 60 elements, got Long"},
      {{0, 1},
       [](edkm::CompressedFile& f) {
         auto& c = f.clustered.at("layer.weight");
         c.outlier_values = c.outlier_values.to(torch::kHalf);
       },
       "outlier_values must be BFloat16 for a BFloat16 weight, got Half"},
      {{0, 1},
       [](edkm::CompressedFile& f) {
         auto& c = f.clustered.at("layer.weight");
         c.outlier_values = c.outlier_values.narrow(0, 0, 1);
       },
       "must be 1-D of the same length"},
      {{0, 1},
       [](edkm::CompressedFile& f) {
         f.clustered.at("layer.weight").outlier_values[1] = std::numeric_limits<float>::infinity();
       },
       "outlier_values has NaN or Inf"},
      {{0, 1},
       [](edkm::CompressedFile& f) { f.clustered.at("layer.weight").outlier_values = at::Tensor(); },
       "must both be given or both be absent"},
      {{0, 1},
       [](edkm::CompressedFile& f) { f.tensors["layer.weight.outlier_values"] = torch::zeros({2}); },
       "collides with the stored form of a clustered tensor"},
      {{0, 1},
       [](edkm::CompressedFile& f) { f.tensors["emb.weight.outlier_index"] = torch::zeros({2}); },
       "collides with the stored form of a clustered tensor"},
      {{0, 1},
       [](edkm::CompressedFile& f) {
         auto& e = f.clustered.at("emb.weight");  // cluster_dim 2
         e.outlier_index = torch::tensor({0, 1}, torch::kInt);
         e.outlier_values = torch::zeros({2});
       },
       "outliers need cluster_dim 1"},
  };
  for (const auto& c : cases) {
    auto f = sample_file();
    add_outliers(f.clustered.at("layer.weight"), c.positions, torch::kBFloat16);
    c.edit(f);
    EXPECT_ERROR_HAS(edkm::save_compressed(path, f), c.expect);
    EXPECT_TRUE(dir.files().empty());
  }
}

TEST(Format, LyingOutlierHeadersAreClearErrors) {
  TempDir dir;
  const auto path = dir.file("o.safetensors");
  const auto entry = [](const std::string& name, const std::string& dtype, const std::string& shape,
                        const std::string& offsets) {
    return "\"" + name + "\":{\"dtype\":\"" + dtype + "\",\"shape\":" + shape +
           ",\"data_offsets\":" + offsets + "}";
  };
  // w: float32 [2, 8], 3 bits, one LUT: indices [0, 6), lut [6, 22), then the outliers.
  const auto meta = [](const std::string& version, const std::string& outliers) {
    return "\"__metadata__\":{\"format\":\"edkm\",\"edkm.version\":\"" + version +
           "\",\"edkm.layout\":\"{\\\"w\\\":{\\\"bits\\\":3,\\\"shape\\\":[2,8],"
           "\\\"dtype\\\":\\\"float32\\\",\\\"groups\\\":1,\\\"cluster_dim\\\":1" +
           (outliers.empty() ? std::string() : ",\\\"outliers\\\":" + outliers) + "}}\"}";
  };
  const std::string base =
      entry("w.indices", "U8", "[6]", "[0,6]") + "," + entry("w.lut", "F16", "[1,8,1]", "[6,22]");
  const std::string i32 = entry("w.outlier_index", "I32", "[2]", "[22,30]");
  const std::string f16 = entry("w.outlier_values", "F16", "[2]", "[30,34]");
  // Data: zero indices and LUT, positions (int32 little-endian), values (float16 1.0 = 0x3C00).
  const auto data = [](int32_t p0, int32_t p1, uint16_t v1 = 0x3C00) {
    std::string d(34, '\0');
    std::memcpy(&d[22], &p0, 4);
    std::memcpy(&d[26], &p1, 4);
    const uint16_t v0 = 0x3C00;
    std::memcpy(&d[30], &v0, 2);
    std::memcpy(&d[32], &v1, 2);
    return d;
  };
  // The valid file first: positions 3 and 9 hold 1.0, everything else the LUT's 0.
  write_all(path, raw_file("{" + meta("2", "2") + "," + base + "," + i32 + "," + f16 + "}", data(3, 9)));
  const auto w = edkm::load_compressed(path).state_dict().at("w").view(-1);
  auto want = torch::zeros({16});
  want[3] = 1.0f;
  want[9] = 1.0f;
  EXPECT_TRUE(torch::equal(w, want));

  struct Case {
    std::string header, data, expect;
  };
  const std::vector<Case> cases = {
      {"{" + meta("1", "2") + "," + base + "," + i32 + "," + f16 + "}", data(3, 9),
       "'outliers' needs edkm format version 2"},
      {"{" + meta("2", "3") + "," + base + "," + i32 + "," + f16 + "}", data(3, 9),
       "the layout has 3 outliers but 'w.outlier_index' has shape [2]"},
      {"{" + meta("2", "-1") + "," + base + "," + i32 + "," + f16 + "}", data(3, 9), "outliers must be >= 0"},
      {"{" + meta("2", "2") + "," + base + "," + entry("w.outlier_index", "I32", "[2]", "[22,30]") + "}",
       data(3, 9).substr(0, 30), "the file has no tensor 'w.outlier_values'"},
      {"{" + meta("2", "") + "," + base + "," + i32 + "," + f16 + "}", data(3, 9),
       "the file stores 'w.outlier_index' but the layout has no outliers"},
      {"{" + meta("2", "2") + "," + base + "," + i32 + "," + f16 + "}", data(9, 3),
       "outlier positions must be strictly increasing"},
      {"{" + meta("2", "2") + "," + base + "," + i32 + "," + f16 + "}", data(3, 3),
       "outlier positions must be strictly increasing"},
      {"{" + meta("2", "2") + "," + base + "," + i32 + "," + f16 + "}", data(3, 16),
       "outlier positions must be in [0, 16)"},
      {"{" + meta("2", "2") + "," + base + "," + i32 + "," + f16 + "}", data(-2, 3),
       "outlier positions must be in [0, 16)"},
      {"{" + meta("2", "2") + "," + base + "," + i32 + "," + f16 + "}", data(3, 9, 0x7E00),
       "outlier_values has NaN or Inf"},
      {"{" + meta("2", "2") + "," + base + "," + entry("w.outlier_index", "I64", "[2]", "[22,38]") + "," +
           entry("w.outlier_values", "F16", "[2]", "[38,42]") + "}",
       std::string(42, '\0'), "outlier_index must be Int for 16 elements, got Long"},
      {"{" + meta("2", "2") + "," + base + "," + i32 + "," +
           entry("w.outlier_values", "F32", "[2]", "[30,38]") + "}",
       std::string(38, '\0'), "outlier_values must be Half or BFloat16 for a Float weight"},
  };
  for (const auto& c : cases) {
    write_all(path, raw_file(c.header, c.data));
    const std::string msg = error_of([&] { edkm::load_compressed(path).state_dict(); });
    EXPECT_NE(msg.find(c.expect), std::string::npos)
        << "header: " << c.header << "\nexpected: " << c.expect << "\ngot: " << msg;
    EXPECT_NE(msg.find(path), std::string::npos) << msg;
  }
}

// ------------------------------------------------------------------------------ bad files

TEST(Format, EveryTruncationIsAClearError) {
  TempDir dir;
  const auto path = dir.file("m.safetensors");
  edkm::save_compressed(path, sample_file());
  const std::string bytes = read_all(path);
  const auto cut = dir.file("cut.safetensors");
  for (size_t len = 0; len < bytes.size(); ++len) {
    write_all(cut, bytes.substr(0, len));
    try {
      edkm::load_compressed(cut);
      ADD_FAILURE() << "a file cut to " << len << " of " << bytes.size() << " bytes loaded";
    } catch (const c10::Error& e) {
      const std::string msg = e.what_without_backtrace();
      ASSERT_NE(msg.find(cut), std::string::npos) << msg;  // names the file
    }
  }
  // Trailing bytes are an error too.
  write_all(cut, bytes + "x");
  EXPECT_ERROR_HAS(edkm::load_compressed(cut), "trailing data");
}

TEST(Format, LyingHeadersAreClearErrors) {
  TempDir dir;
  const auto path = dir.file("h.safetensors");
  const auto entry = [](const std::string& name, const std::string& dtype, const std::string& shape,
                        const std::string& offsets) {
    return "\"" + name + "\":{\"dtype\":\"" + dtype + "\",\"shape\":" + shape +
           ",\"data_offsets\":" + offsets + "}";
  };
  struct Case {
    std::string header;
    size_t data;
    std::string expect;
  };
  const std::string meta = "\"__metadata__\":{\"format\":\"edkm\",\"edkm.version\":\"1\",\"edkm.layout\":";
  const std::string lay =
      "{\\\"w\\\":{\\\"bits\\\":3,\\\"shape\\\":[2,8],\\\"dtype\\\":\\\"float32\\\",\\\"groups\\\":1,"
      "\\\"cluster_dim\\\":1}}";
  const std::string w_entries =
      entry("w.indices", "U8", "[6]", "[0,6]") + "," + entry("w.lut", "F16", "[1,8,1]", "[6,22]");
  const std::vector<Case> cases = {
      {"[1]", 0, "header must be a JSON object"},
      {"{\"a\":", 0, "header is not valid JSON"},
      {"{" + entry("a", "F33", "[1]", "[0,4]") + "}", 4, "unsupported dtype 'F33'"},
      {"{" + entry("a", "F32", "[-1]", "[0,4]") + "}", 4, "shape dimension -1"},
      {"{" + entry("a", "F32", "[1.5]", "[0,4]") + "}", 4, "must be an integer"},
      {"{" + entry("a", "F32", "[99999999999999999999]", "[0,4]") + "}", 4, "must be an integer"},
      {"{" + entry("a", "F32", "[16777216,16777216,16777216]", "[0,4]") + "}", 4, "absurdly large"},
      {"{" + entry("a", "F32", "[1]", "[0,8]") + "}", 4, "outside the data section"},
      {"{" + entry("a", "F32", "[1]", "[4,0]") + "}", 4, "outside the data section"},
      {"{" + entry("a", "F32", "[1]", "[-4,0]") + "}", 4, "outside the data section"},
      {"{" + entry("a", "F32", "[1]", "[0,4,8]") + "}", 4, "data_offsets must be an array [begin, end]"},
      {"{" + entry("a", "F32", "[2]", "[0,4]") + "}", 4, "4 bytes do not hold F32 [2]"},
      {"{" + entry("a", "F32", "[1]", "[0,4]") + "," + entry("b", "F32", "[1]", "[0,4]") + "}", 8,
       "starts at byte 0 of the data section, expected 4"},
      {"{" + entry("a", "F32", "[1]", "[4,8]") + "}", 8, "starts at byte 4 of the data section, expected 0"},
      {"{" + entry("a", "F32", "[1]", "[0,4]") + "}", 8, "trailing data"},
      {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4],\"x\":1}}", 4,
       "exactly the keys dtype, shape, data_offsets"},
      {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1]}}", 0, "exactly the keys dtype, shape, data_offsets"},
      {"{\"a\":[]}", 0, "entry must be an object"},
      {"{\"__metadata__\":{\"k\":1}}", 0, "__metadata__['k'] must be a string"},
      {"{\"__metadata__\":[]}", 0, "__metadata__ must be an object"},
      {"{\"__metadata__\":{\"format\":\"edkm\",\"edkm.version\":\"3\"}}", 0, "edkm format version '3'"},
      {"{" + meta + "\"[\"}}", 0, "__metadata__['edkm.layout'] is not valid JSON"},
      {"{" + meta + "\"" + lay + "\"}}", 0, "the file has no tensor 'w.lut'"},
      {"{" + meta + "\"" + lay + "\"}," + entry("w.indices", "U8", "[5]", "[0,5]") + "," +
           entry("w.lut", "F16", "[1,8,1]", "[5,21]") + "}",
       21, "packed indices must be uint8 [ceil(16 * 3 / 8)] = [6]"},
      {"{" + meta + "\"" + lay + "\"}," + entry("w.indices", "U8", "[6]", "[0,6]") + "," +
           entry("w.lut", "F16", "[1,4,1]", "[6,14]") + "}",
       14, "lut must have shape [groups, 2^bits, cluster_dim] = [1, 8, 1]"},
      {"{" + meta + "\"{\\\"w\\\":{\\\"bits\\\":9}}\"}}", 0, "bits must be in 1..8"},
      {"{" + meta +
           "\"{\\\"w\\\":{\\\"bits\\\":3,\\\"shape\\\":[2,8],\\\"dtype\\\":\\\"int8\\\",\\\"groups\\\":1,"
           "\\\"cluster_dim\\\":1}}\"}}",
       0, "dtype must be one of bfloat16"},
      {"{" + meta +
           "\"{\\\"w\\\":{\\\"bits\\\":3,\\\"shape\\\":[2,8],\\\"dtype\\\":\\\"float32\\\",\\\"groups\\\":3,"
           "\\\"cluster_dim\\\":1}}\"}," +
           w_entries + "}",
       22, "cannot be cut into 3 groups"},
      {"{" + meta +
           "\"{\\\"w\\\":{\\\"bits\\\":3,\\\"shape\\\":[2,0],\\\"dtype\\\":\\\"float32\\\",\\\"groups\\\":1,"
           "\\\"cluster_dim\\\":1}}\"}}",
       0, "shape must be a non-empty array of positive integers"},
      {"{" + meta + "\"" + lay + "\",\"edkm.aliases\":\"{\\\"x\\\":\\\"nope\\\"}\"}," + w_entries + "}", 22,
       "alias 'x' points to unknown tensor 'nope'"},
  };
  for (const auto& c : cases) {
    write_all(path, raw_file(c.header, std::string(c.data, '\0')));
    const std::string msg = error_of([&] { edkm::load_compressed(path); });
    EXPECT_NE(msg.find(c.expect), std::string::npos)
        << "header: " << c.header << "\nexpected: " << c.expect << "\ngot: " << msg;
    EXPECT_NE(msg.find(path), std::string::npos) << msg;
  }
}

TEST(Format, HeaderLengthBeyondFileOrLimit) {
  TempDir dir;
  const auto path = dir.file("n.safetensors");
  std::string bytes(16, '\0');
  bytes[0] = 9;  // 9 > 8 bytes left
  write_all(path, bytes);
  EXPECT_ERROR_HAS(edkm::load_compressed(path), "header length 9 exceeds the file (16 bytes)");
  bytes.assign(8, '\xff');
  write_all(path, bytes);
  EXPECT_ERROR_HAS(edkm::load_compressed(path), "header length 18446744073709551615 exceeds the file");
  // A sparse 200 MB file that claims a 150 MB header: refused before reading it.
  {
    std::string head(8, '\0');
    const uint64_t n = 150000000;
    for (int b = 0; b < 8; ++b) head[b] = static_cast<char>(n >> (8 * b));
    write_all(path, head);
    ASSERT_EQ(::truncate(path.c_str(), 200000000), 0);
  }
  EXPECT_ERROR_HAS(edkm::load_compressed(path), "exceeds the limit of 100000000 bytes");
  EXPECT_ERROR_HAS(edkm::load_compressed(dir.file("missing")), "cannot open");
  EXPECT_ERROR_HAS(edkm::load_compressed(dir.path()), "is a directory");
}

TEST(Format, RandomCorruptionNeverCrashes) {
  TempDir dir;
  const auto path = dir.file("m.safetensors");
  edkm::save_compressed(path, sample_file());
  const std::string bytes = read_all(path);
  const size_t header_end =
      8 + static_cast<unsigned char>(bytes[0]) + 256 * static_cast<unsigned char>(bytes[1]);
  std::mt19937 rng(123);
  const auto bad = dir.file("bad.safetensors");
  int loaded = 0, rejected = 0;
  for (int trial = 0; trial < 1500; ++trial) {
    std::string b = bytes;
    const int flips = 1 + static_cast<int>(rng() % 4);
    for (int k = 0; k < flips; ++k) {
      // Mostly in the header (where the structure is), sometimes anywhere.
      const size_t at = (rng() % 4) ? rng() % header_end : rng() % b.size();
      b[at] = (rng() % 2) ? static_cast<char>(rng()) : static_cast<char>(b[at] ^ (1 << (rng() % 8)));
    }
    write_all(bad, b);
    try {
      const auto f = edkm::load_compressed(bad);
      (void)f.state_dict();  // whatever loads must also rebuild
      ++loaded;
    } catch (const c10::Error&) {
      ++rejected;
    }
  }
  EXPECT_GT(rejected, 1000);
  EXPECT_GT(loaded, 0);  // e.g. flips inside tensor data or padding spaces
}

// ------------------------------------------------------------------------------ bad saves

TEST(Format, BadSavesAreClearErrorsAndLeaveTheOldFile) {
  TempDir dir;
  const auto path = dir.file("m.safetensors");
  edkm::save_compressed(path, sample_file());
  const std::string before = read_all(path);

  auto expect_refused = [&](edkm::CompressedFile f, const std::string& text) {
    EXPECT_ERROR_HAS(edkm::save_compressed(path, f), text);
    EXPECT_EQ(read_all(path), before);
    EXPECT_EQ(dir.files(), std::vector<std::string>{"m.safetensors"});
  };
  auto f = sample_file();
  f.tensors["layer.weight.lut"] = torch::zeros({1});
  expect_refused(f, "collides with the stored form of a clustered tensor");
  f = sample_file();
  f.tensors["layer.weight"] = torch::zeros({1});
  expect_refused(f, "is both a clustered and a plain tensor");
  f = sample_file();
  f.tensors["c"] = torch::zeros({2}, torch::kComplexFloat);
  expect_refused(f, "which the file cannot store");
  f = sample_file();
  f.tensors["__metadata__"] = torch::zeros({1});
  expect_refused(f, "'__metadata__' is reserved");
  f = sample_file();
  f.metadata["edkm.layout"] = "{}";
  expect_refused(f, "metadata key 'edkm.layout' is reserved");
  f = sample_file();
  f.aliases["x"] = "nope";
  expect_refused(f, "alias 'x' points to 'nope', which is not a stored tensor");
  f = sample_file();
  f.aliases["bias"] = "step";
  expect_refused(f, "alias 'bias' is also the name of a stored tensor");
  f = sample_file();
  f.tensors["bad\xff"] = torch::zeros({1});
  expect_refused(f, "is not valid UTF-8");
  f = sample_file();
  f.clustered["layer.weight"].bits = 4;
  expect_refused(f, "clustered tensor 'layer.weight': lut must have shape");
  f = sample_file();
  f.clustered["layer.weight"].lut = f.clustered["layer.weight"].lut.to(torch::kFloat);
  expect_refused(f, "lut must be float16");
  f = sample_file();
  f.clustered["layer.weight"].lut[0][0][0] = std::numeric_limits<float>::infinity();
  expect_refused(f, "lut has NaN or Inf");
  f = sample_file();
  f.clustered["layer.weight"].packed = f.clustered["layer.weight"].packed.narrow(0, 0, 5);
  expect_refused(f, "packed indices must be uint8 [ceil(60 * 3 / 8)] = [23]");
  f = sample_file();
  f.clustered["layer.weight"].packed[22] = 0xF0;  // 180 bits: the top 4 bits of byte 22 unused
  expect_refused(f, "unused high bits");
  f = sample_file();
  f.clustered["layer.weight"].groups = 7;
  expect_refused(f, "cannot be cut into 7 groups");
  f = sample_file();
  f.clustered["layer.weight"].dtype = torch::kInt;
  expect_refused(f, "dtype must be bfloat16, float16, float32 or float64");
  f = sample_file();
  f.clustered["layer.weight"].shape = {6, -10};
  expect_refused(f, "every shape dimension must be > 0");

  EXPECT_ERROR_HAS(edkm::save_compressed(dir.path(), sample_file()), "is a directory");
  EXPECT_ERROR_HAS(edkm::save_compressed(dir.file("no/such/dir/m.safetensors"), sample_file()),
                   "cannot create a temporary file in");
}

}  // namespace

// A clustered weight runs as stored: lut_linear / lut_embedding equal linear / indexing of the
// rebuilt weight (float64 oracle), for 3-bit row groups with outliers, batch 1 and 12.
TEST(PackedRuntime, LutLinearAndEmbeddingMatchTheRebuiltWeight) {
  torch::manual_seed(0);
  edkm::ClusteredTensor w;
  w.bits = 3;
  w.shape = {48, 40};
  w.dtype = at::kBFloat16;
  w.groups = 6;
  w.lut = torch::randn({6, 8, 1}).to(at::kHalf);
  w.packed = edkm::pack_indices(torch::randint(0, 8, {48 * 40}), 3);
  w.outlier_index = torch::tensor({3, 100, 1919}, torch::kInt32);
  w.outlier_values = torch::randn({3}).to(at::kBFloat16);
  w.check("w");
  const auto dense = w.dequantize().to(at::kDouble);
  for (int64_t batch : {1, 12}) {
    const auto x = torch::randn({batch, 40});
    const auto bias = torch::randn({48});
    const auto y = edkm::lut_linear(x, w, bias);
    const auto ref = at::linear(x.to(at::kDouble), dense, bias.to(at::kDouble));
    EXPECT_TRUE(torch::allclose(y.to(at::kDouble), ref, 1e-5, 1e-5)) << "batch " << batch;
  }
  const auto ids = torch::tensor({0, 47, 2}, torch::kLong);
  const auto e = edkm::lut_embedding(ids, w);
  EXPECT_EQ(e.scalar_type(), at::kBFloat16);
  EXPECT_TRUE(torch::equal(e.to(at::kDouble), dense.index_select(0, ids)));
  EXPECT_THROW(edkm::lut_linear(torch::randn({2, 41}), w), c10::ValueError);
}
