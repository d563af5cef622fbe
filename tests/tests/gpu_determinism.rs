//! The device kernels that sum across blocks are bitwise reproducible: the Mamba-1 scan's
//! backward (dB and dC sum over channels), the SSD scan's backward (dB and dC over the heads of a
//! group, the per-step sums over head-dimension tiles, the state products over slices of the
//! state) and the scatter-add of the embedding backward (repeated ids). Each runs three times on
//! the same fresh random inputs, shaped so that many blocks add into the same outputs; every
//! output must have the same bits each time. Training on a GPU resumes bit-identically only
//! because of this.
//!
//! Without a GPU every test prints one line `skipped: <reason>` and passes; with
//! `EMMA_REQUIRE_GPU=1` it fails instead.

use tensor::{DType, Tensor};
use tests::gpu::{gpu_ready, GPU};
use tests::{random_ref, to_tensor};

/// Uniform values in `[lo, hi)` from `seed`, in f32 on the device under test.
fn on_gpu(shape: &[usize], lo: f64, hi: f64, seed: u64) -> Tensor {
    to_tensor(&random_ref(shape, lo, hi, seed), DType::F32)
        .to_device(GPU)
        .unwrap()
}

/// The bits of each named output.
fn bits(outputs: &[(&str, &Tensor)]) -> Vec<(String, Vec<u64>)> {
    outputs
        .iter()
        .map(|(name, t)| {
            let v = t.to_vec_f64();
            assert!(v.iter().all(|x| x.is_finite()), "{name} is not finite");
            (name.to_string(), v.iter().map(|x| x.to_bits()).collect())
        })
        .collect()
}

/// Runs `op` three times and asserts every output's bits agree with the first run's.
fn reproducible(op: impl Fn() -> Vec<(String, Vec<u64>)>) {
    let first = op();
    for run in 1..3 {
        for ((name, a), (_, b)) in first.iter().zip(op()) {
            let differ = a.iter().zip(&b).filter(|(x, y)| x != y).count();
            assert_eq!(
                differ,
                0,
                "{name}: {differ} of {} values changed on run {run}",
                a.len()
            );
        }
    }
}

#[test]
fn the_selective_scan_backward_is_bitwise_reproducible() {
    if !gpu_ready() {
        return;
    }
    // 64 channels sum into each dB and dC value.
    let (b, d, l, n) = (1, 64, 300, 16);
    let u = on_gpu(&[b, d, l], -1.0, 1.0, 1);
    let delta = on_gpu(&[b, d, l], -3.0, 0.5, 2);
    let a = on_gpu(&[d, n], -2.0, -0.2, 3);
    let (bm, cm) = (on_gpu(&[b, n, l], -1.0, 1.0, 4), on_gpu(&[b, n, l], -1.0, 1.0, 5));
    let (skip, z, bias) = (
        on_gpu(&[d], -1.0, 1.0, 6),
        on_gpu(&[b, d, l], -2.0, 2.0, 7),
        on_gpu(&[d], -1.0, 0.0, 8),
    );
    let grad = on_gpu(&[b, d, l], -1.0, 1.0, 9);
    reproducible(|| {
        let g = u
            .selective_scan_backward(
                &delta,
                &a,
                &bm,
                &cm,
                Some(&skip),
                Some(&z),
                Some(&bias),
                true,
                &grad,
            )
            .unwrap();
        let (dd, dz, dbias) = (g.dd.unwrap(), g.dz.unwrap(), g.ddelta_bias.unwrap());
        bits(&[
            ("du", &g.du),
            ("ddelta", &g.ddelta),
            ("dA", &g.da),
            ("dB", &g.db),
            ("dC", &g.dc),
            ("dD", &dd),
            ("dz", &dz),
            ("ddelta_bias", &dbias),
        ])
    });
}

#[test]
fn the_ssd_scan_backward_is_bitwise_reproducible() {
    if !gpu_ready() {
        return;
    }
    // 4 heads per group, a head dimension of three 64-wide tiles, P·N over many state slices.
    let (b, l, h, p, g, n, chunk) = (1, 150, 8, 150, 2, 64, 64);
    let x = on_gpu(&[b, l, h, p], -1.0, 1.0, 11);
    let dt = on_gpu(&[b, l, h], -3.0, 0.5, 12);
    let a = on_gpu(&[h], -1.5, -0.2, 13);
    let (bm, cm) = (
        on_gpu(&[b, l, g, n], -1.0, 1.0, 14),
        on_gpu(&[b, l, g, n], -1.0, 1.0, 15),
    );
    let (skip, bias) = (on_gpu(&[h], -1.0, 1.0, 16), on_gpu(&[h], -1.0, 0.0, 17));
    let initial = on_gpu(&[b, h, p, n], -1.0, 1.0, 18);
    let grad = on_gpu(&[b, l, h, p], -1.0, 1.0, 19);
    reproducible(|| {
        let gr = x
            .ssd_scan_backward(
                &dt,
                &a,
                &bm,
                &cm,
                Some(&skip),
                Some(&bias),
                true,
                chunk,
                Some(&initial),
                &grad,
            )
            .unwrap();
        let (dd, dbias, dinit) = (gr.dd.unwrap(), gr.ddt_bias.unwrap(), gr.dinitial_state.unwrap());
        bits(&[
            ("dx", &gr.dx),
            ("ddt", &gr.ddt),
            ("dA", &gr.da),
            ("dB", &gr.db),
            ("dC", &gr.dc),
            ("dD", &dd),
            ("ddt_bias", &dbias),
            ("dinitial_state", &dinit),
        ])
    });
}

#[test]
fn the_embedding_scatter_add_is_bitwise_reproducible() {
    if !gpu_ready() {
        return;
    }
    // 3000 ids over 7 rows: hundreds of additions into each row.
    let (rows, width, count) = (7, 33, 3000);
    let ids: Vec<u32> = (0..count).map(|i| ((i * 7919) % rows) as u32).collect();
    let ids = Tensor::from_vec(ids, &[count])
        .and_then(|t| t.to_device(GPU))
        .unwrap();
    let base = on_gpu(&[rows, width], -1.0, 1.0, 21);
    let src = on_gpu(&[count, width], -1.0, 1.0, 22);
    reproducible(|| bits(&[("sum", &base.index_add(0, &ids, &src).unwrap())]));
}
