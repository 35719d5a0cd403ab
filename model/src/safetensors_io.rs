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
    let mut header = Map::new();
    if !metadata.is_empty() {
        let m: Map<String, Value> = metadata
            .iter()
            .map(|(k, v)| (k.to_string(), Value::String(v.to_string())))
            .collect();
        header.insert("__metadata__".into(), Value::Object(m));
    }
    let mut offset = 0usize;
    for t in tensors {
        header.insert(
            t.name.clone(),
            json!({"dtype": t.dtype, "shape": t.shape, "data_offsets": [offset, offset + t.data.len()]}),
        );
        offset += t.data.len();
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
    for t in tensors {
        f.write_all(&t.data).map_err(io)?;
    }
    f.flush().map_err(io)?;
    Ok(())
}
