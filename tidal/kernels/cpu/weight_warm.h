// Weights that the next ops will read, pulled toward the cache while a decode attention kernel runs.
// oneDNN's GEMMs do not overlap fetching cold weights with compute: an int8 [3072, 576] matrix at 40 rows
// takes 213 us from cache and 292 us from DRAM. The decode attention kernels, meanwhile, leave memory
// bandwidth idle (they wait on the latency of scattered KV rows). So each linear notes the weight it is
// about to read against the last decode attention's KV cache (which names the layer), and the next
// step's attention over that cache prefetches those bytes: each thread its share, a few lines at each of
// its kernel's steps. Learned, not declared, so no model code changes; a stale entry only costs prefetches
// (which never fault).
#pragma once
#include <cstdint>
#include <utility>
#include <vector>

using WarmSpans = std::vector<std::pair<const char*, int64_t>>;
void warm_note_weight(const void* p, int64_t bytes);  // a linear is about to read these bytes
void warm_note_attention(const void* cache);          // a decode attention over this cache has run
WarmSpans warm_after(const void* cache);              // what was read after it last time (at most kWarmMax bytes)
constexpr int64_t kWarmMax = 8 << 20;
