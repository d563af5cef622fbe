//! Small matrix products on the calling thread, for kernels that already run one task per
//! head or tile (fused attention, the SSD chunks): strided views in, the `gemm` crate without
//! its own threads.

use crate::Real;
use gemm::Parallelism;

/// A strided matrix: element (r, c) is `data[r * rs + c * cs]`.
#[derive(Clone, Copy)]
pub(crate) struct View<'a, A> {
    pub data: &'a [A],
    pub rs: usize,
    pub cs: usize,
}

/// A strided matrix view of `data`.
pub(crate) fn view<A>(data: &[A], rs: usize, cs: usize) -> View<'_, A> {
    View { data, rs, cs }
}

/// Whether a `rows x cols` matrix at strides (rs, cs) lies inside `len` elements.
fn fits(len: usize, (rows, cols): (usize, usize), rs: usize, cs: usize) -> bool {
    rows == 0 || cols == 0 || (rows - 1) * rs + (cols - 1) * cs < len
}

/// `dst = lhs · rhs` (or `dst += lhs · rhs` when `accumulate`), `lhs` `[m, k]`, `rhs` `[k, n]`,
/// `dst` `[m, n]` with rows `dst_rs` apart. Panics when a view reaches outside its slice.
pub(crate) fn matmul_into<A: Real>(
    dst: &mut [A],
    dst_rs: usize,
    (m, n, k): (usize, usize, usize),
    lhs: View<'_, A>,
    rhs: View<'_, A>,
    accumulate: bool,
) {
    assert!(
        fits(dst.len(), (m, n), dst_rs, 1)
            && fits(lhs.data.len(), (m, k), lhs.rs, lhs.cs)
            && fits(rhs.data.len(), (k, n), rhs.rs, rhs.cs),
        "a tile product reads or writes outside its buffers"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                dst[r * dst_rs..][..n].fill(A::zero());
            }
        }
        return;
    }
    // SAFETY: the assertion above keeps every element the product reads or writes inside its
    // slice; `dst` is borrowed mutably, so it overlaps neither operand.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            A::one(),
            A::one(),
            false,
            false,
            false,
            Parallelism::None,
        );
    }
}
