//! Shapes, strides and offsets: how a tensor's logical indices map into its storage.

use crate::error::{range_err, shape_err, Result};

/// Number of elements of a shape (1 for a scalar).
pub fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// Row-major strides of a shape.
pub fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![0; shape.len()];
    let mut s = 1;
    for (d, &n) in shape.iter().enumerate().rev() {
        strides[d] = s;
        s *= n;
    }
    strides
}

/// The numpy broadcast of two shapes, or an error naming both.
pub fn broadcast_shapes(op: &'static str, a: &[usize], b: &[usize]) -> Result<Vec<usize>> {
    let rank = a.len().max(b.len());
    let mut out = vec![0; rank];
    for i in 0..rank {
        let da = if i + a.len() >= rank {
            a[i + a.len() - rank]
        } else {
            1
        };
        let db = if i + b.len() >= rank {
            b[i + b.len() - rank]
        } else {
            1
        };
        out[i] = match (da, db) {
            (x, y) if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            _ => return shape_err(op, format!("cannot broadcast {a:?} with {b:?}")),
        };
    }
    Ok(out)
}

/// Resolves a possibly negative axis against a rank.
pub fn resolve_axis(op: &'static str, axis: isize, rank: usize) -> Result<usize> {
    let r = rank as isize;
    let a = if axis < 0 { axis + r } else { axis };
    if a < 0 || a >= r {
        return range_err(op, format!("axis {axis} out of range for rank {rank}"));
    }
    Ok(a as usize)
}

/// A strided view: logical shape, per-axis strides (in elements) and a start offset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    shape: Vec<usize>,
    strides: Vec<usize>,
    offset: usize,
}

impl Layout {
    /// The row-major layout of `shape` starting at offset 0.
    pub fn contiguous(shape: &[usize]) -> Self {
        Layout {
            shape: shape.to_vec(),
            strides: contiguous_strides(shape),
            offset: 0,
        }
    }

    /// A layout from its parts; the caller keeps every index inside the storage.
    pub fn from_parts(shape: Vec<usize>, strides: Vec<usize>, offset: usize) -> Self {
        assert_eq!(shape.len(), strides.len(), "one stride per axis");
        Layout {
            shape,
            strides,
            offset,
        }
    }

    /// The logical shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Strides in elements.
    pub fn strides(&self) -> &[usize] {
        &self.strides
    }

    /// Offset of element [0, 0, ...] in the storage.
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// Number of axes.
    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        numel(&self.shape)
    }

    /// Whether elements are laid out row-major without gaps (size-1 axes are ignored).
    pub fn is_contiguous(&self) -> bool {
        let mut expected = 1;
        for (&n, &s) in self.shape.iter().zip(&self.strides).rev() {
            if n != 1 && s != expected {
                return false;
            }
            expected *= n;
        }
        true
    }

    /// Reorders the axes: axis `i` of the result is axis `perm[i]` of `self`.
    pub fn permute(&self, perm: &[usize]) -> Result<Self> {
        let mut seen = vec![false; self.rank()];
        if perm.len() != self.rank()
            || perm
                .iter()
                .any(|&p| p >= self.rank() || std::mem::replace(&mut seen[p], true))
        {
            return shape_err(
                "permute",
                format!("{perm:?} is not a permutation of the axes of {:?}", self.shape),
            );
        }
        Ok(Layout {
            shape: perm.iter().map(|&p| self.shape[p]).collect(),
            strides: perm.iter().map(|&p| self.strides[p]).collect(),
            offset: self.offset,
        })
    }

    /// Swaps two axes.
    pub fn transpose(&self, a: usize, b: usize) -> Result<Self> {
        if a >= self.rank() || b >= self.rank() {
            return range_err(
                "transpose",
                format!("axes ({a}, {b}) out of range for shape {:?}", self.shape),
            );
        }
        let mut perm: Vec<usize> = (0..self.rank()).collect();
        perm.swap(a, b);
        self.permute(&perm)
    }

    /// The sub-range `start..start+len` of axis `axis`.
    pub fn narrow(&self, axis: usize, start: usize, len: usize) -> Result<Self> {
        if axis >= self.rank() || start.saturating_add(len) > self.shape[axis] {
            return range_err(
                "narrow",
                format!(
                    "axis {axis} range {start}..{} out of bounds for shape {:?}",
                    start.saturating_add(len),
                    self.shape
                ),
            );
        }
        let mut out = self.clone();
        out.offset += start * self.strides[axis];
        out.shape[axis] = len;
        Ok(out)
    }

    /// Broadcasts to `shape` (numpy rules) with zero strides on repeated axes.
    pub fn broadcast_to(&self, shape: &[usize]) -> Result<Self> {
        if shape.len() < self.rank() {
            return shape_err(
                "broadcast_to",
                format!("cannot broadcast {:?} to {shape:?}", self.shape),
            );
        }
        let lead = shape.len() - self.rank();
        let mut strides = vec![0; shape.len()];
        for (i, &n) in shape.iter().enumerate().skip(lead) {
            let (m, s) = (self.shape[i - lead], self.strides[i - lead]);
            strides[i] = match m {
                _ if m == n => s,
                1 => 0,
                _ => {
                    return shape_err(
                        "broadcast_to",
                        format!("cannot broadcast {:?} to {shape:?}", self.shape),
                    )
                }
            };
        }
        Ok(Layout {
            shape: shape.to_vec(),
            strides,
            offset: self.offset,
        })
    }

    /// A new shape over the same contiguous elements; `None` when `self` is not contiguous.
    pub fn reshape(&self, shape: &[usize]) -> Option<Self> {
        if !self.is_contiguous() {
            return None;
        }
        Some(Layout {
            offset: self.offset,
            ..Layout::contiguous(shape)
        })
    }

    /// Storage offset of the element at a multi-index.
    pub fn offset_of(&self, index: &[usize]) -> usize {
        self.offset + index.iter().zip(&self.strides).map(|(i, s)| i * s).sum::<usize>()
    }

    /// Storage offsets of elements `start..start+len` in row-major logical order.
    pub fn offsets_from(&self, start: usize, len: usize) -> StridedOffsets<'_> {
        let mut index = vec![0; self.rank()];
        let mut rem = start;
        for d in (0..self.rank()).rev() {
            index[d] = rem % self.shape[d].max(1);
            rem /= self.shape[d].max(1);
        }
        let offset = self.offset_of(&index);
        StridedOffsets {
            layout: self,
            index,
            offset,
            remaining: len,
        }
    }

    /// Storage offsets of all elements in row-major logical order.
    pub fn offsets(&self) -> StridedOffsets<'_> {
        self.offsets_from(0, self.numel())
    }
}

/// Iterator over the storage offsets of a strided view (an odometer over the multi-index).
pub struct StridedOffsets<'a> {
    layout: &'a Layout,
    index: Vec<usize>,
    offset: usize,
    remaining: usize,
}

impl StridedOffsets<'_> {
    /// The next elements up to the end of the current run along the last axis, as the storage
    /// offset of the first and their count (the offsets then step by the last axis's stride).
    /// Consumes them, so that runs and single offsets can be mixed.
    pub fn next_run(&mut self) -> Option<(usize, usize)> {
        if self.remaining == 0 {
            return None;
        }
        let current = self.offset;
        let Some(last) = self.index.len().checked_sub(1) else {
            self.remaining = 0; // a scalar: its one element
            return Some((current, 1));
        };
        let count = (self.layout.shape[last] - self.index[last]).min(self.remaining);
        self.remaining -= count;
        self.index[last] += count - 1;
        self.offset += self.layout.strides[last] * (count - 1);
        self.advance();
        Some((current, count))
    }

    /// Moves the multi-index and offset one element on, in row-major order.
    fn advance(&mut self) {
        for d in (0..self.index.len()).rev() {
            self.index[d] += 1;
            self.offset += self.layout.strides[d];
            if self.index[d] < self.layout.shape[d] {
                break;
            }
            self.offset -= self.layout.strides[d] * self.index[d];
            self.index[d] = 0;
        }
    }
}

impl Iterator for StridedOffsets<'_> {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        if self.remaining == 0 {
            return None;
        }
        self.remaining -= 1;
        let current = self.offset;
        self.advance();
        Some(current)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.remaining, Some(self.remaining))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_tile_the_offsets_from_any_start() {
        let l = Layout::contiguous(&[3, 4, 5]).permute(&[2, 0, 1]).unwrap();
        let all: Vec<usize> = l.offsets().collect();
        for start in 0..all.len() {
            for len in 0..=all.len() - start {
                let mut runs = l.offsets_from(start, len);
                let mut got = Vec::new();
                while let Some((first, count)) = runs.next_run() {
                    assert!((1..=4).contains(&count), "a run stays within the last axis");
                    got.extend((0..count).map(|j| first + j * l.strides()[2]));
                }
                assert_eq!(got, all[start..start + len]);
            }
        }
        let scalar = Layout::contiguous(&[]);
        assert_eq!(scalar.offsets().next_run(), Some((0, 1)));
    }

    #[test]
    fn offsets_of_a_transposed_view() {
        let l = Layout::contiguous(&[2, 3]).transpose(0, 1).unwrap();
        assert_eq!(l.offsets().collect::<Vec<_>>(), vec![0, 3, 1, 4, 2, 5]);
        assert_eq!(l.offsets_from(3, 3).collect::<Vec<_>>(), vec![4, 2, 5]);
    }

    #[test]
    fn broadcast_rules() {
        assert_eq!(broadcast_shapes("t", &[3, 1], &[4]).unwrap(), vec![3, 4]);
        assert!(broadcast_shapes("t", &[3], &[4]).is_err());
        let l = Layout::contiguous(&[3, 1]).broadcast_to(&[2, 3, 4]).unwrap();
        assert_eq!(l.strides(), &[0, 1, 0]);
    }
}
