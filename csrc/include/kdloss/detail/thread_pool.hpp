#pragma once

// A small process-wide pool of worker threads, created on first use and reused by every call, so that a
// parallel call costs a wake-up rather than thread creation.
//
// run(tasks, threads, task) executes task(i, worker) for i in [0, tasks) on the caller plus up to
// threads - 1 workers; `worker` (< threads) indexes per-thread scratch. Which thread runs a task never
// changes what the task computes, so results do not depend on the thread count.
//
// Tasks are claimed from a shared counter, so a worker that wakes late simply finds nothing left, and the
// caller returns as soon as every task is done rather than when every worker has woken: on a busy machine
// a wake-up can take longer than the whole job. Workers spin briefly before sleeping, which makes
// back-to-back calls (a training loop) cheap to wake. One parallel job runs at a time: a caller that finds
// the pool busy (another Python thread, say) runs its tasks itself instead of waiting. After fork() the
// child, which has no workers, starts a pool of its own.
//
// On Linux a worker that finds itself on its caller's CPU moves to another one before it works: the
// scheduler may wake a thread onto its waker's CPU, where the two could only take turns, and on a busy or
// virtual machine it may take milliseconds to move it (then 2 threads are no faster than 1, call after call).

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>

#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h>
#define KDLOSS_HAS_FORK 1
#endif
#if defined(__linux__)
#include <sched.h>
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
    // One parallel call. Shared with the workers, so that one waking after the call has returned still
    // holds a valid (finished) job and claims nothing from it.
    struct Job {
        const Task* task;
        std::size_t count;
        int caller_cpu;  // -1: unknown
        std::atomic<std::size_t> next{0};
        std::atomic<std::size_t> done{0};

        Job(const Task* task_, std::size_t count_) : task(task_), count(count_), caller_cpu(current_cpu()) {}

        void work(std::size_t worker) {
            if (worker != 0) leave_cpu(caller_cpu);
            for (std::size_t i = next.fetch_add(1); i < count; i = next.fetch_add(1)) {
                (*task)(i, worker);
                done.fetch_add(1, std::memory_order_release);
            }
        }
    };

    ThreadPool() = default;

    static int current_cpu() noexcept {
#if defined(__linux__)
        return sched_getcpu();
#else
        return -1;
#endif
    }

    // Moves the calling thread off `cpu` if it runs there and may run elsewhere: its allowed CPUs less
    // that one, then all of them again (a thread keeps the CPU it is on until it next sleeps).
    static void leave_cpu(int cpu) noexcept {
#if defined(__linux__)
        if (cpu < 0 || sched_getcpu() != cpu) return;
        cpu_set_t allowed;
        if (sched_getaffinity(0, sizeof allowed, &allowed) != 0 || !CPU_ISSET(cpu, &allowed)) return;
        cpu_set_t elsewhere = allowed;
        CPU_CLR(cpu, &elsewhere);
        if (CPU_COUNT(&elsewhere) == 0) return;
        if (sched_setaffinity(0, sizeof elsewhere, &elsewhere) == 0) sched_setaffinity(0, sizeof allowed, &allowed);
#else
        (void)cpu;
#endif
    }

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
        const auto job = std::make_shared<Job>(&task, tasks);
        {
            std::lock_guard<std::mutex> lock(mutex_);
            while (started_workers_ < threads - 1) {
                const std::size_t worker = ++started_workers_;
                std::thread([this, worker] { serve(worker); }).detach();
            }
            job_ = job;
            participants_ = threads - 1;
            generation_.fetch_add(1, std::memory_order_release);
        }
        wake_.notify_all();
        job->work(0);
        // What is left was claimed by workers and is running: wait for it, which takes at most a task.
        while (job->done.load(std::memory_order_acquire) < tasks) std::this_thread::yield();
    }

    void serve(std::size_t worker) {
        std::size_t seen = 0;
        for (;;) {
            // Spin for a while before sleeping: the next call of a training loop usually comes soon.
            const auto spin_until = std::chrono::steady_clock::now() + std::chrono::microseconds(200);
            while (generation_.load(std::memory_order_acquire) == seen && std::chrono::steady_clock::now() < spin_until)
                std::this_thread::yield();
            std::shared_ptr<Job> job;
            {
                std::unique_lock<std::mutex> lock(mutex_);
                wake_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != seen; });
                seen = generation_.load(std::memory_order_acquire);
                // Workers beyond this job's thread count sit it out, so that `worker` stays below `threads`.
                if (worker <= participants_) job = job_;
            }
            if (job) job->work(worker);
        }
    }

    std::mutex job_mutex_;  // held by the one caller whose job is running
    std::mutex mutex_;      // guards what follows but generation_, which is also read while spinning
    std::condition_variable wake_;
    std::size_t started_workers_ = 0;
    std::shared_ptr<Job> job_;
    std::size_t participants_ = 0;  // workers 1..participants_ take part in the current job
    std::atomic<std::size_t> generation_{0};
};

}  // namespace kdloss::detail
