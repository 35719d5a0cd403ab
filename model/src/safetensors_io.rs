//! Writing safetensors files (reading goes through the `safetensors` crate over an mmap).
//!
//! Format: 8-byte little-endian header length, a JSON header
//! `{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}` padded with
//! spaces to a multiple of 8, then the raw little-endian data.

use std::io::Write;
use std::path::Path;

use half::bf16;
use serde_json::{Map, Value, json};

use crate::Error;

/// One tensor to write: its name, safetensors dtype tag (`"F32"`, `"BF16"`, `"F8_E4M3"`, …),
/// shape and little-endian bytes.
#[derive(Debug, Clone)]
pub struct TensorBytes {
    pub name: String,
    pub dtype: &'static str,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl TensorBytes {
    pub fn f32(name: impl Into<String>, shape: &[usize], values: &[f32]) -> Self {
        Self {
            name: name.into(),
            dtype: "F32",
            shape: shape.to_vec(),
            data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }

    pub fn bf16(name: impl Into<String>, shape: &[usize], values: &[f32]) -> Self {
        Self {
            name: name.into(),
            dtype: "BF16",
            shape: shape.to_vec(),
            data: values
                .iter()
                .flat_map(|&v| bf16::from_f32(v).to_bits().to_le_bytes())
                .collect(),
        }
    }
}

/// Writes `tensors` to `path` in safetensors format.
pub fn write(path: &Path, tensors: &[TensorBytes], metadata: &[(&str, &str)]) -> Result<(), Error> {
    let heads: Vec<TensorHead> = tensors
        .iter()
        .map(|t| TensorHead {
            name: t.name.clone(),
            dtype: t.dtype,
            shape: t.shape.clone(),
            bytes: t.data.len(),
        })
        .collect();
    let mut next = tensors.iter();
    write_streamed(path, &heads, metadata, |_| {
        Ok(next
            .next()
            .map(|t| vec![t.data.clone()])
            .unwrap_or_default())
    })
}

/// A tensor's header entry, written before its data exists.
#[derive(Debug, Clone)]
pub struct TensorHead {
    pub name: String,
    pub dtype: &'static str,
    pub shape: Vec<usize>,
    pub bytes: usize,
}

/// Writes a safetensors file whose data `produce` makes a few tensors at a time, so that a file
/// larger than memory (a 7B model's random weights) can be written. `produce(n)` returns the data of
/// the next `n` or fewer tensors, in `heads` order; each must have its head's byte length.
pub fn write_streamed(
    path: &Path,
    heads: &[TensorHead],
    metadata: &[(&str, &str)],
    mut produce: impl FnMut(usize) -> Result<Vec<Vec<u8>>, Error>,
) -> Result<(), Error> {
    let mut header = Map::new();
    if !metadata.is_empty() {
        let m: Map<String, Value> = metadata
            .iter()
            .map(|(k, v)| (k.to_string(), Value::String(v.to_string())))
            .collect();
        header.insert("__metadata__".into(), Value::Object(m));
    }
    let mut offset = 0usize;
    for t in heads {
        header.insert(
            t.name.clone(),
            json!({"dtype": t.dtype, "shape": t.shape, "data_offsets": [offset, offset + t.bytes]}),
        );
        offset += t.bytes;
    }
    let mut h = serde_json::to_vec(&Value::Object(header)).expect("a JSON map always serialises");
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let io = |e| Error::Io {
        path: path.to_path_buf(),
        source: e,
    };
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).map_err(io)?);
    f.write_all(&(h.len() as u64).to_le_bytes()).map_err(io)?;
    f.write_all(&h).map_err(io)?;
    let mut done = 0;
    while done < heads.len() {
        let batch = produce(heads.len() - done)?;
        if batch.is_empty() {
            return Err(io(std::io::Error::other("tensor data ended early")));
        }
        for data in batch {
            let head = heads
                .get(done)
                .ok_or_else(|| io(std::io::Error::other("more tensor data than heads")))?;
            if data.len() != head.bytes {
                return Err(io(std::io::Error::other(format!(
                    "{}: {} bytes of data for a {}-byte tensor",
                    head.name,
                    data.len(),
                    head.bytes
                ))));
            }
            f.write_all(&data).map_err(io)?;
            done += 1;
        }
    }
    f.flush().map_err(io)?;
    Ok(())
}
