//! Strided views of device buffers and their packing into kernel arguments. Before packing,
//! axes of length 1 are dropped and axes that are contiguous with their neighbour (in every
//! operand at once) are merged, so that kernels see at most [`MAX_DIMS`] axes and do as little
//! index arithmetic as the layout allows.

use crate::error::{CudaError, Result};

/// Most axes a strided operand may have after merging (`MAX_DIMS` in common.cuh).
pub const MAX_DIMS: usize = 6;

/// A strided view of a buffer: element `idx` (a multi-index into `shape`) lives at
/// `offset + Σ idx[d] · strides[d]`, all in elements.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct View {
    /// The logical shape.
    pub shape: Vec<usize>,
    /// Strides in elements, one per axis.
    pub strides: Vec<usize>,
    /// Position of the first element in the buffer.
    pub offset: usize,
}

impl View {
    /// The row-major contiguous view of `shape` at offset 0.
    pub fn contiguous(shape: &[usize]) -> View {
        let mut strides = vec![0; shape.len()];
        let mut acc = 1;
        for d in (0..shape.len()).rev() {
            strides[d] = acc;
            acc *= shape[d];
        }
        View {
            shape: shape.to_vec(),
            strides,
            offset: 0,
        }
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// One past the largest buffer position the view touches (0 when it is empty).
    pub fn extent(&self) -> usize {
        if self.numel() == 0 {
            return 0;
        }
        self.offset
            + self
                .shape
                .iter()
                .zip(&self.strides)
                .map(|(&n, &s)| (n - 1) * s)
                .sum::<usize>()
            + 1
    }

    /// Errors unless the view is well formed and fits in `len` elements.
    pub(crate) fn check(&self, op: &'static str, len: usize) -> Result<()> {
        if self.shape.len() != self.strides.len() {
            return Err(CudaError::shape(
                op,
                format!("view shape {:?} vs strides {:?}", self.shape, self.strides),
            ));
        }
        if self.extent() > len {
            return Err(CudaError::shape(
                op,
                format!(
                    "view {:?} strides {:?} offset {} reaches element {} of a buffer of {len}",
                    self.shape,
                    self.strides,
                    self.offset,
                    self.extent() - 1
                ),
            ));
        }
        Ok(())
    }
}

/// `Strided` in common.cuh.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct StridedArg {
    ndim: i32,
    pad: i32,
    shape: [i64; MAX_DIMS],
    stride: [i64; MAX_DIMS],
}

/// `Broadcast` in common.cuh (up to three operands).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct BroadcastArg {
    ndim: i32,
    pad: i32,
    shape: [i64; MAX_DIMS],
    stride: [[i64; MAX_DIMS]; 3],
}

/// Drops axes of length 1 and merges each axis into the previous one when, for every operand,
/// the previous stride equals this stride times this length. Returns the shape and each
/// operand's strides; a scalar becomes one axis of length 1.
fn coalesce(shape: &[usize], strides: &[Vec<usize>]) -> (Vec<usize>, Vec<Vec<usize>>) {
    let mut out_shape: Vec<usize> = Vec::new();
    let mut out_strides: Vec<Vec<usize>> = vec![Vec::new(); strides.len()];
    for (d, &n) in shape.iter().enumerate() {
        if n == 1 {
            continue;
        }
        let mergeable = !out_shape.is_empty()
            && strides
                .iter()
                .zip(&out_strides)
                .all(|(s, o)| o.last() == Some(&(s[d] * n)));
        if mergeable {
            *out_shape.last_mut().expect("non-empty") *= n;
            for (s, o) in strides.iter().zip(out_strides.iter_mut()) {
                *o.last_mut().expect("non-empty") = s[d];
            }
        } else {
            out_shape.push(n);
            for (s, o) in strides.iter().zip(out_strides.iter_mut()) {
                o.push(s[d]);
            }
        }
    }
    if out_shape.is_empty() {
        out_shape.push(1);
        out_strides.iter_mut().for_each(|o| o.push(0));
    }
    (out_shape, out_strides)
}

/// Errors when more than [`MAX_DIMS`] axes remain.
fn check_rank(op: &'static str, shape: &[usize], original: &[usize]) -> Result<()> {
    if shape.len() > MAX_DIMS {
        return Err(CudaError::shape(
            op,
            format!(
                "{original:?} has {} non-mergeable axes, at most {MAX_DIMS} supported",
                shape.len()
            ),
        ));
    }
    Ok(())
}

/// Packs one view (its offset is applied to the pointer by the caller).
pub(crate) fn strided_arg(op: &'static str, view: &View) -> Result<StridedArg> {
    let (shape, strides) = coalesce(&view.shape, std::slice::from_ref(&view.strides));
    check_rank(op, &shape, &view.shape)?;
    let mut arg = StridedArg {
        ndim: shape.len() as i32,
        pad: 0,
        shape: [1; MAX_DIMS],
        stride: [0; MAX_DIMS],
    };
    for (d, (&n, &s)) in shape.iter().zip(&strides[0]).enumerate() {
        arg.shape[d] = n as i64;
        arg.stride[d] = s as i64;
    }
    Ok(arg)
}

/// Strides of `view` broadcast to `out` (numpy rules: aligned on the right, length-1 and
/// missing axes get stride 0).
fn broadcast_strides(op: &'static str, view: &View, out: &[usize]) -> Result<Vec<usize>> {
    let lead = out
        .len()
        .checked_sub(view.shape.len())
        .ok_or_else(|| CudaError::shape(op, format!("{:?} has more axes than {out:?}", view.shape)))?;
    let mut strides = vec![0; out.len()];
    for (j, (&n, &s)) in view.shape.iter().zip(&view.strides).enumerate() {
        let target = out[lead + j];
        if n == target {
            strides[lead + j] = s;
        } else if n != 1 {
            return Err(CudaError::shape(
                op,
                format!("{:?} does not broadcast to {out:?}", view.shape),
            ));
        }
    }
    Ok(strides)
}

/// Packs up to three views broadcast to the output shape `out`.
pub(crate) fn broadcast_arg(op: &'static str, out: &[usize], views: &[&View]) -> Result<BroadcastArg> {
    let strides: Vec<Vec<usize>> = views
        .iter()
        .map(|v| broadcast_strides(op, v, out))
        .collect::<Result<_>>()?;
    let (shape, strides) = coalesce(out, &strides);
    check_rank(op, &shape, out)?;
    let mut arg = BroadcastArg {
        ndim: shape.len() as i32,
        pad: 0,
        shape: [1; MAX_DIMS],
        stride: [[0; MAX_DIMS]; 3],
    };
    for (d, &n) in shape.iter().enumerate() {
        arg.shape[d] = n as i64;
        for (k, s) in strides.iter().enumerate() {
            arg.stride[k][d] = s[d] as i64;
        }
    }
    Ok(arg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contiguous_views_collapse_to_one_axis() {
        let v = View::contiguous(&[2, 3, 4]);
        assert_eq!(v.strides, vec![12, 4, 1]);
        assert_eq!((v.numel(), v.extent()), (24, 24));
        let a = strided_arg("t", &v).unwrap();
        assert_eq!((a.ndim, a.shape[0], a.stride[0]), (1, 24, 1));
    }

    #[test]
    fn transposes_keep_their_axes() {
        // [3, 4] transposed: shape [4, 3], strides [1, 4].
        let v = View {
            shape: vec![4, 3],
            strides: vec![1, 4],
            offset: 2,
        };
        assert_eq!(v.extent(), 2 + 3 + 8 + 1);
        assert!(v.check("t", 14).is_ok());
        assert!(v.check("t", 13).is_err());
        let a = strided_arg("t", &v).unwrap();
        assert_eq!(
            (a.ndim, &a.shape[..2], &a.stride[..2]),
            (2, &[4i64, 3][..], &[1i64, 4][..])
        );
    }

    #[test]
    fn broadcasting_gives_zero_strides_and_merges_across_operands() {
        // a [2, 3, 4] contiguous + b [4] (a row broadcast over the first two axes).
        let a = View::contiguous(&[2, 3, 4]);
        let b = View::contiguous(&[4]);
        let arg = broadcast_arg("t", &[2, 3, 4], &[&a, &b]).unwrap();
        assert_eq!(arg.ndim, 2);
        assert_eq!(&arg.shape[..2], &[6, 4]);
        assert_eq!(&arg.stride[0][..2], &[4, 1]);
        assert_eq!(&arg.stride[1][..2], &[0, 1]);
        // A column [2, 3, 1] does not merge with the last axis.
        let c = View::contiguous(&[2, 3, 1]);
        let arg = broadcast_arg("t", &[2, 3, 4], &[&a, &c]).unwrap();
        assert_eq!(&arg.shape[..2], &[6, 4]);
        assert_eq!(&arg.stride[1][..2], &[1, 0]);
        assert!(broadcast_arg("t", &[2, 3, 4], &[&View::contiguous(&[3, 3])]).is_err());
        assert!(broadcast_arg("t", &[4], &[&View::contiguous(&[2, 4])]).is_err());
    }

    #[test]
    fn scalars_and_too_many_axes() {
        let s = View::contiguous(&[]);
        let a = strided_arg("t", &s).unwrap();
        assert_eq!((a.ndim, a.shape[0]), (1, 1));
        // Seven axes that cannot merge: every other axis reversed.
        let v = View {
            shape: vec![2; 7],
            strides: vec![1, 2, 4, 8, 16, 32, 64],
            offset: 0,
        };
        assert!(strided_arg("t", &v).is_err());
    }
}
