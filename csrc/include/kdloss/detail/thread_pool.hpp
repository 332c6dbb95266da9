#pragma once

// A small process-wide pool of worker threads, created on first use and reused by every call, so that a
// parallel call costs a wake-up rather than thread creation.
//
// run(tasks, threads, task) executes task(i, worker) for i in [0, tasks) on the caller plus up to
// threads - 1 workers; `worker` (< threads) indexes per-thread scratch. Which thread runs a task never
// changes what the task computes, so results do not depend on the thread count. One parallel job runs at a
// time: a caller that finds the pool busy (another Python thread, say) runs its tasks itself instead of
// waiting. After fork() the child, which has no workers, starts a pool of its own.

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h>
#define KDLOSS_HAS_FORK 1
#endif

namespace kdloss::detail {

class ThreadPool {
public:
    using Task = std::function<void(std::size_t task, std::size_t worker)>;

    static std::size_t hardware_threads() noexcept {
        const unsigned count = std::thread::hardware_concurrency();
        return count == 0 ? 1 : count;
    }

    static void run(std::size_t tasks, std::size_t threads, const Task& task) {
        threads = std::min(threads, tasks);
        if (threads > 1) {
            ThreadPool& pool = instance();
            std::unique_lock<std::mutex> job_lock(pool.job_mutex_, std::try_to_lock);
            if (job_lock.owns_lock()) {
                pool.run_parallel(tasks, threads, task);
                return;
            }
        }
        for (std::size_t i = 0; i < tasks; ++i) task(i, 0);
    }

private:
    ThreadPool() = default;

    // Never destroyed: workers may still be parked when the process exits, and joining them from a static
    // destructor (after Python has finalised, say) is a classic way to hang at exit.
    static ThreadPool& instance() {
#ifdef KDLOSS_HAS_FORK
        static std::mutex instance_mutex;
        static ThreadPool* pool = nullptr;
        static pid_t owner = 0;
        std::lock_guard<std::mutex> lock(instance_mutex);
        if (pool == nullptr || owner != getpid()) {
            pool = new ThreadPool();  // a forked child's copy has no workers behind it: leave it be
            owner = getpid();
        }
        return *pool;
#else
        static ThreadPool* pool = new ThreadPool();
        return *pool;
#endif
    }

    void run_parallel(std::size_t tasks, std::size_t threads, const Task& task) {
        {
            std::lock_guard<std::mutex> lock(mutex_);
            while (workers_.size() < threads - 1) {
                const std::size_t worker = workers_.size() + 1;
                workers_.emplace_back([this, worker] { work(worker); });
                workers_.back().detach();
            }
            task_ = &task;
            task_count_ = tasks;
            next_task_.store(0);
            participants_ = threads - 1;
            active_workers_ = participants_;
            ++generation_;
        }
        wake_.notify_all();
        drain(0);
        std::unique_lock<std::mutex> lock(mutex_);
        done_.wait(lock, [this] { return active_workers_ == 0; });
        task_ = nullptr;
    }

    void drain(std::size_t worker) {
        for (std::size_t i = next_task_.fetch_add(1); i < task_count_; i = next_task_.fetch_add(1)) (*task_)(i, worker);
    }

    void work(std::size_t worker) {
        std::size_t seen = 0;
        for (;;) {
            {
                std::unique_lock<std::mutex> lock(mutex_);
                // Workers beyond this job's thread count sit it out, so that `worker` stays below `threads`.
                wake_.wait(lock, [&] { return generation_ != seen && task_ != nullptr && worker <= participants_; });
                seen = generation_;
            }
            drain(worker);
            std::lock_guard<std::mutex> lock(mutex_);
            if (--active_workers_ == 0) done_.notify_one();
        }
    }

    std::mutex job_mutex_;  // held by the one caller whose job is running
    std::mutex mutex_;
    std::condition_variable wake_;
    std::condition_variable done_;
    std::vector<std::thread> workers_;
    const Task* task_ = nullptr;
    std::size_t task_count_ = 0;
    std::atomic<std::size_t> next_task_{0};
    std::size_t participants_ = 0;    // workers 1..participants_ take part in the current job
    std::size_t active_workers_ = 0;  // of those, the ones not yet done
    std::size_t generation_ = 0;
};

}  // namespace kdloss::detail
