#include "format/json.h"

#include <charconv>
#include <cmath>
#include <limits>
#include <unordered_set>

namespace edkm {
namespace json {

namespace {

// Length of the valid UTF-8 sequence starting at s[i] (1..4), or 0 when it is invalid.
size_t utf8_sequence(const std::string& s, size_t i) {
  const auto at = [&](size_t k) { return static_cast<unsigned char>(s[k]); };
  const unsigned char c = at(i);
  if (c < 0x80) return 1;
  size_t len;
  uint32_t cp;
  if (c >= 0xC2 && c <= 0xDF)
    len = 2, cp = c & 0x1F;
  else if (c >= 0xE0 && c <= 0xEF)
    len = 3, cp = c & 0x0F;
  else if (c >= 0xF0 && c <= 0xF4)
    len = 4, cp = c & 0x07;
  else
    return 0;
  if (s.size() - i < len) return 0;
  for (size_t k = 1; k < len; ++k) {
    const unsigned char b = at(i + k);
    if ((b & 0xC0) != 0x80) return 0;
    cp = (cp << 6) | (b & 0x3F);
  }
  if ((len == 3 && cp < 0x800) || (len == 4 && cp < 0x10000)) return 0;  // overlong
  if (cp >= 0xD800 && cp <= 0xDFFF) return 0;                            // surrogate
  if (cp > 0x10FFFF) return 0;
  return len;
}

void append_utf8(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

class Parser {
 public:
  Parser(const std::string& text, const Limits& limits) : s_(text), limits_(limits) {}

  Value parse_document() {
    if (s_.size() > limits_.max_bytes) {
      throw ParseError("JSON text of " + std::to_string(s_.size()) + " bytes exceeds the limit of " +
                           std::to_string(limits_.max_bytes),
                       0);
    }
    Value v;
    skip_ws();
    parse_value(v, 0);
    skip_ws();
    if (i_ != s_.size()) fail("unexpected text after the JSON value");
    return v;
  }

 private:
  [[noreturn]] void fail(const std::string& what) const { throw ParseError(what, i_); }

  bool at_end() const { return i_ >= s_.size(); }
  char peek() const { return s_[i_]; }

  void skip_ws() {
    while (!at_end() && (peek() == ' ' || peek() == '\t' || peek() == '\n' || peek() == '\r')) ++i_;
  }

  void expect_literal(const char* word) {
    for (const char* p = word; *p; ++p) {
      if (at_end() || peek() != *p) fail(std::string("invalid literal (expected '") + word + "')");
      ++i_;
    }
  }

  void count_value() {
    if (++values_ > limits_.max_values) {
      fail("more than " + std::to_string(limits_.max_values) + " JSON values");
    }
  }

  void parse_value(Value& v, int depth) {
    if (at_end()) fail("unexpected end of JSON text");
    count_value();
    switch (peek()) {
      case '{':
        parse_object(v, depth + 1);
        return;
      case '[':
        parse_array(v, depth + 1);
        return;
      case '"':
        v.type = Value::Type::kString;
        parse_string(v.string);
        return;
      case 't':
        expect_literal("true");
        v.type = Value::Type::kBool;
        v.boolean = true;
        return;
      case 'f':
        expect_literal("false");
        v.type = Value::Type::kBool;
        v.boolean = false;
        return;
      case 'n':
        expect_literal("null");
        v.type = Value::Type::kNull;
        return;
      default:
        if (peek() == '-' || (peek() >= '0' && peek() <= '9')) {
          parse_number(v);
          return;
        }
        fail(std::string("unexpected character '") + printable(peek()) + "'");
    }
  }

  static std::string printable(char c) {
    const auto u = static_cast<unsigned char>(c);
    if (u >= 0x20 && u < 0x7F) return std::string(1, c);
    const char* hex = "0123456789abcdef";
    return std::string("\\x") + hex[u >> 4] + hex[u & 15];
  }

  void check_depth(int depth) {
    if (depth > limits_.max_depth) {
      fail("JSON nested deeper than " + std::to_string(limits_.max_depth) + " levels");
    }
  }

  void parse_object(Value& v, int depth) {
    check_depth(depth);
    v.type = Value::Type::kObject;
    ++i_;  // '{'
    skip_ws();
    if (!at_end() && peek() == '}') {
      ++i_;
      return;
    }
    std::unordered_set<std::string> keys;
    while (true) {
      skip_ws();
      if (at_end() || peek() != '"') fail("expected a string key in object");
      const size_t key_at = i_;
      std::string key;
      parse_string(key);
      if (!keys.insert(key).second) {
        throw ParseError("duplicate object key " + quote(key), key_at);
      }
      skip_ws();
      if (at_end() || peek() != ':') fail("expected ':' after object key");
      ++i_;
      skip_ws();
      v.object.emplace_back(std::move(key), Value());
      parse_value(v.object.back().second, depth);
      skip_ws();
      if (at_end()) fail("unexpected end of JSON text in object");
      if (peek() == ',') {
        ++i_;
        continue;
      }
      if (peek() == '}') {
        ++i_;
        return;
      }
      fail("expected ',' or '}' in object");
    }
  }

  void parse_array(Value& v, int depth) {
    check_depth(depth);
    v.type = Value::Type::kArray;
    ++i_;  // '['
    skip_ws();
    if (!at_end() && peek() == ']') {
      ++i_;
      return;
    }
    while (true) {
      skip_ws();
      v.array.emplace_back();
      parse_value(v.array.back(), depth);
      skip_ws();
      if (at_end()) fail("unexpected end of JSON text in array");
      if (peek() == ',') {
        ++i_;
        continue;
      }
      if (peek() == ']') {
        ++i_;
        return;
      }
      fail("expected ',' or ']' in array");
    }
  }

  uint32_t parse_hex4() {
    if (s_.size() - i_ < 4) fail("truncated \\u escape");
    uint32_t cp = 0;
    for (int k = 0; k < 4; ++k) {
      const char c = s_[i_ + k];
      cp <<= 4;
      if (c >= '0' && c <= '9')
        cp |= c - '0';
      else if (c >= 'a' && c <= 'f')
        cp |= c - 'a' + 10;
      else if (c >= 'A' && c <= 'F')
        cp |= c - 'A' + 10;
      else
        fail("invalid hex digit in \\u escape");
    }
    i_ += 4;
    return cp;
  }

  void parse_string(std::string& out) {
    ++i_;  // opening quote
    while (true) {
      if (at_end()) fail("unterminated string");
      const auto c = static_cast<unsigned char>(peek());
      if (c == '"') {
        ++i_;
        return;
      }
      if (c < 0x20) fail("unescaped control character in string");
      if (c == '\\') {
        ++i_;
        if (at_end()) fail("unterminated escape in string");
        const char e = peek();
        ++i_;
        switch (e) {
          case '"':
            out += '"';
            break;
          case '\\':
            out += '\\';
            break;
          case '/':
            out += '/';
            break;
          case 'b':
            out += '\b';
            break;
          case 'f':
            out += '\f';
            break;
          case 'n':
            out += '\n';
            break;
          case 'r':
            out += '\r';
            break;
          case 't':
            out += '\t';
            break;
          case 'u': {
            uint32_t cp = parse_hex4();
            if (cp >= 0xDC00 && cp <= 0xDFFF) fail("unpaired low surrogate in \\u escape");
            if (cp >= 0xD800 && cp <= 0xDBFF) {
              if (s_.size() - i_ < 2 || s_[i_] != '\\' || s_[i_ + 1] != 'u') {
                fail("unpaired high surrogate in \\u escape");
              }
              i_ += 2;
              const uint32_t lo = parse_hex4();
              if (lo < 0xDC00 || lo > 0xDFFF) fail("high surrogate not followed by a low one");
              cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
            }
            append_utf8(out, cp);
            break;
          }
          default:
            --i_;
            fail(std::string("invalid escape '\\") + printable(e) + "' in string");
        }
        continue;
      }
      const size_t len = utf8_sequence(s_, i_);
      if (len == 0) fail("invalid UTF-8 in string");
      out.append(s_, i_, len);
      i_ += len;
    }
  }

  void parse_number(Value& v) {
    const size_t start = i_;
    bool negative = false, integral = true;
    if (peek() == '-') {
      negative = true;
      ++i_;
    }
    if (at_end() || !isdigit(peek())) fail("invalid number");
    if (peek() == '0') {
      ++i_;
      if (!at_end() && isdigit(peek())) fail("invalid number (leading zero)");
    } else {
      while (!at_end() && isdigit(peek())) ++i_;
    }
    if (!at_end() && peek() == '.') {
      integral = false;
      ++i_;
      if (at_end() || !isdigit(peek())) fail("invalid number (digits expected after '.')");
      while (!at_end() && isdigit(peek())) ++i_;
    }
    if (!at_end() && (peek() == 'e' || peek() == 'E')) {
      integral = false;
      ++i_;
      if (!at_end() && (peek() == '+' || peek() == '-')) ++i_;
      if (at_end() || !isdigit(peek())) fail("invalid number (digits expected in exponent)");
      while (!at_end() && isdigit(peek())) ++i_;
    }
    v.type = Value::Type::kNumber;
    const char* first = s_.data() + start;
    const char* last = s_.data() + i_;
    const auto res = std::from_chars(first, last, v.number);
    if (res.ec == std::errc::result_out_of_range) {
      // Too large (or tiny) for a double: keep the sign, infinite or zero.
      v.number = std::numeric_limits<double>::infinity();
      for (const char* p = first; p < last; ++p) {
        if (*p == 'e' || *p == 'E') {
          if (p[1] == '-') v.number = 0;
          break;
        }
      }
      if (negative) v.number = -v.number;
    } else if (res.ec != std::errc() || res.ptr != last) {
      throw ParseError("invalid number", start);
    }
    if (integral) {
      // Exact int64 when it fits (digits accumulated as unsigned, overflow detected).
      uint64_t mag = 0;
      bool fits = true;
      for (const char* p = first + (negative ? 1 : 0); p < last; ++p) {
        const uint64_t d = static_cast<uint64_t>(*p - '0');
        if (mag > (std::numeric_limits<uint64_t>::max() - d) / 10) {
          fits = false;
          break;
        }
        mag = mag * 10 + d;
      }
      const uint64_t limit = negative ? uint64_t(1) << 63 : (uint64_t(1) << 63) - 1;
      if (fits && mag <= limit) {
        v.is_integer = true;
        v.integer = negative ? static_cast<int64_t>(0 - mag) : static_cast<int64_t>(mag);
      }
    }
  }

  static bool isdigit(char c) { return c >= '0' && c <= '9'; }

  const std::string& s_;
  const Limits& limits_;
  size_t i_ = 0;
  size_t values_ = 0;
};

}  // namespace

const Value* Value::find(const std::string& key) const {
  for (const auto& member : object) {
    if (member.first == key) return &member.second;
  }
  return nullptr;
}

Value parse(const std::string& text, const Limits& limits) { return Parser(text, limits).parse_document(); }

bool valid_utf8(const std::string& s) {
  for (size_t i = 0; i < s.size();) {
    const size_t len = utf8_sequence(s, i);
    if (len == 0) return false;
    i += len;
  }
  return true;
}

std::string quote(const std::string& s) {
  if (!valid_utf8(s)) throw std::invalid_argument("string is not valid UTF-8");
  std::string out = "\"";
  for (const char ch : s) {
    const auto c = static_cast<unsigned char>(ch);
    switch (ch) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\b':
        out += "\\b";
        break;
      case '\f':
        out += "\\f";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\r':
        out += "\\r";
        break;
      case '\t':
        out += "\\t";
        break;
      default:
        if (c < 0x20) {
          const char* hex = "0123456789abcdef";
          out += "\\u00";
          out += hex[c >> 4];
          out += hex[c & 15];
        } else {
          out += ch;
        }
    }
  }
  out += '"';
  return out;
}

const char* type_name(const Value& v) {
  switch (v.type) {
    case Value::Type::kNull:
      return "null";
    case Value::Type::kBool:
      return "boolean";
    case Value::Type::kNumber:
      return "number";
    case Value::Type::kString:
      return "string";
    case Value::Type::kArray:
      return "array";
    default:
      return "object";
  }
}

}  // namespace json
}  // namespace edkm
