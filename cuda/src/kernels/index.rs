//! Gathers (embedding lookup, index-select), scatter-add and concatenation.

use super::{bad_index_word, check_bad_index, need, product, Dims3};
use crate::compile::INDEX;
use crate::device::{DeviceBuffer, DeviceElem, FloatElem, GpuDevice};
use crate::error::{CudaError, Result};
use crate::launch::{entry, launch, Arg, Grid};

/// About how many threads the scatter-add runs; each owns one column of the rows whose id falls
/// in its slot.
const INDEX_ADD_THREADS: usize = 1 << 16;

impl GpuDevice {
    /// `out[o, i, k] = x[o, ids[i], k]` with `x` viewed as `dims` (`[outer, len, inner]`) and
    /// `out` as `[outer, ids.len(), inner]`; any dtype. An id `>= len` is a
    /// [`CudaError::Index`] naming its position; checking reads 8 bytes back, so this call
    /// waits for the device.
    pub fn index_select<T: DeviceElem>(
        &self,
        x: &DeviceBuffer<T>,
        ids: &DeviceBuffer<u32>,
        dims: Dims3,
        out: &mut DeviceBuffer<T>,
    ) -> Result<()> {
        let Dims3 { outer, len, inner } = dims;
        need(
            self,
            "index_select",
            "input",
            x,
            product("index_select", "shape", &[outer, len, inner])?,
        )?;
        self.check_owner("index_select", ids)?;
        let total = product("index_select", "output shape", &[outer, ids.len(), inner])?;
        need(self, "index_select", "output", out, total)?;
        if total == 0 {
            return Ok(());
        }
        let bad = bad_index_word(self)?;
        let args = [
            Arg::buf(x),
            Arg::buf(ids),
            Arg::buf(out),
            Arg::size(outer),
            Arg::size(len),
            Arg::size(inner),
            Arg::size(ids.len()),
            Arg::buf(&bad),
        ];
        let name = format!("index_select_{}", T::DTYPE.width_suffix());
        launch(self, &INDEX, &name, Grid::elementwise(self, total), &args)?;
        check_bad_index(self, &bad, "index_select", "id", len)
    }

    /// Embedding lookup: rows `ids` of `table` (`[vocab, dim]`) into `out` (`[ids.len(), dim]`).
    pub fn embedding<T: DeviceElem>(
        &self,
        table: &DeviceBuffer<T>,
        ids: &DeviceBuffer<u32>,
        (vocab, dim): (usize, usize),
        out: &mut DeviceBuffer<T>,
    ) -> Result<()> {
        let dims = Dims3 {
            outer: 1,
            len: vocab,
            inner: dim,
        };
        self.index_select(table, ids, dims, out)
    }

    /// Scatter-add: `acc[o, ids[i], k] += src[o, i, k]` in f32, `acc` viewed as `dims` and `src`
    /// as `[outer, ids.len(), inner]`; repeated ids sum in order of i (no atomics: the threads
    /// split the rows by id modulo a slot count), so the result is bitwise reproducible. The
    /// backward of [`GpuDevice::index_select`] and of the embedding (`acc` starts as zeros, or
    /// as the tensor added to, converted to f32). Bad ids are reported as by `index_select`.
    pub fn index_add<T: FloatElem>(
        &self,
        acc: &mut DeviceBuffer<f32>,
        dims: Dims3,
        ids: &DeviceBuffer<u32>,
        src: &DeviceBuffer<T>,
    ) -> Result<()> {
        let Dims3 { outer, len, inner } = dims;
        need(
            self,
            "index_add",
            "accumulator",
            acc,
            product("index_add", "shape", &[outer, len, inner])?,
        )?;
        self.check_owner("index_add", ids)?;
        let total = product("index_add", "source shape", &[outer, ids.len(), inner])?;
        need(self, "index_add", "source", src, total)?;
        if total == 0 {
            return Ok(());
        }
        let bad = bad_index_word(self)?;
        // Enough threads to fill the device, each walking every id once.
        let columns = outer * inner;
        let slots = INDEX_ADD_THREADS.div_ceil(columns).clamp(1, len.max(1));
        let args = [
            Arg::buf(src),
            Arg::buf(ids),
            Arg::buf(acc),
            Arg::size(outer),
            Arg::size(len),
            Arg::size(inner),
            Arg::size(ids.len()),
            Arg::size(slots),
            Arg::buf(&bad),
        ];
        launch(
            self,
            &INDEX,
            &entry::<T>("index_add"),
            Grid::elementwise(self, columns * slots),
            &args,
        )?;
        check_bad_index(self, &bad, "index_add", "id", len)
    }

    /// Joins `parts` along one axis: each part is `[outer, len_p, inner]` and `out` is
    /// `[outer, Σ len_p, inner]`; `lens` gives each `len_p`. Any dtype.
    pub fn concat<T: DeviceElem>(
        &self,
        parts: &[&DeviceBuffer<T>],
        lens: &[usize],
        (outer, inner): (usize, usize),
        out: &mut DeviceBuffer<T>,
    ) -> Result<()> {
        if parts.len() != lens.len() {
            return Err(CudaError::shape(
                "concat",
                format!("{} parts but {} lengths", parts.len(), lens.len()),
            ));
        }
        let total_len: usize = lens.iter().sum();
        let run_out = product("concat", "output row", &[total_len, inner])?;
        need(
            self,
            "concat",
            "output",
            out,
            product("concat", "output shape", &[outer, run_out])?,
        )?;
        let name = format!("concat_{}", T::DTYPE.width_suffix());
        let mut offset = 0;
        for (part, &len) in parts.iter().zip(lens) {
            let run = len * inner;
            need(self, "concat", "part", part, outer * run)?;
            if outer * run > 0 {
                let args = [
                    Arg::buf(part),
                    Arg::buf(out),
                    Arg::size(outer),
                    Arg::size(run),
                    Arg::size(run_out),
                    Arg::size(offset),
                ];
                launch(self, &INDEX, &name, Grid::elementwise(self, outer * run), &args)?;
            }
            offset += run;
        }
        Ok(())
    }
}
