//! Turning examples into model inputs: tokenized conversations with answer-only labels, padded
//! per batch, images preprocessed for both towers. Examples with and without images go into
//! separate parts: only the first part runs through the vision backbone.

use crate::data::Example;
use crate::error::Result;
use emma::image::pixels_for_both;
use emma::model::{Batch, IGNORE_INDEX};
use emma::tokenizer::Tokenizer;
use tensor::Tensor;

/// The examples of one micro-batch as model inputs.
pub struct MicroBatch {
    /// Examples with an image: `[image tokens | text]`.
    pub with_images: Option<Batch>,
    /// Text-only examples: `(ids, labels)`, both u32 `[B, T]`.
    pub text_only: Option<(Tensor, Tensor)>,
    /// Answer tokens that take part in the loss (each predicted by the position before it), in
    /// the image part and the text-only part.
    pub answer_tokens: [usize; 2],
    /// Number of images.
    pub images: usize,
    /// Positions the LM runs over (image tokens and padding included), for throughput.
    pub positions: usize,
}

/// Tokenizes and pads `examples` (each conversation cut to `max_len` text tokens) and
/// preprocesses their images to `image_size` (`tokens_per_image` LM positions each).
pub fn collate(
    examples: &[Example],
    tok: &Tokenizer,
    image_size: usize,
    tokens_per_image: usize,
    max_len: usize,
) -> Result<MicroBatch> {
    let mut imaged = Vec::new();
    let mut text = Vec::new();
    for ex in examples {
        let (mut ids, mut labels) = ex.conversation.encode_for_training(tok)?;
        ids.truncate(max_len);
        labels.truncate(max_len);
        match &ex.image {
            Some(img) => imaged.push((ids, labels, pixels_for_both(img, image_size)?)),
            None => text.push((ids, labels)),
        }
    }
    let mut out = MicroBatch {
        with_images: None,
        text_only: None,
        answer_tokens: [0, 0],
        images: imaged.len(),
        positions: 0,
    };
    if !imaged.is_empty() {
        let rows: Vec<_> = imaged
            .iter()
            .map(|(i, l, _)| (i.as_slice(), l.as_slice()))
            .collect();
        let (ids, labels, width) = pad(&rows, tok.eos_id(), 1);
        out.answer_tokens[0] = count_learned(&labels, width, 0);
        out.positions += imaged.len() * (width + tokens_per_image);
        let siglip: Vec<Tensor> = imaged
            .iter()
            .map(|(_, _, (s, _))| s.unsqueeze(0))
            .collect::<tensor::Result<_>>()?;
        let dinov2: Vec<Tensor> = imaged
            .iter()
            .map(|(_, _, (_, d))| d.unsqueeze(0))
            .collect::<tensor::Result<_>>()?;
        out.with_images = Some(Batch {
            siglip_pixels: Tensor::concat(&siglip.iter().collect::<Vec<_>>(), 0)?,
            dinov2_pixels: Tensor::concat(&dinov2.iter().collect::<Vec<_>>(), 0)?,
            ids: Tensor::from_vec(ids, &[imaged.len(), width])?,
            labels: Tensor::from_vec(labels, &[imaged.len(), width])?,
        });
    }
    if !text.is_empty() {
        let rows: Vec<_> = text.iter().map(|(i, l)| (i.as_slice(), l.as_slice())).collect();
        let (ids, labels, width) = pad(&rows, tok.eos_id(), 2);
        // The first token of a text-only sequence has no position before it to predict it.
        out.answer_tokens[1] = count_learned(&labels, width, 1);
        out.positions += text.len() * width;
        out.text_only = Some((
            Tensor::from_vec(ids, &[text.len(), width])?,
            Tensor::from_vec(labels, &[text.len(), width])?,
        ));
    }
    Ok(out)
}

/// Pads rows to a common width (at least `min_width`) with `pad_id` and ignored labels.
fn pad(rows: &[(&[u32], &[u32])], pad_id: u32, min_width: usize) -> (Vec<u32>, Vec<u32>, usize) {
    let width = rows
        .iter()
        .map(|(i, _)| i.len())
        .max()
        .unwrap_or(0)
        .max(min_width);
    let mut ids = Vec::with_capacity(rows.len() * width);
    let mut labels = Vec::with_capacity(rows.len() * width);
    for (i, l) in rows {
        ids.extend(i.iter().copied().chain(std::iter::repeat(pad_id)).take(width));
        labels.extend(
            l.iter()
                .copied()
                .chain(std::iter::repeat(IGNORE_INDEX))
                .take(width),
        );
    }
    (ids, labels, width)
}

/// Labels that are learned, skipping the first `skip` positions of every row.
fn count_learned(labels: &[u32], width: usize, skip: usize) -> usize {
    labels
        .chunks(width)
        .map(|row| {
            row[skip.min(width)..]
                .iter()
                .filter(|&&l| l != IGNORE_INDEX)
                .count()
        })
        .sum()
}
