//! A Mamba language model (`MambaForCausalLM` / `Mamba2ForCausalLM`): embeddings, residual
//! blocks of RMSNorm + mixer, a final RMSNorm and an output head, tied or not; run in parallel
//! over a whole sequence ([`MambaLm::forward`], [`MambaLm::prefill`]) or one token at a time from
//! a [`Cache`] ([`MambaLm::step`]).

use crate::mamba1::{Mamba1Dims, Mamba1Mixer};
use crate::mamba2::{Mamba2Dims, Mamba2Mixer};
use crate::{Cache, Embedding, HfConfig, LayerCache, Linear, NnError, ParamStore, Result, RmsNorm};
use autograd::Var;
use std::sync::Arc;
use tensor::{DType, Tensor};

/// The mixer of every block.
pub enum Mixer {
    /// Mamba-1 (selective scan).
    Mamba1(Mamba1Mixer),
    /// Mamba-2 (SSD).
    Mamba2(Mamba2Mixer),
}

impl Mixer {
    fn forward_with_state(&self, x: &Var) -> Result<(Var, LayerCache)> {
        match self {
            Mixer::Mamba1(m) => m.forward_with_state(x),
            Mixer::Mamba2(m) => m.forward_with_state(x),
        }
    }

    fn step(&self, x: &Tensor, cache: &LayerCache) -> Result<(Tensor, LayerCache)> {
        match self {
            Mixer::Mamba1(m) => m.step(x, cache),
            Mixer::Mamba2(m) => m.step(x, cache),
        }
    }

    fn empty_state(&self, batch: usize, dtype: DType) -> Result<LayerCache> {
        match self {
            Mixer::Mamba1(m) => m.empty_state(batch, dtype),
            Mixer::Mamba2(m) => m.empty_state(batch, dtype),
        }
    }
}

/// One residual block: `x + mixer(norm(x))`.
pub struct MambaBlock {
    norm: RmsNorm,
    mixer: Mixer,
}

impl MambaBlock {
    /// `[B, L, hidden] -> [B, L, hidden]`.
    pub fn forward(&self, x: &Var) -> Result<Var> {
        Ok(self.forward_with_state(x)?.0)
    }

    /// [`MambaBlock::forward`], also returning the mixer's decoding state after the last step.
    pub fn forward_with_state(&self, x: &Var) -> Result<(Var, LayerCache)> {
        let (y, cache) = self.mixer.forward_with_state(&self.norm.forward(x)?)?;
        Ok((x.add(&y)?, cache))
    }
}

/// The output head: the embedding table (tied) or its own weight.
enum Head {
    Tied,
    Own(Linear),
}

/// A Mamba or Mamba-2 causal language model.
pub struct MambaLm {
    embeddings: Embedding,
    blocks: Vec<Arc<MambaBlock>>,
    norm_f: RmsNorm,
    head: Head,
    /// Whether [`MambaLm::forward_embeds`] recomputes each block in the backward pass.
    recompute: bool,
}

impl MambaLm {
    /// Builds the model of `cfg` (`model_type` mamba or mamba2) from `store`'s parameters, in
    /// Hugging Face naming, and checks that the store holds nothing else.
    pub fn new(cfg: &HfConfig, store: &ParamStore) -> Result<Self> {
        let model_type = cfg.model_type()?;
        let hidden = cfg.usize("hidden_size")?;
        let vocab = cfg.usize("vocab_size")?;
        let layers = cfg.usize("num_hidden_layers")?;
        let eps = cfg.f64_or("layer_norm_epsilon", 1e-5)?;
        let blocks = (0..layers)
            .map(|i| {
                let prefix = format!("backbone.layers.{i}");
                let mixer = match model_type {
                    "mamba" => Mixer::Mamba1(Mamba1Mixer::new(
                        store,
                        &format!("{prefix}.mixer"),
                        Mamba1Dims::from_config(cfg)?,
                    )?),
                    "mamba2" => Mixer::Mamba2(Mamba2Mixer::new(
                        store,
                        &format!("{prefix}.mixer"),
                        Mamba2Dims::from_config(cfg)?,
                    )?),
                    other => {
                        return Err(cfg.error(format!(
                            "unsupported model_type '{other}' for a Mamba LM (mamba, mamba2)"
                        )))
                    }
                };
                Ok(Arc::new(MambaBlock {
                    norm: RmsNorm::new(store, &format!("{prefix}.norm"), hidden, eps)?,
                    mixer,
                }))
            })
            .collect::<Result<Vec<_>>>()?;
        let tied = cfg.bool_or("tie_word_embeddings", true)?;
        let head = if tied {
            // A tied head may still be saved under its own name; it is the same tensor.
            store.skip("lm_head.weight");
            Head::Tied
        } else {
            Head::Own(Linear::new(store, "lm_head", hidden, vocab, false)?)
        };
        let model = MambaLm {
            embeddings: Embedding::new(store, "backbone.embeddings", vocab, hidden)?,
            blocks,
            norm_f: RmsNorm::new(store, "backbone.norm_f", hidden, eps)?,
            head,
            recompute: false,
        };
        store.check_all_used()?;
        Ok(model)
    }

    /// Token embeddings of u32 `ids [B, L]`: `[B, L, hidden]`.
    pub fn embed(&self, ids: &Tensor) -> Result<Var> {
        self.embeddings.forward(ids)
    }

    /// Runs the blocks over `embeds [B, L, hidden]`; returns the final-normed hidden states and
    /// the output of every block (before the final norm).
    /// With [`MambaLm::set_recompute`] on, each block keeps only its output for the backward
    /// pass and runs again when the backward pass reaches it.
    pub fn forward_embeds(&self, embeds: &Var) -> Result<(Var, Vec<Var>)> {
        if !self.recompute {
            let (hidden, per_layer, _) = self.run(embeds)?;
            return Ok((hidden, per_layer));
        }
        let mut x = embeds.clone();
        let mut per_layer = Vec::with_capacity(self.blocks.len());
        for block in &self.blocks {
            let block = block.clone();
            x = x.recomputed(move |x| block.forward(x))?;
            per_layer.push(x.clone());
        }
        Ok((self.norm_f.forward(&x)?, per_layer))
    }

    /// Trades compute for memory in [`MambaLm::forward_embeds`]: on, a block's activations are
    /// computed again in the backward pass instead of being kept (about a third more compute
    /// for the blocks; the activations of a block shrink to its output).
    pub fn set_recompute(&mut self, on: bool) {
        self.recompute = on;
    }

    /// The parallel pass over `embeds [B, L, hidden]`: the final-normed hidden states, every
    /// block's output and every block's decoding state after the last step.
    fn run(&self, embeds: &Var) -> Result<(Var, Vec<Var>, Vec<LayerCache>)> {
        let mut x = embeds.clone();
        let mut per_layer = Vec::with_capacity(self.blocks.len());
        let mut states = Vec::with_capacity(self.blocks.len());
        for block in &self.blocks {
            let (y, state) = block.forward_with_state(&x)?;
            x = y;
            per_layer.push(x.clone());
            states.push(state);
        }
        Ok((self.norm_f.forward(&x)?, per_layer, states))
    }

    /// The model width.
    fn hidden_size(&self) -> usize {
        self.embeddings.weight().value().dim(1)
    }

    /// The start of cached generation: the parallel pass over the prompt `embeds [B, L,
    /// hidden]`, returning the final-normed hidden states `[B, L, hidden]` (see
    /// [`MambaLm::logits_of`]) and the [`Cache`] that [`MambaLm::step`] continues from. An empty
    /// prompt (L = 0) gives `[B, 0, hidden]` and [`MambaLm::empty_cache`]. It runs the same code
    /// as [`MambaLm::forward_embeds`]; over a frozen store it records no graph.
    pub fn prefill(&self, embeds: &Tensor) -> Result<(Tensor, Cache)> {
        let hidden = self.hidden_size();
        let shape = embeds.shape();
        if shape.len() != 3 || shape[2] != hidden {
            return Err(NnError::Input {
                layer: "MambaLm::prefill".into(),
                detail: format!("embeds must be [B, L, {hidden}], got {shape:?}"),
            });
        }
        if shape[1] == 0 {
            return Ok((embeds.clone(), self.empty_cache(shape[0])?));
        }
        let (normed, _, layers) = self.run(&Var::constant(embeds.clone()))?;
        Ok((normed.value().clone(), Cache { layers }))
    }

    /// The cache of `batch` sequences before any token (all states zero), on the model's device.
    pub fn empty_cache(&self, batch: usize) -> Result<Cache> {
        let dtype = self.embeddings.weight().value().dtype();
        let layers = self
            .blocks
            .iter()
            .map(|b| b.mixer.empty_state(batch, dtype))
            .collect::<Result<_>>()?;
        Ok(Cache { layers })
    }

    /// One token of cached generation: the embeddings `embed [B, hidden]` of each sequence's
    /// next token, after the tokens `cache` summarises. Returns the logits `[B, vocab]` at that
    /// token and advances `cache` by it; on an error `cache` is left as it was. Runs on plain
    /// tensors (no graph) in time and memory independent of the tokens seen so far.
    pub fn step(&self, embed: &Tensor, cache: &mut Cache) -> Result<Tensor> {
        let (hidden, batch) = (self.hidden_size(), cache.batch());
        if embed.shape() != [batch, hidden] || cache.layers.len() != self.blocks.len() {
            return Err(NnError::Input {
                layer: "MambaLm::step".into(),
                detail: format!(
                    "needs embed [{batch}, {hidden}] and a cache of {} layers, got embed {:?} and {} layers",
                    self.blocks.len(),
                    embed.shape(),
                    cache.layers.len()
                ),
            });
        }
        // Each block adds its mixer's output to the residual stream; that add and the next
        // norm (the next block's, or the final one) run as one fused op.
        let mut residual = embed.clone();
        let first_norm = self.blocks.first().map_or(&self.norm_f, |b| &b.norm);
        let mut normed = first_norm.forward_tensor(&residual)?;
        let mut layers = Vec::with_capacity(self.blocks.len());
        for (i, (block, state)) in self.blocks.iter().zip(&cache.layers).enumerate() {
            let (y, state) = block.mixer.step(&normed, state)?;
            let next_norm = self.blocks.get(i + 1).map_or(&self.norm_f, |b| &b.norm);
            (normed, residual) = next_norm.add_forward_tensor(&y, &residual)?;
            layers.push(state);
        }
        let logits = self.logits_of(&normed)?;
        cache.layers = layers;
        Ok(logits)
    }

    /// [`MambaLm::logits`] on plain tensors (no graph): `[..., hidden] -> [..., vocab]`.
    pub fn logits_of(&self, hidden: &Tensor) -> Result<Tensor> {
        match &self.head {
            Head::Tied => Ok(hidden.matmul(&self.embeddings.weight().value().transpose(0, 1)?)?),
            Head::Own(l) => l.forward_tensor(hidden),
        }
    }

    /// Vocabulary logits of normed hidden states `[B, L, hidden] -> [B, L, vocab]`.
    pub fn logits(&self, hidden: &Var) -> Result<Var> {
        match &self.head {
            Head::Tied => Ok(hidden.matmul(&self.embeddings.weight().transpose(0, 1)?)?),
            Head::Own(l) => l.forward(hidden),
        }
    }

    /// Logits of u32 `ids [B, L]`: `[B, L, vocab]`.
    pub fn forward(&self, ids: &Tensor) -> Result<Var> {
        let (hidden, _) = self.forward_embeds(&self.embed(ids)?)?;
        self.logits(&hidden)
    }

    /// The residual blocks.
    pub fn blocks(&self) -> &[Arc<MambaBlock>] {
        &self.blocks
    }
}
