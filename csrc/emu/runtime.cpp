// tokops CUDA emulator runtime: fibers, block scheduler, barriers, warp collectives (see cuda_emu.h).
#include "cuda_emu.h"

#include <c10/util/Exception.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define TOKOPS_EMU_ASAN 1
#endif

// Static __shared__ variables of every kernel in this library (section bounds from the linker).
extern "C" unsigned char __start_tokops_emu_shared[] __attribute__((weak));
extern "C" unsigned char __stop_tokops_emu_shared[] __attribute__((weak));

namespace tokops_emu {
namespace detail {

namespace {
constexpr size_t kStackBytes = 512 * 1024;
constexpr unsigned char kPoison = 0xFF;  // NaN as float/half, -1 as int

enum class St { kReady, kBarrier, kWarp, kDone };
}  // namespace

struct ThreadState {
  ucontext_t uc;
  unsigned char* stack = nullptr;  // usable stack (a guard page below it)
  uint3 tid;
  int linear = 0, lane = 0, warp = 0;
  St st = St::kReady;
  Site site;                // where it waits
  Arrival arr{};            // its pending warp collective
  bool arrived = false;
  // cp.async: committed groups and the open group (copies are done at wait time)
  struct Copy {
    void* dst;
    const void* src;
    int bytes, src_bytes;
  };
  std::vector<std::vector<Copy>> groups;
  std::vector<Copy> open;
#ifdef TOKOPS_EMU_ASAN
  void* fake_stack = nullptr;
#endif
};

ThreadState* g_cur = nullptr;
uint3 g_block_idx;
dim3 g_block_dim, g_grid_dim;
unsigned char* g_dyn_smem = nullptr;
size_t g_dyn_smem_bytes = 0;
KernelRun g_run;  // the kernel of the running launch

namespace {
struct Block {
  std::vector<ThreadState*> th;
  std::vector<ThreadState*> ready;  // run queue (popped from the back)
  int n = 0, done = 0, at_barrier = 0;
  Site barrier_site;
  bool barrier_site_set = false;
  ucontext_t sched;
  bool failed = false;
  std::string error;
  const char* kernel = "";
#ifdef TOKOPS_EMU_ASAN
  const void* sched_stack_bottom = nullptr;
  size_t sched_stack_size = 0;
#endif
};

Block* g_blk = nullptr;
std::mt19937_64 g_rng(0);
uint64_t g_seed = 0;
bool g_seed_set = false;
int g_perm[3][256];
std::mutex g_launch_mutex;
std::vector<unsigned char*> g_stacks;  // pool, reused across blocks and launches

void build_perm() {
  std::mt19937_64 r(g_seed * 0x9E3779B97F4A7C15ull + 12345);
  for (int k = 0; k < 3; ++k) {
    for (int i = 0; i < 256; ++i) g_perm[k][i] = i;
    std::shuffle(g_perm[k], g_perm[k] + 256, r);
  }
}

void init_seed() {
  if (g_seed_set) return;
  const char* s = std::getenv("TOKOPS_EMU_SEED");
  g_seed = s ? std::strtoull(s, nullptr, 10) : 0;
  g_seed_set = true;
  g_rng.seed(g_seed);
  build_perm();
}

unsigned char* stack_for(size_t i) {
  while (g_stacks.size() <= i) {
    const size_t page = 4096;
    void* m = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                   -1, 0);
    TORCH_CHECK(m != MAP_FAILED, "tokops emulator: cannot map a fiber stack");
    mprotect(m, page, PROT_NONE);  // guard page: a stack overflow faults instead of corrupting
    g_stacks.push_back(static_cast<unsigned char*>(m) + page);
  }
  return g_stacks[i];
}

std::string describe(const ThreadState* t) {
  std::ostringstream o;
  o << "thread (" << t->tid.x << "," << t->tid.y << "," << t->tid.z << ") [warp " << t->warp << " lane " << t->lane
    << "]";
  return o.str();
}

// Switch from the scheduler into fiber t, and back.
void resume(Block& b, ThreadState* t) {
  g_cur = t;
#ifdef TOKOPS_EMU_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, t->stack, kStackBytes);
  swapcontext(&b.sched, &t->uc);
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#else
  swapcontext(&b.sched, &t->uc);
#endif
  g_cur = nullptr;
}

// From the running fiber back to the scheduler. `dying`: the fiber never runs again.
void yield_to_scheduler(bool dying) {
  ThreadState* t = g_cur;
  Block& b = *g_blk;
#ifdef TOKOPS_EMU_ASAN
  __sanitizer_start_switch_fiber(dying ? nullptr : &t->fake_stack, b.sched_stack_bottom, b.sched_stack_size);
  swapcontext(&t->uc, &b.sched);
  __sanitizer_finish_switch_fiber(t->fake_stack, nullptr, nullptr);
#else
  (void)dying;
  swapcontext(&t->uc, &b.sched);
#endif
}

template <typename V>
void shuffle_push(Block& b, V& v) {
  std::shuffle(v.begin(), v.end(), g_rng);
  // ready is popped from the back: push in reverse so that v[0] runs first
  for (auto it = v.rbegin(); it != v.rend(); ++it) b.ready.push_back(*it);
}

void check_exit_against_waiters(Block& b, ThreadState* t);

void fiber_main() {
  ThreadState* t = g_cur;
  Block& b = *g_blk;
#ifdef TOKOPS_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &b.sched_stack_bottom, &b.sched_stack_size);
#endif
  g_run.run(g_run.ctx);
  if (!t->open.empty() || !t->groups.empty()) {
    fail("thread exited with cp.async copies that were never waited for (cp_async_wait)");
  }
  t->st = St::kDone;
  ++b.done;
  check_exit_against_waiters(b, t);
  yield_to_scheduler(true);
  std::abort();  // unreachable: a finished fiber is never resumed
}

void try_release_barrier(Block& b) {
  const int live = b.n - b.done;
  if (b.at_barrier == 0 || b.at_barrier < live) return;
  std::vector<ThreadState*> rel;
  for (ThreadState* t : b.th)
    if (t->st == St::kBarrier) {
      t->st = St::kReady;
      rel.push_back(t);
    }
  b.at_barrier = 0;
  b.barrier_site_set = false;
  shuffle_push(b, rel);
}

// A thread exited: a warp collective that names it can never complete.
void check_exit_against_waiters(Block& b, ThreadState* t) {
  const int base = t->warp * 32;
  for (int l = 0; l < 32 && base + l < b.n; ++l) {
    ThreadState* o = b.th[base + l];
    if (o->st == St::kWarp && o->arrived && (o->arr.mask >> t->lane & 1u)) {
      std::ostringstream m;
      m << describe(o) << " waits at " << op_name(o->arr.op) << " (" << where(o->arr.site) << ") with mask 0x" << std::hex
        << o->arr.mask << std::dec << ", but lane " << t->lane << " named in the mask exited without arriving";
      fail(m.str());
    }
  }
  try_release_barrier(b);
}

}  // namespace

const uint3& thread_idx() {
  if (g_cur == nullptr) fail("threadIdx read outside a kernel");
  return g_cur->tid;
}
int lane_id() { return g_cur->lane; }

const char* op_name(int op) {
  static const char* names[] = {"__shfl_sync", "__shfl_up_sync", "__shfl_down_sync", "__shfl_xor_sync",
                                "__ballot_sync", "__any_sync", "__all_sync", "__syncwarp",
                                "wmma::load_matrix_sync", "wmma::store_matrix_sync", "wmma::mma_sync",
                                "mma.sync", "ldmatrix"};
  return op >= 0 && op < kNumOps ? names[op] : "?";
}

std::string where(const Site& s) {
  std::string f = s.file_name();
  const auto p = f.find("csrc/");
  if (p != std::string::npos) f = f.substr(p);
  return f + ":" + std::to_string(s.line());
}

void fail(const std::string& msg) {
  Block* b = g_blk;
  if (b == nullptr || g_cur == nullptr) TORCH_CHECK(false, "tokops emulator: ", msg);
  if (!b->failed) {
    b->failed = true;
    std::ostringstream o;
    o << "tokops emulator: kernel " << b->kernel << ", block (" << g_block_idx.x << "," << g_block_idx.y << ","
      << g_block_idx.z << "), " << describe(g_cur) << ": " << msg;
    b->error = o.str();
  }
  yield_to_scheduler(true);
  std::abort();
}

void syncthreads(const Site& s) {
  Block& b = *g_blk;
  ThreadState* t = g_cur;
  if (b.barrier_site_set && (b.barrier_site.line() != s.line() ||
                             std::strcmp(b.barrier_site.file_name(), s.file_name()) != 0)) {
    fail("__syncthreads at " + where(s) + " while other threads of the block wait at the __syncthreads at " +
         where(b.barrier_site) + " (divergent barrier)");
  }
  b.barrier_site = s;
  b.barrier_site_set = true;
  t->st = St::kBarrier;
  t->site = s;
  ++b.at_barrier;
  try_release_barrier(b);  // the last one to arrive releases everyone (itself included)
  yield_to_scheduler(false);
}

uint64_t warp_collective(Arrival a, Completion done) {
  Block& b = *g_blk;
  ThreadState* t = g_cur;
  const int base = t->warp * 32;
  const int lanes_here = std::min(32, b.n - base);
  auto hex = [](unsigned m) {
    char buf[16];
    std::snprintf(buf, sizeof buf, "0x%08x", m);
    return std::string(buf);
  };
  if (!(a.mask >> t->lane & 1u))
    fail(std::string(op_name(a.op)) + " at " + where(a.site) + " with mask " + hex(a.mask) +
         " that does not name the calling lane " + std::to_string(t->lane));
  for (int l = 0; l < 32; ++l) {
    if (!(a.mask >> l & 1u)) continue;
    if (l >= lanes_here)
      fail(std::string(op_name(a.op)) + " at " + where(a.site) + ": mask " + hex(a.mask) + " names lane " +
           std::to_string(l) + " which does not exist (block of " + std::to_string(b.n) + " threads)");
    ThreadState* o = b.th[base + l];
    if (o->st == St::kDone)
      fail(std::string(op_name(a.op)) + " at " + where(a.site) + ": mask " + hex(a.mask) + " names lane " +
           std::to_string(l) + " which has exited");
  }
  t->arr = a;
  t->arrived = true;
  t->st = St::kWarp;
  t->site = a.site;
  // complete when every lane of the mask waits at a collective
  bool all = true;
  for (int l = 0; l < 32 && all; ++l)
    if (a.mask >> l & 1u) all = b.th[base + l]->arrived;
  if (all) {
    Arrival lanes[32];
    std::vector<ThreadState*> rel;
    for (int l = 0; l < 32; ++l) {
      if (!(a.mask >> l & 1u)) continue;
      ThreadState* o = b.th[base + l];
      if (o->arr.op != a.op || o->arr.mask != a.mask)
        fail("warp collective mismatch: lane " + std::to_string(t->lane) + " at " + std::string(op_name(a.op)) + " (" +
             where(a.site) + ") mask " + hex(a.mask) + ", lane " + std::to_string(l) + " at " +
             op_name(o->arr.op) + " (" + where(o->arr.site) + ") mask " + hex(o->arr.mask));
      lanes[l] = o->arr;
    }
    done(lanes, a.mask);
    for (int l = 0; l < 32; ++l) {
      if (!(a.mask >> l & 1u)) continue;
      ThreadState* o = b.th[base + l];
      o->arr.result = lanes[l].result;
      o->arrived = false;
      o->st = St::kReady;
      rel.push_back(o);
    }
    shuffle_push(b, rel);  // everyone, this lane included, resumes in a shuffled order
  }
  yield_to_scheduler(false);
  return t->arr.result;
}

void shfl_complete(Arrival* lanes, unsigned mask) {
  for (int l = 0; l < 32; ++l) {
    if (!(mask >> l & 1u)) continue;
    const Arrival& a = lanes[l];
    const int w = a.width;
    if (w <= 0 || w > 32 || (w & (w - 1)) != 0)
      fail(std::string(op_name(a.op)) + " at " + where(a.site) + ": width " + std::to_string(w) +
           " is not a power of two in [1, 32]");
    const int base = l & ~(w - 1);
    int src = l;
    switch (a.op) {
      case kShflIdx: src = base + (a.arg & (w - 1)); break;
      case kShflUp: src = l - a.arg >= base ? l - a.arg : l; break;
      case kShflDown: src = l + a.arg < base + w ? l + a.arg : l; break;
      default: src = (l ^ a.arg) < base + w ? (l ^ a.arg) : l; break;  // xor
    }
    if (!(mask >> src & 1u))
      fail(std::string(op_name(a.op)) + " at " + where(a.site) + ": lane " + std::to_string(l) +
           " reads lane " + std::to_string(src) + " which is not in the mask (undefined value on a GPU)");
    lanes[l].result = lanes[src].value;
  }
}

void vote_complete(Arrival* lanes, unsigned mask) {
  unsigned ballot = 0;
  for (int l = 0; l < 32; ++l)
    if ((mask >> l & 1u) && lanes[l].value) ballot |= 1u << l;
  for (int l = 0; l < 32; ++l) {
    if (!(mask >> l & 1u)) continue;
    const int op = lanes[l].op;
    lanes[l].result = op == kBallot ? ballot : op == kAny ? (ballot != 0) : (ballot == mask);
  }
}

int wmma_pos(int kind, int lane, int i) { return g_perm[kind][lane * 8 + i]; }

void cp_async_push(void* dst, const void* src, int bytes, int src_bytes) {
  g_cur->open.push_back({dst, src, bytes, src_bytes});
}
void cp_async_commit() {
  g_cur->groups.push_back(std::move(g_cur->open));
  g_cur->open.clear();
}
void cp_async_wait(int keep) {
  auto& g = g_cur->groups;
  while (int(g.size()) > keep) {
    for (const auto& c : g.front()) {
      std::memcpy(c.dst, c.src, c.src_bytes);
      if (c.bytes > c.src_bytes) std::memset(static_cast<char*>(c.dst) + c.src_bytes, 0, c.bytes - c.src_bytes);
    }
    g.erase(g.begin());
  }
}

namespace {
// Fill memory with the poison pattern without ASan checks: the static shared section holds
// ASan redzones between the variables, which must stay poisoned in ASan's shadow.
__attribute__((no_sanitize_address)) void poison_bytes(unsigned char* p, size_t n) {
  for (size_t i = 0; i < n; ++i) reinterpret_cast<volatile unsigned char*>(p)[i] = kPoison;
}

std::string deadlock_report(Block& b) {
  std::ostringstream o;
  o << "deadlock: no thread can run";
  int shown = 0;
  for (ThreadState* t : b.th) {
    if (t->st == St::kDone) continue;
    if (shown++ >= 8) {
      o << "; ...";
      break;
    }
    o << "; " << describe(t);
    if (t->st == St::kBarrier) {
      o << " waits at __syncthreads (" << where(t->site) << ")";
    } else if (t->st == St::kWarp) {
      o << " waits at " << op_name(t->arr.op) << " (" << where(t->arr.site) << ") mask 0x" << std::hex << t->arr.mask
        << std::dec;
      for (int l = 0; l < 32; ++l) {
        ThreadState* x = b.th[t->warp * 32 + l < b.n ? t->warp * 32 + l : 0];
        if ((t->arr.mask >> l & 1u) && !x->arrived) {
          o << ", lane " << l << " never arrived";
          if (x->st == St::kBarrier) o << " (it waits at __syncthreads " << where(x->site) << ")";
          break;
        }
      }
    }
  }
  return o.str();
}
}  // namespace

void launch(dim3 grid, dim3 block, size_t smem, const char* name, KernelRun k) {
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  init_seed();
  const int64_t nthreads = int64_t(block.x) * block.y * block.z;
  const int64_t nblocks = int64_t(grid.x) * grid.y * grid.z;
  TORCH_CHECK(nthreads >= 1 && nthreads <= 1024 && block.z <= 64, "tokops emulator: kernel ", name,
              ": invalid block (", block.x, ",", block.y, ",", block.z, ")");
  TORCH_CHECK(grid.x >= 1 && grid.y >= 1 && grid.z >= 1 && grid.y < 65536 && grid.z < 65536,
              "tokops emulator: kernel ", name, ": invalid grid (", grid.x, ",", grid.y, ",", grid.z, ")");
  TORCH_CHECK(smem <= 227 * 1024, "tokops emulator: kernel ", name, ": ", smem,
              " bytes of dynamic shared memory exceed the 227 KiB of an sm_90 block");
  if (nblocks == 0) return;
  std::vector<ThreadState> ts(nthreads);
  std::vector<int64_t> order(nblocks);
  for (int64_t i = 0; i < nblocks; ++i) order[i] = i;
  std::shuffle(order.begin(), order.end(), g_rng);
  g_run = k;
  g_grid_dim = grid;
  g_block_dim = block;
  for (int64_t bi : order) {
    Block b;
    b.kernel = name;
    b.n = int(nthreads);
    g_blk = &b;
    g_block_idx = make_uint3(unsigned(bi % grid.x), unsigned(bi / grid.x % grid.y), unsigned(bi / grid.x / grid.y));
    // shared memory of this block: poisoned
    if (__start_tokops_emu_shared != nullptr && __stop_tokops_emu_shared > __start_tokops_emu_shared)
      poison_bytes(__start_tokops_emu_shared, size_t(__stop_tokops_emu_shared - __start_tokops_emu_shared));
    unsigned char* dyn = static_cast<unsigned char*>(std::aligned_alloc(128, ((smem + 127) / 128) * 128 + 128));
    std::memset(dyn, kPoison, smem);
#ifdef TOKOPS_EMU_ASAN
    // bytes past the requested size are out of bounds
    ASAN_POISON_MEMORY_REGION(dyn + smem, ((smem + 127) / 128) * 128 + 128 - smem);
#endif
    g_dyn_smem = dyn;
    g_dyn_smem_bytes = smem;
    b.th.resize(nthreads);
    for (int64_t i = 0; i < nthreads; ++i) {
      ThreadState& t = ts[i];
      t = ThreadState{};
      t.linear = int(i);
      t.lane = int(i % 32);
      t.warp = int(i / 32);
      t.tid = make_uint3(unsigned(i % block.x), unsigned(i / block.x % block.y), unsigned(i / block.x / block.y));
      t.stack = stack_for(size_t(i));
      getcontext(&t.uc);
      t.uc.uc_stack.ss_sp = t.stack;
      t.uc.uc_stack.ss_size = kStackBytes;
      t.uc.uc_link = nullptr;
      makecontext(&t.uc, fiber_main, 0);
      b.th[i] = &t;
    }
    std::vector<ThreadState*> all(b.th);
    shuffle_push(b, all);
    while (!b.failed) {
      if (b.ready.empty()) {
        if (b.done == b.n) break;
        b.failed = true;
        std::ostringstream o;
        o << "tokops emulator: kernel " << name << ", block (" << g_block_idx.x << "," << g_block_idx.y << ","
          << g_block_idx.z << "): " << deadlock_report(b);
        b.error = o.str();
        break;
      }
      ThreadState* t = b.ready.back();
      b.ready.pop_back();
      resume(b, t);
    }
#ifdef TOKOPS_EMU_ASAN
    ASAN_UNPOISON_MEMORY_REGION(dyn, ((smem + 127) / 128) * 128 + 128);
    // fibers abandoned mid-way (failure) leave poisoned stack frames behind: clear them
    if (b.failed)
      for (int64_t i = 0; i < nthreads; ++i) ASAN_UNPOISON_MEMORY_REGION(ts[i].stack, kStackBytes);
#endif
    std::free(dyn);
    g_dyn_smem = nullptr;
    g_blk = nullptr;
    TORCH_CHECK(!b.failed, b.error);
  }
}

}  // namespace detail

void set_seed(uint64_t s) {
  std::lock_guard<std::mutex> lock(detail::g_launch_mutex);
  detail::g_seed = s;
  detail::g_seed_set = true;
  detail::g_rng.seed(s);
  detail::build_perm();
}
uint64_t seed() { return detail::g_seed; }

}  // namespace tokops_emu
