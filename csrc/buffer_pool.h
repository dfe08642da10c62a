// A small cache of large output blocks, so that a training loop encoding batch after batch writes
// into memory it already owns. Fresh memory from the kernel costs a page fault and a zeroed page
// per 4 KiB on first touch, which for a [4096, 200] batch took longer than the encoding itself.
//
// A block is handed to numpy arrays through a capsule: when the last array (or the torch tensor
// made from it with torch.from_numpy) dies, the capsule returns the block to the pool. The pool
// keeps at most kMaxIdle idle blocks and kMaxIdleBytes bytes, evicting the oldest first.
#pragma once

#include <pybind11/pybind11.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <deque>
#include <mutex>
#include <new>
#include <utility>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace spnn_fast {

class BufferPool {
 public:
  static constexpr std::size_t kAlign = 64;
  static constexpr std::size_t kMaxIdle = 4;
  static constexpr std::size_t kMaxIdleBytes = std::size_t(1) << 30;

  // The process-wide pool; never destroyed, so capsules released during interpreter shutdown
  // still find it.
  static BufferPool& instance() {
    static BufferPool* pool = new BufferPool();
    return *pool;
  }

  // A block of at least `bytes` bytes (64-byte aligned), wrapped in a capsule that gives it back.
  pybind11::capsule acquire(std::size_t bytes, void** data) {
    const std::size_t size = round_up(bytes < kAlign ? kAlign : bytes);
    void* p = take(size);
    if (p == nullptr) p = allocate(size);
    *data = p;
    // The capsule's destructor receives one pointer: a small record carries block and size.
    auto* rec = new Record{p, size};
    return pybind11::capsule(rec, [](void* r) {
      auto* record = static_cast<Record*>(r);
      instance().give_back(record->data, record->size);
      delete record;
    });
  }

  // Frees every idle block; returns the bytes released.
  std::size_t release_idle() {
    std::deque<std::pair<void*, std::size_t>> idle;
    {
      std::lock_guard<std::mutex> lock(mu_);
      idle.swap(idle_);
      idle_bytes_ = 0;
    }
    std::size_t total = 0;
    for (auto& b : idle) {
      std::free(b.first);
      total += b.second;
    }
    return total;
  }

  std::pair<std::size_t, std::size_t> idle_stats() {
    std::lock_guard<std::mutex> lock(mu_);
    return {idle_.size(), idle_bytes_};
  }

 private:
  struct Record {
    void* data;
    std::size_t size;
  };

  static std::size_t round_up(std::size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

  static void* allocate(std::size_t size) {
    void* p = std::aligned_alloc(kAlign, size);
    if (p == nullptr) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    // Fewer faults on the first touch where transparent huge pages are opt-in.
    if (size >= (std::size_t(4) << 20)) {
      const auto start = (reinterpret_cast<std::uintptr_t>(p) + 4095) & ~std::uintptr_t(4095);
      const auto stop = reinterpret_cast<std::uintptr_t>(p) + size;
      if (stop > start) madvise(reinterpret_cast<void*>(start), stop - start, MADV_HUGEPAGE);
    }
#endif
    return p;
  }

  void* take(std::size_t size) {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto it = idle_.begin(); it != idle_.end(); ++it) {
      if (it->second == size) {
        void* p = it->first;
        idle_bytes_ -= size;
        idle_.erase(it);
        return p;
      }
    }
    return nullptr;
  }

  void give_back(void* p, std::size_t size) {
    std::deque<std::pair<void*, std::size_t>> evicted;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (size > kMaxIdleBytes) {
        evicted.emplace_back(p, size);
      } else {
        idle_.emplace_back(p, size);
        idle_bytes_ += size;
        while (idle_.size() > kMaxIdle || idle_bytes_ > kMaxIdleBytes) {
          evicted.push_back(idle_.front());
          idle_bytes_ -= idle_.front().second;
          idle_.pop_front();
        }
      }
    }
    for (auto& b : evicted) std::free(b.first);
  }

  std::mutex mu_;
  std::deque<std::pair<void*, std::size_t>> idle_;
  std::size_t idle_bytes_ = 0;
};

}  // namespace spnn_fast
