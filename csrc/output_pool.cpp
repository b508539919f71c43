// See output_pool.h.
#include "output_pool.h"

#include <ATen/EmptyTensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>

namespace fastgpt {
namespace {

constexpr size_t kMinPooledBytes = size_t(1) << 22;  // 4 MiB: smaller blocks fault cheaply
constexpr size_t kMaxPooledBytes = size_t(1) << 30;  // 1 GiB of free blocks at most
constexpr size_t kAlignment = 64;

struct Block {
  void* ptr;
  size_t size;
};

class OutputPool final : public at::Allocator {
 public:
  at::DataPtr allocate(size_t n) override {
    if (n < kMinPooledBytes) return c10::GetCPUAllocator()->allocate(n);
    void* ptr = take(n);
    if (ptr == nullptr) {
      ptr = std::aligned_alloc(kAlignment, round_up(n));
      TORCH_CHECK(ptr != nullptr, "fastgpt: out of memory allocating ", n, " bytes");
    }
    return {ptr, new Block{ptr, n}, &release, at::Device(at::kCPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    std::memcpy(dest, src, count);
  }

  static OutputPool& instance() {
    static OutputPool* pool = new OutputPool();  // never destroyed: deleters may run at exit
    return *pool;
  }

 private:
  static size_t round_up(size_t n) { return (n + kAlignment - 1) / kAlignment * kAlignment; }

  void* take(size_t n) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = free_.begin(); it != free_.end(); ++it) {
      if (it->size == n) {
        void* ptr = it->ptr;
        free_bytes_ -= it->size;
        free_.erase(it);
        return ptr;
      }
    }
    return nullptr;
  }

  void give_back(Block block) {
    std::lock_guard<std::mutex> lock(mutex_);
    free_.push_back(block);
    free_bytes_ += block.size;
    while (free_bytes_ > kMaxPooledBytes) {  // drop the oldest blocks first
      free_bytes_ -= free_.front().size;
      std::free(free_.front().ptr);
      free_.pop_front();
    }
  }

  static void release(void* ctx) {
    auto* block = static_cast<Block*>(ctx);
    instance().give_back(*block);
    delete block;
  }

  std::mutex mutex_;
  std::deque<Block> free_;
  size_t free_bytes_ = 0;
};

bool pool_enabled() {
  static const bool enabled = [] {
    const char* v = std::getenv("FASTGPT_OUTPUT_POOL");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }();
  return enabled;
}

}  // namespace

at::Tensor empty_pooled_like(const at::Tensor& like) {
  if (!pool_enabled() || !like.device().is_cpu()) {
    return at::empty_like(like, at::MemoryFormat::Contiguous);
  }
  return at::detail::empty_generic(like.sizes(), &OutputPool::instance(),
                                   c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   like.scalar_type(), at::MemoryFormat::Contiguous);
}

}  // namespace fastgpt
