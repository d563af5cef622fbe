//! The paper's Figure 1 for any checkpoint: how strongly each image token is carried through the
//! LM. For one image and prompt, the L2 norm of each image token's hidden state after chosen LM
//! layers, as a heat map over the patch grid (one colour scale per model), and the image with
//! the strongest patches outlined per layer; several models one under the other.
//!
//! The hidden states are the per-layer outputs of the LM's ordinary forward pass over
//! `[image tokens | prompt]` (the list [`nn::MambaLm::forward_embeds`] returns, the same one the
//! multi-scale fusion reads), not a second copy of the model code.

use crate::error::{EmmaError, Result};
use crate::model::Emma;
use crate::picture::{draw_png, FONT};
use image::RgbImage;
use plotters::prelude::*;
use plotters::style::colors::colormaps::ViridisRGB;
use std::path::Path;

/// Side of one heat map or image panel, in pixels.
pub const CELL: u32 = 140;
/// Space between panels.
const GAP: u32 = 16;
/// Left margin.
const LEFT: u32 = 20;
/// Room right of the heat maps for the colour scale.
const SCALE_ROOM: u32 = 110;
/// Heights within one model's block: title line, layer labels, heat maps, space, images, space.
const TITLE: u32 = 36;
const LABELS: u32 = 22;
const BETWEEN: u32 = 10;
const AFTER: u32 = 24;
const BLOCK: u32 = TITLE + LABELS + CELL + BETWEEN + CELL + AFTER;

/// One model's row of the picture.
pub struct ModelMaps {
    /// What the picture calls the model.
    pub name: String,
    /// The model's generated answer.
    pub answer: String,
    /// The LM layers drawn (block outputs, from 0).
    pub layers: Vec<usize>,
    /// Per drawn layer, the norm of each image token's hidden state (raster order of patches).
    pub norms: Vec<Vec<f32>>,
    /// Patches per side of the grid.
    pub grid: usize,
}

/// The L2 norm of each image token's hidden state after each LM layer in `layers`, for `image`
/// followed by the token ids `prompt`: `[layer][token]`. A layer index past the LM's depth is an
/// error naming it and the depth.
pub fn image_token_norms(
    model: &Emma,
    image: &RgbImage,
    prompt: &[u32],
    layers: &[usize],
) -> Result<Vec<Vec<f32>>> {
    let depth = model.config().lm.layers;
    if let Some(&bad) = layers.iter().find(|&&l| l >= depth) {
        return Err(EmmaError::Prompt(format!(
            "layer {bad} is past the LM's depth ({depth} layers: 0 to {})",
            depth - 1
        )));
    }
    let n = model.config().vision.tokens();
    let embeds = crate::generate::prompt_embeds(model, Some(image), prompt)?;
    let (_, per_layer) = model.lm().forward_embeds(&autograd::Var::constant(embeds))?;
    layers
        .iter()
        .map(|&l| {
            let hidden = per_layer[l].value().narrow(1, 0, n)?;
            let norms = hidden.mul(&hidden)?.sum(&[2], false)?.sqrt()?;
            Ok(norms
                .to_device(tensor::Device::Cpu)?
                .to_vec_f64()
                .iter()
                .map(|&v| v as f32)
                .collect())
        })
        .collect()
}

/// The heat map's colour for `t` in [0, 1] (viridis; outside is clamped).
pub fn heat_colour(t: f64) -> RGBColor {
    ViridisRGB::get_color(t.clamp(0.0, 1.0))
}

/// The picture's size for `models` rows of `columns` layers.
pub fn picture_size(models: usize, columns: usize) -> (u32, u32) {
    (
        LEFT + columns as u32 * (CELL + GAP) + SCALE_ROOM,
        models as u32 * BLOCK + 10,
    )
}

/// The pixel at the centre of `patch` in the heat map of `column` in model row `row`, for a
/// `grid` x `grid` patch grid.
pub fn heat_cell_centre(row: usize, column: usize, grid: usize, patch: usize) -> (u32, u32) {
    let (x0, y0) = heat_origin(row, column);
    let (r, c) = ((patch / grid) as u32, (patch % grid) as u32);
    let g = grid as u32;
    (
        x0 + (c * CELL / g + (c + 1) * CELL / g) / 2,
        y0 + (r * CELL / g + (r + 1) * CELL / g) / 2,
    )
}

/// Top-left corner of a heat map.
fn heat_origin(row: usize, column: usize) -> (u32, u32) {
    (
        LEFT + column as u32 * (CELL + GAP),
        row as u32 * BLOCK + TITLE + LABELS,
    )
}

/// The `k` patches with the largest norms, largest first.
pub fn top_patches(norms: &[f32], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..norms.len()).collect();
    order.sort_by(|&a, &b| norms[b].total_cmp(&norms[a]));
    order.truncate(k);
    order
}

/// Draws `models` for `image` into the PNG `path` (atomically): per model a title with its
/// answer, a row of heat maps on one colour scale (shown at the right), and a row of the image
/// with the `top` strongest patches of each layer outlined.
pub fn draw_maps(path: &Path, image: &RgbImage, models: &[ModelMaps], top: usize) -> Result<()> {
    let columns = models.iter().map(|m| m.layers.len()).max().unwrap_or(0);
    let size = picture_size(models.len(), columns);
    let scaled = image::imageops::resize(image, CELL, CELL, image::imageops::FilterType::Nearest);
    draw_png(path, size, |root| {
        for (row, m) in models.iter().enumerate() {
            draw_model(root, row, m, &scaled, top).map_err(|e| e.to_string())?;
        }
        Ok(())
    })
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;
type DrawResult = std::result::Result<(), Box<dyn std::error::Error>>;

/// The corners of `patch` of a `g` x `g` grid drawn over the panel at `origin`.
fn patch_corners((x0, y0): (i32, i32), patch: usize, g: u32) -> [(i32, i32); 2] {
    let (r, c) = (patch as u32 / g, patch as u32 % g);
    let at = |i: u32| (i * CELL / g) as i32;
    [(x0 + at(c), y0 + at(r)), (x0 + at(c + 1) - 1, y0 + at(r + 1) - 1)]
}

/// One model's block.
fn draw_model(root: &Area, row: usize, m: &ModelMaps, scaled: &RgbImage, top: usize) -> DrawResult {
    let y_block = (row as u32 * BLOCK) as i32;
    let title = format!("{}: answered \"{}\"", m.name, m.answer);
    root.draw(&Text::new(
        title,
        (LEFT as i32, y_block + 8),
        (FONT, 20).into_font(),
    ))?;
    let (lo, hi) = m
        .norms
        .iter()
        .flatten()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        });
    let span = f64::from(hi - lo).max(f64::MIN_POSITIVE);
    let g = m.grid as u32;
    for (column, (layer, norms)) in m.layers.iter().zip(&m.norms).enumerate() {
        let (x0, y0) = heat_origin(row, column);
        let (x0, y0) = (x0 as i32, y0 as i32);
        root.draw(&Text::new(
            format!("layer {layer}"),
            (x0, y0 - LABELS as i32 + 2),
            (FONT, 16).into_font(),
        ))?;
        for (patch, &v) in norms.iter().enumerate() {
            let colour = heat_colour(f64::from(v - lo) / span);
            root.draw(&Rectangle::new(
                patch_corners((x0, y0), patch, g),
                colour.filled(),
            ))?;
        }
        let yi = y0 + (CELL + BETWEEN) as i32;
        for (x, y, p) in scaled.enumerate_pixels() {
            root.draw_pixel((x0 + x as i32, yi + y as i32), &RGBColor(p[0], p[1], p[2]))?;
        }
        for patch in top_patches(norms, top) {
            root.draw(&Rectangle::new(
                patch_corners((x0, yi), patch, g),
                RED.stroke_width(2),
            ))?;
        }
    }
    // The row's colour scale: a vertical bar from the smallest norm (bottom) to the largest.
    let (x0, y0) = heat_origin(row, m.layers.len());
    let (x0, y0) = (x0 as i32, y0 as i32);
    for i in 0..CELL as i32 {
        let t = 1.0 - f64::from(i) / f64::from(CELL - 1);
        root.draw(&Rectangle::new(
            [(x0, y0 + i), (x0 + 16, y0 + i + 1)],
            heat_colour(t).filled(),
        ))?;
    }
    let label = (FONT, 14).into_font();
    root.draw(&Text::new(format!("{hi:.3}"), (x0 + 22, y0), label.clone()))?;
    root.draw(&Text::new(
        format!("{lo:.3}"),
        (x0 + 22, y0 + CELL as i32 - 14),
        label.clone(),
    ))?;
    root.draw(&Text::new("norm", (x0, y0 - LABELS as i32 + 2), label))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_strongest_patches_come_first_and_cells_lie_inside_their_map() {
        assert_eq!(top_patches(&[0.5, 2.0, 1.0, 3.0], 2), [3, 1]);
        let (w, h) = picture_size(2, 3);
        for patch in 0..16 {
            let (x, y) = heat_cell_centre(1, 2, 4, patch);
            assert!(x < w && y < h);
            let (x0, y0) = heat_origin(1, 2);
            assert!((x0..x0 + CELL).contains(&x) && (y0..y0 + CELL).contains(&y));
        }
    }
}
