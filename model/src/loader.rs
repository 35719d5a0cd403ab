//! Reading tensors out of a checkpoint directory: one `model.safetensors`, or shards listed in
//! `model.safetensors.index.json`, each memory-mapped.
//!
//! Weights are converted once at load to the compute dtype (f32 or BF16). FP8 E4M3 block-quantised
//! weights (`weight` + `weight_scale_inv`, one f32 scale per `weight_block_size` block) are
//! dequantised here too: on this CPU backend the kernels stream BF16 (a 16-bit shift to f32) and
//! an on-the-fly FP8 path would need a table lookup per element; keeping FP8 resident is a win
//! for memory on a GPU backend, not for speed on this one.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use duet_kernels::{DType, Device, Tensor};
use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::{Dtype as StDtype, SafeTensors};

use crate::{Error, Result};

/// The memory maps of a checkpoint's files. Kept apart from [`TensorSource`], which borrows them.
pub(crate) struct Mapped {
    pub files: Vec<(PathBuf, Mmap)>,
}

impl Mapped {
    pub fn open(dir: &Path) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        let mut paths: Vec<PathBuf> = Vec::new();
        if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|e| Error::Io {
                path: index.clone(),
                source: e,
            })?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| Error::Safetensors {
                    path: index.clone(),
                    detail: e.to_string(),
                })?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::Safetensors {
                    path: index.clone(),
                    detail: "no weight_map object".into(),
                })?;
            let mut names: Vec<&str> = map.values().filter_map(|f| f.as_str()).collect();
            names.sort_unstable();
            names.dedup();
            for n in names {
                if n.contains('/') || n.contains("..") {
                    return Err(Error::Safetensors {
                        path: index.clone(),
                        detail: format!("shard name {n:?} leaves the model directory"),
                    });
                }
                paths.push(dir.join(n));
            }
        } else {
            let single = dir.join("model.safetensors");
            if single.exists() {
                paths.push(single);
            } else {
                let rd = std::fs::read_dir(dir).map_err(|e| Error::Io {
                    path: dir.to_path_buf(),
                    source: e,
                })?;
                for entry in rd.flatten() {
                    let p = entry.path();
                    if p.extension().is_some_and(|e| e == "safetensors") {
                        paths.push(p);
                    }
                }
                paths.sort();
            }
        }
        if paths.is_empty() {
            return Err(Error::NoWeights {
                dir: dir.to_path_buf(),
            });
        }
        let mut files = Vec::new();
        for p in paths {
            let f = std::fs::File::open(&p).map_err(|e| Error::Io {
                path: p.clone(),
                source: e,
            })?;
            // SAFETY: the map is read-only; a checkpoint being rewritten while we load it is
            // outside what we can defend against (as for every mmap-based loader), and every read
            // is bounds-checked by safetensors' header validation.
            let m = unsafe { Mmap::map(&f) }.map_err(|e| Error::Io {
                path: p.clone(),
                source: e,
            })?;
            files.push((p, m));
        }
        Ok(Self { files })
    }

    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|(_, m)| m.len() as u64).sum()
    }
}

/// Progress of a load, for a progress bar: bytes of tensor data read so far and in all.
#[derive(Debug, Clone, Copy)]
pub struct LoadProgress {
    pub bytes_done: u64,
    pub bytes_total: u64,
}

pub(crate) struct TensorSource<'a> {
    dir: PathBuf,
    files: Vec<(&'a Path, SafeTensors<'a>, &'a Mmap)>,
    index: HashMap<String, usize>,
    fp8_block: Option<(usize, usize)>,
    pub dtype: DType,
    pub device: Device,
    bytes_done: std::cell::Cell<u64>,
    bytes_total: u64,
    progress: &'a dyn Fn(LoadProgress),
}

impl<'a> TensorSource<'a> {
    pub fn new(
        dir: &Path,
        mapped: &'a Mapped,
        fp8_block: Option<(usize, usize)>,
        dtype: DType,
        device: Device,
        progress: &'a dyn Fn(LoadProgress),
    ) -> Result<Self> {
        let mut files = Vec::new();
        let mut index = HashMap::new();
        for (i, (p, m)) in mapped.files.iter().enumerate() {
            let st = SafeTensors::deserialize(m).map_err(|e| Error::Safetensors {
                path: p.clone(),
                detail: e.to_string(),
            })?;
            for name in st.names() {
                index.insert(name.to_string(), i);
            }
            files.push((p.as_path(), st, m));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            files,
            index,
            fp8_block,
            dtype,
            device,
            bytes_done: std::cell::Cell::new(0),
            bytes_total: mapped.total_bytes(),
            progress,
        })
    }

    /// The checkpoint directory (for error messages).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// Host f32 values of `name`, checked against `shape`.
    pub fn f32_values(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        self.read(name, shape, None)
    }

    /// Host f32 values of `name[index]`, one entry along the leading dimension of a tensor of
    /// `shape` (a fused expert tensor `[experts, rows, cols]`). Only that entry's bytes are read,
    /// so a worker holding a subset of the experts never touches the others.
    pub fn f32_values_at(&self, name: &str, shape: &[usize], index: usize) -> Result<Vec<f32>> {
        self.read(name, shape, Some(index))
    }

    fn read(&self, name: &str, shape: &[usize], index: Option<usize>) -> Result<Vec<f32>> {
        let Some(&fi) = self.index.get(name) else {
            return Err(Error::MissingTensor {
                file: self.dir.clone(),
                name: name.into(),
            });
        };
        let (path, st, map) = &self.files[fi];
        let view = st.tensor(name).map_err(|e| Error::Safetensors {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
        if view.shape() != shape {
            return Err(Error::TensorShape {
                file: path.to_path_buf(),
                name: name.into(),
                expected: shape.to_vec(),
                got: view.shape().to_vec(),
            });
        }
        let (data, shape, entry) = match index {
            None => (view.data(), shape, None),
            Some(i) => {
                let Some((&n, inner)) = shape.split_first().filter(|(n, _)| i < **n) else {
                    return Err(Error::TensorShape {
                        file: path.to_path_buf(),
                        name: format!("{name}[{i}]"),
                        expected: shape.to_vec(),
                        got: view.shape().to_vec(),
                    });
                };
                // safetensors checked that the data holds exactly `shape`'s elements.
                let per = view.data().len() / n;
                (&view.data()[i * per..(i + 1) * per], inner, Some((i, n)))
            }
        };
        self.bytes_done
            .set(self.bytes_done.get() + data.len() as u64);
        (self.progress)(LoadProgress {
            bytes_done: self.bytes_done.get(),
            bytes_total: self.bytes_total,
        });
        let values: Vec<f32> = match view.dtype() {
            StDtype::F32 => data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            StDtype::BF16 => data
                .chunks_exact(2)
                .map(|b| bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32())
                .collect(),
            StDtype::F16 => data
                .chunks_exact(2)
                .map(|b| f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32())
                .collect(),
            StDtype::F64 => data
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes(b.try_into().expect("chunks_exact(8)")) as f32)
                .collect(),
            StDtype::F8_E4M3 => {
                let v = self.dequantise_fp8(name, shape, data, path, entry)?;
                release_pages(map, data);
                return Ok(v);
            }
            other => {
                return Err(Error::TensorDType {
                    file: path.to_path_buf(),
                    name: name.into(),
                    dtype: format!("{other:?}"),
                });
            }
        };
        release_pages(map, data);
        Ok(values)
    }

    /// Block dequantisation `w = fp8 · scale_inv` of a 2-D weight (or entry `index` of a fused
    /// `[experts, rows, cols]` one, `entry = (index, experts)`). The scales are `<name>_scale_inv`: `weight_scale_inv` beside a
    /// released `weight`, `gate_up_proj_scale_inv` beside transformers 5's fused `gate_up_proj`
    /// (its `FP8Experts`), with blocks over the fused rows.
    fn dequantise_fp8(
        &self,
        name: &str,
        shape: &[usize],
        data: &[u8],
        path: &Path,
        entry: Option<(usize, usize)>,
    ) -> Result<Vec<f32>> {
        let ([rows, cols], Some((br, bc))) = (shape, self.fp8_block) else {
            return Err(Error::TensorDType {
                file: path.to_path_buf(),
                name: name.into(),
                dtype: "F8_E4M3 without an fp8 quantization_config.weight_block_size (or not 2-D)"
                    .into(),
            });
        };
        let (rows, cols) = (*rows, *cols);
        let scale_name = format!("{name}_scale_inv");
        let sc = cols.div_ceil(bc);
        let scales = match entry {
            None => self.f32_values(&scale_name, &[rows.div_ceil(br), sc])?,
            Some((i, n)) => {
                // transformers allocates at least two scale rows for a fused gate_up (room for
                // both halves' scales, `min_sf_out=2`) and reads only the first when 2I fits one
                // block.
                let stored_rows = if name.ends_with("gate_up_proj") {
                    rows.div_ceil(br).max(2)
                } else {
                    rows.div_ceil(br)
                };
                self.f32_values_at(&scale_name, &[n, stored_rows, sc], i)?
            }
        };
        let lut = e4m3_table();
        let mut out = Vec::with_capacity(rows * cols);
        for r in 0..rows {
            let srow = &scales[(r / br) * sc..(r / br + 1) * sc];
            for c in 0..cols {
                out.push(lut[data[r * cols + c] as usize] * srow[c / bc]);
            }
        }
        Ok(out)
    }

    /// A weight tensor in the compute dtype.
    pub fn weight(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let v = self.f32_values(name, shape)?;
        Ok(Tensor::from_f32_as(shape, v, self.dtype, self.device)?)
    }

    /// A tensor kept in f32 whatever the compute dtype (norm weights, router, bias).
    pub fn f32(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let v = self.f32_values(name, shape)?;
        Ok(Tensor::from_f32(shape, v, self.device)?)
    }
}

/// Drops the mapped file pages behind a tensor that has been converted. Mapped pages count as
/// resident while the map lives, so without this a load would peak at the checkpoint's size on
/// top of the converted weights.
fn release_pages(map: &Mmap, data: &[u8]) {
    const PAGE: usize = 4096;
    let start = data.as_ptr() as usize - map.as_ptr() as usize;
    let begin = start / PAGE * PAGE;
    let end = (start + data.len()).min(map.len());
    // SAFETY: the map is a read-only private file mapping; MADV_DONTNEED only discards clean
    // pages, which the kernel re-reads from the file if anything touches them again, so no
    // live reference can observe a change.
    let _ = unsafe {
        map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, begin, end - begin)
    };
}

/// Decodes one FP8 E4M3 (the "fn" variant: no infinities, S.1111.111 is NaN) byte.
pub fn e4m3_to_f32(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
    let exp = ((b >> 3) & 0x0f) as i32;
    let man = (b & 0x07) as f32;
    if exp == 0x0f && b & 0x07 == 0x07 {
        return f32::NAN;
    }
    if exp == 0 {
        sign * man / 8.0 * 2f32.powi(-6)
    } else {
        sign * (1.0 + man / 8.0) * 2f32.powi(exp - 7)
    }
}

fn e4m3_table() -> [f32; 256] {
    let mut t = [0.0; 256];
    for (i, v) in t.iter_mut().enumerate() {
        *v = e4m3_to_f32(i as u8);
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e4m3_known_values() {
        assert_eq!(e4m3_to_f32(0x00), 0.0);
        assert_eq!(e4m3_to_f32(0x38), 1.0); // exponent 7 = bias
        assert_eq!(e4m3_to_f32(0x7e), 448.0); // largest finite
        assert_eq!(e4m3_to_f32(0xfe), -448.0);
        assert_eq!(e4m3_to_f32(0x01), 2f32.powi(-9)); // smallest subnormal
        assert!(e4m3_to_f32(0x7f).is_nan());
    }
}
