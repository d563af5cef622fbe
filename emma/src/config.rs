//! `EmmaConfig`: the shapes and switches of an EMMA model, and the named presets.

use nn::HfConfig;
use serde::{Deserialize, Serialize};
use serde_json::json;

/// A ViT encoder's sizes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VitConfig {
    /// Width.
    pub dim: usize,
    /// Blocks.
    pub layers: usize,
    /// Attention heads.
    pub heads: usize,
    /// MLP hidden width.
    pub mlp: usize,
    /// Register tokens (DINOv2 only; 0 for SigLIP).
    pub registers: usize,
}

/// The vision backbone: DINOv2 and SigLIP at the same resolution and patch size, so that their
/// patch grids line up and features concatenate per patch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VisionConfig {
    /// Input side in pixels.
    pub image_size: usize,
    /// Patch side in pixels.
    pub patch: usize,
    /// SigLIP tower.
    pub siglip: VitConfig,
    /// DINOv2 tower.
    pub dinov2: VitConfig,
    /// Whether the towers are frozen (the paper's recipe).
    pub frozen: bool,
}

impl VisionConfig {
    /// Patches per side.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch
    }

    /// Image tokens per image.
    pub fn tokens(&self) -> usize {
        self.grid() * self.grid()
    }

    /// Concatenated feature width (DINOv2 + SigLIP).
    pub fn feature_dim(&self) -> usize {
        self.dinov2.dim + self.siglip.dim
    }
}

/// Which Mamba the language model is made of.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LmKind {
    /// Mamba-1 (selective scan).
    Mamba1,
    /// Mamba-2 (SSD).
    Mamba2,
}

/// The language model's sizes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LmConfig {
    /// Mamba-1 or Mamba-2.
    pub kind: LmKind,
    /// Model width.
    pub hidden: usize,
    /// Residual blocks.
    pub layers: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// SSM state size.
    pub state: usize,
    /// dt projection rank (Mamba-1).
    pub dt_rank: usize,
    /// Channels per head (Mamba-2).
    pub head_dim: usize,
    /// B/C groups (Mamba-2).
    pub groups: usize,
    /// SSD chunk length (Mamba-2).
    pub chunk: usize,
}

impl LmConfig {
    /// The equivalent Hugging Face config (`mamba` or `mamba2`), so `nn::MambaLm` builds it.
    pub fn to_hf(&self) -> HfConfig {
        let common = json!({
            "hidden_size": self.hidden, "num_hidden_layers": self.layers, "vocab_size": self.vocab,
            "state_size": self.state, "expand": 2, "conv_kernel": 4, "use_bias": false,
            "use_conv_bias": true, "layer_norm_epsilon": 1e-5, "tie_word_embeddings": true,
        });
        let mut v = common;
        let extra = match self.kind {
            LmKind::Mamba1 => json!({ "model_type": "mamba", "time_step_rank": self.dt_rank }),
            LmKind::Mamba2 => json!({
                "model_type": "mamba2", "num_heads": 2 * self.hidden / self.head_dim,
                "head_dim": self.head_dim, "n_groups": self.groups, "chunk_size": self.chunk,
            }),
        };
        v.as_object_mut()
            .expect("object")
            .extend(extra.as_object().expect("object").clone());
        HfConfig::from_value("<EmmaConfig.lm>", v)
    }
}

/// What the pixel decoder predicts per patch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PixelTarget {
    /// The SigLIP patch embedding of the input (a trainable copy of SigLIP's patch conv).
    PatchEmbedding,
    /// The raw SigLIP-normalised pixels of the patch.
    Pixels,
}

/// Hierarchical alignment (multi-scale fusion) and the pixel decoder; training only.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AlignmentConfig {
    /// Fuse LM features from several layers (MFF); off: every decoder block sees the last layer.
    pub mff: bool,
    /// Train with the pixel-wise alignment loss (adds the decoder); off with `mff` off = Cobra.
    pub pixel_loss: bool,
    /// Weight of the pixel loss (a sum of squared errors).
    pub weight: f64,
    /// LM layers (1-based, "after layer i") whose image positions feed the fusion, besides the last.
    pub layers: Vec<usize>,
    /// Decoder attention heads.
    pub heads: usize,
    /// Decoder head width (heads · head_dim = LM width).
    pub head_dim: usize,
    /// SSM state of the decoder's Mamba-2 blocks.
    pub state: usize,
    /// Channels per head of the decoder's Mamba-2 blocks.
    pub mamba_head_dim: usize,
    /// SSD chunk of the decoder's Mamba-2 blocks.
    pub chunk: usize,
    /// The prediction target.
    pub target: PixelTarget,
}

/// A whole EMMA model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EmmaConfig {
    /// Preset name or a free label.
    pub name: String,
    /// Vision backbone.
    pub vision: VisionConfig,
    /// Projector hidden width (the paper: 4 x feature width).
    pub projector_hidden: usize,
    /// Language model.
    pub lm: LmConfig,
    /// Alignment and decoder.
    pub alignment: AlignmentConfig,
}

/// The names `EmmaConfig::preset` knows.
pub const PRESETS: [&str; 4] = ["tiny", "small", "emma-v1-2.8b", "emma-v2-2.7b"];

impl EmmaConfig {
    /// [`EmmaConfig::preset`], or an error naming the known presets.
    pub fn named(name: &str) -> crate::error::Result<Self> {
        Self::preset(name).ok_or_else(|| crate::error::EmmaError::UnknownPreset { name: name.into() })
    }

    /// A named preset: `tiny` (every component, seconds per step on 2 CPU cores), `small`,
    /// `emma-v1-2.8b` (Mamba-1 LM) and `emma-v2-2.7b` (Mamba-2 LM) with the paper's shapes.
    pub fn preset(name: &str) -> Option<Self> {
        let vit = |dim, layers, heads, mlp, registers| VitConfig {
            dim,
            layers,
            heads,
            mlp,
            registers,
        };
        let (vision, lm, alignment_layers, heads, head_dim, state, mamba_head_dim, chunk) = match name {
            "tiny" => (
                VisionConfig {
                    image_size: 32,
                    patch: 8,
                    siglip: vit(32, 2, 2, 64, 0),
                    dinov2: vit(32, 2, 2, 64, 1),
                    // Random towers are trained: frozen, they would be random projections
                    // (`train` on easy-VQA pre-trains them with its vision warm-up, then
                    // freezes them).
                    frozen: false,
                },
                LmConfig {
                    kind: LmKind::Mamba1,
                    hidden: 64,
                    layers: 4,
                    vocab: 512,
                    state: 8,
                    dt_rank: 4,
                    head_dim: 16,
                    groups: 1,
                    chunk: 16,
                },
                vec![1, 2, 3],
                4,
                16,
                8,
                16,
                8,
            ),
            "small" => (
                VisionConfig {
                    image_size: 64,
                    patch: 8,
                    siglip: vit(128, 4, 4, 512, 0),
                    dinov2: vit(128, 4, 4, 512, 2),
                    frozen: true,
                },
                LmConfig {
                    kind: LmKind::Mamba1,
                    hidden: 256,
                    layers: 8,
                    vocab: 2048,
                    state: 16,
                    dt_rank: 16,
                    head_dim: 32,
                    groups: 1,
                    chunk: 64,
                },
                vec![3, 5, 6],
                8,
                32,
                16,
                32,
                64,
            ),
            "emma-v1-2.8b" | "emma-v2-2.7b" => {
                let lm = if name == "emma-v1-2.8b" {
                    LmConfig {
                        kind: LmKind::Mamba1,
                        hidden: 2560,
                        layers: 64,
                        vocab: 50280,
                        state: 16,
                        dt_rank: 160,
                        head_dim: 64,
                        groups: 1,
                        chunk: 256,
                    }
                } else {
                    LmConfig {
                        kind: LmKind::Mamba2,
                        hidden: 2560,
                        layers: 64,
                        vocab: 50288,
                        state: 128,
                        dt_rank: 160,
                        head_dim: 64,
                        groups: 1,
                        chunk: 256,
                    }
                };
                (
                    VisionConfig {
                        image_size: 384,
                        patch: 14,
                        siglip: vit(1152, 27, 16, 4304, 0),
                        dinov2: vit(1024, 24, 16, 4096, 4),
                        frozen: true,
                    },
                    lm,
                    vec![24, 36, 48],
                    40,
                    64,
                    128,
                    64,
                    256,
                )
            }
            _ => return None,
        };
        let projector_hidden = 4 * vision.feature_dim();
        Some(EmmaConfig {
            name: name.to_string(),
            vision,
            projector_hidden,
            lm,
            alignment: AlignmentConfig {
                mff: true,
                pixel_loss: true,
                weight: 1e-5,
                layers: alignment_layers,
                heads,
                head_dim,
                state,
                mamba_head_dim,
                chunk,
                target: PixelTarget::PatchEmbedding,
            },
        })
    }

    /// The SigLIP tower as a Hugging Face `siglip_vision_model` config.
    pub fn siglip_hf(&self) -> HfConfig {
        let (v, s) = (&self.vision, &self.vision.siglip);
        HfConfig::from_value(
            "<EmmaConfig.vision.siglip>",
            json!({
                "model_type": "siglip_vision_model", "hidden_size": s.dim, "intermediate_size": s.mlp,
                "num_hidden_layers": s.layers, "num_attention_heads": s.heads, "image_size": v.image_size,
                "patch_size": v.patch, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6,
            }),
        )
    }

    /// The DINOv2 tower as a Hugging Face `dinov2_with_registers` (or `dinov2`) config.
    pub fn dinov2_hf(&self) -> HfConfig {
        let (v, d) = (&self.vision, &self.vision.dinov2);
        let model_type = if d.registers > 0 {
            "dinov2_with_registers"
        } else {
            "dinov2"
        };
        HfConfig::from_value(
            "<EmmaConfig.vision.dinov2>",
            json!({
                "model_type": model_type, "hidden_size": d.dim, "mlp_ratio": d.mlp as f64 / d.dim as f64,
                "num_hidden_layers": d.layers, "num_attention_heads": d.heads, "image_size": v.image_size,
                "patch_size": v.patch, "hidden_act": "gelu", "layer_norm_eps": 1e-6,
                "num_register_tokens": d.registers,
            }),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::{EmmaConfig, PRESETS};

    #[test]
    fn an_unknown_preset_names_the_known_ones() {
        for name in PRESETS {
            assert_eq!(EmmaConfig::named(name).unwrap().name, name);
        }
        let err = EmmaConfig::named("huge").unwrap_err().to_string();
        assert_eq!(
            err,
            "unknown preset 'huge' (known: tiny, small, emma-v1-2.8b, emma-v2-2.7b)"
        );
    }
}
