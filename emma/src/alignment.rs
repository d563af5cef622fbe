//! Hierarchical alignment and the pixel decoder (training only): LM features at the image
//! positions from several layers are normalised, fused by one linear map and split into one
//! feature map per decoder block; learned queries with fixed 2-D position embeddings pass
//! through blocks of block-causal cross-attention and a Mamba-2 mixer, and predict per patch
//! the (normalised) SigLIP patch embedding of the input image. Loss: weight · Σ (pred - target)².

use crate::config::{EmmaConfig, PixelTarget};
use autograd::Var;
use nn::mamba2::{Mamba2Dims, Mamba2Mixer};
use nn::vit::PatchEmbed;
use nn::{Attention, AttentionNames, LayerNorm, Linear, ParamStore};
use tensor::{AttentionMask, DType, Tensor};

/// One decoder block: `q += CrossAttn(LN(q), LN(kv), mask)`, then `q += Mamba(LN(q))`.
struct DecoderBlock {
    norm_q: LayerNorm,
    norm_kv: LayerNorm,
    cross_attn: Attention,
    norm_mamba: LayerNorm,
    mixer: Mamba2Mixer,
}

/// The alignment module of an EMMA model.
pub struct Alignment {
    layers: Vec<usize>,
    feature_norms: Vec<LayerNorm>,
    fusion: Option<Linear>,
    query: Var,
    blocks: Vec<DecoderBlock>,
    norm_out: LayerNorm,
    head: Linear,
    target: PixelTarget,
    target_embed: Option<PatchEmbed>,
    weight: f64,
    grid: usize,
    patch: usize,
    /// The decoder's block-causal mask over the patch raster.
    mask: AttentionMask,
}

/// Fixed 2-D sine-cosine position embeddings `[grid², dim]` (MAE style): half the channels
/// encode the row, half the column.
pub fn position_embeddings_2d(grid: usize, dim: usize, dtype: DType) -> tensor::Result<Tensor> {
    let quarter = dim / 4;
    let mut data = vec![0.0; grid * grid * dim];
    for r in 0..grid {
        for c in 0..grid {
            let row = &mut data[(r * grid + c) * dim..][..dim];
            for (half, pos) in [(0, r), (1, c)] {
                for k in 0..quarter {
                    let omega = 1.0 / 10000f64.powf(k as f64 / quarter.max(1) as f64);
                    row[half * 2 * quarter + k] = (pos as f64 * omega).sin();
                    row[half * 2 * quarter + quarter + k] = (pos as f64 * omega).cos();
                }
            }
        }
    }
    Tensor::from_vec(data, &[grid * grid, dim])?.to_dtype(dtype)
}

impl Alignment {
    /// Takes the parameters under `store` (scope `alignment.`); `siglip_patch` seeds the
    /// trainable copy of SigLIP's patch embedding when the store has none yet.
    pub fn new(cfg: &EmmaConfig, store: &ParamStore, siglip_patch: (&Tensor, &Tensor)) -> nn::Result<Self> {
        let a = &cfg.alignment;
        let d = cfg.lm.hidden;
        let scales = a.layers.len() + 1;
        if a.heads * a.head_dim != d {
            return Err(nn::NnError::Input {
                layer: "alignment".into(),
                detail: format!(
                    "decoder heads {} x head_dim {} != LM width {d}",
                    a.heads, a.head_dim
                ),
            });
        }
        if let Some(&bad) = a.layers.iter().find(|&&l| l == 0 || l >= cfg.lm.layers) {
            return Err(nn::NnError::Input {
                layer: "alignment".into(),
                detail: format!(
                    "fusion layer {bad} is not in 1..{} (the last layer is always used)",
                    cfg.lm.layers
                ),
            });
        }
        let ln = |name: &str| LayerNorm::new(store, name, d, 1e-5, true);
        let mixer_dims = Mamba2Dims {
            hidden: d,
            inner: 2 * d,
            heads: 2 * d / a.mamba_head_dim,
            head_dim: a.mamba_head_dim,
            groups: 1,
            state: a.state,
            conv_kernel: 4,
            chunk: a.chunk,
            bias: false,
            conv_bias: true,
            norm_eps: 1e-5,
        };
        let blocks = (0..scales)
            .map(|i| {
                let p = format!("decoder.blocks.{i}");
                let names = AttentionNames {
                    q: format!("{p}.cross_attn.q_proj"),
                    k: format!("{p}.cross_attn.k_proj"),
                    v: format!("{p}.cross_attn.v_proj"),
                    out: format!("{p}.cross_attn.out_proj"),
                };
                Ok(DecoderBlock {
                    norm_q: ln(&format!("{p}.norm_q"))?,
                    norm_kv: ln(&format!("{p}.norm_kv"))?,
                    cross_attn: Attention::new(store, &names, d, a.heads, true)?,
                    norm_mamba: ln(&format!("{p}.norm_mamba"))?,
                    mixer: Mamba2Mixer::new(store, &format!("{p}.mixer"), mixer_dims)?,
                })
            })
            .collect::<nn::Result<Vec<_>>>()?;
        let (channels, patch) = (3, cfg.vision.patch);
        let target_dim = match a.target {
            PixelTarget::PatchEmbedding => cfg.vision.siglip.dim,
            PixelTarget::Pixels => channels * patch * patch,
        };
        let target_embed = match a.target {
            PixelTarget::PatchEmbedding => {
                if !store.contains("target_patch_embed.weight") {
                    store.insert("target_patch_embed.weight", siglip_patch.0.clone());
                    store.insert("target_patch_embed.bias", siglip_patch.1.clone());
                }
                Some(PatchEmbed::new(
                    store,
                    "target_patch_embed",
                    channels,
                    cfg.vision.siglip.dim,
                    patch,
                )?)
            }
            PixelTarget::Pixels => None,
        };
        Ok(Alignment {
            layers: a.layers.clone(),
            feature_norms: (0..scales)
                .map(|i| ln(&format!("feature_norms.{i}")))
                .collect::<nn::Result<_>>()?,
            fusion: a
                .mff
                .then(|| Linear::new(store, "fusion", scales * d, scales * d, true))
                .transpose()?,
            query: store.take("decoder.query", &[1, 1, d])?,
            blocks,
            norm_out: ln("decoder.norm_out")?,
            head: Linear::new(store, "decoder.head", d, target_dim, true)?,
            target: a.target,
            target_embed,
            weight: a.weight,
            grid: cfg.vision.grid(),
            patch,
            mask: AttentionMask::BlockCausal {
                width: cfg.vision.grid(),
            },
        })
    }

    /// The feature map each decoder block attends to, from the LM's per-layer outputs
    /// (`per_layer[i]` = output of layer i+1), restricted to the `n` image positions.
    fn feature_maps(&self, per_layer: &[Var], n: usize) -> nn::Result<Vec<Var>> {
        let mut picked: Vec<&Var> = self.layers.iter().map(|&l| &per_layer[l - 1]).collect();
        picked.push(per_layer.last().expect("the LM has layers"));
        let normed = picked
            .iter()
            .zip(&self.feature_norms)
            .map(|(h, norm)| norm.forward(&h.narrow(1, 0, n)?))
            .collect::<nn::Result<Vec<_>>>()?;
        let Some(fusion) = &self.fusion else {
            // Without MFF every block sees the last layer's features.
            let last = normed.last().expect("at least one scale").clone();
            return Ok(vec![last; normed.len()]);
        };
        let d = normed[0].value().dim(2);
        let fused = fusion.forward(&Var::concat(&normed.iter().collect::<Vec<_>>(), 2)?)?;
        (0..normed.len())
            .map(|i| Ok(fused.narrow(2, i * d, d)?))
            .collect()
    }

    /// The per-patch target `[B, n, target_dim]`, normalised per patch to zero mean, unit variance.
    fn target(&self, siglip_pixels: &Tensor) -> nn::Result<Var> {
        let raw = match (&self.target, &self.target_embed) {
            (PixelTarget::PatchEmbedding, Some(embed)) => {
                embed.forward(&Var::constant(siglip_pixels.clone()))?.0
            }
            _ => {
                let (b, p, g) = (siglip_pixels.dim(0), self.patch, self.grid);
                Var::constant(
                    siglip_pixels
                        .narrow(2, 0, g * p)?
                        .narrow(3, 0, g * p)?
                        .reshape(&[b, 3, g, p, g, p])?
                        .permute(&[0, 2, 4, 1, 3, 5])?
                        .reshape(&[b, g * g, 3 * p * p])?,
                )
            }
        };
        let width = raw.value().dim(2);
        let (dtype, device) = (raw.value().dtype(), raw.value().device());
        let ones = Var::constant(Tensor::ones_on(&[width], dtype, device)?);
        Ok(raw.layer_norm(&ones, None, 1e-6)?)
    }

    /// The pixel loss of a batch: `weight · Σ (decoder(features) - target)²`.
    pub fn loss(&self, per_layer: &[Var], siglip_pixels: &Tensor) -> nn::Result<Var> {
        let n = self.grid * self.grid;
        let maps = self.feature_maps(per_layer, n)?;
        let (b, d) = (siglip_pixels.dim(0), self.query.value().dim(2));
        let (dtype, device) = (self.query.value().dtype(), self.query.value().device());
        let pos = position_embeddings_2d(self.grid, d, dtype)?.to_device(device)?;
        let pos = Var::constant(pos.reshape(&[1, n, d])?);
        let mut q = self.query.add(&pos)?.broadcast_to(&[b, n, d])?;
        for (block, kv) in self.blocks.iter().zip(&maps) {
            let attended = block.cross_attn.forward(
                &block.norm_q.forward(&q)?,
                &block.norm_kv.forward(kv)?,
                self.mask,
            )?;
            q = q.add(&attended)?;
            q = q.add(&block.mixer.forward(&block.norm_mamba.forward(&q)?)?)?;
        }
        let pred = self.head.forward(&self.norm_out.forward(&q)?)?;
        let err = pred.sub(&self.target(siglip_pixels)?)?;
        Ok(err.sqr()?.sum_all()?.affine(self.weight, 0.0)?)
    }
}
