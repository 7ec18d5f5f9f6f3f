//! PyTorch checkpoints: the zip archives `torch.save` writes by default since torch 1.6.
//!
//! The archive holds `<prefix>/data.pkl` (the pickled object, whose tensors refer to storages
//! by key), `<prefix>/data/<key>` (each storage's raw little-endian bytes, stored uncompressed
//! by torch) and small records such as `<prefix>/byteorder`. The pickle is read with the
//! restricted unpickler in [`super::pickle`]; storage bytes are sliced from the memory-mapped
//! archive when a tensor is read.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::io::{Cursor, Read};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;

use memmap2::Mmap;
use zip::{CompressionMethod, ZipArchive};

use super::pickle::{self, lookup, Pickle, PickleError, Tensor, Value};
use super::{map_file, numel, CheckpointError, Dtype, TensorSource};

/// Refuse to inflate a `data.pkl` larger than this; real ones are a few megabytes at most.
const MAX_PICKLE_LEN: u64 = 64 << 20;

/// Keys under which checkpoints nest the state dict, in the order the upstream loader checks.
const STATE_DICT_KEYS: [&str; 3] = ["model", "module", "state_dict"];

/// Prefixes that `DistributedDataParallel` and `torch.compile` add to parameter names.
const WRAPPER_PREFIXES: [&str; 2] = ["module.", "_orig_mod."];

/// A `torch.save` zip archive holding a state dict, validated when opened.
pub struct PytorchFile {
    path: PathBuf,
    map: SharedMap,
    /// The archive as parsed when opened; cloning it shares the parsed central directory.
    archive: ZipArchive<Cursor<SharedMap>>,
    tensors: BTreeMap<String, StoredTensor>,
}

/// The mapped file, shared by the archive reader and the stored-entry slices.
#[derive(Clone)]
struct SharedMap(Arc<Mmap>);

impl AsRef<[u8]> for SharedMap {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

struct StoredTensor {
    dtype: Dtype,
    shape: Vec<usize>,
    strides: Vec<usize>,
    /// The zip entry holding the storage, for messages.
    entry: String,
    data: StorageData,
    /// The bytes of the storage the view touches, within its entry; the view's offset is
    /// the first of them.
    span: Range<usize>,
}

/// Where a storage's bytes are.
#[derive(Clone)]
enum StorageData {
    /// Byte range in the archive (entries written by torch are stored uncompressed).
    Stored(Range<usize>),
    /// A deflated entry (an archive repacked by another tool), inflated when read.
    Deflated { index: usize },
}

impl PytorchFile {
    /// Maps the archive, unpickles its state dict and checks that every tensor's data is
    /// present: a truncated or corrupt archive fails here.
    pub fn open(path: &Path) -> Result<Self, CheckpointError> {
        let map = SharedMap(Arc::new(map_file(path)?));
        let mut archive =
            ZipArchive::new(Cursor::new(map.clone())).map_err(|e| CheckpointError::Archive {
                path: path.to_owned(),
                detail: format!(
                    "not a readable zip archive ({e}); the file is truncated or corrupt"
                ),
            })?;
        let tensors = index_archive(path, &mut archive, map.0.len())?;
        Ok(Self {
            path: path.to_owned(),
            map,
            archive,
            tensors,
        })
    }

    fn tensor_error(&self, name: &str, detail: String) -> CheckpointError {
        CheckpointError::Tensor {
            origin: self.origin(),
            name: name.to_owned(),
            detail,
        }
    }

    /// Decompresses the bytes `span` of a deflated storage entry, skipping those before it,
    /// so memory follows the view rather than the storage. The buffer grows with the data
    /// actually inflated rather than with sizes the archive claims.
    fn inflate(
        &self,
        name: &str,
        index: usize,
        span: &Range<usize>,
    ) -> Result<Vec<u8>, CheckpointError> {
        let mut archive = self.archive.clone();
        let mut bytes = Vec::new();
        let skip = span.start as u64;
        archive
            .by_index(index)
            .and_then(|mut entry| {
                let skipped = std::io::copy(&mut (&mut entry).take(skip), &mut std::io::sink())?;
                if skipped == skip {
                    entry.take(span.len() as u64).read_to_end(&mut bytes)?;
                }
                Ok(())
            })
            .map_err(|e| self.tensor_error(name, format!("cannot inflate its storage: {e}")))?;
        if bytes.len() != span.len() {
            return Err(self.tensor_error(
                name,
                format!(
                    "its storage inflated to fewer than the {} bytes its view needs",
                    span.end
                ),
            ));
        }
        Ok(bytes)
    }
}

fn index_archive<R: Read + std::io::Seek>(
    path: &Path,
    archive: &mut ZipArchive<R>,
    file_len: usize,
) -> Result<BTreeMap<String, StoredTensor>, CheckpointError> {
    let invalid = |detail: String| CheckpointError::Archive {
        path: path.to_owned(),
        detail,
    };
    let prefix = archive_prefix(archive).map_err(invalid)?;

    let byteorder_name = format!("{prefix}/byteorder");
    if archive.index_for_name(&byteorder_name).is_some() {
        let byteorder = read_entry(archive, &byteorder_name, 16).map_err(invalid)?;
        if byteorder != b"little" {
            return Err(invalid(format!(
                "`{byteorder_name}` says {:?}; only little-endian archives are supported",
                String::from_utf8_lossy(&byteorder)
            )));
        }
    }

    let pickle_name = format!("{prefix}/data.pkl");
    let data = read_entry(archive, &pickle_name, MAX_PICKLE_LEN).map_err(invalid)?;
    let pickle = pickle::unpickle(&data).map_err(|e| match e {
        PickleError::Malformed { offset, detail } => CheckpointError::Pickle {
            path: path.to_owned(),
            entry: pickle_name.clone(),
            offset,
            detail,
        },
        PickleError::Forbidden { offset, global } => CheckpointError::ForbiddenGlobal {
            path: path.to_owned(),
            entry: pickle_name.clone(),
            offset,
            global,
        },
    })?;

    let mut storages: HashMap<Rc<str>, (String, StorageData, usize)> = HashMap::new();
    let mut tensors = BTreeMap::new();
    for (name, tensor) in state_dict(path, &pickle)? {
        let bad_tensor = |detail: String| CheckpointError::Tensor {
            origin: path.display().to_string(),
            name: name.clone(),
            detail,
        };
        let storage = &tensor.storage;
        let entry_name = format!("{prefix}/data/{}", storage.key);
        let (entry_name, data, entry_len) = match storages.get(&storage.key) {
            Some(found) => found.clone(),
            None => {
                let found = locate_storage(archive, &entry_name, file_len)
                    .map(|(data, len)| (entry_name, data, len))
                    .map_err(&bad_tensor)?;
                storages.insert(storage.key.clone(), found.clone());
                found
            }
        };
        let elements = extent(tensor).ok_or_else(|| {
            bad_tensor(format!(
                "size {:?} with stride {:?} at offset {} overflows",
                tensor.shape, tensor.strides, tensor.offset
            ))
        })?;
        if elements > storage.numel {
            return Err(bad_tensor(format!(
                "its view (offset {}, size {:?}, stride {:?}) reaches element {elements} but \
                 its storage `{}` holds {} elements",
                tensor.offset, tensor.shape, tensor.strides, storage.key, storage.numel
            )));
        }
        storage
            .numel
            .checked_mul(storage.dtype.size())
            .filter(|&len| len <= entry_len)
            .ok_or_else(|| {
                bad_tensor(format!(
                    "entry `{entry_name}` holds {entry_len} bytes, fewer than its storage of {} \
                     {} elements needs; the file is truncated or corrupt",
                    storage.numel,
                    storage.dtype.name(),
                ))
            })?;
        // Neither end overflows: both are at most the storage's length in bytes.
        let size = storage.dtype.size();
        let span = if elements == 0 {
            0..0
        } else {
            tensor.offset * size..elements * size
        };
        // Reading converts the whole view, so its size must be addressable.
        if numel(&tensor.shape)
            .and_then(|n| n.checked_mul(storage.dtype.size()))
            .is_none_or(|len| isize::try_from(len).is_err())
        {
            return Err(bad_tensor(format!(
                "size {:?} is too large to read",
                tensor.shape
            )));
        }
        let stored = StoredTensor {
            dtype: storage.dtype,
            shape: tensor.shape.clone(),
            strides: tensor.strides.clone(),
            entry: entry_name,
            data,
            span,
        };
        tensors.insert(name, stored);
    }
    Ok(tensors)
}

/// The archive's top-level folder, found from its single `<prefix>/data.pkl`.
fn archive_prefix<R: Read + std::io::Seek>(archive: &ZipArchive<R>) -> Result<String, String> {
    let prefixes: Vec<&str> = archive
        .file_names()
        .filter_map(|name| name.split_once('/'))
        .filter(|&(prefix, rest)| !prefix.is_empty() && rest == "data.pkl")
        .map(|(prefix, _)| prefix)
        .collect();
    match prefixes[..] {
        [prefix] => Ok(prefix.to_owned()),
        [] => Err("no `<folder>/data.pkl` entry, so torch.save did not write it".to_owned()),
        _ => Err(format!(
            "several top-level folders hold a data.pkl ({}); expected one",
            prefixes.join(", ")
        )),
    }
}

/// Reads a whole (small) entry, verifying its checksum.
fn read_entry<R: Read + std::io::Seek>(
    archive: &mut ZipArchive<R>,
    name: &str,
    limit: u64,
) -> Result<Vec<u8>, String> {
    let entry = archive
        .by_name(name)
        .map_err(|e| format!("cannot read entry `{name}`: {e}"))?;
    if entry.size() > limit {
        return Err(format!(
            "entry `{name}` is {} bytes, more than the {limit} expected",
            entry.size()
        ));
    }
    let mut bytes = Vec::new();
    entry
        .take(limit)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read entry `{name}`: {e}"))?;
    Ok(bytes)
}

/// Finds a storage entry and its uncompressed length.
fn locate_storage<R: Read + std::io::Seek>(
    archive: &mut ZipArchive<R>,
    name: &str,
    file_len: usize,
) -> Result<(StorageData, usize), String> {
    let missing = || {
        format!(
            "the archive has no entry `{name}` for its storage; the file is truncated or corrupt"
        )
    };
    let index = archive.index_for_name(name).ok_or_else(missing)?;
    let entry = archive
        .by_index_raw(index)
        .map_err(|e| format!("cannot read entry `{name}`: {e}"))?;
    let too_large = || format!("entry `{name}` is larger than this platform can address");
    let size = usize::try_from(entry.size()).map_err(|_| too_large())?;
    if entry.encrypted() {
        return Err(format!("entry `{name}` is encrypted"));
    }
    match entry.compression() {
        CompressionMethod::Stored => {
            let start = usize::try_from(entry.data_start()).map_err(|_| too_large())?;
            if entry.compressed_size() != entry.size() {
                return Err(format!(
                    "entry `{name}` is stored uncompressed but its sizes differ ({} bytes \
                     stored, {size} claimed); the file is corrupt",
                    entry.compressed_size()
                ));
            }
            match start.checked_add(size) {
                Some(end) if end <= file_len => Ok((StorageData::Stored(start..end), size)),
                _ => Err(format!(
                    "entry `{name}` ({size} bytes at offset {start}) extends past the end of the \
                     file ({file_len} bytes); the file is truncated or corrupt"
                )),
            }
        }
        CompressionMethod::Deflated => Ok((StorageData::Deflated { index }, size)),
        other => Err(format!(
            "entry `{name}` uses compression {other}; torch.save stores entries uncompressed"
        )),
    }
}

/// One past the largest storage element a strided view touches (0 for an empty tensor).
fn extent(tensor: &Tensor) -> Option<usize> {
    if tensor.shape.contains(&0) {
        return Some(0);
    }
    tensor
        .shape
        .iter()
        .zip(&tensor.strides)
        .try_fold(tensor.offset, |end, (&size, &stride)| {
            end.checked_add((size - 1).checked_mul(stride)?)
        })?
        .checked_add(1)
}

/// Picks the state dict the way the upstream loader does, keeping only tensors and dropping
/// the name prefixes that training wrappers add.
fn state_dict<'p>(
    path: &Path,
    pickle: &'p Pickle,
) -> Result<Vec<(String, &'p Tensor)>, CheckpointError> {
    let no_state_dict = |detail: String| CheckpointError::NoStateDict {
        path: path.to_owned(),
        detail,
    };
    let root = pickle.root();
    let top = pickle.dict(root).ok_or_else(|| {
        no_state_dict(format!(
            "the pickle holds {}, expected a dict",
            pickle.describe(root)
        ))
    })?;
    let (mut entries, mut source) = (top, "the top-level dict".to_owned());
    if let Some((key, value)) = STATE_DICT_KEYS
        .iter()
        .find_map(|key| lookup(top, key).map(|value| (key, value)))
    {
        entries = pickle.dict(value).ok_or_else(|| {
            no_state_dict(format!(
                "`{key}` holds {}, expected a dict of tensors",
                pickle.describe(value)
            ))
        })?;
        source = format!("`{key}`");
    }
    // Video checkpoints nest it once more: {"model": {"name", "args", "sd"}}.
    if let Some(sd) = lookup(entries, "sd").and_then(|value| pickle.dict(value)) {
        entries = sd;
        source = format!("{source}[\"sd\"]");
    }

    // As in a Python dict, the last value set for a key wins.
    let mut latest: BTreeMap<&str, &Value> = BTreeMap::new();
    for (key, value) in entries {
        if let Value::Str(key) = key {
            latest.insert(key, value);
        }
    }
    let mut tensors: BTreeMap<&str, (&str, &Tensor)> = BTreeMap::new();
    for (original, value) in latest {
        let Some(tensor) = pickle.tensor(value) else {
            continue;
        };
        let mut name = original;
        while let Some(rest) = WRAPPER_PREFIXES
            .iter()
            .find_map(|prefix| name.strip_prefix(prefix))
        {
            name = rest;
        }
        if let Some((other, _)) = tensors.insert(name, (original, tensor)) {
            return Err(no_state_dict(format!(
                "{source} holds both `{other}` and `{original}`, which are the same parameter \
                 once the `module.`/`_orig_mod.` wrapper prefixes are removed"
            )));
        }
    }
    if tensors.is_empty() {
        let keys: Vec<String> = entries
            .iter()
            .take(8)
            .map(|(key, _)| match key {
                Value::Str(key) => format!("{key:?}"),
                other => pickle.describe(other),
            })
            .collect();
        let more = if entries.len() > keys.len() {
            ", ..."
        } else {
            ""
        };
        return Err(no_state_dict(format!(
            "{source} holds no tensors (keys: {}{more}); expected a state dict directly or \
             under `model`, `module` or `state_dict`",
            keys.join(", ")
        )));
    }
    Ok(tensors
        .into_iter()
        .map(|(name, (_, tensor))| (name.to_owned(), tensor))
        .collect())
}

/// Whether a view's elements are consecutive in row-major order (strides of size-1 dimensions
/// do not matter). The shape's element count must not overflow.
fn is_contiguous(shape: &[usize], strides: &[usize]) -> bool {
    let mut expected = 1;
    for (&dim, &stride) in shape.iter().zip(strides).rev() {
        if dim != 1 && stride != expected {
            return false;
        }
        expected *= dim;
    }
    true
}

/// The bytes of a strided view starting at the first byte of `storage`, in row-major order;
/// None if it lies outside the storage.
fn gather<'a>(
    storage: &'a [u8],
    size: usize,
    shape: &[usize],
    strides: &[usize],
) -> Option<Cow<'a, [u8]>> {
    let count = numel(shape)?;
    if count == 0 {
        return Some(Cow::Borrowed(&[]));
    }
    if is_contiguous(shape, strides) {
        return storage.get(..count.checked_mul(size)?).map(Cow::Borrowed);
    }
    let mut out = Vec::with_capacity(count * size);
    let mut index = vec![0usize; shape.len()];
    for _ in 0..count {
        let element = index.iter().zip(strides).map(|(i, s)| i * s).sum::<usize>();
        out.extend_from_slice(storage.get(element * size..(element + 1) * size)?);
        for (i, &dim) in index.iter_mut().zip(shape).rev() {
            *i += 1;
            if *i < dim {
                break;
            }
            *i = 0;
        }
    }
    Some(Cow::Owned(out))
}

impl TensorSource for PytorchFile {
    fn names(&self) -> Vec<String> {
        self.tensors.keys().cloned().collect()
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.tensors.get(name).map(|tensor| tensor.shape.clone())
    }

    fn read_f32(&self, name: &str) -> Result<Vec<f32>, CheckpointError> {
        let tensor = self
            .tensors
            .get(name)
            .ok_or_else(|| CheckpointError::MissingTensor {
                origin: self.origin(),
                name: name.to_owned(),
            })?;
        let float = tensor.dtype.float(&self.origin(), name)?;
        let span = &tensor.span;
        let storage = match &tensor.data {
            StorageData::Stored(range) => Cow::Borrowed(
                self.map
                    .as_ref()
                    .get(range.start + span.start..range.start + span.end)
                    .ok_or_else(|| {
                        self.tensor_error(name, "storage lies outside the file".into())
                    })?,
            ),
            StorageData::Deflated { index } => Cow::Owned(self.inflate(name, *index, span)?),
        };
        // The view was checked against the storage when the archive was opened; `storage`
        // starts at its offset.
        let bytes = gather(
            &storage,
            tensor.dtype.size(),
            &tensor.shape,
            &tensor.strides,
        )
        .ok_or_else(|| {
            self.tensor_error(name, format!("view lies outside entry `{}`", tensor.entry))
        })?;
        Ok(float.decode(&bytes))
    }

    fn origin(&self) -> String {
        self.path.display().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::pickle::tests::Assembler;
    use crate::checkpoint::tests::fixture;
    use std::io::Write;
    use zip::write::SimpleFileOptions;
    use zip::ZipWriter;

    fn f32_bytes(values: &[f32]) -> Vec<u8> {
        values.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    /// Writes a torch.save-like archive with the given pickle and storage entries.
    fn archive(
        dir: &Path,
        pickle: &[u8],
        storages: &[(&str, Vec<u8>)],
        compression: CompressionMethod,
    ) -> PathBuf {
        let path = dir.join("checkpoint.pt");
        let mut zip = ZipWriter::new(std::fs::File::create(&path).unwrap());
        let options = SimpleFileOptions::default().compression_method(compression);
        zip.start_file("archive/data.pkl", options).unwrap();
        zip.write_all(pickle).unwrap();
        zip.start_file("archive/byteorder", options).unwrap();
        zip.write_all(b"little").unwrap();
        for (key, bytes) in storages {
            zip.start_file(format!("archive/data/{key}"), options)
                .unwrap();
            zip.write_all(bytes).unwrap();
        }
        zip.finish().unwrap();
        path
    }

    /// A state dict `{"w": 2x3 float32 from storage "0", "v": 2-vector from storage "1"}`,
    /// with `names` for the two keys.
    fn state_dict_items(p: &mut Assembler, names: [&str; 2]) {
        p.op(b'}').op(b'(');
        p.str(names[0])
            .tensor("FloatStorage", "0", 6, 0, &[2, 3], &[3, 1]);
        p.str(names[1])
            .tensor("FloatStorage", "1", 2, 0, &[2], &[1]);
        p.op(b'u');
    }

    fn storages() -> Vec<(&'static str, Vec<u8>)> {
        vec![
            ("0", f32_bytes(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0])),
            ("1", f32_bytes(&[7.0, 8.0])),
        ]
    }

    fn open(
        pickle: &[u8],
        storages: &[(&str, Vec<u8>)],
    ) -> (tempfile::TempDir, Result<PytorchFile, CheckpointError>) {
        let dir = tempfile::tempdir().unwrap();
        let path = archive(dir.path(), pickle, storages, CompressionMethod::Stored);
        let file = PytorchFile::open(&path);
        (dir, file)
    }

    fn open_error(pickle: &[u8], storages: &[(&str, Vec<u8>)]) -> String {
        let (_dir, result) = open(pickle, storages);
        let message = result.err().unwrap().to_string();
        assert!(message.contains("checkpoint.pt"), "{message}");
        message
    }

    fn assert_simple_state_dict(file: &PytorchFile) {
        assert_eq!(file.names(), ["v", "w"]);
        assert_eq!(file.shape("w"), Some(vec![2, 3]));
        assert_eq!(file.read_f32("w").unwrap(), [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        assert_eq!(file.read_f32("v").unwrap(), [7.0, 8.0]);
    }

    #[test]
    fn state_dict_under_each_wrapper_key() {
        for key in ["model", "module", "state_dict"] {
            let mut p = Assembler::new();
            p.op(b'}').str("steps").op(b'K').op(5).op(b's').str(key);
            state_dict_items(&mut p, ["w", "v"]);
            p.op(b's').op(b'.');
            let (_dir, file) = open(&p.bytes(), &storages());
            assert_simple_state_dict(&file.unwrap());
        }
    }

    #[test]
    fn bare_state_dict_with_wrapper_prefixes() {
        let mut p = Assembler::new();
        state_dict_items(&mut p, ["module._orig_mod.w", "_orig_mod.v"]);
        p.op(b'.');
        let (_dir, file) = open(&p.bytes(), &storages());
        assert_simple_state_dict(&file.unwrap());
    }

    #[test]
    fn model_takes_precedence_over_module() {
        let mut p = Assembler::new();
        p.op(b'}').op(b'(').str("module").op(b'}').str("model");
        state_dict_items(&mut p, ["w", "v"]);
        p.op(b'u').op(b'.');
        let (_dir, file) = open(&p.bytes(), &storages());
        assert_simple_state_dict(&file.unwrap());
    }

    #[test]
    fn video_checkpoint_with_name_args_and_sd() {
        // {"model": {"name": "LARP_AR", "args": Namespace(lr=...), "sd": {...}}, "optimizer": {...}}
        let mut p = Assembler::new();
        p.op(b'}').op(b'(').str("model").op(b'}').op(b'(');
        p.str("name").str("LARP_AR");
        p.str("args")
            .global("argparse", "Namespace")
            .op(b')')
            .op(0x81);
        p.op(b'}')
            .str("lr")
            .op(b'G')
            .0
            .extend_from_slice(&1e-4f64.to_be_bytes());
        p.op(b's').op(b'b');
        p.str("sd");
        state_dict_items(&mut p, ["w", "v"]);
        p.op(b'u').str("optimizer").op(b'}').op(b'u').op(b'.');
        let (_dir, file) = open(&p.bytes(), &storages());
        assert_simple_state_dict(&file.unwrap());
    }

    #[test]
    fn parameters_views_and_other_dtypes() {
        // A transposed view, a view at an offset, a Parameter, a half and an int64 tensor.
        let mut p = Assembler::new();
        p.op(b'}').op(b'(');
        p.str("t")
            .tensor("FloatStorage", "0", 6, 0, &[3, 2], &[1, 3]);
        p.str("row").tensor("FloatStorage", "0", 6, 3, &[3], &[1]);
        p.str("param").global("torch._utils", "_rebuild_parameter");
        p.tensor("FloatStorage", "1", 2, 0, &[2], &[1]);
        p.op(0x88)
            .global("collections", "OrderedDict")
            .op(b')')
            .op(b'R')
            .op(0x87)
            .op(b'R');
        p.str("half").tensor("HalfStorage", "2", 2, 0, &[2], &[1]);
        p.str("brain")
            .tensor("BFloat16Storage", "3", 1, 0, &[], &[]);
        p.str("index").tensor("LongStorage", "4", 1, 0, &[1], &[1]);
        p.str("step").op(b'K').op(9);
        p.op(b'u').op(b'.');
        let half: Vec<u8> = [0.5f32, -1.0]
            .iter()
            .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
            .collect();
        let mut storages = storages();
        storages.push(("2", half));
        storages.push(("3", half::bf16::from_f32(4.0).to_le_bytes().to_vec()));
        storages.push(("4", 3i64.to_le_bytes().to_vec()));
        let (_dir, file) = open(&p.bytes(), &storages);
        let file = file.unwrap();
        assert_eq!(
            file.names(),
            ["brain", "half", "index", "param", "row", "t"]
        );
        assert_eq!(file.read_f32("t").unwrap(), [1.0, 4.0, 2.0, 5.0, 3.0, 6.0]);
        assert_eq!(file.read_f32("row").unwrap(), [4.0, 5.0, 6.0]);
        assert_eq!(file.read_f32("param").unwrap(), [7.0, 8.0]);
        assert_eq!(file.read_f32("half").unwrap(), [0.5, -1.0]);
        assert_eq!(file.shape("brain"), Some(vec![]));
        assert_eq!(file.read_f32("brain").unwrap(), [4.0]);
        let message = file.read_f32("index").unwrap_err().to_string();
        assert!(
            message.contains("`index`") && message.contains("int64"),
            "{message}"
        );
        assert!(message.contains("checkpoint.pt"), "{message}");
    }

    #[test]
    fn deflated_entries_are_read() {
        let mut p = Assembler::new();
        state_dict_items(&mut p, ["w", "v"]);
        p.op(b'.');
        let dir = tempfile::tempdir().unwrap();
        let path = archive(
            dir.path(),
            &p.bytes(),
            &storages(),
            CompressionMethod::Deflated,
        );
        assert_simple_state_dict(&PytorchFile::open(&path).unwrap());

        // Only the bytes a view touches are inflated: elements 3 and 5 of a storage of 1000.
        let mut p = Assembler::new();
        p.op(b'}')
            .str("w")
            .tensor("FloatStorage", "0", 1000, 3, &[2], &[2]);
        p.op(b's').op(b'.');
        let values: Vec<f32> = (0..1000).map(|i| i as f32).collect();
        let path = archive(
            dir.path(),
            &p.bytes(),
            &[("0", f32_bytes(&values))],
            CompressionMethod::Deflated,
        );
        let file = PytorchFile::open(&path).unwrap();
        assert_eq!(file.tensors["w"].span, 12..24);
        assert_eq!(file.read_f32("w").unwrap(), [3.0, 5.0]);
    }

    #[test]
    fn oversized_pickle_is_refused_before_it_is_inflated() {
        let dir = tempfile::tempdir().unwrap();
        let pickle = vec![b']'; MAX_PICKLE_LEN as usize + 1];
        let path = archive(dir.path(), &pickle, &[], CompressionMethod::Deflated);
        assert!(std::fs::metadata(&path).unwrap().len() < 1 << 20);
        let message = PytorchFile::open(&path).err().unwrap().to_string();
        assert!(
            message.contains("`archive/data.pkl` is 67108865 bytes, more than the 67108864"),
            "{message}"
        );
    }

    #[test]
    fn forbidden_global_is_refused() {
        let mut p = Assembler::new();
        p.global("os", "system")
            .str("touch /tmp/pwned")
            .op(0x85)
            .op(b'R')
            .op(b'.');
        let (_dir, result) = open(&p.bytes(), &[]);
        let err = result.err().unwrap();
        assert!(
            matches!(err, CheckpointError::ForbiddenGlobal { .. }),
            "{err:?}"
        );
        let message = err.to_string();
        assert!(message.contains("checkpoint.pt"), "{message}");
        assert!(message.contains("`os.system`"), "{message}");
        assert!(message.contains("never runs code"), "{message}");
        assert!(message.contains("archive/data.pkl"), "{message}");
    }

    #[test]
    fn malformed_pickle_names_entry_and_offset() {
        let message = open_error(&[0x80, 2, b'h', 9, b'.'], &[]);
        assert!(
            message.contains("`archive/data.pkl` at byte 2"),
            "{message}"
        );
        assert!(message.contains("memo index 9"), "{message}");
    }

    #[test]
    fn missing_storage_entry() {
        let mut p = Assembler::new();
        state_dict_items(&mut p, ["w", "v"]);
        p.op(b'.');
        let message = open_error(&p.bytes(), &storages()[..1]);
        assert!(message.contains("tensor `v`"), "{message}");
        assert!(message.contains("`archive/data/1`"), "{message}");
    }

    #[test]
    fn short_storage_entry() {
        let mut p = Assembler::new();
        state_dict_items(&mut p, ["w", "v"]);
        p.op(b'.');
        let mut storages = storages();
        storages[0].1.truncate(20);
        let message = open_error(&p.bytes(), &storages);
        assert!(message.contains("tensor `w`"), "{message}");
        assert!(
            message.contains("holds 20 bytes, fewer than its storage of 6 float32"),
            "{message}"
        );
    }

    #[test]
    fn view_beyond_storage() {
        let mut p = Assembler::new();
        p.op(b'}')
            .str("w")
            .tensor("FloatStorage", "0", 6, 2, &[2, 3], &[3, 1]);
        p.op(b's').op(b'.');
        let message = open_error(&p.bytes(), &storages());
        assert!(
            message.contains("tensor `w`") && message.contains("holds 6 elements"),
            "{message}"
        );
    }

    #[test]
    fn state_dict_shape_errors() {
        let mut p = Assembler::new();
        p.op(b']').op(b'.');
        let message = open_error(&p.bytes(), &[]);
        assert!(
            message.contains("holds a list of 0 items, expected a dict"),
            "{message}"
        );

        let mut p = Assembler::new();
        p.op(b'}').str("model").str("weights").op(b's').op(b'.');
        let message = open_error(&p.bytes(), &[]);
        assert!(
            message.contains("`model` holds the str \"weights\""),
            "{message}"
        );

        let mut p = Assembler::new();
        p.op(b'}').str("steps").op(b'K').op(5).op(b's').op(b'.');
        let message = open_error(&p.bytes(), &[]);
        assert!(
            message.contains("no tensors (keys: \"steps\")"),
            "{message}"
        );

        let mut p = Assembler::new();
        state_dict_items(&mut p, ["module.w", "w"]);
        p.op(b'.');
        let message = open_error(&p.bytes(), &storages());
        assert!(message.contains("`module.w` and `w`"), "{message}");
    }

    #[test]
    fn archive_layout_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("checkpoint.pt");
        let mut zip = ZipWriter::new(std::fs::File::create(&path).unwrap());
        zip.start_file("weights.bin", SimpleFileOptions::default())
            .unwrap();
        zip.finish().unwrap();
        let message = PytorchFile::open(&path).err().unwrap().to_string();
        assert!(
            message.contains("checkpoint.pt") && message.contains("data.pkl"),
            "{message}"
        );

        let mut zip = ZipWriter::new(std::fs::File::create(&path).unwrap());
        let options = SimpleFileOptions::default();
        zip.start_file("model/data.pkl", options).unwrap();
        zip.write_all(&[0x80, 2, b'}', b'.']).unwrap();
        zip.start_file("model/byteorder", options).unwrap();
        zip.write_all(b"big").unwrap();
        zip.finish().unwrap();
        let message = PytorchFile::open(&path).err().unwrap().to_string();
        assert!(
            message.contains("\"big\"") && message.contains("little-endian"),
            "{message}"
        );
    }

    #[test]
    fn truncated_fixture_is_rejected() {
        let original = std::fs::read(fixture("nar-c2i-tiny/model.pt")).unwrap();
        let dir = tempfile::tempdir().unwrap();
        for len in [original.len() / 2, original.len() - 30] {
            let path = dir.path().join("model.pt");
            std::fs::write(&path, &original[..len]).unwrap();
            let message = crate::checkpoint::open_checkpoint(&path)
                .err()
                .unwrap()
                .to_string();
            assert!(
                message.contains("model.pt") && message.contains("truncated"),
                "{message}"
            );
        }
    }

    #[test]
    fn gather_handles_broadcast_and_empty_views() {
        let storage = f32_bytes(&[1.0, 2.0]);
        let bytes = gather(&storage[4..], 4, &[3], &[0]).unwrap();
        assert_eq!(
            crate::checkpoint::Float::F32.decode(&bytes),
            [2.0, 2.0, 2.0]
        );
        assert!(gather(&storage, 4, &[0, 5], &[5, 1]).unwrap().is_empty());
    }
}
