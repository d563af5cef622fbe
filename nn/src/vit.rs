//! Pieces shared by the ViT encoders: patch embedding, the pre-norm transformer block, and
//! the encoder output with every block's hidden states.

use crate::{Attention, AttentionNames, Gelu, HfConfig, LayerNorm, Mlp, NnError, ParamStore, Result};
use autograd::Var;

/// A `Conv2d(C, D, kernel=p, stride=p)` patch embedding, computed as a matmul over patches.
pub struct PatchEmbed {
    weight: Var,
    bias: Var,
    patch: usize,
    channels: usize,
    dim: usize,
}

impl PatchEmbed {
    /// Takes `{prefix}.weight` `[dim, channels, p, p]` and `{prefix}.bias` `[dim]`.
    pub fn new(store: &ParamStore, prefix: &str, channels: usize, dim: usize, patch: usize) -> Result<Self> {
        Ok(PatchEmbed {
            weight: store.take(&format!("{prefix}.weight"), &[dim, channels, patch, patch])?,
            bias: store.take(&format!("{prefix}.bias"), &[dim])?,
            patch,
            channels,
            dim,
        })
    }

    /// `pixels [B, C, H, W]` -> (`[B, (H/p)·(W/p), dim]`, H/p, W/p); trailing pixels that do
    /// not fill a patch are dropped, as the strided convolution does.
    pub fn forward(&self, pixels: &Var) -> Result<(Var, usize, usize)> {
        let s = pixels.value().shape().to_vec();
        let p = self.patch;
        if s.len() != 4 || s[1] != self.channels || s[2] < p || s[3] < p {
            return Err(NnError::Input {
                layer: "patch embedding".into(),
                detail: format!("pixel_values {s:?} is not [B, {}, H>={p}, W>={p}]", self.channels),
            });
        }
        let (b, nh, nw) = (s[0], s[2] / p, s[3] / p);
        let patches = pixels
            .narrow(2, 0, nh * p)?
            .narrow(3, 0, nw * p)?
            .reshape(&[b, self.channels, nh, p, nw, p])?
            .permute(&[0, 2, 4, 1, 3, 5])?
            .reshape(&[b, nh * nw, self.channels * p * p])?;
        let w = self
            .weight
            .reshape(&[self.dim, self.channels * p * p])?
            .transpose(0, 1)?;
        Ok((patches.matmul(&w)?.add(&self.bias)?, nh, nw))
    }
}

/// Parameter names of one pre-norm block.
pub struct BlockNames {
    /// First LayerNorm.
    pub norm1: String,
    /// Attention projections.
    pub attn: AttentionNames,
    /// Layer-scale vector after attention, if any.
    pub scale1: Option<String>,
    /// Second LayerNorm.
    pub norm2: String,
    /// MLP prefix (`fc1`, `fc2` below it).
    pub mlp: String,
    /// Layer-scale vector after the MLP, if any.
    pub scale2: Option<String>,
}

/// Sizes shared by every block of an encoder.
#[derive(Clone, Copy, Debug)]
pub struct BlockDims {
    /// Width.
    pub dim: usize,
    /// Attention heads.
    pub heads: usize,
    /// MLP hidden width.
    pub mlp_hidden: usize,
    /// LayerNorm epsilon.
    pub eps: f64,
    /// MLP activation.
    pub act: Gelu,
}

/// `x + s1·attn(norm1(x))`, then `x + s2·mlp(norm2(x))`.
pub struct VitBlock {
    norm1: LayerNorm,
    attn: Attention,
    scale1: Option<Var>,
    norm2: LayerNorm,
    mlp: Mlp,
    scale2: Option<Var>,
}

impl VitBlock {
    /// Takes one block's parameters.
    pub fn new(store: &ParamStore, names: &BlockNames, d: BlockDims) -> Result<Self> {
        let scale = |n: &Option<String>| n.as_ref().map(|n| store.take(n, &[d.dim])).transpose();
        Ok(VitBlock {
            norm1: LayerNorm::new(store, &names.norm1, d.dim, d.eps, true)?,
            attn: Attention::new(store, &names.attn, d.dim, d.heads, true)?,
            scale1: scale(&names.scale1)?,
            norm2: LayerNorm::new(store, &names.norm2, d.dim, d.eps, true)?,
            mlp: Mlp::new(store, &names.mlp, d.dim, d.mlp_hidden, d.act)?,
            scale2: scale(&names.scale2)?,
        })
    }

    /// `[B, T, dim] -> [B, T, dim]`.
    pub fn forward(&self, x: &Var) -> Result<Var> {
        let scaled = |y: Var, s: &Option<Var>| -> Result<Var> {
            Ok(match s {
                Some(s) => y.mul(s)?,
                None => y,
            })
        };
        let h = self.norm1.forward(x)?;
        let x = x.add(&scaled(
            self.attn.forward(&h, &h, tensor::AttentionMask::Full)?,
            &self.scale1,
        )?)?;
        let h = self.norm2.forward(&x)?;
        Ok(x.add(&scaled(self.mlp.forward(&h)?, &self.scale2)?)?)
    }
}

/// What a vision encoder returns.
pub struct VisionOutput {
    /// The last block's output after the final LayerNorm `[B, T, dim]`.
    pub last_hidden_state: Var,
    /// The embeddings, then every block's output (as `output_hidden_states` gives them).
    pub hidden_states: Vec<Var>,
}

impl VisionOutput {
    /// The output of the second-to-last block (`hidden_states[-2]`).
    pub fn penultimate(&self) -> &Var {
        &self.hidden_states[self.hidden_states.len() - 2]
    }
}

/// The block sizes read from a ViT config, with the MLP width given.
pub fn block_dims(cfg: &HfConfig, mlp_hidden: usize, default_eps: f64) -> Result<BlockDims> {
    let act_name = cfg.str_opt("hidden_act")?.unwrap_or("gelu");
    let act =
        Gelu::from_hf(act_name).ok_or_else(|| cfg.error(format!("unsupported hidden_act '{act_name}'")))?;
    Ok(BlockDims {
        dim: cfg.usize("hidden_size")?,
        heads: cfg.usize("num_attention_heads")?,
        mlp_hidden,
        eps: cfg.f64_or("layer_norm_eps", default_eps)?,
        act,
    })
}
