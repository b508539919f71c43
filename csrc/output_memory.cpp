// The cache of large output blocks (output_memory.h says why and what).
#include "output_memory.h"

#include "common.h"

#include <ATen/EmptyTensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/CPUAllocator.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#if defined(__linux__)
#include <pthread.h>
#include <sys/mman.h>
#endif

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
// An idle block is poisoned, so a kernel (or a test) that touches an output after freeing it is
// still an ASan report, as it would be without the cache.
#define FASTGPT_POISON(p, n) ASAN_POISON_MEMORY_REGION(p, n)
#define FASTGPT_UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION(p, n)
#else
#define FASTGPT_POISON(p, n) ((void)(p), (void)(n))
#define FASTGPT_UNPOISON(p, n) ((void)(p), (void)(n))
#endif

namespace fastgpt {
namespace {

constexpr size_t kHuge = size_t(2) << 20;     // a transparent huge page
constexpr size_t kMinBytes = size_t(4) << 20;  // smaller requests go to ATen's allocator

bool huge_pages_enabled() {
  static const bool on = [] {
    const char* v = std::getenv("FASTGPT_HUGE_PAGES");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }();
  return on;
}

// FASTGPT_OUTPUT_CACHE_MB, read once; a value that is not a whole number >= 0 is an error at the
// first large allocation (a clear RuntimeError from the op that asked), not a silent default.
size_t cap_from_env() {
  const char* v = std::getenv("FASTGPT_OUTPUT_CACHE_MB");
  if (v == nullptr || *v == '\0') return size_t(1024) << 20;
  char* end = nullptr;
  errno = 0;
  const long long mb = std::strtoll(v, &end, 10);
  TORCH_CHECK(errno == 0 && end != v && *end == '\0' && mb >= 0 && mb < (1LL << 40),
              "FASTGPT_OUTPUT_CACHE_MB must be a whole number of MiB >= 0 (0 turns the output "
              "cache off), got '", v, "'");
  return static_cast<size_t>(mb) << 20;
}

struct Block {
  void* ptr;
  size_t bytes;  // a multiple of kHuge
};

class OutputCache final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    if (n < kMinBytes || cap() == 0) return c10::GetCPUAllocator()->allocate(n);
    const size_t bytes = (n + kHuge - 1) / kHuge * kHuge;
    Block* b = take_idle(bytes);
    if (b == nullptr) b = fresh(bytes);
    c10::profiledCPUMemoryReporter().New(b->ptr, b->bytes);
    return {b->ptr, b, &OutputCache::give_back, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, size_t count) const override {
    default_copy_data(dest, src, count);
  }

  // Frees every idle block (fastgpt.empty_cache()).
  void release() {
    std::vector<Block*> all;
    {
      std::lock_guard<std::mutex> lock(mu_);
      all.swap(idle_);
      idle_bytes_ = 0;
    }
    for (Block* b : all) destroy(b);
  }

  // Overwrites every idle block with `byte` (tests: a kernel that leaves part of a reused output
  // unwritten then shows that byte, not an earlier call's values).
  void fill_idle(int byte) {
    std::lock_guard<std::mutex> lock(mu_);
    for (Block* b : idle_) {
      FASTGPT_UNPOISON(b->ptr, b->bytes);
      std::memset(b->ptr, byte, b->bytes);
      FASTGPT_POISON(b->ptr, b->bytes);
    }
  }

  OutputCacheStats stats() {
    const size_t limit = cap();
    std::lock_guard<std::mutex> lock(mu_);
    return {idle_bytes_, idle_.size(), hits_, misses_, limit};
  }

  std::mutex& mutex() { return mu_; }

 private:
  size_t cap() {
    std::call_once(cap_once_, [this] { cap_ = cap_from_env(); });
    return cap_;
  }

  // The smallest idle block that fits within 1/8 extra (most recently freed on a tie: the
  // likeliest to be in cache and TLB), or nullptr.
  Block* take_idle(size_t bytes) {
    std::lock_guard<std::mutex> lock(mu_);
    auto best = idle_.end();
    for (auto it = idle_.end(); it != idle_.begin();) {
      --it;
      const size_t have = (*it)->bytes;
      if (have >= bytes && have <= bytes + bytes / 8 &&
          (best == idle_.end() || have < (*best)->bytes)) {
        best = it;
        if (have == bytes) break;
      }
    }
    if (best == idle_.end()) {
      ++misses_;
      return nullptr;
    }
    Block* b = *best;
    idle_.erase(best);
    idle_bytes_ -= b->bytes;
    ++hits_;
    FASTGPT_UNPOISON(b->ptr, b->bytes);
    return b;
  }

  Block* fresh(size_t bytes) {
    void* p = nullptr;
    if (posix_memalign(&p, kHuge, bytes) != 0) {
      release();  // idle blocks of other sizes may be what is missing
      TORCH_CHECK_WITH(OutOfMemoryError, posix_memalign(&p, kHuge, bytes) == 0,
                       "fastgpt: could not allocate ", bytes, " bytes for a kernel output");
    }
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    // A failure (THP compiled out, or "never") only means 4 KiB pages, as without the call.
    if (huge_pages_enabled()) (void)madvise(p, bytes, MADV_HUGEPAGE);
#endif
    return new Block{p, bytes};
  }

  static void destroy(Block* b) {
    FASTGPT_UNPOISON(b->ptr, b->bytes);
    std::free(b->ptr);
    delete b;
  }

  // The deleter of every cached output's DataPtr: keeps the block, evicting the oldest idle
  // ones past the cap.
  static void give_back(void* ctx) {
    auto* b = static_cast<Block*>(ctx);
    OutputCache& c = instance();
    c10::profiledCPUMemoryReporter().Delete(b->ptr);
    std::vector<Block*> evicted;
    {
      std::lock_guard<std::mutex> lock(c.mu_);
      if (b->bytes > c.cap_) {
        evicted.push_back(b);
      } else {
        FASTGPT_POISON(b->ptr, b->bytes);
        c.idle_.push_back(b);
        c.idle_bytes_ += b->bytes;
        size_t drop = 0;
        while (c.idle_bytes_ > c.cap_) {
          c.idle_bytes_ -= c.idle_[drop]->bytes;
          evicted.push_back(c.idle_[drop++]);
        }
        c.idle_.erase(c.idle_.begin(), c.idle_.begin() + static_cast<std::ptrdiff_t>(drop));
      }
    }
    for (Block* e : evicted) destroy(e);  // outside the lock: munmap can take a while
  }

 public:
  // One per ISA build, never destroyed: tensors may outlive static destruction at exit.
  static OutputCache& instance() {
    static OutputCache* c = [] {
      auto* made = new OutputCache();
#if defined(__linux__)
      // A fork() while another thread holds the lock would leave the child's copy locked.
      pthread_atfork([] { instance().mutex().lock(); }, [] { instance().mutex().unlock(); },
                     [] { instance().mutex().unlock(); });
#endif
      return made;
    }();
    return *c;
  }

 private:
  std::mutex mu_;
  std::vector<Block*> idle_;  // oldest freed first
  size_t idle_bytes_ = 0;
  uint64_t hits_ = 0, misses_ = 0;
  std::once_flag cap_once_;
  size_t cap_ = 0;
};

}  // namespace

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  if (!opts.device().is_cpu()) return at::empty(sizes, opts);
  return at::detail::empty_generic(sizes, &OutputCache::instance(),
                                   c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(opts.dtype()), std::nullopt);
}

namespace {

// fastgpt::empty_output_like(Tensor like): an output from the cache, for Python code that must
// allocate as the kernels do (the benchmarks' memory floor).
at::Tensor empty_output_like_op(const at::Tensor& like) { return empty_output_like(like); }

void register_output_memory(torch::Library& m) {
  m.impl("empty_output_like", TORCH_FN(empty_output_like_op));
}

const OpRegistrar registrar(&register_output_memory);

}  // namespace
}  // namespace fastgpt

extern "C" {

__attribute__((visibility("default"))) void fastgpt_output_cache_release() {
  fastgpt::OutputCache::instance().release();
}

__attribute__((visibility("default"))) void fastgpt_output_cache_fill_idle(int byte) {
  fastgpt::OutputCache::instance().fill_idle(byte);
}

// Fills out[0..4] with idle bytes, idle blocks, hits, misses and the cap; returns 0, or -1 (out
// untouched) when FASTGPT_OUTPUT_CACHE_MB is invalid.
__attribute__((visibility("default"))) int fastgpt_output_cache_stats(uint64_t* out) {
  try {
    const fastgpt::OutputCacheStats s = fastgpt::OutputCache::instance().stats();
    out[0] = s.idle_bytes;
    out[1] = s.idle_blocks;
    out[2] = s.hits;
    out[3] = s.misses;
    out[4] = s.cap_bytes;
    return 0;
  } catch (const std::exception&) {
    return -1;
  }
}

}  // extern "C"
