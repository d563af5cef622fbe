//! The Mamba-1 mixer (`MambaMixer` in transformers): in_proj → causal conv + SiLU → x_proj into
//! (dt, B, C) → dt_proj + softplus → selective scan with D skip and SiLU(z) gate → out_proj.

use crate::{CausalConv1d, HfConfig, LayerCache, Linear, ParamStore, Result};
use autograd::Var;
use tensor::{DType, Tensor};

/// Sizes of a Mamba-1 mixer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mamba1Dims {
    /// Model width.
    pub hidden: usize,
    /// Inner width (expand · hidden).
    pub inner: usize,
    /// SSM state size N.
    pub state: usize,
    /// Convolution width K.
    pub conv_kernel: usize,
    /// Rank of the dt projection.
    pub dt_rank: usize,
    /// Whether in_proj/out_proj have biases.
    pub bias: bool,
    /// Whether the convolution has a bias.
    pub conv_bias: bool,
}

impl Mamba1Dims {
    /// Reads a `model_type: mamba` config.
    pub fn from_config(cfg: &HfConfig) -> Result<Self> {
        let hidden = cfg.usize("hidden_size")?;
        let inner = match cfg.usize_opt("intermediate_size")? {
            Some(i) => i,
            None => cfg.usize_or("expand", 2)? * hidden,
        };
        let dt_rank = match cfg.raw("time_step_rank") {
            Some(serde_json::Value::String(s)) if s == "auto" => hidden.div_ceil(16),
            Some(_) => cfg.usize("time_step_rank")?,
            None => hidden.div_ceil(16),
        };
        Ok(Mamba1Dims {
            hidden,
            inner,
            state: cfg.usize_or("state_size", 16)?,
            conv_kernel: cfg.usize_or("conv_kernel", 4)?,
            dt_rank,
            bias: cfg.bool_or("use_bias", false)?,
            conv_bias: cfg.bool_or("use_conv_bias", true)?,
        })
    }
}

/// One Mamba-1 mixer with its parameters.
pub struct Mamba1Mixer {
    dims: Mamba1Dims,
    in_proj: Linear,
    conv: CausalConv1d,
    x_proj: Linear,
    dt_proj: Linear,
    a_log: Var,
    d: Var,
    out_proj: Linear,
}

impl Mamba1Mixer {
    /// Takes the mixer's parameters under `prefix` (e.g. `backbone.layers.0.mixer`).
    pub fn new(store: &ParamStore, prefix: &str, dims: Mamba1Dims) -> Result<Self> {
        let Mamba1Dims {
            hidden,
            inner,
            state,
            dt_rank,
            ..
        } = dims;
        let p = |s: &str| format!("{prefix}.{s}");
        Ok(Mamba1Mixer {
            dims,
            in_proj: Linear::new(store, &p("in_proj"), hidden, 2 * inner, dims.bias)?,
            conv: CausalConv1d::new(store, &p("conv1d"), inner, dims.conv_kernel, dims.conv_bias)?,
            x_proj: Linear::new(store, &p("x_proj"), inner, dt_rank + 2 * state, false)?,
            dt_proj: Linear::new(store, &p("dt_proj"), dt_rank, inner, true)?,
            a_log: store.take(&p("A_log"), &[inner, state])?,
            d: store.take(&p("D"), &[inner])?,
            out_proj: Linear::new(store, &p("out_proj"), inner, hidden, dims.bias)?,
        })
    }

    /// `x [B, L, hidden] -> [B, L, hidden]`.
    pub fn forward(&self, x: &Var) -> Result<Var> {
        Ok(self.forward_with_state(x)?.0)
    }

    /// [`Mamba1Mixer::forward`], also returning the decoding state after the last step: the
    /// last K-1 convolution inputs and the scan's final state `[B, I, N]`.
    pub fn forward_with_state(&self, x: &Var) -> Result<(Var, LayerCache)> {
        let Mamba1Dims {
            inner,
            state,
            dt_rank,
            ..
        } = self.dims;
        let projected = self.in_proj.forward(x)?.transpose(1, 2)?; // [B, 2I, L]
        let (hs, gate) = (projected.narrow(1, 0, inner)?, projected.narrow(1, inner, inner)?);
        let conv_state = self.conv.state_after(hs.value())?;
        let hs = self.conv.forward_silu(&hs)?; // [B, I, L]
        let ssm = self.x_proj.forward(&hs.transpose(1, 2)?)?; // [B, L, R + 2N]
        let dt = self
            .dt_proj
            .forward(&ssm.narrow(2, 0, dt_rank)?)?
            .transpose(1, 2)?; // [B, I, L]
        let b = ssm.narrow(2, dt_rank, state)?.transpose(1, 2)?; // [B, N, L]
        let c = ssm.narrow(2, dt_rank + state, state)?.transpose(1, 2)?;
        let a = self.a_log.exp()?.neg()?;
        let (y, last) = Var::selective_scan(&hs, &dt, &a, &b, &c, Some(&self.d), Some(&gate), None, true)?;
        let cache = LayerCache {
            conv: conv_state,
            ssm: last,
        };
        Ok((self.out_proj.forward(&y.transpose(1, 2)?)?, cache))
    }

    /// The decoding state before any token: zeros, on the layer's device.
    pub fn empty_state(&self, batch: usize, dtype: DType) -> Result<LayerCache> {
        let conv = self.conv.empty_state(batch, dtype)?;
        let ssm_shape = [batch, self.dims.inner, self.dims.state];
        let ssm = Tensor::zeros_on(&ssm_shape, dtype, conv.device())?;
        Ok(LayerCache { conv, ssm })
    }

    /// One token in recurrent mode: `x [B, hidden] -> [B, hidden]` following the tokens that
    /// `cache` summarises; returns the output and the state after `x`.
    pub fn step(&self, x: &Tensor, cache: &LayerCache) -> Result<(Tensor, LayerCache)> {
        let Mamba1Dims {
            inner,
            state,
            dt_rank,
            ..
        } = self.dims;
        let projected = self.in_proj.forward_tensor(x)?; // [B, 2I]
        let (hs, gate) = (projected.narrow(1, 0, inner)?, projected.narrow(1, inner, inner)?);
        let (hs, conv) = self.conv.step(&cache.conv, &hs)?;
        let hs = hs.silu()?;
        let ssm = self.x_proj.forward_tensor(&hs)?; // [B, R + 2N]
        let dt = self.dt_proj.forward_tensor(&ssm.narrow(1, 0, dt_rank)?)?; // [B, I]
        let b = ssm.narrow(1, dt_rank, state)?; // [B, N]
        let c = ssm.narrow(1, dt_rank + state, state)?;
        let a = self.a_log.value().exp()?.neg()?;
        let (y, ssm) = cache.ssm.selective_state_update(
            &hs,
            &dt,
            &a,
            &b,
            &c,
            Some(self.d.value()),
            Some(&gate),
            None,
            true,
        )?;
        Ok((self.out_proj.forward_tensor(&y)?, LayerCache { conv, ssm }))
    }
}
