//! The Mamba scans: gradients of every input (optional ones included) against finite differences
//! in f64, the selective scan against a plain loop, and the SSD scan against the selective scan.

use proptest::prelude::*;
use tensor::{DType, Tensor};
use tests::{check, config, random_f64};

/// Appends `t` to `inputs` when `given`, returning its position there.
fn push_if(inputs: &mut Vec<Tensor>, given: bool, t: Tensor) -> Option<usize> {
    given.then(|| {
        inputs.push(t);
        inputs.len() - 1
    })
}

/// Step inputs: raw values for softplus, else positive steps.
fn steps(shape: &[usize], softplus: bool, seed: u64) -> Tensor {
    if softplus {
        random_f64(shape, -1.0, 1.0, seed)
    } else {
        random_f64(shape, 0.1, 1.0, seed)
    }
}

/// Checks the selective scan's gradients w.r.t. u, delta, A, B, C and each optional input given.
#[allow(clippy::too_many_arguments)]
fn check_selective_scan(
    (b, d, l, n): (usize, usize, usize, usize),
    with_d: bool,
    with_z: bool,
    with_bias: bool,
    softplus: bool,
    seed: u64,
) -> Result<(), TestCaseError> {
    let mut inputs = vec![
        random_f64(&[b, d, l], -1.0, 1.0, seed),
        steps(&[b, d, l], softplus, seed ^ 1),
        random_f64(&[d, n], -1.5, -0.2, seed ^ 2),
        random_f64(&[b, n, l], -1.0, 1.0, seed ^ 3),
        random_f64(&[b, n, l], -1.0, 1.0, seed ^ 4),
    ];
    let di = push_if(&mut inputs, with_d, random_f64(&[d], -1.0, 1.0, seed ^ 5));
    let zi = push_if(&mut inputs, with_z, random_f64(&[b, d, l], -2.0, 2.0, seed ^ 6));
    let bi = push_if(&mut inputs, with_bias, random_f64(&[d], 0.0, 0.3, seed ^ 7));
    check(
        |v| {
            let opt = |i: Option<usize>| i.map(|i| &v[i]);
            Ok(v[0]
                .selective_scan(&v[1], &v[2], &v[3], &v[4], opt(di), opt(zi), opt(bi), softplus)?
                .0)
        },
        &inputs,
    )
}

/// Checks the SSD scan's gradients w.r.t. x, dt, A, B, C and each optional input given.
#[allow(clippy::too_many_arguments)]
fn check_ssd_scan(
    (b, l, h, p, g, n): (usize, usize, usize, usize, usize, usize),
    chunk: usize,
    with_d: bool,
    with_bias: bool,
    with_init: bool,
    softplus: bool,
    seed: u64,
) -> Result<(), TestCaseError> {
    let mut inputs = vec![
        random_f64(&[b, l, h, p], -1.0, 1.0, seed),
        steps(&[b, l, h], softplus, seed ^ 1),
        random_f64(&[h], -1.5, -0.2, seed ^ 2),
        random_f64(&[b, l, g, n], -1.0, 1.0, seed ^ 3),
        random_f64(&[b, l, g, n], -1.0, 1.0, seed ^ 4),
    ];
    let di = push_if(&mut inputs, with_d, random_f64(&[h], -1.0, 1.0, seed ^ 5));
    let bi = push_if(&mut inputs, with_bias, random_f64(&[h], 0.0, 0.3, seed ^ 6));
    let ii = push_if(
        &mut inputs,
        with_init,
        random_f64(&[b, h, p, n], -1.0, 1.0, seed ^ 7),
    );
    check(
        |v| {
            let opt = |i: Option<usize>| i.map(|i| &v[i]);
            Ok(v[0]
                .ssd_scan(
                    &v[1],
                    &v[2],
                    &v[3],
                    &v[4],
                    opt(di),
                    opt(bi),
                    softplus,
                    chunk,
                    opt(ii),
                )?
                .0)
        },
        &inputs,
    )
}

proptest! {
    #![proptest_config(config(12))]

    #[test]
    fn selective_scan_gradients(
        b in 1usize..3, d in 1usize..4, l in 1usize..7, n in 1usize..4,
        options in 0u32..16, seed in any::<u64>(),
    ) {
        let flag = |i: u32| options >> i & 1 == 1;
        check_selective_scan((b, d, l, n), flag(0), flag(1), flag(2), flag(3), seed)?;
    }

    #[test]
    fn ssd_scan_gradients(
        b in 1usize..3, l in 1usize..10, heads_per_group in 1usize..3, g in 1usize..3, p in 1usize..3,
        n in 1usize..4, chunk in 1usize..5, options in 0u32..16, seed in any::<u64>(),
    ) {
        let flag = |i: u32| options >> i & 1 == 1;
        let dims = (b, l, g * heads_per_group, p, g, n);
        check_ssd_scan(dims, chunk, flag(0), flag(1), flag(2), flag(3), seed)?;
    }
}

#[test]
fn selective_scan_gradients_with_and_without_every_option() {
    for options in 0u32..16 {
        let flag = |i: u32| options >> i & 1 == 1;
        check_selective_scan(
            (2, 3, 5, 2),
            flag(0),
            flag(1),
            flag(2),
            flag(3),
            40 + options as u64,
        )
        .unwrap();
    }
}

#[test]
fn ssd_scan_gradients_with_a_partial_last_chunk_and_two_groups() {
    // L = 7 in chunks of 3 (the last has one step); four heads over two groups.
    for options in 0u32..16 {
        let flag = |i: u32| options >> i & 1 == 1;
        let dims = (2, 7, 4, 2, 2, 3);
        check_ssd_scan(dims, 3, flag(0), flag(1), flag(2), flag(3), 70 + options as u64).unwrap();
    }
}

/// mamba_ssm's `selective_scan_ref` as plain f64 loops over u, delta, z `[B, D, L]`, A `[D, N]`,
/// B, C `[B, N, L]`, D, delta_bias `[D]` (row-major values); returns y and the last state.
#[allow(clippy::too_many_arguments)]
fn naive_selective_scan(
    (bs, dim, len, n): (usize, usize, usize, usize),
    u: &[f64],
    delta: &[f64],
    a: &[f64],
    b: &[f64],
    c: &[f64],
    d: Option<&[f64]>,
    z: Option<&[f64]>,
    bias: Option<&[f64]>,
    softplus: bool,
) -> (Vec<f64>, Vec<f64>) {
    let mut y = vec![0.0; bs * dim * len];
    let mut last = vec![0.0; bs * dim * n];
    for bi in 0..bs {
        for di in 0..dim {
            let mut h = vec![0.0; n];
            for t in 0..len {
                let at = (bi * dim + di) * len + t;
                let mut dt = delta[at] + bias.map_or(0.0, |v| v[di]);
                if softplus {
                    dt = (1.0 + dt.exp()).ln();
                }
                let mut out = 0.0;
                for (k, hk) in h.iter_mut().enumerate() {
                    let bc = (bi * n + k) * len + t;
                    *hk = (dt * a[di * n + k]).exp() * *hk + dt * b[bc] * u[at];
                    out += c[bc] * *hk;
                }
                out += d.map_or(0.0, |v| v[di]) * u[at];
                if let Some(z) = z {
                    out *= z[at] / (1.0 + (-z[at]).exp());
                }
                y[at] = out;
            }
            last[(bi * dim + di) * n..][..n].copy_from_slice(&h);
        }
    }
    (y, last)
}

/// The largest |a - b| over max |b|.
fn rel_max_err(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-30);
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max) / scale
}

#[test]
fn selective_scan_matches_a_naive_loop() {
    let dims @ (bs, dim, len, n) = (2, 5, 13, 6);
    let mut rng = tensor::seeded_rng(3);
    let mut draw = |shape: &[usize], lo: f64, hi: f64| {
        Tensor::rand_uniform(shape, DType::F32, lo, hi, &mut rng).unwrap()
    };
    let (u, delta, a) = (
        draw(&[bs, dim, len], -1.0, 1.0),
        draw(&[bs, dim, len], -2.0, 1.0),
        draw(&[dim, n], -2.0, -0.1),
    );
    let (b, c) = (draw(&[bs, n, len], -1.0, 1.0), draw(&[bs, n, len], -1.0, 1.0));
    let (d, z, bias) = (
        draw(&[dim], -1.0, 1.0),
        draw(&[bs, dim, len], -3.0, 3.0),
        draw(&[dim], -0.5, 0.5),
    );
    let v = |t: &Tensor| t.to_vec_f64();
    for with_options in [false, true] {
        let opt = |t: &Tensor| with_options.then(|| t.clone());
        let (od, oz, ob) = (opt(&d), opt(&z), opt(&bias));
        let (y, last) = u
            .selective_scan(
                &delta,
                &a,
                &b,
                &c,
                od.as_ref(),
                oz.as_ref(),
                ob.as_ref(),
                with_options,
            )
            .unwrap();
        assert_eq!((y.dtype(), last.dtype()), (DType::F32, DType::F32));
        let (vd, vz, vb) = (od.as_ref().map(v), oz.as_ref().map(v), ob.as_ref().map(v));
        let (ny, nlast) = naive_selective_scan(
            dims,
            &v(&u),
            &v(&delta),
            &v(&a),
            &v(&b),
            &v(&c),
            vd.as_deref(),
            vz.as_deref(),
            vb.as_deref(),
            with_options,
        );
        let errs = (rel_max_err(&v(&y), &ny), rel_max_err(&v(&last), &nlast));
        assert!(errs.0 < 1e-5 && errs.1 < 1e-5, "options {with_options}: {errs:?}");
    }
}

#[test]
fn ssd_with_one_dimensional_heads_is_a_selective_scan() {
    // SSD with P = 1 and one group is the selective scan with D = H channels, A[d, n] = A_h and
    // B, C shared by all channels.
    let (bs, len, heads, n) = (2, 11, 3, 4);
    let x = random_f64(&[bs, len, heads, 1], -1.0, 1.0, 1);
    let dt = random_f64(&[bs, len, heads], -1.0, 1.0, 2);
    let a = random_f64(&[heads], -1.5, -0.2, 3);
    let (b, c) = (
        random_f64(&[bs, len, 1, n], -1.0, 1.0, 4),
        random_f64(&[bs, len, 1, n], -1.0, 1.0, 5),
    );
    let (d, bias) = (
        random_f64(&[heads], -1.0, 1.0, 6),
        random_f64(&[heads], -0.5, 0.5, 7),
    );
    let (y, last) = x
        .ssd_scan(&dt, &a, &b, &c, Some(&d), Some(&bias), true, 4, None)
        .unwrap();
    let channels = |t: &Tensor| t.reshape(&[bs, len, heads]).unwrap().transpose(1, 2).unwrap();
    let states = |t: &Tensor| t.reshape(&[bs, len, n]).unwrap().transpose(1, 2).unwrap();
    let (ys, last_s) = channels(&x)
        .selective_scan(
            &channels(&dt),
            &a.reshape(&[heads, 1]).unwrap().broadcast_to(&[heads, n]).unwrap(),
            &states(&b),
            &states(&c),
            Some(&d),
            None,
            Some(&bias),
            true,
        )
        .unwrap();
    let y = channels(&y).to_vec_f64();
    assert!(rel_max_err(&y, &ys.to_vec_f64()) < 1e-12);
    assert!(rel_max_err(&last.to_vec_f64(), &last_s.to_vec_f64()) < 1e-12);
}

/// A case from CI whose gradient w.r.t. A is ~1e-4: plain central differences saw their own
/// rounding noise as a 1.6e-6 relative error there.
#[test]
fn selective_scan_gradients_when_one_gradient_is_tiny() {
    check_selective_scan((1, 1, 2, 1), true, true, false, false, 14081936469427962774).unwrap();
}
