// The helper pool behind parallel_for (see parallel.h for why it is not OpenMP).
//
// One process-wide pool of sleeping threads, grown on demand up to the largest thread count asked
// for (capped). A call publishes a job and wakes as many helpers as it wants; the caller starts on
// the items at once. Items are claimed one at a time from a shared counter, so whoever runs gets
// the next one, and the caller takes every item nobody else has claimed.
//
// Robust to a helper that is descheduled (a machine shared with a busy process): the caller waits
// only for items a helper actually claimed and has not finished, never for a helper that was woken
// but has not run yet. The claim counter carries the job's epoch in its high half, and a helper
// claims with a compare-and-swap on (its epoch, next item): one that wakes after its job finished
// fails that claim and goes back to sleep without touching anything, even when the next job is
// already running. A successful claim implies the job is still live (its caller waits for the
// item), which is what makes the job's function and arguments safe to use from the helper.
//
// What remains is an item a helper claimed and was then descheduled in the middle of: the caller
// has to wait for it, for as long as the scheduler keeps the helper off a core (milliseconds when
// the machine is oversubscribed, against microseconds per item). A caller that waited that long
// takes it as a sign that helpers do not get a core right now and runs its next calls alone, for
// a stretch that doubles with every further stall (1, 2, 4, ... calls, at most kMaxBackoff) and
// resets after a call whose helpers kept up; so on a busy machine a pass costs what it costs on
// one thread, and on an idle one every call is parallel.
#include "parallel.h"

#include <pthread.h>
#include <sched.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

namespace edmfast {
namespace {

// Helpers run under SCHED_IDLE: they take only CPU time nobody else wants. On an idle machine
// that is every spare core (the full speed-up); on a busy one, waking a helper cannot preempt the
// caller or anyone else, and the caller claims the items the helper never gets to. Lowering a
// thread's own policy needs no privilege; where the OS refuses it, the helper runs as is.
void lower_priority() {
#if defined(__linux__)
  sched_param param{};
  param.sched_priority = 0;
  pthread_setschedparam(pthread_self(), SCHED_IDLE, &param);
#endif
}

constexpr int kMaxHelpers = 255;

// The caller spins this many times on the last claimed items before it sleeps: long enough to
// cover a helper finishing a chunk (a few microseconds), short enough not to burn a core that a
// descheduled helper (or another process) needs.
constexpr int kSpinBeforeSleep = 2000;

// A wait for claimed items longer than this is a descheduled helper (one item is a chunk of a few
// thousand elements: microseconds of work).
constexpr std::chrono::microseconds kStall{200};
// The longest stretch of calls run without helpers after repeated stalls.
constexpr int kMaxBackoff = 256;

inline uint64_t epoch_of(uint64_t claim) { return claim >> 32; }
inline int64_t index_of(uint64_t claim) { return static_cast<int64_t>(claim & 0xFFFFFFFFu); }

class Pool {
 public:
  // Returns false (nothing run) when another caller is using the pool right now, or when this
  // call is in a backoff stretch after helpers stalled: the caller then runs the items alone.
  bool run(int64_t items, int helpers, const std::function<void(int64_t)>& fn) {
    std::unique_lock<std::mutex> busy(run_mu_, std::try_to_lock);
    if (!busy.owns_lock()) return false;
    if (skip_ > 0) {
      --skip_;
      return false;
    }
    uint64_t epoch;
    {
      std::lock_guard<std::mutex> lock(mu_);
      while (static_cast<int>(threads_.size()) < helpers) threads_.emplace_back([this] { loop(); });
      epoch = ++epoch_;
      fn_ = &fn;
      items_ = items;
      done_.store(0, std::memory_order_relaxed);
      claim_.store(epoch << 32, std::memory_order_release);
      tickets_ = helpers;
    }
    wake_.notify_all();
    // The caller's claims cannot race with a new epoch (it is the only caller), so a plain add.
    for (int64_t i = index_of(claim_.fetch_add(1, std::memory_order_acq_rel)); i < items;
         i = index_of(claim_.fetch_add(1, std::memory_order_acq_rel))) {
      fn(i);
      done_.fetch_add(1, std::memory_order_release);
    }
    // Every item is claimed; wait for the ones helpers hold (their writes happen-before this).
    for (int spin = 0; spin < kSpinBeforeSleep; ++spin) {
      if (done_.load(std::memory_order_acquire) == items) {
        backoff_ = 0;
        return true;
      }
    }
    const auto waited_from = std::chrono::steady_clock::now();
    {
      std::unique_lock<std::mutex> lock(mu_);
      finished_.wait(lock, [&] { return done_.load(std::memory_order_acquire) == items; });
    }
    if (std::chrono::steady_clock::now() - waited_from > kStall) {
      backoff_ = backoff_ == 0 ? 1 : std::min(2 * backoff_, kMaxBackoff);
      skip_ = backoff_;
    } else {
      backoff_ = 0;
    }
    return true;
  }

 private:
  void loop() {
    lower_priority();
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      wake_.wait(lock, [&] { return epoch_ != seen; });  // passive: a futex, no spinning
      seen = epoch_;
      if (tickets_ <= 0) continue;  // the call wanted fewer helpers than the pool has
      --tickets_;
      const std::function<void(int64_t)>* fn = fn_;
      const int64_t items = items_;
      lock.unlock();
      bool last = false;
      uint64_t claim = claim_.load(std::memory_order_acquire);
      while (epoch_of(claim) == seen && index_of(claim) < items) {
        if (!claim_.compare_exchange_weak(claim, claim + 1, std::memory_order_acq_rel, std::memory_order_acquire))
          continue;  // claim now holds the current value: retry (or stop on a new epoch)
        (*fn)(index_of(claim));
        last = done_.fetch_add(1, std::memory_order_acq_rel) + 1 == items;
        claim = claim_.load(std::memory_order_acquire);
      }
      lock.lock();
      // The caller may be asleep on `finished_` for exactly this item: wake it under the mutex, so
      // the wake-up cannot fall between its check of `done_` and its wait.
      if (last) finished_.notify_all();
    }
  }

  std::mutex run_mu_;  // one job at a time; guards skip_ and backoff_
  int skip_ = 0;        // calls left to run without helpers
  int backoff_ = 0;     // the length of the last such stretch (0: helpers kept up last time)
  std::mutex mu_;
  std::condition_variable wake_, finished_;
  uint64_t epoch_ = 0;                                  // the current job (guarded by mu_)
  const std::function<void(int64_t)>* fn_ = nullptr;    // its function and item count (mu_)
  int64_t items_ = 0;
  int tickets_ = 0;                                     // helpers it still wants (mu_)
  std::atomic<uint64_t> claim_{0};                      // epoch << 32 | next unclaimed item
  std::atomic<int64_t> done_{0};                        // items of the current job finished
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
  // Items are numbered in the low 32 bits of the claim counter.
  if (helpers <= 0 || items >= (int64_t{1} << 31) || !pool()->run(items, static_cast<int>(helpers), fn)) {
    for (int64_t i = 0; i < items; ++i) fn(i);
  }
}

}  // namespace edmfast
