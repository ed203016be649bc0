//! Queue hand-off between threads (issue 5): what one reactor → worker hand-off costs, with the
//! mechanism the node uses (a lock-free `ArrayQueue` plus a [`Doorbell`]) beside the one it
//! replaced (a bounded crossbeam channel, whose blocking receive spins and yields first).
//!
//! - `ping_pong/*`: one item there and one back at once: the wall-clock latency floor.
//! - `paced_cpu_per_item/*`: one item every 50 µs, the consumer waiting for each: the CPU a
//!   hand-off costs when the consumer must wait, as the node's storage and ingest threads do.
//! - `burst/*`: 10,000 items pushed as fast as possible, the consumer draining in batches: the
//!   hand-off cost per item under load.
//!
//! `cargo bench --bench handoff`
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use crossbeam_queue::ArrayQueue;
use dicomgate::doorbell::Doorbell;

struct Lane {
    q: ArrayQueue<u64>,
    bell: Doorbell,
}

impl Lane {
    fn new(depth: usize) -> Arc<Lane> {
        Arc::new(Lane {
            q: ArrayQueue::new(depth),
            bell: Doorbell::new(),
        })
    }
    fn send(&self, mut v: u64) {
        while let Err(back) = self.q.push(v) {
            v = back;
            std::thread::yield_now();
        }
        self.bell.ring();
    }
    fn recv(&self) -> u64 {
        loop {
            if let Some(v) = self.q.pop() {
                return v;
            }
            self.bell
                .wait(Duration::from_millis(100), || !self.q.is_empty());
        }
    }
}

/// CPU time of the whole process (every thread).
fn process_cpu() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

/// Wall-clock round trip, the reply sent at once: the latency floor, where a receiver that
/// spins before it sleeps (crossbeam-channel) wins, since the reply comes while it spins.
fn ping_pong(c: &mut Criterion) {
    let mut g = c.benchmark_group("ping_pong");
    g.throughput(Throughput::Elements(1));
    {
        let (there, back) = (Lane::new(4096), Lane::new(4096));
        let stop = Arc::new(AtomicBool::new(false));
        let echo = {
            let (there, back, stop) = (there.clone(), back.clone(), stop.clone());
            std::thread::spawn(move || loop {
                let v = there.recv();
                if stop.load(Ordering::Acquire) {
                    return;
                }
                back.send(v);
            })
        };
        g.bench_function("doorbell", |b| {
            b.iter(|| {
                there.send(1);
                back.recv()
            })
        });
        stop.store(true, Ordering::Release);
        there.send(0);
        echo.join().unwrap();
    }
    {
        let (tx, rx) = crossbeam_channel::bounded::<u64>(4096);
        let (btx, brx) = crossbeam_channel::bounded::<u64>(4096);
        let echo = std::thread::spawn(move || {
            while let Ok(v) = rx.recv() {
                if btx.send(v).is_err() {
                    return;
                }
            }
        });
        g.bench_function("crossbeam_channel", |b| {
            b.iter(|| {
                tx.send(1).unwrap();
                brx.recv().unwrap()
            })
        });
        drop(tx);
        echo.join().unwrap();
    }
    g.finish();
}

/// The node's case: items arrive one at a time with a gap (the next C-STORE is a network round
/// trip away) and the consumer waits for each. Reported "time" is process CPU time per item
/// (both threads; the producer's sleep costs the same in both), not wall time.
const GAP: Duration = Duration::from_micros(50);

fn paced_cpu(c: &mut Criterion) {
    let mut g = c.benchmark_group("paced_cpu_per_item");
    g.throughput(Throughput::Elements(1));
    g.sample_size(20);
    g.bench_function("doorbell", |b| {
        b.iter_custom(|iters| {
            let lane = Lane::new(4096);
            let consumer = {
                let lane = lane.clone();
                std::thread::spawn(move || {
                    for _ in 0..iters {
                        std::hint::black_box(lane.recv());
                    }
                })
            };
            let c0 = process_cpu();
            for i in 0..iters {
                lane.send(i);
                std::thread::sleep(GAP);
            }
            consumer.join().unwrap();
            process_cpu().saturating_sub(c0)
        })
    });
    g.bench_function("crossbeam_channel", |b| {
        b.iter_custom(|iters| {
            let (tx, rx) = crossbeam_channel::bounded::<u64>(4096);
            let consumer = std::thread::spawn(move || {
                for _ in 0..iters {
                    std::hint::black_box(rx.recv().unwrap());
                }
            });
            let c0 = process_cpu();
            for i in 0..iters {
                tx.send(i).unwrap();
                std::thread::sleep(GAP);
            }
            consumer.join().unwrap();
            process_cpu().saturating_sub(c0)
        })
    });
    g.finish();
}

const BURST: u64 = 10_000;

fn burst(c: &mut Criterion) {
    let mut g = c.benchmark_group("burst");
    g.throughput(Throughput::Elements(BURST));
    g.bench_function("doorbell", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let lane = Lane::new(4096);
                let consumer = {
                    let lane = lane.clone();
                    std::thread::spawn(move || {
                        let mut got = 0;
                        while got < BURST {
                            lane.recv();
                            got += 1;
                        }
                    })
                };
                let t0 = Instant::now();
                for i in 0..BURST {
                    lane.send(i);
                }
                consumer.join().unwrap();
                total += t0.elapsed();
            }
            total
        })
    });
    g.bench_function("crossbeam_channel", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let (tx, rx) = crossbeam_channel::bounded::<u64>(4096);
                let consumer = std::thread::spawn(move || {
                    let mut got = 0;
                    while got < BURST {
                        rx.recv().unwrap();
                        got += 1;
                    }
                });
                let t0 = Instant::now();
                for i in 0..BURST {
                    tx.send(i).unwrap();
                }
                consumer.join().unwrap();
                total += t0.elapsed();
            }
            total
        })
    });
    g.finish();
}

criterion_group!(benches, ping_pong, paced_cpu, burst);
criterion_main!(benches);
