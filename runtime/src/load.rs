//! Opening a model directory on a chosen backend.

use std::path::{Path, PathBuf};

use narx_graphs::manifest::{CacheLayout, Condition, Manifest};

use crate::backend::ort::{
    find_library, init, library_was_named, provider_available, OrtEngine, OrtOptions,
};
use crate::backend::providers::{
    CudaOptions, ExecutionProvider, ProfileShapes, TensorRtInt8, TensorRtOptions,
};
use crate::backend::tract::TractEngine;
use crate::backend::GraphKind;
use crate::decode::Decoded;
use crate::generate::{
    natural_order, CallReport, GenerateOptions, Generation, Generator, OutputObserver, Prompts,
};
use crate::scheduler::{Order, WavefrontPlan};
use crate::RuntimeError;

/// Which backend runs the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Provider {
    /// The best that starts: ONNX Runtime's TensorRT, then CUDA, then CPU provider, then
    /// tract when no ONNX Runtime is found.
    Auto,
    /// tract, embedded.
    Tract,
    /// ONNX Runtime's CPU provider.
    Cpu,
    /// ONNX Runtime's CUDA provider.
    Cuda,
    /// ONNX Runtime's TensorRT provider (with CUDA for what TensorRT does not take).
    TensorRt,
}

/// GPU settings from the command line; what is unset comes from the manifest (its
/// [`narx_graphs::manifest::TensorRtSettings`] and `cuda_graph`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GpuOptions {
    pub device_id: u32,
    pub fp16: Option<bool>,
    pub bf16: Option<bool>,
    pub workspace_bytes: Option<u64>,
    pub builder_optimization_level: Option<u8>,
    /// Engine and timing caches here instead of the manifest's folders.
    pub cache_dir: Option<PathBuf>,
    /// No engine or timing cache.
    pub no_cache: bool,
    /// TensorRT INT8, with where its ranges come from.
    pub int8: Option<TensorRtInt8>,
    /// Replay the step as CUDA graphs (a static export's default).
    pub cuda_graph: Option<bool>,
}

impl GpuOptions {
    /// Whether the step replays as CUDA graphs on the CUDA provider: as asked, else as the
    /// manifest says. Asking for it of a model whose shapes change from call to call is an error.
    pub fn cuda_graph(&self, manifest: &Manifest) -> Result<bool, RuntimeError> {
        match self.cuda_graph {
            Some(true) if manifest.kv_cache.layout != CacheLayout::Static => {
                Err(RuntimeError::BadInput(
                    "CUDA graphs need shapes that stay the same from call to call: export the \
                     model with `narx export --static`"
                        .into(),
                ))
            }
            Some(asked) => Ok(asked),
            None => Ok(manifest.cuda_graph),
        }
    }

    /// The CUDA options for the model.
    pub fn cuda(&self, manifest: &Manifest) -> Result<CudaOptions, RuntimeError> {
        Ok(CudaOptions {
            device_id: self.device_id,
            cuda_graph: self.cuda_graph(manifest)?,
        })
    }

    /// The TensorRT options for the model in `dir`: the manifest's settings, overridden.
    pub fn tensorrt(
        &self,
        manifest: &Manifest,
        dir: &Path,
    ) -> Result<TensorRtOptions, RuntimeError> {
        let settings = &manifest.tensorrt;
        let cache = |folder: &Option<String>| match (&self.cache_dir, folder) {
            _ if self.no_cache => None,
            (Some(dir), _) => Some(dir.clone()),
            (None, folder) => folder.as_ref().map(|f| dir.join(f)),
        };
        let options = TensorRtOptions {
            device_id: self.device_id,
            fp16: self.fp16.unwrap_or(settings.fp16),
            bf16: self.bf16.unwrap_or(settings.bf16),
            workspace_bytes: self.workspace_bytes.or(settings.workspace_bytes),
            builder_optimization_level: self
                .builder_optimization_level
                .unwrap_or(settings.builder_optimization_level),
            engine_cache: cache(&settings.engine_cache),
            timing_cache: cache(&settings.timing_cache),
            int8: self.int8.clone(),
            ep_context: cache(&settings.engine_cache),
        };
        options.validate()?;
        let files: Vec<PathBuf> = manifest.files().iter().map(|f| dir.join(f)).collect();
        Ok(options.keyed_by(&files))
    }
}

/// What the model is opened for: which graphs to load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    /// Prefill and step, and the decoder if the directory has one.
    Generate,
    /// The decoder only.
    Decode,
}

#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    pub ort: OrtOptions,
    /// Threads for tract's matmuls and ONNX Runtime's intra-op pool.
    pub threads: Option<usize>,
    /// Generation order; `None` is the model's own (NAR's, or raster for LlamaGen).
    pub order: Option<Order>,
    pub gpu: GpuOptions,
    /// Run assembly, guidance and top-k in the selection graph, where the logits are, so
    /// that a call returns kilobytes; `None`: on CUDA and TensorRT only (on the CPU the host
    /// does the same work without the extra session).
    pub select_on_device: Option<bool>,
}

/// Which of a directory's graphs a backend loads for generation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GraphChoice {
    /// A class-conditional model whose step graph embeds classes runs its prefill as a step
    /// over an empty cache ([`Generator`] does this when the engine has no prefill graph):
    /// one graph then holds the weights instead of two, which halves the resident memory.
    /// (TensorRT and the static layout keep the prefill graph.)
    pub step_runs_prefill: bool,
    /// Load the selection graph ([`LoadOptions::select_on_device`]).
    pub select: bool,
}

/// The graph files to load for `purpose`.
pub fn graph_files(
    dir: &Path,
    manifest: &Manifest,
    purpose: Purpose,
    choice: GraphChoice,
) -> Vec<(GraphKind, PathBuf)> {
    let decoder = manifest.decoder_graph().map(|graph| &graph.file);
    // A static step's cache starts at full capacity, which the prefill graph provides.
    let prefill = match manifest.condition {
        Condition::Class {
            class_token_offset: Some(_),
            ..
        } if choice.step_runs_prefill && manifest.kv_cache.layout == CacheLayout::Append => None,
        _ => Some(&manifest.graphs.prefill.file),
    };
    let select = manifest
        .graphs
        .select
        .as_ref()
        .filter(|_| choice.select)
        .map(|graph| &graph.file);
    let files = match purpose {
        Purpose::Generate => vec![
            (GraphKind::Prefill, prefill),
            (GraphKind::Step, Some(&manifest.graphs.step.file)),
            (GraphKind::Select, select),
            (GraphKind::Decoder, decoder),
        ],
        Purpose::Decode => vec![(GraphKind::Decoder, decoder)],
    };
    files
        .into_iter()
        .filter_map(|(kind, file)| file.map(|f| (kind, dir.join(f))))
        .collect()
}

/// Whether to select on the device: as asked, else on a GPU; asking for it of a directory
/// without the selection graph is an error.
fn wants_select(manifest: &Manifest, asked: Option<bool>, gpu: bool) -> Result<bool, RuntimeError> {
    let available = manifest.graphs.select.is_some();
    match asked {
        Some(true) if !available => Err(RuntimeError::BadInput(
            "this model directory has no selection graph (re-export it with this narx)".into(),
        )),
        Some(asked) => Ok(asked),
        None => Ok(gpu && available),
    }
}

/// The outputs an ONNX Runtime engine leaves on the provider's device: the KV cache, which
/// only feeds the next call, and with selection on the device the head logits, which only
/// feed the selection graph.
pub fn resident_outputs(manifest: &Manifest, select: bool) -> Vec<String> {
    let cache = manifest
        .kv_cache
        .carried()
        .into_iter()
        .map(|(present, _)| present);
    let heads = manifest
        .heads
        .iter()
        .filter(|_| select)
        .map(|head| head.output.clone());
    cache.chain(heads).collect()
}

fn as_paths(files: &[(GraphKind, PathBuf)]) -> Vec<(GraphKind, &Path)> {
    files.iter().map(|(k, p)| (*k, p.as_path())).collect()
}

/// The same call on whichever generator an [`AnyGenerator`] holds.
macro_rules! on_either {
    ($generator:expr, $g:ident => $call:expr) => {
        match $generator {
            AnyGenerator::Tract($g) => $call,
            AnyGenerator::Ort($g) => $call,
        }
    };
}

/// A generator on whichever backend was chosen.
pub enum AnyGenerator {
    Tract(Generator<TractEngine>),
    Ort(Generator<OrtEngine>),
}

impl AnyGenerator {
    /// Loads `dir` on `provider`. For `Auto`, the second value says why the backend was
    /// chosen, for the user.
    pub fn open(
        dir: &Path,
        provider: Provider,
        options: &LoadOptions,
        purpose: Purpose,
    ) -> Result<(Self, Option<String>), RuntimeError> {
        let manifest = Manifest::load(dir)?;
        if purpose == Purpose::Decode && manifest.decoder_graph().is_none() {
            return Err(RuntimeError::BadInput(format!(
                "{} has no decoder (export with --vq-checkpoint or --larp-checkpoint)",
                dir.display()
            )));
        }
        let mut ort = options.ort.clone();
        if ort.intra_threads.is_none() {
            ort.intra_threads = options.threads;
        }
        ort.profiles = [(GraphKind::Prefill, "prefill"), (GraphKind::Step, "step")]
            .into_iter()
            .filter_map(|(kind, name)| {
                let profile = ProfileShapes::from_manifest(manifest.tensorrt_profiles.get(name)?)?;
                Some((kind, profile))
            })
            .collect();
        let cuda = ExecutionProvider::Cuda(options.gpu.cuda(&manifest)?);
        let tensorrt = ExecutionProvider::TensorRt(options.gpu.tensorrt(&manifest, dir)?);
        if options.gpu.cuda_graph == Some(true) && provider != Provider::Cuda {
            return Err(RuntimeError::BadInput(
                "CUDA graphs are for --provider cuda: the step alternates between two \
                 captured graphs, and ONNX Runtime's TensorRT provider keeps only one"
                    .into(),
            ));
        }
        // The candidates in order of preference; `auto` takes the first that starts.
        let tract_instead = |e: RuntimeError| (vec![None], Some(format!("using tract ({e})")));
        let (candidates, mut note) = match provider {
            Provider::Tract => (vec![None], None),
            Provider::Cpu => (vec![Some(ExecutionProvider::Cpu)], None),
            Provider::Cuda => (vec![Some(cuda)], None),
            Provider::TensorRt => (vec![Some(tensorrt)], None),
            Provider::Auto => match find_library(ort.library.as_deref()) {
                Ok(path) => match init(&path) {
                    Ok(()) => {
                        let mut candidates = Vec::new();
                        for gpu in [tensorrt, cuda] {
                            // A library that cannot list its providers has none to offer.
                            if provider_available(&gpu).unwrap_or(false) {
                                candidates.push(Some(gpu));
                            }
                        }
                        candidates.push(Some(ExecutionProvider::Cpu));
                        (
                            candidates,
                            Some(format!("ONNX Runtime at {}", path.display())),
                        )
                    }
                    // A library the user named that does not load is their mistake to hear
                    // about; one narx found (too old, a broken install) is passed over.
                    Err(e) if library_was_named(ort.library.as_deref()) => return Err(e),
                    Err(e) => tract_instead(e),
                },
                Err(e) => tract_instead(e),
            },
        };
        let order = options.order.unwrap_or_else(|| natural_order(&manifest));
        let last = candidates.len() - 1;
        for (i, candidate) in candidates.into_iter().enumerate() {
            let Some(execution_provider) = candidate else {
                let choice = GraphChoice {
                    step_runs_prefill: true,
                    select: wants_select(&manifest, options.select_on_device, false)?,
                };
                let files = graph_files(dir, &manifest, purpose, choice);
                let engine = TractEngine::load(&as_paths(&files), options.threads)?;
                let generator = Generator::with_order(manifest, engine, order)?;
                return Ok((AnyGenerator::Tract(generator), note));
            };
            let name = execution_provider.to_string();
            // TensorRT's profiles start the cache at the condition positions, so its
            // engines keep the prefill graph.
            let gpu = !matches!(execution_provider, ExecutionProvider::Cpu);
            let choice = GraphChoice {
                step_runs_prefill: !matches!(execution_provider, ExecutionProvider::TensorRt(_)),
                select: wants_select(&manifest, options.select_on_device, gpu)?,
            };
            let files = graph_files(dir, &manifest, purpose, choice);
            ort.resident_outputs = resident_outputs(&manifest, choice.select);
            // The cache of one call is the input of the next at the same address.
            ort.fixed_step_buffers = execution_provider
                .cuda_graph()
                .then(|| manifest.kv_cache.carried());
            ort.provider = execution_provider;
            match OrtEngine::load(&as_paths(&files), &ort) {
                Ok(engine) => {
                    let generator = Generator::with_order(manifest, engine, order)?;
                    let note = note.map(|n| format!("using the {name} provider of {n}"));
                    return Ok((AnyGenerator::Ort(generator), note));
                }
                // `auto` says why it moved on; an explicit provider fails.
                Err(RuntimeError::Provider(why)) if i < last => {
                    note = note.map(|n| format!("{n} (not {name}: {why})"));
                }
                Err(e) => return Err(e),
            }
        }
        unreachable!("the last candidate returns")
    }

    pub fn manifest(&self) -> &Manifest {
        on_either!(self, g => g.manifest())
    }

    pub fn engine_name(&self) -> String {
        on_either!(self, g => g.engine_name())
    }

    /// Decodes token grids into pictures or clips with the model's decoder.
    pub fn decode(&mut self, tokens: &[Vec<u32>], grid: &[usize]) -> Result<Decoded, RuntimeError> {
        on_either!(self, g => g.decode(tokens, grid))
    }

    pub fn order(&self) -> Order {
        on_either!(self, g => g.order())
    }

    pub fn plan(&self) -> &WavefrontPlan {
        on_either!(self, g => g.plan())
    }

    /// See [`Generator::head_rows`].
    pub fn head_rows(&self, prompts: usize, options: &GenerateOptions) -> usize {
        on_either!(self, g => g.head_rows(prompts, options))
    }

    pub fn calls(&self) -> usize {
        self.plan().calls().len()
    }

    pub fn generate(
        &mut self,
        prompts: &Prompts,
        options: &GenerateOptions,
        report: &mut dyn FnMut(&CallReport),
    ) -> Result<Generation, RuntimeError> {
        on_either!(self, g => g.generate(prompts, options, report))
    }

    /// See [`Generator::generate_forced`].
    pub fn generate_forced(
        &mut self,
        prompts: &Prompts,
        options: &GenerateOptions,
        forced: &[Vec<u32>],
        report: &mut dyn FnMut(&CallReport),
    ) -> Result<Generation, RuntimeError> {
        on_either!(self, g => g.generate_forced(prompts, options, forced, report))
    }

    /// See [`Generator::generate_observing`].
    pub fn generate_observing(
        &mut self,
        prompts: &Prompts,
        options: &GenerateOptions,
        report: &mut dyn FnMut(&CallReport),
        observe: &mut OutputObserver<'_>,
    ) -> Result<Generation, RuntimeError> {
        on_either!(self, g => g.generate_observing(prompts, options, report, observe))
    }
}
