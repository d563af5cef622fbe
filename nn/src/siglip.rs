//! The SigLIP vision tower (`SiglipVisionModel`): patch embedding + learned position embedding
//! (bicubically resized for other image sizes), pre-norm blocks, a final LayerNorm.

use crate::interpolate::resize_grid;
use crate::vit::{block_dims, BlockNames, PatchEmbed, VisionOutput, VitBlock};
use crate::{AttentionNames, HfConfig, LayerNorm, ParamStore, Result};
use autograd::Var;
use tensor::Tensor;

/// Whether the attention-pooling head of a checkpoint is used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SiglipHead {
    /// Ignore `vision_model.head.*` (EMMA uses patch features, not the pooled vector).
    Skip,
}

/// A SigLIP vision encoder.
pub struct SiglipVision {
    patch: PatchEmbed,
    position: Var,
    grid: usize,
    blocks: Vec<VitBlock>,
    post_norm: LayerNorm,
}

impl SiglipVision {
    /// Builds from a `siglip_vision_model` config, or the `vision_config` of a `siglip` one
    /// (the text tower's parameters are then skipped), and checks nothing else is in `store`.
    pub fn new(cfg: &HfConfig, store: &ParamStore, head: SiglipHead) -> Result<Self> {
        let vision_cfg;
        let cfg = match cfg.model_type()? {
            "siglip_vision_model" => cfg,
            "siglip" => {
                let value = cfg
                    .raw("vision_config")
                    .cloned()
                    .ok_or_else(|| cfg.error("missing 'vision_config'"))?;
                vision_cfg = HfConfig::from_value(cfg.path(), value);
                store
                    .names()
                    .iter()
                    .filter(|k| !k.starts_with("vision_model."))
                    .for_each(|k| store.skip(k));
                &vision_cfg
            }
            other => return Err(cfg.error(format!("model_type '{other}' is not a SigLIP vision model"))),
        };
        // Checkpoints name the tower `vision_model.*` (SiglipModel, and SiglipVisionModel before
        // transformers 5) or leave the prefix out (SiglipVisionModel from transformers 5).
        let p = if store.contains("vision_model.embeddings.patch_embedding.weight") {
            "vision_model."
        } else {
            ""
        };
        let SiglipHead::Skip = head;
        store
            .names()
            .iter()
            .filter(|k| k.starts_with(&format!("{p}head.")))
            .for_each(|k| store.skip(k));

        let dims = block_dims(cfg, cfg.usize("intermediate_size")?, 1e-6)?;
        let (image, patch) = (cfg.usize("image_size")?, cfg.usize("patch_size")?);
        let grid = image / patch;
        let blocks = (0..cfg.usize("num_hidden_layers")?)
            .map(|i| {
                let l = format!("{p}encoder.layers.{i}");
                let names = BlockNames {
                    norm1: format!("{l}.layer_norm1"),
                    attn: AttentionNames {
                        q: format!("{l}.self_attn.q_proj"),
                        k: format!("{l}.self_attn.k_proj"),
                        v: format!("{l}.self_attn.v_proj"),
                        out: format!("{l}.self_attn.out_proj"),
                    },
                    scale1: None,
                    norm2: format!("{l}.layer_norm2"),
                    mlp: format!("{l}.mlp"),
                    scale2: None,
                };
                VitBlock::new(store, &names, dims)
            })
            .collect::<Result<Vec<_>>>()?;
        let model = SiglipVision {
            patch: PatchEmbed::new(
                store,
                &format!("{p}embeddings.patch_embedding"),
                cfg.usize_or("num_channels", 3)?,
                dims.dim,
                patch,
            )?,
            position: store.take(
                &format!("{p}embeddings.position_embedding.weight"),
                &[grid * grid, dims.dim],
            )?,
            grid,
            blocks,
            post_norm: LayerNorm::new(store, &format!("{p}post_layernorm"), dims.dim, dims.eps, true)?,
        };
        store.check_all_used()?;
        Ok(model)
    }

    /// Encodes `pixel_values [B, C, H, W]`; position embeddings are resized (bicubic, as
    /// `interpolate_pos_encoding=True`) when the patch grid differs from the trained one.
    pub fn forward(&self, pixels: &Tensor) -> Result<VisionOutput> {
        let (x, nh, nw) = self.patch.forward(&Var::constant(pixels.clone()))?;
        let dim = self.position.value().dim(1);
        let pos = if (nh, nw) == (self.grid, self.grid) {
            self.position.clone()
        } else {
            let grid = self.position.reshape(&[self.grid, self.grid, dim])?;
            resize_grid(&grid, nh, nw, false)?.reshape(&[nh * nw, dim])?
        };
        let mut x = x.add(&pos)?;
        let mut hidden_states = vec![x.clone()];
        for block in &self.blocks {
            x = block.forward(&x)?;
            hidden_states.push(x.clone());
        }
        Ok(VisionOutput {
            last_hidden_state: self.post_norm.forward(&x)?,
            hidden_states,
        })
    }
}
