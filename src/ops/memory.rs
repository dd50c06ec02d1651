//! Giving freed memory back to the operating system after a spike.
//!
//! glibc's allocator keeps what a burst freed (a flood of handshakes, a reconnect storm)
//! mapped in its arenas: it only returns the top of each heap, and fragmentation keeps the
//! top in use, so a replica's resident memory stays at its highest point ever and the
//! orchestrator sees a replica that never shrinks. `malloc_trim(0)` releases the free pages
//! inside every arena (`madvise(MADV_DONTNEED)`), so one task calls it every few seconds, on
//! a blocking thread. Measured on a replica at 40,000 deliveries/s: 10 µs to 1 ms a call in
//! steady state, and 12 ms once after a spike left 40 MB to give back (an arena is locked
//! meanwhile); after a handshake flood, resident memory went from 46 to 10 MiB within 15 s
//! (BENCHMARKS.md). Other allocators (musl's, or a replacement) return memory by themselves;
//! the task is then not started.

use std::time::Duration;

use crate::ops::shutdown::Shutdown;

/// How often freed memory is handed back.
const EVERY: Duration = Duration::from_secs(10);

/// The task (with glibc; elsewhere it only waits for `shutdown`).
pub async fn run(shutdown: Shutdown) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let mut every = tokio::time::interval(EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = every.tick() => {}
                _ = shutdown.wait() => return,
            }
            // SAFETY: malloc_trim has no preconditions; it only releases free memory.
            let _ = tokio::task::spawn_blocking(|| unsafe { libc::malloc_trim(0) }).await;
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    shutdown.wait().await;
}
