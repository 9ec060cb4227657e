// wgmma.cpp: Hopper's warpgroup instructions on the CPU: wgmma.mma_async and its fence /
// commit_group / wait_group, setmaxnreg, and the check that generic-proxy stores to shared
// memory are fenced (fence.proxy.async) before the async proxy reads them.
//
// Model
//   - Every instruction here is `.sync.aligned` over a warpgroup: the 128 threads of warps
//     4g..4g+3 meet in runtime.cpp's warpgroup rendezvous, and the last to arrive does the
//     work for all of them (resolve_*). Threads that disagree on an operand that must be
//     uniform (a descriptor, N, wait_group's N, setmaxnreg's count) fail the launch; so does a
//     warpgroup with missing or exited threads (the rendezvous's own checks).
//   - wgmma.mma_async only records the operation: the accumulators it will write are captured
//     and then overwritten with a NaN pattern (kAccumulatorPoison), so a read before the
//     covering wait_group shows up. The shared operands (and A's registers, through the
//     caller's array) are read at the wait_group that covers the operation, never at issue:
//     a producer that refills a stage before that wait changes the result, as it may on the GPU.
//     Operations chained on one accumulator array before a wait take the previous result
//     (the array itself stays poisoned until the last of them completes).
//   - Matrix descriptors (ptx.cuh): the canonical K-major and MN-major layouts of the PTX ISA
//     ("Shared memory matrix layout") for 16-bit elements, swizzled by absolute shared address
//     (swizzle.cuh). The shared address of the emulator is the offset into the block's dynamic
//     shared memory (1024-byte aligned by runtime.cpp), so operands must live there.
//   - Async-proxy shadow: a copy of dynamic shared memory as the async proxy may see it. A
//     fence.proxy.async by any thread refreshes it from the live bytes; async-proxy writes
//     (TMA loads landing) update it; an async-proxy read of bytes that differ from it means
//     ordinary stores changed them after the last fence: an error. Limitation: the fence is
//     block-wide here, whereas on the GPU each thread must fence its own stores, so a thread
//     that forgot its fence is missed when another thread fences after its stores. Stores that
//     rewrite the value already there are invisible (and harmless). Static __shared__ arrays
//     are not shadowed.
//   - The race detector (profiling build, racecheck.h): an operation's shared reads are
//     checked, when they happen at the covering wait_group, with what its warpgroup knew at
//     the issue, and recorded as reads of the warpgroup's first thread, which all 128 threads
//     then know to be done.
#include "cuemu.h"
#include "racecheck.h"
#include "swizzle.cuh"
#ifdef CUEMU_PROFILE
#define CUEMU_RACECHECK(call) (racecheck::on ? racecheck::call : void())
#else
#define CUEMU_RACECHECK(call) void()
#endif

#include <cstdarg>
#include <cstdio>
#include <algorithm>
#include <memory>
#include <vector>

namespace cuemu {
namespace {

constexpr unsigned kThreads = 128;                // a warpgroup
constexpr unsigned kMaxWarpgroups = 1024 / kThreads;
constexpr uint32_t kAccumulatorPoison = 0x7fc0deadu;  // a quiet NaN

// One thread's operands of the warpgroup collective it waits in.
struct Slot {
  float* d;
  const uint32_t* a;  // A's four registers, or null when A comes from shared memory
  uint64_t desc_a, desc_b;
  unsigned n;
  MmaInput input;
  bool trans_a, trans_b, accumulate;
  unsigned pending;  // wait_group's N
  bool increase;     // setmaxnreg
  unsigned registers;
  uintptr_t site;    // the wgmma's call site in the kernel, for the race detector's reports
};

// One wgmma.mma_async in flight.
struct Mma {
  unsigned group, n;
  MmaInput input;
  bool trans_a, trans_b, accumulate;
  uint64_t desc_a, desc_b;
  float* d[kThreads];
  const uint32_t* a[kThreads];
  // kThreads x n/2 input accumulators: captured at issue, or, where an earlier operation in
  // flight writes the same array, that operation's result, handed over when it executes.
  std::vector<float> init;
  racecheck::Issue issue;  // what the warpgroup knew at the issue (profiling build)
};

struct Warpgroup {
  std::vector<Mma> in_flight;
  unsigned committed = 0;
};

// The running block's state, one per OS thread (an OS thread runs one block at a time).
struct Block {
  Slot slots[1024];
  Warpgroup warpgroups[kMaxWarpgroups];
  unsigned char* shared = nullptr;
  size_t shared_bytes = 0;
  std::vector<unsigned char> shadow;  // the async proxy's view of dynamic shared memory
  bool shadow_ready = false;
};

Block& block() {
  static thread_local std::unique_ptr<Block> b(new Block);
  return *b;
}

unsigned linear_thread() { return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z); }

[[noreturn]] __attribute__((format(printf, 1, 2))) void failf(const char* fmt, ...) {
  char buf[1024];
  va_list args;
  va_start(args, fmt);
  vsnprintf(buf, sizeof buf, fmt, args);
  va_end(args);
  fail(buf);
}

// ------------------------------------------------------------------ async-proxy shadow
// The fill of fresh dynamic shared memory (runtime.cpp) is what the async proxy sees first.
std::vector<unsigned char>& shadow(Block& b) {
  if (!b.shadow_ready) {
    b.shadow.assign(b.shared_bytes, 0xFF);
    b.shadow_ready = true;
  }
  return b.shadow;
}

// The offset of [p, p + bytes) in dynamic shared memory, or false if it lies elsewhere.
bool dynamic_offset(const Block& b, const void* p, size_t bytes, size_t* offset) {
  const auto* c = static_cast<const unsigned char*>(p);
  if (c < b.shared || c + bytes > b.shared + b.shared_bytes) return false;
  *offset = size_t(c - b.shared);
  return true;
}

[[noreturn]] void unfenced(const char* what, size_t offset) {
  failf("%s reads shared memory at byte %zu, which ordinary stores changed after the last "
        "fence.proxy.async.shared::cta: generic-proxy writes are visible to the async proxy only after "
        "that fence",
        what, offset);
}

// ------------------------------------------------------------------ matrix descriptors
struct Operand {
  uint32_t start, leading, stride;  // bytes
  SwizzleMode mode;
};

Operand decode(uint64_t desc, const char* which) {
  constexpr uint64_t kFields = 0x3fffull | 0x3fffull << 16 | 0x3fffull << 32 | 0x7ull << 49 | 0x3ull << 62;
  if (desc & ~kFields)
    failf("wgmma.mma_async: operand %s's matrix descriptor %#llx sets reserved bits", which, (unsigned long long)desc);
  if ((desc >> 49) & 7)
    failf("wgmma.mma_async: operand %s's descriptor has base offset %u; the emulator swizzles by absolute "
          "shared address and needs 0 (a swizzled tile aligned to its repeat, swizzle.cuh)",
          which, unsigned(desc >> 49) & 7);
  static constexpr SwizzleMode kModes[4] = {SwizzleMode::None, SwizzleMode::B128, SwizzleMode::B64,
                                            SwizzleMode::B32};
  return Operand{uint32_t(desc & 0x3fff) << 4, uint32_t(desc >> 16 & 0x3fff) << 4,
                 uint32_t(desc >> 32 & 0x3fff) << 4, kModes[desc >> 62]};
}

// The shared address of element (mn, k) of a 16-deep slice (mn: a row of A, a column of B).
// K-major: eight rows of `span` bytes (16 unswizzled), 8-row groups `stride` apart, the two
// 8-element k halves `leading` apart (unswizzled) or adjacent. MN-major: the same with the
// roles of mn and k exchanged; swizzled, `leading` separates spans along mn and `stride`
// 8-deep k groups.
uint32_t element_address(const Operand& o, unsigned mn, unsigned k, bool mn_major) {
  const unsigned span = o.mode == SwizzleMode::None ? 16 : swizzle_span_bytes(o.mode);
  uint32_t offset;
  if (!mn_major)
    offset = mn % 8 * span + mn / 8 * o.stride + k / 8 * (o.mode == SwizzleMode::None ? o.leading : 16) + k % 8 * 2;
  else if (o.mode == SwizzleMode::None)
    offset = mn % 8 * 2 + mn / 8 * o.stride + k % 8 * 16 + k / 8 * o.leading;
  else
    offset = mn % 8 * 2 + mn / 8 % (span / 16) * 16 + mn / 8 / (span / 16) * o.leading + k % 8 * span + k / 8 * o.stride;
  return swizzle_address(o.start + offset, o.mode);
}

// Checks at issue that every element of a rows x 16 operand lies in dynamic shared memory.
void check_operand(const Block& b, const Operand& o, unsigned rows, bool mn_major, const char* which) {
  for (unsigned mn = 0; mn < rows; ++mn)
    for (unsigned k = 0; k < 16; ++k) {
      const uint32_t address = element_address(o, mn, k, mn_major);
      if (address + 2 > b.shared_bytes)
        failf("wgmma.mma_async: operand %s element (%u, k=%u) is at shared byte %u, past the block's %zu bytes of "
              "dynamic shared memory (descriptor start %u, leading %u, stride %u bytes, swizzle %u)",
              which, mn, k, address, b.shared_bytes, o.start, o.leading, o.stride, swizzle_bits(o.mode));
    }
}

float element_value(uint16_t bits, MmaInput input) {
  return input == MmaInput::Bf16 ? bf16_bits_to_float(bits) : f16_bits_to_float(bits);
}

// Reads element (mn, k) of operation m for the async proxy: it must not have changed since the
// last fence.
float load(Block& b, const Mma& m, const Operand& o, unsigned mn, unsigned k, bool mn_major) {
  const uint32_t address = element_address(o, mn, k, mn_major);
  const std::vector<unsigned char>& seen = shadow(b);
  if (memcmp(b.shared + address, seen.data() + address, 2) != 0) unfenced("wgmma.mma_async", address);
  CUEMU_RACECHECK(land(m.issue, b.shared + address, 2, racecheck::Kind::AsyncRead));
  const MmaInput input = m.input;
  uint16_t bits;
  memcpy(&bits, b.shared + address, 2);
  return element_value(bits, input);
}

// ------------------------------------------------------------------ wgmma.mma_async
// Accumulator fragment (PTX ISA, "wgmma .m64nNk16 register fragment layout for D"): thread t,
// warp w = t/32, g = (t%32)/4, q = t%4; d[4j + i] is row 16w + g + 8(i/2), column 8j + 2q + i%2.
// A's registers (like mma.m16n8k16's A per warp): a[i] holds row 16w + g + 8(i%2), columns
// 2q, 2q+1 (+8 if i >= 2), the lower column in the low half.
void execute(Block& b, const Mma& m, std::vector<float>& out) {
  float A[64][16];
  std::vector<float> B(16 * size_t(m.n));  // B[k * n + column]
  if (m.a[0]) {
    for (unsigned t = 0; t < kThreads; ++t) {
      const unsigned w = t / 32, g = t % 32 / 4, q = t % 4;
      for (unsigned i = 0; i < 8; ++i)
        A[16 * w + g + 8 * (i / 2 % 2)][2 * q + i % 2 + 8 * (i / 4)] =
            element_value(uint16_t(m.a[t][i / 2] >> (16 * (i % 2))), m.input);
    }
  } else {
    const Operand a = decode(m.desc_a, "A");
    for (unsigned r = 0; r < 64; ++r)
      for (unsigned k = 0; k < 16; ++k) A[r][k] = load(b, m, a, r, k, m.trans_a);
  }
  const Operand bo = decode(m.desc_b, "B");
  for (unsigned c = 0; c < m.n; ++c)
    for (unsigned k = 0; k < 16; ++k) B[k * m.n + c] = load(b, m, bo, c, k, m.trans_b);
  const unsigned regs = m.n / 2;
  out.resize(size_t(kThreads) * regs);
  for (unsigned t = 0; t < kThreads; ++t) {
    const unsigned w = t / 32, g = t % 32 / 4, q = t % 4;
    for (unsigned j = 0; j < m.n / 8; ++j)
      for (unsigned i = 0; i < 4; ++i) {
        const unsigned row = 16 * w + g + 8 * (i / 2), col = 8 * j + 2 * q + i % 2, r = t * regs + 4 * j + i;
        float acc = m.accumulate ? m.init[r] : 0.0f;
        for (unsigned k = 0; k < 16; ++k) acc = fmaf(A[row][k], B[k * m.n + col], acc);
        out[r] = acc;
      }
  }
}

// The first operation after in_flight[i] that writes thread t's accumulator array, or null.
Mma* successor(std::vector<Mma>& in_flight, size_t i, unsigned t) {
  for (size_t j = i + 1; j < in_flight.size(); ++j)
    if (in_flight[j].d[t] == in_flight[i].d[t]) return &in_flight[j];
  return nullptr;
}

// Names the first operand on which thread t disagrees with thread 0 of its warpgroup.
const char* mma_disagreement(const Slot& s0, const Slot& s) {
  if (s.n != s0.n) return "N";
  if (s.input != s0.input) return "input type";
  if ((s.a == nullptr) != (s0.a == nullptr)) return "source of A (registers or shared memory)";
  if (!s.a && s.desc_a != s0.desc_a) return "descriptor of A";
  if (s.desc_b != s0.desc_b) return "descriptor of B";
  if (s.trans_a != s0.trans_a || s.trans_b != s0.trans_b) return "transposes";
  if (s.accumulate != s0.accumulate) return "scale-d (accumulate)";
  return nullptr;
}

void resolve_mma(unsigned g) {
  Block& b = block();
  const Slot* slots = b.slots + kThreads * g;
  const Slot& s0 = slots[0];
  for (unsigned t = 1; t < kThreads; ++t)
    if (const char* what = mma_disagreement(s0, slots[t]))
      failf("wgmma.mma_async: threads %u and %u of warpgroup %u disagree on the %s (it must be warpgroup-uniform)",
            kThreads * g, kThreads * g + t, g, what);
  if (!s0.a) check_operand(b, decode(s0.desc_a, "A"), 64, s0.trans_a, "A");
  check_operand(b, decode(s0.desc_b, "B"), s0.n, s0.trans_b, "B");
  Warpgroup& wg = b.warpgroups[g];
  Mma& m = wg.in_flight.emplace_back();
  m.group = wg.committed;
  m.n = s0.n;
  m.input = s0.input;
  m.trans_a = s0.trans_a;
  m.trans_b = s0.trans_b;
  m.accumulate = s0.accumulate;
  m.desc_a = s0.desc_a;
  m.desc_b = s0.desc_b;
#ifdef CUEMU_PROFILE
  if (racecheck::on) m.issue = racecheck::warpgroup_issue(kThreads * g, s0.site);
#endif
  const unsigned regs = m.n / 2;
  m.init.resize(size_t(kThreads) * regs);
  for (unsigned t = 0; t < kThreads; ++t) {
    m.d[t] = slots[t].d;
    m.a[t] = slots[t].a;
    bool chained = false;
    for (size_t i = 0; i + 1 < wg.in_flight.size(); ++i) chained |= wg.in_flight[i].d[t] == m.d[t];
    if (!chained) memcpy(&m.init[t * regs], m.d[t], regs * sizeof(float));
    for (unsigned r = 0; r < regs; ++r) memcpy(&m.d[t][r], &kAccumulatorPoison, 4);
  }
}

void resolve_commit(unsigned g) { ++block().warpgroups[g].committed; }

void resolve_wait(unsigned g) {
  Block& b = block();
  const Slot* slots = b.slots + kThreads * g;
  for (unsigned t = 1; t < kThreads; ++t)
    if (slots[t].pending != slots[0].pending)
      failf("wgmma.wait_group: threads %u and %u of warpgroup %u wait for %u and %u pending groups", kThreads * g,
            kThreads * g + t, g, slots[0].pending, slots[t].pending);
  Warpgroup& wg = b.warpgroups[g];
  std::vector<Mma>& ops = wg.in_flight;
  std::vector<float> out;
  size_t kept = 0;
  for (size_t i = 0; i < ops.size(); ++i) {
    if (ops[i].group + slots[0].pending >= wg.committed) {
      if (i != kept) ops[kept] = std::move(ops[i]);
      ++kept;
      continue;
    }
    execute(b, ops[i], out);
    CUEMU_RACECHECK(warpgroup_waited(kThreads * g));
    const unsigned regs = ops[i].n / 2;
    for (unsigned t = 0; t < kThreads; ++t) {
      Mma* next = successor(ops, i, t);
      float* to = next ? &next->init[t * (next->n / 2)] : ops[i].d[t];
      memcpy(to, &out[t * regs], std::min(regs, next ? next->n / 2 : regs) * sizeof(float));
    }
  }
  ops.resize(kept);
}

void resolve_nothing(unsigned) {}

void resolve_setmaxnreg(unsigned g) {
  const Slot* slots = block().slots + kThreads * g;
  for (unsigned t = 1; t < kThreads; ++t)
    if (slots[t].increase != slots[0].increase || slots[t].registers != slots[0].registers)
      failf("setmaxnreg: threads %u (%s %u) and %u (%s %u) of warpgroup %u disagree; it must be warpgroup-uniform",
            kThreads * g, slots[0].increase ? "inc" : "dec", slots[0].registers, kThreads * g + t,
            slots[t].increase ? "inc" : "dec", slots[t].registers, g);
}

}  // namespace

// ------------------------------------------------------------------ device-side API
uint32_t wgmma_shared_offset(const void* p) {
  size_t offset;
  if (!dynamic_offset(block(), p, 0, &offset))
    failf("matrix descriptor: %p is not in the block's dynamic shared memory (the emulator's shared addresses "
          "cover dynamic shared memory only)",
          p);
  return uint32_t(offset);
}

void wgmma_fence() { warpgroup_arrive("wgmma.fence", resolve_nothing); }
void wgmma_commit_group() { warpgroup_arrive("wgmma.commit_group", resolve_commit); }
void wgmma_wait_group(unsigned pending) {
  block().slots[linear_thread()].pending = pending;
  warpgroup_arrive("wgmma.wait_group", resolve_wait);
}

void wgmma_mma_async(float* d, unsigned n, MmaInput input, uint64_t desc_a, const uint32_t* a_regs, uint64_t desc_b,
                     bool trans_a, bool trans_b, bool accumulate) {
  if (n < 8 || n > 256 || n % 8) failf("wgmma.mma_async: N = %u is not a multiple of 8 in 8..256", n);
  Slot& s = block().slots[linear_thread()];
  s.d = d;
  s.a = a_regs;
  s.desc_a = a_regs ? 0 : desc_a;
  s.desc_b = desc_b;
  s.n = n;
  s.input = input;
  s.trans_a = trans_a;
  s.trans_b = trans_b;
  s.accumulate = accumulate;
  s.site = uintptr_t(__builtin_return_address(0));
  warpgroup_arrive("wgmma.mma_async", resolve_mma);
}

void setmaxnreg(bool increase, unsigned registers) {
  if (registers < 24 || registers > 256 || registers % 8)
    failf("setmaxnreg: %u registers is not a multiple of 8 in 24..256", registers);
  Slot& s = block().slots[linear_thread()];
  s.increase = increase;
  s.registers = registers;
  warpgroup_arrive("setmaxnreg", resolve_setmaxnreg);
}

void fence_proxy_async_shared_cta() {
  Block& b = block();
  if (b.shared_bytes) memcpy(shadow(b).data(), b.shared, b.shared_bytes);
}

void async_proxy_read(const void* smem, size_t bytes, const char* what) {
  Block& b = block();
  size_t offset;
  if (!dynamic_offset(b, smem, bytes, &offset)) return;  // static shared memory is not shadowed
  const unsigned char* seen = shadow(b).data();
  for (size_t i = offset; i < offset + bytes; ++i)
    if (b.shared[i] != seen[i]) unfenced(what, i);
}

void async_proxy_write(const void* smem, size_t bytes) {
  Block& b = block();
  size_t offset;
  if (dynamic_offset(b, smem, bytes, &offset)) memcpy(shadow(b).data() + offset, smem, bytes);
}

void hopper_block_begin(unsigned char* shared, size_t shared_bytes) {
  Block& b = block();
  b.shared = shared;
  b.shared_bytes = shared_bytes;
  b.shadow_ready = false;
  for (Warpgroup& wg : b.warpgroups) {
    wg.in_flight.clear();
    wg.committed = 0;
  }
}

}  // namespace cuemu
