//! Where each trainable parameter sits in the flat buffers sharded training exchanges: rank 0's
//! parameters first, then rank 1's, and so on, each rank's run padded with zeros to the longest
//! (the segment), so that rank r's parameters are segment r of a `[world × segment]` buffer.
//! The gradients are reduce-scattered over this layout (each rank receives the summed
//! gradients of the parameters it updates) and the updated weights all-gathered over it.
//! Within a segment the parameters follow the order in which the backward pass finishes their
//! gradients, so that the first buckets fill first and their exchange can start while the
//! backward pass goes on.

use crate::error::{Result, TrainError};
use std::collections::BTreeMap;
use std::ops::Range;
use tensor::{DType, Device, Tensor};

/// One parameter's place in the layout.
struct Entry {
    name: String,
    shape: Vec<usize>,
    rank: usize,
    /// Its first element's offset within its rank's segment.
    offset: usize,
}

/// The flat layout of the trainable parameters over the ranks.
pub struct FlatLayout {
    /// In layout order: by rank, then in the order their gradients are ready.
    entries: Vec<Entry>,
    segment: usize,
    world: usize,
}

impl FlatLayout {
    /// The layout of the parameters `shapes` (by name) owned as `owner` says, over `world`
    /// ranks, each rank's in the order of `ready` (names in the order the backward pass finishes
    /// their gradients; any it lacks go last, by name).
    pub fn new(
        shapes: &BTreeMap<String, Vec<usize>>,
        owner: &BTreeMap<String, usize>,
        world: usize,
        ready: &[String],
    ) -> Self {
        let rank_in_ready: BTreeMap<&str, usize> =
            ready.iter().enumerate().map(|(i, k)| (k.as_str(), i)).collect();
        let mut order: Vec<(&String, &Vec<usize>)> = shapes.iter().collect();
        order.sort_by_key(|(k, _)| rank_in_ready.get(k.as_str()).copied().unwrap_or(usize::MAX));
        let mut segment = 0;
        let mut entries = Vec::new();
        for rank in 0..world {
            let mut used = 0;
            for &(name, shape) in order.iter().filter(|(k, _)| owner.get(*k) == Some(&rank)) {
                entries.push(Entry {
                    name: name.clone(),
                    shape: shape.clone(),
                    rank,
                    offset: used,
                });
                used += shape.iter().product::<usize>();
            }
            segment = segment.max(used);
        }
        FlatLayout {
            entries,
            segment,
            world,
        }
    }

    /// Elements per rank's segment.
    pub fn segment(&self) -> usize {
        self.segment
    }

    /// The segment cut into buckets: ranges of offsets whose f32 values over all ranks take at
    /// most `bytes` (at least one element each).
    pub fn buckets(&self, bytes: usize) -> Vec<Range<usize>> {
        let width = (bytes / 4 / self.world.max(1)).max(1);
        (0..self.segment)
            .step_by(width)
            .map(|lo| lo..(lo + width).min(self.segment))
            .collect()
    }

    /// The parameters of every rank with values at offsets `within` of their segment.
    pub fn names_in(&self, within: Range<usize>) -> impl Iterator<Item = &str> {
        (0..self.world)
            .flat_map(move |rank| self.parts(rank, within.clone()).map(|(e, _, _)| e.name.as_str()))
    }

    /// Every parameter's name and shape, in layout order.
    pub fn shapes(&self) -> impl Iterator<Item = (&str, &[usize])> {
        self.entries.iter().map(|e| (e.name.as_str(), e.shape.as_slice()))
    }

    /// The parts of rank `rank`'s parameters that fall in `within` (offsets in its segment), in
    /// layout order: the entry, the part's first element in the parameter and its length.
    fn parts(&self, rank: usize, within: Range<usize>) -> impl Iterator<Item = (&Entry, usize, usize)> {
        self.entries
            .iter()
            .filter(move |e| e.rank == rank)
            .filter_map(move |e| {
                let n = e.shape.iter().product::<usize>();
                let (lo, hi) = (within.start.max(e.offset), within.end.min(e.offset + n));
                (lo < hi).then(|| (e, lo - e.offset, hi - lo))
            })
    }

    /// Offsets `within` of each of `ranks`' segments, one after another, as one 1-D tensor of
    /// `dtype` on `device` (`within.len()` elements per rank): the parameters' values from
    /// `value(name)` (zeros where it gives none), zeros where the segment is padding or past its
    /// end.
    pub fn pack(
        &self,
        ranks: Range<usize>,
        within: Range<usize>,
        mut value: impl FnMut(&str) -> Option<Tensor>,
        dtype: DType,
        device: Device,
    ) -> Result<Tensor> {
        let mut parts = Vec::new();
        for rank in ranks {
            let mut used = 0;
            for (e, start, len) in self.parts(rank, within.clone()) {
                let n = e.shape.iter().product::<usize>();
                let part = match value(&e.name) {
                    Some(t) if t.shape() == e.shape.as_slice() => {
                        t.to_dtype(dtype)?.reshape(&[n])?.narrow(0, start, len)?
                    }
                    Some(t) => {
                        return Err(TrainError::Options(format!(
                            "{} has shape {:?}, the layout {:?}",
                            e.name,
                            t.shape(),
                            e.shape
                        )))
                    }
                    None => Tensor::zeros_on(&[len], dtype, device)?,
                };
                parts.push(part);
                used += len;
            }
            if used < within.len() {
                parts.push(Tensor::zeros_on(&[within.len() - used], dtype, device)?);
            }
        }
        if parts.is_empty() {
            return Ok(Tensor::zeros_on(&[0], dtype, device)?);
        }
        let refs: Vec<&Tensor> = parts.iter().collect();
        Ok(Tensor::concat(&refs, 0)?)
    }

    /// The inverse of [`FlatLayout::pack`]: the parameters' parts cut from `flat` (offsets
    /// `within` of each of `ranks`' segments, one after another), as (name, 1-D part) in layout
    /// order; [`FlatLayout::assemble`] joins them.
    pub fn unpack(
        &self,
        flat: &Tensor,
        ranks: Range<usize>,
        within: Range<usize>,
    ) -> Result<Vec<(String, Tensor)>> {
        let width = within.len();
        if flat.shape() != [width * ranks.len()] {
            return Err(TrainError::Options(format!(
                "a flat buffer of shape {:?} for {} piece(s) of {width}",
                flat.shape(),
                ranks.len()
            )));
        }
        let first = ranks.start;
        let mut out = Vec::new();
        for rank in ranks {
            for (e, start, len) in self.parts(rank, within.clone()) {
                let at = (rank - first) * width + e.offset + start - within.start;
                out.push((e.name.clone(), flat.narrow(0, at, len)?.contiguous()));
            }
        }
        Ok(out)
    }

    /// Whole parameters, by name and in their shapes, from their parts in order (as
    /// [`FlatLayout::unpack`] gives them, bucket after bucket).
    pub fn assemble(&self, parts: Vec<(String, Tensor)>) -> Result<BTreeMap<String, Tensor>> {
        let mut pieces: BTreeMap<String, Vec<Tensor>> = BTreeMap::new();
        for (name, t) in parts {
            pieces.entry(name).or_default().push(t);
        }
        let mut out = BTreeMap::new();
        for e in &self.entries {
            let Some(parts) = pieces.remove(&e.name) else {
                continue;
            };
            let refs: Vec<&Tensor> = parts.iter().collect();
            let whole = match refs.as_slice() {
                [one] => (*one).clone(),
                _ => Tensor::concat(&refs, 0)?,
            };
            let t = whole.reshape(&e.shape).map_err(|_| {
                TrainError::Options(format!(
                    "{}: parts of {} values for shape {:?}",
                    e.name,
                    whole.numel(),
                    e.shape
                ))
            })?;
            out.insert(e.name.clone(), t);
        }
        Ok(out)
    }

    /// The number of ranks.
    pub fn world(&self) -> usize {
        self.world
    }
}

#[cfg(test)]
mod tests {
    use super::FlatLayout;
    use std::collections::BTreeMap;
    use tensor::{DType, Device, Tensor};

    #[test]
    fn packing_and_unpacking_round_trip_in_buckets_with_padded_segments() {
        let shapes: BTreeMap<String, Vec<usize>> = [("a", vec![2, 3]), ("b", vec![4]), ("c", vec![1])]
            .into_iter()
            .map(|(k, s)| (k.to_owned(), s))
            .collect();
        let owner: BTreeMap<String, usize> = [("a", 0), ("b", 1), ("c", 1)]
            .into_iter()
            .map(|(k, r)| (k.to_owned(), r))
            .collect();
        let layout = FlatLayout::new(&shapes, &owner, 2, &[]);
        assert_eq!(layout.segment(), 6);
        let value = |name: &str| {
            let n: usize = shapes[name].iter().product();
            let base = name.as_bytes()[0] as f32;
            let v: Vec<f32> = (0..n).map(|i| base + i as f32 / 10.0).collect();
            Some(Tensor::from_slice(&v, &shapes[name]).unwrap())
        };
        let flat = layout.pack(0..2, 0..6, value, DType::F32, Device::Cpu).unwrap();
        let got = flat.to_vec::<f32>().unwrap();
        // a (6 values), then b (4), c (1) and one padding zero.
        assert_eq!(got.len(), 12);
        assert_eq!(got[6..].to_vec(), vec![98.0, 98.1, 98.2, 98.3, 99.0, 0.0]);
        let whole = layout
            .assemble(layout.unpack(&flat, 0..2, 0..6).unwrap())
            .unwrap();
        // Buckets of 4 cut a and b and leave 2 + 2 padding values at the end.
        let mut parts = Vec::new();
        for lo in (0..6).step_by(4) {
            let hi = (lo + 4).min(6);
            let bucket = layout.pack(0..2, lo..hi, value, DType::F32, Device::Cpu).unwrap();
            assert_eq!(bucket.numel(), 2 * (hi - lo));
            parts.extend(layout.unpack(&bucket, 0..2, lo..hi).unwrap());
        }
        let bucketed = layout.assemble(parts).unwrap();
        for back in [&whole, &bucketed] {
            assert_eq!(back.len(), 3);
            for (k, t) in back {
                assert_eq!(t.shape(), shapes[k].as_slice());
                assert_eq!(
                    t.to_vec::<f32>().unwrap(),
                    value(k).unwrap().to_vec::<f32>().unwrap()
                );
            }
        }
        let second = layout.pack(1..2, 2..6, value, DType::F32, Device::Cpu).unwrap();
        assert_eq!(second.to_vec::<f32>().unwrap(), vec![98.2, 98.3, 99.0, 0.0]);
        let none = layout
            .pack(0..1, 0..6, |_| None, DType::F32, Device::Cpu)
            .unwrap();
        assert!(none.to_vec::<f32>().unwrap().iter().all(|&v| v == 0.0));
    }
}
