// The weight-warming notes (weight_warm.h): per KV cache, the weights read between its decode attention
// and the next one.
#include "weight_warm.h"
#include <algorithm>
#include <mutex>
#include <unordered_map>

namespace {
std::mutex mu;
std::unordered_map<const void*, WarmSpans> after;
const void* last = nullptr;
}  // namespace

void warm_note_weight(const void* p, int64_t bytes) {
  std::lock_guard<std::mutex> g(mu);
  if (!last) return;
  WarmSpans& w = after[last];
  const char* c = static_cast<const char*>(p);
  if (std::any_of(w.begin(), w.end(), [c](const auto& s) { return s.first == c; })) return;
  if (w.size() >= 16) w.clear();  // weights reallocated: start over
  w.emplace_back(c, bytes);
}

void warm_note_attention(const void* cache) {
  std::lock_guard<std::mutex> g(mu);
  last = cache;
}

WarmSpans warm_after(const void* cache) {
  std::lock_guard<std::mutex> g(mu);
  auto it = after.find(cache);
  if (it == after.end()) return {};
  WarmSpans out;
  int64_t total = 0;
  for (const auto& s : it->second) {
    if (total + s.second > kWarmMax) break;
    out.push_back(s), total += s.second;
  }
  return out;
}
