//! The recurrent state of cached generation with a [`crate::MambaLm`]: per layer, the last
//! inputs of the causal convolution and the SSM state. Its size does not depend on how many
//! tokens it has seen.

use tensor::Tensor;

/// The state one mixer layer carries from token to token.
#[derive(Clone, Debug)]
pub struct LayerCache {
    /// The last K-1 inputs of the causal convolution, oldest first: `[B, C, K-1]`.
    pub(crate) conv: Tensor,
    /// The SSM state after the last token: `[B, D, N]` (Mamba-1) or `[B, H, P, N]` (Mamba-2).
    pub(crate) ssm: Tensor,
}

impl LayerCache {
    /// The last K-1 inputs of the convolution, `[B, C, K-1]` (zeros before the first token).
    pub fn conv_state(&self) -> &Tensor {
        &self.conv
    }

    /// The SSM state: `[B, D, N]` for Mamba-1, `[B, H, P, N]` for Mamba-2.
    pub fn ssm_state(&self) -> &Tensor {
        &self.ssm
    }
}

/// The recurrent state of a whole model, one [`LayerCache`] per block, made by
/// [`crate::MambaLm::prefill`] or [`crate::MambaLm::empty_cache`] and advanced by
/// [`crate::MambaLm::step`].
#[derive(Clone, Debug)]
pub struct Cache {
    pub(crate) layers: Vec<LayerCache>,
}

impl Cache {
    /// The per-layer states, first block first.
    pub fn layers(&self) -> &[LayerCache] {
        &self.layers
    }

    /// The number of sequences B.
    pub fn batch(&self) -> usize {
        self.layers.first().map_or(0, |l| l.ssm.dim(0))
    }

    /// Bytes held by all states (constant while stepping).
    pub fn size_in_bytes(&self) -> usize {
        self.layers
            .iter()
            .flat_map(|l| [&l.conv, &l.ssm])
            .map(|t| t.numel() * t.dtype().size_in_bytes())
            .sum()
    }
}
