//! A Mamba language model (`MambaForCausalLM` / `Mamba2ForCausalLM`): embeddings, residual
//! blocks of RMSNorm + mixer, a final RMSNorm and an output head, tied or not.

use crate::mamba1::{Mamba1Dims, Mamba1Mixer};
use crate::mamba2::{Mamba2Dims, Mamba2Mixer};
use crate::{Embedding, HfConfig, Linear, ParamStore, Result, RmsNorm};
use autograd::Var;
use tensor::Tensor;

/// The mixer of every block.
pub enum Mixer {
    /// Mamba-1 (selective scan).
    Mamba1(Mamba1Mixer),
    /// Mamba-2 (SSD).
    Mamba2(Mamba2Mixer),
}

impl Mixer {
    fn forward(&self, x: &Var) -> Result<Var> {
        match self {
            Mixer::Mamba1(m) => m.forward(x),
            Mixer::Mamba2(m) => m.forward(x),
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
        Ok(x.add(&self.mixer.forward(&self.norm.forward(x)?)?)?)
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
    blocks: Vec<MambaBlock>,
    norm_f: RmsNorm,
    head: Head,
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
                Ok(MambaBlock {
                    norm: RmsNorm::new(store, &format!("{prefix}.norm"), hidden, eps)?,
                    mixer,
                })
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
    pub fn forward_embeds(&self, embeds: &Var) -> Result<(Var, Vec<Var>)> {
        let mut x = embeds.clone();
        let mut per_layer = Vec::with_capacity(self.blocks.len());
        for block in &self.blocks {
            x = block.forward(&x)?;
            per_layer.push(x.clone());
        }
        Ok((self.norm_f.forward(&x)?, per_layer))
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
    pub fn blocks(&self) -> &[MambaBlock] {
        &self.blocks
    }
}
