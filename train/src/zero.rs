//! AdamW sharded across data-parallel ranks (ZeRO stage 1): each rank owns a share of the
//! trainable parameters, receives their summed gradients (a reduce-scatter over the
//! [`FlatLayout`]), keeps their moments and updates them alone on its device; the updated
//! parameters are then all-gathered so that every rank holds the whole model again. Moments are
//! saved one file per rank under the parameters' names, so a run can resume on any number of
//! ranks.

use crate::device_collective::DeviceCollective;
use crate::error::{io_err, Result, TrainError};
use crate::flat_layout::FlatLayout;
use crate::plan::BUCKET_BYTES;
use nn::{AdamW, AdamWConfig};
use std::collections::BTreeMap;
use std::path::Path;
use tensor::safetensors::SafetensorsFile;
use tensor::{DType, Device, Tensor};

/// Assigns each named parameter (with its element count) to a rank: largest first, each to the
/// rank with the fewest elements so far (ties: lowest rank, then name order). Deterministic.
pub fn partition(sizes: &BTreeMap<String, usize>, world: usize) -> BTreeMap<String, usize> {
    let mut order: Vec<(&String, usize)> = sizes.iter().map(|(k, &n)| (k, n)).collect();
    order.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let mut load = vec![0usize; world];
    let mut owner = BTreeMap::new();
    for (name, n) in order {
        let r = (0..world).min_by_key(|&r| (load[r], r)).unwrap_or(0);
        load[r] += n;
        owner.insert(name.clone(), r);
    }
    owner
}

/// This rank's share of a sharded AdamW: the f32 master weights of the parameters it owns (on
/// its device) and their moments. The other parameters exist on this rank only as compute
/// weights, refreshed from their owners' updates after every step.
pub struct ShardedAdamW {
    layout: FlatLayout,
    rank: usize,
    /// This rank's device, where the masters live and the exchanges run.
    device: Device,
    /// The owned parameters' f32 master weights, by name.
    masters: BTreeMap<String, Tensor>,
    opt: AdamW,
}

impl ShardedAdamW {
    /// The optimizer of `rank` over the `trainable` parameters (f32, by name, wherever they
    /// are), resumed from `moments` (this rank's, by name) after `step` steps. It keeps the owned
    /// parameters' master weights and their moments, moved to `device`, and drops its handles on
    /// the others. `ready` orders the exchanged buffers (see [`FlatLayout::new`]).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        trainable: BTreeMap<String, Tensor>,
        ready: &[String],
        device: Device,
        rank: usize,
        world: usize,
        config: AdamWConfig,
        step: u64,
        moments: BTreeMap<String, (Tensor, Tensor)>,
    ) -> Result<Self> {
        let sizes = trainable.iter().map(|(k, t)| (k.clone(), t.numel())).collect();
        let owner = partition(&sizes, world);
        let shapes = trainable
            .iter()
            .map(|(k, t)| (k.clone(), t.shape().to_vec()))
            .collect();
        let masters = trainable
            .into_iter()
            .filter(|(k, _)| owner.get(k) == Some(&rank))
            .map(|(k, t)| Ok((k, t.to_device(device)?)))
            .collect::<Result<_>>()?;
        let moments = moments
            .into_iter()
            .map(|(k, (m, v))| Ok((k, (m.to_device(device)?, v.to_device(device)?))))
            .collect::<Result<_>>()?;
        Ok(ShardedAdamW {
            layout: FlatLayout::new(&shapes, &owner, world, ready),
            rank,
            device,
            masters,
            opt: AdamW::resume(config, step, moments),
        })
    }

    /// Where each parameter sits in the buffers the ranks exchange.
    pub fn layout(&self) -> &FlatLayout {
        &self.layout
    }

    /// This rank's index.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The names this rank owns.
    pub fn owned(&self) -> impl Iterator<Item = &String> {
        self.masters.keys()
    }

    /// One update with learning rate `lr`: this rank steps its master weights with their summed
    /// gradients `grads` (its segment of the reduce-scatter, by name), in place on their device;
    /// then the compute weights of every trainable parameter in `weights` are refreshed in
    /// `compute` precision: the owned ones cast from their masters, the others all-gathered from
    /// their owners, one bucket of at most [`BUCKET_BYTES`] at a time.
    pub fn step(
        &mut self,
        exchange: &dyn DeviceCollective,
        weights: &mut BTreeMap<String, Tensor>,
        grads: &BTreeMap<String, Tensor>,
        lr: f64,
        compute: DType,
    ) -> Result<()> {
        self.opt.config.lr = lr;
        // The old compute weights go first: where they are the masters themselves (f32), the
        // optimizer then holds the only handles and updates them in their own memory.
        for k in self.masters.keys() {
            weights.remove(k);
        }
        let my_grads: BTreeMap<String, Tensor> = self
            .masters
            .keys()
            .filter_map(|k| grads.get(k).map(|g| (k.clone(), g.clone())))
            .collect();
        self.opt.step(&mut self.masters, &my_grads)?;
        if self.layout.world() == 1 {
            for (k, m) in &self.masters {
                weights.insert(k.clone(), m.to_dtype(compute)?);
            }
            return Ok(());
        }
        weights.extend(self.gather(exchange, compute, Some(self.device))?);
        Ok(())
    }

    /// Every trainable parameter's master weights, cast to `dtype`, gathered from their owners
    /// bucket by bucket through this rank's device (every rank must call it), each bucket moved
    /// to `into` (the host, for a checkpoint) or dropped when `into` is `None` (empty result).
    pub fn gather(
        &self,
        exchange: &dyn DeviceCollective,
        dtype: DType,
        into: Option<Device>,
    ) -> Result<BTreeMap<String, Tensor>> {
        let world = self.layout.world();
        let mut parts = Vec::new();
        for within in self.layout.buckets(BUCKET_BYTES) {
            let mine = self.layout.pack(
                self.rank..self.rank + 1,
                within.clone(),
                |k| self.masters.get(k).cloned(),
                dtype,
                self.device,
            )?;
            let all = if world == 1 {
                mine
            } else {
                exchange.all_gather(&mine)?
            };
            if let Some(into) = into {
                parts.extend(self.layout.unpack(&all.to_device(into)?, 0..world, within)?);
            }
        }
        self.layout.assemble(parts)
    }

    /// Writes this rank's moments to `path` (tensors `exp_avg.NAME` and `exp_avg_sq.NAME`).
    pub fn save(&self, path: &Path) -> Result<()> {
        let named: Vec<(String, &Tensor)> = self
            .opt
            .moments()
            .iter()
            .flat_map(|(k, (m, v))| {
                [
                    (format!("{}.{k}", MOMENTS[0]), m),
                    (format!("{}.{k}", MOMENTS[1]), v),
                ]
            })
            .collect();
        let refs: Vec<(&str, &Tensor)> = named.iter().map(|(k, t)| (k.as_str(), *t)).collect();
        tensor::safetensors::save(path, &refs, None)?;
        Ok(())
    }
}

/// The `optimizer-rank*.safetensors` files of checkpoint `dir`, whatever number of ranks wrote
/// them, opened (their headers read and checked against their sizes; no tensor data read).
fn open_shards(dir: &Path) -> Result<Vec<SafetensorsFile>> {
    let mut shards = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let path = entry.map_err(io_err(dir))?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if name.starts_with("optimizer-rank") && name.ends_with(".safetensors") {
            shards.push(SafetensorsFile::open(&path)?);
        }
    }
    Ok(shards)
}

/// The shard holding optimizer tensor `{prefix}.{name}`, checked to have the shape of the
/// parameter `name` of `trainable`.
fn find_moment<'a>(
    dir: &Path,
    shards: &'a [SafetensorsFile],
    trainable: &BTreeMap<String, Tensor>,
    prefix: &str,
    name: &str,
) -> Result<(&'a SafetensorsFile, String)> {
    let key = format!("{prefix}.{name}");
    let fail = |detail: String| TrainError::Checkpoint {
        path: dir.to_owned(),
        detail,
    };
    let shard = shards
        .iter()
        .find(|f| f.info(&key).is_ok())
        .ok_or_else(|| fail(format!("no optimizer tensor {key}")))?;
    let shape = &shard.info(&key)?.shape;
    if shape.as_slice() != trainable[name].shape() {
        return Err(fail(format!(
            "optimizer tensor {key} has shape {shape:?}, the parameter {:?}",
            trainable[name].shape()
        )));
    }
    Ok((shard, key))
}

/// The moments of both kinds, in the order they are saved and loaded.
const MOMENTS: [&str; 2] = ["exp_avg", "exp_avg_sq"];

/// Checks from the files' headers alone that `dir`'s optimizer shards hold both moments of every
/// parameter of `trainable`, with its shape: what [`load_moments`] will read, on any number of
/// ranks.
pub fn check_moments(dir: &Path, trainable: &BTreeMap<String, Tensor>) -> Result<()> {
    let shards = open_shards(dir)?;
    for name in trainable.keys() {
        for prefix in MOMENTS {
            find_moment(dir, &shards, trainable, prefix, name)?;
        }
    }
    Ok(())
}

/// The moments of the parameters `rank` owns among `trainable` (for `world` ranks), read from
/// the `optimizer-rank*.safetensors` files in `dir`, whatever number of ranks wrote them; only
/// the owned tensors are read. Each owned parameter must have both moments, with its shape.
pub fn load_moments(
    dir: &Path,
    trainable: &BTreeMap<String, Tensor>,
    rank: usize,
    world: usize,
) -> Result<BTreeMap<String, (Tensor, Tensor)>> {
    let shards = open_shards(dir)?;
    let sizes = trainable.iter().map(|(k, t)| (k.clone(), t.numel())).collect();
    let owner = partition(&sizes, world);
    let mut moments = BTreeMap::new();
    for (name, _) in owner.iter().filter(|(_, &r)| r == rank) {
        let [m, v] = MOMENTS.map(|prefix| {
            let (shard, key) = find_moment(dir, &shards, trainable, prefix, name)?;
            Ok::<_, TrainError>(shard.get(&key)?)
        });
        moments.insert(name.clone(), (m?, v?));
    }
    Ok(moments)
}

#[cfg(test)]
mod tests {
    use super::{partition, ShardedAdamW};
    use crate::collective::ThreadGroup;
    use crate::device_collective::HostStaged;
    use nn::AdamWConfig;
    use std::collections::BTreeMap;
    use tensor::{DType, Device, Tensor};

    #[test]
    fn each_rank_keeps_only_its_masters_and_the_step_refreshes_every_weight() {
        let names = [("a", 5usize), ("b", 3), ("c", 2)];
        let trainable: BTreeMap<String, Tensor> = names
            .iter()
            .map(|&(k, n)| (k.to_owned(), Tensor::from_slice(&vec![1.0f32; n], &[n]).unwrap()))
            .collect();
        let ranks = ThreadGroup::new(2);
        // Per rank: the names it owns, and every weight's values after the step.
        type Outcome = (Vec<String>, BTreeMap<String, Vec<f64>>);
        let results: Vec<Outcome> = std::thread::scope(|s| {
            let handles: Vec<_> = ranks
                .iter()
                .enumerate()
                .map(|(r, g)| {
                    let trainable = trainable.clone();
                    s.spawn(move || {
                        let weights: BTreeMap<String, Tensor> = trainable
                            .iter()
                            .map(|(k, t)| (k.clone(), t.to_dtype(DType::BF16).unwrap()))
                            .collect();
                        let config = AdamWConfig::default();
                        let mut opt =
                            ShardedAdamW::new(trainable, &[], Device::Cpu, r, 2, config, 0, BTreeMap::new())
                                .unwrap();
                        let owned: Vec<String> = opt.owned().cloned().collect();
                        // Each rank holds the summed gradients of its own parameters only.
                        let grads = owned
                            .iter()
                            .map(|k| {
                                let n = weights[k].numel();
                                (k.clone(), Tensor::from_slice(&vec![1.0f32; n], &[n]).unwrap())
                            })
                            .collect();
                        let mut weights = weights;
                        opt.step(&HostStaged(g), &mut weights, &grads, 0.25, DType::BF16)
                            .unwrap();
                        let after = weights
                            .iter()
                            .map(|(k, t)| {
                                assert_eq!(t.dtype(), DType::BF16, "{k}");
                                (k.clone(), t.to_vec_f64())
                            })
                            .collect();
                        (owned, after)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        // The shards split the parameters; every rank ends with every weight, stepped by its owner.
        let (mut all, theirs) = (results[0].0.clone(), results[1].0.clone());
        assert!(!all.is_empty() && !theirs.is_empty());
        all.extend(theirs);
        all.sort();
        assert_eq!(all, vec!["a", "b", "c"]);
        assert_eq!(results[0].1, results[1].1);
        for values in results[0].1.values() {
            assert!(values.iter().all(|&v| v < 1.0), "{values:?}");
        }
    }

    #[test]
    fn partition_balances_elements_and_covers_every_parameter() {
        let sizes: BTreeMap<String, usize> = [("a", 100), ("b", 60), ("c", 50), ("d", 10), ("e", 1)]
            .into_iter()
            .map(|(k, n)| (k.to_owned(), n))
            .collect();
        let owner = partition(&sizes, 2);
        assert_eq!(owner.len(), 5);
        let load = |r| {
            sizes
                .iter()
                .filter(|(k, _)| owner[*k] == r)
                .map(|(_, n)| n)
                .sum::<usize>()
        };
        assert_eq!((load(0), load(1)), (111, 110));
        assert!(partition(&sizes, 1).values().all(|&r| r == 0));
    }
}
