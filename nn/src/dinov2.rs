//! The DINOv2 encoder (`Dinov2Model`, and `Dinov2WithRegistersModel`): patch embedding, a CLS
//! token, learned position embeddings (bicubically resized for other image sizes), optional
//! register tokens, pre-norm blocks with layer scale, a final LayerNorm.

use crate::interpolate::resize_grid;
use crate::vit::{block_dims, BlockNames, PatchEmbed, VisionOutput, VitBlock};
use crate::{AttentionNames, HfConfig, LayerNorm, ParamStore, Result};
use autograd::Var;
use tensor::Tensor;

/// A DINOv2 encoder.
pub struct Dinov2 {
    patch: PatchEmbed,
    cls: Var,
    registers: Option<Var>,
    position: Var,
    grid: usize,
    /// `Dinov2WithRegistersModel` resizes position embeddings with antialiasing, `Dinov2Model` without.
    antialias: bool,
    blocks: Vec<VitBlock>,
    norm: LayerNorm,
}

impl Dinov2 {
    /// Builds from a `dinov2` or `dinov2_with_registers` config and checks nothing else is in
    /// `store` (the unused `mask_token` is skipped).
    pub fn new(cfg: &HfConfig, store: &ParamStore) -> Result<Self> {
        let with_registers = cfg.model_type()? == "dinov2_with_registers";
        let registers = match cfg.model_type()? {
            "dinov2" => 0,
            "dinov2_with_registers" => cfg.usize_or("num_register_tokens", 4)?,
            other => return Err(cfg.error(format!("model_type '{other}' is not a DINOv2 model"))),
        };
        if cfg.bool_or("use_swiglu_ffn", false)? {
            return Err(cfg.error("use_swiglu_ffn=true is not supported"));
        }
        let dim = cfg.usize("hidden_size")?;
        let mlp_hidden = (dim as f64 * cfg.f64_or("mlp_ratio", 4.0)?) as usize;
        let dims = block_dims(cfg, mlp_hidden, 1e-6)?;
        let (image, patch) = (cfg.usize("image_size")?, cfg.usize("patch_size")?);
        let grid = image / patch;
        store.skip("embeddings.mask_token");
        let blocks = (0..cfg.usize("num_hidden_layers")?)
            .map(|i| {
                let l = format!("encoder.layer.{i}");
                let names = BlockNames {
                    norm1: format!("{l}.norm1"),
                    attn: AttentionNames {
                        q: format!("{l}.attention.attention.query"),
                        k: format!("{l}.attention.attention.key"),
                        v: format!("{l}.attention.attention.value"),
                        out: format!("{l}.attention.output.dense"),
                    },
                    scale1: Some(format!("{l}.layer_scale1.lambda1")),
                    norm2: format!("{l}.norm2"),
                    mlp: format!("{l}.mlp"),
                    scale2: Some(format!("{l}.layer_scale2.lambda1")),
                };
                VitBlock::new(store, &names, dims)
            })
            .collect::<Result<Vec<_>>>()?;
        let model = Dinov2 {
            patch: PatchEmbed::new(
                store,
                "embeddings.patch_embeddings.projection",
                cfg.usize_or("num_channels", 3)?,
                dim,
                patch,
            )?,
            cls: store.take("embeddings.cls_token", &[1, 1, dim])?,
            registers: (registers > 0)
                .then(|| store.take("embeddings.register_tokens", &[1, registers, dim]))
                .transpose()?,
            position: store.take("embeddings.position_embeddings", &[1, grid * grid + 1, dim])?,
            grid,
            antialias: with_registers,
            blocks,
            norm: LayerNorm::new(store, "layernorm", dim, dims.eps, true)?,
        };
        store.check_all_used()?;
        Ok(model)
    }

    /// Encodes `pixel_values [B, C, H, W]`: tokens are [CLS, registers..., patches...].
    pub fn forward(&self, pixels: &Tensor) -> Result<VisionOutput> {
        let (patches, nh, nw) = self.patch.forward(&Var::constant(pixels.clone()))?;
        let (b, dim) = (pixels.dim(0), self.cls.value().dim(2));
        let cls_pos = self.position.narrow(1, 0, 1)?;
        let mut patch_pos = self.position.narrow(1, 1, self.grid * self.grid)?;
        if (nh, nw) != (self.grid, self.grid) {
            let grid = patch_pos.reshape(&[self.grid, self.grid, dim])?;
            patch_pos = resize_grid(&grid, nh, nw, self.antialias)?.reshape(&[1, nh * nw, dim])?;
        }
        let cls = self.cls.add(&cls_pos)?.broadcast_to(&[b, 1, dim])?;
        let patches = patches.add(&patch_pos)?;
        let mut parts = vec![cls];
        if let Some(r) = &self.registers {
            parts.push(r.broadcast_to(&[b, r.value().dim(1), dim])?);
        }
        parts.push(patches);
        let mut x = Var::concat(&parts.iter().collect::<Vec<_>>(), 1)?;
        let mut hidden_states = vec![x.clone()];
        for block in &self.blocks {
            x = block.forward(&x)?;
            hidden_states.push(x.clone());
        }
        Ok(VisionOutput {
            last_hidden_state: self.norm.forward(&x)?,
            hidden_states,
        })
    }
}
