//! The NCCL collectives on device tensors (`tensor::nccl::NcclGroup`), one rank on `cuda:0`:
//! with one rank the sum over ranks of a buffer is the buffer, and so are its one segment and
//! the gather of it, bit for bit, in f32 and bf16, also for a reduce-scatter only started (on
//! the collectives' stream) and settled later. This checks the plumbing to the library (unique
//! id, communicator, datatypes, streams); sums over several ranks need several GPUs.
//!
//! NCCL needs a real GPU: on the emulated device, or without one, the test prints one line
//! `skipped: <reason>` and passes (with `EMMA_REQUIRE_GPU=1` and no GPU at all it fails).

use tensor::nccl::NcclGroup;
use tensor::{DType, Tensor};
use tests::gpu::{gpu_ready, GPU};
use tests::{random_ref, to_tensor};

#[test]
fn one_rank_collectives_return_their_input() {
    if !gpu_ready() {
        return;
    }
    if tensor::cuda_device(0).unwrap().is_emulated() {
        println!("skipped: NCCL needs a real GPU (EMMA_GPU=emulate is set)");
        return;
    }
    let id = NcclGroup::unique_id().unwrap();
    let group = NcclGroup::new(GPU, &id, 0, 1).unwrap();
    assert_eq!((group.rank(), group.world()), (0, 1));
    for dtype in [DType::F32, DType::BF16] {
        let x = to_tensor(&random_ref(&[4099], -3.0, 3.0, 7), dtype)
            .to_device(GPU)
            .unwrap();
        let want = x.to_vec_f64();
        // A started reduce-scatter runs on the collectives' stream while later kernels run on
        // the device's; after settling, the kernels that follow see its result.
        let started = group.start_reduce_scatter_sum(&x).unwrap();
        let meanwhile = x.affine(3.0, 0.0).unwrap();
        group.settle().unwrap();
        let doubled = started.affine(2.0, 0.0).unwrap();
        let outputs: [(&str, Tensor); 5] = [
            ("all_reduce", group.all_reduce_sum(&x).unwrap()),
            ("reduce_scatter", group.reduce_scatter_sum(&x).unwrap()),
            ("all_gather", group.all_gather(&x).unwrap()),
            ("started reduce_scatter", started),
            (
                "half of the doubled started reduce_scatter",
                doubled.affine(0.5, 0.0).unwrap(),
            ),
        ];
        assert_eq!(meanwhile.to_vec_f64(), x.affine(3.0, 0.0).unwrap().to_vec_f64());
        for (name, out) in outputs {
            assert_eq!(out.dtype(), dtype, "{name}");
            assert_eq!(out.to_vec_f64(), want, "{name} in {dtype:?}");
        }
    }
    let host = Tensor::from_slice(&[1.0f32, 2.0], &[2]).unwrap();
    let err = group.all_reduce_sum(&host).unwrap_err();
    assert!(err.to_string().contains("different devices"), "{err}");
}
