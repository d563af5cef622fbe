//! Initial values for freshly created parameters, chosen by the parameter's name as the
//! reference implementations initialise them.

use crate::Result;
use tensor::{DType, Rng, Tensor};

/// The initial value of parameter `name` with `shape`:
/// - biases: 0; norm and layer-scale weights (1-D `*.weight` of a norm, `lambda1`): 1;
/// - Mamba `A_log`: ln(1..=N) per state (Mamba-1 `[D, N]`) or ln(1..=H) (Mamba-2 `[H]`);
///   `D`: 1; `dt_bias` / `dt_proj.bias`: softplus⁻¹ of dt log-uniform in [1e-3, 0.1];
/// - the weights of the multimodal projector (`projector.*.weight`): uniform in ±1/√fan_in,
///   PyTorch's `nn.Linear` default that Cobra's projector keeps, so that image tokens reach the
///   LM at the scale of the vision features rather than shrunk by each layer;
/// - the Mamba mixers' projections and depthwise convolution (`*.mixer.{in_proj, x_proj,
///   out_proj, conv1d}.weight`): the same PyTorch default, ±1/√fan_in (the convolution's fan-in
///   is its kernel width), as `mamba_ssm` keeps them; `dt_proj.weight`: ±1/√dt_rank, as
///   `mamba_ssm` sets it. (`mamba_ssm` also divides `out_proj` by √layers, which a name cannot
///   tell.) At std 0.02 these would shrink the scan's input, B and C about a hundredfold, and a
///   model trained from scratch would barely carry anything across positions;
/// - SigLIP's weights as `transformers` initialises `SiglipVisionModel`: the attention and MLP
///   projections (`encoder.layers.N.{self_attn.*_proj, mlp.fc1, mlp.fc2}.weight`) Xavier-uniform,
///   the position embedding normal with std 1/√width, the patch convolution LeCun-normal (std
///   1/√fan_in; `transformers` truncates it at two deviations). At std 0.02 a narrow tower's
///   attention would pass on about 1% of its input, and each patch would start blind to the rest
///   of the image;
/// - everything else (other projections, embeddings, tokens): normal with std 0.02.
pub fn initial_value(name: &str, shape: &[usize], dtype: DType, rng: &mut Rng) -> Result<Tensor> {
    let leaf = name.rsplit('.').next().unwrap_or(name);
    let is_norm = [
        "norm",
        "layer_norm",
        "layernorm",
        "ln",
        "post_layernorm",
        "norm_f",
    ]
    .iter()
    .any(|n| name.contains(n));
    let n: usize = shape.iter().product();
    Ok(match leaf {
        "A_log" => {
            let last = *shape.last().unwrap_or(&1);
            let per_state = shape.len() > 1;
            let data: Vec<f64> = (0..n)
                .map(|i| {
                    if per_state {
                        ((i % last) + 1) as f64
                    } else {
                        (i + 1) as f64
                    }
                    .ln()
                })
                .collect();
            Tensor::from_vec(data, shape)?.to_dtype(dtype)?
        }
        "D" | "lambda1" => Tensor::ones(shape, dtype),
        "dt_bias" => inverse_softplus_dt(shape, dtype, rng)?,
        "bias" if name.ends_with("dt_proj.bias") => inverse_softplus_dt(shape, dtype, rng)?,
        "bias" => Tensor::zeros(shape, dtype),
        "weight" if shape.len() == 1 && is_norm => Tensor::ones(shape, dtype),
        "weight" if name.ends_with("mixer.dt_proj.weight") && shape.len() == 2 => {
            let bound = 1.0 / (shape[1] as f64).sqrt();
            Tensor::rand_uniform(shape, dtype, -bound, bound, rng)?
        }
        "weight" if siglip_xavier(name) && shape.len() == 2 => {
            let bound = (6.0 / (shape[0] + shape[1]) as f64).sqrt();
            Tensor::rand_uniform(shape, dtype, -bound, bound, rng)?
        }
        "weight" if name.ends_with("embeddings.position_embedding.weight") && shape.len() == 2 => {
            Tensor::randn(shape, dtype, 0.0, 1.0 / (shape[1] as f64).sqrt(), rng)?
        }
        "weight" if name.ends_with("embeddings.patch_embedding.weight") && shape.len() >= 2 => {
            let fan_in: usize = shape[1..].iter().product();
            Tensor::randn(shape, dtype, 0.0, 1.0 / (fan_in as f64).sqrt(), rng)?
        }
        "weight" if pytorch_default(name) && shape.len() >= 2 => {
            let fan_in: usize = shape[1..].iter().product();
            let bound = 1.0 / (fan_in as f64).sqrt();
            Tensor::rand_uniform(shape, dtype, -bound, bound, rng)?
        }
        _ => Tensor::randn(shape, dtype, 0.0, 0.02, rng)?,
    })
}

/// Whether `name` is a weight that keeps PyTorch's default initialisation: the multimodal
/// projector's and the Mamba mixers' projections and convolution.
fn pytorch_default(name: &str) -> bool {
    name.starts_with("projector.")
        || ["in_proj", "x_proj", "out_proj", "conv1d"]
            .iter()
            .any(|layer| name.ends_with(&format!("mixer.{layer}.weight")))
}

/// Whether `name` is a SigLIP attention or MLP projection (SigLIP's `encoder.layers.N` naming;
/// DINOv2's blocks are `encoder.layer.N`), which `transformers` initialises Xavier-uniform.
fn siglip_xavier(name: &str) -> bool {
    name.contains("encoder.layers.")
        && ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
            .iter()
            .any(|layer| name.ends_with(&format!(".{layer}.weight")))
        && (name.contains(".self_attn.") || name.contains(".mlp."))
}

/// `softplus⁻¹(dt)` with dt log-uniform in [1e-3, 0.1], as Mamba initialises its dt bias.
fn inverse_softplus_dt(shape: &[usize], dtype: DType, rng: &mut Rng) -> Result<Tensor> {
    let u = Tensor::rand_uniform(shape, DType::F64, 0.0, 1.0, rng)?.to_vec_f64();
    let data: Vec<f64> = u
        .iter()
        .map(|&u| {
            let dt = (1e-3f64.ln() + u * (0.1f64.ln() - 1e-3f64.ln())).exp();
            dt + (-(-dt).exp_m1()).ln()
        })
        .collect();
    Ok(Tensor::from_vec(data, shape)?.to_dtype(dtype)?)
}

#[cfg(test)]
mod tests {
    use super::initial_value;
    use tensor::{seeded_rng, DType};

    /// The largest magnitude and the standard deviation of a drawn tensor.
    fn spread(name: &str, shape: &[usize]) -> (f64, f64) {
        let v = initial_value(name, shape, DType::F64, &mut seeded_rng(7))
            .unwrap()
            .to_vec_f64();
        let max = v.iter().fold(0.0f64, |m, x| m.max(x.abs()));
        let std = (v.iter().map(|x| x * x).sum::<f64>() / v.len() as f64).sqrt();
        (max, std)
    }

    #[test]
    fn mixer_weights_keep_pytorch_defaults_and_the_rest_std_002() {
        // (name, shape, bound): uniform in ±bound has std bound/√3.
        let cases = [
            (
                "lm.backbone.layers.0.mixer.in_proj.weight",
                vec![256, 64],
                1.0 / 8.0,
            ),
            (
                "lm.backbone.layers.3.mixer.x_proj.weight",
                vec![20, 128],
                1.0 / 128f64.sqrt(),
            ),
            (
                "lm.backbone.layers.1.mixer.out_proj.weight",
                vec![64, 128],
                1.0 / 128f64.sqrt(),
            ),
            ("lm.backbone.layers.0.mixer.conv1d.weight", vec![128, 1, 4], 0.5),
            ("lm.backbone.layers.0.mixer.dt_proj.weight", vec![128, 4], 0.5),
            ("projector.fc1.weight", vec![256, 64], 1.0 / 8.0),
        ];
        for (name, shape, bound) in cases {
            let (max, std) = spread(name, &shape);
            assert!(max <= bound, "{name}: {max} > {bound}");
            let want = bound / 3f64.sqrt();
            assert!((std / want - 1.0).abs() < 0.1, "{name}: std {std}, want {want}");
        }
        let (_, std) = spread("vision.dinov2.encoder.layer.0.mlp.fc1.weight", &[64, 32]);
        assert!((std / 0.02 - 1.0).abs() < 0.1, "std {std}");
    }

    #[test]
    fn siglip_weights_start_as_transformers_initialises_them() {
        // Xavier-uniform: bound √(6 / (fan_in + fan_out)).
        for name in [
            "vision.siglip.encoder.layers.1.self_attn.q_proj.weight",
            "vision.siglip.encoder.layers.0.self_attn.out_proj.weight",
            "vision.siglip.encoder.layers.0.mlp.fc2.weight",
        ] {
            let (max, std) = spread(name, &[48, 32]);
            let bound = (6.0f64 / 80.0).sqrt();
            assert!(max <= bound, "{name}: {max} > {bound}");
            let want = bound / 3f64.sqrt();
            assert!((std / want - 1.0).abs() < 0.1, "{name}: std {std}, want {want}");
        }
        // (name, shape, std): normal with std 1/√width and LeCun-normal 1/√fan_in.
        let normal = [
            (
                "vision.siglip.embeddings.position_embedding.weight",
                vec![64, 32],
                32f64,
            ),
            (
                "vision.siglip.embeddings.patch_embedding.weight",
                vec![32, 3, 8, 8],
                192f64,
            ),
        ];
        for (name, shape, n) in normal {
            let (_, std) = spread(name, &shape);
            let want = 1.0 / n.sqrt();
            assert!((std / want - 1.0).abs() < 0.1, "{name}: std {std}, want {want}");
        }
    }
}
