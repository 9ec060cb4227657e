// runtime.cpp: the scheduler behind cuemu.h. Compiled once (not per kernel file).
//
// Model
//   - A launch is a list of blocks; workers (the calling thread plus a small pool) take
//     blocks from an atomic counter. A worker runs one block at a time to completion.
//   - Every CUDA thread of the block is a fiber with its own stack. A fiber runs until it
//     blocks (barrier, warp collective) or exits; then the next runnable fiber runs.
//     There is no preemption, so between two blocking points a thread's code is atomic
//     with respect to its block: bugs hide unless the schedule varies. The schedule
//     (in order, reversed, or shuffled with a seed) orders every set of fibers released
//     together: at block start, at each barrier, at each warp collective; the run-ahead
//     schedule instead lets one warp run to its next barrier before another moves.
//   - In the profiling build, the race detector (racecheck.h) hears of every barrier,
//     __syncwarp, ldmatrix row, cp.async and atomic from here.
//   - Warp collectives capture each lane's contribution when that lane arrives (a shuffle's
//     value, the 16 bytes of an ldmatrix row, mma fragments), never when the last lane
//     arrives: real collectives do not order memory, and reading late would hide a
//     missing __syncwarp.
//   - Failures inside a block (deadlock, __trap, misuse of a collective) abandon the block:
//     the worker switches back to its own stack, the launch stops taking blocks and
//     cuemu_launch returns the message. Fiber stacks are simply reset for the next block.
#include "cuemu.h"
#ifdef CUEMU_PROFILE
#include "profiler.h"
#include "racecheck.h"
// A race-detector hook (racecheck.h), evaluated only when this launch is checked.
#define CUEMU_RACECHECK(call) (racecheck::on ? racecheck::call : void())
#else
#define CUEMU_RACECHECK(call) ((void)0)
#endif

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <sys/mman.h>

#ifdef CUEMU_ASAN
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif
#if !defined(__x86_64__)
#define CUEMU_UCONTEXT 1  // portable fallback; x86-64 uses the short assembly switch below
#endif
#ifdef CUEMU_UCONTEXT
#include <ucontext.h>
#endif

CUEMU_TLS constinit uint3 threadIdx{};
CUEMU_TLS constinit uint3 blockIdx{};
CUEMU_TLS constinit dim3 blockDim{};
CUEMU_TLS constinit dim3 gridDim{};

// ------------------------------------------------------------------ context switch
#ifndef CUEMU_UCONTEXT
// Saves the callee-saved registers on the current stack, stores its stack pointer in
// *save_sp, loads load_sp, restores and returns into the other context. MXCSR and the x87
// control word are not switched: kernels never change them.
extern "C" void cuemu_switch_stack(void** save_sp, void* load_sp);
__asm__(R"(
  .text
  .globl cuemu_switch_stack
  .hidden cuemu_switch_stack
  .type cuemu_switch_stack,@function
cuemu_switch_stack:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size cuemu_switch_stack,.-cuemu_switch_stack
)");
#endif

namespace cuemu {
namespace {

enum class Schedule : uint32_t { InOrder = 0, Reverse = 1, Random = 2, RunAhead = 3 };
enum class Wait : uint8_t { Runnable, Barrier, Warp, Warpgroup, Parked, Exited };
enum class Collective : uint8_t { Sync, Shuffle, Ballot, Mma, LdMatrix };
const char* collective_name(Collective c) {
  switch (c) {
    case Collective::Sync: return "__syncwarp";
    case Collective::Shuffle: return "__shfl_sync";
    case Collective::Ballot: return "__ballot_sync/__any_sync/__all_sync";
    case Collective::Mma: return "mma.sync";
    case Collective::LdMatrix: return "ldmatrix";
  }
  return "?";
}

// One lane's side of a warp collective: inputs captured on arrival, outputs on release.
struct LaneSlot {
  Collective op;
  unsigned mask;
  uint32_t aux;      // shuffle: source lane; ldmatrix: num | trans << 8; mma: MmaInput
  uint32_t in[10];   // shuffle: value; ballot: predicate; ldmatrix: the lane's row; mma: a, b, c
  uint32_t out[4];
};

struct PendingCopy {
  void* dst;
  const void* src;
  unsigned bytes, src_bytes, group;
#ifdef CUEMU_PROFILE
  racecheck::Issue issue;  // what the issuer knew: the copy is checked against that
#endif
};

struct Fiber {
  void* sp = nullptr;
#ifdef CUEMU_UCONTEXT
  ucontext_t context;
#endif
  char* stack_lo = nullptr;
  size_t stack_size = 0;
  uint3 tid{};
  unsigned linear = 0, lane = 0, warp = 0;
  Wait wait = Wait::Runnable;
  const char* barrier_file = nullptr;
  int barrier_line = 0, barrier_predicate = 0;
  const void* parked_on = nullptr;  // Wait::Parked: the mbarrier (hopper_async.h); the site in barrier_*
  unsigned parked_parity = 0;
  std::vector<PendingCopy> copies;  // cp.async: performed at the covering wait_group
  unsigned committed_groups = 0;
#ifdef CUEMU_ASAN
  void* asan_fake_stack = nullptr;
#endif
};

struct WarpState {
  unsigned live = 0, waiting = 0;
  unsigned runnable = 0;  // the run-ahead schedule's run queue: lanes ready to run
};

// A warpgroup collective (wgmma.cpp) being gathered: which one, and how many have arrived.
struct WarpgroupWait {
  const char* what = nullptr;
  unsigned arrived = 0;
};

struct Launch {
  const KernelEntry* kernel;
  void** params;
  dim3 grid, block;
  size_t shared_bytes;
  Schedule schedule;
  uint64_t seed;
  size_t stack_bytes;
  uint64_t block_count;
  bool profiling = false;
  std::atomic<uint64_t> next_block{0};
  std::atomic<bool> failed{false};
  std::mutex error_mutex;
  std::string error;
};

// Everything one OS thread needs to run blocks; reused across blocks and launches.
struct Worker {
  std::vector<Fiber> fibers;
  unsigned thread_count = 0, live = 0;
  std::vector<unsigned> run_queue, released;
  unsigned queue_head = 0, queue_size = 0;
  unsigned leader = 0;  // run-ahead: the warp that runs while it can
  unsigned barrier_arrived = 0, barrier_generation = 0;
  int barrier_count[2] = {0, 0}, barrier_arrivals[2] = {0, 0};
  WarpState warps[32];
  WarpgroupWait warpgroups[8];
  LaneSlot slots[1024];
  void* main_sp = nullptr;
#ifdef CUEMU_UCONTEXT
  ucontext_t main_context;
#endif
  Launch* launch = nullptr;
  unsigned char* shared = nullptr;
  size_t shared_capacity = 0;
  uint64_t rng = 0;
  std::string failure;  // set when the running block is abandoned
#ifdef CUEMU_ASAN
  void* asan_main_fake_stack = nullptr;
  const void* asan_main_bottom = nullptr;
  size_t asan_main_size = 0;
  bool asan_leaving_main = false;
#endif
  // All fiber stacks of this worker in one mapping (one VMA: per-fiber mappings with guard
  // pages would exhaust vm.max_map_count with many workers). Each slot starts with a
  // canary that catches most overflows when the fiber exits.
  char* stacks = nullptr;
  size_t stack_slot = 0, stack_bytes = 0;
  ~Worker() {
    if (stacks) munmap(stacks, kMaxThreads * stack_slot);
    free(shared);
  }
  static constexpr unsigned kMaxThreads = 1024;
  static constexpr size_t kCanary = 256, kStagger = 64 * 192;
};

CUEMU_TLS Worker* tl_worker = nullptr;
CUEMU_TLS Fiber* tl_fiber = nullptr;

Worker& this_worker() {
  static thread_local Worker w;  // stacks are unmapped when the OS thread exits
  return w;
}
uint64_t next_random(Worker& w) {
  w.rng ^= w.rng << 13;
  w.rng ^= w.rng >> 7;
  w.rng ^= w.rng << 17;
  return w.rng;
}

[[noreturn]] void internal_error(const char* msg) {
  fprintf(stderr, "cuemu: internal error: %s\n", msg);
  abort();
}

// ------------------------------------------------------------------ fiber switching
#ifdef CUEMU_ASAN
// Every resumed context must call __sanitizer_finish_switch_fiber; the worker's own
// stack bounds are learnt from the first switch out of it.
void asan_finish_switch(Worker& w, void* fake_stack) {
  const void* bottom;
  size_t size;
  __sanitizer_finish_switch_fiber(fake_stack, &bottom, &size);
  if (w.asan_leaving_main) {
    w.asan_main_bottom = bottom;
    w.asan_main_size = size;
    w.asan_leaving_main = false;
  }
}
#endif

// from == nullptr: the worker's own stack; to == nullptr: back to it. A `from` that is
// exiting or abandoned never resumes.
void transfer(Worker& w, Fiber* from, Fiber* to, bool from_never_resumes) {
  tl_fiber = to;
  if (to) threadIdx = to->tid;
#ifdef CUEMU_ASAN
  w.asan_leaving_main = from == nullptr;
  void** save = from_never_resumes ? nullptr : (from ? &from->asan_fake_stack : &w.asan_main_fake_stack);
  __sanitizer_start_switch_fiber(save, to ? to->stack_lo : w.asan_main_bottom,
                                 to ? to->stack_size : w.asan_main_size);
#endif
  (void)from_never_resumes;
#ifdef CUEMU_UCONTEXT
  swapcontext(from ? &from->context : &w.main_context, to ? &to->context : &w.main_context);
#else
  cuemu_switch_stack(from ? &from->sp : &w.main_sp, to ? to->sp : w.main_sp);
#endif
#ifdef CUEMU_ASAN
  asan_finish_switch(w, from ? from->asan_fake_stack : w.asan_main_fake_stack);
#endif
}

// Abandons the running block with a message; never returns to the kernel.
[[noreturn]] void fail_block(const char* fmt, ...) {
  Worker& w = *tl_worker;
  char buf[2048];
  va_list args;
  va_start(args, fmt);
  vsnprintf(buf, sizeof buf, fmt, args);
  va_end(args);
  w.failure = buf;
  transfer(w, tl_fiber, nullptr, true);
  __builtin_unreachable();
}

// ------------------------------------------------------------------ run queue
// In order, reversed and shuffled schedules: a first-in first-out queue of the threads made
// runnable, in batches ordered by the schedule. Released warps re-queue behind the others,
// so no warp gets more than one collective ahead. Run-ahead: a leader warp, chosen at
// random among those that can run, runs its lowest runnable lane until none of its lanes
// can run (all wait at a barrier or have exited); only then does another warp move. A warp
// thus runs from one barrier to the next while the others have not left the previous one,
// which turns a missing "tile consumed" barrier into stale reads.
void queue_push(Worker& w, unsigned i) {
  if (w.launch->schedule == Schedule::RunAhead) {
    w.warps[i >> 5].runnable |= 1u << (i & 31);
    ++w.queue_size;
    return;
  }
  unsigned p = w.queue_head + w.queue_size++;
  w.run_queue[p >= w.thread_count ? p - w.thread_count : p] = i;
}
int run_ahead_pop(Worker& w) {
  const unsigned warps = (w.thread_count + 31) / 32;
  if (!w.warps[w.leader].runnable) {
    unsigned ready = 0;
    for (unsigned i = 0; i < warps; ++i) ready += w.warps[i].runnable != 0;
    for (unsigned i = 0, pick = unsigned(next_random(w) % ready);; ++i)
      if (w.warps[i].runnable && pick-- == 0) {
        w.leader = i;
        break;
      }
  }
  unsigned& lanes = w.warps[w.leader].runnable;
  const unsigned lane = __builtin_ctz(lanes);
  lanes &= lanes - 1;
  --w.queue_size;
  return int(w.leader * 32 + lane);
}
int queue_pop(Worker& w) {
  if (!w.queue_size) return -1;
  if (w.launch->schedule == Schedule::RunAhead) return run_ahead_pop(w);
  const unsigned i = w.run_queue[w.queue_head];
  if (++w.queue_head == w.thread_count) w.queue_head = 0;
  --w.queue_size;
  return int(i);
}
// Makes the fibers in w.released runnable, in the order the schedule asks for.
void release(Worker& w) {
  auto& r = w.released;
  switch (w.launch->schedule) {
    case Schedule::InOrder:
    case Schedule::RunAhead: break;
    case Schedule::Reverse: std::reverse(r.begin(), r.end()); break;
    case Schedule::Random:
      for (size_t i = r.size(); i > 1; --i) std::swap(r[i - 1], r[next_random(w) % i]);
      break;
  }
  for (unsigned i : r) {
    w.fibers[i].wait = Wait::Runnable;
    queue_push(w, i);
  }
  r.clear();
}

[[noreturn]] void deadlock(Worker& w) {
  std::string msg = "deadlock: no CUDA thread of the block can run";
  char line[256];
  snprintf(line, sizeof line, " (%u live, %u at __syncthreads)", w.live, w.barrier_arrived);
  msg += line;
  for (unsigned i = 0; i < w.thread_count; ++i) {
    const Fiber& f = w.fibers[i];
    if (f.wait == Wait::Warp) {
      snprintf(line, sizeof line, "; thread %u (warp %u lane %u) waits in %s with mask %08x", i, f.warp,
               f.lane, collective_name(w.slots[i].op), w.slots[i].mask);
      msg += line;
    } else if (f.wait == Wait::Warpgroup && (i % 128 == 0 || w.fibers[i - 1].wait != Wait::Warpgroup)) {
      snprintf(line, sizeof line,
               "; thread %u waits in %s for all 128 threads of warpgroup %u (warps %u..%u: a warpgroup is four "
               "aligned warps)",
               i, w.warpgroups[i / 128].what, i / 128, i / 128 * 4, i / 128 * 4 + 3);
      msg += line;
    } else if (f.wait == Wait::Barrier && (i == 0 || w.fibers[i - 1].barrier_line != f.barrier_line)) {
      snprintf(line, sizeof line, "; thread %u waits at __syncthreads %s:%d", i, f.barrier_file, f.barrier_line);
      msg += line;
    } else if (f.wait == Wait::Parked && (i == 0 || w.fibers[i - 1].parked_on != f.parked_on)) {
      char what[768];
      hopper::describe_wait(f.parked_on, f.parked_parity, what, sizeof what);
      snprintf(line, sizeof line, "; thread %u waits at %s:%d ", i, f.barrier_file, f.barrier_line);
      msg += line;
      msg += what;
    }
    if (msg.size() > 1500) break;
  }
  fail_block("%s", msg.c_str());
}

// The next fiber to run, or -1. When none can run, the copy engine finishes the copies in
// flight (hopper_async.h): that may complete an mbarrier phase and release its waiters.
int next_runnable(Worker& w) {
  const int next = queue_pop(w);
  return next < 0 && hopper::progress() ? queue_pop(w) : next;
}

// The current fiber blocked: run the next runnable one (possibly itself).
void run_next(Worker& w, Fiber* self) {
  const int next = next_runnable(w);
  if (next < 0) deadlock(w);
  Fiber* t = &w.fibers[next];
  if (t != self) transfer(w, self, t, false);
}

void release_block_barrier(Worker& w) {
  int count = 0;
  for (unsigned i = 0; i < w.thread_count; ++i) {
    Fiber& f = w.fibers[i];
    if (f.wait != Wait::Barrier) continue;
    count += f.barrier_predicate != 0;
    w.released.push_back(i);
  }
  w.barrier_count[w.barrier_generation & 1] = count;
  w.barrier_arrivals[w.barrier_generation & 1] = int(w.released.size());
  w.barrier_arrived = 0;
  ++w.barrier_generation;
  CUEMU_RACECHECK(barrier());
  release(w);
}

// ------------------------------------------------------------------ warp collectives
void resolve_sync(LaneSlot*, unsigned) {}

void resolve_shuffle(LaneSlot* lanes, unsigned group) {
  for (unsigned t = group; t; t &= t - 1) {
    LaneSlot& s = lanes[__builtin_ctz(t)];
    if (!((group >> s.aux) & 1))
      fail_block("__shfl_sync reads lane %u, which is not in the mask %08x", s.aux, s.mask);
    s.out[0] = lanes[s.aux].in[0];
    s.out[1] = lanes[s.aux].in[1];
  }
}

void resolve_ballot(LaneSlot* lanes, unsigned group) {
  unsigned bits = 0;
  for (unsigned t = group; t; t &= t - 1)
    if (lanes[__builtin_ctz(t)].in[0]) bits |= 1u << __builtin_ctz(t);
  for (unsigned t = group; t; t &= t - 1) lanes[__builtin_ctz(t)].out[0] = bits;
}

float mma_element(uint32_t reg, unsigned half, MmaInput input) {
  const uint16_t bits = uint16_t(reg >> (16 * half));
  return input == MmaInput::Bf16 ? bf16_bits_to_float(bits) : f16_bits_to_float(bits);
}

// A tf32 operand register as a float. The low 13 bits must be zero (cvt.rna.tf32.f32 or a
// widened f16/bf16 value): the hardware's use of them is not specified, so a kernel that
// feeds raw f32 bits fails here instead of depending on it.
float tf32_element(uint32_t reg) {
  if (reg & 0x1fffu) fail_block("mma.sync tf32: operand %08x is not a tf32 value (cvt.rna.tf32.f32 first)", reg);
  return bits_float(reg);
}

// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16} and m16n8k8 .tf32: rebuild A, B, C from
// the fragments (layouts in ptx.cuh), D = A*B + C with one fmaf per product in k order. The
// products are exact in f32 for every input type (at most 11 + 11 significant bits).
void resolve_mma(LaneSlot* lanes, unsigned group) {
  if (group != 0xffffffffu) fail_block("mma.sync needs all 32 lanes of the warp (mask %08x)", group);
  const MmaInput input = MmaInput(lanes[0].aux);
  const unsigned K = input == MmaInput::Tf32 ? 8 : 16;
  float A[16][16], B[16][8], C[16][8];
  for (unsigned lane = 0; lane < 32; ++lane) {
    const uint32_t* in = lanes[lane].in;
    if (lanes[lane].aux != lanes[0].aux) fail_block("mma.sync: lanes disagree on the input type");
    const unsigned g = lane >> 2, t = lane & 3;
    if (input == MmaInput::Tf32) {
      for (unsigned i = 0; i < 4; ++i)  // a[i]: row g (+8 if i odd), column t (+4 if i >= 2)
        A[g + ((i & 1) ? 8 : 0)][t + (i >= 2 ? 4 : 0)] = tf32_element(in[i]);
      for (unsigned i = 0; i < 2; ++i) B[t + 4 * i][g] = tf32_element(in[4 + i]);  // b[i]: k = t (+4), column g
    } else {
      for (unsigned i = 0; i < 8; ++i)  // a[i/2], half i%2
        A[g + ((i & 2) ? 8 : 0)][2 * t + (i & 1) + ((i & 4) ? 8 : 0)] = mma_element(in[i / 2], i & 1, input);
      for (unsigned i = 0; i < 4; ++i)  // b[i/2], half i%2
        B[2 * t + (i & 1) + (i >= 2 ? 8 : 0)][g] = mma_element(in[4 + i / 2], i & 1, input);
    }
    for (unsigned i = 0; i < 4; ++i) C[g + (i >= 2 ? 8 : 0)][2 * t + (i & 1)] = bits_float(in[6 + i]);
  }
  for (unsigned lane = 0; lane < 32; ++lane) {
    const unsigned g = lane >> 2, t = lane & 3;
    for (unsigned i = 0; i < 4; ++i) {
      const unsigned r = g + (i >= 2 ? 8 : 0), c = 2 * t + (i & 1);
      float acc = C[r][c];
      for (unsigned k = 0; k < K; ++k) acc = fmaf(A[r][k], B[k][c], acc);
      lanes[lane].out[i] = float_bits(acc);
    }
  }
}

// ldmatrix.sync.aligned.m8n8.x{1,2,4}[.trans].b16: lane 8j+r captured row r of matrix j.
// Register j of lane l: row l/4, elements 2(l%4), 2(l%4)+1 (.trans: column l/4, rows 2(l%4), 2(l%4)+1).
void resolve_ldmatrix(LaneSlot* lanes, unsigned group) {
  if (group != 0xffffffffu) fail_block("ldmatrix needs all 32 lanes of the warp (mask %08x)", group);
  const unsigned num = lanes[0].aux & 0xff;
  const bool trans = lanes[0].aux >> 8;
  for (unsigned lane = 0; lane < 32; ++lane)
    if (lanes[lane].aux != lanes[0].aux) fail_block("ldmatrix: lanes disagree on .num or .trans");
  auto element = [&](unsigned matrix, unsigned row, unsigned col) -> uint32_t {
    const uint32_t word = lanes[8 * matrix + row].in[col / 2];
    return (word >> (16 * (col & 1))) & 0xffffu;
  };
  for (unsigned lane = 0; lane < 32; ++lane) {
    const unsigned q = lane >> 2, p = 2 * (lane & 3);
    for (unsigned j = 0; j < num; ++j)
      lanes[lane].out[j] = trans ? element(j, p, q) | element(j, p + 1, q) << 16
                                 : element(j, q, p) | element(j, q, p + 1) << 16;
  }
}

void resolve(Collective op, LaneSlot* lanes, unsigned group) {
  switch (op) {
    case Collective::Sync: return resolve_sync(lanes, group);
    case Collective::Shuffle: return resolve_shuffle(lanes, group);
    case Collective::Ballot: return resolve_ballot(lanes, group);
    case Collective::Mma: return resolve_mma(lanes, group);
    case Collective::LdMatrix: return resolve_ldmatrix(lanes, group);
  }
}

// Resolves every group of warp `wi` whose members have all arrived. A group is the set of
// waiting lanes with one mask; it is complete when every live lane of the mask waits.
void try_release_warp(Worker& w, unsigned wi) {
  WarpState& ws = w.warps[wi];
  LaneSlot* lanes = &w.slots[wi * 32];
  unsigned todo = ws.waiting;
  while (todo) {
    const unsigned first = __builtin_ctz(todo), mask = lanes[first].mask, need = mask & ws.live;
    unsigned group = 0;
    for (unsigned t = todo; t; t &= t - 1)
      if (lanes[__builtin_ctz(t)].mask == mask) group |= 1u << __builtin_ctz(t);
    todo &= ~group;
    if ((group & need) != need) continue;
    for (unsigned t = group; t; t &= t - 1)
      if (lanes[__builtin_ctz(t)].op != lanes[first].op)
        fail_block("lanes %u and %u of warp %u meet in different collectives (%s, %s) with mask %08x", first,
                   __builtin_ctz(t), wi, collective_name(lanes[first].op),
                   collective_name(lanes[__builtin_ctz(t)].op), mask);
    resolve(lanes[first].op, lanes, group);
    if (lanes[first].op == Collective::Sync) CUEMU_RACECHECK(warp_sync(wi, group));
    ws.waiting &= ~group;
    for (unsigned t = group; t; t &= t - 1) w.released.push_back(wi * 32 + __builtin_ctz(t));
    release(w);
  }
}

// The calling lane has filled its slot's inputs: wait for its group, then read outputs.
LaneSlot& arrive(unsigned mask, Collective op) {
  Worker& w = *tl_worker;
  Fiber* f = tl_fiber;
  if (!((mask >> f->lane) & 1))
    fail_block("%s: calling lane %u is not in the mask %08x", collective_name(op), f->lane, mask);
  LaneSlot& s = w.slots[f->linear];
  s.mask = mask;
  s.op = op;
  f->wait = Wait::Warp;
  WarpState& ws = w.warps[f->warp];
  ws.waiting |= 1u << f->lane;
  if (((ws.waiting | ~ws.live) & mask) == mask) try_release_warp(w, f->warp);
  run_next(w, f);
  return s;
}

// ------------------------------------------------------------------ cp.async
void complete_copies(Fiber& f, unsigned pending_groups) {
  size_t kept = 0;
  for (PendingCopy& c : f.copies) {
    if (c.group + pending_groups < f.committed_groups) {
#ifdef CUEMU_PROFILE
      CUEMU_RACECHECK(land(c.issue, c.dst, c.bytes, racecheck::Kind::CpAsync));
#endif
      memcpy(c.dst, c.src, c.src_bytes);
      memset(static_cast<char*>(c.dst) + c.src_bytes, 0, c.bytes - c.src_bytes);
    } else {
      f.copies[kept++] = c;
    }
  }
  f.copies.resize(kept);
}

// ------------------------------------------------------------------ block execution
constexpr unsigned char kCanaryByte = 0xCA;

#ifndef CUEMU_ASAN  // under ASan the canary is poisoned instead: an overflow is reported at once
bool canary_intact(const Fiber& f) {
  for (size_t i = 0; i < Worker::kCanary; ++i)
    if (static_cast<unsigned char>(f.stack_lo[i]) != kCanaryByte) return false;
  return true;
}
#endif

[[noreturn]] void fiber_exit(Worker& w, Fiber* f) {
#ifndef CUEMU_ASAN
  if (!canary_intact(*f))
    fail_block("stack overflow in CUDA thread %u: it used more than MOE_EMU_STACK_KIB=%zu KiB", f->linear,
               w.stack_bytes >> 10);
#endif
  ++f->committed_groups;  // copies still in flight land before the thread is gone
  complete_copies(*f, 0);
  hopper::thread_exit(f->linear);
  f->wait = Wait::Exited;
  --w.live;
  w.warps[f->warp].live &= ~(1u << f->lane);
  if (w.live && w.barrier_arrived == w.live) release_block_barrier(w);  // exited threads count as arrived
  if (w.warps[f->warp].waiting) try_release_warp(w, f->warp);
  if (w.warpgroups[f->linear / 128].arrived)
    fail_block("thread %u exited while warpgroup %u waits for it in %s (a warpgroup is four aligned warps, "
               "and all 128 threads execute its collectives)",
               f->linear, f->linear / 128, w.warpgroups[f->linear / 128].what);
  const int next = w.live ? next_runnable(w) : queue_pop(w);
  if (next < 0 && w.live) deadlock(w);
  transfer(w, f, next < 0 ? nullptr : &w.fibers[next], true);
  __builtin_unreachable();
}

void fiber_main() {
  Worker& w = *tl_worker;
#ifdef CUEMU_ASAN
  asan_finish_switch(w, nullptr);
#endif
  w.launch->kernel->invoke(w.launch->params);
  fiber_exit(w, tl_fiber);
}

// Maps the worker's stacks for `stack_bytes` per CUDA thread; false if the host refused.
bool ensure_stacks(Worker& w, size_t stack_bytes) {
  if (w.stacks && w.stack_bytes == stack_bytes) return true;
  if (w.stacks) munmap(w.stacks, Worker::kMaxThreads * w.stack_slot);
  w.stack_bytes = stack_bytes;
  w.stack_slot = (Worker::kCanary + stack_bytes + Worker::kStagger + 4095) & ~size_t(4095);
  void* p = mmap(nullptr, Worker::kMaxThreads * w.stack_slot, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  w.stacks = p == MAP_FAILED ? nullptr : static_cast<char*>(p);
  return w.stacks != nullptr;
}

void prepare_fiber(Worker& w, Fiber& f, unsigned i) {
  f.stack_lo = w.stacks + i * w.stack_slot;
  f.stack_size = w.stack_slot;
#ifdef CUEMU_ASAN
  __asan_unpoison_memory_region(f.stack_lo, Worker::kCanary);
#endif
  memset(f.stack_lo, kCanaryByte, Worker::kCanary);
#ifdef CUEMU_ASAN
  // Frames left poisoned by the previous block's fibers: fiber_main never returns, so its
  // frames near the top of the stack stay (abandoned blocks are cleaned in run_block).
  const size_t dirty = std::min<size_t>(f.stack_size, 64 << 10);
  __asan_unpoison_memory_region(f.stack_lo + f.stack_size - dirty, dirty);
#endif
  // Stagger stack tops so that many fibers' hot frames do not alias in the same cache sets.
  char* top = f.stack_lo + f.stack_size - (i % 64) * 192;
#ifdef CUEMU_ASAN
  __asan_poison_memory_region(f.stack_lo, Worker::kCanary);  // ASan reports an overflow at once
#endif
#ifdef CUEMU_UCONTEXT
  getcontext(&f.context);
  f.context.uc_stack.ss_sp = f.stack_lo + Worker::kCanary;
  f.context.uc_stack.ss_size = size_t(top - f.stack_lo) - Worker::kCanary;
  f.context.uc_link = nullptr;
  makecontext(&f.context, fiber_main, 0);
#else
  auto sp = reinterpret_cast<void**>(reinterpret_cast<uintptr_t>(top) & ~uintptr_t(15));
  *--sp = nullptr;                                // fake return address: ends backtraces
  *--sp = reinterpret_cast<void*>(&fiber_main);  // popped by `ret` in cuemu_switch_stack
  for (int r = 0; r < 6; ++r) *--sp = nullptr;   // rbp rbx r12 r13 r14 r15
  f.sp = sp;
#endif
  f.wait = Wait::Runnable;
  f.copies.clear();
  f.committed_groups = 0;
}

// Runs block `b` to completion; returns false (with w.failure set) if it was abandoned.
bool run_block(Worker& w, Launch& L, uint64_t b) {
  const dim3 bd = L.block;
  blockIdx = uint3{unsigned(b % L.grid.x), unsigned(b / L.grid.x % L.grid.y),
                   unsigned(b / (uint64_t(L.grid.x) * L.grid.y))};
  blockDim = bd;
  gridDim = L.grid;
  w.rng = (L.seed + 1) * 0x9E3779B97F4A7C15ull ^ (b + 1) * 0xD1B54A32D192ED03ull;
  next_random(w);
  const unsigned n = bd.x * bd.y * bd.z;
  w.launch = &L;
  if (w.fibers.size() < n) w.fibers.resize(n);
  if (!ensure_stacks(w, L.stack_bytes)) {
    w.failure = "the host refused to map " + std::to_string(Worker::kMaxThreads) + " fiber stacks of " +
                std::to_string(L.stack_bytes >> 10) + " KiB (lower MOE_EMU_STACK_KIB or MOE_EMU_WORKERS)";
    return false;
  }
  w.thread_count = n;
  w.live = n;
  w.barrier_arrived = 0;
  w.run_queue.assign(n, 0);
  w.queue_head = w.queue_size = 0;
  w.leader = 0;
  w.released.clear();
  w.failure.clear();
  for (WarpState& ws : w.warps) ws = WarpState{};
  hopper::block_begin(n);
  for (WarpgroupWait& g : w.warpgroups) g = WarpgroupWait{};
  for (unsigned i = 0; i < n; ++i) {
    Fiber& f = w.fibers[i];
    prepare_fiber(w, f, i);
    f.tid = uint3{i % bd.x, i / bd.x % bd.y, i / (bd.x * bd.y)};
    f.linear = i;
    f.lane = i & 31;
    f.warp = i >> 5;
    w.warps[f.warp].live |= 1u << f.lane;
    w.released.push_back(i);
  }
  // Dynamic shared memory: a heap block of the launch's size (ASan sees overruns past it),
  // filled with 0xFF (NaN as float) so that reads of never-written shared memory stand out.
  // Aligned to 1024 bytes, as the GPU's shared window and the repeat of the 128-byte swizzle
  // (swizzle.cuh): the emulated shared address (wgmma_shared_offset) is the offset from here.
  const size_t rounded = (L.shared_bytes + 1023) & ~size_t(1023);
  if (rounded > w.shared_capacity) {
    free(w.shared);
    w.shared = static_cast<unsigned char*>(aligned_alloc(1024, rounded));
    if (!w.shared) internal_error("allocation of dynamic shared memory failed");
    w.shared_capacity = rounded;
  }
#ifdef CUEMU_ASAN
  if (w.shared) {
    __asan_unpoison_memory_region(w.shared, w.shared_capacity);
    __asan_poison_memory_region(w.shared + L.shared_bytes, w.shared_capacity - L.shared_bytes);
  }
#endif
  if (L.shared_bytes) memset(w.shared, 0xFF, L.shared_bytes);
  hopper_block_begin(w.shared, L.shared_bytes);
  release(w);
#ifdef CUEMU_PROFILE
  if (L.profiling) profiler::block_begin(n);
  CUEMU_RACECHECK(block_begin(n, w.shared, L.shared_bytes));
#endif
  tl_worker = &w;
  transfer(w, nullptr, &w.fibers[queue_pop(w)], false);
  tl_worker = nullptr;
#ifdef CUEMU_PROFILE
  if (L.profiling) profiler::block_end();
#endif
#ifdef CUEMU_ASAN
  if (!w.failure.empty())  // abandoned fibers may have left poisoned frames anywhere
    for (unsigned i = 0; i < n; ++i) __asan_unpoison_memory_region(w.fibers[i].stack_lo, w.fibers[i].stack_size);
#endif
  return w.failure.empty();
}

// ------------------------------------------------------------------ worker pool
void work_on(Launch& L) {
  Worker& w = this_worker();
  for (uint64_t b; !L.failed.load(std::memory_order_relaxed) &&
                   (b = L.next_block.fetch_add(1, std::memory_order_relaxed)) < L.block_count;) {
    if (!run_block(w, L, b)) {
      std::lock_guard<std::mutex> lock(L.error_mutex);
      if (!L.failed.exchange(true)) {
        char where[96];
        snprintf(where, sizeof where, " [block (%u,%u,%u)]", blockIdx.x, blockIdx.y, blockIdx.z);
        L.error = w.failure + where;
      }
    }
  }
}

class Pool {
 public:
  explicit Pool(unsigned helpers) {
    for (unsigned i = 0; i < helpers; ++i) threads_.emplace_back([this] { serve(); });
  }
  unsigned helpers() const { return unsigned(threads_.size()); }
  // Runs L on the calling thread plus `helpers` pool threads. Callers serialize launches.
  void run(Launch& L, unsigned helpers) {
    helpers = std::min<uint64_t>({helpers, this->helpers(), L.block_count - 1});
    if (helpers) {  // waking threads costs tens of microseconds: only for multi-block launches
      std::lock_guard<std::mutex> lock(mutex_);
      job_ = &L;
      wanted_ = helpers;
      busy_ = helpers;
      ++epoch_;
      go_.notify_all();
    }
    work_on(L);
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [&] { return busy_ == 0; });
  }

 private:
  void serve() {
    uint64_t seen = 0;
    for (;;) {
      std::unique_lock<std::mutex> lock(mutex_);
      go_.wait(lock, [&] { return epoch_ != seen && wanted_ > 0; });
      seen = epoch_;
      --wanted_;
      Launch* L = job_;
      lock.unlock();
      work_on(*L);
      lock.lock();
      if (--busy_ == 0) done_.notify_all();
    }
  }
  std::mutex mutex_;
  std::condition_variable go_, done_;
  std::vector<std::thread> threads_;
  Launch* job_ = nullptr;
  uint64_t epoch_ = 0;
  unsigned wanted_ = 0, busy_ = 0;
};

Pool& pool() {
#if defined(CUEMU_ASAN) || defined(CUEMU_PROFILE)
  const unsigned helpers = 0;  // static shared arrays are plain statics: one block at a time
#else
  // Capped: more workers than this buy nothing for test-sized launches.
  const unsigned helpers = std::clamp(std::thread::hardware_concurrency(), 1u, 16u) - 1;
#endif
  static Pool* p = new Pool(helpers);  // never destroyed: its threads outlive main's statics
  return *p;
}

#ifdef CUEMU_ASAN
void name_cuda_thread_in_report(const char*) {
  if (tl_fiber && tl_worker)
    fprintf(stderr, "cuemu: the report above comes from CUDA thread (%u,%u,%u) of block (%u,%u,%u)\n",
            threadIdx.x, threadIdx.y, threadIdx.z, blockIdx.x, blockIdx.y, blockIdx.z);
}
#endif

}  // namespace

// ------------------------------------------------------------------ device-side API
void* dynamic_shared() { return tl_worker->shared; }

int block_barrier(int predicate, BarrierReduce reduce, const char* file, int line) {
  Worker& w = *tl_worker;
  Fiber* f = tl_fiber;
  f->wait = Wait::Barrier;
  f->barrier_predicate = predicate;
  f->barrier_file = file;
  f->barrier_line = line;
  const unsigned generation = w.barrier_generation;
  if (++w.barrier_arrived == w.live) release_block_barrier(w);
  run_next(w, f);
  const int count = w.barrier_count[generation & 1];
  switch (reduce) {  // exited threads take no part, as on sm_70+
    case BarrierReduce::Count: return count;
    case BarrierReduce::And: return count == w.barrier_arrivals[generation & 1];
    case BarrierReduce::Or: return count != 0;
  }
  return count;
}

void warp_sync(unsigned mask) { arrive(mask, Collective::Sync); }

uint64_t warp_shuffle(unsigned mask, uint64_t value, unsigned source_lane) {
  LaneSlot& s = tl_worker->slots[tl_fiber->linear];
  s.in[0] = uint32_t(value);
  s.in[1] = uint32_t(value >> 32);
  s.aux = source_lane & 31;
  arrive(mask, Collective::Shuffle);
  return uint64_t(s.out[0]) | uint64_t(s.out[1]) << 32;
}

unsigned warp_ballot(unsigned mask, int predicate) {
  LaneSlot& s = tl_worker->slots[tl_fiber->linear];
  s.in[0] = predicate != 0;
  return arrive(mask, Collective::Ballot).out[0];
}

unsigned active_mask() { return tl_worker->warps[tl_fiber->warp].live; }

void warpgroup_arrive(const char* what, void (*resolve)(unsigned warpgroup)) {
  Worker& w = *tl_worker;
  Fiber* f = tl_fiber;
  const unsigned g = f->linear / 128;
  if (w.thread_count < 128 * (g + 1))
    fail_block("%s: thread %u is in warpgroup %u, which the block's %u threads do not fill (a warpgroup is four "
               "aligned warps, 128 threads)",
               what, f->linear, g, w.thread_count);
  for (unsigned warp = 4 * g; warp < 4 * g + 4; ++warp)
    if (w.warps[warp].live != 0xffffffffu)
      fail_block("%s: warp %u of warpgroup %u has exited threads (all 128 threads of the warpgroup, warps %u..%u, "
                 "execute it together)",
                 what, warp, g, 4 * g, 4 * g + 3);
  WarpgroupWait& wg = w.warpgroups[g];
  if (wg.arrived && strcmp(wg.what, what) != 0)
    fail_block("threads of warpgroup %u meet in different warpgroup collectives (%s, %s)", g, wg.what, what);
  wg.what = what;
  f->wait = Wait::Warpgroup;
  if (++wg.arrived == 128) {
    resolve(g);
    wg.arrived = 0;
    for (unsigned i = 128 * g; i < 128 * (g + 1); ++i) w.released.push_back(i);
    release(w);
  }
  run_next(w, f);
}
unsigned lane_id() { return tl_fiber->lane; }

void mma_m16n8k16(float* d, const uint32_t* a, const uint32_t* b, const float* c, MmaInput input) {
  LaneSlot& s = tl_worker->slots[tl_fiber->linear];
  memcpy(s.in, a, 16);
  memcpy(s.in + 4, b, 8);
  memcpy(s.in + 6, c, 16);
  s.aux = uint32_t(input);
  arrive(0xffffffffu, Collective::Mma);
  memcpy(d, s.out, 16);
}

void mma_m16n8k8_tf32(float* d, const uint32_t* a, const uint32_t* b, const float* c) {
  mma_m16n8k16(d, a, b, c, MmaInput::Tf32);  // the same slots: a[4], b[2], c[4]
}

void ldmatrix(uint32_t* regs, unsigned num, bool trans, const void* row) {
  LaneSlot& s = tl_worker->slots[tl_fiber->linear];
  s.aux = num | uint32_t(trans) << 8;
  if (tl_fiber->lane < 8 * num) {  // this lane's row is read now, when the lane arrives
    check_aligned(row, 16, "ldmatrix row");
    memcpy(s.in, row, 16);
#ifdef CUEMU_PROFILE
    const uintptr_t site = uintptr_t(__builtin_return_address(0));
    profiler::record(row, 16, profiler::Access::Load, site);
    CUEMU_RACECHECK(access(row, 16, racecheck::Kind::LdMatrix, site));
#endif
  }
  arrive(0xffffffffu, Collective::LdMatrix);
  memcpy(regs, s.out, 4 * num);
}

void cp_async(void* dst, const void* src, unsigned bytes, unsigned src_bytes) {
  check_aligned(dst, bytes, bytes == 16 ? "cp.async (16 bytes) shared destination"
                           : bytes == 8 ? "cp.async (8 bytes) shared destination"
                                        : "cp.async (4 bytes) shared destination");
  check_aligned(src, bytes, bytes == 16 ? "cp.async (16 bytes) global source"
                           : bytes == 8 ? "cp.async (8 bytes) global source"
                                        : "cp.async (4 bytes) global source");
  if (src_bytes > bytes) fail_block("cp.async: src-size %u exceeds the copy size %u", src_bytes, bytes);
  Fiber& f = *tl_fiber;
#ifdef CUEMU_PROFILE
  const uintptr_t site = uintptr_t(__builtin_return_address(0));
  f.copies.push_back({dst, src, bytes, src_bytes, f.committed_groups, racecheck::issue(site)});
  if (src_bytes) profiler::record(src, src_bytes, profiler::Access::Load, site);
  profiler::record(dst, bytes, profiler::Access::Store, site);
#else
  f.copies.push_back({dst, src, bytes, src_bytes, f.committed_groups});
#endif
}
void cp_async_commit() { ++tl_fiber->committed_groups; }
void cp_async_wait_group(unsigned pending) { complete_copies(*tl_fiber, pending); }

void sched::park(const void* object, unsigned parity, Site site) {
  Worker& w = *tl_worker;
  Fiber* f = tl_fiber;
  f->wait = Wait::Parked;
  f->parked_on = object;
  f->parked_parity = parity;
  f->barrier_file = site.file;
  f->barrier_line = site.line;
  run_next(w, f);
}

void sched::unpark(const void* object) {
  Worker& w = *tl_worker;
  for (unsigned i = 0; i < w.thread_count; ++i)
    if (w.fibers[i].wait == Wait::Parked && w.fibers[i].parked_on == object) w.released.push_back(i);
  release(w);
}

unsigned sched::thread_index() { return tl_fiber->linear; }

void trap(const char* file, int line) { fail_block("__trap() at %s:%d", file, line); }
void fail(const char* message) { fail_block("%s", message); }
// An array indexed past its end in kernel code (a local or shared array of known size).
[[noreturn]] void index_out_of_bounds(const char* access) {
  if (!tl_worker || !tl_fiber) {
    fprintf(stderr, "cuemu: %s\n", access);
    abort();
  }
  fail_block("%s (undefined behaviour on the GPU); CUDA thread (%u,%u,%u)", access, threadIdx.x, threadIdx.y,
             threadIdx.z);
}

void misaligned(const char* access, const void* address, unsigned alignment) {
  if (!tl_worker || !tl_fiber) {
    fprintf(stderr, "cuemu: misaligned address: %s at %p needs %u-byte alignment\n", access, address, alignment);
    abort();
  }
  fail_block("misaligned address: %s at %p needs %u-byte alignment (the GPU faults here); CUDA thread (%u,%u,%u)",
             access, address, alignment, threadIdx.x, threadIdx.y, threadIdx.z);
}

#ifdef CUEMU_PROFILE
__attribute__((noinline)) void profile_atomic(const void* p, unsigned bytes) {
  const uintptr_t site = uintptr_t(__builtin_return_address(0));
  profiler::record(p, bytes, profiler::Access::Atomic, site);
  CUEMU_RACECHECK(access(p, bytes, racecheck::Kind::Atomic, site));
}

bool profiler::current_lane(LaneView* out) {
  const Worker* w = tl_worker;
  const Fiber* f = tl_fiber;
  if (!w || !f) return false;
  *out = LaneView{f->linear, f->warp, f->stack_lo, f->stack_size, w->shared, w->launch->shared_bytes};
  return true;
}
#endif

}  // namespace cuemu

// ------------------------------------------------------------------ alignment and array bounds
// The kernel files are compiled with -fsanitize=alignment,bounds (build/emulator.rs): the
// compiler checks every typed access in kernel code (a float2 or a uint32_t store through a
// cast pointer, ...) and every index into an array of known size (local arrays, static
// shared arrays), and calls these handlers on a misaligned access or an index past the end.
// They are the only UBSan entry points those flags emit, so no UBSan runtime is linked.
// Layouts: compiler-rt's ubsan_handlers.h and ubsan_value.h (the same in GCC's libsanitizer).
namespace {
struct UbsanSourceLocation {
  const char* file;
  uint32_t line, column;
};
struct UbsanTypeDescriptor {
  uint16_t kind, info;
  char name[1];
};
struct UbsanTypeMismatch {
  UbsanSourceLocation location;
  const UbsanTypeDescriptor* type;
  unsigned char log_alignment, check_kind;
};
const char* ubsan_check_kind(unsigned char kind) {
  static const char* const names[] = {"load of", "store to", "reference binding to", "member access within",
                                      "member call on"};
  return kind < sizeof names / sizeof *names ? names[kind] : "access to";
}
[[noreturn]] void ubsan_misaligned(const UbsanTypeMismatch* data, uintptr_t pointer) {
  char access[512];
  snprintf(access, sizeof access, "%s %s (%s:%u)", ubsan_check_kind(data->check_kind), data->type->name,
           data->location.file, data->location.line);
  cuemu::misaligned(access, reinterpret_cast<const void*>(pointer), 1u << data->log_alignment);
}
}  // namespace
extern "C" void __ubsan_handle_type_mismatch_v1(const UbsanTypeMismatch* data, uintptr_t pointer) {
  ubsan_misaligned(data, pointer);
}
extern "C" void __ubsan_handle_type_mismatch_v1_abort(const UbsanTypeMismatch* data, uintptr_t pointer) {
  ubsan_misaligned(data, pointer);
}

namespace cuemu {
[[noreturn]] void index_out_of_bounds(const char* access);
}
namespace {
struct UbsanOutOfBounds {
  UbsanSourceLocation location;
  const UbsanTypeDescriptor* array_type;
  const UbsanTypeDescriptor* index_type;
};
// An integer index travels in the handle itself; its type's info is signedness (bit 0) and
// log2 of its width (the bits above).
[[noreturn]] void ubsan_out_of_bounds(const UbsanOutOfBounds* data, uintptr_t index) {
  const unsigned width = 1u << (data->index_type->info >> 1), unused = width < 64 ? 64 - width : 0;
  const long long value = (data->index_type->info & 1) ? (long long)(int64_t(uint64_t(index) << unused) >> unused)
                                                       : (long long)(uint64_t(index) << unused >> unused);
  char access[512];
  snprintf(access, sizeof access, "index %lld out of bounds for type %s (%s:%u)", value, data->array_type->name,
           data->location.file, data->location.line);
  cuemu::index_out_of_bounds(access);
}
}  // namespace
extern "C" void __ubsan_handle_out_of_bounds(const UbsanOutOfBounds* data, uintptr_t index) {
  ubsan_out_of_bounds(data, index);
}
extern "C" void __ubsan_handle_out_of_bounds_abort(const UbsanOutOfBounds* data, uintptr_t index) {
  ubsan_out_of_bounds(data, index);
}

// ------------------------------------------------------------------ host-side API
// Mirrors of the Rust structs in src/device/emulator.rs (repr(C)).
struct cuemu_launch_config {
  uint32_t grid[3];
  uint32_t block[3];
  uint32_t shared_bytes;
  uint32_t schedule;  // 0 in order, 1 reverse, 2 random, 3 run-ahead
  uint64_t seed;
  uint32_t workers;   // OS threads for this launch (>= 1); capped by the pool
  uint32_t stack_kib;
  uint32_t profile;   // 1: record memory accesses (MOE_EMU_PROFILE builds only)
  uint32_t racecheck; // 1: detect shared-memory races (MOE_EMU_PROFILE builds only)
};

// Static limits of the emulated device (those of sm_90).
constexpr uint32_t kMaxSharedBytes = 227 * 1024;

// Runs `kernel` to completion. Returns 0, or 1 with a message in `error` (launch
// configuration rejected, or a block failed: deadlock, __trap, misused collective).
// With cfg->profile, *profile_out receives the launch's memory profile (profiler.cpp's C
// API reads and frees it), also when the launch fails.
extern "C" int cuemu_launch(const cuemu::KernelEntry* kernel, const cuemu_launch_config* cfg, void** params,
                            void** profile_out, char* error, size_t error_len) {
  using namespace cuemu;
  auto reject = [&](const std::string& msg) {
    snprintf(error, error_len, "%s: %s", kernel->name, msg.c_str());
    return 1;
  };
  const uint64_t threads = uint64_t(cfg->block[0]) * cfg->block[1] * cfg->block[2];
  if (threads == 0 || threads > 1024 || cfg->block[2] > 64)
    return reject("block (" + std::to_string(cfg->block[0]) + "," + std::to_string(cfg->block[1]) + "," +
                  std::to_string(cfg->block[2]) + ") must have 1 to 1024 threads and z <= 64");
  if (cfg->grid[0] == 0 || cfg->grid[0] > 0x7fffffffu || cfg->grid[1] == 0 || cfg->grid[1] > 65535 ||
      cfg->grid[2] == 0 || cfg->grid[2] > 65535)
    return reject("grid must be 1..2^31-1 in x and 1..65535 in y and z");
  if (cfg->shared_bytes > kMaxSharedBytes)
    return reject("dynamic shared memory of " + std::to_string(cfg->shared_bytes) + " bytes exceeds " +
                  std::to_string(kMaxSharedBytes));
  if (cfg->schedule > 3) return reject("unknown schedule " + std::to_string(cfg->schedule));
#ifndef CUEMU_PROFILE
  if (cfg->profile) return reject("memory profiling needs the profiling build (MOE_EMU_PROFILE=1)");
  if (cfg->racecheck) return reject("the race detector needs the profiling build (MOE_EMU_PROFILE=1)");
#endif
#ifdef CUEMU_ASAN
  static const bool hooked = (__asan_set_error_report_callback(name_cuda_thread_in_report), true);
  (void)hooked;
#endif
  Launch L;
  L.kernel = kernel;
  L.params = params;
  L.grid = dim3(cfg->grid[0], cfg->grid[1], cfg->grid[2]);
  L.block = dim3(cfg->block[0], cfg->block[1], cfg->block[2]);
  L.shared_bytes = cfg->shared_bytes;
  L.schedule = Schedule(cfg->schedule);
  L.seed = cfg->seed;
  L.stack_bytes = size_t(std::max(16u, cfg->stack_kib)) << 10;
  L.block_count = uint64_t(cfg->grid[0]) * cfg->grid[1] * cfg->grid[2];
  L.profiling = cfg->profile != 0;
  static std::mutex serial;  // one launch at a time: the emulator is a single stream
  std::lock_guard<std::mutex> one_launch(serial);
#ifdef CUEMU_PROFILE
  if (L.profiling) *profile_out = profiler::launch_begin();
  racecheck::launch_begin(cfg->racecheck != 0);
#else
  (void)profile_out;
#endif
  pool().run(L, std::max(1u, cfg->workers) - 1);
#ifdef CUEMU_PROFILE
  if (L.profiling) profiler::launch_end();
#endif
  if (L.failed) return reject(L.error);
  return 0;
}

// Whether this build records memory accesses (MOE_EMU_PROFILE=1).
extern "C" int cuemu_profiling_build() {
#ifdef CUEMU_PROFILE
  return 1;
#else
  return 0;
#endif
}

// Whether this build is instrumented (Rust reports it, tests that need ASan check it).
extern "C" int cuemu_address_sanitizer() {
#ifdef CUEMU_ASAN
  return 1;
#else
  return 0;
#endif
}
