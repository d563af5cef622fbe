//! safetensors files: memory-mapped loading (zero-copy where alignment allows) and atomic saving.
//!
//! The format: an 8-byte little-endian header length `n`, `n` bytes of JSON mapping each tensor
//! name to `{"dtype", "shape", "data_offsets": [begin, end]}` (offsets relative to the data
//! section that follows the header) plus an optional `"__metadata__"` string map, then the data
//! section. Elements are little-endian; this module assumes a little-endian host.

use crate::dispatch::any_dispatch;
use crate::storage::{Buffer, CpuStorage, Device};
use crate::{DType, Element, Result, Tensor, TensorError};
use memmap2::Mmap;
use serde_json::{json, Value};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The header key holding the free-form string metadata.
const METADATA_KEY: &str = "__metadata__";

/// How many available names a "no such tensor" error lists.
const NAMES_SHOWN: usize = 5;

/// The dtype and shape of a tensor stored in a file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    /// The element type.
    pub dtype: DType,
    /// The shape (empty for a scalar).
    pub shape: Vec<usize>,
}

/// One tensor's header entry, with its byte range resolved against the whole file.
#[derive(Debug)]
struct Entry {
    info: TensorInfo,
    /// Offset of the first byte in the file (not the data section).
    start: usize,
    /// Number of bytes.
    len: usize,
}

/// An open, validated safetensors file; tensors read from it share its memory map.
///
/// The file must not be modified by anyone while it is open (truncating a mapped file makes
/// later reads of the lost pages fault); [`save`] replaces files atomically, so saving over a
/// file that is open here is safe.
#[derive(Debug)]
pub struct SafetensorsFile {
    path: PathBuf,
    map: Arc<Mmap>,
    tensors: BTreeMap<String, Entry>,
    metadata: BTreeMap<String, String>,
}

fn bad(path: &Path, detail: impl Into<String>) -> TensorError {
    TensorError::Safetensors {
        path: path.to_path_buf(),
        detail: detail.into(),
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> TensorError + '_ {
    move |source| TensorError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn parse_dtype(name: &str) -> Option<DType> {
    [DType::F32, DType::F64, DType::BF16, DType::F16, DType::U32]
        .into_iter()
        .find(|d| d.safetensors_name() == name)
}

fn as_usize(v: &Value) -> Option<usize> {
    v.as_u64().and_then(|x| usize::try_from(x).ok())
}

/// Validates one tensor's header entry against a data section of `data_len` bytes starting at
/// file offset `data_start`; the error is a detail without the tensor's name.
fn parse_entry(value: &Value, data_start: usize, data_len: usize) -> std::result::Result<Entry, String> {
    let obj = value.as_object().ok_or("entry is not a JSON object")?;
    let dtype_name = obj
        .get("dtype")
        .and_then(Value::as_str)
        .ok_or("missing or non-string \"dtype\"")?;
    let dtype = parse_dtype(dtype_name)
        .ok_or_else(|| format!("unsupported dtype '{dtype_name}' (supported: F32, F64, BF16, F16, U32)"))?;
    let shape = obj
        .get("shape")
        .and_then(Value::as_array)
        .and_then(|dims| dims.iter().map(as_usize).collect::<Option<Vec<_>>>())
        .ok_or("missing \"shape\" or it is not an array of non-negative integers")?;
    let offsets = obj
        .get("data_offsets")
        .and_then(Value::as_array)
        .and_then(|o| o.iter().map(as_usize).collect::<Option<Vec<_>>>())
        .ok_or("missing \"data_offsets\" or it is not an array of non-negative integers")?;
    let &[begin, end] = offsets.as_slice() else {
        return Err(format!("data_offsets {offsets:?} must hold exactly two offsets"));
    };
    if begin > end {
        return Err(format!("data_offsets [{begin}, {end}] begin after they end"));
    }
    if end > data_len {
        return Err(format!(
            "data_offsets [{begin}, {end}] reach past the {data_len}-byte data section \
             (truncated file?)"
        ));
    }
    let expected = shape
        .iter()
        .try_fold(dtype.size_in_bytes(), |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| format!("shape {shape:?} is too large"))?;
    if end - begin != expected {
        return Err(format!(
            "shape {shape:?} of {dtype_name} needs {expected} bytes but data_offsets \
             [{begin}, {end}] span {}",
            end - begin
        ));
    }
    Ok(Entry {
        info: TensorInfo { dtype, shape },
        start: data_start + begin,
        len: expected,
    })
}

/// The tensors and the metadata of a parsed header.
type Header = (BTreeMap<String, Entry>, BTreeMap<String, String>);

/// Parses and validates the JSON header: every entry, the metadata and that no tensors overlap.
fn parse_header(path: &Path, json: &[u8], data_start: usize, data_len: usize) -> Result<Header> {
    let value: Value =
        serde_json::from_slice(json).map_err(|e| bad(path, format!("header is not valid JSON: {e}")))?;
    let Value::Object(fields) = value else {
        return Err(bad(path, "header is not a JSON object"));
    };
    let mut tensors = BTreeMap::new();
    let mut metadata = BTreeMap::new();
    for (key, value) in fields {
        if key == METADATA_KEY {
            let map = value
                .as_object()
                .ok_or_else(|| bad(path, format!("{METADATA_KEY} is not a JSON object")))?;
            for (k, v) in map {
                let v = v
                    .as_str()
                    .ok_or_else(|| bad(path, format!("{METADATA_KEY} value of '{k}' is not a string")))?;
                metadata.insert(k.clone(), v.to_owned());
            }
        } else {
            let entry = parse_entry(&value, data_start, data_len)
                .map_err(|detail| bad(path, format!("tensor '{key}': {detail}")))?;
            tensors.insert(key, entry);
        }
    }
    let mut ranges: Vec<(usize, usize, &str)> = tensors
        .iter()
        .filter(|(_, e)| e.len > 0)
        .map(|(name, e)| (e.start - data_start, e.start - data_start + e.len, name.as_str()))
        .collect();
    ranges.sort_unstable();
    for pair in ranges.windows(2) {
        let ((b0, e0, a), (b1, e1, b)) = (pair[0], pair[1]);
        if b1 < e0 {
            return Err(bad(
                path,
                format!("tensors '{a}' (data bytes {b0}..{e0}) and '{b}' (data bytes {b1}..{e1}) overlap"),
            ));
        }
    }
    Ok((tensors, metadata))
}

impl SafetensorsFile {
    /// Memory-maps `path` and validates its header (offsets, dtypes, sizes, no overlaps).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = File::open(path).map_err(io_err(path))?;
        // SAFETY: the mapping is read-only; like every mmap-based loader we rely on the file not
        // being modified while mapped (documented on `SafetensorsFile`).
        let map = unsafe { Mmap::map(&file) }.map_err(io_err(path))?;
        let Some(prefix) = map.first_chunk::<8>() else {
            return Err(bad(
                path,
                format!(
                    "file is {} bytes, too short for the 8-byte header length",
                    map.len()
                ),
            ));
        };
        let header_len = u64::from_le_bytes(*prefix);
        let available = map.len() - 8;
        let header_len = usize::try_from(header_len)
            .ok()
            .filter(|&n| n <= available)
            .ok_or_else(|| {
                bad(
                    path,
                    format!(
                        "header length {header_len} exceeds the {available} bytes after the length \
                         prefix (truncated or not a safetensors file?)"
                    ),
                )
            })?;
        let data_start = 8 + header_len;
        let (tensors, metadata) =
            parse_header(path, &map[8..data_start], data_start, map.len() - data_start)?;
        Ok(SafetensorsFile {
            path: path.to_path_buf(),
            map: Arc::new(map),
            tensors,
            metadata,
        })
    }

    /// The tensor names, sorted.
    pub fn names(&self) -> Vec<&str> {
        self.tensors.keys().map(String::as_str).collect()
    }

    /// The header's `__metadata__` map (empty when absent).
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// The dtype and shape of tensor `name`.
    pub fn info(&self, name: &str) -> Result<&TensorInfo> {
        Ok(&self.entry(name)?.info)
    }

    /// Tensor `name`: shares the file's memory map when its bytes are aligned for its element
    /// type, else is copied into owned memory.
    pub fn get(&self, name: &str) -> Result<Tensor> {
        let entry = self.entry(name)?;
        Ok(any_dispatch!(entry.info.dtype, T => self.read::<T>(entry)))
    }

    /// Every tensor in the file, by name.
    pub fn load_all(&self) -> Result<BTreeMap<String, Tensor>> {
        self.tensors
            .keys()
            .map(|name| Ok((name.clone(), self.get(name)?)))
            .collect()
    }

    fn entry(&self, name: &str) -> Result<&Entry> {
        self.tensors.get(name).ok_or_else(|| self.missing(name))
    }

    /// The error for a missing tensor, listing the available names closest to `name`.
    fn missing(&self, name: &str) -> TensorError {
        if self.tensors.is_empty() {
            return bad(
                &self.path,
                format!("no tensor '{name}': the file holds no tensors"),
            );
        }
        let shared_prefix = |n: &str| n.bytes().zip(name.bytes()).take_while(|(a, b)| a == b).count();
        let mut names = self.names();
        // Stable: names sharing equally long prefixes with `name` stay in sorted order.
        names.sort_by_key(|n| Reverse(shared_prefix(n)));
        let shown: Vec<String> = names.iter().take(NAMES_SHOWN).map(|n| format!("'{n}'")).collect();
        let more = if names.len() > NAMES_SHOWN { ", ..." } else { "" };
        bad(
            &self.path,
            format!(
                "no tensor '{name}'; the file holds {} tensors, e.g. {}{more}",
                names.len(),
                shown.join(", ")
            ),
        )
    }

    fn read<T: Element>(&self, entry: &Entry) -> Tensor {
        let bytes = &self.map[entry.start..entry.start + entry.len];
        let buffer = if bytes.as_ptr().align_offset(std::mem::align_of::<T>()) == 0 {
            Buffer::Mapped {
                map: self.map.clone(),
                byte_offset: entry.start,
                len: entry.len / std::mem::size_of::<T>(),
            }
        } else {
            Buffer::Owned(bytemuck::pod_collect_to_vec::<u8, T>(bytes))
        };
        Tensor::from_cpu(CpuStorage::from_buffer(buffer), &entry.info.shape)
    }
}

/// Opens `path` and reads every tensor in it.
pub fn load(path: impl AsRef<Path>) -> Result<BTreeMap<String, Tensor>> {
    SafetensorsFile::open(path)?.load_all()
}

/// Writes `tensors` (any dtype, layout and device; views are written row-major) and optional string
/// `metadata` to `path`, atomically: the file is written and synced under a temporary name in the
/// same directory, then renamed over `path`.
///
/// Data starts 8-aligned and tensors are ordered by descending element size (then name), so every
/// tensor is aligned for a zero-copy reload. Duplicate names are an error.
pub fn save(
    path: impl AsRef<Path>,
    tensors: &[(&str, &Tensor)],
    metadata: Option<&BTreeMap<String, String>>,
) -> Result<()> {
    let path = path.as_ref();
    let mut seen = BTreeSet::new();
    for &(name, _) in tensors {
        if name == METADATA_KEY {
            return Err(bad(
                path,
                format!("'{METADATA_KEY}' is reserved and cannot name a tensor"),
            ));
        }
        if !seen.insert(name) {
            return Err(bad(path, format!("tensor '{name}' is given more than once")));
        }
    }
    let mut ordered = tensors.to_vec();
    ordered.sort_by_key(|&(name, t)| (Reverse(t.dtype().size_in_bytes()), name));

    let mut header = serde_json::Map::new();
    if let Some(metadata) = metadata {
        header.insert(METADATA_KEY.to_owned(), json!(metadata));
    }
    let mut offset = 0;
    for &(name, t) in &ordered {
        let end = offset + t.numel() * t.dtype().size_in_bytes();
        header.insert(
            name.to_owned(),
            json!({
                "dtype": t.dtype().safetensors_name(),
                "shape": t.shape(),
                "data_offsets": [offset, end],
            }),
        );
        offset = end;
    }
    let mut header = serde_json::to_vec(&Value::Object(header))
        .map_err(|e| bad(path, format!("cannot serialize the header: {e}")))?;
    // Pad with spaces (valid JSON whitespace) so the data section starts 8-aligned.
    header.resize(header.len().next_multiple_of(8), b' ');

    crate::atomic_file::write_atomic(path, |w| write_contents(w, &header, &ordered)).map_err(io_err(path))
}

/// Writes the length prefix, the header and every tensor's bytes.
fn write_contents(w: &mut BufWriter<File>, header: &[u8], ordered: &[(&str, &Tensor)]) -> io::Result<()> {
    w.write_all(&(header.len() as u64).to_le_bytes())?;
    w.write_all(header)?;
    for &(_, t) in ordered {
        // A tensor on a device is copied to the host, one at a time.
        let t = t.to_device(Device::Cpu).map_err(io::Error::other)?.contiguous();
        any_dispatch!(t.dtype(), T => w.write_all(bytemuck::cast_slice(t.contiguous_slice::<T>()))?);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::Storage;
    use crate::{bf16, f16};
    use std::fs;

    fn is_mapped(t: &Tensor) -> bool {
        let Storage::Cpu(s) = &**t.storage() else {
            return false;
        };
        matches!(
            s,
            CpuStorage::F32(Buffer::Mapped { .. })
                | CpuStorage::F64(Buffer::Mapped { .. })
                | CpuStorage::BF16(Buffer::Mapped { .. })
                | CpuStorage::F16(Buffer::Mapped { .. })
                | CpuStorage::U32(Buffer::Mapped { .. })
        )
    }

    /// A file with the given header JSON and data bytes (the header is not padded).
    fn raw_file(dir: &tempfile::TempDir, header: &str, data: &[u8]) -> PathBuf {
        let path = dir.path().join("raw.safetensors");
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(data);
        fs::write(&path, bytes).unwrap();
        path
    }

    /// The message of opening `path`, which must fail and name the file.
    fn open_err(path: &Path) -> String {
        let msg = SafetensorsFile::open(path).unwrap_err().to_string();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        msg
    }

    fn assert_same(a: &Tensor, b: &Tensor) {
        assert_eq!(a.dtype(), b.dtype());
        assert_eq!(a.shape(), b.shape());
        // Compare bit patterns so that the check is exact for every dtype.
        any_dispatch!(a.dtype(), T => {
            let (x, y) = (a.to_vec::<T>().unwrap(), b.to_vec::<T>().unwrap());
            assert_eq!(bytemuck::cast_slice::<T, u8>(&x), bytemuck::cast_slice::<T, u8>(&y));
        });
    }

    #[test]
    fn round_trip_of_every_dtype_and_layout() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("all.safetensors");
        let f32s = Tensor::from_vec((0..6).map(|i| i as f32 * 0.5 - 1.0).collect(), &[2, 3]).unwrap();
        let transposed = f32s.t().unwrap();
        let f64s = Tensor::from_vec(vec![1.0f64, -2.5, 1e300], &[3]).unwrap();
        let bf16s =
            Tensor::from_vec([0.5f32, -3.0, 7.25, 1e20].map(bf16::from_f32).to_vec(), &[2, 2]).unwrap();
        let f16s = Tensor::from_vec([1.0f32, 0.1, -65504.0].map(f16::from_f32).to_vec(), &[3, 1]).unwrap();
        let u32s = Tensor::from_vec(vec![0u32, 7, u32::MAX, 42, 1], &[5]).unwrap();
        let scalar = Tensor::scalar(3.5f64);
        let empty = Tensor::zeros(&[0, 3], DType::F16);
        let broadcast = Tensor::arange(3, DType::U32).broadcast_to(&[2, 3]).unwrap();
        let tensors = [
            ("f32", &f32s),
            ("transposed", &transposed),
            ("f64", &f64s),
            ("bf16", &bf16s),
            ("f16", &f16s),
            ("u32", &u32s),
            ("scalar", &scalar),
            ("empty", &empty),
            ("broadcast", &broadcast),
        ];
        save(&path, &tensors, None).unwrap();

        let file = SafetensorsFile::open(&path).unwrap();
        let mut names: Vec<&str> = tensors.iter().map(|(n, _)| *n).collect();
        names.sort_unstable();
        assert_eq!(file.names(), names);
        assert!(file.metadata().is_empty());
        assert_eq!(
            file.info("transposed").unwrap(),
            &TensorInfo {
                dtype: DType::F32,
                shape: vec![3, 2]
            }
        );
        for (name, original) in tensors {
            let loaded = file.get(name).unwrap();
            assert_same(&loaded, original);
            assert!(is_mapped(&loaded), "{name} was copied");
        }
        let all = load(&path).unwrap();
        assert_eq!(all.len(), tensors.len());
        assert_same(&all["transposed"], &transposed);
    }

    #[test]
    fn header_is_padded_so_data_starts_aligned() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pad.safetensors");
        let t = Tensor::ones(&[3], DType::F16);
        save(&path, &[("a", &t)], None).unwrap();
        let bytes = fs::read(&path).unwrap();
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        assert_eq!(n % 8, 0);
        assert_eq!(bytes.len(), 8 + n + 6);
        let header = std::str::from_utf8(&bytes[8..8 + n]).unwrap();
        assert!(
            header.trim_end().ends_with('}') && header.starts_with('{'),
            "{header}"
        );
    }

    #[test]
    fn unaligned_tensors_are_copied() {
        let dir = tempfile::tempdir().unwrap();
        // An f32 tensor at data offset 2, after a one-element f16 tensor; 16-byte header.
        let header = r#"{"h":{"dtype":"F16","shape":[1],"data_offsets":[0,2]},"w":{"dtype":"F32","shape":[2],"data_offsets":[2,10]}}"#;
        let header = format!("{header:<width$}", width = header.len().next_multiple_of(8));
        let mut data = f16::from_f32(1.5).to_le_bytes().to_vec();
        data.extend(1.25f32.to_le_bytes());
        data.extend((-4.0f32).to_le_bytes());
        let path = raw_file(&dir, &header, &data);
        let file = SafetensorsFile::open(&path).unwrap();
        let w = file.get("w").unwrap();
        assert!(!is_mapped(&w));
        assert_eq!(w.to_vec::<f32>().unwrap(), vec![1.25, -4.0]);
        let h = file.get("h").unwrap();
        assert!(is_mapped(&h));
        assert_eq!(h.to_vec::<f16>().unwrap(), vec![f16::from_f32(1.5)]);
    }

    #[test]
    fn metadata_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.safetensors");
        let metadata: BTreeMap<String, String> = [("format", "pt"), ("note", "quote \" and é")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        save(&path, &[("x", &Tensor::scalar(1u32))], Some(&metadata)).unwrap();
        let file = SafetensorsFile::open(&path).unwrap();
        assert_eq!(file.metadata(), &metadata);
        assert_eq!(file.names(), vec!["x"]);
    }

    #[test]
    fn saving_replaces_an_existing_file_that_is_still_mapped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        let old = Tensor::arange(4, DType::F32);
        save(&path, &[("old", &old)], None).unwrap();
        let mapped = SafetensorsFile::open(&path).unwrap().get("old").unwrap();
        assert!(is_mapped(&mapped));

        let new = Tensor::ones(&[2, 2], DType::BF16);
        save(&path, &[("new", &new), ("old_again", &mapped)], None).unwrap();
        assert_same(&mapped, &old);
        let file = SafetensorsFile::open(&path).unwrap();
        assert_eq!(file.names(), vec!["new", "old_again"]);
        assert_same(&file.get("new").unwrap(), &new);
        assert_same(&file.get("old_again").unwrap(), &old);
        let leftovers: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "temporary files left behind: {leftovers:?}");
    }

    #[test]
    fn save_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dup.safetensors");
        let t = Tensor::scalar(1.0f32);
        let msg = save(&path, &[("w", &t), ("w", &t)], None)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("dup.safetensors") && msg.contains("'w'"), "{msg}");
        let msg = save(&path, &[(METADATA_KEY, &t)], None).unwrap_err().to_string();
        assert!(msg.contains(METADATA_KEY), "{msg}");
        assert!(!path.exists());

        let missing_dir = dir.path().join("no/such/dir/x.safetensors");
        let err = save(&missing_dir, &[("w", &t)], None).unwrap_err();
        assert!(
            matches!(err, TensorError::Io { ref path, .. } if *path == missing_dir),
            "{err}"
        );
    }

    #[test]
    fn truncated_file_names_the_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trunc.safetensors");
        let (a, b) = (Tensor::zeros(&[4], DType::F64), Tensor::zeros(&[8], DType::F32));
        save(&path, &[("a", &a), ("b", &b)], None).unwrap();
        let truncate = |len| {
            File::options()
                .write(true)
                .open(&path)
                .unwrap()
                .set_len(len)
                .unwrap()
        };
        truncate(fs::metadata(&path).unwrap().len() - 4);
        let msg = open_err(&path);
        assert!(msg.contains("tensor 'b'") && msg.contains("truncated"), "{msg}");
        for short in [5, 0] {
            truncate(short);
            assert!(open_err(&path).contains("too short"));
        }
    }

    #[test]
    fn header_length_larger_than_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("long.safetensors");
        let mut bytes = 1000u64.to_le_bytes().to_vec();
        bytes.extend_from_slice(b"{}");
        fs::write(&path, bytes).unwrap();
        assert!(open_err(&path).contains("header length 1000"));
        fs::write(&path, u64::MAX.to_le_bytes()).unwrap();
        assert!(open_err(&path).contains("header length"));
    }

    #[test]
    fn malformed_headers() {
        let dir = tempfile::tempdir().unwrap();
        let cases: [(&str, &[u8], &[&str]); 9] = [
            (r#"{"w": {"dtype": "F32""#, &[], &["not valid JSON"]),
            ("[1, 2]", &[], &["not a JSON object"]),
            (
                r#"{"w":{"dtype":"I64","shape":[1],"data_offsets":[0,8]}}"#,
                &[0; 8],
                &["tensor 'w'", "I64"],
            ),
            (
                r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#,
                &[0; 4],
                &["tensor 'w'", "data_offsets [0, 8]"],
            ),
            (
                r#"{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
                &[0; 8],
                &["tensor 'w'", "shape [3]", "12 bytes"],
            ),
            (
                r#"{"w":{"dtype":"F32","shape":[0],"data_offsets":[8,4]}}"#,
                &[0; 8],
                &["tensor 'w'", "begin after"],
            ),
            (
                r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"v":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
                &[0; 8],
                &["'w'", "'v'", "overlap"],
            ),
            (
                r#"{"w":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}"#,
                &[0; 4],
                &["tensor 'w'", "shape"],
            ),
            (r#"{"__metadata__":{"k":1}}"#, &[], &["__metadata__", "'k'"]),
        ];
        for (header, data, needles) in cases {
            let msg = open_err(&raw_file(&dir, header, data));
            for needle in needles {
                assert!(msg.contains(needle), "{header}: {msg} lacks {needle}");
            }
        }
    }

    #[test]
    fn missing_tensor_lists_available_names() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("names.safetensors");
        let t = Tensor::scalar(0.0f32);
        let names: Vec<String> = (0..8).map(|i| format!("layer{i}.weight")).collect();
        let tensors: Vec<(&str, &Tensor)> = names.iter().map(|n| (n.as_str(), &t)).collect();
        save(&path, &tensors, None).unwrap();
        let file = SafetensorsFile::open(&path).unwrap();
        for msg in [
            file.get("layer9.bias").unwrap_err().to_string(),
            file.info("layer9.bias").unwrap_err().to_string(),
        ] {
            assert!(msg.contains(&path.display().to_string()), "{msg}");
            assert!(
                msg.contains("'layer9.bias'") && msg.contains("'layer0.weight'"),
                "{msg}"
            );
            assert!(msg.contains("8 tensors"), "{msg}");
        }
    }
}
