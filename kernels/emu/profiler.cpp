// profiler.cpp: warp-level memory metrics of emulated kernels (see profiler.h).
//
// Per request (one warp, one access site, one occurrence):
//   global: bytes requested and distinct 32-byte sectors (32 lanes x 4 B coalesced = 4);
//   shared: bank-conflict degree = the largest number of distinct 4-byte words that fall in
//           one of the 32 banks (1 = conflict-free for 4-byte accesses; 8- and 16-byte
//           accesses need at least 2 and 4 since a warp then reads 256 or 512 bytes).
// Per launch: the same summed per site and per (space, access), the unique global bytes
// loaded and stored (the traffic floor if each byte were fetched once), atomics, local bytes.
// Not modelled: L1/L2 hits, timing, occupancy.
#include "profiler.h"

#include "racecheck.h"

#include <algorithm>
#include <map>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace cuemu::profiler {
namespace {

struct Traffic {
  uint64_t requests, lane_accesses, bytes, sectors, bank_degree_sum, max_bank_degree;
  void add(const Traffic& o) {
    requests += o.requests;
    lane_accesses += o.lane_accesses;
    bytes += o.bytes;
    sectors += o.sectors;
    bank_degree_sum += o.bank_degree_sum;
    max_bank_degree = std::max(max_bank_degree, o.max_bank_degree);
  }
};

struct LaneAccess {
  uint64_t addr;
  uint32_t bytes;
  Space space;
};

struct RequestKey {
  uint64_t site;
  uint32_t warp, occurrence;
  Access access;
  bool operator==(const RequestKey&) const = default;
};
struct RequestKeyHash {
  size_t operator()(const RequestKey& k) const {
    uint64_t h = k.site * 0x9E3779B97F4A7C15ull;
    h ^= (uint64_t(k.warp) << 40 | uint64_t(k.occurrence) << 2 | uint64_t(k.access)) * 0xC2B2AE3D27D4EB4Full;
    return size_t(h ^ (h >> 29));
  }
};

struct SiteKey {
  uint64_t site;
  Access access;
  Space space;
  auto operator<=>(const SiteKey&) const = default;
};

}  // namespace

struct LaunchProfile {
  std::map<SiteKey, std::pair<uint32_t, Traffic>> sites;  // first-seen order, traffic
  Traffic totals[4][3] = {};                               // [space][access]
  std::unordered_map<uint64_t, uint32_t> loaded, stored;   // sector -> byte mask (global)
  uint64_t unique_loaded = 0, unique_stored = 0;
};

namespace {

std::mutex g_mutex;              // launches are serial; this guards the rare stray callback
LaunchProfile* g_profile = nullptr;
std::unordered_map<RequestKey, std::vector<LaneAccess>, RequestKeyHash> g_requests;
std::vector<std::unordered_map<uint64_t, uint32_t>> g_occurrences;  // per thread: site -> count
std::map<uintptr_t, size_t> g_buffers;                              // registered global memory

extern "C" char __start_cuemu_shared[] __attribute__((weak));
extern "C" char __stop_cuemu_shared[] __attribute__((weak));

Space classify(uint64_t a, const LaneView& lane) {
  auto inside = [a](const void* lo, size_t n) {
    return a >= reinterpret_cast<uintptr_t>(lo) && a < reinterpret_cast<uintptr_t>(lo) + n;
  };
  if (inside(lane.stack_lo, lane.stack_size)) return Space::Local;
  if (inside(lane.dynamic_shared, lane.dynamic_shared_bytes)) return Space::Shared;
  if (__start_cuemu_shared && inside(__start_cuemu_shared, size_t(__stop_cuemu_shared - __start_cuemu_shared)))
    return Space::Shared;
  auto it = g_buffers.upper_bound(a);
  if (it != g_buffers.begin() && a < std::prev(it)->first + std::prev(it)->second) return Space::Global;
  return Space::Other;
}

void mark_unique(std::unordered_map<uint64_t, uint32_t>& set, uint64_t& unique, uint64_t addr, uint32_t bytes) {
  for (uint64_t a = addr; a < addr + bytes; ++a) {
    uint32_t& mask = set[a >> 5];
    const uint32_t bit = 1u << (a & 31);
    unique += !(mask & bit);
    mask |= bit;
  }
}

Traffic measure(const std::vector<LaneAccess>& lanes, Space space) {
  Traffic t{};
  t.requests = 1;
  t.lane_accesses = lanes.size();
  std::vector<uint64_t> units;  // sectors (global) or 4-byte words (shared)
  for (const LaneAccess& l : lanes) {
    t.bytes += l.bytes;
    const unsigned shift = space == Space::Shared ? 2 : 5;
    for (uint64_t u = l.addr >> shift; u <= (l.addr + l.bytes - 1) >> shift; ++u) units.push_back(u);
  }
  std::sort(units.begin(), units.end());
  units.erase(std::unique(units.begin(), units.end()), units.end());
  if (space == Space::Shared) {
    unsigned per_bank[32] = {};
    for (uint64_t w : units) ++per_bank[w & 31];
    t.max_bank_degree = *std::max_element(per_bank, per_bank + 32);
    t.bank_degree_sum = t.max_bank_degree;
  } else {
    t.sectors = units.size();
  }
  return t;
}

}  // namespace

LaunchProfile* launch_begin() {
  std::lock_guard<std::mutex> lock(g_mutex);
  g_profile = new LaunchProfile();
  return g_profile;
}

void launch_end() {
  std::lock_guard<std::mutex> lock(g_mutex);
  g_profile = nullptr;
}

void block_begin(unsigned threads) {
  std::lock_guard<std::mutex> lock(g_mutex);
  g_requests.clear();
  g_occurrences.assign(threads, {});
}

void block_end() {
  std::lock_guard<std::mutex> lock(g_mutex);
  LaunchProfile& p = *g_profile;
  for (auto& [key, lanes] : g_requests) {
    const Space space = lanes.front().space;
    const Traffic t = measure(lanes, space);
    auto [it, fresh] = p.sites.try_emplace(SiteKey{key.site, key.access, space}, uint32_t(p.sites.size()), Traffic{});
    it->second.second.add(t);
    p.totals[int(space)][int(key.access)].add(t);
    if (space == Space::Global)
      for (const LaneAccess& l : lanes) {
        if (key.access != Access::Store) mark_unique(p.loaded, p.unique_loaded, l.addr, l.bytes);
        if (key.access != Access::Load) mark_unique(p.stored, p.unique_stored, l.addr, l.bytes);
      }
  }
  g_requests.clear();
}

void record(const void* addr, unsigned bytes, Access access, uintptr_t site) {
  LaneView lane;
  if (!g_profile || !current_lane(&lane)) return;
  std::lock_guard<std::mutex> lock(g_mutex);
  const uint64_t a = reinterpret_cast<uintptr_t>(addr);
  uint32_t& occurrence = g_occurrences[lane.thread][site << 2 | uint64_t(access)];
  g_requests[RequestKey{site, lane.warp, occurrence++, access}].push_back({a, bytes, classify(a, lane)});
}

}  // namespace cuemu::profiler

// ------------------------------------------------------------------ coverage callbacks
// clang calls these before every load and store of an instrumented kernel file; the
// return address identifies the access site. The race detector (racecheck.h) sees them too.
using cuemu::profiler::Access;
namespace racecheck = cuemu::racecheck;
#define CUEMU_TRACE(N, T)                                                                    \
  extern "C" void __sanitizer_cov_load##N(T* p) {                                            \
    const uintptr_t site = uintptr_t(__builtin_return_address(0));                          \
    cuemu::profiler::record(p, N, Access::Load, site);                                       \
    if (racecheck::on) racecheck::access(p, N, racecheck::Kind::Load, site);                 \
  }                                                                                          \
  extern "C" void __sanitizer_cov_store##N(T* p) {                                           \
    const uintptr_t site = uintptr_t(__builtin_return_address(0));                          \
    cuemu::profiler::record(p, N, Access::Store, site);                                      \
    if (racecheck::on) racecheck::access(p, N, racecheck::Kind::Store, site);                \
  }
CUEMU_TRACE(1, uint8_t)
CUEMU_TRACE(2, uint16_t)
CUEMU_TRACE(4, uint32_t)
CUEMU_TRACE(8, uint64_t)
CUEMU_TRACE(16, __int128)
#undef CUEMU_TRACE
// trace-loads/stores ride on a coverage mode; the edge guards themselves are not used.
extern "C" void __sanitizer_cov_trace_pc_guard_init(uint32_t*, uint32_t*) {}
extern "C" void __sanitizer_cov_trace_pc_guard(uint32_t*) {}

// ------------------------------------------------------------------ C API (src/device/profile.rs)
struct cuemu_traffic {
  uint64_t requests, lane_accesses, bytes, sectors, bank_degree_sum, max_bank_degree;
};
struct cuemu_site {
  uint64_t site;
  uint32_t order;
  uint8_t space, access;
  uint16_t reserved;
  cuemu_traffic traffic;
};
struct cuemu_totals {
  cuemu_traffic traffic[4][3];
  uint64_t unique_global_load_bytes, unique_global_store_bytes, site_count;
};
static_assert(sizeof(cuemu_traffic) == sizeof(uint64_t) * 6);

static cuemu_traffic to_c(const cuemu::profiler::Traffic& t) {
  return {t.requests, t.lane_accesses, t.bytes, t.sectors, t.bank_degree_sum, t.max_bank_degree};
}

extern "C" void cuemu_profile_totals(const cuemu::profiler::LaunchProfile* p, cuemu_totals* out) {
  for (int s = 0; s < 4; ++s)
    for (int a = 0; a < 3; ++a) out->traffic[s][a] = to_c(p->totals[s][a]);
  out->unique_global_load_bytes = p->unique_loaded;
  out->unique_global_store_bytes = p->unique_stored;
  out->site_count = p->sites.size();
}

// Copies min(capacity, site count) sites, in first-seen order.
extern "C" void cuemu_profile_sites(const cuemu::profiler::LaunchProfile* p, cuemu_site* out, uint64_t capacity) {
  for (const auto& [key, value] : p->sites) {
    if (value.first >= capacity) continue;
    out[value.first] = {key.site, value.first, uint8_t(key.space), uint8_t(key.access), 0, to_c(value.second)};
  }
}

extern "C" void cuemu_profile_free(cuemu::profiler::LaunchProfile* p) { delete p; }

// Global memory is what the device allocated: Rust registers every emulator buffer.
extern "C" void cuemu_register_buffer(const void* p, size_t bytes) {
  std::lock_guard<std::mutex> lock(cuemu::profiler::g_mutex);
  cuemu::profiler::g_buffers[reinterpret_cast<uintptr_t>(p)] = bytes;
}
extern "C" void cuemu_unregister_buffer(const void* p) {
  std::lock_guard<std::mutex> lock(cuemu::profiler::g_mutex);
  cuemu::profiler::g_buffers.erase(reinterpret_cast<uintptr_t>(p));
}
