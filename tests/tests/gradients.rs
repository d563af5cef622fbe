//! Every backward rule against central finite differences in f64, on random small shapes.

use autograd::{check_gradients, Var};
use proptest::prelude::*;
use tensor::{DType, Tensor, UnaryOp};
use tests::{check, config, ids_tensor, random_f64, random_ids, shape};

/// `shape` with some axes set to 1 and some leading axes dropped: a shape that broadcasts to it.
fn broadcastable(shape: &[usize], mask: u32) -> Vec<usize> {
    let drop = (mask as usize >> 8) % (shape.len() + 1);
    shape[drop..]
        .iter()
        .enumerate()
        .map(|(i, &d)| if mask >> i & 1 == 1 { 1 } else { d })
        .collect()
}

macro_rules! unary_grad_tests {
    ($($name:ident: $op:expr, $lo:expr, $hi:expr;)*) => {
        proptest! {
            #![proptest_config(config(12))]
            $(
                #[test]
                fn $name(s in shape(3, 5), seed in any::<u64>()) {
                    check(|v| v[0].unary($op), &[random_f64(&s, $lo, $hi, seed)])?;
                }
            )*
        }
    };
}

unary_grad_tests! {
    neg: UnaryOp::Neg, -2.0, 2.0;
    exp: UnaryOp::Exp, -2.0, 2.0;
    log: UnaryOp::Log, 0.5, 3.0;
    sqrt: UnaryOp::Sqrt, 0.5, 3.0;
    rsqrt: UnaryOp::Rsqrt, 0.5, 3.0;
    tanh: UnaryOp::Tanh, -2.0, 2.0;
    sigmoid: UnaryOp::Sigmoid, -4.0, 4.0;
    silu: UnaryOp::Silu, -4.0, 4.0;
    gelu_tanh: UnaryOp::GeluTanh, -3.0, 3.0;
    gelu_erf: UnaryOp::GeluErf, -3.0, 3.0;
    softplus: UnaryOp::Softplus, -5.0, 5.0;
    abs: UnaryOp::Abs, -2.0, 2.0;
    sqr: UnaryOp::Sqr, -2.0, 2.0;
    recip: UnaryOp::Recip, 0.5, 3.0;
    powf: UnaryOp::Powf(2.7), 0.5, 2.0;
    clamp: UnaryOp::Clamp(-0.5, 0.7), -2.0, 2.0;
    affine: UnaryOp::Affine(-1.5, 0.25), -2.0, 2.0;
}

proptest! {
    #![proptest_config(config(12))]

    #[test]
    fn binary_ops_with_broadcasting(s in shape(3, 4), mask in any::<u32>(), op in 0usize..6, seed in any::<u64>()) {
        let t = broadcastable(&s, mask);
        let (a, b) = (random_f64(&s, -2.0, 2.0, seed), random_f64(&t, 0.5, 2.0, seed ^ 1));
        check(|v| match op {
            0 => v[0].add(&v[1]),
            1 => v[1].sub(&v[0]),
            2 => v[0].mul(&v[1]),
            3 => v[0].div(&v[1]),
            4 => v[0].maximum(&v[1]),
            _ => v[1].minimum(&v[0]),
        }, &[a, b])?;
    }

    #[test]
    fn where_picks_gradients(s in shape(3, 4), mask in any::<u32>(), seed in any::<u64>()) {
        let t = broadcastable(&s, mask);
        let cond = random_f64(&s, 0.0, 1.0, seed ^ 7).gt(&Tensor::full(&[], 0.5, DType::F64)).unwrap();
        check(|v| Var::where_(&cond, &v[0], &v[1]), &[random_f64(&s, -2.0, 2.0, seed), random_f64(&t, -2.0, 2.0, seed ^ 1)])?;
    }

    #[test]
    fn matmul_batched_broadcast_and_transposed(b in 1usize..3, m in 1usize..5, k in 1usize..5, n in 1usize..5, seed in any::<u64>()) {
        let a = random_f64(&[b, m, k], -1.0, 1.0, seed);
        let w = random_f64(&[n, k], -1.0, 1.0, seed ^ 1);
        check(|v| v[0].matmul(&v[1].transpose(0, 1)?), &[a.clone(), w])?;
        // A plain weight [k, n], a per-batch right operand, and two leading axes on the left.
        check(|v| v[0].matmul(&v[1]), &[a.clone(), random_f64(&[k, n], -1.0, 1.0, seed ^ 2)])?;
        check(|v| v[0].matmul(&v[1]), &[a, random_f64(&[b, k, n], -1.0, 1.0, seed ^ 3)])?;
        let a4 = random_f64(&[2, b, m, k], -1.0, 1.0, seed ^ 4);
        check(|v| v[0].matmul(&v[1].transpose(0, 1)?), &[a4, random_f64(&[n, k], -1.0, 1.0, seed ^ 5)])?;
    }

    #[test]
    fn sum_and_mean_over_axes(s in shape(3, 4), axis_mask in 1u32..8, keepdim in any::<bool>(), seed in any::<u64>()) {
        let axes: Vec<usize> = (0..s.len()).filter(|&i| axis_mask >> i & 1 == 1).collect();
        let x = random_f64(&s, -2.0, 2.0, seed);
        check(|v| v[0].sum(&axes, keepdim), std::slice::from_ref(&x))?;
        check(|v| v[0].mean(&axes, keepdim), &[x])?;
    }

    #[test]
    fn max_and_min_over_an_axis(s in shape(3, 4), axis in 0usize..3, keepdim in any::<bool>(), seed in any::<u64>()) {
        let axis = axis % s.len();
        let x = random_f64(&s, -2.0, 2.0, seed);
        check(|v| v[0].max(axis, keepdim), std::slice::from_ref(&x))?;
        check(|v| v[0].min(axis, keepdim), &[x])?;
    }

    #[test]
    fn softmax_and_log_softmax(s in shape(3, 5), axis in 0usize..3, seed in any::<u64>()) {
        let axis = axis % s.len();
        let x = random_f64(&s, -3.0, 3.0, seed);
        check(|v| v[0].softmax(axis), std::slice::from_ref(&x))?;
        check(|v| v[0].log_softmax(axis), &[x])?;
    }

    #[test]
    fn cross_entropy_with_ignored_rows(n in 1usize..6, c in 2usize..7, seed in any::<u64>()) {
        let mut ids = random_ids(n, c, seed);
        ids[0] = 999; // ignored
        let targets = ids_tensor(&ids, &[n]);
        check(|v| v[0].cross_entropy(&targets, 999), &[random_f64(&[n, c], -3.0, 3.0, seed)])?;
    }

    #[test]
    fn rms_norm(s in shape(3, 5), seed in any::<u64>()) {
        let d = *s.last().unwrap();
        // With one feature the output is w·x/sqrt(x²+eps): its gradient is O(eps), below what
        // finite differences resolve.
        prop_assume!(d > 1);
        check(|v| v[0].rms_norm(&v[1], 1e-5), &[random_f64(&s, -2.0, 2.0, seed), random_f64(&[d], 0.5, 1.5, seed ^ 1)])?;
    }

    #[test]
    fn softmax_and_norms_on_rows_past_one_block(rows in 1usize..3, d in 17usize..70, seed in any::<u64>()) {
        // Rows longer than the kernels' blocks of 16 lanes (the shapes above stop at 5).
        let x = random_f64(&[rows, d], -2.0, 2.0, seed);
        let w = random_f64(&[d], 0.5, 1.5, seed ^ 1);
        check(|v| v[0].softmax(1), std::slice::from_ref(&x))?;
        check(|v| v[0].log_softmax(1), std::slice::from_ref(&x))?;
        check(|v| v[0].rms_norm(&v[1], 1e-5), &[x.clone(), w.clone()])?;
        check(|v| v[0].layer_norm(&v[1], None, 1e-5), &[x, w])?;
    }

    #[test]
    fn gated_rms_norm(rows in 1usize..4, groups in 1usize..4, group in 2usize..5, seed in any::<u64>()) {
        let d = groups * group;
        let x = random_f64(&[rows, d], -2.0, 2.0, seed);
        let z = random_f64(&[rows, d], -2.0, 2.0, seed ^ 1);
        check(|v| v[0].gated_rms_norm(&v[1], &v[2], group, 1e-5), &[x, z, random_f64(&[d], 0.5, 1.5, seed ^ 2)])?;
    }

    #[test]
    fn layer_norm_with_and_without_bias(s in shape(3, 5), seed in any::<u64>()) {
        let d = *s.last().unwrap();
        let (x, w, b) = (random_f64(&s, -2.0, 2.0, seed), random_f64(&[d], 0.5, 1.5, seed ^ 1), random_f64(&[d], -1.0, 1.0, seed ^ 2));
        check(|v| v[0].layer_norm(&v[1], Some(&v[2]), 1e-5), &[x.clone(), w.clone(), b])?;
        check(|v| v[0].layer_norm(&v[1], None, 1e-5), &[x, w])?;
    }

    #[test]
    fn embedding_with_repeated_ids(v in 1usize..6, d in 1usize..5, n in 1usize..8, seed in any::<u64>()) {
        let ids = ids_tensor(&random_ids(n, v, seed), &[n]);
        check(|p| p[0].embedding(&ids), &[random_f64(&[v, d], -1.0, 1.0, seed)])?;
    }

    #[test]
    fn pieces_of_one_tensor_and_a_table_read_twice(w in 1usize..4, v in 2usize..6, n in 1usize..6, seed in any::<u64>()) {
        // Narrows that cover a tensor and overlap (their gradients are added into one sum), used
        // more than once, next to the whole tensor.
        check(|p| {
            let part = |start: usize| p[0].narrow(1, start, w);
            part(0)?.mul(&part(w)?)?.add(&part(2 * w)?.unary(UnaryOp::Exp)?)?.mul(&part(1)?)?.add(&part(0)?)?.mul(&p[0].narrow(1, 0, w)?)
        }, &[random_f64(&[2, 3 * w + 1], -1.0, 1.0, seed)])?;
        // A table read by an embedding and used, transposed, as a matmul operand (tied weights).
        let ids = ids_tensor(&random_ids(n, v, seed), &[n]);
        check(|p| p[0].embedding(&ids)?.matmul(&p[0].transpose(0, 1)?), &[random_f64(&[v, 3], -1.0, 1.0, seed ^ 1)])?;
        check(|p| p[0].matmul(&p[0].transpose(0, 1)?)?.add(&p[0].index_select(1, &ids_tensor(&[2, 0, 2], &[3]))?.sum(&[1], true)?), &[random_f64(&[v, 3], -1.0, 1.0, seed ^ 2)])?;
    }

    #[test]
    fn index_select(s in shape(3, 4), axis in 0usize..3, n in 1usize..6, seed in any::<u64>()) {
        let axis = axis % s.len();
        let ids = ids_tensor(&random_ids(n, s[axis], seed), &[n]);
        check(|v| v[0].index_select(axis, &ids), &[random_f64(&s, -1.0, 1.0, seed)])?;
    }

    #[test]
    fn concat_and_stack(s in shape(3, 4), axis in 0usize..3, extra in 1usize..4, seed in any::<u64>()) {
        let axis = axis % s.len();
        let mut t = s.clone();
        t[axis] = extra;
        let (a, b, c) = (random_f64(&s, -1.0, 1.0, seed), random_f64(&t, -1.0, 1.0, seed ^ 1), random_f64(&s, -1.0, 1.0, seed ^ 2));
        check(|v| Var::concat(&[&v[0], &v[1]], axis), &[a.clone(), b])?;
        check(|v| Var::stack(&[&v[0], &v[1]], axis), &[a, c])?;
    }

    #[test]
    fn conv1d_causal_depthwise(b in 1usize..3, c in 1usize..4, l in 1usize..7, k in 1usize..5, bias in any::<bool>(), seed in any::<u64>()) {
        let (x, w, bi) = (random_f64(&[b, c, l], -1.0, 1.0, seed), random_f64(&[c, k], -1.0, 1.0, seed ^ 1), random_f64(&[c], -1.0, 1.0, seed ^ 2));
        if bias {
            check(|v| v[0].conv1d_causal_depthwise(&v[1], Some(&v[2])), &[x, w, bi])?;
        } else {
            check(|v| v[0].conv1d_causal_depthwise(&v[1], None), &[x, w])?;
        }
    }

    #[test]
    fn conv1d_causal_depthwise_silu_in_both_layouts(b in 1usize..3, c in 2usize..5, l in 1usize..9, k in 1usize..5, seed in any::<u64>()) {
        let (w, bi) = (random_f64(&[c, k], -1.0, 1.0, seed ^ 1), random_f64(&[c], -1.0, 1.0, seed ^ 2));
        // [B, C, L] rows, and [B, L, C] seen through a transpose (the channels-last kernels).
        check(|v| v[0].conv1d_causal_depthwise_silu(&v[1], Some(&v[2])), &[random_f64(&[b, c, l], -2.0, 2.0, seed), w.clone(), bi.clone()])?;
        let x_last = random_f64(&[b, l, c], -2.0, 2.0, seed ^ 3);
        check(|v| v[0].transpose(1, 2)?.conv1d_causal_depthwise_silu(&v[1], Some(&v[2])), &[x_last.clone(), w.clone(), bi])?;
        check(|v| v[0].transpose(1, 2)?.conv1d_causal_depthwise_silu(&v[1], None), &[x_last.clone(), w.clone()])?;
        check(|v| v[0].transpose(1, 2)?.conv1d_causal_depthwise(&v[1], None), &[x_last, w])?;
    }

    #[test]
    fn views(s in shape(3, 4), seed in any::<u64>()) {
        let x = random_f64(&s, -1.0, 1.0, seed);
        let r = s.len();
        let n: usize = s.iter().product();
        check(|v| v[0].reshape(&[n]), std::slice::from_ref(&x))?;
        check(|v| v[0].permute(&(0..r).rev().collect::<Vec<_>>())?.mul(&v[0].permute(&(0..r).rev().collect::<Vec<_>>())?), std::slice::from_ref(&x))?;
        check(|v| v[0].transpose(0, r - 1)?.sqr(), std::slice::from_ref(&x))?;
        check(|v| v[0].narrow(0, s[0] / 2, s[0] - s[0] / 2)?.exp(), std::slice::from_ref(&x))?;
        let mut big = vec![3];
        big.extend(&s);
        check(|v| v[0].broadcast_to(&big)?.sqr(), std::slice::from_ref(&x))?;
        check(|v| v[0].unsqueeze(r)?.squeeze(r)?.sqr(), &[x])?;
    }
}

#[test]
fn cast_round_trip_passes_gradients_back() {
    // f32 rounding limits the accuracy of differences, so a larger step and tolerance apply.
    let x = random_f64(&[3, 4], -1.0, 1.0, 5);
    let report = check_gradients(
        |v| v[0].to_dtype(DType::F32)?.sqr()?.to_dtype(DType::F64),
        &[x],
        1e-2,
    )
    .unwrap();
    assert!(report.max_error() < 1e-3, "{:?}", report.relative_errors);
}

#[test]
fn gradients_accumulate_across_backward_calls() {
    let x = Var::parameter(random_f64(&[4], -1.0, 1.0, 3));
    for _ in 0..2 {
        x.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    }
    let expected = x.value().affine(4.0, 0.0).unwrap().to_vec_f64();
    assert_eq!(x.grad().unwrap().to_vec_f64(), expected);
}

#[test]
fn a_graph_is_walked_once() {
    let x = Var::parameter(random_f64(&[2], -1.0, 1.0, 3));
    let y = x.exp().unwrap().sum_all().unwrap();
    y.backward().unwrap();
    assert!(matches!(
        y.backward(),
        Err(autograd::AutogradError::GraphConsumed)
    ));
}

#[test]
fn backward_needs_a_scalar() {
    let x = Var::parameter(random_f64(&[2], -1.0, 1.0, 3));
    assert!(matches!(
        x.exp().unwrap().backward(),
        Err(autograd::AutogradError::NotScalar(_))
    ));
}
