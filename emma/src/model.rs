//! `Emma`: the fused DINOv2 + SigLIP backbone, the GELU-MLP projector, the Mamba LM over
//! [image tokens | text tokens], and (when training with it) the alignment module.

use crate::alignment::Alignment;
use crate::config::EmmaConfig;
use autograd::Var;
use nn::{Dinov2, Gelu, Linear, MambaLm, ParamStore, SiglipHead, SiglipVision};
use tensor::{DType, Device, Tensor};

pub use crate::prompt::IGNORE_INDEX;

/// One batch of image–text examples.
pub struct Batch {
    /// SigLIP-normalised images `[B, 3, S, S]`.
    pub siglip_pixels: Tensor,
    /// DINOv2-normalised images `[B, 3, S, S]`.
    pub dinov2_pixels: Tensor,
    /// Text token ids `[B, T]` (u32).
    pub ids: Tensor,
    /// The learned target of text position t: `ids[t]` for answer tokens, [`IGNORE_INDEX`]
    /// elsewhere (u32 `[B, T]`).
    pub labels: Tensor,
}

/// The losses of a batch.
pub struct Losses {
    /// `text + pixel` (what is minimised).
    pub total: Var,
    /// Mean next-token cross-entropy over answer tokens.
    pub text: Var,
    /// The pixel-wise alignment loss, when enabled.
    pub pixel: Option<Var>,
}

/// Cobra's "fused GELU MLP" projector: feature → 4·feature → LM width → LM width.
struct Projector {
    fc1: Linear,
    fc2: Linear,
    fc3: Linear,
}

impl Projector {
    fn forward(&self, x: &Var) -> nn::Result<Var> {
        let h = Gelu::Erf.apply(&self.fc1.forward(x)?)?;
        let h = Gelu::Erf.apply(&self.fc2.forward(&h)?)?;
        self.fc3.forward(&h)
    }
}

/// A whole EMMA model over one parameter store (prefixes `vision.siglip.`, `vision.dinov2.`,
/// `projector.`, `lm.`, `alignment.`; Hugging Face names below each).
pub struct Emma {
    cfg: EmmaConfig,
    store: ParamStore,
    siglip: SiglipVision,
    dinov2: Dinov2,
    projector: Projector,
    lm: MambaLm,
    alignment: Option<Alignment>,
}

impl Emma {
    /// Builds the model of `cfg` from `store` (created on the fly by a random store), freezing
    /// the vision towers when the config says so; fails naming any missing, misshapen or
    /// unused parameter.
    pub fn new(cfg: &EmmaConfig, store: ParamStore) -> nn::Result<Self> {
        if cfg.vision.frozen {
            store.scope("vision.").freeze();
        }
        let siglip_store = store.scope("vision.siglip.");
        let siglip = SiglipVision::new(&cfg.siglip_hf(), &siglip_store, SiglipHead::Skip)?;
        let dinov2 = Dinov2::new(&cfg.dinov2_hf(), &store.scope("vision.dinov2."))?;
        let p = store.scope("projector.");
        let (f, h, d) = (cfg.vision.feature_dim(), cfg.projector_hidden, cfg.lm.hidden);
        let projector = Projector {
            fc1: Linear::new(&p, "fc1", f, h, true)?,
            fc2: Linear::new(&p, "fc2", h, d, true)?,
            fc3: Linear::new(&p, "fc3", d, d, true)?,
        };
        p.check_all_used()?;
        let lm = MambaLm::new(&cfg.lm.to_hf(), &store.scope("lm."))?;
        let alignment = if cfg.alignment.pixel_loss {
            let (patch, s) = (cfg.vision.patch, cfg.vision.siglip.dim);
            let w = siglip_store.take("embeddings.patch_embedding.weight", &[s, 3, patch, patch])?;
            let b = siglip_store.take("embeddings.patch_embedding.bias", &[s])?;
            let a = store.scope("alignment.");
            let module = Alignment::new(cfg, &a, (w.value(), b.value()))?;
            a.check_all_used()?;
            Some(module)
        } else {
            None
        };
        store.check_all_used()?;
        Ok(Emma {
            cfg: cfg.clone(),
            store,
            siglip,
            dinov2,
            projector,
            lm,
            alignment,
        })
    }

    /// A model with freshly initialised parameters in `dtype`, seeded, on the CPU.
    pub fn random(cfg: &EmmaConfig, seed: u64, dtype: DType, trainable: bool) -> nn::Result<Self> {
        Self::random_on(cfg, seed, dtype, trainable, Device::Cpu)
    }

    /// [`Emma::random`] on `device` (the same values: they are drawn on the host).
    pub fn random_on(
        cfg: &EmmaConfig,
        seed: u64,
        dtype: DType,
        trainable: bool,
        device: Device,
    ) -> nn::Result<Self> {
        let store = ParamStore::random(
            tensor::seeded_rng(seed),
            dtype,
            trainable,
            format!("random {}", cfg.name),
        );
        store.set_device(device);
        Self::new(cfg, store)
    }

    /// The configuration.
    pub fn config(&self) -> &EmmaConfig {
        &self.cfg
    }

    /// The parameter store (for gradients, optimisers and saving).
    pub fn store(&self) -> &ParamStore {
        &self.store
    }

    /// The device the model's parameters live on (set on the store before building); inputs
    /// on another device are copied there.
    pub fn device(&self) -> Device {
        self.store.device()
    }

    /// `t` on the model's device (a cheap clone when it is there already).
    fn here(&self, t: &Tensor) -> nn::Result<Tensor> {
        Ok(t.to_device(self.device())?)
    }

    /// The language model.
    pub fn lm(&self) -> &MambaLm {
        &self.lm
    }

    /// Recomputes each language-model block in the backward pass instead of keeping its
    /// activations (`train --recompute`; see [`MambaLm::set_recompute`]).
    pub fn set_recompute(&mut self, on: bool) {
        self.lm.set_recompute(on);
    }

    /// Per-patch features `[B, N, dinov2 + siglip]`: each tower's second-to-last block, DINOv2's
    /// CLS and register tokens dropped.
    pub fn vision_features(&self, siglip_pixels: &Tensor, dinov2_pixels: &Tensor) -> nn::Result<Var> {
        let n = self.cfg.vision.tokens();
        let s = self.siglip.forward(&self.here(siglip_pixels)?)?;
        let d = self.dinov2.forward(&self.here(dinov2_pixels)?)?;
        let skip = 1 + self.cfg.vision.dinov2.registers;
        let dino = d.penultimate().narrow(1, skip, n)?;
        Ok(Var::concat(&[&dino, s.penultimate()], 2)?)
    }

    /// Projected image tokens `[B, N, hidden]`.
    pub fn image_tokens(&self, siglip_pixels: &Tensor, dinov2_pixels: &Tensor) -> nn::Result<Var> {
        self.projector
            .forward(&self.vision_features(siglip_pixels, dinov2_pixels)?)
    }

    /// The text loss of a batch without images (LLaVA's text-only samples): position t predicts
    /// text token t + 1 over u32 `ids [B, T]` and their `labels`; no pixel loss.
    pub fn text_only_losses(&self, ids: &Tensor, labels: &Tensor) -> nn::Result<Losses> {
        let (b, t) = (ids.dim(0), ids.dim(1));
        if labels.shape() != ids.shape() || t < 2 {
            return Err(nn::NnError::Input {
                layer: "emma".into(),
                detail: format!(
                    "text-only batch needs labels like ids [B, T >= 2], got ids {:?} and labels {:?}",
                    ids.shape(),
                    labels.shape()
                ),
            });
        }
        let (ids, labels) = (self.here(ids)?, self.here(labels)?);
        let (hidden, _) = self.lm.forward_embeds(&self.lm.embed(&ids)?)?;
        let logits = self.lm.logits(&hidden.narrow(1, 0, t - 1)?)?;
        let vocab = logits.value().dim(2);
        let targets = labels.narrow(1, 1, t - 1)?.reshape(&[b * (t - 1)])?;
        let text = logits
            .reshape(&[b * (t - 1), vocab])?
            .cross_entropy(&targets, IGNORE_INDEX)?;
        Ok(Losses {
            total: text.clone(),
            text,
            pixel: None,
        })
    }

    /// Text loss, pixel loss and their sum for a batch. Text position t is predicted from the
    /// position before it (the last image token predicts the first text token).
    pub fn losses(&self, batch: &Batch) -> nn::Result<Losses> {
        let (b, t) = (batch.ids.dim(0), batch.ids.dim(1));
        if batch.labels.shape() != batch.ids.shape() {
            return Err(nn::NnError::Input {
                layer: "emma".into(),
                detail: format!(
                    "labels {:?} do not match ids {:?}",
                    batch.labels.shape(),
                    batch.ids.shape()
                ),
            });
        }
        let n = self.cfg.vision.tokens();
        // Moved once: the vision towers and the pixel loss both read SigLIP's pixels.
        let siglip_pixels = self.here(&batch.siglip_pixels)?;
        let image = self.image_tokens(&siglip_pixels, &batch.dinov2_pixels)?;
        let text = self.lm.embed(&self.here(&batch.ids)?)?;
        let (hidden, per_layer) = self.lm.forward_embeds(&Var::concat(&[&image, &text], 1)?)?;
        let logits = self.lm.logits(&hidden.narrow(1, n - 1, t)?)?;
        let vocab = logits.value().dim(2);
        let targets = self.here(&batch.labels)?.reshape(&[b * t])?;
        let text_loss = logits
            .reshape(&[b * t, vocab])?
            .cross_entropy(&targets, IGNORE_INDEX)?;
        let pixel = self
            .alignment
            .as_ref()
            .map(|a| a.loss(&per_layer, &siglip_pixels))
            .transpose()?;
        let total = match &pixel {
            Some(p) => text_loss.add(p)?,
            None => text_loss.clone(),
        };
        Ok(Losses {
            total,
            text: text_loss,
            pixel,
        })
    }
}
