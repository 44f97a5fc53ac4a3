//! What one parallel call costs after the pool's threads have been idle:
//! an empty `rayon::broadcast` timed after the calling thread spun alone for
//! a gap of 0-300 us (the serial work between two parallel calls of a decode
//! step), with the other threads left idle or kept spinning (as the CPU
//! backend's `KeepAwake` does). A rayon worker idle for more than about
//! 10 us goes to sleep; waking it is a futex and, on a VM, an interrupt to a
//! halted vCPU. Session 15 on the 2-vCPU Intel dev box: 1.1-1.5 us up to an
//! 8 us gap, 20-40 us after 10-20 us, 71-101 us after 50-300 us idle;
//! 0.9-3.6 us at every gap with the threads spinning (docs/perf/cpu.md).
//! Session 32 adds the team column: on the H200 host's 16 vCPUs, 2.2-3.1 us
//! at every gap, against 4.4-9.6 us spinning and 35-91 us idle after 50-300 us.
//!
//! `cargo run --release -p bitnet-kernels --example wake_cost`
use bitnet_kernels::cpu::team::{self, Team};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

fn main() {
    let pool = rayon::ThreadPoolBuilder::new().build().expect("a thread pool");
    println!("{} threads", pool.current_num_threads());
    pool.install(|| {
        for gap_us in [0u128, 5, 8, 10, 15, 20, 50, 100, 300] {
            let mut line = format!("gap {gap_us:>3} us:");
            for spin in [false, true] {
                let calls = 1000;
                let mut total_ns = 0u128;
                for _ in 0..calls {
                    let stop = Arc::new(AtomicBool::new(false));
                    if spin {
                        let flag = Arc::clone(&stop);
                        rayon::spawn_broadcast(move |_| {
                            while !flag.load(Ordering::Acquire) {
                                std::hint::spin_loop();
                            }
                        });
                    }
                    let gap = Instant::now();
                    while gap.elapsed().as_micros() < gap_us {
                        std::hint::spin_loop();
                    }
                    stop.store(true, Ordering::Release);
                    let call = Instant::now();
                    rayon::broadcast(|ctx| std::hint::black_box(ctx.index()));
                    total_ns += call.elapsed().as_nanos();
                }
                let us = total_ns as f64 / calls as f64 / 1000.0;
                line += &format!(" {} {us:.1} us", if spin { "spinning" } else { "idle" });
            }
            let team = Team::start();
            let calls = 1000;
            let mut total_ns = 0u128;
            for _ in 0..calls {
                let gap = Instant::now();
                while gap.elapsed().as_micros() < gap_us {
                    std::hint::spin_loop();
                }
                let call = Instant::now();
                team::broadcast(|index, _| std::hint::black_box(index));
                total_ns += call.elapsed().as_nanos();
            }
            drop(team);
            line += &format!(" team {:.1} us", total_ns as f64 / calls as f64 / 1000.0);
            println!("{line}");
        }
    });
}
