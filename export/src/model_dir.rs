//! `narx export`: a checkpoint in, a model directory out (graphs, one weight file, manifest).
//!
//! The directory is assembled under a temporary sibling name and renamed into place only when
//! everything is written, so a failed export leaves nothing behind.

use std::path::{Path, PathBuf};

use narx_graphs::larp::{self, LarpConfig};
use narx_graphs::manifest::{
    CacheLayout, DecoderFile, GraphFile, LarpDecoderFile, Manifest, WEIGHTS_FILE,
};
use narx_graphs::nar::{self, ModelConfig, NarSpec, ParamSource};
use narx_graphs::select;
use narx_graphs::vq::{self, VqConfig};
use narx_graphs::weights::WeightStore;
use narx_graphs::{encode_model, DType, GraphError};

use crate::checkpoint::TensorSource;
use crate::ExportError;

/// File names inside a model directory.
const PREFILL_FILE: &str = "prefill.onnx";
const STEP_FILE: &str = "step.onnx";
const SELECT_FILE: &str = "select.onnx";
const DECODER_FILE: &str = "vq_decoder.onnx";
const LARP_DECODER_FILE: &str = "larp_decoder.onnx";

/// What to export.
pub struct ExportRequest<'a> {
    pub source: &'a dyn TensorSource,
    pub config: ModelConfig,
    /// Image grid side; `None` takes it from `block_size`. Video grids are the config's
    /// `latent_shape`.
    pub grid: Option<usize>,
    pub dtype: DType,
    /// How the KV cache travels between calls: `Static` for TensorRT (`--static`).
    pub layout: CacheLayout,
    pub output: PathBuf,
    /// Replace an existing model directory.
    pub force: bool,
    /// The image tokenizer whose decoder turns tokens into pictures, if wanted.
    pub vq: Option<VqRequest<'a>>,
    /// The video tokenizer whose decoder turns tokens into clips, if wanted.
    pub larp: Option<LarpRequest<'a>>,
}

/// A LARP tokenizer checkpoint (its encoder and prior model are ignored) and its
/// constructor arguments.
pub struct LarpRequest<'a> {
    pub source: &'a dyn TensorSource,
    pub config: LarpConfig,
}

/// A VQ tokenizer checkpoint (its encoder is ignored) and its configuration.
pub struct VqRequest<'a> {
    pub source: &'a dyn TensorSource,
    pub config: VqConfig,
}

/// Checks that `source` holds every tensor of `expected` with its shape; lists every missing
/// or misshapen tensor at once (a dtype that cannot be read is reported when the tensor is).
fn check_parameters(
    source: &dyn TensorSource,
    expected: &[(String, Vec<usize>)],
) -> Result<(), ExportError> {
    let mut problems = Vec::new();
    for (name, expected) in expected {
        match source.shape(name) {
            None => problems.push(format!(
                "missing tensor {name} (expected shape {expected:?})"
            )),
            Some(shape) if &shape != expected => problems.push(format!(
                "tensor {name} has shape {shape:?}, expected {expected:?}"
            )),
            Some(_) => {}
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(ExportError::Parameters {
            origin: source.origin(),
            problems,
        })
    }
}

struct Params<'a>(&'a dyn TensorSource);

impl ParamSource for Params<'_> {
    fn read_f32(&self, name: &str) -> Result<Vec<f32>, GraphError> {
        self.0
            .read_f32(name)
            .map_err(|e| GraphError::Param(e.to_string()))
    }
}

/// Writes the model directory; returns its manifest.
pub fn export(request: &ExportRequest) -> Result<Manifest, ExportError> {
    request.config.validate()?;
    let grid = match (&request.config, request.grid) {
        (ModelConfig::Image(_), Some(n)) => vec![n, n],
        (ModelConfig::Image(args), None) => {
            let n = args.default_grid().ok_or_else(|| {
                ExportError::Usage(format!(
                    "block_size {} is not a square grid; pass --grid N",
                    args.block_size
                ))
            })?;
            vec![n, n]
        }
        (ModelConfig::Video(_), Some(_)) => {
            return Err(ExportError::Usage(
                "a video model's grid is its latent_shape (set it in --config), not --grid".into(),
            ))
        }
        (ModelConfig::Video(args), None) => args.latent_shape.clone(),
    };
    let spec =
        NarSpec::new(request.config.clone(), grid, request.dtype)?.with_layout(request.layout);
    check_parameters(request.source, &spec.config.parameters())?;
    let vocab_size = spec.config.transformer().vocab_size;
    if let Some(vq) = &request.vq {
        vq.config.validate()?;
        if matches!(spec.config, ModelConfig::Video(_)) {
            return Err(ExportError::Usage(
                "the VQ decoder makes pictures; a video model needs the LARP decoder".into(),
            ));
        }
        if vq.config.codebook_size != vocab_size {
            return Err(ExportError::Usage(format!(
                "the VQ codebook has {} entries but the model's vocabulary is {vocab_size}: \
                 they must be the same tokenizer",
                vq.config.codebook_size
            )));
        }
        check_parameters(vq.source, &vq.config.parameters())?;
    }
    if let Some(larp) = &request.larp {
        larp.config.validate()?;
        if !matches!(spec.config, ModelConfig::Video(_)) {
            return Err(ExportError::Usage(
                "the LARP decoder makes video clips; an image model needs a VQ decoder".into(),
            ));
        }
        if larp.config.latent_tokens() != spec.cells() {
            return Err(ExportError::Usage(format!(
                "the LARP config has {} latent tokens (bottleneck_token_num) but the model's \
                 grid {:?} has {}: they must be the same tokenizer",
                larp.config.latent_tokens(),
                spec.grid,
                spec.cells()
            )));
        }
        if larp.config.codebook_size() != vocab_size {
            return Err(ExportError::Usage(format!(
                "the LARP codebook has {} entries but the model's vocabulary is {vocab_size}: \
                 they must be the same tokenizer",
                larp.config.codebook_size()
            )));
        }
        check_parameters(larp.source, &larp.config.parameters())?;
    }
    let staging = Staging::new(&request.output, request.force)?;
    let manifest = write_model(&spec, request, staging.path())?;
    staging.commit()?;
    Ok(manifest)
}

fn write_model(
    spec: &NarSpec,
    request: &ExportRequest,
    dir: &Path,
) -> Result<Manifest, ExportError> {
    let mut store = WeightStore::external(dir, WEIGHTS_FILE)?;
    let graphs = nar::build(spec, &Params(request.source), &mut store)?;
    let vq = request.vq.as_ref();
    let decoder = vq
        .map(|vq| vq::build_decoder(&vq.config, &Params(vq.source), &mut store))
        .transpose()?;
    let larp = request.larp.as_ref();
    let larp_decoder = larp
        .map(|larp| larp::build_decoder(&larp.config, &Params(larp.source), &mut store))
        .transpose()?;
    let head_outputs: Vec<&str> = spec.config.heads().iter().map(|h| h.output).collect();
    let shape = spec.config.transformer();
    let selection = select::build(&head_outputs, shape.vocab_size, &mut store)?;
    let weight_bytes = store.finish()?;
    let prefill = write_graph(dir, PREFILL_FILE, &graphs.prefill)?;
    let step = write_graph(dir, STEP_FILE, &graphs.step)?;
    let mut manifest = Manifest::for_export(spec, prefill, step, weight_bytes)?;
    manifest.graphs.select = Some(write_graph(dir, SELECT_FILE, &selection)?);
    if let (Some(vq), Some(decoder)) = (vq, decoder) {
        manifest.vq_decoder = Some(DecoderFile {
            graph: write_graph(dir, DECODER_FILE, &decoder)?,
            config: vq.config.clone(),
            patch: vq.config.upsample_factor(),
        });
    }
    if let (Some(larp), Some(decoder)) = (larp, larp_decoder) {
        manifest.larp_decoder = Some(LarpDecoderFile {
            graph: write_graph(dir, LARP_DECODER_FILE, &decoder)?,
            config: larp.config.clone(),
        });
    }
    manifest.save(dir)?;
    Ok(manifest)
}

fn write_graph(
    dir: &Path,
    file: &str,
    model: &narx_graphs::onnx::ModelProto,
) -> Result<GraphFile, ExportError> {
    let bytes = encode_model(model);
    let path = dir.join(file);
    std::fs::write(&path, &bytes).map_err(|e| GraphError::io(&path, e))?;
    Ok(GraphFile::describe(file, bytes.len() as u64, model)?)
}

/// A temporary sibling directory that becomes the output on `commit` and is removed otherwise.
pub struct Staging {
    temp: PathBuf,
    /// Where a replaced output is moved while the new one is renamed into place.
    old: PathBuf,
    output: PathBuf,
    committed: bool,
}

impl Staging {
    /// Refuses an existing `output` unless it is a model directory and `force` is set.
    pub fn new(output: &Path, force: bool) -> Result<Self, ExportError> {
        let out_err = |message: String| ExportError::Output {
            path: output.display().to_string(),
            message,
        };
        if output.exists() {
            let is_model = Manifest::path(output).is_file();
            if !force || !is_model {
                return Err(out_err(if is_model {
                    "already exists (pass --force to replace it)".into()
                } else {
                    "already exists and is not a narx model directory; choose another path".into()
                }));
            }
        }
        let name = output
            .file_name()
            .ok_or_else(|| out_err("is not a directory name".into()))?
            .to_string_lossy()
            .to_string();
        let parent = match output.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if !parent.is_dir() {
            return Err(out_err(format!(
                "parent directory {} does not exist",
                parent.display()
            )));
        }
        let temp = parent.join(format!(".{name}.narx-partial-{}", std::process::id()));
        std::fs::create_dir(&temp).map_err(|source| ExportError::Io {
            path: temp.display().to_string(),
            source,
        })?;
        Ok(Staging {
            temp,
            old: parent.join(format!(".{name}.narx-old-{}", std::process::id())),
            output: output.to_path_buf(),
            committed: false,
        })
    }

    pub fn path(&self) -> &Path {
        &self.temp
    }

    /// Renames the staging directory into place. A replaced output is moved aside first and
    /// put back if the new one cannot take its place; once the new one is in place, failing
    /// to delete the old one is only a warning.
    pub fn commit(mut self) -> Result<(), ExportError> {
        let io = |path: &Path, source: std::io::Error| ExportError::Io {
            path: path.display().to_string(),
            source,
        };
        if !self.output.exists() {
            std::fs::rename(&self.temp, &self.output).map_err(|e| io(&self.output, e))?;
            self.committed = true;
            return Ok(());
        }
        std::fs::rename(&self.output, &self.old).map_err(|e| io(&self.output, e))?;
        if let Err(e) = std::fs::rename(&self.temp, &self.output) {
            return Err(match std::fs::rename(&self.old, &self.output) {
                Ok(()) => io(&self.output, e),
                Err(back) => ExportError::Io {
                    path: self.output.display().to_string(),
                    source: std::io::Error::new(
                        e.kind(),
                        format!(
                            "{e}; the model it replaced is left at {} ({back})",
                            self.old.display()
                        ),
                    ),
                },
            });
        }
        self.committed = true;
        if let Err(e) = std::fs::remove_dir_all(&self.old) {
            eprintln!(
                "narx: warning: {} was written, but the model it replaced is left at {}: {e}",
                self.output.display(),
                self.old.display()
            );
        }
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            // Best effort: the export already failed with a better error than this could give.
            let _ = std::fs::remove_dir_all(&self.temp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory with a manifest file (all `Staging` looks at) holding `text`.
    fn model_like(dir: &Path, text: &str) {
        std::fs::create_dir(dir).unwrap();
        std::fs::write(Manifest::path(dir), text).unwrap();
    }

    fn staged(output: &Path, force: bool, text: &str) -> Result<Staging, ExportError> {
        let staging = Staging::new(output, force)?;
        std::fs::write(Manifest::path(staging.path()), text).unwrap();
        Ok(staging)
    }

    fn siblings(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn force_replaces_a_model_directory_and_nothing_else() {
        let temp = tempfile::tempdir().unwrap();
        let output = temp.path().join("model");
        staged(&output, false, "new").unwrap().commit().unwrap();
        assert_eq!(
            std::fs::read_to_string(Manifest::path(&output)).unwrap(),
            "new"
        );

        let err = staged(&output, false, "newer").err().unwrap();
        assert!(err.is_bad_input());
        assert!(err.to_string().contains("pass --force"), "{err}");
        staged(&output, true, "newer").unwrap().commit().unwrap();
        assert_eq!(
            std::fs::read_to_string(Manifest::path(&output)).unwrap(),
            "newer"
        );
        assert_eq!(siblings(temp.path()), ["model"]);

        let other = temp.path().join("photos");
        std::fs::create_dir(&other).unwrap();
        std::fs::write(other.join("cat.png"), "meow").unwrap();
        let err = staged(&other, true, "new").err().unwrap();
        assert!(err.is_bad_input());
        assert!(
            err.to_string().contains("not a narx model directory"),
            "{err}"
        );
        assert_eq!(siblings(&other), ["cat.png"]);
        assert_eq!(siblings(temp.path()), ["model", "photos"]);
    }

    #[test]
    fn a_failed_replacement_puts_the_old_model_back() {
        let temp = tempfile::tempdir().unwrap();
        let output = temp.path().join("model");
        model_like(&output, "old");
        let staging = staged(&output, true, "new").unwrap();
        // The new directory vanishes before it can be renamed into place.
        std::fs::remove_dir_all(staging.path()).unwrap();
        let err = staging.commit().err().unwrap();
        assert!(!err.is_bad_input(), "{err}");
        assert_eq!(
            std::fs::read_to_string(Manifest::path(&output)).unwrap(),
            "old"
        );
        assert_eq!(siblings(temp.path()), ["model"]);
    }
}
