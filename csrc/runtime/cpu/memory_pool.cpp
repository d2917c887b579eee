// A pool of large CPU buffers reused across inference calls.
//
// glibc's malloc serves blocks above its mmap threshold (at most 32 MiB) with fresh mmap()s and
// gives them back on free(), so every FPN-sized activation (a 256-channel 200x304 float32 map is
// 62 MB) is page-faulted in again on every call: about 13 ms per such map on the 2-core build
// machine, ~15% of an 800x1216 ResNet50-FPN forward (benchmarks/RESULTS.md). ONNX Runtime (its
// arena) and OpenVINO (static buffers) do not pay it. This allocator keeps such blocks instead.
//
// It wraps the CPU allocator that was installed before it and only pools inside a scope that the
// *current thread* opened (cpu_pool_enter/exit, the optimized backbone's forward); everywhere else,
// and for blocks under 1 MiB, it hands the request to that allocator unchanged. Pooled blocks come
// back to the pool whenever and on whichever thread their tensor dies, up to a byte limit; above
// it they are freed. cpu_pool_release() frees the cached ones (like torch.cuda.empty_cache).
// The limit is process-wide and can change at any time (cpu_pool_set_limit): a lower one frees
// cached blocks at once, 0 turns pooling off (no scope pools, every block that comes back is freed).
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <pthread.h>

#include <atomic>
#include <cstdint>
#include <iterator>
#include <map>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace fpn_fast {
namespace {

// Smaller blocks come from glibc's heap and are reused there without page faults.
constexpr size_t kMinPooledBytes = size_t(1) << 20;
// Requests are rounded up to this granularity so that maps of nearly equal size share blocks.
constexpr size_t kGranule = size_t(1) << 16;

thread_local int64_t pool_depth = 0;

// The bytes of free blocks the pool keeps; 1 GiB until Python sets it (FPN_FAST_CPU_POOL_MB or
// fpn_fast.ops.set_cpu_cache_limit). Changed under the pool's mutex once the pool exists.
std::atomic<size_t> pool_limit{size_t(1) << 30};

class PooledCPUAllocator final : public c10::Allocator {
 public:
  explicit PooledCPUAllocator(c10::Allocator* fallback) : fallback_(fallback) {}

  c10::DataPtr allocate(size_t bytes) override {
    if (pool_depth == 0 || bytes < kMinPooledBytes) return fallback_->allocate(bytes);
    void* data = take(bytes);
    // context == data keeps it a "simple" data pointer (copy-on-write and friends accept it).
    return {data, data, &PooledCPUAllocator::release, c10::Device(c10::DeviceType::CPU)};
  }

  // ideep's scratchpads use raw_allocate / raw_deallocate, so raw blocks must come back here
  // too: release() hands the fallback's own blocks back to the fallback.
  c10::DeleterFnPtr raw_deleter() const override { return &PooledCPUAllocator::release; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  // Frees cached blocks, the largest first, until at most `keep` bytes stay cached; with
  // `new_limit` set, makes it the limit first (under the same lock, so no block is cached above
  // it afterwards). Returns the bytes freed.
  int64_t trim(size_t keep, bool new_limit) {
    std::vector<void*> blocks;
    int64_t bytes = 0;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (new_limit) pool_limit.store(keep);
      while (cached_bytes_ > keep) {
        auto largest = std::prev(cached_.end());
        blocks.push_back(largest->second);
        bytes += static_cast<int64_t>(largest->first);
        cached_bytes_ -= largest->first;
        live_.erase(largest->second);
        cached_.erase(largest);
      }
    }
    for (void* block : blocks) c10::free_cpu(block);
    return bytes;
  }

  std::vector<int64_t> stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {static_cast<int64_t>(cached_bytes_), static_cast<int64_t>(cached_.size()),
            static_cast<int64_t>(live_.size() - cached_.size()), static_cast<int64_t>(pool_limit.load()), hits_,
            misses_};
  }

  static PooledCPUAllocator* instance;

  // fork() while another thread holds the mutex would leave the child's copy locked forever:
  // hold it across the fork and release it on both sides (as glibc does for malloc's locks).
  static void before_fork() { instance->mutex_.lock(); }
  static void after_fork() { instance->mutex_.unlock(); }

 private:
  void* take(size_t bytes) {
    const size_t wanted = (bytes + kGranule - 1) / kGranule * kGranule;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      // The smallest cached block that fits, unless it would waste more than the request.
      auto it = cached_.lower_bound(wanted);
      if (it != cached_.end() && it->first <= 2 * wanted) {
        void* data = it->second;
        cached_bytes_ -= it->first;
        cached_.erase(it);
        ++hits_;
        return data;
      }
      ++misses_;
    }
    void* data = c10::alloc_cpu(wanted);  // throws c10::OutOfMemoryError when it cannot
    std::lock_guard<std::mutex> lock(mutex_);
    live_[data] = wanted;
    return data;
  }

  static void release(void* data) {
    PooledCPUAllocator* self = instance;
    bool fallback_block = false;
    {
      std::lock_guard<std::mutex> lock(self->mutex_);
      auto found = self->live_.find(data);
      if (found == self->live_.end()) {
        fallback_block = true;
      } else {
        const size_t size = found->second;
        if (self->cached_bytes_ + size <= pool_limit.load()) {
          self->cached_.emplace(size, data);
          self->cached_bytes_ += size;
          return;
        }
        self->live_.erase(found);
      }
    }
    if (!fallback_block) {
      c10::free_cpu(data);
    } else if (c10::DeleterFnPtr deleter = self->fallback_->raw_deleter()) {
      deleter(data);  // a raw allocation that went to the fallback allocator
    } else {
      c10::free_cpu(data);
    }
  }

  c10::Allocator* fallback_;
  std::mutex mutex_;
  std::multimap<size_t, void*> cached_;       // size -> free block
  std::unordered_map<void*, size_t> live_;     // every block we own (cached or in use) -> size
  size_t cached_bytes_ = 0;
  int64_t hits_ = 0;
  int64_t misses_ = 0;
};

PooledCPUAllocator* PooledCPUAllocator::instance = nullptr;

// Installs the pool as torch's CPU allocator once (it stays: tensors it made may outlive any
// scope). Returns whether it is the allocator in force: another library may have installed one
// with a higher priority, and then nothing is pooled.
bool installed() {
  static std::once_flag once;
  std::call_once(once, [] {
    PooledCPUAllocator::instance = new PooledCPUAllocator(c10::GetCPUAllocator());  // never freed
    pthread_atfork(&PooledCPUAllocator::before_fork, &PooledCPUAllocator::after_fork,
                   &PooledCPUAllocator::after_fork);
    c10::SetCPUAllocator(PooledCPUAllocator::instance, /*priority=*/0);
  });
  return c10::GetCPUAllocator() == PooledCPUAllocator::instance;
}

// Opens a pooled scope on this thread; false (no scope opened) when the limit is 0 or another
// allocator is in force.
bool cpu_pool_enter() {
  if (pool_limit.load() == 0 || !installed()) return false;
  ++pool_depth;
  return true;
}

void cpu_pool_exit() {
  TORCH_CHECK(pool_depth > 0, "fpn_fast::_cpu_pool_exit without a matching _cpu_pool_enter on this thread");
  --pool_depth;
}

// Sets the limit and frees cached blocks above it; returns the bytes freed.
int64_t cpu_pool_set_limit(int64_t limit_bytes) {
  TORCH_CHECK_VALUE(limit_bytes >= 0, "fpn_fast::_cpu_pool_set_limit: limit_bytes must be >= 0, got ", limit_bytes);
  if (PooledCPUAllocator::instance == nullptr) {
    // Not installed yet: nothing is cached, the limit is all there is to set.
    pool_limit.store(static_cast<size_t>(limit_bytes));
    return 0;
  }
  return PooledCPUAllocator::instance->trim(static_cast<size_t>(limit_bytes), /*new_limit=*/true);
}

int64_t cpu_pool_release() {
  return PooledCPUAllocator::instance == nullptr ? 0 : PooledCPUAllocator::instance->trim(0, /*new_limit=*/false);
}

std::vector<int64_t> cpu_pool_stats() {
  if (PooledCPUAllocator::instance == nullptr) return {0, 0, 0, static_cast<int64_t>(pool_limit.load()), 0, 0};
  return PooledCPUAllocator::instance->stats();
}

}  // namespace
}  // namespace fpn_fast

// The pool's controls take no tensor, so they are registered for every dispatch key (as when
// they were declared from these functions); fpn_fast/ops/_memory.py calls them.
TORCH_LIBRARY_IMPL(fpn_fast, CompositeImplicitAutograd, m) {
  m.impl("_cpu_pool_enter", &fpn_fast::cpu_pool_enter);
  m.impl("_cpu_pool_exit", &fpn_fast::cpu_pool_exit);
  m.impl("_cpu_pool_set_limit", &fpn_fast::cpu_pool_set_limit);
  m.impl("_cpu_pool_release", &fpn_fast::cpu_pool_release);
  m.impl("_cpu_pool_stats", &fpn_fast::cpu_pool_stats);
}
