//! GEMM through cuBLAS (`cublasGemmEx`, strided-batched) and cuBLASLt (with a fused bias
//! epilogue): f32, bf16 and f16 operands, f32 accumulation and scaling, row-major matrices.
//!
//! cuBLAS is column-major; a row-major `C = op(A) · op(B)` is computed as the column-major
//! `Cᵀ = op(B)ᵀ · op(A)ᵀ`, which reads the same memory without copies.

use crate::device::{DType, DeviceBuffer, FloatElem, GpuDevice};
use crate::error::{CudaError, Result};
use crate::probe::{self, Library};
use cudarc::cublas::result as blas;
use cudarc::cublas::sys as bsys;
use cudarc::cublaslt::result as lt;
use cudarc::cublaslt::sys as ltsys;
use std::ffi::c_void;

/// Bytes of device workspace cuBLASLt may use (32 MiB, NVIDIA's advice for Hopper).
const LT_WORKSPACE_BYTES: usize = 32 << 20;

/// A batch of row-major products `C[i] = alpha · op(A[i]) · op(B[i]) + beta · C[i]`, where
/// `op(A[i])` is `m × k` (A stored `m × k`, or `k × m` when `trans_a`), `op(B[i])` is `k × n`
/// (B stored `k × n`, or `n × k` when `trans_b`) and C is `m × n`. Matrix `i` of each operand
/// starts `i · stride` elements after the first (a stride of 0 reuses one matrix).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GemmSpec {
    /// Rows of C.
    pub m: usize,
    /// Columns of C.
    pub n: usize,
    /// The contracted dimension.
    pub k: usize,
    /// A is stored transposed (`k × m`).
    pub trans_a: bool,
    /// B is stored transposed (`n × k`).
    pub trans_b: bool,
    /// Number of products.
    pub batch: usize,
    /// Elements between consecutive A matrices.
    pub stride_a: usize,
    /// Elements between consecutive B matrices.
    pub stride_b: usize,
    /// Elements between consecutive C matrices.
    pub stride_c: usize,
    /// Scale of the product.
    pub alpha: f32,
    /// Scale of the existing C (0: C is only written).
    pub beta: f32,
}

impl GemmSpec {
    /// One product `C = A · B` of packed matrices.
    pub fn new(m: usize, n: usize, k: usize) -> Self {
        GemmSpec {
            m,
            n,
            k,
            trans_a: false,
            trans_b: false,
            batch: 1,
            stride_a: m * k,
            stride_b: k * n,
            stride_c: m * n,
            alpha: 1.0,
            beta: 0.0,
        }
    }

    /// `batch` products of packed, consecutive matrices.
    pub fn batched(self, batch: usize) -> Self {
        GemmSpec { batch, ..self }
    }

    /// With A and/or B stored transposed.
    pub fn transposed(self, trans_a: bool, trans_b: bool) -> Self {
        GemmSpec {
            trans_a,
            trans_b,
            ..self
        }
    }

    /// Checks sizes against the buffers and cuBLAS's 32-bit dimensions.
    fn check(&self, op: &'static str, (a, b, c): (usize, usize, usize)) -> Result<()> {
        let fits = |v: usize| i32::try_from(v).is_ok();
        if ![self.m, self.n, self.k, self.batch].into_iter().all(fits) {
            return Err(CudaError::shape(
                op,
                format!("{self:?} exceeds 32-bit dimensions"),
            ));
        }
        let extent = |stride: usize, size: usize| {
            (self.batch.max(1) - 1)
                .checked_mul(stride)
                .and_then(|s| s.checked_add(size))
        };
        for (name, have, stride, size) in [
            ("A", a, self.stride_a, self.m * self.k),
            ("B", b, self.stride_b, self.k * self.n),
            ("C", c, self.stride_c, self.m * self.n),
        ] {
            match extent(stride, size) {
                Some(e) if e <= have => {}
                _ => {
                    return Err(CudaError::shape(
                        op,
                        format!("{name} has {have} elements, {self:?} needs more"),
                    ))
                }
            }
        }
        Ok(())
    }

    /// Column-major arguments for `Cᵀ = op(B)ᵀ · op(A)ᵀ`: first and second operands' transpose
    /// flags and leading dimensions.
    fn column_major(&self) -> ((bool, usize), (bool, usize)) {
        let first = (self.trans_b, if self.trans_b { self.k } else { self.n });
        let second = (self.trans_a, if self.trans_a { self.m } else { self.k });
        (first, second)
    }
}

/// cuBLAS and cuBLASLt handles bound to a device's stream, and the Lt workspace.
pub(crate) struct Blas {
    handle: bsys::cublasHandle_t,
    lt: ltsys::cublasLtHandle_t,
    workspace: DeviceBuffer<u32>,
}

// SAFETY: the handles are only used under the device's mutex, one thread at a time.
unsafe impl Send for Blas {}

impl Drop for Blas {
    fn drop(&mut self) {
        // SAFETY: both handles were created by `Blas::new` and are destroyed once.
        unsafe {
            let _ = blas::destroy_handle(self.handle);
            let _ = lt::destroy_handle(self.lt);
        }
    }
}

impl Blas {
    /// Creates both handles on `dev`'s stream (after probing for the libraries).
    fn new(dev: &GpuDevice) -> Result<Self> {
        probe::require(&[Library::Cublas, Library::CublasLt])?;
        let workspace = dev.alloc(LT_WORKSPACE_BYTES / 4)?;
        dev.bind()?;
        let cublas_err = |op| move |source| CudaError::Cublas { op, source };
        let lt_err = |op| move |source| CudaError::CublasLt { op, source };
        let handle = blas::create_handle().map_err(cublas_err("cublasCreate"))?;
        let stream = dev.driver_stream()?.cu_stream();
        // SAFETY: a fresh handle and the device's live stream.
        if let Err(e) = unsafe { blas::set_stream(handle, stream as _) } {
            // SAFETY: created just above.
            unsafe {
                let _ = blas::destroy_handle(handle);
            }
            return Err(cublas_err("cublasSetStream")(e));
        }
        let lt_handle = match lt::create_handle() {
            Ok(h) => h,
            Err(e) => {
                // SAFETY: created just above.
                unsafe {
                    let _ = blas::destroy_handle(handle);
                }
                return Err(lt_err("cublasLtCreate")(e));
            }
        };
        Ok(Blas {
            handle,
            lt: lt_handle,
            workspace,
        })
    }
}

/// The cuBLAS and cuBLASLt data types of a float element type.
fn data_types(dtype: DType) -> (bsys::cudaDataType, ltsys::cudaDataType) {
    match dtype {
        DType::BF16 => (bsys::cudaDataType::CUDA_R_16BF, ltsys::cudaDataType::CUDA_R_16BF),
        DType::F16 => (bsys::cudaDataType::CUDA_R_16F, ltsys::cudaDataType::CUDA_R_16F),
        DType::F32 | DType::U32 => (bsys::cudaDataType::CUDA_R_32F, ltsys::cudaDataType::CUDA_R_32F),
    }
}

/// cuBLAS's transpose flag.
fn op(trans: bool) -> bsys::cublasOperation_t {
    if trans {
        bsys::cublasOperation_t::CUBLAS_OP_T
    } else {
        bsys::cublasOperation_t::CUBLAS_OP_N
    }
}

/// A cuBLASLt matmul descriptor, destroyed on drop.
struct MatmulDesc(ltsys::cublasLtMatmulDesc_t);

impl Drop for MatmulDesc {
    fn drop(&mut self) {
        // SAFETY: created by create_matmul_desc, destroyed once.
        unsafe {
            let _ = lt::destroy_matmul_desc(self.0);
        }
    }
}

/// A cuBLASLt matrix layout, destroyed on drop.
struct Layout(ltsys::cublasLtMatrixLayout_t);

impl Drop for Layout {
    fn drop(&mut self) {
        // SAFETY: created by create_matrix_layout, destroyed once.
        unsafe {
            let _ = lt::destroy_matrix_layout(self.0);
        }
    }
}

/// A cuBLASLt preference, destroyed on drop.
struct Preference(ltsys::cublasLtMatmulPreference_t);

impl Drop for Preference {
    fn drop(&mut self) {
        // SAFETY: created by create_matmul_pref, destroyed once.
        unsafe {
            let _ = lt::destroy_matmul_pref(self.0);
        }
    }
}

/// Maps a cuBLASLt status to [`CudaError::CublasLt`].
fn lt_check<T>(op: &'static str, r: std::result::Result<T, lt::CublasError>) -> Result<T> {
    r.map_err(|source| CudaError::CublasLt { op, source })
}

/// Sets one attribute of a matmul descriptor.
fn set_desc<V>(desc: &MatmulDesc, attr: ltsys::cublasLtMatmulDescAttributes_t, value: &V) -> Result<()> {
    // SAFETY: `value` is a live value of the size passed, of the type the attribute takes.
    lt_check("cublasLtMatmulDescSetAttribute", unsafe {
        lt::set_matmul_desc_attribute(desc.0, attr, value as *const V as *const c_void, size_of::<V>())
    })
}

/// A column-major layout of `rows × cols` with leading dimension `ld`, batched as `spec`.
fn layout(
    ty: ltsys::cudaDataType,
    (rows, cols, ld): (usize, usize, usize),
    batch: usize,
    stride: usize,
) -> Result<Layout> {
    let l = Layout(lt_check(
        "cublasLtMatrixLayoutCreate",
        lt::create_matrix_layout(ty, rows as u64, cols as u64, ld as i64),
    )?);
    if batch > 1 {
        let count = batch as i32;
        let offset = stride as i64;
        // SAFETY: live layout; values of the attribute types (int32, int64).
        unsafe {
            lt_check(
                "cublasLtMatrixLayoutSetAttribute",
                lt::set_matrix_layout_attribute(
                    l.0,
                    ltsys::cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT,
                    &count as *const i32 as *const c_void,
                    size_of::<i32>(),
                ),
            )?;
            lt_check(
                "cublasLtMatrixLayoutSetAttribute",
                lt::set_matrix_layout_attribute(
                    l.0,
                    ltsys::cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                    &offset as *const i64 as *const c_void,
                    size_of::<i64>(),
                ),
            )?;
        }
    }
    Ok(l)
}

/// A GEMM as cuBLAS gets it, column-major: `C[i] = alpha · op(A[i]) · op(B[i]) + beta · C[i]`
/// (`+ bias` per row of C with cuBLASLt's bias epilogue), `op(A)` `m × k`, `op(B)` `k × n`, each
/// operand stored with its leading dimension and batch stride in elements. Both the real
/// libraries and the emulator run exactly this.
#[derive(Clone, Copy, Debug)]
pub(crate) struct BlasCall {
    /// The library call, for errors.
    pub op: &'static str,
    pub dtype: DType,
    pub trans_a: bool,
    pub trans_b: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a: u64,
    pub lda: usize,
    pub stride_a: usize,
    pub b: u64,
    pub ldb: usize,
    pub stride_b: usize,
    pub c: u64,
    pub ldc: usize,
    pub stride_c: usize,
    pub batch: usize,
    pub alpha: f32,
    pub beta: f32,
    pub bias: Option<u64>,
}

impl BlasCall {
    /// The column-major call for the row-major product `spec`: `Cᵀ = op(B)ᵀ · op(A)ᵀ`, which
    /// reads the same memory as the row-major operands.
    fn row_major<T: FloatElem>(
        op: &'static str,
        spec: &GemmSpec,
        (a, b, c): (&DeviceBuffer<T>, &DeviceBuffer<T>, &DeviceBuffer<T>),
        bias: Option<u64>,
    ) -> Self {
        let ((tf, ldf), (ts, lds)) = spec.column_major();
        BlasCall {
            op,
            dtype: T::DTYPE,
            trans_a: tf,
            trans_b: ts,
            m: spec.n,
            n: spec.m,
            k: spec.k,
            a: b.device_ptr(),
            lda: ldf,
            stride_a: spec.stride_b,
            b: a.device_ptr(),
            ldb: lds,
            stride_b: spec.stride_a,
            c: c.device_ptr(),
            ldc: spec.n,
            stride_c: spec.stride_c,
            batch: spec.batch,
            alpha: spec.alpha,
            beta: spec.beta,
            bias,
        }
    }
}

impl GpuDevice {
    /// Runs `f` with the device's cuBLAS state, creating it on first use.
    fn with_blas<R>(&self, f: impl FnOnce(&Blas) -> Result<R>) -> Result<R> {
        let mut guard = self.blas()?;
        if guard.is_none() {
            *guard = Some(Blas::new(self)?);
        }
        self.bind()?;
        f(guard.as_ref().expect("created above"))
    }

    /// `C = alpha · op(A) · op(B) + beta · C` per [`GemmSpec`] with cuBLAS (`cublasGemmEx`, or
    /// its strided-batched form): operands of one float type, f32 accumulation.
    pub fn gemm<T: FloatElem>(
        &self,
        a: &DeviceBuffer<T>,
        b: &DeviceBuffer<T>,
        c: &mut DeviceBuffer<T>,
        spec: GemmSpec,
    ) -> Result<()> {
        for buf_owner in [
            self.check_owner("gemm", a),
            self.check_owner("gemm", b),
            self.check_owner("gemm", c),
        ] {
            buf_owner?;
        }
        spec.check("gemm", (a.len(), b.len(), c.len()))?;
        if spec.m == 0 || spec.n == 0 || spec.batch == 0 {
            return Ok(());
        }
        let call = BlasCall::row_major("cublasGemmEx", &spec, (a, b, c), None);
        if let Some(live) = self.live_buffers() {
            return crate::emulator::blas::run(&call, live);
        }
        let (ty, _) = data_types(call.dtype);
        let (m, n, k) = (call.m as i32, call.n as i32, call.k as i32);
        let compute = bsys::cublasComputeType_t::CUBLAS_COMPUTE_32F;
        let algo = bsys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT;
        let alpha_ptr = &call.alpha as *const f32 as *const c_void;
        let beta_ptr = &call.beta as *const f32 as *const c_void;
        self.with_blas(|blas_state| {
            // SAFETY: the buffers hold what `spec.check` asked for; alpha and beta are host
            // f32s (the handle's default pointer mode) that outlive the call.
            let status = unsafe {
                if call.batch == 1 {
                    blas::gemm_ex(
                        blas_state.handle,
                        op(call.trans_a),
                        op(call.trans_b),
                        m,
                        n,
                        k,
                        alpha_ptr,
                        call.a as *const c_void,
                        ty,
                        call.lda as i32,
                        call.b as *const c_void,
                        ty,
                        call.ldb as i32,
                        beta_ptr,
                        call.c as *mut c_void,
                        ty,
                        call.ldc as i32,
                        compute,
                        algo,
                    )
                } else {
                    blas::gemm_strided_batched_ex(
                        blas_state.handle,
                        op(call.trans_a),
                        op(call.trans_b),
                        m,
                        n,
                        k,
                        alpha_ptr,
                        call.a as *const c_void,
                        ty,
                        call.lda as i32,
                        call.stride_a as i64,
                        call.b as *const c_void,
                        ty,
                        call.ldb as i32,
                        call.stride_b as i64,
                        beta_ptr,
                        call.c as *mut c_void,
                        ty,
                        call.ldc as i32,
                        call.stride_c as i64,
                        call.batch as i32,
                        compute,
                        algo,
                    )
                }
            };
            status.map_err(|source| CudaError::Cublas {
                op: "cublasGemmEx",
                source,
            })
        })
    }

    /// `C = alpha · op(A) · op(B) + beta · C + bias` with cuBLASLt's bias epilogue: `bias` has
    /// `n` elements (one per column of C), of the operands' type.
    pub fn gemm_bias<T: FloatElem>(
        &self,
        (a, b): (&DeviceBuffer<T>, &DeviceBuffer<T>),
        bias: &DeviceBuffer<T>,
        c: &mut DeviceBuffer<T>,
        spec: GemmSpec,
    ) -> Result<()> {
        for buf_owner in [
            self.check_owner("gemm_bias", a),
            self.check_owner("gemm_bias", b),
            self.check_owner("gemm_bias", bias),
            self.check_owner("gemm_bias", c),
        ] {
            buf_owner?;
        }
        spec.check("gemm_bias", (a.len(), b.len(), c.len()))?;
        if bias.len() != spec.n {
            return Err(CudaError::shape(
                "gemm_bias",
                format!("bias has {} elements for {} columns", bias.len(), spec.n),
            ));
        }
        if spec.m == 0 || spec.n == 0 || spec.batch == 0 {
            return Ok(());
        }
        let call = BlasCall::row_major("cublasLtMatmul", &spec, (a, b, c), Some(bias.device_ptr()));
        if let Some(live) = self.live_buffers() {
            return crate::emulator::blas::run(&call, live);
        }
        let (_, ty) = data_types(call.dtype);
        let desc = MatmulDesc(lt_check(
            "cublasLtMatmulDescCreate",
            lt::create_matmul_desc(
                ltsys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                ltsys::cudaDataType::CUDA_R_32F,
            ),
        )?);
        use ltsys::cublasLtMatmulDescAttributes_t as Attr;
        set_desc(&desc, Attr::CUBLASLT_MATMUL_DESC_TRANSA, &i32::from(call.trans_a))?;
        set_desc(&desc, Attr::CUBLASLT_MATMUL_DESC_TRANSB, &i32::from(call.trans_b))?;
        set_desc(
            &desc,
            Attr::CUBLASLT_MATMUL_DESC_EPILOGUE,
            &ltsys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS,
        )?;
        set_desc(&desc, Attr::CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias.device_ptr())?;
        // Stored shapes (column-major rows × cols) of A and B.
        let (m, n, k) = (call.m, call.n, call.k);
        let stored_a = if call.trans_a {
            (k, m, call.lda)
        } else {
            (m, k, call.lda)
        };
        let stored_b = if call.trans_b {
            (n, k, call.ldb)
        } else {
            (k, n, call.ldb)
        };
        let l_a = layout(ty, stored_a, call.batch, call.stride_a)?;
        let l_b = layout(ty, stored_b, call.batch, call.stride_b)?;
        let l_c = layout(ty, (m, n, call.ldc), call.batch, call.stride_c)?;
        let pref = Preference(lt_check(
            "cublasLtMatmulPreferenceCreate",
            lt::create_matmul_pref(),
        )?);
        let stream = self.driver_stream()?.cu_stream();
        self.with_blas(|blas_state| {
            let ws_bytes = blas_state.workspace.byte_len() as u64;
            // SAFETY: live preference; a u64 as the attribute takes.
            lt_check("cublasLtMatmulPreferenceSetAttribute", unsafe {
                lt::set_matmul_pref_attribute(
                    pref.0,
                    ltsys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                    &ws_bytes as *const u64 as *const c_void,
                    size_of::<u64>(),
                )
            })?;
            // SAFETY: live descriptors and handle.
            let heuristic = lt_check("cublasLtMatmulAlgoGetHeuristic", unsafe {
                lt::get_matmul_algo_heuristic(blas_state.lt, desc.0, l_a.0, l_b.0, l_c.0, l_c.0, pref.0)
            })?;
            // SAFETY: the buffers hold what `spec.check` asked for, the bias `n` elements, the
            // workspace `ws_bytes`; C is both input and output with one layout (allowed).
            lt_check("cublasLtMatmul", unsafe {
                lt::matmul(
                    blas_state.lt,
                    desc.0,
                    &call.alpha as *const f32 as *const c_void,
                    &call.beta as *const f32 as *const c_void,
                    call.a as *const c_void,
                    l_a.0,
                    call.b as *const c_void,
                    l_b.0,
                    call.c as *const c_void,
                    l_c.0,
                    call.c as *mut c_void,
                    l_c.0,
                    &heuristic.algo,
                    blas_state.workspace.device_ptr() as *mut c_void,
                    blas_state.workspace.byte_len(),
                    stream as _,
                )
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::GemmSpec;

    #[test]
    fn specs_check_buffer_extents() {
        let s = GemmSpec::new(2, 3, 4);
        assert!(s.check("t", (8, 12, 6)).is_ok());
        assert!(s.check("t", (7, 12, 6)).is_err());
        let b = s.batched(5);
        assert!(b.check("t", (40, 60, 30)).is_ok());
        assert!(b.check("t", (40, 60, 29)).is_err());
        // A shared B (stride 0) needs one matrix.
        let shared = GemmSpec { stride_b: 0, ..b };
        assert!(shared.check("t", (40, 12, 30)).is_ok());
        assert!(GemmSpec::new(1 << 31, 1, 1)
            .check("t", (usize::MAX, 1, usize::MAX))
            .is_err());
    }

    #[test]
    fn row_major_maps_to_swapped_column_major() {
        // Plain: first operand B (n × k col-major view of row-major k × n, ld n), second A
        // (ld k).
        let s = GemmSpec::new(2, 3, 4);
        assert_eq!(s.column_major(), ((false, 3), (false, 4)));
        // Transposed A (stored k × m) and B (stored n × k).
        assert_eq!(s.transposed(true, true).column_major(), ((true, 4), (true, 2)));
    }
}
