use half::bf16;

use crate::{Error, Result};

/// Element type of a tensor. Activations are always `F32`; weights and the KV cache may be `BF16`.
/// FP8 checkpoints are dequantised at load (see `model::loader` for the measured choice).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F32,
    BF16,
}

impl DType {
    pub fn size_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::BF16 => 2,
        }
    }
}

/// Where a tensor lives. Only the CPU exists today; the CUDA backend adds a variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Device {
    #[default]
    Cpu,
}

#[derive(Clone)]
pub(crate) enum Storage {
    F32(Vec<f32>),
    BF16(Vec<bf16>),
}

/// A contiguous, row-major tensor on a device.
#[derive(Clone)]
pub struct Tensor {
    shape: Vec<usize>,
    pub(crate) storage: Storage,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor({:?}, {:?})", self.shape, self.dtype())
    }
}

/// Buffers at least this large ask the kernel for transparent huge pages.
const HUGE_PAGE_MIN_BYTES: usize = 4 << 20;

/// An empty vector with room for `n` elements whose memory is marked `MADV_HUGEPAGE` before any
/// page is touched. Decode streams every weight once per token: with 4 KiB pages that is a TLB
/// miss per page and hardware prefetchers stop at each page boundary; 2 MiB pages measured
/// faster in `examples/matmul_bench.rs --cold` (BENCHMARKS.md). Only a hint: where THP is off the
/// call fails harmlessly.
pub(crate) fn huge_vec<T>(n: usize) -> Vec<T> {
    let v: Vec<T> = Vec::with_capacity(n);
    let bytes = n * std::mem::size_of::<T>();
    #[cfg(target_os = "linux")]
    if bytes >= HUGE_PAGE_MIN_BYTES {
        const PAGE: usize = 2 << 20;
        let start = (v.as_ptr() as usize).next_multiple_of(PAGE);
        let end = (v.as_ptr() as usize + bytes) / PAGE * PAGE;
        if end > start {
            // SAFETY: [start, end) lies inside this vector's allocation, which we own; madvise
            // with MADV_HUGEPAGE changes no contents, only how the kernel backs the range.
            unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
            }
        }
    }
    let _ = bytes;
    v
}

fn check_count(shape: &[usize], got: usize) -> Result<()> {
    let expected: usize = shape.iter().product();
    if expected != got {
        return Err(Error::ElementCount {
            shape: shape.to_vec(),
            expected,
            got,
        });
    }
    Ok(())
}

impl Tensor {
    pub fn from_f32(shape: &[usize], data: Vec<f32>, _device: Device) -> Result<Self> {
        check_count(shape, data.len())?;
        Ok(Self {
            shape: shape.to_vec(),
            storage: Storage::F32(data),
        })
    }

    pub fn from_bf16(shape: &[usize], data: Vec<bf16>, _device: Device) -> Result<Self> {
        check_count(shape, data.len())?;
        Ok(Self {
            shape: shape.to_vec(),
            storage: Storage::BF16(data),
        })
    }

    /// Builds a tensor of `dtype` from f32 host values (rounding to nearest-even for BF16).
    pub fn from_f32_as(
        shape: &[usize],
        data: Vec<f32>,
        dtype: DType,
        device: Device,
    ) -> Result<Self> {
        match dtype {
            DType::F32 => Self::from_f32(shape, data, device),
            DType::BF16 => {
                let mut v = huge_vec(data.len());
                v.extend(data.into_iter().map(bf16::from_f32));
                Self::from_bf16(shape, v, device)
            }
        }
    }

    pub fn zeros(shape: &[usize], dtype: DType, _device: Device) -> Self {
        let n: usize = shape.iter().product();
        let storage = match dtype {
            DType::F32 => Storage::F32(vec![0.0; n]),
            DType::BF16 => Storage::BF16(vec![bf16::ZERO; n]),
        };
        Self {
            shape: shape.to_vec(),
            storage,
        }
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn device(&self) -> Device {
        Device::Cpu
    }

    pub fn dtype(&self) -> DType {
        match self.storage {
            Storage::F32(_) => DType::F32,
            Storage::BF16(_) => DType::BF16,
        }
    }

    pub fn elem_count(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn size_bytes(&self) -> usize {
        self.elem_count() * self.dtype().size_bytes()
    }

    /// `(rows, cols)` of a 2-D tensor.
    pub fn dims2(&self, op: &'static str) -> Result<(usize, usize)> {
        match self.shape[..] {
            [r, c] => Ok((r, c)),
            _ => crate::shape_err(op, format!("expected 2-D, got {:?}", self.shape)),
        }
    }

    /// Same data, new shape (the element count must match).
    pub fn reshape(mut self, shape: &[usize]) -> Result<Self> {
        check_count(shape, self.elem_count())?;
        self.shape = shape.to_vec();
        Ok(self)
    }

    /// Copies the tensor to host memory as f32.
    pub fn to_vec_f32(&self) -> Vec<f32> {
        match &self.storage {
            Storage::F32(v) => v.clone(),
            Storage::BF16(v) => v.iter().map(|x| x.to_f32()).collect(),
        }
    }

    pub fn to_dtype(&self, dtype: DType) -> Tensor {
        if dtype == self.dtype() {
            return self.clone();
        }
        let storage = match (&self.storage, dtype) {
            (Storage::F32(v), DType::BF16) => {
                Storage::BF16(v.iter().map(|&x| bf16::from_f32(x)).collect())
            }
            (Storage::BF16(v), DType::F32) => Storage::F32(v.iter().map(|x| x.to_f32()).collect()),
            _ => unreachable!("same-dtype case returned above"),
        };
        Tensor {
            shape: self.shape.clone(),
            storage,
        }
    }

    pub(crate) fn f32s(&self, op: &'static str) -> Result<&[f32]> {
        match &self.storage {
            Storage::F32(v) => Ok(v),
            _ => Err(Error::DType {
                op,
                dtype: self.dtype(),
            }),
        }
    }

    pub(crate) fn f32s_mut(&mut self, op: &'static str) -> Result<&mut [f32]> {
        let dtype = self.dtype();
        match &mut self.storage {
            Storage::F32(v) => Ok(v),
            _ => Err(Error::DType { op, dtype }),
        }
    }
}
