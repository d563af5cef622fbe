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
use tensor::{DType, Tensor};

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

/// This rank's share of a sharded AdamW.
pub struct ShardedAdamW {
    owner: BTreeMap<String, usize>,
    layout: FlatLayout,
    rank: usize,
    opt: AdamW,
}

impl ShardedAdamW {
    /// The optimizer of `rank` over the `trainable` parameters, resumed from `moments` (this
    /// rank's, by name) after `step` steps.
    pub fn new(
        trainable: &BTreeMap<String, Tensor>,
        rank: usize,
        world: usize,
        config: AdamWConfig,
        step: u64,
        moments: BTreeMap<String, (Tensor, Tensor)>,
    ) -> Self {
        let sizes = trainable.iter().map(|(k, t)| (k.clone(), t.numel())).collect();
        let owner = partition(&sizes, world);
        let shapes = trainable
            .iter()
            .map(|(k, t)| (k.clone(), t.shape().to_vec()))
            .collect();
        ShardedAdamW {
            layout: FlatLayout::new(&shapes, &owner, world),
            owner,
            rank,
            opt: AdamW::resume(config, step, moments),
        }
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
        self.owner.iter().filter(|(_, &r)| r == self.rank).map(|(k, _)| k)
    }

    /// One update with learning rate `lr`: this rank steps its own parameters with their
    /// summed gradients `grads` (its segment of the reduce-scatter, by name), in place on their
    /// device; then every rank's segment of updated f32 weights is all-gathered into `params`,
    /// one bucket of at most [`BUCKET_BYTES`] at a time.
    pub fn step(
        &mut self,
        exchange: &dyn DeviceCollective,
        params: &mut BTreeMap<String, Tensor>,
        grads: &BTreeMap<String, Tensor>,
        lr: f64,
    ) -> Result<()> {
        self.opt.config.lr = lr;
        let owned: Vec<String> = self.owned().cloned().collect();
        // Taken out of `params`, so that the optimizer holds the only handles on them and
        // updates them in their own memory.
        let mut mine: BTreeMap<String, Tensor> = owned
            .iter()
            .filter_map(|k| params.remove(k).map(|t| (k.clone(), t)))
            .collect();
        let my_grads: BTreeMap<String, Tensor> = owned
            .iter()
            .filter_map(|k| grads.get(k).map(|g| (k.clone(), g.clone())))
            .collect();
        let stepped = self.opt.step(&mut mine, &my_grads);
        params.extend(mine);
        stepped?;
        let world = self.layout.world();
        if world == 1 {
            // Nothing to gather: the updated weights stay where they are (on a GPU, there).
            return Ok(());
        }
        let Some(device) = params.values().next().map(Tensor::device) else {
            return Ok(());
        };
        let mut parts = Vec::new();
        for within in self.layout.buckets(BUCKET_BYTES) {
            let mine = self.layout.pack(
                self.rank..self.rank + 1,
                within.clone(),
                |k| params.get(k).cloned(),
                DType::F32,
                device,
            )?;
            let all = exchange.all_gather(&mine)?;
            let theirs = self.layout.unpack(&all, 0..world, within)?;
            parts.extend(
                theirs
                    .into_iter()
                    .filter(|(k, _)| self.owner.get(k) != Some(&self.rank)),
            );
        }
        params.extend(self.layout.assemble(parts)?);
        Ok(())
    }

    /// Steps taken.
    pub fn steps(&self) -> u64 {
        self.opt.steps()
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
    use super::partition;
    use std::collections::BTreeMap;

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
