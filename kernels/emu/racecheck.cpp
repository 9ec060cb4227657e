// racecheck.cpp: the shared-memory race detector (see racecheck.h for the model).
//
// Shadow: one record per 4-byte word of shared memory (the block's dynamic shared memory,
// then the `cuemu_shared` section of static arrays), valid while its serial is the running
// block's (blocks never clear it). Per word:
//   - the last write (plain store or landed cp.async) with its epoch;
//   - the reads of the latest epoch that read the word, and apart from them its atomics,
//     each as an AccessSet: one entry per lane of the first warp to access the word in that
//     epoch (with the lane's clock, for __syncwarp ordering), plus the first access of up to
//     two other warps with the union of that warp's bytes. In a block without cross-warp
//     clocks those conflict with any other warp's access of the same epoch; with them, the
//     first access is checked on its own bytes against what the other thread knows.
// Every access carries a byte mask within its word: threads writing different halves of a
// word do not conflict. What the sets cannot hold (a third foreign warp, a second reader of
// a foreign warp checked against a writer of that same warp, later accesses of a foreign
// warp once cross-warp clocks are on) is dropped: a race may be missed there, never invented.
//
// Clocks: per thread, 32 entries for the lanes of its warp (advanced by __syncwarp) and, once
// the block uses mbarriers or warpgroup collectives, a row of the `cross` table with an entry
// per thread of the block (other warps' entries; its own warp's live in the 32).
#include "racecheck.h"

#include "cuemu.h"
#include "profiler.h"

#include <dlfcn.h>

#include <algorithm>
#include <array>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

extern "C" char __start_cuemu_shared[] __attribute__((weak));
extern "C" char __stop_cuemu_shared[] __attribute__((weak));

namespace cuemu::racecheck {
bool on = false;

namespace {

struct Access {
  uintptr_t site;
  uint32_t clock;  // the thread's own clock entry at the access
  uint16_t thread;
  Kind kind;
  uint8_t width : 5, bytes : 4;  // access width; the word's bytes it touched
  unsigned warp() const { return thread >> 5; }
  unsigned lane() const { return thread & 31; }
};

struct AccessSet {
  uint32_t epoch = 0;  // 0: empty (block epochs start at 1)
  uint32_t lanes = 0;  // lanes of `warp` with an entry
  uint8_t warp = 0, foreign_count = 0;
  Access lane[32];
  Access foreign[2];  // first access of other warps; bytes: that warp's union
  uint8_t foreign_first[2];  // the bytes of that first access itself
};

struct Word {
  uint32_t serial = 0, write_epoch = 0;  // write_epoch 0: no write in this block
  Access write{};
  AccessSet reads, atomics;
};

// What the accessing thread knows: its epoch and the clocks it has seen.
struct Now {
  uint32_t epoch, thread;
  const uint32_t* clock;  // 32 entries, one per lane of its warp
  const uint32_t* cross;  // one per thread of the block (other warps), or null: knows none
  unsigned warp() const { return thread >> 5; }
  unsigned lane() const { return thread & 31; }
  uint32_t knows(unsigned t) const { return t >> 5 == warp() ? clock[t & 31] : cross ? cross[t] : 0; }
};

struct State {
  uint32_t serial = 0, epoch = 0;
  const unsigned char* dynamic_shared = nullptr;
  size_t dynamic_words = 0;
  std::vector<Word> words;
  std::vector<std::array<uint32_t, 32>> clocks;  // per thread of the block
  unsigned threads = 0;
  bool cross_on = false;       // this block synchronises across warps (mbarrier, warpgroups)
  std::vector<uint32_t> cross;  // threads x threads: row t, entry u: what t knows of u
} g;

bool is_write(Kind k) { return k == Kind::Store || k == Kind::CpAsync || k == Kind::AsyncLoad; }

const uint32_t* cross_row(unsigned t) { return g.cross_on ? &g.cross[size_t(t) * g.threads] : nullptr; }

void enable_cross() {
  if (g.cross_on) return;
  g.cross.assign(size_t(g.threads) * g.threads, 0);
  g.cross_on = true;
}

// What thread t knows of thread u, and t learning that u reached `clock`.
uint32_t knows(unsigned t, unsigned u) { return Now{0, t, g.clocks[t].data(), cross_row(t)}.knows(u); }
void learn(unsigned t, unsigned u, uint32_t clock) {
  uint32_t& e = u >> 5 == t >> 5 ? g.clocks[t][u & 31] : g.cross[size_t(t) * g.threads + u];
  e = std::max(e, clock);
}

// Whether access `a` of epoch `epoch` happens before anything `n` does next.
bool ordered(const Access& a, uint32_t epoch, const Now& n) {
  if (epoch != n.epoch) return epoch < n.epoch;  // a later epoch: after an asynchronous access's issue
  return n.knows(a.thread) >= a.clock;
}

// An access of `set` that touches `bytes` and is not ordered before `n`, or null.
const Access* unordered(const AccessSet& set, uint8_t bytes, const Now& n) {
  if (set.epoch == 0 || set.epoch < n.epoch) return nullptr;
  for (uint32_t t = set.lanes; t; t &= t - 1) {
    const Access& a = set.lane[__builtin_ctz(t)];
    if ((a.bytes & bytes) && !ordered(a, set.epoch, n)) return &a;
  }
  for (unsigned i = 0; i < set.foreign_count; ++i) {
    const Access& a = set.foreign[i];
    const bool conflict = n.cross ? (set.foreign_first[i] & bytes) && !ordered(a, set.epoch, n)
                                  : (a.bytes & bytes) && (a.warp() != n.warp() || set.epoch > n.epoch);
    if (conflict) return &a;
  }
  return nullptr;
}

void add(AccessSet& set, const Access& a, uint32_t epoch) {
  if (set.epoch != epoch) {
    set.epoch = epoch;
    set.warp = uint8_t(a.warp());
    set.lanes = 0;
    set.foreign_count = 0;
  }
  if (a.warp() == set.warp) {
    Access& e = set.lane[a.lane()];
    const bool had = (set.lanes >> a.lane()) & 1;
    const uint8_t keep = had && e.clock == a.clock ? e.bytes : 0;  // same clock: one access to the lane's others
    e = a;
    e.bytes = a.bytes | keep;
    set.lanes |= 1u << a.lane();
    return;
  }
  for (unsigned i = 0; i < set.foreign_count; ++i)
    if (set.foreign[i].warp() == a.warp()) {
      set.foreign[i].bytes = set.foreign[i].bytes | a.bytes;
      return;
    }
  if (set.foreign_count < 2) {
    set.foreign_first[set.foreign_count] = a.bytes;
    set.foreign[set.foreign_count++] = a;
  }
}

// ------------------------------------------------------------------ reports
// file:line of a code address (the return address of a traced access, so one byte before it
// is the access), through addr2line and the binary's debug information: the innermost inlined
// line (where the access is), and the kernel file's line it was inlined from. Without line
// information: the function, else the offset in the binary.
std::string describe_site(uintptr_t site) {
  char buf[512];
  Dl_info info{};
  if (!dladdr(reinterpret_cast<void*>(site), &info) || !info.dli_fname) {
    snprintf(buf, sizeof buf, "%#zx", size_t(site));
    return buf;
  }
  const uintptr_t offset = site - 1 - reinterpret_cast<uintptr_t>(info.dli_fbase);
  snprintf(buf, sizeof buf, "addr2line -i -f -C -e '%s' %#zx 2>/dev/null", info.dli_fname, size_t(offset));
  std::vector<std::string> lines;  // function, file:line, innermost inlined frame first
  if (FILE* p = popen(buf, "r")) {
    char* text = nullptr;  // whole lines: demangled template names run long
    size_t capacity = 0;
    while (getline(&text, &capacity, p) > 0) {
      std::string l = text;
      while (!l.empty() && (l.back() == '\n' || l.back() == ' ')) l.pop_back();
      if (const size_t k = l.rfind("kernels/"); k != std::string::npos && lines.size() % 2) l.erase(0, k);
      if (const size_t d = l.find(" (discriminator"); d != std::string::npos) l.erase(d);
      lines.push_back(l);
    }
    free(text);
    pclose(p);
  }
  if (lines.size() >= 2 && lines[1][0] != '?') {
    // The outermost frame of kernel code: the emulator's launch glue (cuemu.h) inlines kernels.
    size_t outer = lines.size() - 1;
    while (outer > 1 && (lines[outer].find("kernels/emu/") != std::string::npos || lines[outer][0] == '?'))
      outer -= 2;
    return outer > 1 ? lines[1] + " (inlined at " + lines[outer] + ")" : lines[1];
  }
  if (!lines.empty() && lines[0][0] != '?') return lines[0] + " (no line information)";
  if (info.dli_sname) return info.dli_sname;
  snprintf(buf, sizeof buf, "%s+%#zx", info.dli_fname, size_t(offset));
  return buf;
}

const char* kind_name(Kind k) {
  switch (k) {
    case Kind::Load: return "load";
    case Kind::Store: return "store";
    case Kind::Atomic: return "atomic";
    case Kind::LdMatrix: return "ldmatrix row read";
    case Kind::CpAsync: return "cp.async copy";
    case Kind::AsyncLoad: return "TMA/bulk load landing";
    case Kind::AsyncRead: return "async-proxy read (wgmma operand or TMA/bulk store source)";
  }
  return "?";
}

std::string describe(const Access& a) {
  char buf[256];
  const unsigned x = blockDim.x, y = blockDim.y;
  char width[32] = "";  // 0: a copy wider than the field (a TMA box, a bulk row)
  if (a.width) snprintf(width, sizeof width, " of %u bytes", unsigned(a.width));
  snprintf(buf, sizeof buf, "%s%s by thread (%u,%u,%u) (warp %u lane %u) at ", kind_name(a.kind), width,
           a.thread % x, a.thread / x % y, a.thread / (x * y), a.warp(), a.lane());
  return buf + describe_site(a.site);
}

[[noreturn]] void report(const Access& earlier, const Access& later, size_t word, const char* note) {
  char where[96];
  if (word < g.dynamic_words)
    snprintf(where, sizeof where, "dynamic shared memory offset %zu", word * 4);
  else
    snprintf(where, sizeof where, "static __shared__ offset %zu (section cuemu_shared)", (word - g.dynamic_words) * 4);
  const std::string msg = "shared-memory race (racecheck) at " + std::string(where) + ": " + describe(earlier) +
                          ", then " + describe(later) + "; " + note;
  fail(msg.c_str());
}

constexpr const char* kNoOrder =
    "no __syncthreads, __syncwarp of both lanes, or mbarrier arrive and wait between them orders them";

// ------------------------------------------------------------------ the check
Word* word_at(uintptr_t a, size_t* index) {
  const uintptr_t d = reinterpret_cast<uintptr_t>(g.dynamic_shared);
  size_t i;
  if (a - d < g.dynamic_words * 4) {
    i = (a - d) >> 2;
  } else if (__start_cuemu_shared && a - uintptr_t(__start_cuemu_shared) <
                                         uintptr_t(__stop_cuemu_shared - __start_cuemu_shared)) {
    i = g.dynamic_words + ((a - uintptr_t(__start_cuemu_shared)) >> 2);
  } else {
    return nullptr;
  }
  Word& w = g.words[i];
  if (w.serial != g.serial) {  // first touch in this block: forget the previous block's records
    w.serial = g.serial;
    w.write_epoch = w.reads.epoch = w.atomics.epoch = 0;
  }
  *index = i;
  return &w;
}

// Fails the block if access `a` conflicts with a record of word `w` not ordered before `n`.
void check(const Word& w, size_t index, const Access& a, const Now& n, const char* note) {
  const bool write = is_write(a.kind);
  if (w.write_epoch && (w.write.bytes & a.bytes) && !ordered(w.write, w.write_epoch, n))
    report(w.write, a, index, note);
  if (write || a.kind == Kind::Atomic)
    if (const Access* r = unordered(w.reads, a.bytes, n)) report(*r, a, index, note);
  if (a.kind != Kind::Atomic)
    if (const Access* r = unordered(w.atomics, a.bytes, n)) report(*r, a, index, note);
}

void record(Word& w, const Access& a, uint32_t epoch) {
  if (!is_write(a.kind)) return add(a.kind == Kind::Atomic ? w.atomics : w.reads, a, epoch);
  const bool same = w.write_epoch == epoch && w.write.thread == a.thread && w.write.clock == a.clock;
  const uint8_t keep = same ? w.write.bytes : 0;  // one thread's consecutive stores into one word
  w.write = a;
  w.write.bytes = a.bytes | keep;
  w.write_epoch = epoch;
}

// Every word that [p, p + bytes) touches.
template <class F> void for_each_word(const void* p, unsigned bytes, F&& f) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  for (uintptr_t at = a; at < a + bytes; at = (at & ~uintptr_t(3)) + 4) {
    size_t index;
    Word* w = word_at(at, &index);
    if (!w) return;  // shared objects are contiguous: none of the access is shared memory
    const unsigned lo = at & 3, hi = std::min<uintptr_t>(4, a + bytes - (at & ~uintptr_t(3)));
    f(*w, index, uint8_t(((1u << hi) - 1) & ~((1u << lo) - 1)));
  }
}

bool running_thread(uint32_t* thread) {
  profiler::LaneView lane;
  if (!profiler::current_lane(&lane)) return false;
  *thread = lane.thread;
  return true;
}

}  // namespace

void launch_begin(bool enabled) { on = enabled; }

void block_begin(unsigned threads, const unsigned char* dynamic_shared, size_t dynamic_shared_bytes) {
  ++g.serial;
  g.epoch = 1;
  g.dynamic_shared = dynamic_shared;
  g.dynamic_words = (dynamic_shared_bytes + 3) / 4;
  const size_t static_words = __start_cuemu_shared ? size_t(__stop_cuemu_shared - __start_cuemu_shared + 3) / 4 : 0;
  if (g.words.size() < g.dynamic_words + static_words) g.words.resize(g.dynamic_words + static_words);
  if (g.clocks.size() < threads) g.clocks.resize(threads);
  for (unsigned t = 0; t < threads; ++t) {
    g.clocks[t].fill(0);
    g.clocks[t][t & 31] = 1;
  }
  g.threads = threads;
  g.cross_on = false;
}

void barrier() { ++g.epoch; }

void warp_sync(unsigned warp, unsigned lanes) {
  std::array<uint32_t, 32> merged{};
  for (uint32_t t = lanes; t; t &= t - 1) {
    const auto& c = g.clocks[warp * 32 + __builtin_ctz(t)];
    for (unsigned i = 0; i < 32; ++i) merged[i] = std::max(merged[i], c[i]);
  }
  for (uint32_t t = lanes; t; t &= t - 1) {
    const unsigned lane = __builtin_ctz(t);
    g.clocks[warp * 32 + lane] = merged;
    ++g.clocks[warp * 32 + lane][lane];
  }
  if (!g.cross_on) return;
  std::vector<uint32_t> known(g.threads, 0);  // what any of the lanes knows of other warps
  for (uint32_t t = lanes; t; t &= t - 1) {
    const uint32_t* row = cross_row(warp * 32 + __builtin_ctz(t));
    for (unsigned u = 0; u < g.threads; ++u) known[u] = std::max(known[u], row[u]);
  }
  for (uint32_t t = lanes; t; t &= t - 1)
    std::copy(known.begin(), known.end(), g.cross.begin() + (warp * 32 + __builtin_ctz(t)) * ptrdiff_t(g.threads));
}

void access(const void* p, unsigned bytes, Kind kind, uintptr_t site) {
  uint32_t thread;
  if (!on || !running_thread(&thread)) return;
  const Now n{g.epoch, thread, g.clocks[thread].data(), cross_row(thread)};
  for_each_word(p, bytes, [&](Word& w, size_t index, uint8_t mask) {
    const Access a{site, n.clock[n.lane()], uint16_t(thread), kind, uint8_t(bytes & 31), mask};
    check(w, index, a, n, kNoOrder);
    record(w, a, n.epoch);
  });
}

Issue issue(uintptr_t site) {
  Issue is{};
  if (!on || !running_thread(&is.thread)) return is;
  is.epoch = g.epoch;
  is.site = site;
  auto& clock = g.clocks[is.thread];
  std::copy(clock.begin(), clock.end(), is.clock);
  if (const uint32_t* row = cross_row(is.thread)) is.cross.assign(row, row + g.threads);
  ++clock[is.thread & 31];  // the issuer's later accesses are not ordered before the access
  return is;
}

Issue warpgroup_issue(unsigned first_thread, uintptr_t site) {
  Issue is{};
  if (!on) return is;
  enable_cross();
  is.epoch = g.epoch;
  is.thread = first_thread;
  is.site = site;
  is.cross.assign(g.threads, 0);
  for (unsigned t = first_thread; t < first_thread + 128; ++t)
    for (unsigned u = 0; u < g.threads; ++u) is.cross[u] = std::max(is.cross[u], knows(t, u));
  std::copy_n(&is.cross[first_thread & ~31u], 32, is.clock);
  for (unsigned t = first_thread; t < first_thread + 128; ++t) ++g.clocks[t][t & 31];
  return is;
}

// Why an asynchronous access of `kind` may conflict.
const char* async_note(Kind kind) {
  switch (kind) {
    case Kind::CpAsync:
      return "the copy may land any time between its issue and the covering cp.async.wait_group, and nothing "
             "orders the other access before the issue or after that wait";
    case Kind::AsyncLoad:
      return "the load may land any time between its issue and the completion of its mbarrier phase, and nothing "
             "orders the other access before the issue (an mbarrier arrive the issuer waited on) or after the "
             "phase (a wait on it)";
    default:
      return "the async proxy may read any time between the issue and the covering wait (wgmma.wait_group, "
             "cp.async.bulk.wait_group), and nothing orders the other access before the issue (for a TMA load: "
             "a wait on its mbarrier) or after that wait (then an mbarrier arrive the writer waits on)";
  }
}

void land(const Issue& is, const void* p, unsigned bytes, Kind kind) {
  if (!on || is.epoch == 0) return;
  const Now at_issue{is.epoch, is.thread, is.clock, is.cross.empty() ? nullptr : is.cross.data()};
  const uint32_t clock_now = g.clocks[is.thread][is.thread & 31];
  for_each_word(p, bytes, [&](Word& w, size_t index, uint8_t mask) {
    Access a{is.site, is.clock[is.thread & 31], uint16_t(is.thread), kind, uint8_t(bytes < 32 ? bytes : 0), mask};
    check(w, index, a, at_issue, async_note(kind));
    a.clock = clock_now;  // later accesses must be ordered after the landing (the wait)
    record(w, a, g.epoch);
  });
}

void release(Clock& into) {
  uint32_t thread;
  if (!on || !running_thread(&thread)) return;
  enable_cross();
  into.resize(g.threads, 0);
  for (unsigned u = 0; u < g.threads; ++u) into[u] = std::max(into[u], knows(thread, u));
  ++g.clocks[thread][thread & 31];
}

void acquire(const Clock& from) {
  uint32_t thread;
  if (!on || from.empty() || !running_thread(&thread)) return;
  enable_cross();
  for (unsigned u = 0; u < from.size() && u < g.threads; ++u) learn(thread, u, from[u]);
}

void landed(const Issue& is, Clock& into) {
  if (!on || is.epoch == 0) return;
  into.resize(g.threads, 0);
  into[is.thread] = std::max(into[is.thread], g.clocks[is.thread][is.thread & 31]);
}

void warpgroup_waited(unsigned first_thread) {
  if (!on) return;
  enable_cross();
  const uint32_t clock = g.clocks[first_thread][first_thread & 31];
  for (unsigned t = first_thread; t < first_thread + 128; ++t) learn(t, first_thread, clock);
  ++g.clocks[first_thread][first_thread & 31];
}

}  // namespace cuemu::racecheck
