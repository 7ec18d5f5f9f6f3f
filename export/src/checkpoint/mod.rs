//! Reading weights from checkpoint files.
//!
//! Everything downstream reads weights through [`TensorSource`], so exporters and tests do not
//! care whether the weights come from a safetensors file, a `torch.save` archive or memory. The
//! file readers memory-map the file and validate all tensor metadata when opening, so a truncated
//! or corrupt file fails early with a message naming it; tensor data is converted on demand. The
//! exception is a deflated storage (an archive repacked by another tool): its data is checked
//! only when the tensor is read.

mod pickle;
mod pytorch;
mod safetensors;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;

pub use pytorch::PytorchFile;
pub use safetensors::SafetensorsFile;

/// Read access to a set of named tensors.
pub trait TensorSource {
    /// Names of all tensors, sorted.
    fn names(&self) -> Vec<String>;
    /// Shape of a tensor, None if absent.
    fn shape(&self, name: &str) -> Option<Vec<usize>>;
    /// The tensor converted to float32 in row-major (C) order (from f32, f16, bf16, f64; error
    /// for integer/bool dtypes naming the dtype).
    fn read_f32(&self, name: &str) -> Result<Vec<f32>, CheckpointError>;
    /// Where the tensors come from, for messages (a file path, "memory").
    fn origin(&self) -> String;
}

/// Why a checkpoint could not be opened or a tensor not read.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The file could not be opened, read or memory-mapped.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The content matches none of the accepted formats.
    #[error(
        "{}: not a recognised checkpoint ({detail}); accepted formats are safetensors and \
         PyTorch zip archives written by torch.save (torch >= 1.6)",
        path.display()
    )]
    UnknownFormat { path: PathBuf, detail: String },
    /// A pickle without the zip container, as torch < 1.6 wrote.
    #[error(
        "{}: legacy (non-zip) torch.save pickle, which narx does not read; re-save it with \
         torch >= 1.6 default settings (`torch.save(obj, path)`) or convert it to safetensors",
        path.display()
    )]
    LegacyPickle { path: PathBuf },
    /// A safetensors header that is truncated or not valid.
    #[error("{}: invalid safetensors file: {detail}", path.display())]
    Safetensors { path: PathBuf, detail: String },
    /// A zip archive that is unreadable or not laid out as `torch.save` writes it.
    #[error("{}: invalid PyTorch checkpoint: {detail}", path.display())]
    Archive { path: PathBuf, detail: String },
    /// A `data.pkl` that is truncated, inconsistent or uses unsupported opcodes.
    #[error("{}: malformed pickle `{entry}` at byte {offset}: {detail}", path.display())]
    Pickle {
        path: PathBuf,
        entry: String,
        offset: usize,
        detail: String,
    },
    /// A `data.pkl` naming a global outside the allow-list (e.g. `os.system`).
    #[error(
        "{}: pickle `{entry}` references the global `{global}` (byte {offset}), which is not \
         on the allow-list of state-dict types; loading a checkpoint never runs code, so save \
         a plain state dict or convert the weights to safetensors",
        path.display()
    )]
    ForbiddenGlobal {
        path: PathBuf,
        entry: String,
        offset: usize,
        global: String,
    },
    /// The unpickled object holds no recognisable state dict.
    #[error("{}: no state dict found: {detail}", path.display())]
    NoStateDict { path: PathBuf, detail: String },
    /// A tensor whose metadata is inconsistent or whose data is missing.
    #[error("{origin}: tensor `{name}`: {detail}")]
    Tensor {
        origin: String,
        name: String,
        detail: String,
    },
    /// A tensor name that is not in the source.
    #[error("{origin}: no tensor named `{name}`")]
    MissingTensor { origin: String, name: String },
    /// A tensor that cannot be converted to float32.
    #[error(
        "{origin}: tensor `{name}` has dtype {dtype}; expected a floating-point dtype \
         (float32, float16, bfloat16 or float64)"
    )]
    UnsupportedDtype {
        origin: String,
        name: String,
        dtype: String,
    },
}

impl CheckpointError {
    /// Whether the user's input is at fault (exit code 2): a file that is not there or not
    /// a valid checkpoint. A file that exists but cannot be read is the machine's (1).
    pub fn is_bad_input(&self) -> bool {
        match self {
            CheckpointError::Io { source, .. } => source.kind() == std::io::ErrorKind::NotFound,
            _ => true,
        }
    }
}

/// Element type of a stored tensor: the float types narx converts, and the others by name and
/// size, which are needed to validate byte lengths and to say what was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Dtype {
    Float(Float),
    Other { name: &'static str, size: usize },
}

/// The floating-point element types that convert to f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Float {
    F32,
    F16,
    BF16,
    F64,
}

impl Dtype {
    pub(crate) fn size(self) -> usize {
        match self {
            Dtype::Float(Float::F64) => 8,
            Dtype::Float(Float::F32) => 4,
            Dtype::Float(Float::F16 | Float::BF16) => 2,
            Dtype::Other { size, .. } => size,
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Dtype::Float(Float::F32) => "float32",
            Dtype::Float(Float::F16) => "float16",
            Dtype::Float(Float::BF16) => "bfloat16",
            Dtype::Float(Float::F64) => "float64",
            Dtype::Other { name, .. } => name,
        }
    }

    /// The float type, or the error a reader reports for a tensor of any other dtype.
    pub(crate) fn float(self, origin: &str, name: &str) -> Result<Float, CheckpointError> {
        match self {
            Dtype::Float(float) => Ok(float),
            Dtype::Other { name: dtype, .. } => Err(CheckpointError::UnsupportedDtype {
                origin: origin.to_owned(),
                name: name.to_owned(),
                dtype: dtype.to_owned(),
            }),
        }
    }
}

impl Float {
    /// Converts little-endian elements to f32 (f64 rounds to nearest).
    pub(crate) fn decode(self, bytes: &[u8]) -> Vec<f32> {
        match self {
            Float::F32 => bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Float::F16 => bytes
                .chunks_exact(2)
                .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Float::BF16 => bytes
                .chunks_exact(2)
                .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Float::F64 => bytes
                .chunks_exact(8)
                .map(|b| {
                    f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f32
                })
                .collect(),
        }
    }
}

/// Number of elements of a shape, None on overflow.
pub(crate) fn numel(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d))
}

/// Memory-maps a whole file read-only (weights are read in place, not copied into memory).
pub fn map_file(path: &Path) -> Result<Mmap, CheckpointError> {
    let io_error = |source| CheckpointError::Io {
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(io_error)?;
    // SAFETY: the mapping is read-only; like every memory-mapped weight loader, this relies on
    // the checkpoint not being truncated or rewritten by another process while it is open.
    unsafe { Mmap::map(&file) }.map_err(io_error)
}

/// Opens a checkpoint, choosing the reader by the file's content rather than its extension.
pub fn open_checkpoint(path: &Path) -> Result<Box<dyn TensorSource>, CheckpointError> {
    let mut head = Vec::with_capacity(16);
    File::open(path)
        .and_then(|file| file.take(16).read_to_end(&mut head))
        .map_err(|source| CheckpointError::Io {
            path: path.to_owned(),
            source,
        })?;
    if head.starts_with(b"PK\x03\x04") {
        Ok(Box::new(PytorchFile::open(path)?))
    } else if safetensors::looks_like_safetensors(&head) {
        Ok(Box::new(SafetensorsFile::open(path)?))
    } else if head.starts_with(&[0x80, 0x02]) {
        Err(CheckpointError::LegacyPickle {
            path: path.to_owned(),
        })
    } else {
        let detail = if head.is_empty() {
            "the file is empty".to_owned()
        } else {
            let bytes: Vec<String> = head.iter().map(|b| format!("{b:02x}")).collect();
            format!("it starts with bytes {}", bytes.join(" "))
        };
        Err(CheckpointError::UnknownFormat {
            path: path.to_owned(),
            detail,
        })
    }
}

/// Tensors held in memory, for tests and for weights computed rather than loaded.
#[derive(Clone, Debug, Default)]
pub struct InMemory {
    tensors: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
}

impl InMemory {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces a tensor.
    ///
    /// # Panics
    /// If `data` does not hold exactly the number of elements `shape` describes.
    pub fn insert(&mut self, name: impl Into<String>, shape: Vec<usize>, data: Vec<f32>) {
        let name = name.into();
        assert_eq!(
            numel(&shape),
            Some(data.len()),
            "tensor `{name}`: shape {shape:?} does not match {} elements",
            data.len()
        );
        self.tensors.insert(name, (shape, data));
    }
}

impl TensorSource for InMemory {
    fn names(&self) -> Vec<String> {
        self.tensors.keys().cloned().collect()
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.tensors.get(name).map(|(shape, _)| shape.clone())
    }

    fn read_f32(&self, name: &str) -> Result<Vec<f32>, CheckpointError> {
        self.tensors
            .get(name)
            .map(|(_, data)| data.clone())
            .ok_or_else(|| CheckpointError::MissingTensor {
                origin: self.origin(),
                name: name.to_owned(),
            })
    }

    fn origin(&self) -> String {
        "memory".to_owned()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn a_missing_file_is_the_users_fault_an_unreadable_one_is_not() {
        let io = |kind| CheckpointError::Io {
            path: "model.pt".into(),
            source: io::Error::from(kind),
        };
        assert!(io(io::ErrorKind::NotFound).is_bad_input());
        assert!(!io(io::ErrorKind::PermissionDenied).is_bad_input());
        assert!(open_checkpoint(Path::new("no-such-file.pt"))
            .err()
            .is_some_and(|e| e.is_bad_input()));
    }

    pub(crate) fn fixture(relative: &str) -> PathBuf {
        Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../shared/fixtures"
        ))
        .join(relative)
    }

    /// Opens both files of a fixture and checks they hold exactly the reference parameters
    /// with bitwise-identical data.
    fn check_formats_agree(model: &str) {
        let reference: serde_json::Value = serde_json::from_slice(
            &std::fs::read(fixture(&format!("{model}/reference.json"))).unwrap(),
        )
        .unwrap();
        let parameters: BTreeMap<String, Vec<usize>> =
            serde_json::from_value(reference["parameters"].clone()).unwrap();
        let pt = open_checkpoint(&fixture(&format!("{model}/model.pt"))).unwrap();
        let st = open_checkpoint(&fixture(&format!("{model}/model.safetensors"))).unwrap();
        let expected: Vec<String> = parameters.keys().cloned().collect();
        assert_eq!(pt.names(), expected);
        assert_eq!(st.names(), expected);
        for (name, shape) in &parameters {
            assert_eq!(pt.shape(name).as_ref(), Some(shape), "{name}");
            assert_eq!(st.shape(name).as_ref(), Some(shape), "{name}");
            let a = pt.read_f32(name).unwrap();
            let b = st.read_f32(name).unwrap();
            assert_eq!(Some(a.len()), numel(shape), "{name}");
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&a), bits(&b), "{name}");
        }
    }

    #[test]
    fn c2i_formats_agree() {
        check_formats_agree("nar-c2i-tiny");
    }

    #[test]
    fn t2i_formats_agree_including_buffer() {
        check_formats_agree("nar-t2i-tiny");
        let pt = open_checkpoint(&fixture("nar-t2i-tiny/model.pt")).unwrap();
        assert_eq!(
            pt.shape("cls_embedding.uncond_embedding"),
            Some(vec![120, 32])
        );
    }

    #[test]
    fn video_formats_agree() {
        check_formats_agree("nar-video-tiny");
    }

    #[test]
    fn origin_names_the_file() {
        let path = fixture("nar-c2i-tiny/model.pt");
        let pt = open_checkpoint(&path).unwrap();
        assert_eq!(pt.origin(), path.display().to_string());
        let err = pt.read_f32("no.such.weight").unwrap_err().to_string();
        assert!(
            err.contains("model.pt") && err.contains("`no.such.weight`"),
            "{err}"
        );
    }

    #[test]
    fn random_bytes_are_an_unknown_format() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("noise.bin");
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let noise: Vec<u8> = (0..4096)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state.to_le_bytes()[0]
            })
            .collect();
        std::fs::write(&path, &noise).unwrap();
        let err = open_checkpoint(&path).err().unwrap();
        assert!(
            matches!(err, CheckpointError::UnknownFormat { .. }),
            "{err:?}"
        );
        let message = err.to_string();
        assert!(message.contains("noise.bin"), "{message}");
        assert!(
            message.contains("safetensors") && message.contains("torch.save"),
            "{message}"
        );
    }

    #[test]
    fn empty_file_is_reported_as_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("empty.pt");
        std::fs::write(&path, b"").unwrap();
        let message = open_checkpoint(&path).err().unwrap().to_string();
        assert!(
            message.contains("empty.pt") && message.contains("empty"),
            "{message}"
        );
    }

    #[test]
    fn legacy_pickle_asks_for_a_resave() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.pth");
        // The magic number torch < 1.6 pickled first.
        std::fs::write(&path, b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19.").unwrap();
        let message = open_checkpoint(&path).err().unwrap().to_string();
        assert!(message.contains("old.pth"), "{message}");
        assert!(message.contains("torch >= 1.6"), "{message}");
        assert!(message.contains("safetensors"), "{message}");
    }

    #[test]
    fn missing_file_is_an_io_error_naming_it() {
        let message = open_checkpoint(Path::new("/nonexistent/weights.pt"))
            .err()
            .unwrap()
            .to_string();
        assert!(message.contains("/nonexistent/weights.pt"), "{message}");
    }

    #[test]
    fn in_memory_source() {
        let mut source = InMemory::new();
        source.insert("b", vec![2, 2], vec![1.0, 2.0, 3.0, 4.0]);
        source.insert("a", vec![], vec![5.0]);
        assert_eq!(source.names(), ["a", "b"]);
        assert_eq!(source.shape("b"), Some(vec![2, 2]));
        assert_eq!(source.shape("c"), None);
        assert_eq!(source.read_f32("a").unwrap(), [5.0]);
        let message = source.read_f32("c").unwrap_err().to_string();
        assert!(
            message.contains("memory") && message.contains("`c`"),
            "{message}"
        );
    }

    #[test]
    #[should_panic(expected = "does not match")]
    fn in_memory_rejects_mismatched_data() {
        InMemory::new().insert("a", vec![2, 3], vec![0.0; 5]);
    }

    #[test]
    fn float_decoding() {
        let f16_bytes: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|&x| f16::from_f32(x).to_le_bytes())
            .collect();
        assert_eq!(Float::F16.decode(&f16_bytes), [1.5, -2.0]);
        let bf16_bytes: Vec<u8> = [0.25f32, 3.0]
            .iter()
            .flat_map(|&x| bf16::from_f32(x).to_le_bytes())
            .collect();
        assert_eq!(Float::BF16.decode(&bf16_bytes), [0.25, 3.0]);
        let f64_bytes: Vec<u8> = [0.1f64, 1e300]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        assert_eq!(Float::F64.decode(&f64_bytes), [0.1f32, f32::INFINITY]);
    }
}
