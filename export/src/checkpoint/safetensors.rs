//! Memory-mapped safetensors files.
//!
//! The header is parsed here rather than by the `safetensors` crate so that every inconsistency
//! is reported with the tensor it concerns and what was expected.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use serde::Deserialize;

use super::{map_file, numel, CheckpointError, Dtype, Float, TensorSource};

/// The format's own limit on the JSON header.
const MAX_HEADER_LEN: u64 = 100_000_000;

/// Whether the first bytes of a file look like a safetensors header (a plausible little-endian
/// header length followed by the start of a JSON object), so that a truncated or corrupt
/// safetensors file gets a safetensors error rather than "unknown format".
pub(crate) fn looks_like_safetensors(head: &[u8]) -> bool {
    match head.get(..9) {
        Some([n @ .., b'{']) => {
            let mut len = [0u8; 8];
            len.copy_from_slice(n);
            u64::from_le_bytes(len) <= MAX_HEADER_LEN
        }
        _ => false,
    }
}

/// A safetensors file, validated when opened.
pub struct SafetensorsFile {
    path: PathBuf,
    map: Mmap,
    tensors: BTreeMap<String, Entry>,
}

struct Entry {
    dtype: Dtype,
    shape: Vec<usize>,
    /// Byte range in the file.
    bytes: Range<usize>,
}

#[derive(Deserialize)]
struct HeaderEntry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: [usize; 2],
}

impl SafetensorsFile {
    /// Maps the file and checks its header: every tensor's dtype is known, its byte length
    /// matches its shape and its data lies inside the file.
    pub fn open(path: &Path) -> Result<Self, CheckpointError> {
        let map = map_file(path)?;
        let tensors = parse_header(path, &map)?;
        Ok(Self {
            path: path.to_owned(),
            map,
            tensors,
        })
    }
}

fn parse_header(path: &Path, file: &[u8]) -> Result<BTreeMap<String, Entry>, CheckpointError> {
    let invalid = |detail: String| CheckpointError::Safetensors {
        path: path.to_owned(),
        detail,
    };
    let len = file.len();
    let Some(prefix) = file.get(..8) else {
        return Err(invalid(format!(
            "the file is {len} bytes long, shorter than the 8-byte header length"
        )));
    };
    let mut header_len = [0u8; 8];
    header_len.copy_from_slice(prefix);
    let header_len = u64::from_le_bytes(header_len);
    if header_len > MAX_HEADER_LEN {
        return Err(invalid(format!(
            "header length {header_len} exceeds the format's limit of {MAX_HEADER_LEN} bytes"
        )));
    }
    let data_start = usize::try_from(header_len)
        .ok()
        .and_then(|n| n.checked_add(8))
        .filter(|&end| end <= len)
        .ok_or_else(|| {
            invalid(format!(
                "the header is {header_len} bytes long but the file has only {} bytes after the \
                 length prefix; the file is truncated",
                len.saturating_sub(8)
            ))
        })?;
    let header: BTreeMap<String, serde_json::Value> = serde_json::from_slice(&file[8..data_start])
        .map_err(|e| invalid(format!("the header is not a JSON object: {e}")))?;
    let data_len = len - data_start;

    let mut tensors = BTreeMap::new();
    for (name, value) in header {
        if name == "__metadata__" {
            continue;
        }
        let bad_tensor = |detail: String| CheckpointError::Tensor {
            origin: path.display().to_string(),
            name: name.clone(),
            detail,
        };
        let info: HeaderEntry = serde_json::from_value(value).map_err(|e| {
            bad_tensor(format!(
                "invalid header entry ({e}); expected dtype, shape and data_offsets"
            ))
        })?;
        let dtype = dtype_from_name(&info.dtype)
            .ok_or_else(|| bad_tensor(format!("unsupported dtype `{}`", info.dtype)))?;
        let [begin, end] = info.data_offsets;
        let needed = numel(&info.shape)
            .and_then(|n| n.checked_mul(dtype.size()))
            .ok_or_else(|| bad_tensor(format!("shape {:?} overflows", info.shape)))?;
        if end < begin || end - begin != needed {
            return Err(bad_tensor(format!(
                "data_offsets [{begin}, {end}] do not span the {needed} bytes that shape {:?} of \
                 {} needs",
                info.shape,
                dtype.name()
            )));
        }
        if end > data_len {
            return Err(bad_tensor(format!(
                "data_offsets [{begin}, {end}] lie beyond the end of the data section \
                 ({data_len} bytes); the file is truncated or corrupt"
            )));
        }
        let entry = Entry {
            dtype,
            shape: info.shape,
            bytes: data_start + begin..data_start + end,
        };
        tensors.insert(name, entry);
    }
    Ok(tensors)
}

fn dtype_from_name(name: &str) -> Option<Dtype> {
    let other = |name, size| Some(Dtype::Other { name, size });
    match name {
        "F64" => Some(Dtype::Float(Float::F64)),
        "F32" => Some(Dtype::Float(Float::F32)),
        "F16" => Some(Dtype::Float(Float::F16)),
        "BF16" => Some(Dtype::Float(Float::BF16)),
        "I64" => other("int64", 8),
        "I32" => other("int32", 4),
        "I16" => other("int16", 2),
        "I8" => other("int8", 1),
        "U64" => other("uint64", 8),
        "U32" => other("uint32", 4),
        "U16" => other("uint16", 2),
        "U8" => other("uint8", 1),
        "BOOL" => other("bool", 1),
        "F8_E4M3" => other("float8_e4m3fn", 1),
        "F8_E5M2" => other("float8_e5m2", 1),
        _ => None,
    }
}

impl TensorSource for SafetensorsFile {
    fn names(&self) -> Vec<String> {
        self.tensors.keys().cloned().collect()
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.tensors.get(name).map(|entry| entry.shape.clone())
    }

    fn read_f32(&self, name: &str) -> Result<Vec<f32>, CheckpointError> {
        let entry = self
            .tensors
            .get(name)
            .ok_or_else(|| CheckpointError::MissingTensor {
                origin: self.origin(),
                name: name.to_owned(),
            })?;
        let float = entry.dtype.float(&self.origin(), name)?;
        // The range was checked against the file when it was opened.
        let bytes = self
            .map
            .get(entry.bytes.clone())
            .ok_or_else(|| CheckpointError::Tensor {
                origin: self.origin(),
                name: name.to_owned(),
                detail: "data lies outside the file".to_owned(),
            })?;
        Ok(float.decode(bytes))
    }

    fn origin(&self) -> String {
        self.path.display().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::tests::fixture;
    use half::{bf16, f16};

    /// Assembles a safetensors file from (name, dtype, shape, data) with consecutive offsets.
    fn safetensors_bytes(tensors: &[(&str, &str, &[usize], Vec<u8>)]) -> Vec<u8> {
        let mut header = serde_json::Map::new();
        let mut data = Vec::new();
        for (name, dtype, shape, bytes) in tensors {
            let begin = data.len();
            data.extend_from_slice(bytes);
            header.insert(
                name.to_string(),
                serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [begin, data.len()]}),
            );
        }
        with_header(&serde_json::Value::Object(header).to_string(), &data)
    }

    fn with_header(header: &str, data: &[u8]) -> Vec<u8> {
        let mut file = (header.len() as u64).to_le_bytes().to_vec();
        file.extend_from_slice(header.as_bytes());
        file.extend_from_slice(data);
        file
    }

    fn write(bytes: &[u8]) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("weights.safetensors");
        std::fs::write(&path, bytes).unwrap();
        (dir, path)
    }

    fn open_error(bytes: &[u8]) -> String {
        let (_dir, path) = write(bytes);
        let message = SafetensorsFile::open(&path).err().unwrap().to_string();
        assert!(message.contains("weights.safetensors"), "{message}");
        message
    }

    #[test]
    fn converts_float_dtypes_and_rejects_integers() {
        let f16s: Vec<u8> = [1.0f32, -0.5]
            .iter()
            .flat_map(|&x| f16::from_f32(x).to_le_bytes())
            .collect();
        let bf16s: Vec<u8> = [2.0f32, 0.125]
            .iter()
            .flat_map(|&x| bf16::from_f32(x).to_le_bytes())
            .collect();
        let f64s: Vec<u8> = [3.5f64].iter().flat_map(|x| x.to_le_bytes()).collect();
        let i64s: Vec<u8> = [7i64, 8].iter().flat_map(|x| x.to_le_bytes()).collect();
        let bytes = safetensors_bytes(&[
            ("half", "F16", &[2], f16s),
            ("brain", "BF16", &[1, 2], bf16s),
            ("double", "F64", &[], f64s),
            ("index", "I64", &[2], i64s),
        ]);
        let (_dir, path) = write(&bytes);
        let file = SafetensorsFile::open(&path).unwrap();
        assert_eq!(file.names(), ["brain", "double", "half", "index"]);
        assert_eq!(file.shape("brain"), Some(vec![1, 2]));
        assert_eq!(file.read_f32("half").unwrap(), [1.0, -0.5]);
        assert_eq!(file.read_f32("brain").unwrap(), [2.0, 0.125]);
        assert_eq!(file.read_f32("double").unwrap(), [3.5]);
        let message = file.read_f32("index").unwrap_err().to_string();
        assert!(
            message.contains("`index`") && message.contains("int64"),
            "{message}"
        );
        assert!(message.contains("weights.safetensors"), "{message}");
        let message = file.read_f32("nothing").unwrap_err().to_string();
        assert!(message.contains("`nothing`"), "{message}");
    }

    #[test]
    fn metadata_entry_is_not_a_tensor() {
        let header = r#"{"__metadata__":{"format":"pt"},"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#;
        let (_dir, path) = write(&with_header(header, &1.0f32.to_le_bytes()));
        let file = SafetensorsFile::open(&path).unwrap();
        assert_eq!(file.names(), ["w"]);
        assert_eq!(file.read_f32("w").unwrap(), [1.0]);
    }

    #[test]
    fn truncated_fixture_is_rejected_at_open() {
        let original = std::fs::read(fixture("nar-c2i-tiny/model.safetensors")).unwrap();
        let message = open_error(&original[..original.len() - 100]);
        assert!(message.contains("truncated"), "{message}");
        // The last tensor in the file is the one cut short.
        assert!(message.contains("tensor `"), "{message}");
    }

    #[test]
    fn truncation_inside_the_header_is_rejected() {
        let original = std::fs::read(fixture("nar-c2i-tiny/model.safetensors")).unwrap();
        let message = open_error(&original[..40]);
        assert!(message.contains("truncated"), "{message}");
        let message = open_error(&original[..5]);
        assert!(message.contains("8-byte header length"), "{message}");
    }

    #[test]
    fn out_of_range_offsets_are_rejected() {
        let header = r#"{"w":{"dtype":"F32","shape":[250],"data_offsets":[0,1000]}}"#;
        let message = open_error(&with_header(header, &[0; 8]));
        assert!(
            message.contains("`w`") && message.contains("beyond the end"),
            "{message}"
        );
        let header = r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[18446744073709551615,8]}}"#;
        let message = open_error(&with_header(header, &[0; 8]));
        assert!(
            message.contains("`w`") && message.contains("8 bytes"),
            "{message}"
        );
    }

    #[test]
    fn byte_length_must_match_shape() {
        let header = r#"{"w":{"dtype":"BF16","shape":[3],"data_offsets":[0,8]}}"#;
        let message = open_error(&with_header(header, &[0; 8]));
        assert!(
            message.contains("`w`") && message.contains("6 bytes"),
            "{message}"
        );
        assert!(message.contains("bfloat16"), "{message}");
        let header =
            r#"{"w":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}}"#;
        let message = open_error(&with_header(header, &[0; 8]));
        assert!(message.contains("overflows"), "{message}");
    }

    #[test]
    fn malformed_headers_are_rejected() {
        let message = open_error(&with_header("[1, 2]", &[]));
        assert!(message.contains("not a JSON object"), "{message}");
        let message = open_error(&with_header(r#"{"w":{"dtype":"F32"}}"#, &[]));
        assert!(
            message.contains("`w`") && message.contains("data_offsets"),
            "{message}"
        );
        let header = r#"{"w":{"dtype":"F4","shape":[2],"data_offsets":[0,1]}}"#;
        let message = open_error(&with_header(header, &[0]));
        assert!(
            message.contains("`w`") && message.contains("`F4`"),
            "{message}"
        );
        let mut huge = u64::MAX.to_le_bytes().to_vec();
        huge.push(b'{');
        let message = open_error(&huge);
        assert!(message.contains("header length"), "{message}");
    }

    #[test]
    fn sniffing() {
        let bytes = safetensors_bytes(&[("w", "F32", &[1], vec![0; 4])]);
        assert!(looks_like_safetensors(&bytes[..16]));
        assert!(!looks_like_safetensors(b"PK\x03\x04\0\0\0\0\0"));
        assert!(!looks_like_safetensors(b"{}"));
    }
}
