//! The threads of a rayon pool held as a team for the many short parallel
//! calls of one decode step.
//!
//! A 2B-4T decode step makes about 150 parallel calls (five a layer, the
//! head), each a few to a few hundred microseconds of work. Through
//! `rayon::broadcast`, each call queues a job on every thread and wakes it;
//! on the H200 host's 16-vCPU VM (session 32, docs/perf/cpu.md) an empty
//! broadcast with the threads already spinning cost 4.4-9.6 us, and an
//! empty call through this team 2.2-3.1 us; with the decode products' cut
//! made cheaper at the same time, 16-thread decode ran 1.02-1.42x faster.
//!
//! [`Team::start`] (on a thread of the pool, inside `install`) puts one
//! spinner on every other thread of the pool. [`broadcast`] on the starting
//! thread then publishes the call in one atomic word that every spinner
//! reads; index `i` of the call (`0..n`, one per pool thread, as
//! `rayon::broadcast` numbers them) is claimed in its own cache line,
//! normally by pool thread `i`, so no line is fought over by every thread.
//! A thread that is late or busy delays nobody: once the caller has run its
//! own index it claims every index still unclaimed. The call returns when
//! every index has finished.
//!
//! Everything else that runs during a step still goes through rayon, inside
//! a [`rayon_section`]: the spinners leave (return to rayon) when a section
//! opens and new ones start when it closes, as the backend's spinners did
//! around every call before. They must not stay: a spinner is a rayon job
//! that runs until told to stop, and a pool thread that waits inside a
//! `join` runs the jobs queued for it, a spinner among them, so a spinner
//! still queued when rayon work begins could end up running inside that
//! work's `join` and hold it, and the step, forever (seen on the 2-core dev
//! box, session 32, before sections worked this way). So a spinner runs
//! only while its generation is current: opening or closing a section (and
//! dropping the team) starts a new one, and a spinner of an older
//! generation returns as soon as it starts or looks. Rayon work nobody
//! marked still finishes (the spinners look for rayon work now and then)
//! but is not safe from that hold: mark it.
//!
//! Each index runs the same code with the same inputs as under
//! `rayon::broadcast`, so results are the same bits whichever way a call runs.

use std::any::Any;
use std::cell::{Cell, RefCell};
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

/// Outside a [`rayon_section`], a spinner looks for rayon work once in this
/// many turns (a few microseconds), so rayon calls nobody marked still finish.
const YIELD_EVERY: u32 = 256;

/// Turns a thread spins (about 20-100 us) before each further turn also
/// offers its core to the operating system (`std::thread::yield_now`): with
/// more busy threads than cores (other processes, or a pool larger than the
/// machine) a thread that spins without yielding keeps the thread it waits
/// for off the core for whole scheduler slices. On an idle core the yield
/// returns at once.
const SPIN_BEFORE_OS_YIELD: u32 = 4096;

/// One turn of a wait that has lasted `turns` turns.
fn pause(turns: u32) {
    if turns >= SPIN_BEFORE_OS_YIELD {
        std::thread::yield_now();
    } else {
        std::hint::spin_loop();
    }
}

/// Largest pool a team serves: the call's index count is a 16-bit field of
/// [`Shared::call`].
const MAX_TEAM: usize = u16::MAX as usize;

/// One call: `run(i)` for every `i < n` (`n` is in the state word).
struct Job<'a> {
    run: &'a (dyn Fn(usize) + Sync),
}

/// An atomic in a cache line of its own.
#[repr(align(128))]
struct Padded<T>(T);

/// What the caller and the spinners share.
struct Shared {
    /// The current call as `epoch << 16 | n`; a new call takes the next
    /// epoch (starting at 1). Written by the caller only.
    call: Padded<AtomicU64>,
    /// Per index: the last epoch in which it was claimed.
    claimed: Vec<Padded<AtomicU64>>,
    /// The current call's job: written before its epoch is published, and
    /// valid until its last index has finished ([`Shared::remaining`] = 0).
    job: AtomicPtr<Job<'static>>,
    /// Indices of the current call that have not finished.
    remaining: Padded<AtomicUsize>,
    /// The spinners' generation: a spinner returns to rayon once this is not
    /// the one it was started for. Dropping the team sets it to `u64::MAX`.
    generation: AtomicU64,
    /// Open [`rayon_section`]s (nested ones count once each).
    rayon_sections: AtomicUsize,
    /// The first panic of a job on a spinner, resumed on the caller.
    panic: Mutex<Option<Box<dyn Any + Send>>>,
    /// The pool index of the thread that started the team (its own spinner
    /// returns at once).
    caller: usize,
}

fn pack(epoch: u64, n: usize) -> u64 {
    (epoch << 16) | n as u64
}

fn unpack(call: u64) -> (u64, usize) {
    (call >> 16, (call & 0xffff) as usize)
}

thread_local! {
    /// The team this thread started and can hand calls to.
    static TEAM: RefCell<Option<Arc<Shared>>> = const { RefCell::new(None) };
    /// Whether this thread is running an index of a team call: a
    /// [`broadcast`] made there runs its indices in turn on this thread.
    static IN_CALL: Cell<bool> = const { Cell::new(false) };
}

impl Shared {
    /// Starts a spinner of the current generation on every pool thread but
    /// the caller's.
    fn spawn_spinners(self: &Arc<Self>) {
        let spinners = Arc::clone(self);
        let generation = self.generation.load(Ordering::Acquire);
        rayon::spawn_broadcast(move |ctx| {
            if ctx.index() != spinners.caller {
                spinners.spin(ctx.index(), generation);
            }
        });
    }

    /// Retires the current spinners. Returns false when the team was
    /// dropped meanwhile (its generation stays `u64::MAX`).
    fn next_generation(&self) -> bool {
        let current = self.generation.load(Ordering::Acquire);
        current != u64::MAX
            && self.generation.compare_exchange(current, current + 1, Ordering::AcqRel, Ordering::Acquire).is_ok()
    }

    /// Claims index `index` of the current call if nobody has, and runs it.
    /// Returns whether it ran.
    fn run_index(&self, index: usize) -> bool {
        let (epoch, n) = unpack(self.call.0.load(Ordering::Acquire));
        if index >= n {
            return false;
        }
        let slot = &self.claimed[index].0;
        let last = slot.load(Ordering::Acquire);
        if last >= epoch {
            return false;
        }
        // Read before the claim: if the claim below succeeds, index `index`
        // of `epoch` was unclaimed until now, so call `epoch` cannot have
        // finished and no later call can have been published: this is the
        // pointer written for `epoch`.
        let job = self.job.load(Ordering::Acquire);
        if slot.compare_exchange(last, epoch, Ordering::AcqRel, Ordering::Acquire).is_err() {
            return false;
        }
        let was_in_call = IN_CALL.with(|c| c.replace(true));
        // SAFETY: `job` was published (Release, with the epoch) before the
        // call word we loaded (Acquire), and the successful claim shows call
        // `epoch` still had index `index` unclaimed; its caller waits in
        // `Team::call` until `remaining` reaches zero, which needs this
        // index's decrement below, so the `Job` (on the caller's stack) and
        // everything its closure borrows stay alive until then.
        let run = unsafe { &*job }.run;
        let result = panic::catch_unwind(AssertUnwindSafe(|| run(index)));
        IN_CALL.with(|c| c.set(was_in_call));
        if let Err(payload) = result {
            let mut first = self.panic.lock().unwrap_or_else(PoisonError::into_inner);
            first.get_or_insert(payload);
        }
        self.remaining.0.fetch_sub(1, Ordering::AcqRel);
        true
    }

    /// The spinner of pool thread `index`, of generation `generation`:
    /// runs its index of every call (unless the caller took it first) while
    /// that generation is current.
    fn spin(&self, index: usize, generation: u64) {
        let mut turns = 0u32;
        let mut seen = 0u64;
        while self.generation.load(Ordering::Acquire) == generation {
            let call = self.call.0.load(Ordering::Acquire);
            if call != seen {
                seen = call;
                self.run_index(index);
                turns = 0;
                continue;
            }
            // Wrapping: after 2^32 idle turns it spins 4096 turns again, and
            // keeps looking for rayon work every YIELD_EVERY.
            turns = turns.wrapping_add(1);
            if turns.is_multiple_of(YIELD_EVERY) {
                rayon::yield_now();
            } else {
                pause(turns);
            }
        }
    }
}

/// The other threads of the current rayon pool spinning for this thread's
/// [`broadcast`] calls until dropped. See the module documentation.
pub struct Team {
    shared: Arc<Shared>,
    /// A team belongs to the thread that started it (its thread-local
    /// registration is undone on drop).
    _not_send: std::marker::PhantomData<*const ()>,
    /// The thread's team before this one (teams nest on one thread only by
    /// being started inside each other).
    previous: Option<Arc<Shared>>,
}

impl Team {
    /// Starts a team on the current pool, led by the calling thread; `None`
    /// when the calling thread is not a pool thread, the pool has one thread
    /// or more than 65535. Dropping the team (on this thread) stops it.
    pub fn start() -> Option<Team> {
        let caller = rayon::current_thread_index()?;
        let threads = rayon::current_num_threads();
        if threads <= 1 || threads > MAX_TEAM {
            return None;
        }
        let shared = Arc::new(Shared {
            call: Padded(AtomicU64::new(0)),
            claimed: (0..threads).map(|_| Padded(AtomicU64::new(0))).collect(),
            job: AtomicPtr::new(std::ptr::null_mut()),
            remaining: Padded(AtomicUsize::new(0)),
            generation: AtomicU64::new(0),
            rayon_sections: AtomicUsize::new(0),
            panic: Mutex::new(None),
            caller,
        });
        shared.spawn_spinners();
        let previous = TEAM.with(|t| t.replace(Some(Arc::clone(&shared))));
        Some(Team { shared, _not_send: std::marker::PhantomData, previous })
    }

    /// Runs `run(i)` for every `i < n` on the team, the calling thread
    /// included, and returns when all have finished. A panic of any index is
    /// resumed here, after every index has finished.
    fn call(shared: &Shared, n: usize, run: &(dyn Fn(usize) + Sync)) {
        let job = Job { run };
        let (epoch, _) = unpack(shared.call.0.load(Ordering::Relaxed));
        shared.remaining.0.store(n, Ordering::Relaxed);
        shared.job.store((&job as *const Job<'_>).cast_mut().cast::<Job<'static>>(), Ordering::Relaxed);
        // Publishes the job and `remaining` with the new epoch.
        shared.call.0.store(pack(epoch + 1, n), Ordering::Release);
        shared.run_index(shared.caller);
        for index in 0..n {
            shared.run_index(index);
        }
        let mut turns = 0u32;
        while shared.remaining.0.load(Ordering::Acquire) != 0 {
            turns = turns.saturating_add(1);
            pause(turns);
        }
        shared.job.store(std::ptr::null_mut(), Ordering::Relaxed);
        let payload = shared.panic.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(payload) = payload {
            panic::resume_unwind(payload);
        }
    }
}

impl std::fmt::Debug for Team {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Team").field("caller", &self.shared.caller).finish_non_exhaustive()
    }
}

impl Drop for Team {
    fn drop(&mut self) {
        self.shared.generation.store(u64::MAX, Ordering::Release);
        TEAM.with(|t| *t.borrow_mut() = self.previous.take());
    }
}

/// `f(index, count)` for every index of the current rayon pool's threads
/// (`count` = the pool's size), as `rayon::broadcast` would call it, results
/// in index order. On a thread leading a [`Team`] the team runs it; inside
/// a team call's index it runs every index in turn on this thread;
/// elsewhere it is `rayon::broadcast`.
pub fn broadcast<R: Send>(f: impl Fn(usize, usize) -> R + Sync) -> Vec<R> {
    if IN_CALL.with(Cell::get) {
        let n = rayon::current_num_threads();
        return (0..n).map(|i| f(i, n)).collect();
    }
    let team = TEAM.with(|t| t.borrow().clone());
    let Some(shared) = team else {
        return rayon::broadcast(|ctx| f(ctx.index(), ctx.num_threads()));
    };
    let n = rayon::current_num_threads();
    debug_assert_eq!(n, shared.claimed.len(), "a team serves the pool it was started on");
    let results: Vec<Mutex<Option<R>>> = (0..n).map(|_| Mutex::new(None)).collect();
    let run = |i: usize| {
        let value = f(i, n);
        *results[i].lock().unwrap_or_else(PoisonError::into_inner) = Some(value);
    };
    Team::call(&shared, n, &run);
    results
        .into_iter()
        .map(|r| {
            r.into_inner()
                .unwrap_or_else(PoisonError::into_inner)
                .expect("every index of a team call runs before it returns")
        })
        .collect()
}

/// Runs `f`, a piece of work that uses rayon's own parallel calls: on a
/// thread leading a [`Team`], with the team's spinners gone back to rayon
/// (they would hold the pool's threads, and could end up inside `f`'s
/// joins: see the module documentation) and new ones started afterwards;
/// elsewhere, just `f`. A [`broadcast`] inside `f` still works: with no
/// spinners the caller runs every index.
pub fn rayon_section<R>(f: impl FnOnce() -> R) -> R {
    let team = TEAM.with(|t| t.borrow().clone());
    let Some(shared) = team else { return f() };
    /// Closes the section, also when `f` panics.
    struct Section(Arc<Shared>);
    impl Drop for Section {
        fn drop(&mut self) {
            if self.0.rayon_sections.fetch_sub(1, Ordering::AcqRel) == 1 && self.0.next_generation() {
                self.0.spawn_spinners();
            }
        }
    }
    if shared.rayon_sections.fetch_add(1, Ordering::AcqRel) == 0 {
        shared.next_generation();
    }
    let _section = Section(Arc::clone(&shared));
    f()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;
    use std::collections::HashSet;
    use std::sync::atomic::AtomicUsize;
    use std::time::{Duration, Instant};

    fn pool(threads: usize) -> rayon::ThreadPool {
        rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("pool")
    }

    #[test]
    fn a_team_runs_every_index_once_in_order() {
        for threads in [1, 2, 3, 5] {
            pool(threads).install(|| {
                let team = Team::start();
                assert_eq!(team.is_some(), threads > 1, "{threads} threads");
                for round in 0..2000usize {
                    let runs: Vec<AtomicUsize> = (0..threads).map(|_| AtomicUsize::new(0)).collect();
                    let out = broadcast(|i, n| {
                        runs[i].fetch_add(1, Ordering::Relaxed);
                        (i, n, round * 7 + i)
                    });
                    let expected: Vec<_> = (0..threads).map(|i| (i, threads, round * 7 + i)).collect();
                    assert_eq!(out, expected);
                    assert!(runs.iter().all(|r| r.load(Ordering::Relaxed) == 1));
                }
                drop(team);
            });
        }
    }

    /// Without a team (no pool, or the team dropped) `broadcast` is
    /// `rayon::broadcast`, and a dropped team's spinners have returned: a
    /// plain broadcast reaches every thread.
    #[test]
    fn without_a_team_broadcast_is_rayons() {
        let p = pool(3);
        p.install(|| {
            drop(Team::start());
            let seen: HashSet<usize> =
                broadcast(|_, _| rayon::current_thread_index().expect("pool thread")).into_iter().collect();
            assert_eq!(seen.len(), 3, "each index on its own thread");
        });
        assert_eq!(p.broadcast(|ctx| ctx.index()), vec![0, 1, 2]);
        assert!(Team::start().is_none(), "not on a pool thread");
        let outside = broadcast(|i, n| (i, n));
        assert_eq!(outside.len(), rayon::current_num_threads());
    }

    /// Other threads take part in a team call: an index that waits for
    /// another to start would wait forever if the caller ran them all.
    #[test]
    fn team_calls_run_on_several_threads() {
        pool(4).install(|| {
            let _team = Team::start().expect("team");
            for _ in 0..50 {
                let started = AtomicUsize::new(0);
                let threads = broadcast(|_, _| {
                    started.fetch_add(1, Ordering::AcqRel);
                    let t = Instant::now();
                    while started.load(Ordering::Acquire) < 2 {
                        assert!(t.elapsed() < Duration::from_secs(30), "no other thread joined the call");
                        std::hint::spin_loop();
                    }
                    rayon::current_thread_index()
                });
                assert_eq!(threads.len(), 4);
            }
        });
    }

    /// A broadcast inside a team call's index runs its indices in turn on
    /// that thread; rayon's parallel iterators, inside and outside a
    /// rayon_section, finish with the right result and use other threads
    /// when marked.
    #[test]
    fn nested_calls_and_rayon_work_finish() {
        pool(3).install(|| {
            let _team = Team::start().expect("team");
            let nested = broadcast(|i, _| broadcast(|j, n| i * 10 + j + n).iter().sum::<usize>());
            assert_eq!(nested, vec![12, 42, 72]);
            let plain: u64 = (0..100_000u64).into_par_iter().sum();
            assert_eq!(plain, 4_999_950_000);
            let threads = rayon_section(|| {
                (0..64usize)
                    .into_par_iter()
                    .map(|_| {
                        std::thread::sleep(Duration::from_millis(1));
                        rayon::current_thread_index()
                    })
                    .collect::<HashSet<_>>()
            });
            assert!(threads.len() > 1, "the spinners took rayon work: {threads:?}");
            // A plain rayon::broadcast while the team holds the pool finishes too.
            assert_eq!(rayon::broadcast(|ctx| ctx.index()), vec![0, 1, 2]);
            assert_eq!(broadcast(|i, _| i), vec![0, 1, 2], "the team still runs calls");
        });
    }

    /// A panic in any index reaches the caller after every index finished,
    /// and the team keeps working.
    #[test]
    fn a_panicking_index_is_resumed_on_the_caller() {
        pool(3).install(|| {
            let _team = Team::start().expect("team");
            for bad in 0..3 {
                let finished = AtomicUsize::new(0);
                let result = panic::catch_unwind(AssertUnwindSafe(|| {
                    broadcast(|i, _| {
                        if i == bad {
                            panic!("index {i} fails");
                        }
                        std::thread::sleep(Duration::from_millis(2));
                        finished.fetch_add(1, Ordering::AcqRel);
                    })
                }));
                let payload = result.expect_err("the panic reaches the caller");
                assert_eq!(
                    payload.downcast_ref::<String>().map(String::as_str),
                    Some(format!("index {bad} fails").as_str())
                );
                assert_eq!(finished.load(Ordering::Acquire), 2, "the other indices finished first");
                assert_eq!(broadcast(|i, _| i), vec![0, 1, 2]);
            }
        });
    }

    /// Steps as the CPU backend makes them, many times over on a pool with
    /// more threads than this machine has cores: team calls, rayon sections
    /// with nested joins between them, teams started and dropped. A spinner
    /// left inside a section's joins hangs this (it did on the 2-core dev
    /// box, inside the backend's tests, before sections retired the
    /// spinners).
    #[test]
    fn steps_with_rayon_sections_never_hang() {
        let p = pool(6);
        for step in 0..300u64 {
            p.install(|| {
                let _team = Team::start().expect("team");
                for call in 0..4u64 {
                    let got: u64 = broadcast(|i, _| i as u64 + step + call).into_iter().sum();
                    assert_eq!(got, 15 + 6 * (step + call));
                    let sum: u64 = rayon_section(|| (0..2000u64).into_par_iter().map(|x| x ^ step).sum());
                    assert_eq!(sum, (0..2000u64).map(|x| x ^ step).sum::<u64>());
                }
            });
        }
    }

    #[test]
    fn call_word_round_trips() {
        for (e, n) in [(0, 0), (1, 16), ((1 << 48) - 1, MAX_TEAM)] {
            assert_eq!(unpack(pack(e, n)), (e, n));
        }
    }
}
