//! cuBLAS and cuBLASLt on the emulated device: the column-major call the real libraries get
//! (transposes, leading dimensions, batch strides, alpha and beta, the bias epilogue), checked
//! as cuBLAS checks it and against the live buffers, then computed with the CPU GEMM in f32 and
//! rounded once to the operands' type. With `beta == 0` C is not read, as in cuBLAS.

use super::memory::LiveBuffers;
use crate::device::DType;
use crate::error::{CudaError, Result};
use crate::gemm::BlasCall;
use half::{bf16, f16};

/// Element `i` of a `dtype` array at `ptr`, widened to f32.
///
/// # Safety
/// `ptr` must address at least `i + 1` elements of `dtype`.
unsafe fn load(ptr: u64, i: usize, dtype: DType) -> f32 {
    // SAFETY: as the caller promises.
    unsafe {
        match dtype {
            DType::F32 => *(ptr as *const f32).add(i),
            DType::BF16 => (*(ptr as *const bf16).add(i)).to_f32(),
            DType::F16 => (*(ptr as *const f16).add(i)).to_f32(),
            DType::U32 => *(ptr as *const u32).add(i) as f32,
        }
    }
}

/// Stores `v` rounded to `dtype` as element `i` at `ptr`.
///
/// # Safety
/// `ptr` must address at least `i + 1` writable elements of `dtype`.
unsafe fn store(ptr: u64, i: usize, dtype: DType, v: f32) {
    // SAFETY: as the caller promises.
    unsafe {
        match dtype {
            DType::F32 => *(ptr as *mut f32).add(i) = v,
            DType::BF16 => *(ptr as *mut bf16).add(i) = bf16::from_f32(v),
            DType::F16 => *(ptr as *mut f16).add(i) = f16::from_f32(v),
            DType::U32 => *(ptr as *mut u32).add(i) = v as u32,
        }
    }
}

/// One operand: `rows × cols` column-major with leading dimension `ld`, matrix `i` of the batch
/// at `ptr + i · stride` elements.
struct Operand {
    name: &'static str,
    ptr: u64,
    rows: usize,
    cols: usize,
    ld: usize,
    stride: usize,
}

impl Operand {
    /// The operand whose `op(X)` is `rows × cols`, stored transposed when `trans`, with its
    /// leading dimension and batch stride.
    fn new(
        name: &'static str,
        ptr: u64,
        (rows, cols): (usize, usize),
        trans: bool,
        (ld, stride): (usize, usize),
    ) -> Self {
        let (rows, cols) = if trans { (cols, rows) } else { (rows, cols) };
        Operand {
            name,
            ptr,
            rows,
            cols,
            ld,
            stride,
        }
    }

    /// Elements one matrix spans.
    fn span(&self) -> usize {
        if self.rows == 0 || self.cols == 0 {
            0
        } else {
            (self.cols - 1) * self.ld + self.rows
        }
    }

    /// cuBLAS's check of the leading dimension, and the whole batch inside one live buffer.
    fn check(&self, call: &BlasCall, live: &LiveBuffers) -> Result<()> {
        let fail = |detail: String| CudaError::Emulator {
            kernel: call.op.into(),
            detail,
        };
        if self.ld < self.rows.max(1) {
            return Err(fail(format!(
                "CUBLAS_STATUS_INVALID_VALUE: leading dimension of {} is {}, below its {} rows",
                self.name, self.ld, self.rows
            )));
        }
        let elems = (call.batch - 1) * self.stride + self.span();
        live.check_range(self.name, self.ptr, elems * call.dtype.size())
            .map_err(|e| fail(format!("operand {e}")))
    }

    /// Matrix `i` of the batch as dense f32 with the same layout.
    fn load(&self, i: usize, dtype: DType) -> Vec<f32> {
        let base = i * self.stride;
        // SAFETY: `check` found the whole batch inside a live buffer.
        (0..self.span())
            .map(|j| unsafe { load(self.ptr, base + j, dtype) })
            .collect()
    }
}

/// Runs `call` on the host.
pub(crate) fn run(call: &BlasCall, live: &LiveBuffers) -> Result<()> {
    if call.m == 0 || call.n == 0 || call.batch == 0 {
        return Ok(());
    }
    let (m, n, k) = (call.m, call.n, call.k);
    let a = Operand::new("A", call.a, (m, k), call.trans_a, (call.lda, call.stride_a));
    let b = Operand::new("B", call.b, (k, n), call.trans_b, (call.ldb, call.stride_b));
    let c = Operand::new("C", call.c, (m, n), false, (call.ldc, call.stride_c));
    for operand in [&a, &b, &c] {
        operand.check(call, live)?;
    }
    if let Some(bias) = call.bias {
        live.check_range("bias", bias, m * call.dtype.size())
            .map_err(|detail| CudaError::Emulator {
                kernel: call.op.into(),
                detail,
            })?;
    }
    // op(A)(i, l) and op(B)(l, j) as (row stride, column stride).
    let a_strides = if call.trans_a { (a.ld, 1) } else { (1, a.ld) };
    let b_strides = if call.trans_b { (b.ld, 1) } else { (1, b.ld) };
    let mut product = vec![0f32; m * n];
    for batch in 0..call.batch {
        let (av, bv) = (a.load(batch, call.dtype), b.load(batch, call.dtype));
        // SAFETY: `product` is m × n column-major; the operands' spans cover every (row, column)
        // reached with these strides.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                product.as_mut_ptr(),
                m as isize,
                1,
                false,
                av.as_ptr(),
                a_strides.1 as isize,
                a_strides.0 as isize,
                bv.as_ptr(),
                b_strides.1 as isize,
                b_strides.0 as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::Rayon(0),
            );
        }
        let c_base = batch * c.stride;
        for j in 0..n {
            for i in 0..m {
                let at = c_base + i + j * c.ld;
                let mut v = call.alpha * product[i + j * m];
                if call.beta != 0.0 {
                    // SAFETY: checked inside C's buffer.
                    v += call.beta * unsafe { load(c.ptr, at, call.dtype) };
                }
                if let Some(bias) = call.bias {
                    // SAFETY: checked: m elements.
                    v += unsafe { load(bias, i, call.dtype) };
                }
                // SAFETY: checked inside C's buffer.
                unsafe { store(c.ptr, at, call.dtype, v) };
            }
        }
    }
    Ok(())
}
