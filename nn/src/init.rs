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
/// - everything else (projections, embeddings, tokens): normal with std 0.02.
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
        "weight" if name.starts_with("projector.") && shape.len() == 2 => {
            let bound = 1.0 / (shape[1] as f64).sqrt();
            Tensor::rand_uniform(shape, dtype, -bound, bound, rng)?
        }
        _ => Tensor::randn(shape, dtype, 0.0, 0.02, rng)?,
    })
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
