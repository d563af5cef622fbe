//! The tiny preset, trained with AdamW on one fixed batch of 4 image–question–answer examples
//! whose answers differ only through the images, drives the text loss below 5% of its start.

use emma::config::EmmaConfig;
use emma::model::{Batch, Emma, IGNORE_INDEX};
use nn::{AdamW, AdamWConfig, ParamStore};
use tensor::{DType, Tensor};

/// Four images, each a different flat colour with a bright square in a different corner.
fn images(size: usize) -> Tensor {
    let mut data = vec![0f32; 4 * 3 * size * size];
    for i in 0..4 {
        for c in 0..3 {
            for y in 0..size {
                for x in 0..size {
                    let corner = (y < size / 2) as usize * 2 + (x < size / 2) as usize;
                    let base = [0.2, -0.4, 0.6, -0.8][(i + c) % 4];
                    let v = if corner == i { 1.5 } else { base };
                    data[((i * 3 + c) * size + y) * size + x] = v;
                }
            }
        }
    }
    Tensor::from_vec(data, &[4, 3, size, size]).unwrap()
}

#[test]
fn tiny_preset_overfits_one_batch() {
    let cfg = EmmaConfig::preset("tiny").unwrap();
    let question = [5u32, 6, 7, 8];
    let mut ids: Vec<u32> = Vec::new();
    let mut labels: Vec<u32> = Vec::new();
    for i in 0..4u32 {
        let answer = [100 + i, 200 + 7 * i, 1];
        ids.extend(question.iter().chain(&answer));
        labels.extend(question.iter().map(|_| IGNORE_INDEX).chain(answer));
    }
    let pixels = images(cfg.vision.image_size);
    let batch = Batch {
        siglip_pixels: pixels.clone(),
        dinov2_pixels: pixels,
        ids: Tensor::from_vec(ids, &[4, 7]).unwrap(),
        labels: Tensor::from_vec(labels, &[4, 7]).unwrap(),
    };
    let mut params = Emma::random(&cfg, 0, DType::F32, true).unwrap().store().tensors();
    let mut opt = AdamW::new(AdamWConfig {
        lr: 3e-3,
        ..Default::default()
    });
    let mut first = None;
    let mut last = f64::INFINITY;
    for step in 0..300 {
        let model = Emma::new(&cfg, ParamStore::new(params.clone(), true, "overfit")).unwrap();
        let losses = model.losses(&batch).unwrap();
        last = losses.text.value().to_scalar_f64().unwrap();
        let start = *first.get_or_insert(last);
        if last < 0.05 * start {
            eprintln!("text loss {start:.3} -> {last:.4} after {step} steps");
            return;
        }
        losses.total.backward().unwrap();
        opt.step(&mut params, &model.store().grads()).unwrap();
    }
    panic!("text loss went from {:?} to {last} in 300 steps", first);
}
