// The helper pool behind parallel_for (see parallel.h for why it is not OpenMP).
//
// One process-wide pool of sleeping threads, grown on demand up to the largest thread count asked
// for (capped). A call publishes a job (an atomic item counter) and wakes as many helpers as it
// wants; the caller starts on the items at once. A helper that wakes while the job is still open
// registers, takes items until none are left, and deregisters; the caller, once the counter is
// exhausted, closes the job (late helpers go back to sleep without touching it) and waits only
// for the registered ones, each of which has at most one item in flight.
#include "parallel.h"

#include <pthread.h>

#include <atomic>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

namespace edmfast {
namespace {

constexpr int kMaxHelpers = 255;

struct Job {
  const std::function<void(int64_t)>* fn;
  int64_t items;
  std::atomic<int64_t> next{0};
  int active = 0;  // registered helpers still working (guarded by the pool mutex)
};

void drain(Job& job) {
  for (int64_t i = job.next.fetch_add(1, std::memory_order_relaxed); i < job.items;
       i = job.next.fetch_add(1, std::memory_order_relaxed))
    (*job.fn)(i);
}

class Pool {
 public:
  // Returns false (nothing run) when another caller is using the pool right now.
  bool run(int64_t items, int helpers, const std::function<void(int64_t)>& fn) {
    std::unique_lock<std::mutex> busy(run_mu_, std::try_to_lock);
    if (!busy.owns_lock()) return false;
    Job job;
    job.fn = &fn;
    job.items = items;
    {
      std::lock_guard<std::mutex> lock(mu_);
      while (static_cast<int>(threads_.size()) < helpers) threads_.emplace_back([this] { loop(); });
      job_ = &job;
      wanted_ = helpers;
      ++generation_;
    }
    wake_.notify_all();
    drain(job);
    std::unique_lock<std::mutex> lock(mu_);
    job_ = nullptr;  // closed: a helper waking from now on goes back to sleep
    wanted_ = 0;
    done_.wait(lock, [&] { return job.active == 0; });  // helpers' writes happen-before this
    return true;
  }

 private:
  void loop() {
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      wake_.wait(lock, [&] { return generation_ != seen; });  // passive: a futex, no spinning
      seen = generation_;
      if (job_ == nullptr || wanted_ <= 0) continue;
      --wanted_;
      Job* job = job_;
      ++job->active;
      lock.unlock();
      drain(*job);
      lock.lock();
      if (--job->active == 0) done_.notify_all();
    }
  }

  std::mutex run_mu_;  // one job at a time
  std::mutex mu_;
  std::condition_variable wake_, done_;
  Job* job_ = nullptr;
  int wanted_ = 0;
  uint64_t generation_ = 0;
  std::vector<std::thread> threads_;
};

// Never destroyed: helper threads sleep until the process exits (joining them from a static
// destructor would race with other exit-time code). After fork() the child has none of the
// parent's threads, and a mutex may have been held at the fork: the child starts a fresh pool.
std::atomic<Pool*> g_pool{nullptr};
std::once_flag g_atfork_once;

void reset_in_child() { g_pool.store(nullptr, std::memory_order_relaxed); }

Pool* pool() {
  std::call_once(g_atfork_once, [] { pthread_atfork(nullptr, nullptr, reset_in_child); });
  Pool* p = g_pool.load(std::memory_order_acquire);
  if (p == nullptr) {
    Pool* fresh = new Pool();
    if (g_pool.compare_exchange_strong(p, fresh, std::memory_order_acq_rel)) {
      p = fresh;
    } else {
      delete fresh;  // another thread installed one first; p holds it
    }
  }
  return p;
}

}  // namespace

void parallel_for(int64_t items, int threads, const std::function<void(int64_t)>& fn) {
  if (threads <= 0) threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  const int64_t helpers = std::min<int64_t>(std::min<int64_t>(threads, items) - 1, kMaxHelpers);
  if (helpers <= 0 || !pool()->run(items, static_cast<int>(helpers), fn)) {
    for (int64_t i = 0; i < items; ++i) fn(i);
  }
}

}  // namespace edmfast
