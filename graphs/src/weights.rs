//! Where weights go: inline in the graph, or once into an ONNX external-data file that several
//! graphs reference.
//!
//! narx writes the prefill and step graphs of a model against one `weights.bin`, so each
//! weight is stored once however many graphs use it, and models beyond protobuf's 2 GB limit
//! need nothing special. Offsets are aligned to 4 KiB so ONNX Runtime can memory-map them.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::builder::DType;
use crate::onnx::{tensor_proto::DataLocation, StringStringEntryProto, TensorProto};
use crate::GraphError;

const ALIGNMENT: u64 = 4096;

/// Where the weights of the graphs being built are stored.
pub struct WeightStore {
    mode: Mode,
}

enum Mode {
    /// Each weight in the graph's own protobuf (tests, small graphs).
    Inline,
    External(ExternalFile),
}

struct ExternalFile {
    /// The name graphs record in `location`, relative to the graph file.
    location: String,
    path: PathBuf,
    writer: BufWriter<File>,
    position: u64,
    written: HashMap<String, (DType, Vec<usize>, u64, u64)>,
}

impl WeightStore {
    pub fn inline() -> Self {
        WeightStore { mode: Mode::Inline }
    }

    /// Creates `dir/location` and stores every weight there.
    pub fn external(dir: &Path, location: &str) -> Result<Self, GraphError> {
        let path = dir.join(location);
        let file = File::create(&path).map_err(|e| GraphError::io(&path, e))?;
        Ok(WeightStore {
            mode: Mode::External(ExternalFile {
                location: location.to_string(),
                path,
                writer: BufWriter::with_capacity(1 << 20, file),
                position: 0,
                written: HashMap::new(),
            }),
        })
    }

    /// The initializer for weight `name`; `bytes` is called only when the store does not hold
    /// it yet.
    pub(crate) fn tensor(
        &mut self,
        name: &str,
        dtype: DType,
        dims: &[usize],
        bytes: impl FnOnce() -> Result<Vec<u8>, GraphError>,
    ) -> Result<TensorProto, GraphError> {
        let mut tensor = TensorProto {
            name: Some(name.to_string()),
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: Some(dtype.onnx() as i32),
            ..Default::default()
        };
        match &mut self.mode {
            Mode::Inline => tensor.raw_data = Some(bytes()?),
            Mode::External(file) => {
                let (offset, length) = file.put(name, dtype, dims, bytes)?;
                tensor.data_location = Some(DataLocation::External as i32);
                tensor.external_data = vec![
                    entry("location", &file.location),
                    entry("offset", &offset.to_string()),
                    entry("length", &length.to_string()),
                ];
            }
        }
        Ok(tensor)
    }

    /// Flushes the external file; returns its size in bytes (0 when inline).
    pub fn finish(self) -> Result<u64, GraphError> {
        match self.mode {
            Mode::Inline => Ok(0),
            Mode::External(mut file) => {
                file.writer
                    .flush()
                    .map_err(|e| GraphError::io(&file.path, e))?;
                file.writer
                    .get_ref()
                    .sync_all()
                    .map_err(|e| GraphError::io(&file.path, e))?;
                Ok(file.position)
            }
        }
    }
}

impl ExternalFile {
    fn put(
        &mut self,
        name: &str,
        dtype: DType,
        dims: &[usize],
        bytes: impl FnOnce() -> Result<Vec<u8>, GraphError>,
    ) -> Result<(u64, u64), GraphError> {
        if let Some((d, s, offset, length)) = self.written.get(name) {
            if *d != dtype || s != dims {
                return Err(GraphError::Invalid(format!(
                    "weight {name} stored as {d:?} {s:?}, requested as {dtype:?} {dims:?}"
                )));
            }
            return Ok((*offset, *length));
        }
        let bytes = bytes()?;
        let padding = (ALIGNMENT - self.position % ALIGNMENT) % ALIGNMENT;
        let io = |e| GraphError::io(&self.path, e);
        self.writer
            .write_all(&vec![0u8; padding as usize])
            .map_err(io)?;
        let offset = self.position + padding;
        self.writer.write_all(&bytes).map_err(io)?;
        let length = bytes.len() as u64;
        self.position = offset + length;
        self.written
            .insert(name.to_string(), (dtype, dims.to_vec(), offset, length));
        Ok((offset, length))
    }
}

fn entry(key: &str, value: &str) -> StringStringEntryProto {
    StringStringEntryProto {
        key: Some(key.to_string()),
        value: Some(value.to_string()),
    }
}
