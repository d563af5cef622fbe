//! The gradients' reduce-scatter, bucket by bucket, while the backward pass still runs. The
//! backward pass announces each parameter whose gradient is final
//! ([`autograd::Var::backward_notifying`]); a bucket of the [`FlatLayout`] is packed as soon as
//! all of its parameters are, in bucket order (the order every rank exchanges them in), and a
//! worker thread exchanges it while the backward pass goes on (on GPUs with NCCL, on the
//! collectives' own stream). The layout puts the parameters whose gradients finish first in the
//! first buckets. The sums are the same bits as an exchange after the backward pass: only when
//! they are taken changes.

use crate::device_collective::DeviceCollective;
use crate::error::{Result, TrainError};
use crate::flat_layout::FlatLayout;
use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::sync::mpsc;
use std::thread::{Scope, ScopedJoinHandle};
use tensor::{DType, Device, Tensor};

/// The thread that exchanges the buckets: they go in through the channel, and it hands back
/// each one's summed segment for this rank, in order.
struct Worker<'scope> {
    buckets: mpsc::SyncSender<Tensor>,
    done: ScopedJoinHandle<'scope, Result<Vec<Tensor>>>,
}

/// One step's gradients on their way to the ranks that own them.
pub struct OverlappedReduction<'scope> {
    layout: &'scope FlatLayout,
    exchange: &'scope dyn DeviceCollective,
    rank: usize,
    device: Device,
    buckets: Vec<Range<usize>>,
    /// Per parameter, the last bucket it has values in.
    last_bucket: BTreeMap<String, usize>,
    /// Per bucket, its parameters whose gradients are not final yet.
    waiting: Vec<BTreeSet<String>>,
    /// The next bucket to send.
    next: usize,
    /// This rank's gradients (f32, summed over its micro-batches), by name, until sent.
    grads: BTreeMap<String, Tensor>,
    /// The first error met on this side (reported by [`OverlappedReduction::finish`]).
    failed: Option<TrainError>,
    /// The exchange's side (none for one rank).
    worker: Option<Worker<'scope>>,
}

impl<'scope> OverlappedReduction<'scope> {
    /// Starts a step's reduction for `rank` over `layout` in buckets of at most
    /// `bucket_bytes`, on the rank's `device`, exchanged through `exchange` by a worker thread
    /// of `scope`.
    pub fn start<'env>(
        scope: &'scope Scope<'scope, 'env>,
        layout: &'scope FlatLayout,
        exchange: &'scope dyn DeviceCollective,
        rank: usize,
        device: Device,
        bucket_bytes: usize,
    ) -> Self {
        let buckets = layout.buckets(bucket_bytes);
        let waiting: Vec<BTreeSet<String>> = buckets
            .iter()
            .map(|b| layout.names_in(b.clone()).map(str::to_owned).collect())
            .collect();
        let mut last_bucket = BTreeMap::new();
        for (i, names) in waiting.iter().enumerate() {
            for name in names {
                last_bucket.insert(name.clone(), i);
            }
        }
        let worker = (layout.world() > 1).then(|| {
            // A bucket is handed over only when the worker takes it: at most two are out at
            // once (one being exchanged, one packed), as the memory plan counts.
            let (buckets, receive) = mpsc::sync_channel::<Tensor>(0);
            let done = scope.spawn(move || {
                receive
                    .into_iter()
                    .map(|bucket| exchange.start_reduce_scatter_sum(&bucket))
                    .collect::<Result<Vec<_>>>()
            });
            Worker { buckets, done }
        });
        OverlappedReduction {
            layout,
            exchange,
            rank,
            device,
            buckets,
            last_bucket,
            waiting,
            next: 0,
            grads: BTreeMap::new(),
            failed: None,
            worker,
        }
    }

    /// Adds `grad` (any float dtype) into this rank's gradient of `name`.
    pub fn add(&mut self, name: &str, grad: &Tensor) {
        let sum = grad
            .to_dtype(DType::F32)
            .and_then(|g| match self.grads.remove(name) {
                Some(acc) => acc.add(&g),
                None => Ok(g),
            });
        match sum {
            Ok(sum) => {
                self.grads.insert(name.to_owned(), sum);
            }
            Err(e) => {
                self.failed.get_or_insert(e.into());
            }
        }
    }

    /// Declares `name`'s gradient final on this rank, and sends every bucket that is now
    /// complete (in order).
    pub fn ready(&mut self, name: &str) {
        for names in &mut self.waiting[self.next..] {
            names.remove(name);
        }
        while self.next < self.buckets.len() && self.waiting[self.next].is_empty() {
            self.send_next();
        }
    }

    /// How many buckets have been handed to the exchange so far.
    pub fn sent(&self) -> usize {
        self.next
    }

    /// Packs bucket `next` and hands it to the worker; drops the gradients it was the last
    /// bucket of. A bucket that cannot be packed is sent as zeros all the same, so that the
    /// other ranks' exchanges complete; the error is reported at the end.
    fn send_next(&mut self) {
        let (i, world) = (self.next, self.layout.world());
        let within = self.buckets[i].clone();
        self.next += 1;
        let Some(worker) = &self.worker else { return };
        let grads = &self.grads;
        let packed = self.layout.pack(
            0..world,
            within.clone(),
            |k| grads.get(k).cloned(),
            DType::F32,
            self.device,
        );
        let bucket = packed.or_else(|e| {
            self.failed.get_or_insert(e);
            Tensor::zeros_on(&[within.len() * world], DType::F32, self.device).map_err(TrainError::from)
        });
        match bucket {
            // A worker that stopped has failed; `finish` reports why.
            Ok(bucket) => drop(worker.buckets.send(bucket)),
            Err(e) => {
                self.failed.get_or_insert(e);
            }
        }
        self.grads
            .retain(|k, _| self.last_bucket.get(k).is_none_or(|&last| last > i));
    }

    /// Sends the buckets still waiting (parameters this rank computed no gradient for count as
    /// zeros), waits for the exchange, and returns this rank's summed gradients of the
    /// parameters it owns (the zeros where no rank had one; every parameter for one rank) with
    /// their sum of squares. Every rank must call it, whatever failed before.
    pub fn finish(mut self) -> Result<(BTreeMap<String, Tensor>, f64)> {
        while self.next < self.buckets.len() {
            self.send_next();
        }
        let reduced = match self.worker.take() {
            Some(Worker { buckets, done }) => {
                drop(buckets);
                // A panic there is a bug: it goes on here.
                let reduced = done
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
                Some(reduced?)
            }
            None => None,
        };
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        let mut squares = 0.0;
        let Some(reduced) = reduced else {
            let mut out = BTreeMap::new();
            for (name, shape) in self.layout.shapes() {
                let g = match self.grads.remove(name) {
                    Some(g) => g,
                    None => Tensor::zeros_on(shape, DType::F32, self.device)?,
                };
                squares += g.sqr()?.sum_all()?.to_scalar_f64()?;
                out.insert(name.to_owned(), g);
            }
            return Ok((out, squares));
        };
        // Where the exchange only started them, the sums are complete once it settles.
        self.exchange.settle()?;
        let mut parts = Vec::new();
        for (mine, within) in reduced.iter().zip(&self.buckets) {
            squares += mine.sqr()?.sum_all()?.to_scalar_f64()?;
            parts.extend(
                self.layout
                    .unpack(mine, self.rank..self.rank + 1, within.clone())?,
            );
        }
        Ok((self.layout.assemble(parts)?, squares))
    }
}

#[cfg(test)]
mod tests {
    use super::OverlappedReduction;
    use crate::collective::ThreadGroup;
    use crate::device_collective::HostStaged;
    use crate::flat_layout::FlatLayout;
    use crate::zero::partition;
    use std::collections::BTreeMap;
    use tensor::{DType, Device, Tensor};

    /// `f(rank, reduction)` on each rank of `layout` (threads), with reductions in buckets of
    /// `bucket_bytes` over the host collective; the results in rank order.
    fn on_ranks<T: Send>(
        layout: &FlatLayout,
        bucket_bytes: usize,
        f: impl Fn(usize, OverlappedReduction) -> T + Sync,
    ) -> Vec<T> {
        let ranks = ThreadGroup::new(layout.world());
        std::thread::scope(|s| {
            let handles: Vec<_> = ranks
                .iter()
                .enumerate()
                .map(|(r, g)| {
                    let f = &f;
                    s.spawn(move || {
                        let staged = HostStaged(g);
                        std::thread::scope(|inner| {
                            f(
                                r,
                                OverlappedReduction::start(
                                    inner,
                                    layout,
                                    &staged,
                                    r,
                                    Device::Cpu,
                                    bucket_bytes,
                                ),
                            )
                        })
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    /// Parameters `a` [2, 3] and `b` [4], owned by ranks `owners`, over `world` ranks.
    fn two_parameters(owners: [usize; 2], world: usize) -> FlatLayout {
        let shapes: BTreeMap<String, Vec<usize>> =
            [("a".to_owned(), vec![2, 3]), ("b".to_owned(), vec![4])].into();
        let owner: BTreeMap<String, usize> =
            [("a".to_owned(), owners[0]), ("b".to_owned(), owners[1])].into();
        FlatLayout::new(&shapes, &owner, world, &[])
    }

    /// Rank `r`'s gradient of parameter `p`, micro-batch `m`: fresh random values.
    fn grad(shape: &[usize], r: usize, p: usize, m: usize) -> Tensor {
        let mut rng = tensor::seeded_rng((100 * r + 10 * p + m) as u64);
        Tensor::randn(shape, DType::F32, 0.0, 1.0, &mut rng).unwrap()
    }

    #[test]
    fn buckets_go_out_as_they_fill_and_the_sums_equal_a_plain_sum_in_rank_order() {
        // Twelve layers' parameters, p0 used first by the forward pass.
        let shapes: BTreeMap<String, Vec<usize>> = (0..12)
            .map(|i| {
                (
                    format!("p{i:02}"),
                    if i % 3 == 0 { vec![2, 3 + i] } else { vec![5 + i] },
                )
            })
            .collect();
        let names: Vec<String> = shapes.keys().cloned().collect();
        let world = 3;
        let sizes = shapes
            .iter()
            .map(|(k, s)| (k.clone(), s.iter().product()))
            .collect();
        let owner = partition(&sizes, world);
        // The backward pass finishes p11 first and p0 last; rank 2 computes no gradient for p3.
        let ready: Vec<String> = names.iter().rev().cloned().collect();
        let layout = FlatLayout::new(&shapes, &owner, world, &ready);
        let has = |r: usize, p: usize| !(r == 2 && p == 3);
        // Buckets of 8 values per rank.
        let bucket_bytes = 8 * 4 * world;
        let results = on_ranks(&layout, bucket_bytes, |r, mut red| {
            let mut sent_early = Vec::new();
            for name in &ready {
                let p: usize = name[1..].parse().unwrap();
                if has(r, p) {
                    // Two micro-batches.
                    red.add(name, &grad(&shapes[name], r, p, 0));
                    red.add(name, &grad(&shapes[name], r, p, 1));
                    red.ready(name);
                }
                sent_early.push(red.sent());
            }
            (sent_early, red.finish().unwrap())
        });
        let buckets = layout.buckets(bucket_bytes).len();
        assert!(buckets > 3, "{buckets} buckets");
        for (r, (sent_early, (mine, squares))) in results.iter().enumerate() {
            // Buckets leave before the end of the backward pass, in order.
            assert!(sent_early[names.len() / 2] >= 1, "rank {r}: {sent_early:?}");
            assert!(sent_early.windows(2).all(|w| w[0] <= w[1]));
            let mut expect_squares = 0.0;
            for (p, name) in names.iter().enumerate() {
                assert_eq!(mine.contains_key(name), owner[name] == r, "rank {r} {name}");
                let Some(got) = mine.get(name) else { continue };
                assert_eq!(got.shape(), shapes[name].as_slice());
                let n: usize = shapes[name].iter().product();
                let mut sum = vec![0f32; n];
                for q in (0..world).filter(|&q| has(q, p)) {
                    let a = grad(&shapes[name], q, p, 0).to_vec::<f32>().unwrap();
                    let b = grad(&shapes[name], q, p, 1).to_vec::<f32>().unwrap();
                    for i in 0..n {
                        sum[i] += a[i] + b[i];
                    }
                }
                assert_eq!(got.to_vec::<f32>().unwrap(), sum, "rank {r} {name}");
                expect_squares += sum.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>();
            }
            // The kernel sums the squares in f32.
            assert!(
                (squares - expect_squares).abs() <= 1e-6 * expect_squares,
                "{squares} vs {expect_squares}"
            );
        }
        // Rank 2 misses p3, so the buckets holding p3 wait for its end.
        assert!(results[2].0 != results[0].0);
        assert_eq!(results[0].0.last(), Some(&buckets));
    }

    #[test]
    fn a_rank_that_fails_still_completes_every_exchange_then_reports_its_error() {
        let layout = two_parameters([0, 1], 2);
        let results = on_ranks(&layout, 8, |r, mut red| {
            // Rank 1's gradient of `a` has the wrong shape: its bucket cannot be packed.
            let shape: &[usize] = if r == 1 { &[5] } else { &[2, 3] };
            red.add("a", &grad(shape, r, 0, 0));
            red.add("b", &grad(&[4], r, 1, 0));
            red.ready("a");
            red.ready("b");
            red.finish()
        });
        let err = results[1].as_ref().expect_err("rank 1 failed").to_string();
        assert!(err.contains('a') && err.contains("[5]"), "{err}");
        // Rank 0 got its sums: its own gradient of `a` plus rank 1's zeros.
        let (mine, _) = results[0].as_ref().unwrap();
        assert_eq!(
            mine["a"].to_vec::<f32>().unwrap(),
            grad(&[2, 3], 0, 0, 0).to_vec::<f32>().unwrap()
        );
    }

    #[test]
    fn one_rank_keeps_its_gradients_and_fills_in_zeros() {
        let layout = two_parameters([0, 0], 1);
        let g = grad(&[2, 3], 0, 0, 0);
        let (out, squares) = on_ranks(&layout, 1 << 20, |_, mut red| {
            red.add("a", &g.to_dtype(DType::BF16).unwrap());
            red.ready("a");
            red.finish().unwrap()
        })
        .remove(0);
        let a = g.to_dtype(DType::BF16).unwrap().to_dtype(DType::F32).unwrap();
        assert_eq!(out["a"].dtype(), DType::F32);
        assert_eq!(out["a"].to_vec::<f32>().unwrap(), a.to_vec::<f32>().unwrap());
        assert_eq!(out["b"].to_vec::<f32>().unwrap(), vec![0.0; 4]);
        let expect: f64 = a
            .to_vec::<f32>()
            .unwrap()
            .iter()
            .map(|&v| f64::from(v).powi(2))
            .sum();
        assert!((squares - expect).abs() <= 1e-6 * expect);
    }
}
