//! Parameter counts of an EMMA configuration, per component, without allocating the model.

use crate::config::EmmaConfig;
use crate::model::Emma;
use nn::ParamStore;

/// `(component, parameters)` for every component of `cfg`, in model order, then the total.
/// The model is built over shape-only placeholders, so the 2.8B presets cost no memory.
pub fn parameter_counts(cfg: &EmmaConfig) -> nn::Result<Vec<(&'static str, usize)>> {
    let model = Emma::new(cfg, ParamStore::placeholders(format!("preset {}", cfg.name)))?;
    let store = model.store();
    let count = |prefix: &str| store.scope(prefix).numel();
    let mut rows = vec![
        ("vision: SigLIP", count("vision.siglip.")),
        ("vision: DINOv2", count("vision.dinov2.")),
        ("projector", count("projector.")),
        ("language model", count("lm.")),
        (
            "alignment: fusion (MFF)",
            count("alignment.feature_norms.") + count("alignment.fusion."),
        ),
        (
            "alignment: pixel decoder",
            count("alignment.decoder.") + count("alignment.target_patch_embed."),
        ),
    ];
    rows.push(("total", rows.iter().map(|r| r.1).sum()));
    Ok(rows)
}
