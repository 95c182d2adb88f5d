// A small, strict JSON (RFC 8259) parser and string quoting, for safetensors headers.
// Internal to libedkm. Strict: exactly one value (plus whitespace), no trailing commas,
// comments, NaN/Infinity, leading zeros or control characters in strings; strings must be
// valid UTF-8 (\uXXXX escapes included, surrogates paired); duplicate object keys are errors.
// Bounded: input size, nesting depth and the number of values are limited, so hostile input
// can neither exhaust the stack nor make it allocate more than a small multiple of its size.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace edkm {
namespace json {

struct Limits {
  size_t max_bytes = 100000000;  // safetensors' own header limit
  int max_depth = 64;
  size_t max_values = size_t(1) << 21;
};

class ParseError : public std::runtime_error {
 public:
  ParseError(const std::string& what, size_t offset)
      : std::runtime_error(what + " at byte " + std::to_string(offset)), offset_(offset) {}
  size_t offset() const { return offset_; }

 private:
  size_t offset_;
};

struct Value {
  enum class Type { kNull, kBool, kNumber, kString, kArray, kObject };
  Type type = Type::kNull;
  bool boolean = false;
  // Numbers: `number` always; `integer` too when the literal has no fraction or exponent
  // and fits in int64 (`is_integer`).
  double number = 0;
  int64_t integer = 0;
  bool is_integer = false;
  std::string string;
  std::vector<Value> array;
  std::vector<std::pair<std::string, Value>> object;  // in document order, keys unique

  bool is_null() const { return type == Type::kNull; }
  bool is_string() const { return type == Type::kString; }
  bool is_array() const { return type == Type::kArray; }
  bool is_object() const { return type == Type::kObject; }
  // Member `key` of an object, or nullptr.
  const Value* find(const std::string& key) const;
};

// Parses `text` (UTF-8). Throws ParseError saying what and where.
Value parse(const std::string& text, const Limits& limits = Limits());

// A JSON string literal for `s` (quotes included). Throws std::invalid_argument when `s` is not
// valid UTF-8.
std::string quote(const std::string& s);

// True when `s` is valid UTF-8 (no overlong forms, surrogates or code points above U+10FFFF).
bool valid_utf8(const std::string& s);

// Short human-readable name of a value's type ("string", "array", ...).
const char* type_name(const Value& v);

}  // namespace json
}  // namespace edkm
