//! The Mamba-2 mixer (`Mamba2Mixer` in transformers): in_proj into (z, xBC, dt) → causal conv +
//! SiLU over xBC → SSD scan with softplus(dt + dt_bias), groups and D skip → gated RMSNorm with
//! z → out_proj.

use crate::{CausalConv1d, GatedRmsNorm, HfConfig, LayerCache, Linear, ParamStore, Result};
use autograd::Var;
use tensor::{DType, Tensor};

/// Sizes of a Mamba-2 mixer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Mamba2Dims {
    /// Model width.
    pub hidden: usize,
    /// Inner width (heads · head_dim).
    pub inner: usize,
    /// Number of heads H.
    pub heads: usize,
    /// Channels per head P.
    pub head_dim: usize,
    /// Number of B/C groups G.
    pub groups: usize,
    /// SSM state size N.
    pub state: usize,
    /// Convolution width K.
    pub conv_kernel: usize,
    /// SSD chunk length.
    pub chunk: usize,
    /// Whether in_proj/out_proj have biases.
    pub bias: bool,
    /// Whether the convolution has a bias.
    pub conv_bias: bool,
    /// Epsilon of the gated RMSNorm.
    pub norm_eps: f64,
}

impl Mamba2Dims {
    /// Reads a `model_type: mamba2` config, rejecting variants this mixer does not implement.
    pub fn from_config(cfg: &HfConfig) -> Result<Self> {
        let hidden = cfg.usize("hidden_size")?;
        let heads = cfg.usize("num_heads")?;
        let head_dim = cfg.usize_or("head_dim", 64)?;
        let inner = (cfg.f64_or("expand", 2.0)? * hidden as f64) as usize;
        if heads * head_dim != inner {
            return Err(cfg.error(format!(
                "num_heads {heads} x head_dim {head_dim} != expand x hidden_size {inner}"
            )));
        }
        let groups = cfg.usize_or("n_groups", 1)?;
        if groups == 0 || !heads.is_multiple_of(groups) {
            return Err(cfg.error(format!(
                "num_heads {heads} is not a multiple of n_groups {groups}"
            )));
        }
        if cfg.bool_or("norm_before_gate", false)? || !cfg.bool_or("rms_norm", true)? {
            return Err(cfg.error("only rms_norm=true with norm_before_gate=false is supported"));
        }
        if let Some(limit) = cfg.raw("time_step_limit") {
            let unbounded = limit.as_array().is_some_and(|l| {
                l.len() == 2 && l[0].as_f64() == Some(0.0) && l[1].as_f64().is_none_or(f64::is_infinite)
            });
            if !unbounded {
                return Err(cfg.error(format!(
                    "time_step_limit {limit} is not supported (only [0, inf])"
                )));
            }
        }
        Ok(Mamba2Dims {
            hidden,
            inner,
            heads,
            head_dim,
            groups,
            state: cfg.usize_or("state_size", 128)?,
            conv_kernel: cfg.usize_or("conv_kernel", 4)?,
            chunk: cfg.usize_or("chunk_size", 256)?,
            bias: cfg.bool_or("use_bias", false)?,
            conv_bias: cfg.bool_or("use_conv_bias", true)?,
            norm_eps: cfg.f64_or("layer_norm_epsilon", 1e-5)?,
        })
    }

    /// Channels that go through the convolution: x, B and C.
    pub fn conv_dim(&self) -> usize {
        self.inner + 2 * self.groups * self.state
    }
}

/// One Mamba-2 mixer with its parameters.
pub struct Mamba2Mixer {
    dims: Mamba2Dims,
    in_proj: Linear,
    conv: CausalConv1d,
    dt_bias: Var,
    a_log: Var,
    d: Var,
    norm: GatedRmsNorm,
    out_proj: Linear,
}

impl Mamba2Mixer {
    /// Takes the mixer's parameters under `prefix`.
    pub fn new(store: &ParamStore, prefix: &str, dims: Mamba2Dims) -> Result<Self> {
        let Mamba2Dims {
            hidden,
            inner,
            heads,
            groups,
            ..
        } = dims;
        let p = |s: &str| format!("{prefix}.{s}");
        let proj = inner + dims.conv_dim() + heads;
        Ok(Mamba2Mixer {
            dims,
            in_proj: Linear::new(store, &p("in_proj"), hidden, proj, dims.bias)?,
            conv: CausalConv1d::new(
                store,
                &p("conv1d"),
                dims.conv_dim(),
                dims.conv_kernel,
                dims.conv_bias,
            )?,
            dt_bias: store.take(&p("dt_bias"), &[heads])?,
            a_log: store.take(&p("A_log"), &[heads])?,
            d: store.take(&p("D"), &[heads])?,
            norm: GatedRmsNorm::new(store, &p("norm"), inner, inner / groups, dims.norm_eps)?,
            out_proj: Linear::new(store, &p("out_proj"), inner, hidden, dims.bias)?,
        })
    }

    /// `x [B, L, hidden] -> [B, L, hidden]`.
    pub fn forward(&self, x: &Var) -> Result<Var> {
        Ok(self.forward_with_state(x)?.0)
    }

    /// [`Mamba2Mixer::forward`], also returning the decoding state after the last step: the
    /// last K-1 convolution inputs and the scan's final state `[B, H, P, N]`.
    pub fn forward_with_state(&self, x: &Var) -> Result<(Var, LayerCache)> {
        let Mamba2Dims {
            inner,
            heads,
            head_dim,
            groups,
            state,
            ..
        } = self.dims;
        let (b, l) = (x.value().dim(0), x.value().dim(1));
        let conv_dim = self.dims.conv_dim();
        let projected = self.in_proj.forward(x)?; // [B, L, I + conv_dim + H]
        let gate = projected.narrow(2, 0, inner)?;
        let xbc = projected.narrow(2, inner, conv_dim)?.transpose(1, 2)?;
        let dt = projected.narrow(2, inner + conv_dim, heads)?; // [B, L, H]
        let conv_state = self.conv.state_after(xbc.value())?;
        // x stays channels-last: the conv reads it in place and writes [B, L, conv_dim].
        let xbc = self.conv.forward_silu(&xbc)?.transpose(1, 2)?; // [B, L, conv_dim]
        let xs = xbc.narrow(2, 0, inner)?.reshape(&[b, l, heads, head_dim])?;
        let bm = xbc
            .narrow(2, inner, groups * state)?
            .reshape(&[b, l, groups, state])?;
        let cm = xbc
            .narrow(2, inner + groups * state, groups * state)?
            .reshape(&[b, l, groups, state])?;
        let a = self.a_log.exp()?.neg()?;
        let (y, last) = Var::ssd_scan(
            &xs,
            &dt,
            &a,
            &bm,
            &cm,
            Some(&self.d),
            Some(&self.dt_bias),
            true,
            self.dims.chunk,
            None,
        )?;
        let y = self.norm.forward(&y.reshape(&[b, l, inner])?, &gate)?;
        let cache = LayerCache {
            conv: conv_state,
            ssm: last,
        };
        Ok((self.out_proj.forward(&y)?, cache))
    }

    /// The decoding state before any token: zeros, on the layer's device.
    pub fn empty_state(&self, batch: usize, dtype: DType) -> Result<LayerCache> {
        let Mamba2Dims {
            heads,
            head_dim,
            state,
            ..
        } = self.dims;
        let conv = self.conv.empty_state(batch, dtype)?;
        let ssm = Tensor::zeros_on(&[batch, heads, head_dim, state], dtype, conv.device())?;
        Ok(LayerCache { conv, ssm })
    }

    /// One token in recurrent mode: `x [B, hidden] -> [B, hidden]` following the tokens that
    /// `cache` summarises; returns the output and the state after `x`.
    pub fn step(&self, x: &Tensor, cache: &LayerCache) -> Result<(Tensor, LayerCache)> {
        let Mamba2Dims {
            inner,
            heads,
            head_dim,
            groups,
            state,
            ..
        } = self.dims;
        let conv_dim = self.dims.conv_dim();
        let projected = self.in_proj.forward_tensor(x)?; // [B, I + conv_dim + H]
        let b = projected.dim(0);
        let gate = projected.narrow(1, 0, inner)?;
        let dt = projected.narrow(1, inner + conv_dim, heads)?; // [B, H]
        let (xbc, conv) = self
            .conv
            .step(&cache.conv, &projected.narrow(1, inner, conv_dim)?)?;
        let xbc = xbc.silu()?; // [B, conv_dim]
        let xs = xbc.narrow(1, 0, inner)?.reshape(&[b, heads, head_dim])?;
        let bm = xbc
            .narrow(1, inner, groups * state)?
            .reshape(&[b, groups, state])?;
        let cm = xbc
            .narrow(1, inner + groups * state, groups * state)?
            .reshape(&[b, groups, state])?;
        let a = self.a_log.value().exp()?.neg()?;
        let (y, ssm) = cache.ssm.ssd_state_update(
            &xs,
            &dt,
            &a,
            &bm,
            &cm,
            Some(self.d.value()),
            Some(self.dt_bias.value()),
            true,
        )?;
        let y = self.norm.forward_tensor(&y.reshape(&[b, inner])?, &gate)?;
        Ok((self.out_proj.forward_tensor(&y)?, LayerCache { conv, ssm }))
    }
}
