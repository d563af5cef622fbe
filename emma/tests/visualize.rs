//! `emma visualize`: the heat maps drawn into the PNG are the norms of the image tokens' hidden
//! states, computed here independently (the LM's per-layer outputs over the image tokens alone,
//! norms by a plain loop); the picture has one block per model; bad input is a clear error.

use emma::commands::visualize_row;
use emma::config::EmmaConfig;
use emma::model::Emma;
use emma::visualize::{draw_maps, heat_cell_centre, heat_colour, picture_size, ModelMaps};
use image::RgbImage;
use std::path::Path;
use tensor::{DType, Device};

/// A random tiny model saved in `dir`.
fn saved_model(dir: &Path, seed: u64) -> Emma {
    let cfg = EmmaConfig::named("tiny").unwrap();
    let model = Emma::random(&cfg, seed, DType::F32, false).unwrap();
    emma::checkpoint::save(&model, dir).unwrap();
    model
}

/// A 64x64 picture: a red square on a light background.
fn picture() -> RgbImage {
    RgbImage::from_fn(64, 64, |x, y| {
        if (10..30).contains(&x) && (30..50).contains(&y) {
            image::Rgb([220, 30, 30])
        } else {
            image::Rgb([235, 235, 245])
        }
    })
}

/// Norms of the image tokens after each LM layer, by a plain loop over the hidden states of the
/// LM's forward over the image tokens alone.
fn norms_by_hand(model: &Emma, image: &RgbImage) -> Vec<Vec<f32>> {
    let (s, d) = emma::image::pixels_for_both(image, model.config().vision.image_size).unwrap();
    let tokens = model
        .image_tokens(&s.unsqueeze(0).unwrap(), &d.unsqueeze(0).unwrap())
        .unwrap();
    let (_, per_layer) = model.lm().forward_embeds(&tokens).unwrap();
    per_layer
        .iter()
        .map(|h| {
            let v = h.value().to_vec_f64();
            let width = h.value().dim(2);
            v.chunks(width)
                .map(|row| row.iter().map(|x| x * x).sum::<f64>().sqrt() as f32)
                .collect()
        })
        .collect()
}

#[test]
fn the_drawn_heat_maps_are_the_hidden_state_norms() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("cobra/final"), dir.path().join("emma-model"));
    let models = [saved_model(&a, 1), saved_model(&b, 2)];
    let img = picture();
    let layers = [0usize, 2, 3];
    let rows: Vec<ModelMaps> = [&a, &b]
        .iter()
        .map(|d| {
            visualize_row(
                d,
                &img,
                "what color is the shape?",
                Some(&layers),
                4,
                None,
                Device::Cpu,
            )
            .unwrap()
        })
        .collect();
    assert_eq!(rows[0].name, "cobra");
    assert_eq!(rows[1].name, "emma-model");
    let out = dir.path().join("maps.png");
    draw_maps(&out, &img, &rows, 3).unwrap();
    let png = image::open(&out).unwrap().to_rgb8();
    assert_eq!(png.dimensions(), picture_size(2, layers.len()));
    for (row, (model, drawn)) in models.iter().zip(&rows).enumerate() {
        let all = norms_by_hand(model, &img);
        let want: Vec<&Vec<f32>> = layers.iter().map(|&l| &all[l]).collect();
        // The norms the picture was drawn from (with the prompt after the image) are those of
        // the image tokens alone: the LM is causal.
        for (w, d) in want.iter().zip(&drawn.norms) {
            for (x, y) in w.iter().zip(d) {
                assert!((x - y).abs() <= 1e-4 * x.abs().max(1.0), "{x} vs {y}");
            }
        }
        let lo = want
            .iter()
            .flat_map(|v| v.iter())
            .fold(f32::INFINITY, |a, &b| a.min(b));
        let hi = want
            .iter()
            .flat_map(|v| v.iter())
            .fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        assert!(hi > lo, "the norms do not vary over the patches");
        for (column, norms) in want.iter().enumerate() {
            for (patch, &v) in norms.iter().enumerate() {
                let (x, y) = heat_cell_centre(row, column, drawn.grid, patch);
                let got = png.get_pixel(x, y).0;
                let colour = heat_colour(f64::from(v - lo) / f64::from(hi - lo));
                let expected = [colour.0, colour.1, colour.2];
                let close = got.iter().zip(expected).all(|(&g, e)| g.abs_diff(e) <= 2);
                assert!(
                    close,
                    "model {row} layer {} patch {patch}: drew {got:?}, want {expected:?}",
                    layers[column]
                );
            }
        }
    }
}

#[test]
fn bad_input_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = dir.path().join("m");
    saved_model(&model_dir, 3);
    let img = picture();
    let row = |d: &Path, layers: &[usize]| {
        visualize_row(d, &img, "what shape?", Some(layers), 2, None, Device::Cpu)
            .err()
            .map(|e| format!("{e:#}"))
            .unwrap_or_default()
    };
    let err = row(&dir.path().join("missing"), &[0]);
    assert!(err.contains("missing"), "{err}");
    let err = row(&model_dir, &[0, 4]);
    assert!(err.contains("layer 4") && err.contains("4 layers"), "{err}");
    let bad = dir.path().join("bad.png");
    std::fs::write(&bad, b"not a png").unwrap();
    let err = emma::image::load_image(&bad).unwrap_err().to_string();
    assert!(err.contains("bad.png"), "{err}");
    let maps = visualize_row(&model_dir, &img, "what shape?", Some(&[0]), 2, None, Device::Cpu).unwrap();
    let err = draw_maps(&dir.path().join("no/dir/out.png"), &img, &[maps], 3)
        .unwrap_err()
        .to_string();
    assert!(err.contains("no/dir/out.png"), "{err}");
}
