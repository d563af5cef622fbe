//! Softmax and log-softmax over rows, and the fused cross-entropy.

use super::{bad_index_word, check_bad_index, need, product};
use crate::compile::{CROSS_ENTROPY, SOFTMAX};
use crate::device::{DeviceBuffer, FloatElem, GpuDevice};
use crate::error::Result;
use crate::launch::{entry, launch, Arg, Grid};

/// Threads of the one-block kernels that sum over all rows.
const ONE_BLOCK_THREADS: u32 = 1024;

impl GpuDevice {
    /// Softmax over each of `rows` contiguous rows of `len` elements (`log`: log-softmax).
    fn softmax_rows<T: FloatElem>(
        &self,
        x: &DeviceBuffer<T>,
        y: &mut DeviceBuffer<T>,
        rows: usize,
        len: usize,
        log: bool,
    ) -> Result<()> {
        let n = product("softmax", "shape", &[rows, len])?;
        need(self, "softmax", "input", x, n)?;
        need(self, "softmax", "output", y, n)?;
        if n == 0 {
            return Ok(());
        }
        let args = [
            Arg::buf(x),
            Arg::buf(y),
            Arg::size(rows),
            Arg::size(len),
            Arg::flag(log),
        ];
        launch(
            self,
            &SOFTMAX,
            &entry::<T>("softmax"),
            Grid::rows(rows, len),
            &args,
        )
    }

    /// `y = exp(x - max) / Σ exp(x - max)` over each row of `len` elements.
    pub fn softmax<T: FloatElem>(
        &self,
        x: &DeviceBuffer<T>,
        y: &mut DeviceBuffer<T>,
        rows: usize,
        len: usize,
    ) -> Result<()> {
        self.softmax_rows(x, y, rows, len, false)
    }

    /// `y = (x - max) - ln Σ exp(x - max)` over each row of `len` elements.
    pub fn log_softmax<T: FloatElem>(
        &self,
        x: &DeviceBuffer<T>,
        y: &mut DeviceBuffer<T>,
        rows: usize,
        len: usize,
    ) -> Result<()> {
        self.softmax_rows(x, y, rows, len, true)
    }

    /// Backward over rows from the forward output `y` and its gradient `g`: softmax
    /// `dx = y · (g - Σ g·y)`, log-softmax (`log`) `dx = g - exp(y) · Σ g`.
    pub fn softmax_backward<T: FloatElem>(
        &self,
        y: &DeviceBuffer<T>,
        g: &DeviceBuffer<T>,
        dx: &mut DeviceBuffer<T>,
        (rows, len): (usize, usize),
        log: bool,
    ) -> Result<()> {
        let n = product("softmax_backward", "shape", &[rows, len])?;
        need(self, "softmax_backward", "output", y, n)?;
        need(self, "softmax_backward", "gradient", g, n)?;
        need(self, "softmax_backward", "input gradient", dx, n)?;
        if n == 0 {
            return Ok(());
        }
        let args = [
            Arg::buf(y),
            Arg::buf(g),
            Arg::buf(dx),
            Arg::size(rows),
            Arg::size(len),
            Arg::flag(log),
        ];
        launch(
            self,
            &SOFTMAX,
            &entry::<T>("softmax_backward"),
            Grid::rows(rows, len),
            &args,
        )
    }

    /// Mean cross-entropy of `logits` `[rows, classes]` against u32 `targets` `[rows]`,
    /// skipping rows whose target is `ignore`: returns the loss (one element of T; 0 when no
    /// row counts) and the number of counted rows (one u32), both on the device. A target
    /// `>= classes` other than `ignore` is a [`crate::CudaError::Index`]; checking for it
    /// reads 8 bytes back, so this call waits for the device.
    pub fn cross_entropy<T: FloatElem>(
        &self,
        logits: &DeviceBuffer<T>,
        targets: &DeviceBuffer<u32>,
        (rows, classes): (usize, usize),
        ignore: u32,
    ) -> Result<(DeviceBuffer<T>, DeviceBuffer<u32>)> {
        need(
            self,
            "cross_entropy",
            "logits",
            logits,
            product("cross_entropy", "shape", &[rows, classes])?,
        )?;
        need(self, "cross_entropy", "targets", targets, rows)?;
        let loss = self.alloc::<T>(1)?;
        let count = self.alloc::<u32>(1)?;
        let row_loss = self.alloc::<f32>(rows)?;
        let bad = bad_index_word(self)?;
        if rows > 0 {
            let args = [
                Arg::buf(logits),
                Arg::buf(targets),
                Arg::buf(&row_loss),
                Arg::buf(&bad),
                Arg::size(rows),
                Arg::size(classes),
                Arg::U32(ignore),
            ];
            launch(
                self,
                &CROSS_ENTROPY,
                &entry::<T>("cross_entropy_rows"),
                Grid::rows(rows, classes),
                &args,
            )?;
        }
        let args = [
            Arg::buf(&row_loss),
            Arg::buf(targets),
            Arg::buf(&loss),
            Arg::buf(&count),
            Arg::size(rows),
            Arg::U32(ignore),
        ];
        let one_block = Grid::blocks(1, ONE_BLOCK_THREADS);
        launch(
            self,
            &CROSS_ENTROPY,
            &entry::<T>("cross_entropy_mean"),
            one_block,
            &args,
        )?;
        check_bad_index(self, &bad, "cross_entropy", "target", classes)?;
        Ok((loss, count))
    }

    /// `dx = grad · (softmax(logits) - onehot(target)) / count` on counted rows, 0 on rows whose
    /// target is `ignore`; `grad` is the upstream scalar as one f32 on the device, `count` the
    /// number of counted rows (computed here). Out-of-range targets are treated as ignored (the
    /// forward pass reports them).
    pub fn cross_entropy_backward<T: FloatElem>(
        &self,
        logits: &DeviceBuffer<T>,
        targets: &DeviceBuffer<u32>,
        grad: &DeviceBuffer<f32>,
        dx: &mut DeviceBuffer<T>,
        (rows, classes): (usize, usize),
        ignore: u32,
    ) -> Result<()> {
        let n = product("cross_entropy_backward", "shape", &[rows, classes])?;
        need(self, "cross_entropy_backward", "logits", logits, n)?;
        need(self, "cross_entropy_backward", "targets", targets, rows)?;
        need(self, "cross_entropy_backward", "upstream gradient", grad, 1)?;
        need(self, "cross_entropy_backward", "input gradient", dx, n)?;
        if n == 0 {
            return Ok(());
        }
        let count = self.alloc::<u32>(1)?;
        let args = [
            Arg::buf(targets),
            Arg::buf(&count),
            Arg::size(rows),
            Arg::U32(ignore),
        ];
        launch(
            self,
            &CROSS_ENTROPY,
            "cross_entropy_count",
            Grid::blocks(1, ONE_BLOCK_THREADS),
            &args,
        )?;
        let args = [
            Arg::buf(logits),
            Arg::buf(targets),
            Arg::buf(grad),
            Arg::buf(&count),
            Arg::buf(dx),
            Arg::size(rows),
            Arg::size(classes),
            Arg::U32(ignore),
        ];
        launch(
            self,
            &CROSS_ENTROPY,
            &entry::<T>("cross_entropy_backward"),
            Grid::rows(rows, classes),
            &args,
        )
    }
}
