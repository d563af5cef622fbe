//! `emma::generate`: after the tiny preset has learned two image–question–answer examples, greedy
//! generation (prefill, then recurrent decoding) answers each image with the answer it was taught
//! and stops at end-of-text; the token limit and the tokenizer's size are honoured.

use emma::config::EmmaConfig;
use emma::generate::{generate, generate_streaming, GenerateOptions};
use emma::image::{from_rgb_bytes, pixels_for_both};
use emma::model::{Batch, Emma};
use emma::prompt::Conversation;
use emma::sampling::Sampling;
use emma::tokenizer::Tokenizer;
use image::RgbImage;
use nn::{AdamW, AdamWConfig, ParamStore};
use tensor::{DType, Tensor};

/// A `size x size` image of one flat colour with a white square in the top-left quarter.
fn image(size: usize, rgb: [u8; 3]) -> RgbImage {
    let mut bytes = Vec::with_capacity(size * size * 3);
    for y in 0..size {
        for x in 0..size {
            let white = x < size / 2 && y < size / 2;
            bytes.extend(if white { [255, 255, 255] } else { rgb });
        }
    }
    from_rgb_bytes(size, size, &bytes).unwrap()
}

fn greedy(max_new_tokens: usize) -> GenerateOptions {
    GenerateOptions {
        max_new_tokens,
        sampling: Sampling::Greedy,
        seed: 0,
    }
}

#[test]
fn a_trained_tiny_model_answers_each_image_with_its_answer() {
    let cfg = EmmaConfig::preset("tiny").unwrap();
    let tok = Tokenizer::train_builtin(cfg.lm.vocab).unwrap();
    let question = "What colour is the background?";
    let examples = [
        (image(24, [200, 20, 20]), "red"),
        (image(24, [20, 20, 200]), "dark blue"),
    ];

    let mut ids = Vec::new();
    let mut labels = Vec::new();
    let (mut siglip, mut dinov2) = (Vec::new(), Vec::new());
    let encoded: Vec<_> = examples
        .iter()
        .map(|(_, a)| {
            Conversation::single(question, Some(a.to_string()))
                .encode_for_training(&tok)
                .unwrap()
        })
        .collect();
    let width = encoded.iter().map(|(i, _)| i.len()).max().unwrap();
    for ((img, _), (i, l)) in examples.iter().zip(&encoded) {
        // Pad at the end with end-of-text tokens that take no part in the loss.
        ids.extend(
            i.iter()
                .copied()
                .chain(std::iter::repeat(tok.eos_id()))
                .take(width),
        );
        labels.extend(
            l.iter()
                .copied()
                .chain(std::iter::repeat(emma::model::IGNORE_INDEX))
                .take(width),
        );
        let (s, d) = pixels_for_both(img, cfg.vision.image_size).unwrap();
        siglip.push(s.unsqueeze(0).unwrap());
        dinov2.push(d.unsqueeze(0).unwrap());
    }
    let batch = Batch {
        siglip_pixels: Tensor::concat(&siglip.iter().collect::<Vec<_>>(), 0).unwrap(),
        dinov2_pixels: Tensor::concat(&dinov2.iter().collect::<Vec<_>>(), 0).unwrap(),
        ids: Tensor::from_vec(ids, &[2, width]).unwrap(),
        labels: Tensor::from_vec(labels, &[2, width]).unwrap(),
    };

    let mut params = Emma::random(&cfg, 1, DType::F32, true).unwrap().store().tensors();
    let mut opt = AdamW::new(AdamWConfig {
        lr: 3e-3,
        ..Default::default()
    });
    let mut loss = f64::INFINITY;
    for _ in 0..300 {
        let model = Emma::new(&cfg, ParamStore::new(params.clone(), true, "train")).unwrap();
        let losses = model.losses(&batch).unwrap();
        loss = losses.text.value().to_scalar_f64().unwrap();
        if loss < 0.01 {
            break;
        }
        losses.total.backward().unwrap();
        opt.step(&mut params, &model.store().grads()).unwrap();
    }
    assert!(loss < 0.01, "training did not converge: text loss {loss}");

    let model = Emma::new(&cfg, ParamStore::new(params, false, "trained")).unwrap();
    for (img, answer) in &examples {
        let out = generate(
            &model,
            &tok,
            Some(img),
            &Conversation::single(question, None),
            &greedy(20),
        )
        .unwrap();
        assert_eq!(out.text, *answer);
        assert!(out.finished, "no end-of-text after {:?}", out.ids);
    }
}

#[test]
fn generation_stops_at_the_token_limit() {
    let cfg = EmmaConfig::preset("tiny").unwrap();
    let tok = Tokenizer::train_builtin(cfg.lm.vocab).unwrap();
    let model = Emma::random(&cfg, 7, DType::F32, false).unwrap();
    let img = image(10, [0, 120, 0]);
    let conv = Conversation::single("How many shapes?", None);
    for limit in [0, 1, 5] {
        let out = generate(&model, &tok, Some(&img), &conv, &greedy(limit)).unwrap();
        assert!(out.ids.len() <= limit);
        assert!(out.finished || out.ids.len() == limit, "{limit}: {out:?}");
    }
    let sampled = GenerateOptions {
        max_new_tokens: 6,
        sampling: Sampling::TopP {
            temperature: 1.0,
            top_p: 0.9,
        },
        seed: 3,
    };
    let a = generate(&model, &tok, Some(&img), &conv, &sampled).unwrap();
    let b = generate(&model, &tok, Some(&img), &conv, &sampled).unwrap();
    assert_eq!(a, b, "sampling with one seed is deterministic");
    // Streamed, the pieces arrive in order and make up the same answer.
    let mut pieces = Vec::new();
    let streamed = generate_streaming(&model, &tok, Some(&img), &conv, &sampled, &mut |p| {
        pieces.push(p.to_owned())
    })
    .unwrap();
    assert_eq!(streamed, a);
    assert!(pieces.len() > 1 || a.ids.len() <= 1, "{pieces:?}");
    assert_eq!(pieces.concat(), a.text);
}

#[test]
fn a_tokenizer_larger_than_the_vocabulary_is_refused() {
    let mut cfg = EmmaConfig::preset("tiny").unwrap();
    cfg.lm.vocab = 300;
    let model = Emma::random(&cfg, 0, DType::F32, false).unwrap();
    let tok = Tokenizer::train_builtin(512).unwrap();
    let err = generate(
        &model,
        &tok,
        Some(&image(8, [1, 2, 3])),
        &Conversation::single("hi", None),
        &greedy(3),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("512 tokens") && err.contains("300"), "{err}");
}
