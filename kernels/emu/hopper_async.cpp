// hopper_async.cpp: mbarrier, TMA and bulk copies on the CPU (the model is in hopper_async.h).
//
// State is per OS thread, which runs one block at a time: the block's barrier table, the
// loads in flight (each bound to a barrier) and, per CUDA thread, its stores in flight with
// their bulk groups. block_begin resets it, so an abandoned block leaves nothing behind.
//
// An mbarrier word holds kTagHigh | generation << 32 | index: the block generation tells a
// barrier of this block from the leftovers of an earlier one in static shared memory, and a
// word whose tag is gone (never initialised, or overwritten by ordinary stores or a copy)
// fails the launch at its next use.
//
// The race detector (profiling build, racecheck.h) hears of each arrival (a release into the
// phase's clock), each wait that sees its phase complete (an acquire of the last completed
// phase's clock), each load landing (a write by its issuer, checked with what the issuer knew
// at the issue) and each store landing (a read of its shared source, likewise).
#include "cuemu.h"
#include "racecheck.h"
#include "swizzle.cuh"
#ifdef CUEMU_PROFILE
#include "profiler.h"
#define CUEMU_RACECHECK(call) (racecheck::on ? racecheck::call : void())
#define CUEMU_RACECHECK_ISSUE(site) racecheck::issue(site)
#else
#define CUEMU_RACECHECK(call) void()
#define CUEMU_RACECHECK_ISSUE(site) racecheck::Issue{}
#endif

#include <cstdarg>
#include <cstdio>
#include <vector>

namespace cuemu {
namespace {

constexpr uint64_t kTagHigh = 0x4d42ull << 48;  // "MB"
constexpr unsigned char kPoison = 0xFF;

struct Barrier {
  uint64_t* word;
  Site init;
  unsigned count, pending;
  int64_t tx;              // bytes expected minus bytes counted in this phase (may dip below 0)
  uint64_t phase;          // phases completed so far; the current phase's parity is phase & 1
  std::vector<size_t> counted;  // loads counted in this phase: they land when it completes
  racecheck::Clock arrivals, completed;  // this phase's releases; the last completed phase's
};

struct Load {
  unsigned barrier;
  unsigned char* dst;
  std::vector<unsigned char> bytes;  // the destination's final contents, read at issue
  Site site;                         // where and by whom it was issued
  unsigned thread;
  racecheck::Issue issue;
};

struct Store {
  uintptr_t site;  // the caller, for the memory profiler
  unsigned group;
  bool tensor;
  EmuTensorMap map;  // a copy: the kernel's parameter may be gone when the store lands
  int coords[5];
  void* gmem;
  const void* smem;
  unsigned bytes;
  racecheck::Issue issue;
};

struct ThreadCopies {
  unsigned committed = 0;
  std::vector<Store> stores;
};

struct BlockState {
  uint16_t generation = 0;
  std::vector<Barrier> barriers;
  std::vector<Load> loads;  // in issue order; entries stay until block_begin
  size_t uncounted = 0;     // loads[uncounted..] have not been counted on their barrier yet
  std::vector<ThreadCopies> threads;
};
thread_local BlockState tl_block;

// Fails the launch with a message that ends with the kernel line `site` and the CUDA thread
// that executed it.
[[noreturn]] void vfail_by(Site site, unsigned thread, const char* fmt, va_list args) {
  char msg[1024];
  int n = vsnprintf(msg, sizeof msg, fmt, args);
  if (n >= 0 && size_t(n) < sizeof msg)
    snprintf(msg + n, sizeof msg - size_t(n), " (%s:%d, CUDA thread %u)", site.file, site.line, thread);
  fail(msg);
}
[[noreturn]] __attribute__((format(printf, 3, 4))) void fail_by(Site site, unsigned thread, const char* fmt, ...) {
  va_list args;
  va_start(args, fmt);
  vfail_by(site, thread, fmt, args);
}
// The same for the running thread.
[[noreturn]] __attribute__((format(printf, 2, 3))) void fail_at(Site site, const char* fmt, ...) {
  va_list args;
  va_start(args, fmt);
  vfail_by(site, sched::thread_index(), fmt, args);
}

void describe(const Barrier& b, char* out, size_t len) {
  snprintf(out, len,
           "mbarrier %p (initialised at %s:%d) in phase %llu (parity %u): %u of %u arrivals pending, "
           "tx-count %lld bytes",
           static_cast<void*>(b.word), b.init.file, b.init.line, (unsigned long long)b.phase, unsigned(b.phase & 1),
           b.pending, b.count, (long long)b.tx);
}

Barrier& barrier_at(uint64_t* word, Site site, const char* op) {
  if (reinterpret_cast<uintptr_t>(word) & 7) fail_at(site, "%s: mbarrier address %p is not 8-byte aligned", op, word);
  const uint64_t v = *word;
  BlockState& s = tl_block;
  const unsigned index = unsigned(v);
  if ((v & ~0xffffffffull) != (kTagHigh | uint64_t(s.generation) << 32) || index >= s.barriers.size() ||
      s.barriers[index].word != word)
    fail_at(site, "%s: mbarrier %p was not initialised by mbarrier.init in this block, or ordinary stores or a "
                  "copy overwrote it", op, static_cast<void*>(word));
  return s.barriers[index];
}

void complete_phase(Barrier& b) {
  for (size_t i : b.counted) {
    Load& l = tl_block.loads[i];
    CUEMU_RACECHECK(land(l.issue, l.dst, unsigned(l.bytes.size()), racecheck::Kind::AsyncLoad));
    CUEMU_RACECHECK(landed(l.issue, b.arrivals));
    memcpy(l.dst, l.bytes.data(), l.bytes.size());
    async_proxy_write(l.dst, l.bytes.size());  // the async proxy wrote it: no fence needed to read it so
    std::vector<unsigned char>().swap(l.bytes);
  }
  b.counted.clear();
  b.completed.swap(b.arrivals);
  b.arrivals.clear();
  ++b.phase;
  b.pending = b.count;
  b.tx = 0;
  sched::unpark(b.word);
}

// After an arrival or a count of bytes (by `thread` at `site`): complete the phase, or refuse
// a tx-count that has gone past zero with no arrival left to wait for.
void settle(Barrier& b, Site site, unsigned thread) {
  if (b.pending) return;
  if (b.tx < 0) {
    char what[512];
    describe(b, what, sizeof what);
    fail_by(site, thread, "%s: the copies completed %lld bytes more than arrive.expect_tx announced for this phase",
            what, (long long)-b.tx);
  }
  if (b.tx == 0) complete_phase(b);
}

bool phase_done(const Barrier& b, unsigned parity) { return (b.phase & 1) != (parity & 1); }

// The loads a copy issues: poison the destination now, count it later (hopper::progress).
void issue_load(uint64_t* bar, unsigned char* dst, std::vector<unsigned char>&& bytes, Site site, uintptr_t caller,
                const char* op) {
  Barrier& b = barrier_at(bar, site, op);
  const unsigned index = unsigned(&b - tl_block.barriers.data());
  memset(dst, kPoison, bytes.size());
  async_proxy_write(dst, bytes.size());
  tl_block.loads.push_back(
      Load{index, dst, std::move(bytes), site, sched::thread_index(), CUEMU_RACECHECK_ISSUE(caller)});
}

const EmuTensorMap& tensor_map(const void* p, unsigned rank, Site site, const char* op) {
  if (reinterpret_cast<uintptr_t>(p) & 63) fail_at(site, "%s: tensor map %p is not 64-byte aligned", op, p);
  const EmuTensorMap& m = *static_cast<const EmuTensorMap*>(p);
  if (m.magic != kTensorMapMagic)
    fail_at(site, "%s: %p is not a tensor map encoded by src/device/tensor_map.rs", op, p);
  if (m.rank != rank) fail_at(site, "%s: the tensor map has rank %u, the instruction is %ud", op, m.rank, rank);
  return m;
}

void check_box_destination(const void* smem, const EmuTensorMap& m, Site site, const char* op) {
  const SwizzleMode mode = SwizzleMode(m.swizzle);
  const unsigned align = swizzle_repeat_bytes(mode) < 128 ? 128 : swizzle_repeat_bytes(mode);
  if (reinterpret_cast<uintptr_t>(smem) % align)
    fail_at(site, "%s: shared address %p must be %u-byte aligned (TMA%s)", op, smem, align,
            mode == SwizzleMode::None ? "" : ", and the swizzle pattern repeats on that alignment");
}

size_t box_bytes(const EmuTensorMap& m) {
  size_t n = m.element_bytes;
  for (unsigned d = 0; d < m.rank; ++d) n *= m.box[d];
  return n;
}

// Visits every element of the box at `coords`: f(offset of its bytes in the swizzled shared
// tile, its global address or nullptr when out of bounds). Elements go in shared-memory order:
// dimension 0 fastest, densely packed, then the swizzle permutes 16-byte chunks by address.
template <class F> void for_each_box_element(const EmuTensorMap& m, const int* coords, const void* smem, F f) {
  unsigned idx[5] = {0, 0, 0, 0, 0};
  const size_t count = box_bytes(m) / m.element_bytes;
  const unsigned base = unsigned(reinterpret_cast<uintptr_t>(smem));
  const SwizzleMode mode = SwizzleMode(m.swizzle);
  for (size_t e = 0; e < count; ++e) {
    bool inside = true;
    uint64_t addr = m.address;
    for (unsigned d = 0; d < m.rank; ++d) {
      const int64_t g = int64_t(coords[d]) + idx[d];
      inside = inside && g >= 0 && uint64_t(g) < m.dims[d];
      addr += uint64_t(g) * m.strides[d];
    }
    const unsigned logical = unsigned(e * m.element_bytes);
    const unsigned physical = swizzle_address(base + logical, mode) - base;
    f(physical, inside ? reinterpret_cast<unsigned char*>(addr) : nullptr);
    for (unsigned d = 0; d < m.rank && ++idx[d] == m.box[d]; ++d) idx[d] = 0;
  }
}

// The memory profiler's view of a copy (MOE_EMU_PROFILE builds): requests of the issuing
// thread at the call site of the wrapper. The shared side is one request of the whole tile;
// the global side one request per contiguous run of elements inside the tensor (a box row, or
// less at an edge), so TMA and bulk copies get memprofile rows.
struct Traffic {
  uintptr_t site;
  bool load;  // global -> shared
  const unsigned char* run = nullptr;
  unsigned run_bytes = 0;
  void global(const unsigned char* g, unsigned bytes) {
    if (run && g == run + run_bytes) {
      run_bytes += bytes;
      return;
    }
    flush();
    run = g;
    run_bytes = bytes;
  }
  void flush() {
#ifdef CUEMU_PROFILE
    if (run) profiler::record(run, run_bytes, load ? profiler::Access::Load : profiler::Access::Store, site);
#endif
    run = nullptr;
  }
  void shared(const void* p, unsigned bytes) const {
#ifdef CUEMU_PROFILE
    profiler::record(p, bytes, load ? profiler::Access::Store : profiler::Access::Load, site);
#else
    (void)p, (void)bytes;
#endif
  }
};
#define CUEMU_CALLER uintptr_t(__builtin_return_address(0))

void land_store(const Store& st) {
  CUEMU_RACECHECK(land(st.issue, st.smem, st.bytes, racecheck::Kind::AsyncRead));
  Traffic traffic{st.site, false};
  traffic.shared(st.smem, st.bytes);
  if (!st.tensor) {
    memcpy(st.gmem, st.smem, st.bytes);
    traffic.global(static_cast<unsigned char*>(st.gmem), st.bytes);
  } else {
    const auto* smem = static_cast<const unsigned char*>(st.smem);
    const unsigned esize = st.map.element_bytes;
    for_each_box_element(st.map, st.coords, st.smem, [&](unsigned off, unsigned char* g) {
      if (!g) return;  // out-of-bounds elements are not written
      memcpy(g, smem + off, esize);
      traffic.global(g, esize);
    });
  }
  traffic.flush();
}

void complete_stores(ThreadCopies& t, unsigned pending) {
  size_t kept = 0;
  for (Store& st : t.stores) {
    if (st.group + pending < t.committed) land_store(st);
    else t.stores[kept++] = st;
  }
  t.stores.resize(kept);
}

ThreadCopies& this_thread() { return tl_block.threads[sched::thread_index()]; }

}  // namespace

// ------------------------------------------------------------------ mbarrier
void mbarrier_init(uint64_t* bar, unsigned count, Site site) {
  if (reinterpret_cast<uintptr_t>(bar) & 7) fail_at(site, "mbarrier.init: address %p is not 8-byte aligned", bar);
  if (count == 0 || count >= (1u << 20)) fail_at(site, "mbarrier.init: count %u is outside 1..2^20-1", count);
  BlockState& s = tl_block;
  s.barriers.push_back(Barrier{bar, site, count, count, 0, 0, {}, {}, {}});
  *bar = kTagHigh | uint64_t(s.generation) << 32 | (s.barriers.size() - 1);
}

uint64_t mbarrier_arrive(uint64_t* bar, unsigned tx_bytes, Site site) {
  Barrier& b = barrier_at(bar, site, tx_bytes ? "mbarrier.arrive.expect_tx" : "mbarrier.arrive");
  if (b.pending == 0) {
    char what[512];
    describe(b, what, sizeof what);
    fail_at(site, "mbarrier.arrive: %s: an arrival beyond the count, the phase waits only for bytes", what);
  }
  const uint64_t state = b.phase;  // the token: which phase this arrival belongs to
  CUEMU_RACECHECK(release(b.arrivals));
  b.tx += tx_bytes;
  --b.pending;
  settle(b, site, sched::thread_index());
  return state;
}

void mbarrier_expect_tx(uint64_t* bar, unsigned tx_bytes, Site site) {
  barrier_at(bar, site, "mbarrier.expect_tx").tx += tx_bytes;
}

bool mbarrier_try_wait_parity(uint64_t* bar, unsigned parity, Site site) {
  while (!phase_done(barrier_at(bar, site, "mbarrier.try_wait.parity"), parity)) sched::park(bar, parity, site);
  CUEMU_RACECHECK(acquire(barrier_at(bar, site, "mbarrier.try_wait.parity").completed));
  return true;
}

bool mbarrier_test_wait_parity(uint64_t* bar, unsigned parity, Site site) {
  if (phase_done(barrier_at(bar, site, "mbarrier.test_wait.parity"), parity)) {
    CUEMU_RACECHECK(acquire(barrier_at(bar, site, "mbarrier.test_wait.parity").completed));
    return true;
  }
  // A poll loop cannot spin here (fibers are not preempted): park until the phase is over and
  // report what the poll saw, so the loop's next poll succeeds.
  while (!phase_done(barrier_at(bar, site, "mbarrier.test_wait.parity"), parity)) sched::park(bar, parity, site);
  return false;
}

// ------------------------------------------------------------------ copies
void tma_load(void* smem_dst, const void* map, uint64_t* bar, const int* coords, unsigned rank, Site site) {
  const char* op = "cp.async.bulk.tensor (global -> shared)";
  const EmuTensorMap& m = tensor_map(map, rank, site, op);
  check_box_destination(smem_dst, m, site, op);
  std::vector<unsigned char> bytes(box_bytes(m));
  const unsigned esize = m.element_bytes;
  Traffic traffic{CUEMU_CALLER, true};
  for_each_box_element(m, coords, smem_dst, [&](unsigned off, const unsigned char* g) {
    if (g) {
      memcpy(&bytes[off], g, esize);
      traffic.global(g, esize);
    } else {
      memset(&bytes[off], 0, esize);  // out of bounds: zero-filled
    }
  });
  traffic.flush();
  traffic.shared(smem_dst, unsigned(bytes.size()));
  issue_load(bar, static_cast<unsigned char*>(smem_dst), std::move(bytes), site, traffic.site, op);
}

void tma_store(const void* map, const void* smem_src, const int* coords, unsigned rank, Site site) {
  const char* op = "cp.async.bulk.tensor (shared -> global)";
  const EmuTensorMap& m = tensor_map(map, rank, site, op);
  check_box_destination(smem_src, m, site, op);
  ThreadCopies& t = this_thread();
  Store st{CUEMU_CALLER, t.committed, true, m, {0, 0, 0, 0, 0}, nullptr, smem_src, unsigned(box_bytes(m)),
           CUEMU_RACECHECK_ISSUE(CUEMU_CALLER)};
  async_proxy_read(smem_src, st.bytes, op);  // ordinary stores into the tile need a proxy fence first
  memcpy(st.coords, coords, rank * sizeof(int));
  t.stores.push_back(st);
}

void check_bulk(const void* smem, const void* gmem, unsigned bytes, Site site, const char* op) {
  if (bytes == 0 || bytes % 16)
    fail_at(site, "%s: size %u bytes must be a positive multiple of 16", op, bytes);
  if (reinterpret_cast<uintptr_t>(smem) & 15 || reinterpret_cast<uintptr_t>(gmem) & 15)
    fail_at(site, "%s: shared %p and global %p must be 16-byte aligned", op, smem, gmem);
}

void bulk_load(void* smem_dst, const void* gmem_src, unsigned bytes, uint64_t* bar, Site site) {
  const char* op = "cp.async.bulk (global -> shared)";
  check_bulk(smem_dst, gmem_src, bytes, site, op);
  const auto* src = static_cast<const unsigned char*>(gmem_src);
  Traffic traffic{CUEMU_CALLER, true};
  traffic.global(src, bytes);
  traffic.flush();
  traffic.shared(smem_dst, bytes);
  issue_load(bar, static_cast<unsigned char*>(smem_dst), std::vector<unsigned char>(src, src + bytes), site,
             traffic.site, op);
}

void bulk_store(void* gmem_dst, const void* smem_src, unsigned bytes, Site site) {
  check_bulk(smem_src, gmem_dst, bytes, site, "cp.async.bulk (shared -> global)");
  async_proxy_read(smem_src, bytes, "cp.async.bulk (shared -> global)");
  ThreadCopies& t = this_thread();
  t.stores.push_back(Store{CUEMU_CALLER, t.committed, false, {}, {0, 0, 0, 0, 0}, gmem_dst, smem_src, bytes,
                           CUEMU_RACECHECK_ISSUE(CUEMU_CALLER)});
}

void bulk_commit_group() { ++this_thread().committed; }
void bulk_wait_group(unsigned pending) { complete_stores(this_thread(), pending); }

bool elect_sync(unsigned mask) {
  const unsigned voters = warp_ballot(mask, 1);
  return lane_id() == unsigned(__builtin_ctz(voters));
}

// ------------------------------------------------------------------ scheduler hooks
namespace hopper {
void block_begin(unsigned threads) {
  BlockState& s = tl_block;
  ++s.generation;
  s.barriers.clear();
  s.loads.clear();
  s.uncounted = 0;
  s.threads.assign(threads, ThreadCopies{});
}

bool progress() {
  BlockState& s = tl_block;
  const bool any = s.uncounted < s.loads.size();
  for (; s.uncounted < s.loads.size(); ++s.uncounted) {
    const Load& l = s.loads[s.uncounted];
    Barrier& b = s.barriers[l.barrier];
    b.counted.push_back(s.uncounted);
    b.tx -= int64_t(l.bytes.size());
    settle(b, l.site, l.thread);  // named as the copy that overflowed
  }
  return any;
}

void thread_exit(unsigned thread) {
  ThreadCopies& t = tl_block.threads[thread];
  ++t.committed;
  complete_stores(t, 0);
}

void describe_wait(const void* object, unsigned parity, char* out, unsigned long len) {
  const auto& barriers = tl_block.barriers;
  for (auto b = barriers.rbegin(); b != barriers.rend(); ++b)  // the latest init of the word
    if (b->word == object) {
      char what[512];
      describe(*b, what, sizeof what);
      snprintf(out, len, "for parity %u of %s", parity, what);
      return;
    }
  snprintf(out, len, "on %p", object);
}
}  // namespace hopper
}  // namespace cuemu
