//! A plain f64 reference implementation of the tensor ops: dense row-major arrays and nested loops
//! over multi-indices, written to be obviously correct rather than fast.
//!
//! Every op is a free function that takes its inputs by reference and returns a new `RefTensor`.
//! Shape errors panic with a message naming the shapes involved.

use std::f64::consts::{FRAC_1_SQRT_2, PI};

/// A dense row-major f64 array: the plain reference that library ops are checked against.
#[derive(Clone, Debug, PartialEq)]
pub struct RefTensor {
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// Elements in row-major order; `data.len()` is the product of `shape`.
    pub data: Vec<f64>,
}

impl RefTensor {
    /// A tensor of `shape` holding `data`; panics if the lengths disagree.
    pub fn new(shape: Vec<usize>, data: Vec<f64>) -> RefTensor {
        let n: usize = shape.iter().product();
        assert_eq!(
            data.len(),
            n,
            "RefTensor::new: shape {shape:?} needs {n} elements, got {}",
            data.len()
        );
        RefTensor { shape, data }
    }

    /// A tensor of `shape` whose element at each multi-index `idx` is `f(idx)`.
    pub fn from_fn(shape: &[usize], mut f: impl FnMut(&[usize]) -> f64) -> RefTensor {
        let data = multi_indices(shape).iter().map(|idx| f(idx)).collect();
        RefTensor::new(shape.to_vec(), data)
    }

    /// The number of elements.
    pub fn numel(&self) -> usize {
        self.data.len()
    }

    /// The rank (number of dimensions).
    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    /// Row-major strides, in elements.
    pub fn strides(&self) -> Vec<usize> {
        let mut strides = vec![1; self.rank()];
        for d in (0..self.rank().saturating_sub(1)).rev() {
            strides[d] = strides[d + 1] * self.shape[d + 1];
        }
        strides
    }

    /// The flat position of multi-index `idx`; panics if it is out of bounds.
    pub fn index_of(&self, idx: &[usize]) -> usize {
        assert_eq!(
            idx.len(),
            self.rank(),
            "index {idx:?} has the wrong rank for shape {:?}",
            self.shape
        );
        let mut flat = 0;
        for ((&i, &dim), stride) in idx.iter().zip(&self.shape).zip(self.strides()) {
            assert!(i < dim, "index {idx:?} out of bounds for shape {:?}", self.shape);
            flat += i * stride;
        }
        flat
    }

    /// The element at multi-index `idx`.
    pub fn get(&self, idx: &[usize]) -> f64 {
        self.data[self.index_of(idx)]
    }

    /// `‖self − other‖₂ / max(‖other‖₂, 1e-30)`, with `other` as the reference; `f64::INFINITY` if
    /// either side holds a NaN. Panics if the shapes differ.
    pub fn rel_error(&self, other: &RefTensor) -> f64 {
        assert_eq!(
            self.shape, other.shape,
            "rel_error: shape {:?} vs {:?}",
            self.shape, other.shape
        );
        if self.data.iter().chain(&other.data).any(|v| v.is_nan()) {
            return f64::INFINITY;
        }
        let mut diff_sq = 0.0;
        let mut ref_sq = 0.0;
        for (a, b) in self.data.iter().zip(&other.data) {
            diff_sq += (a - b) * (a - b);
            ref_sq += b * b;
        }
        diff_sq.sqrt() / ref_sq.sqrt().max(1e-30)
    }
}

/// Every multi-index of `shape`, in row-major order (one empty index for rank 0, none if a dim is 0).
pub fn multi_indices(shape: &[usize]) -> Vec<Vec<usize>> {
    let n: usize = shape.iter().product();
    let mut out = Vec::with_capacity(n);
    let mut idx = vec![0; shape.len()];
    for _ in 0..n {
        out.push(idx.clone());
        // Odometer increment: bump the last digit, carrying leftwards.
        for d in (0..shape.len()).rev() {
            idx[d] += 1;
            if idx[d] < shape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Unary elementwise ops
// ---------------------------------------------------------------------------------------------

/// An elementwise function of one value.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RefUnary {
    /// -x
    Neg,
    /// e^x
    Exp,
    /// ln x
    Log,
    /// √x
    Sqrt,
    /// 1/√x
    Rsqrt,
    /// tanh x
    Tanh,
    /// 1/(1+e^-x)
    Sigmoid,
    /// x·sigmoid(x)
    Silu,
    /// 0.5x(1+tanh(√(2/π)(x+0.044715x³)))
    GeluTanh,
    /// 0.5x(1+erf(x/√2))
    GeluErf,
    /// ln(1+e^x)
    Softplus,
    /// |x|
    Abs,
    /// x²
    Sqr,
    /// 1/x
    Recip,
    /// x^p
    Powf(f64),
    /// min(max(x, lo), hi)
    Clamp(f64, f64),
}

const GELU_CUBIC: f64 = 0.044715;

/// √(2/π), the GELU tanh-approximation constant.
fn sqrt_2_over_pi() -> f64 {
    (2.0 / PI).sqrt()
}

/// The logistic function 1/(1+e^-x), with two branches so that exp never overflows.
fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// The error function erf(x), to a relative error of about 1e-15.
///
/// Uses the everywhere-positive series erf(x) = 2/√π · e^{-x²} · Σₙ 2ⁿ x^{2n+1} / (1·3·5···(2n+1)),
/// which has no cancellation; for |x| ≥ 6, erf(x) rounds to ±1 in f64.
pub fn erf(x: f64) -> f64 {
    if x.is_nan() {
        return x;
    }
    if x.abs() >= 6.0 {
        return x.signum();
    }
    let x2 = x * x;
    let mut term = x; // n = 0: x / 1
    let mut sum = x;
    let mut n = 0.0;
    while term.abs() > 1e-17 * sum.abs() {
        n += 1.0;
        term *= 2.0 * x2 / (2.0 * n + 1.0);
        sum += term;
    }
    2.0 / PI.sqrt() * (-x2).exp() * sum
}

/// f(x) for one value.
pub fn unary_scalar(x: f64, op: RefUnary) -> f64 {
    match op {
        RefUnary::Neg => -x,
        RefUnary::Exp => x.exp(),
        RefUnary::Log => x.ln(),
        RefUnary::Sqrt => x.sqrt(),
        RefUnary::Rsqrt => 1.0 / x.sqrt(),
        RefUnary::Tanh => x.tanh(),
        RefUnary::Sigmoid => sigmoid(x),
        RefUnary::Silu => x * sigmoid(x),
        RefUnary::GeluTanh => 0.5 * x * (1.0 + (sqrt_2_over_pi() * (x + GELU_CUBIC * x * x * x)).tanh()),
        RefUnary::GeluErf => 0.5 * x * (1.0 + erf(x * FRAC_1_SQRT_2)),
        RefUnary::Softplus => x.max(0.0) + (-x.abs()).exp().ln_1p(),
        RefUnary::Abs => x.abs(),
        RefUnary::Sqr => x * x,
        RefUnary::Recip => 1.0 / x,
        RefUnary::Powf(p) => x.powf(p),
        RefUnary::Clamp(lo, hi) => x.max(lo).min(hi),
    }
}

/// f'(x) for one value. Clamp's derivative is 1 strictly inside (lo, hi) and 0 elsewhere; |x|' is
/// sign(x), which is 0 at x = 0.
pub fn unary_derivative_scalar(x: f64, op: RefUnary) -> f64 {
    match op {
        RefUnary::Neg => -1.0,
        RefUnary::Exp => x.exp(),
        RefUnary::Log => 1.0 / x,
        RefUnary::Sqrt => 0.5 / x.sqrt(),
        RefUnary::Rsqrt => -0.5 / (x * x.sqrt()),
        RefUnary::Tanh => 1.0 - x.tanh() * x.tanh(),
        RefUnary::Sigmoid => sigmoid(x) * (1.0 - sigmoid(x)),
        RefUnary::Silu => sigmoid(x) + x * sigmoid(x) * (1.0 - sigmoid(x)),
        RefUnary::GeluTanh => {
            let c = sqrt_2_over_pi();
            let t = (c * (x + GELU_CUBIC * x * x * x)).tanh();
            0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3.0 * GELU_CUBIC * x * x)
        }
        RefUnary::GeluErf => {
            let pdf = (-0.5 * x * x).exp() / (2.0 * PI).sqrt();
            0.5 * (1.0 + erf(x * FRAC_1_SQRT_2)) + x * pdf
        }
        RefUnary::Softplus => sigmoid(x),
        RefUnary::Abs => {
            if x > 0.0 {
                1.0
            } else if x < 0.0 {
                -1.0
            } else {
                0.0
            }
        }
        RefUnary::Sqr => 2.0 * x,
        RefUnary::Recip => -1.0 / (x * x),
        RefUnary::Powf(p) => p * x.powf(p - 1.0),
        RefUnary::Clamp(lo, hi) => {
            if x > lo && x < hi {
                1.0
            } else {
                0.0
            }
        }
    }
}

/// `op` applied to every element.
pub fn unary(x: &RefTensor, op: RefUnary) -> RefTensor {
    RefTensor::new(
        x.shape.clone(),
        x.data.iter().map(|&v| unary_scalar(v, op)).collect(),
    )
}

/// The derivative of `op` at every element.
pub fn unary_derivative(x: &RefTensor, op: RefUnary) -> RefTensor {
    RefTensor::new(
        x.shape.clone(),
        x.data.iter().map(|&v| unary_derivative_scalar(v, op)).collect(),
    )
}

// ---------------------------------------------------------------------------------------------
// Broadcasting and binary ops
// ---------------------------------------------------------------------------------------------

/// The numpy broadcast of two shapes (trailing dims aligned, a dim of 1 stretches), or `None`.
pub fn broadcast_shape(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let rank = a.len().max(b.len());
    let mut out = vec![0; rank];
    for i in 0..rank {
        // Dims counted from the right; a missing dim acts as 1.
        let da = if i < a.len() { a[a.len() - 1 - i] } else { 1 };
        let db = if i < b.len() { b[b.len() - 1 - i] } else { 1 };
        out[rank - 1 - i] = if da == db || db == 1 {
            da
        } else if da == 1 {
            db
        } else {
            return None;
        };
    }
    Some(out)
}

/// The index into a tensor of `src_shape` that the broadcast output index `out_idx` reads.
fn broadcast_source_index(out_idx: &[usize], src_shape: &[usize]) -> Vec<usize> {
    let offset = out_idx.len() - src_shape.len();
    (0..src_shape.len())
        .map(|d| if src_shape[d] == 1 { 0 } else { out_idx[offset + d] })
        .collect()
}

/// Whether `src` broadcasts to exactly `dst` (numpy rules).
fn broadcasts_to(src: &[usize], dst: &[usize]) -> bool {
    src.len() <= dst.len() && broadcast_shape(src, dst).as_deref() == Some(dst)
}

/// `x` stretched to `shape` by numpy broadcasting; panics if it does not broadcast.
pub fn broadcast_to(x: &RefTensor, shape: &[usize]) -> RefTensor {
    assert!(
        broadcasts_to(&x.shape, shape),
        "broadcast_to: {:?} does not broadcast to {shape:?}",
        x.shape
    );
    RefTensor::from_fn(shape, |idx| x.get(&broadcast_source_index(idx, &x.shape)))
}

/// Sums `x` over its broadcast dims back down to `shape` (the inverse of `broadcast_to`, as in
/// gradients); panics unless `shape` broadcasts to `x.shape`.
pub fn sum_to_shape(x: &RefTensor, shape: &[usize]) -> RefTensor {
    assert!(
        broadcasts_to(shape, &x.shape),
        "sum_to_shape: {shape:?} does not broadcast to {:?}",
        x.shape
    );
    let mut out = RefTensor::new(shape.to_vec(), vec![0.0; shape.iter().product()]);
    for idx in multi_indices(&x.shape) {
        let o = out.index_of(&broadcast_source_index(&idx, shape));
        out.data[o] += x.get(&idx);
    }
    out
}

/// A broadcasting elementwise function of two values.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RefBinary {
    /// a + b
    Add,
    /// a − b
    Sub,
    /// a · b
    Mul,
    /// a / b
    Div,
    /// max(a, b)
    Maximum,
    /// min(a, b)
    Minimum,
}

/// A broadcasting elementwise comparison; true is 1.0, false is 0.0.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RefCmp {
    /// a == b
    Eq,
    /// a != b
    Ne,
    /// a < b
    Lt,
    /// a <= b
    Le,
    /// a > b
    Gt,
    /// a >= b
    Ge,
}

/// Both operands broadcast to their common shape; panics if they do not broadcast.
fn broadcast_pair(a: &RefTensor, b: &RefTensor) -> (RefTensor, RefTensor) {
    let shape = broadcast_shape(&a.shape, &b.shape)
        .unwrap_or_else(|| panic!("shapes {:?} and {:?} do not broadcast", a.shape, b.shape));
    (broadcast_to(a, &shape), broadcast_to(b, &shape))
}

/// `op(a, b)` elementwise, with numpy broadcasting.
pub fn binary(a: &RefTensor, b: &RefTensor, op: RefBinary) -> RefTensor {
    let (a, b) = broadcast_pair(a, b);
    let data = a
        .data
        .iter()
        .zip(&b.data)
        .map(|(&x, &y)| match op {
            RefBinary::Add => x + y,
            RefBinary::Sub => x - y,
            RefBinary::Mul => x * y,
            RefBinary::Div => x / y,
            RefBinary::Maximum => x.max(y),
            RefBinary::Minimum => x.min(y),
        })
        .collect();
    RefTensor::new(a.shape, data)
}

/// `op(a, b)` elementwise as 1.0 / 0.0, with numpy broadcasting.
pub fn compare(a: &RefTensor, b: &RefTensor, op: RefCmp) -> RefTensor {
    let (a, b) = broadcast_pair(a, b);
    let data = a
        .data
        .iter()
        .zip(&b.data)
        .map(|(&x, &y)| {
            let holds = match op {
                RefCmp::Eq => x == y,
                RefCmp::Ne => x != y,
                RefCmp::Lt => x < y,
                RefCmp::Le => x <= y,
                RefCmp::Gt => x > y,
                RefCmp::Ge => x >= y,
            };
            if holds {
                1.0
            } else {
                0.0
            }
        })
        .collect();
    RefTensor::new(a.shape, data)
}

/// `a` where `cond != 0`, else `b`, with all three broadcast together.
pub fn where_(cond: &RefTensor, a: &RefTensor, b: &RefTensor) -> RefTensor {
    let shape = broadcast_shape(&cond.shape, &a.shape)
        .and_then(|s| broadcast_shape(&s, &b.shape))
        .unwrap_or_else(|| {
            panic!(
                "where_: {:?}, {:?}, {:?} do not broadcast",
                cond.shape, a.shape, b.shape
            )
        });
    let (cond, a, b) = (
        broadcast_to(cond, &shape),
        broadcast_to(a, &shape),
        broadcast_to(b, &shape),
    );
    let data = (0..cond.numel())
        .map(|i| if cond.data[i] != 0.0 { a.data[i] } else { b.data[i] })
        .collect();
    RefTensor::new(shape, data)
}

// ---------------------------------------------------------------------------------------------
// Matmul
// ---------------------------------------------------------------------------------------------

/// Batched matrix product: `a` [..., M, K] times `b` [..., K, N] gives [..., M, N], batch dims
/// broadcast (numpy rules), accumulated in f64.
pub fn matmul(a: &RefTensor, b: &RefTensor) -> RefTensor {
    assert!(
        a.rank() >= 2 && b.rank() >= 2,
        "matmul needs rank >= 2, got {:?} @ {:?}",
        a.shape,
        b.shape
    );
    let (m, k) = (a.shape[a.rank() - 2], a.shape[a.rank() - 1]);
    let (k2, n) = (b.shape[b.rank() - 2], b.shape[b.rank() - 1]);
    assert_eq!(
        k, k2,
        "matmul: inner dims differ in {:?} @ {:?}",
        a.shape, b.shape
    );
    let batch = broadcast_shape(&a.shape[..a.rank() - 2], &b.shape[..b.rank() - 2]).unwrap_or_else(|| {
        panic!(
            "matmul: batch dims of {:?} @ {:?} do not broadcast",
            a.shape, b.shape
        )
    });
    let a = broadcast_to(a, &[batch.clone(), vec![m, k]].concat());
    let b = broadcast_to(b, &[batch.clone(), vec![k, n]].concat());
    let out_shape = [batch.clone(), vec![m, n]].concat();
    let mut out = Vec::with_capacity(out_shape.iter().product());
    for bi in 0..batch.iter().product() {
        for i in 0..m {
            for j in 0..n {
                let mut acc = 0.0;
                for p in 0..k {
                    acc += a.data[bi * m * k + i * k + p] * b.data[bi * k * n + p * n + j];
                }
                out.push(acc);
            }
        }
    }
    RefTensor::new(out_shape, out)
}

// ---------------------------------------------------------------------------------------------
// Reductions and axis-wise ops
// ---------------------------------------------------------------------------------------------

/// `shape` with each of `axes` set to 1.
fn keepdim_shape(shape: &[usize], axes: &[usize]) -> Vec<usize> {
    let mut out = shape.to_vec();
    for &a in axes {
        out[a] = 1;
    }
    out
}

/// `shape` with each of `axes` set to 1 (keepdim) or removed.
fn reduced_shape(shape: &[usize], axes: &[usize], keepdim: bool) -> Vec<usize> {
    if keepdim {
        keepdim_shape(shape, axes)
    } else {
        (0..shape.len())
            .filter(|d| !axes.contains(d))
            .map(|d| shape[d])
            .collect()
    }
}

/// The flat positions of every lane of `x` along `axis`: one list (in order along the axis) per
/// position of the keepdim-reduced shape, in that shape's row-major order.
fn lanes(x: &RefTensor, axis: usize) -> Vec<Vec<usize>> {
    assert!(
        axis < x.rank(),
        "axis {axis} out of range for shape {:?}",
        x.shape
    );
    multi_indices(&keepdim_shape(&x.shape, &[axis]))
        .into_iter()
        .map(|mut idx| {
            (0..x.shape[axis])
                .map(|k| {
                    idx[axis] = k;
                    x.index_of(&idx)
                })
                .collect()
        })
        .collect()
}

/// The sum over `axes` (each listed at most once; an empty list reduces nothing); reduced dims
/// are kept as size 1 if `keepdim`, otherwise removed.
pub fn sum(x: &RefTensor, axes: &[usize], keepdim: bool) -> RefTensor {
    for (i, &a) in axes.iter().enumerate() {
        assert!(a < x.rank(), "sum: axis {a} out of range for shape {:?}", x.shape);
        assert!(!axes[..i].contains(&a), "sum: axis {a} repeated in {axes:?}");
    }
    let kept = keepdim_shape(&x.shape, axes);
    let mut out = RefTensor::new(kept.clone(), vec![0.0; kept.iter().product()]);
    for idx in multi_indices(&x.shape) {
        let mut o = idx.clone();
        for &a in axes {
            o[a] = 0;
        }
        let o = out.index_of(&o);
        out.data[o] += x.get(&idx);
    }
    // Dropping size-1 dims leaves the row-major data unchanged.
    RefTensor::new(reduced_shape(&x.shape, axes, keepdim), out.data)
}

/// The mean over `axes`; same conventions as `sum`.
pub fn mean(x: &RefTensor, axes: &[usize], keepdim: bool) -> RefTensor {
    let count: usize = axes.iter().map(|&a| x.shape[a]).product();
    let mut s = sum(x, axes, keepdim);
    for v in &mut s.data {
        *v /= count as f64;
    }
    s
}

/// The sum of every element.
pub fn sum_all(x: &RefTensor) -> f64 {
    x.data.iter().sum()
}

/// Reduces each lane along `axis` with `f` (given the lane's values), keeping or dropping the axis.
fn reduce_lanes(x: &RefTensor, axis: usize, keepdim: bool, f: impl Fn(&[f64]) -> f64) -> RefTensor {
    let data = lanes(x, axis)
        .iter()
        .map(|lane| f(&lane.iter().map(|&p| x.data[p]).collect::<Vec<_>>()))
        .collect();
    RefTensor::new(reduced_shape(&x.shape, &[axis], keepdim), data)
}

/// The index of the first largest value of `values`.
fn first_argmax(values: &[f64]) -> usize {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best
}

/// The index of the first smallest value of `values`.
fn first_argmin(values: &[f64]) -> usize {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v < values[best] {
            best = i;
        }
    }
    best
}

/// The maximum along `axis`.
pub fn max(x: &RefTensor, axis: usize, keepdim: bool) -> RefTensor {
    reduce_lanes(x, axis, keepdim, |v| v[first_argmax(v)])
}

/// The minimum along `axis`.
pub fn min(x: &RefTensor, axis: usize, keepdim: bool) -> RefTensor {
    reduce_lanes(x, axis, keepdim, |v| v[first_argmin(v)])
}

/// The index (as f64) of the first maximum along `axis`.
pub fn argmax(x: &RefTensor, axis: usize, keepdim: bool) -> RefTensor {
    reduce_lanes(x, axis, keepdim, |v| first_argmax(v) as f64)
}

/// Softmax along `axis`: exp(x − max) / Σ exp(x − max).
pub fn softmax(x: &RefTensor, axis: usize) -> RefTensor {
    let mut out = x.clone();
    for lane in lanes(x, axis) {
        let m = lane.iter().map(|&p| x.data[p]).fold(f64::NEG_INFINITY, f64::max);
        let total: f64 = lane.iter().map(|&p| (x.data[p] - m).exp()).sum();
        for &p in &lane {
            out.data[p] = (x.data[p] - m).exp() / total;
        }
    }
    out
}

/// Log-softmax along `axis`: x − max − ln Σ exp(x − max).
pub fn log_softmax(x: &RefTensor, axis: usize) -> RefTensor {
    let mut out = x.clone();
    for lane in lanes(x, axis) {
        let m = lane.iter().map(|&p| x.data[p]).fold(f64::NEG_INFINITY, f64::max);
        let log_total = lane.iter().map(|&p| (x.data[p] - m).exp()).sum::<f64>().ln();
        for &p in &lane {
            out.data[p] = x.data[p] - m - log_total;
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Losses and normalisations
// ---------------------------------------------------------------------------------------------

/// Checks `logits` is [N, C] and `targets` has N entries, each `ignore_index` or below C.
fn check_cross_entropy(logits: &RefTensor, targets: &[usize], ignore_index: usize) {
    assert_eq!(
        logits.rank(),
        2,
        "cross_entropy: logits must be [N, C], got {:?}",
        logits.shape
    );
    assert_eq!(
        targets.len(),
        logits.shape[0],
        "cross_entropy: {} targets for {:?}",
        targets.len(),
        logits.shape
    );
    for &t in targets {
        assert!(
            t == ignore_index || t < logits.shape[1],
            "cross_entropy: target {t} out of range"
        );
    }
}

/// Mean over rows whose target is not `ignore_index` of −log_softmax(logits)[i, targets[i]];
/// `logits` is [N, C]. 0.0 if every row is ignored.
pub fn cross_entropy(logits: &RefTensor, targets: &[usize], ignore_index: usize) -> f64 {
    check_cross_entropy(logits, targets, ignore_index);
    let logp = log_softmax(logits, 1);
    let mut total = 0.0;
    let mut count = 0;
    for (i, &t) in targets.iter().enumerate() {
        if t != ignore_index {
            total -= logp.get(&[i, t]);
            count += 1;
        }
    }
    if count == 0 {
        0.0
    } else {
        total / count as f64
    }
}

/// d cross_entropy / d logits: (softmax − onehot(target)) / count on counted rows, 0 on ignored rows.
pub fn cross_entropy_grad(logits: &RefTensor, targets: &[usize], ignore_index: usize) -> RefTensor {
    check_cross_entropy(logits, targets, ignore_index);
    let p = softmax(logits, 1);
    let count = targets.iter().filter(|&&t| t != ignore_index).count();
    RefTensor::from_fn(&logits.shape, |idx| {
        let (i, j) = (idx[0], idx[1]);
        if targets[i] == ignore_index {
            return 0.0;
        }
        let onehot = if j == targets[i] { 1.0 } else { 0.0 };
        (p.get(idx) - onehot) / count as f64
    })
}

/// Checks `weight` is [D] with D the last dim of `x`, and returns D.
fn check_norm_weight(x: &RefTensor, weight: &RefTensor) -> usize {
    let d = *x.shape.last().expect("norm of a rank-0 tensor");
    assert_eq!(
        weight.shape,
        vec![d],
        "norm weight {:?} does not match x {:?}",
        weight.shape,
        x.shape
    );
    d
}

/// RMS norm over the last dim D: x / √(mean(x²) + eps) · weight, with `weight` [D].
pub fn rms_norm(x: &RefTensor, weight: &RefTensor, eps: f64) -> RefTensor {
    let d = check_norm_weight(x, weight);
    let mut out = x.clone();
    for lane in lanes(x, x.rank() - 1) {
        let mean_sq = lane.iter().map(|&p| x.data[p] * x.data[p]).sum::<f64>() / d as f64;
        let scale = 1.0 / (mean_sq + eps).sqrt();
        for (j, &p) in lane.iter().enumerate() {
            out.data[p] = x.data[p] * scale * weight.data[j];
        }
    }
    out
}

/// Layer norm over the last dim D: (x − mean) / √(var + eps) · weight + bias, with the biased
/// variance, `weight` [D] and `bias` [D] (0 if absent).
pub fn layer_norm(x: &RefTensor, weight: &RefTensor, bias: Option<&RefTensor>, eps: f64) -> RefTensor {
    let d = check_norm_weight(x, weight);
    if let Some(b) = bias {
        check_norm_weight(x, b);
    }
    let mut out = x.clone();
    for lane in lanes(x, x.rank() - 1) {
        let mean = lane.iter().map(|&p| x.data[p]).sum::<f64>() / d as f64;
        let var = lane
            .iter()
            .map(|&p| (x.data[p] - mean) * (x.data[p] - mean))
            .sum::<f64>()
            / d as f64;
        let scale = 1.0 / (var + eps).sqrt();
        for (j, &p) in lane.iter().enumerate() {
            let b = bias.map_or(0.0, |b| b.data[j]);
            out.data[p] = (x.data[p] - mean) * scale * weight.data[j] + b;
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Indexing and shape ops
// ---------------------------------------------------------------------------------------------

/// Rows of `weight` [V, D] picked by `ids` (laid out as `ids_shape`): shape `ids_shape + [D]`.
pub fn embedding(weight: &RefTensor, ids: &[usize], ids_shape: &[usize]) -> RefTensor {
    assert_eq!(
        weight.rank(),
        2,
        "embedding: weight must be [V, D], got {:?}",
        weight.shape
    );
    assert_eq!(
        ids.len(),
        ids_shape.iter().product::<usize>(),
        "embedding: ids do not fill {ids_shape:?}"
    );
    for &id in ids {
        assert!(
            id < weight.shape[0],
            "embedding: id {id} out of range for {:?}",
            weight.shape
        );
    }
    let out_shape = [ids_shape.to_vec(), vec![weight.shape[1]]].concat();
    let ids_t = RefTensor::new(ids_shape.to_vec(), ids.iter().map(|&i| i as f64).collect());
    RefTensor::from_fn(&out_shape, |idx| {
        let id = ids_t.get(&idx[..idx.len() - 1]) as usize;
        weight.get(&[id, idx[idx.len() - 1]])
    })
}

/// The slices of `x` along `dim` at positions `ids`, in that order (repeats allowed).
pub fn index_select(x: &RefTensor, dim: usize, ids: &[usize]) -> RefTensor {
    assert!(
        dim < x.rank(),
        "index_select: dim {dim} out of range for {:?}",
        x.shape
    );
    for &id in ids {
        assert!(
            id < x.shape[dim],
            "index_select: id {id} out of range for dim {dim} of {:?}",
            x.shape
        );
    }
    let mut shape = x.shape.clone();
    shape[dim] = ids.len();
    RefTensor::from_fn(&shape, |idx| {
        let mut src = idx.to_vec();
        src[dim] = ids[idx[dim]];
        x.get(&src)
    })
}

/// The tensors joined along `dim`; all other dims must match.
pub fn concat(parts: &[&RefTensor], dim: usize) -> RefTensor {
    assert!(!parts.is_empty(), "concat of no tensors");
    let first = &parts[0].shape;
    assert!(dim < first.len(), "concat: dim {dim} out of range for {first:?}");
    for p in parts {
        let same_rank = p.rank() == first.len();
        assert!(
            same_rank && (0..first.len()).all(|d| d == dim || p.shape[d] == first[d]),
            "concat along {dim}: {:?} does not match {first:?}",
            p.shape
        );
    }
    let mut shape = first.clone();
    shape[dim] = parts.iter().map(|p| p.shape[dim]).sum();
    RefTensor::from_fn(&shape, |idx| {
        // Walk the parts until the position along `dim` falls inside one.
        let mut src = idx.to_vec();
        for p in parts {
            if src[dim] < p.shape[dim] {
                return p.get(&src);
            }
            src[dim] -= p.shape[dim];
        }
        unreachable!("position beyond the concatenated length")
    })
}

/// The tensors (all the same shape) stacked along a new axis `dim`.
pub fn stack(parts: &[&RefTensor], dim: usize) -> RefTensor {
    assert!(!parts.is_empty(), "stack of no tensors");
    for p in parts {
        assert_eq!(p.shape, parts[0].shape, "stack: shapes differ");
    }
    assert!(
        dim <= parts[0].rank(),
        "stack: dim {dim} out of range for {:?}",
        parts[0].shape
    );
    let expanded: Vec<RefTensor> = parts
        .iter()
        .map(|p| {
            let mut shape = p.shape.clone();
            shape.insert(dim, 1);
            reshape(p, &shape)
        })
        .collect();
    concat(&expanded.iter().collect::<Vec<_>>(), dim)
}

/// The slice `start..start + len` of `x` along `dim`.
pub fn narrow(x: &RefTensor, dim: usize, start: usize, len: usize) -> RefTensor {
    assert!(dim < x.rank(), "narrow: dim {dim} out of range for {:?}", x.shape);
    assert!(
        start + len <= x.shape[dim],
        "narrow: {start}+{len} exceeds dim {dim} of {:?}",
        x.shape
    );
    let mut shape = x.shape.clone();
    shape[dim] = len;
    RefTensor::from_fn(&shape, |idx| {
        let mut src = idx.to_vec();
        src[dim] += start;
        x.get(&src)
    })
}

/// The dims of `x` reordered: output dim i is input dim `perm[i]`.
pub fn permute(x: &RefTensor, perm: &[usize]) -> RefTensor {
    let mut sorted = perm.to_vec();
    sorted.sort_unstable();
    assert!(
        sorted == (0..x.rank()).collect::<Vec<_>>(),
        "permute: {perm:?} is not a permutation for {:?}",
        x.shape
    );
    let shape: Vec<usize> = perm.iter().map(|&p| x.shape[p]).collect();
    RefTensor::from_fn(&shape, |idx| {
        let mut src = vec![0; x.rank()];
        for (i, &p) in perm.iter().enumerate() {
            src[p] = idx[i];
        }
        x.get(&src)
    })
}

/// `x` with dims `d0` and `d1` swapped.
pub fn transpose(x: &RefTensor, d0: usize, d1: usize) -> RefTensor {
    let mut perm: Vec<usize> = (0..x.rank()).collect();
    perm.swap(d0, d1);
    permute(x, &perm)
}

/// The same row-major data viewed as `shape`; panics if the element counts differ.
pub fn reshape(x: &RefTensor, shape: &[usize]) -> RefTensor {
    RefTensor::new(shape.to_vec(), x.data.clone())
}

// ---------------------------------------------------------------------------------------------
// Convolution
// ---------------------------------------------------------------------------------------------

/// Causal depthwise 1-d convolution of `x` [B, C, L] with `w` [C, K] and optional `bias` [C]:
/// y[b, c, t] = bias[c] + Σ_{k<K} w[c, k] · x[b, c, t − (K−1) + k], negative times reading 0.
pub fn conv1d_causal_depthwise(x: &RefTensor, w: &RefTensor, bias: Option<&RefTensor>) -> RefTensor {
    assert_eq!(x.rank(), 3, "conv1d: x must be [B, C, L], got {:?}", x.shape);
    assert_eq!(w.rank(), 2, "conv1d: w must be [C, K], got {:?}", w.shape);
    assert_eq!(
        w.shape[0], x.shape[1],
        "conv1d: w {:?} does not match x {:?}",
        w.shape, x.shape
    );
    if let Some(b) = bias {
        assert_eq!(
            b.shape,
            vec![x.shape[1]],
            "conv1d: bias {:?} does not match x {:?}",
            b.shape,
            x.shape
        );
    }
    let k_len = w.shape[1];
    RefTensor::from_fn(&x.shape, |idx| {
        let (b, c, t) = (idx[0], idx[1], idx[2]);
        let mut acc = bias.map_or(0.0, |bias| bias.data[c]);
        for k in 0..k_len {
            // Input time t − (K−1) + k, skipped while negative.
            if t + k >= k_len - 1 {
                acc += w.get(&[c, k]) * x.get(&[b, c, t + k - (k_len - 1)]);
            }
        }
        acc
    })
}

/// The gradients of [`conv1d_causal_depthwise`] given `g` = dL/dy [B, C, L]: (dx [B, C, L],
/// dw [C, K], dbias [C]), each output's gradient sent back along the taps that made it.
pub fn conv1d_causal_depthwise_backward(
    x: &RefTensor,
    w: &RefTensor,
    g: &RefTensor,
) -> (RefTensor, RefTensor, RefTensor) {
    assert_eq!(
        x.shape, g.shape,
        "conv1d backward: x {:?} vs g {:?}",
        x.shape, g.shape
    );
    let (batch, channels, len) = (x.shape[0], x.shape[1], x.shape[2]);
    let k_len = w.shape[1];
    let mut dx = RefTensor::new(x.shape.clone(), vec![0.0; x.data.len()]);
    let mut dw = RefTensor::new(w.shape.clone(), vec![0.0; w.data.len()]);
    let mut db = RefTensor::new(vec![channels], vec![0.0; channels]);
    for b in 0..batch {
        for c in 0..channels {
            for t in 0..len {
                let gv = g.get(&[b, c, t]);
                db.data[c] += gv;
                for k in 0..k_len {
                    if t + k >= k_len - 1 {
                        let s = t + k - (k_len - 1);
                        let at = dx.index_of(&[b, c, s]);
                        dx.data[at] += w.get(&[c, k]) * gv;
                        let at = dw.index_of(&[c, k]);
                        dw.data[at] += gv * x.get(&[b, c, s]);
                    }
                }
            }
        }
    }
    (dx, dw, db)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(shape: &[usize], data: &[f64]) -> RefTensor {
        RefTensor::new(shape.to_vec(), data.to_vec())
    }

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol * b.abs().max(1.0)
    }

    #[test]
    fn indexing_and_strides() {
        let x = t(&[2, 3], &[0., 1., 2., 3., 4., 5.]);
        assert_eq!(x.strides(), vec![3, 1]);
        assert_eq!(x.get(&[1, 2]), 5.0);
        assert_eq!(
            multi_indices(&[2, 2]),
            vec![vec![0, 0], vec![0, 1], vec![1, 0], vec![1, 1]]
        );
        assert_eq!(multi_indices(&[]), vec![Vec::<usize>::new()]);
        assert!(multi_indices(&[2, 0]).is_empty());
    }

    #[test]
    fn rel_error_basics() {
        let a = t(&[2], &[3.0, 4.0]);
        assert_eq!(a.rel_error(&a), 0.0);
        assert_eq!(t(&[2], &[3.0, 5.0]).rel_error(&a), 0.2);
        assert_eq!(t(&[2], &[f64::NAN, 4.0]).rel_error(&a), f64::INFINITY);
    }

    #[test]
    fn erf_values() {
        let cases = [
            (0.0, 0.0),
            (1e-3, 0.0011283787909692363),
            (0.1, 0.1124629160182849),
            (0.5, 0.5204998778130465),
            (1.0, 0.8427007929497149),
            (2.0, 0.9953222650189527),
            (3.0, 0.9999779095030014),
            (-1.0, -0.8427007929497149),
        ];
        for (x, want) in cases {
            assert!(
                close(erf(x), want, 1e-14) && erf(x).abs() <= 1.0,
                "erf({x}) = {}",
                erf(x)
            );
        }
        let tiny = 1e-20;
        assert!((erf(tiny) / (tiny * 2.0 / PI.sqrt()) - 1.0).abs() < 1e-15);
        assert_eq!(erf(7.0), 1.0);
        assert_eq!(erf(-7.0), -1.0);
    }

    #[test]
    fn unary_values_and_derivatives() {
        let x = t(&[3], &[-1.0, 0.5, 2.0]);
        let sp = unary(&x, RefUnary::Softplus);
        for (i, &v) in x.data.iter().enumerate() {
            assert!(close(sp.data[i], (1.0 + v.exp()).ln(), 1e-15));
        }
        assert_eq!(unary(&x, RefUnary::Clamp(0.0, 1.0)).data, vec![0.0, 0.5, 1.0]);
        assert_eq!(
            unary_derivative(&x, RefUnary::Clamp(0.0, 1.0)).data,
            vec![0.0, 1.0, 0.0]
        );
        assert_eq!(unary_derivative(&x, RefUnary::Abs).data, vec![-1.0, 1.0, 1.0]);
        // Every derivative agrees with a central finite difference.
        let ops = [
            RefUnary::Exp,
            RefUnary::Log,
            RefUnary::Sqrt,
            RefUnary::Rsqrt,
            RefUnary::Tanh,
            RefUnary::Sigmoid,
            RefUnary::Silu,
            RefUnary::GeluTanh,
            RefUnary::GeluErf,
            RefUnary::Softplus,
            RefUnary::Sqr,
            RefUnary::Recip,
            RefUnary::Powf(1.7),
        ];
        for op in ops {
            for v in [0.3, 1.1, 2.5] {
                let h = 1e-6;
                let fd = (unary_scalar(v + h, op) - unary_scalar(v - h, op)) / (2.0 * h);
                assert!(close(unary_derivative_scalar(v, op), fd, 1e-8), "{op:?} at {v}");
            }
        }
    }

    #[test]
    fn broadcasting() {
        assert_eq!(broadcast_shape(&[2, 1, 3], &[4, 1]), Some(vec![2, 4, 3]));
        assert_eq!(broadcast_shape(&[2, 3], &[4]), None);
        let a = t(&[2, 1], &[1.0, 2.0]);
        let b = t(&[3], &[10.0, 20.0, 30.0]);
        assert_eq!(
            binary(&a, &b, RefBinary::Add).data,
            vec![11., 21., 31., 12., 22., 32.]
        );
        assert_eq!(compare(&a, &t(&[1], &[1.5]), RefCmp::Gt).data, vec![0.0, 1.0]);
        let w = where_(&t(&[2, 1], &[1.0, 0.0]), &b, &t(&[], &[-1.0]));
        assert_eq!(w.data, vec![10., 20., 30., -1., -1., -1.]);
        let big = broadcast_to(&a, &[2, 2, 3]);
        assert_eq!(sum_to_shape(&big, &[2, 1]).data, vec![6.0, 12.0]);
        assert_eq!(sum_to_shape(&big, &[3]).data, vec![6.0, 6.0, 6.0]);
    }

    #[test]
    fn matmul_small() {
        let a = t(&[2, 2], &[1., 2., 3., 4.]);
        let b = t(&[2, 2], &[5., 6., 7., 8.]);
        assert_eq!(matmul(&a, &b).data, vec![19., 22., 43., 50.]);
        // Batch broadcast: [2,1,2,2] @ [3,2,2] -> [2,3,2,2].
        let a4 = reshape(&concat(&[&a, &b], 0), &[2, 1, 2, 2]);
        let b3 = stack(&[&a, &b, &a], 0);
        let c = matmul(&a4, &b3);
        assert_eq!(c.shape, vec![2, 3, 2, 2]);
        assert_eq!(
            narrow(&narrow(&c, 0, 0, 1), 1, 1, 1).data,
            vec![19., 22., 43., 50.]
        );
    }

    #[test]
    fn reductions() {
        let x = t(&[2, 3], &[1., 5., 5., -2., 0., -3.]);
        assert_eq!(sum(&x, &[1], false), t(&[2], &[11., -5.]));
        assert_eq!(sum(&x, &[0, 1], true), t(&[1, 1], &[6.]));
        assert_eq!(mean(&x, &[0], true), t(&[1, 3], &[-0.5, 2.5, 1.0]));
        assert_eq!(max(&x, 1, false).data, vec![5., 0.]);
        assert_eq!(min(&x, 0, true), t(&[1, 3], &[-2., 0., -3.]));
        assert_eq!(argmax(&x, 1, false).data, vec![1., 1.]);
        assert_eq!(sum_all(&x), 6.0);
    }

    #[test]
    fn softmax_and_cross_entropy() {
        let x = t(&[1, 2], &[0.0, 2f64.ln()]);
        let s = softmax(&x, 1);
        assert!(close(s.data[0], 1.0 / 3.0, 1e-15) && close(s.data[1], 2.0 / 3.0, 1e-15));
        let l = log_softmax(&x, 1);
        assert!(close(l.data[1], (2.0f64 / 3.0).ln(), 1e-15));
        let logits = t(&[2, 2], &[0.0, 0.0, 5.0, 1.0]);
        assert!(close(cross_entropy(&logits, &[1, 9], 9), 2f64.ln(), 1e-15));
        assert_eq!(cross_entropy(&logits, &[9, 9], 9), 0.0);
        assert_eq!(
            cross_entropy_grad(&logits, &[1, 9], 9).data,
            vec![0.5, -0.5, 0.0, 0.0]
        );
    }

    #[test]
    fn norms() {
        let x = t(&[1, 2], &[3.0, 4.0]);
        let w = t(&[2], &[1.0, 2.0]);
        let r = rms_norm(&x, &w, 0.0);
        let rms = 12.5f64.sqrt();
        assert!(close(r.data[0], 3.0 / rms, 1e-15) && close(r.data[1], 8.0 / rms, 1e-15));
        let ln = layer_norm(&x, &w, Some(&t(&[2], &[0.5, 0.5])), 0.0);
        assert_eq!(ln.data, vec![-0.5, 2.5]);
    }

    #[test]
    fn indexing_ops() {
        let w = t(&[3, 2], &[0., 1., 10., 11., 20., 21.]);
        let e = embedding(&w, &[2, 0], &[2, 1]);
        assert_eq!(e, t(&[2, 1, 2], &[20., 21., 0., 1.]));
        assert_eq!(
            index_select(&w, 1, &[1, 1, 0]).data,
            vec![1., 1., 0., 11., 11., 10., 21., 21., 20.]
        );
        assert_eq!(transpose(&w, 0, 1), t(&[2, 3], &[0., 10., 20., 1., 11., 21.]));
        let x = t(&[2, 3, 4], &(0..24).map(f64::from).collect::<Vec<_>>());
        let p = permute(&x, &[2, 0, 1]);
        assert_eq!(p.shape, vec![4, 2, 3]);
        assert_eq!(p.get(&[3, 1, 2]), x.get(&[1, 2, 3]));
        assert_eq!(
            concat(&[&w, &t(&[1, 2], &[7., 8.])], 0).data,
            vec![0., 1., 10., 11., 20., 21., 7., 8.]
        );
        assert_eq!(
            stack(&[&t(&[2], &[1., 2.]), &t(&[2], &[3., 4.])], 1),
            t(&[2, 2], &[1., 3., 2., 4.])
        );
        assert_eq!(narrow(&w, 0, 1, 2).data, vec![10., 11., 20., 21.]);
    }

    #[test]
    fn conv1d_k2() {
        // y[t] = bias + w0·x[t−1] + w1·x[t].
        let x = t(&[1, 1, 3], &[1., 2., 3.]);
        let w = t(&[1, 2], &[10., 1.]);
        let y = conv1d_causal_depthwise(&x, &w, Some(&t(&[1], &[0.5])));
        assert_eq!(y.data, vec![1.5, 12.5, 23.5]);
        // dL/dy = 1 everywhere: dx[s] = Σ of the weights that read x[s].
        let (dx, dw, db) = conv1d_causal_depthwise_backward(&x, &w, &t(&[1, 1, 3], &[1., 1., 1.]));
        assert_eq!(dx.data, vec![11., 11., 1.]);
        assert_eq!(dw.data, vec![3., 6.]);
        assert_eq!(db.data, vec![3.]);
    }
}
