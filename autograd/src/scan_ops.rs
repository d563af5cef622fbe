//! The differentiable Mamba scans: the selective scan (Mamba-1) and the SSD scan (Mamba-2).
//! Each returns its output as a var and its final state as a plain tensor (no gradient flows
//! through the state).

use crate::{Result, Var};
use tensor::Tensor;

impl Var {
    /// The Mamba-1 selective scan of u `[B, D, L]` (see `Tensor::selective_scan`); every input,
    /// the optional D `[D]`, z `[B, D, L]` and delta_bias `[D]` included, is differentiable.
    /// Returns y `[B, D, L]` and the last state `[B, D, N]`.
    #[allow(clippy::too_many_arguments)]
    pub fn selective_scan(
        &self,
        delta: &Var,
        a: &Var,
        b: &Var,
        c: &Var,
        d_skip: Option<&Var>,
        z: Option<&Var>,
        delta_bias: Option<&Var>,
        delta_softplus: bool,
    ) -> Result<(Var, Tensor)> {
        let [u, delta_t, a_t, b_t, c_t] = [self, delta, a, b, c].map(|v| v.value().clone());
        let [d_t, z_t, bias_t] = [d_skip, z, delta_bias].map(|v| v.map(|v| v.value().clone()));
        let (y, last) = u.selective_scan(
            &delta_t,
            &a_t,
            &b_t,
            &c_t,
            d_t.as_ref(),
            z_t.as_ref(),
            bias_t.as_ref(),
            delta_softplus,
        )?;
        let mut inputs = vec![self, delta, a, b, c];
        inputs.extend(d_skip);
        inputs.extend(z);
        inputs.extend(delta_bias);
        let y = Var::record(y, &inputs, move |g, _| {
            let grads = u.selective_scan_backward(
                &delta_t,
                &a_t,
                &b_t,
                &c_t,
                d_t.as_ref(),
                z_t.as_ref(),
                bias_t.as_ref(),
                delta_softplus,
                g,
            )?;
            let mut out = vec![
                Some(grads.du),
                Some(grads.ddelta),
                Some(grads.da),
                Some(grads.db),
                Some(grads.dc),
            ];
            // Present exactly for the optional inputs given, in input order.
            out.extend(
                [grads.dd, grads.dz, grads.ddelta_bias]
                    .into_iter()
                    .flatten()
                    .map(Some),
            );
            Ok(out)
        });
        Ok((y, last))
    }

    /// The Mamba-2 SSD scan of x `[B, L, H, P]` (see `Tensor::ssd_scan`); every input, the
    /// optional D `[H]`, dt_bias `[H]` and initial state `[B, H, P, N]` included, is
    /// differentiable. Returns y `[B, L, H, P]` and the final state `[B, H, P, N]`.
    #[allow(clippy::too_many_arguments)]
    pub fn ssd_scan(
        &self,
        dt: &Var,
        a: &Var,
        b: &Var,
        c: &Var,
        d_skip: Option<&Var>,
        dt_bias: Option<&Var>,
        dt_softplus: bool,
        chunk_size: usize,
        initial_state: Option<&Var>,
    ) -> Result<(Var, Tensor)> {
        let [x, dt_t, a_t, b_t, c_t] = [self, dt, a, b, c].map(|v| v.value().clone());
        let [d_t, bias_t, init_t] = [d_skip, dt_bias, initial_state].map(|v| v.map(|v| v.value().clone()));
        let (y, last) = x.ssd_scan(
            &dt_t,
            &a_t,
            &b_t,
            &c_t,
            d_t.as_ref(),
            bias_t.as_ref(),
            dt_softplus,
            chunk_size,
            init_t.as_ref(),
        )?;
        let mut inputs = vec![self, dt, a, b, c];
        inputs.extend(d_skip);
        inputs.extend(dt_bias);
        inputs.extend(initial_state);
        let y = Var::record(y, &inputs, move |g, _| {
            let grads = x.ssd_scan_backward(
                &dt_t,
                &a_t,
                &b_t,
                &c_t,
                d_t.as_ref(),
                bias_t.as_ref(),
                dt_softplus,
                chunk_size,
                init_t.as_ref(),
                g,
            )?;
            let mut out = vec![
                Some(grads.dx),
                Some(grads.ddt),
                Some(grads.da),
                Some(grads.db),
                Some(grads.dc),
            ];
            // Present exactly for the optional inputs given, in input order.
            out.extend(
                [grads.dd, grads.ddt_bias, grads.dinitial_state]
                    .into_iter()
                    .flatten()
                    .map(Some),
            );
            Ok(out)
        });
        Ok((y, last))
    }
}
