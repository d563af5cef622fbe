//! Answering a question about an image: the image tokens and the chat prompt are run through
//! the LM in parallel (prefill), then the answer is decoded one token at a time from the
//! recurrent cache (constant memory per token) until end-of-text or the token limit.

use crate::error::Result;
use crate::image::pixels_for_both;
use crate::model::Emma;
use crate::prompt::Conversation;
use crate::sampling::{pick, Sampling};
use crate::tokenizer::Tokenizer;
use image::RgbImage;
use tensor::Tensor;

/// How an answer is generated.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GenerateOptions {
    /// The most tokens to generate (the closing end-of-text included).
    pub max_new_tokens: usize,
    /// Greedy or temperature/top-p sampling.
    pub sampling: Sampling,
    /// Seed of the sampling random numbers.
    pub seed: u64,
}

/// A generated answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Generation {
    /// Tokens of the prompt (text only; the image tokens come before them).
    pub prompt_tokens: usize,
    /// The generated token ids, without the end-of-text that stopped generation.
    pub ids: Vec<u32>,
    /// `ids` decoded.
    pub text: String,
    /// Whether generation stopped at end-of-text (rather than at `max_new_tokens`).
    pub finished: bool,
}

/// Answers the last (unanswered) turn of `conversation` with `model`, about `image` (its tokens
/// go before the prompt) or, without one, from the text alone.
pub fn generate(
    model: &Emma,
    tok: &Tokenizer,
    image: Option<&RgbImage>,
    conversation: &Conversation,
    opts: &GenerateOptions,
) -> Result<Generation> {
    generate_streaming(model, tok, image, conversation, opts, &mut |_| {})
}

/// The LM's input for a prompt: `image`'s tokens (when there is one) followed by the embedded
/// token ids `prompt`, `[1, N + T, hidden]` on the model's device.
pub fn prompt_embeds(model: &Emma, image: Option<&RgbImage>, prompt: &[u32]) -> Result<Tensor> {
    let ids = Tensor::from_slice(prompt, &[1, prompt.len()])?.to_device(model.device())?;
    let text = model.lm().embed(&ids)?.value().clone();
    Ok(match image {
        Some(img) => {
            let (siglip, dinov2) = pixels_for_both(img, model.config().vision.image_size)?;
            let image_tokens = model
                .image_tokens(&siglip.unsqueeze(0)?, &dinov2.unsqueeze(0)?)?
                .value()
                .clone();
            Tensor::concat(&[&image_tokens, &text], 1)?
        }
        None => text,
    })
}

/// [`generate`], handing each new piece of the answer's text to `on_text` as it is decoded
/// (whole characters only: a token that ends inside a multi-byte character waits for the rest).
pub fn generate_streaming(
    model: &Emma,
    tok: &Tokenizer,
    image: Option<&RgbImage>,
    conversation: &Conversation,
    opts: &GenerateOptions,
    on_text: &mut dyn FnMut(&str),
) -> Result<Generation> {
    tok.check_fits(model.config().lm.vocab)?;
    let prompt = conversation.encode_prompt(tok)?;
    let (lm, device) = (model.lm(), model.device());
    let embeds = prompt_embeds(model, image, &prompt)?;
    let (hidden, mut cache) = lm.prefill(&embeds)?;
    let len = hidden.dim(1);
    let mut logits = lm.logits_of(&hidden.narrow(1, len - 1, 1)?.reshape(&[1, hidden.dim(2)])?)?;
    let mut rng = tensor::seeded_rng(opts.seed);
    let mut ids = Vec::new();
    let mut finished = false;
    let mut shown = 0;
    while ids.len() < opts.max_new_tokens {
        let next = pick(&logits.to_vec::<f32>()?, opts.sampling, &mut rng);
        if next == tok.eos_id() {
            finished = true;
            break;
        }
        ids.push(next);
        let so_far = tok.decode(&ids)?;
        if !so_far.ends_with('\u{fffd}') && so_far.len() > shown && so_far.is_char_boundary(shown) {
            on_text(&so_far[shown..]);
            shown = so_far.len();
        }
        if ids.len() == opts.max_new_tokens {
            break;
        }
        let next_id = Tensor::from_slice(&[next], &[1, 1])?.to_device(device)?;
        let embed = lm.embed(&next_id)?.value().clone();
        let hidden_size = embed.dim(2);
        logits = lm.step(&embed.reshape(&[1, hidden_size])?, &mut cache)?;
    }
    let text = tok.decode(&ids)?;
    if text.len() > shown && text.is_char_boundary(shown) {
        on_text(&text[shown..]);
    }
    Ok(Generation {
        prompt_tokens: prompt.len(),
        text,
        ids,
        finished,
    })
}
