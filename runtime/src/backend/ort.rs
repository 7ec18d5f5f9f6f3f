//! ONNX Runtime backend: the CPU, CUDA and TensorRT execution providers.
//!
//! The ONNX Runtime shared library is not linked at build time: it is found at run time
//! ([`find_library`]) and loaded once per process ([`init`]), so one narx binary works with the
//! ONNX Runtime a machine already has (a Python wheel, a JetPack install, a tarball) as long as it
//! is 1.17 or newer (the `api-17` feature of `ort`).
//!
//! Tensors stay ONNX Runtime values ([`DynValue`]) between calls: the outputs of one
//! [`Engine::run`] are owned values that can be fed straight back as inputs of the next.

mod fixed;

use std::collections::{HashMap, HashSet};
use std::env;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use narx_graphs::DType;
use ort::environment::Environment;
use ort::ep::{self, ArbitrarilyConfigurableExecutionProvider, ExecutionProvider as _};
use ort::memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType};
use ort::session::builder::{GraphOptimizationLevel, PrepackedWeights, SessionBuilder};
use ort::session::{Session, SessionOutputs};
use ort::value::{DynTensor, DynTensorValueType, DynValue, Tensor, TensorElementType, ValueType};

use super::providers::{CudaOptions, ExecutionProvider, ProfileShapes, TensorRtOptions};
use super::{Engine, GraphKind, GraphPaths, HostTensor};
use crate::RuntimeError;
use fixed::FixedStep;

/// Backend name used in error messages.
const BACKEND: &str = "onnxruntime";

/// How to load ONNX Runtime.
#[derive(Clone, Debug)]
pub struct OrtOptions {
    /// The shared library (`--ort-lib`); `None` searches for it (see [`find_library`]).
    pub library: Option<PathBuf>,
    /// Intra-op threads per session; `None` lets ONNX Runtime decide (one per physical core).
    pub intra_threads: Option<usize>,
    pub provider: ExecutionProvider,
    /// TensorRT optimisation profiles per graph (from the manifest).
    pub profiles: Vec<(GraphKind, ProfileShapes)>,
    /// Outputs that only feed the next call (the KV cache): bound to the provider's device
    /// and left there, so under CUDA and TensorRT the cache never crosses to the host.
    pub resident_outputs: Vec<String>,
    /// Run the step graph on buffers allocated once, at the same addresses call after call,
    /// as CUDA graphs need (the `fixed` module): every output on the provider's device. The
    /// pairs are (output, input): the step output that feeds each input at the next call
    /// (`present.0.key` → `past.0.key`). `None`: outputs are allocated per call.
    pub fixed_step_buffers: Option<Vec<(String, String)>>,
}

impl Default for OrtOptions {
    fn default() -> Self {
        OrtOptions {
            library: None,
            intra_threads: None,
            provider: ExecutionProvider::Cpu,
            profiles: Vec::new(),
            resident_outputs: Vec::new(),
            fixed_step_buffers: None,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Finding the library
// ---------------------------------------------------------------------------------------------

/// Finds the ONNX Runtime shared library.
///
/// Order: `explicit` (`--ort-lib`), then the `ORT_DYLIB_PATH` environment variable, then the
/// usual places: each folder of `LD_LIBRARY_PATH`, `/usr/local/lib`, `/usr/lib`,
/// `/usr/lib/{x86_64,aarch64}-linux-gnu`, and the `onnxruntime/capi/` folder of Python wheels
/// (an active `$VIRTUAL_ENV` or `$CONDA_PREFIX` first, then the newest library among the user,
/// system and pyenv site-packages). `explicit` and `ORT_DYLIB_PATH` may name the library or a
/// folder holding it; if what they name is missing that is an error, not a reason to look
/// elsewhere, so a typo never silently loads another library.
pub fn find_library(explicit: Option<&Path>) -> Result<PathBuf, RuntimeError> {
    if let Some((path, source)) = named_library(explicit) {
        return given_library(&path, source);
    }
    for dir in system_dirs() {
        if let Some(found) = library_in_dir(&dir) {
            return Ok(found);
        }
    }
    for dir in active_env_wheel_dirs() {
        if let Some(found) = library_in_dir(&dir) {
            return Ok(found);
        }
    }
    // Several Pythons may each have a wheel: the newest ONNX Runtime is the likeliest to load.
    let newest = python_wheel_dirs()
        .iter()
        .filter_map(|dir| library_in_dir(dir))
        .max_by(|a, b| library_version(a).cmp(&library_version(b)));
    if let Some(found) = newest {
        return Ok(found);
    }
    Err(RuntimeError::OrtLibrary(not_found_message()))
}

/// The library the user named, and where (`--ort-lib`, else `ORT_DYLIB_PATH`), if any.
fn named_library(explicit: Option<&Path>) -> Option<(PathBuf, &'static str)> {
    if let Some(path) = explicit {
        return Some((path.to_path_buf(), "--ort-lib"));
    }
    env::var_os("ORT_DYLIB_PATH")
        .filter(|v| !v.is_empty())
        .map(|value| (PathBuf::from(value), "ORT_DYLIB_PATH"))
}

/// Whether the user named a library ([`find_library`]'s first two places) rather than narx
/// finding one: a named library must load, a found one may be passed over.
pub fn library_was_named(explicit: Option<&Path>) -> bool {
    named_library(explicit).is_some()
}

/// A library path given by the user (flag or environment): it must exist.
fn given_library(path: &Path, source: &str) -> Result<PathBuf, RuntimeError> {
    if path.is_dir() {
        return library_in_dir(path).ok_or_else(|| {
            RuntimeError::OrtLibrary(format!(
                "{source} {}: folder holds no ONNX Runtime library ({})",
                path.display(),
                LIBRARY_NAMES
            ))
        });
    }
    if path.is_file() {
        return Ok(path.to_path_buf());
    }
    Err(RuntimeError::OrtLibrary(format!(
        "{source} {}: no such file",
        path.display()
    )))
}

/// The file names an ONNX Runtime library has, for messages.
const LIBRARY_NAMES: &str =
    "libonnxruntime.so, libonnxruntime.so.<version>, libonnxruntime.dylib, onnxruntime.dll";

/// The library in `dir`, if any: the highest `libonnxruntime.so.<version>`, else an
/// unversioned name.
fn library_in_dir(dir: &Path) -> Option<PathBuf> {
    let entries = std::fs::read_dir(dir).ok()?;
    let mut best: Option<(Vec<u64>, PathBuf)> = None;
    let mut unversioned = None;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let path = entry.path();
        if !path.is_file() {
            continue;
        }
        if matches!(
            name,
            "libonnxruntime.so" | "libonnxruntime.dylib" | "onnxruntime.dll"
        ) {
            unversioned.get_or_insert(path);
        } else if let Some(version) = name
            .strip_prefix("libonnxruntime.so.")
            .and_then(parse_version)
        {
            if best.as_ref().is_none_or(|(v, _)| version > *v) {
                best = Some((version, path));
            }
        }
    }
    best.map(|(_, path)| path).or(unversioned)
}

/// The version the ONNX Runtime library at `library` reports
/// (`OrtGetApiBase()->GetVersionString()`): `[1, 18, 0]`.
pub fn runtime_version(library: &Path) -> Result<Vec<u64>, RuntimeError> {
    let fail = |why: String| RuntimeError::OrtLibrary(format!("{}: {why}", library.display()));
    // SAFETY: every ONNX Runtime exports `OrtGetApiBase` with this signature, and the version
    // string it hands out is static. Opening the library again only takes another reference
    // to the copy `init` loaded.
    let text = unsafe {
        let lib = libloading::Library::new(library).map_err(|e| fail(e.to_string()))?;
        let get_base: libloading::Symbol<unsafe extern "C" fn() -> *const ort::sys::OrtApiBase> =
            lib.get(b"OrtGetApiBase")
                .map_err(|e| fail(format!("not ONNX Runtime: {e}")))?;
        let base = get_base();
        if base.is_null() {
            return Err(fail("OrtGetApiBase returned nothing".into()));
        }
        std::ffi::CStr::from_ptr(((*base).GetVersionString)())
            .to_string_lossy()
            .into_owned()
    };
    // A build may add a suffix: `1.19.0-dev`.
    let numbers = text.split(['-', '+']).next().unwrap_or_default();
    parse_version(numbers).ok_or_else(|| fail(format!("unreadable version {text:?}")))
}

/// The first ONNX Runtime whose CUDA provider keeps one captured graph per `gpu_graph_id`
/// (older ones replay a single graph whatever the id, which would mix up the two sets of
/// step buffers).
const CUDA_GRAPH_VERSION: [u64; 2] = [1, 18];

/// Refuses CUDA graphs on an ONNX Runtime that cannot keep two of them.
fn check_cuda_graph_support(version: &[u64], library: &Path) -> Result<(), RuntimeError> {
    if version >= &CUDA_GRAPH_VERSION[..] {
        return Ok(());
    }
    let dotted = |v: &[u64]| v.iter().map(u64::to_string).collect::<Vec<_>>().join(".");
    Err(RuntimeError::Provider(format!(
        "CUDA graphs need ONNX Runtime {} or newer; the one at {} is {}. Pass \
         --no-cuda-graph, or use a newer ONNX Runtime",
        dotted(&CUDA_GRAPH_VERSION),
        library.display(),
        dotted(version)
    )))
}

/// `1.16.3` → `[1, 16, 3]`; `None` unless it is dot-separated numbers.
fn parse_version(text: &str) -> Option<Vec<u64>> {
    text.split('.').map(|part| part.parse().ok()).collect()
}

/// The version in a library's file name (empty when unversioned), to rank candidates.
fn library_version(path: &Path) -> Vec<u64> {
    path.file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("libonnxruntime.so."))
        .and_then(parse_version)
        .unwrap_or_default()
}

/// `LD_LIBRARY_PATH` and the system library folders, in search order.
fn system_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = env::var_os("LD_LIBRARY_PATH")
        .map(|v| {
            env::split_paths(&v)
                .filter(|p| !p.as_os_str().is_empty())
                .collect()
        })
        .unwrap_or_default();
    dirs.extend(
        [
            "/usr/local/lib",
            "/usr/lib",
            "/usr/lib/x86_64-linux-gnu",
            "/usr/lib/aarch64-linux-gnu",
        ]
        .map(PathBuf::from),
    );
    dirs
}

/// The `onnxruntime/capi` folders of an activated virtualenv or conda environment.
fn active_env_wheel_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    for var in ["VIRTUAL_ENV", "CONDA_PREFIX"] {
        if let Some(root) = env::var_os(var).filter(|v| !v.is_empty()) {
            for python in subdirs(&Path::new(&root).join("lib"), "python3") {
                dirs.push(capi(&python.join("site-packages")));
            }
        }
    }
    dirs
}

/// The `onnxruntime/capi` folders of the user's, the system's and pyenv's Pythons.
fn python_wheel_dirs() -> Vec<PathBuf> {
    let mut site = Vec::new();
    let home = env::var_os("HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from);
    if let Some(home) = &home {
        for python in subdirs(&home.join(".local/lib"), "python3") {
            site.push(python.join("site-packages"));
        }
    }
    for python in subdirs(Path::new("/usr/local/lib"), "python3") {
        site.push(python.join("site-packages"));
        site.push(python.join("dist-packages"));
    }
    // `python3*` covers the unversioned `/usr/lib/python3/dist-packages` of Debian too.
    for python in subdirs(Path::new("/usr/lib"), "python3") {
        site.push(python.join("dist-packages"));
        site.push(python.join("site-packages"));
    }
    let pyenv = env::var_os("PYENV_ROOT")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| home.as_ref().map(|h| h.join(".pyenv")));
    if let Some(pyenv) = pyenv {
        for version in subdirs(&pyenv.join("versions"), "") {
            for python in subdirs(&version.join("lib"), "python3") {
                site.push(python.join("site-packages"));
            }
        }
    }
    site.iter().map(|s| capi(s)).collect()
}

fn capi(site_packages: &Path) -> PathBuf {
    site_packages.join("onnxruntime").join("capi")
}

/// The folders in `dir` whose names start with `prefix`, sorted (a one-level glob).
fn subdirs(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.starts_with(prefix))
        })
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    found.sort();
    found
}

fn not_found_message() -> String {
    let ld = match env::var("LD_LIBRARY_PATH") {
        Ok(v) if !v.is_empty() => format!("LD_LIBRARY_PATH ({v})"),
        _ => "LD_LIBRARY_PATH (unset)".to_string(),
    };
    format!(
        "no ONNX Runtime shared library ({LIBRARY_NAMES}) found. Pass it with --ort-lib PATH or \
         set ORT_DYLIB_PATH. Searched: {ld}, /usr/local/lib, /usr/lib, \
         /usr/lib/x86_64-linux-gnu, /usr/lib/aarch64-linux-gnu, and onnxruntime/capi/ under \
         $VIRTUAL_ENV/lib/python3*/site-packages, $CONDA_PREFIX/lib/python3*/site-packages, \
         ~/.local/lib/python3*/site-packages, /usr/local/lib/python3*/{{site,dist}}-packages, \
         /usr/lib/python3*/dist-packages, ~/.pyenv/versions/*/lib/python3*/site-packages. \
         To get it: `pip install onnxruntime` puts it at \
         <site-packages>/onnxruntime/capi/libonnxruntime.so.<version> \
         (`pip install onnxruntime-gpu` for the CUDA/TensorRT build); ONNX Runtime 1.17 or \
         newer is needed"
    )
}

// ---------------------------------------------------------------------------------------------
// Loading it
// ---------------------------------------------------------------------------------------------

/// The library this process loaded and the one ONNX Runtime environment made from it. `ort`
/// allows one library and one environment per process (neither can be unloaded), so both are
/// kept here for the life of the process and shared by every [`OrtEngine`].
struct Loaded {
    library: PathBuf,
    environment: Option<Environment>,
}

static RUNTIME: Mutex<Option<Loaded>> = Mutex::new(None);

/// Loads the ONNX Runtime library at `library` into this process, once.
///
/// Calling it again with the same file (after resolving symlinks) reuses what is loaded; with a
/// different file it is an error, since a process cannot hold two ONNX Runtime libraries. A file
/// that is not ONNX Runtime, or one older than 1.17, gives [`RuntimeError::OrtLibrary`] and
/// leaves nothing loaded, so a later call may try another file.
pub fn init(library: &Path) -> Result<(), RuntimeError> {
    environment(library).map(|_| ())
}

fn environment(library: &Path) -> Result<Environment, RuntimeError> {
    // Absolute and symlink-free: ort resolves relative paths against the executable's folder,
    // and two spellings of one file must count as the same library.
    let library = std::fs::canonicalize(library)
        .map_err(|e| RuntimeError::OrtLibrary(format!("{}: {e}", library.display())))?;
    // A panic elsewhere while holding the lock leaves the state consistent: recover it.
    let mut guard = RUNTIME.lock().unwrap_or_else(|e| e.into_inner());
    match guard.as_mut() {
        Some(loaded) if loaded.library != library => Err(RuntimeError::OrtLibrary(format!(
            "ONNX Runtime is already loaded from {} in this process; cannot also load {}",
            loaded.library.display(),
            library.display()
        ))),
        Some(loaded) => match &loaded.environment {
            Some(environment) => Ok(environment.clone()),
            None => {
                let environment = build_environment(ort::init(), &library)?;
                loaded.environment = Some(environment.clone());
                Ok(environment)
            }
        },
        None => {
            let builder = ort::init_from(&library).map_err(load_error)?;
            // From here the library is in the process for good: record it even if the
            // environment fails, so a later call cannot silently load a second one.
            let loaded = guard.insert(Loaded {
                library: library.clone(),
                environment: None,
            });
            let environment = build_environment(builder, &library)?;
            loaded.environment = Some(environment.clone());
            Ok(environment)
        }
    }
}

/// ort's load error with its cause: for a failed `dlopen` ort prints only "dlopen failed"
/// and keeps the reason (not an ELF file, missing dependency, ...) in the source chain.
fn load_error(e: ort::LoadDynamicError) -> RuntimeError {
    let mut message = e.to_string();
    if let ort::LoadDynamicError::Dlopen { error, .. } = &e {
        let mut cause = std::error::Error::source(error);
        while let Some(c) = cause {
            message.push_str(&format!(": {c}"));
            cause = c.source();
        }
    }
    RuntimeError::OrtLibrary(message)
}

fn build_environment(
    builder: ort::environment::EnvironmentBuilder,
    library: &Path,
) -> Result<Environment, RuntimeError> {
    builder
        .with_name("narx")
        .with_telemetry(false)
        .build()
        .map_err(|e| {
            RuntimeError::OrtLibrary(format!(
                "{}: creating the ONNX Runtime environment: {e}",
                library.display()
            ))
        })
}

// ---------------------------------------------------------------------------------------------
// The engine
// ---------------------------------------------------------------------------------------------

/// A model's graphs as ONNX Runtime sessions on one execution provider.
pub struct OrtEngine {
    sessions: HashMap<GraphKind, Session>,
    provider: String,
    /// Where resident outputs go (the provider's device) and where the rest go (the host).
    device: MemoryInfo<'static>,
    host: MemoryInfo<'static>,
    resident_outputs: HashSet<String>,
    fixed_step: Option<Box<FixedStep>>,
}

impl OrtEngine {
    /// Finds and loads ONNX Runtime (see [`find_library`], [`init`]) and creates one session
    /// per graph. Sessions are created from the files, so ONNX Runtime resolves the external
    /// data (`weights.bin`) next to them and can memory-map it.
    ///
    /// A GPU provider that this ONNX Runtime does not have, or that cannot start (no GPU, a
    /// CUDA, cuDNN or TensorRT library missing), is an error naming what is missing
    /// ([`RuntimeError::Provider`]); narx never falls back to the CPU behind the user's back.
    pub fn load(paths: &GraphPaths, options: &OrtOptions) -> Result<Self, RuntimeError> {
        let library = find_library(options.library.as_deref())?;
        let environment = environment(&library)?;
        check_available(&options.provider, &library)?;
        if options.provider.cuda_graph() {
            check_cuda_graph_support(&runtime_version(&library)?, &library)?;
        }
        if let ExecutionProvider::TensorRt(trt) = &options.provider {
            create_cache_dirs(trt)?;
        }
        let factory = SessionFactory {
            environment: &environment,
            options,
            library: &library,
            prepacked: PrepackedWeights::new(),
        };
        let sessions = paths
            .iter()
            .map(|&(kind, path)| {
                let profile = options
                    .profiles
                    .iter()
                    .find(|(k, _)| *k == kind)
                    .map(|(_, p)| p);
                Ok((kind, factory.session(kind, path, profile)?))
            })
            .collect::<Result<_, RuntimeError>>()?;
        let memory = |device, id| {
            MemoryInfo::new(device, id, AllocatorType::Device, MemoryType::Default)
                .map_err(|e| RuntimeError::backend(BACKEND, format!("memory info: {e}")))
        };
        let device = match &options.provider {
            ExecutionProvider::Cpu => memory(AllocationDevice::CPU, 0)?,
            ExecutionProvider::Cuda(CudaOptions { device_id, .. })
            | ExecutionProvider::TensorRt(TensorRtOptions { device_id, .. }) => {
                let id = i32::try_from(*device_id).map_err(|_| {
                    RuntimeError::BadInput(format!("device id {device_id} is out of range"))
                })?;
                memory(AllocationDevice::CUDA, id)?
            }
        };
        Ok(OrtEngine {
            sessions,
            provider: options.provider.to_string(),
            device,
            host: memory(AllocationDevice::CPU, 0)?,
            resident_outputs: options.resident_outputs.iter().cloned().collect(),
            fixed_step: options
                .fixed_step_buffers
                .as_deref()
                .map(|carried| Box::new(FixedStep::new(carried))),
        })
    }

    /// With [`OrtOptions::fixed_step_buffers`], the bytes copied into the step's buffers so
    /// far: every call's host inputs, plus a cache that was not the previous call's output
    /// (the prefill's, once per generation). `None` without fixed buffers.
    pub fn staged_bytes(&self) -> Option<u64> {
        self.fixed_step.as_ref().map(|fixed| fixed.staged_bytes())
    }
}

/// Whether the loaded library was built with `provider`.
pub fn provider_available(provider: &ExecutionProvider) -> Result<bool, RuntimeError> {
    let available = match provider {
        ExecutionProvider::Cpu => Ok(true),
        ExecutionProvider::Cuda(_) => ep::CUDA::is_available(),
        ExecutionProvider::TensorRt(_) => ep::TensorRT::is_available(),
    };
    available.map_err(|e| RuntimeError::backend(BACKEND, format!("listing providers: {e}")))
}

fn check_available(provider: &ExecutionProvider, library: &Path) -> Result<(), RuntimeError> {
    if provider_available(provider)? {
        return Ok(());
    }
    Err(RuntimeError::Provider(format!(
        "the ONNX Runtime at {} has no {} (it is a build without it, e.g. the CPU-only \
         `onnxruntime` wheel). Point narx at a GPU build with --ort-lib or ORT_DYLIB_PATH: \
         `pip install onnxruntime-gpu` (<site-packages>/onnxruntime/capi/), or JetPack's \
         ONNX Runtime on a Jetson; {} also needs {}",
        library.display(),
        provider.ort_name(),
        provider,
        provider.needs()
    )))
}

/// Creates the TensorRT cache folders, so an unwritable model directory is reported here
/// rather than as a failed engine build.
fn create_cache_dirs(options: &TensorRtOptions) -> Result<(), RuntimeError> {
    for dir in options.engine_cache.iter().chain(&options.timing_cache) {
        std::fs::create_dir_all(dir).map_err(|e| {
            RuntimeError::BadInput(format!(
                "cannot create the TensorRT cache folder {} ({e}); pass --trt-cache DIR \
                 or --no-trt-cache",
                dir.display()
            ))
        })?;
    }
    Ok(())
}

/// Registers `provider` on a session builder; failure to start it is an error.
fn with_provider(
    builder: SessionBuilder,
    provider: &ExecutionProvider,
    profile: Option<&ProfileShapes>,
) -> ort::Result<SessionBuilder> {
    let dispatch = match provider {
        // Without ONNX Runtime's arena: the cache grows at every call, and the arena keeps
        // a block of every size it has seen (about 8% more peak memory at batch 8, no
        // measurable speed difference).
        ExecutionProvider::Cpu => vec![ep::CPU::default().with_arena_allocator(false).build()],
        ExecutionProvider::Cuda(options) => vec![cuda(options)],
        // Nodes TensorRT does not take run on CUDA, on the same device, not on the CPU.
        ExecutionProvider::TensorRt(options) => {
            let trt = options
                .provider_options(profile)
                .into_iter()
                .fold(ep::TensorRT::default(), |ep, (k, v)| {
                    ep.with_arbitrary_config(k, v)
                });
            let fallback = CudaOptions {
                device_id: options.device_id,
                cuda_graph: false,
            };
            vec![trt.build().error_on_failure(), cuda(&fallback)]
        }
    };
    Ok(builder.with_execution_providers(dispatch)?)
}

fn cuda(options: &CudaOptions) -> ep::ExecutionProviderDispatch {
    options
        .provider_options()
        .into_iter()
        .fold(ep::CUDA::default(), |ep, (k, v)| {
            ep.with_arbitrary_config(k, v)
        })
        .build()
        .error_on_failure()
}

/// Creates the sessions of one engine with shared settings.
struct SessionFactory<'a> {
    environment: &'a Environment,
    options: &'a OrtOptions,
    library: &'a Path,
    /// One container for every session of the engine: the prefill and step graphs use the
    /// same weights, and without it each session keeps its own prepacked copy of every
    /// MatMul weight (twice the weights in memory).
    prepacked: PrepackedWeights,
}

impl SessionFactory<'_> {
    fn session(
        &self,
        graph: GraphKind,
        path: &Path,
        profile: Option<&ProfileShapes>,
    ) -> Result<Session, RuntimeError> {
        let options = self.options;
        let fail = |what: &str, e: &dyn std::fmt::Display| {
            RuntimeError::backend(
                BACKEND,
                format!("{graph} graph {}: {what}: {e}", path.display()),
            )
        };
        let builder = Session::builder(self.environment)
            .map_err(|e| fail("creating session options", &e))?
            .with_optimization_level(GraphOptimizationLevel::All)
            .map_err(|e| fail("setting the optimisation level", &e))?
            .with_prepacked_weights(&self.prepacked)
            .map_err(|e| fail("sharing prepacked weights", &e))?
            // ONNX Runtime's workers spin for a while after each parallel section; after a
            // run that spinning would compete with the host's sampling on the same cores
            // (it doubled the sampling time on two cores). They spin within a run only.
            .with_config_entry("session.force_spinning_stop", "1")
            .map_err(|e| fail("stopping idle threads after each run", &e))?;
        let builder = match options.intra_threads {
            Some(n) => builder
                .with_intra_threads(n)
                .map_err(|e| fail("setting intra-op threads", &e))?,
            None => builder,
        };
        // Under TensorRT, an EP-context model from an earlier run loads the built engine
        // (and is not written again).
        let (path, provider) = match &options.provider {
            // The selection graph (a TopK over the vocabulary, integer gathers) is CUDA's.
            ExecutionProvider::TensorRt(trt) if graph == GraphKind::Select => (
                path.to_path_buf(),
                ExecutionProvider::Cuda(CudaOptions {
                    device_id: trt.device_id,
                    cuda_graph: false,
                }),
            ),
            ExecutionProvider::TensorRt(trt) => match trt.ep_context_model(path) {
                Some(context) => (
                    context,
                    ExecutionProvider::TensorRt(TensorRtOptions {
                        ep_context: None,
                        ..trt.clone()
                    }),
                ),
                None => (path.to_path_buf(), options.provider.clone()),
            },
            _ => (path.to_path_buf(), options.provider.clone()),
        };
        // Only the step runs on fixed buffers; the other graphs' inputs move.
        let provider = match graph {
            GraphKind::Step => provider,
            _ => provider.without_cuda_graph(),
        };
        let mut builder = with_provider(builder, &provider, profile).map_err(|e| {
            RuntimeError::Provider(format!(
                "the {} provider of the ONNX Runtime at {} could not start: {e}. It needs {}; \
                 check that the GPU is visible and those libraries are on LD_LIBRARY_PATH",
                options.provider,
                self.library.display(),
                options.provider.needs()
            ))
        })?;
        builder.commit_from_file(&path).map_err(|e| {
            // ONNX Runtime refuses to capture a graph some of whose nodes it placed elsewhere.
            let hint = if provider.cuda_graph() {
                " (with CUDA graphs on: --no-cuda-graph runs the step without them)"
            } else {
                ""
            };
            fail("loading", &format!("{e}{hint}"))
        })
    }
}

impl Engine for OrtEngine {
    type Value = DynValue;

    fn name(&self) -> String {
        format!("onnxruntime-{}", self.provider)
    }

    fn upload(&self, tensor: HostTensor) -> Result<DynValue, RuntimeError> {
        check_host_shape(&tensor)?;
        // `(shape, Vec)` hands the buffer to ONNX Runtime without a copy.
        let value = match tensor {
            HostTensor::F32(shape, data) => Tensor::from_array((shape, data)).map(|t| t.into_dyn()),
            HostTensor::I64(shape, data) => Tensor::from_array((shape, data)).map(|t| t.into_dyn()),
            HostTensor::Bool(shape, data) => {
                Tensor::from_array((shape, data)).map(|t| t.into_dyn())
            }
            HostTensor::Empty(dtype, shape) => {
                DynTensor::new(&Allocator::default(), element_type(dtype), shape)
                    .map(|t| t.into_dyn())
            }
        };
        value.map_err(|e| RuntimeError::backend(BACKEND, format!("creating a tensor: {e}")))
    }

    fn download_f32(&self, value: &DynValue) -> Result<(Vec<usize>, Vec<f32>), RuntimeError> {
        match value.dtype() {
            ValueType::Tensor {
                ty: TensorElementType::Float32,
                ..
            } => {}
            other => {
                return Err(RuntimeError::backend(
                    BACKEND,
                    format!("download: expected a float32 tensor, got {other}"),
                ))
            }
        }
        let fail = |e: ort::Error| RuntimeError::backend(BACKEND, format!("download: {e}"));
        // A resident output (the cache) on a GPU is copied over first.
        let on_host: DynValue;
        let value = match value.view().downcast::<DynTensorValueType>() {
            Ok(tensor) if !tensor.memory_info().is_cpu_accessible() => {
                on_host = tensor
                    .to(AllocationDevice::CPU, 0)
                    .map_err(fail)?
                    .into_dyn();
                &on_host
            }
            _ => value,
        };
        let (shape, data) = value.try_extract_tensor::<f32>().map_err(fail)?;
        let shape = shape
            .iter()
            .map(|&d| usize::try_from(d))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| {
                RuntimeError::backend(BACKEND, format!("download: tensor has shape {shape:?}"))
            })?;
        Ok((shape, data.to_vec()))
    }

    fn has(&self, graph: GraphKind) -> bool {
        self.sessions.contains_key(&graph)
    }

    fn run(
        &mut self,
        graph: GraphKind,
        inputs: Vec<(String, DynValue)>,
    ) -> Result<HashMap<String, DynValue>, RuntimeError> {
        let session = self
            .sessions
            .get_mut(&graph)
            .ok_or_else(|| super::not_loaded(BACKEND, graph))?;
        check_inputs(session, graph, &inputs)?;
        if let (GraphKind::Step, Some(fixed)) = (graph, self.fixed_step.as_mut()) {
            return fixed.run(session, &self.device, inputs);
        }
        let fail = |what: &str, e: ort::Error| {
            RuntimeError::backend(BACKEND, format!("{what} the {graph} graph: {e}"))
        };
        // Inputs are taken where they are (a cache value on the device stays there); the
        // resident outputs are allocated on the device, the others on the host.
        let mut binding = session.create_binding().map_err(|e| fail("binding", e))?;
        for (name, value) in &inputs {
            binding
                .bind_input(name.as_str(), value)
                .map_err(|e| fail("binding an input of", e))?;
        }
        let names: Vec<String> = session
            .outputs()
            .iter()
            .map(|o| o.name().to_string())
            .collect();
        for name in names {
            let memory = if self.resident_outputs.contains(&name) {
                &self.device
            } else {
                &self.host
            };
            binding
                .bind_output_to_device(name, memory)
                .map_err(|e| fail("binding an output of", e))?;
        }
        let outputs = session
            .run_binding(&binding)
            .map_err(|e| fail("running", e))?;
        Ok(by_name(outputs))
    }
}

/// A run's outputs by name. The values own their ONNX Runtime memory; the names are copied
/// out of the session.
fn by_name(outputs: SessionOutputs) -> HashMap<String, DynValue> {
    outputs
        .into_iter()
        .map(|(name, value)| (name.to_string(), value))
        .collect()
}

/// ONNX Runtime's element type for a manifest dtype.
fn element_type(dtype: DType) -> TensorElementType {
    match dtype {
        DType::F32 => TensorElementType::Float32,
        DType::F16 => TensorElementType::Float16,
        DType::I64 => TensorElementType::Int64,
        DType::Bool => TensorElementType::Bool,
        DType::I8 => TensorElementType::Int8,
    }
}

/// Rejects a host tensor whose shape does not match its data or does not fit ONNX Runtime's
/// `i64` dimensions, before ort multiplies the dimensions out (which could overflow).
fn check_host_shape(tensor: &HostTensor) -> Result<(), RuntimeError> {
    let len = match tensor {
        HostTensor::F32(_, d) => d.len(),
        HostTensor::I64(_, d) => d.len(),
        HostTensor::Bool(_, d) => d.len(),
        HostTensor::Empty(..) => 0,
    };
    let shape = tensor.shape();
    let elements = shape.iter().try_fold(1usize, |acc, &d| {
        i64::try_from(d).ok()?;
        acc.checked_mul(d)
    });
    if elements != Some(len) {
        return Err(RuntimeError::backend(
            BACKEND,
            format!("upload: shape {shape:?} does not hold {len} elements"),
        ));
    }
    Ok(())
}

/// Checks the inputs against the graph's declared inputs, so a wrong name, element type or
/// fixed dimension is reported with the input's name (ONNX Runtime's own messages often omit
/// it), and a missing input is named rather than failing inside the run.
fn check_inputs(
    session: &Session,
    graph: GraphKind,
    inputs: &[(String, DynValue)],
) -> Result<(), RuntimeError> {
    let fail =
        |message: String| RuntimeError::backend(BACKEND, format!("{graph} graph: {message}"));
    let mut seen = HashSet::new();
    for (name, value) in inputs {
        if !seen.insert(name.as_str()) {
            return Err(fail(format!("input `{name}` given twice")));
        }
        let Some(declared) = session.inputs().iter().find(|o| o.name() == name) else {
            let names: Vec<&str> = session.inputs().iter().map(|o| o.name()).collect();
            return Err(fail(format!(
                "no input named `{name}` (inputs: {})",
                names.join(", ")
            )));
        };
        let (
            ValueType::Tensor {
                ty: want_ty,
                shape: want_shape,
                ..
            },
            ValueType::Tensor {
                ty: got_ty,
                shape: got_shape,
                ..
            },
        ) = (declared.dtype(), value.dtype())
        else {
            return Err(fail(format!(
                "input `{name}`: expected {}, got {}",
                declared.dtype(),
                value.dtype()
            )));
        };
        let dims_match = want_shape.len() == got_shape.len()
            && want_shape
                .iter()
                .zip(got_shape.iter())
                .all(|(&w, &g)| w < 0 || w == g);
        if want_ty != got_ty || !dims_match {
            return Err(fail(format!(
                "input `{name}`: expected {}, got {}",
                declared.dtype(),
                value.dtype()
            )));
        }
    }
    let missing: Vec<&str> = session
        .inputs()
        .iter()
        .map(|o| o.name())
        .filter(|n| !seen.contains(n))
        .collect();
    if !missing.is_empty() {
        return Err(fail(format!("missing inputs: {}", missing.join(", "))));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::OnceLock;

    use narx_graphs::weights::WeightStore;
    use narx_graphs::{encode_model, DType, Dim, GraphBuilder};

    use super::*;

    /// What loading a text file as the library said. Recorded before the real library is
    /// loaded, since afterwards any other file is refused as a second library instead.
    static NOT_A_LIBRARY: OnceLock<Result<(), String>> = OnceLock::new();
    static LIBRARY: OnceLock<Result<PathBuf, String>> = OnceLock::new();

    /// The real library, loaded; fails the test (never skips) when it is not installed.
    fn library() -> PathBuf {
        let result = LIBRARY.get_or_init(|| {
            NOT_A_LIBRARY.get_or_init(|| {
                let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
                let fake = dir.path().join("libonnxruntime.so");
                std::fs::write(&fake, "not a shared library\n").map_err(|e| e.to_string())?;
                match init(&fake) {
                    Ok(()) => Err("a text file loaded as ONNX Runtime".to_string()),
                    Err(e) => {
                        let message = e.to_string();
                        assert!(
                            matches!(e, RuntimeError::OrtLibrary(_)),
                            "wrong error kind: {message}"
                        );
                        assert!(message.contains(&*fake.to_string_lossy()), "{message}");
                        assert!(message.contains("dlopen failed: "), "{message}");
                        Ok(())
                    }
                }
            });
            let library = find_library(None).map_err(|e| e.to_string())?;
            init(&library).map_err(|e| e.to_string())?;
            Ok(library)
        });
        match result {
            Ok(path) => path.clone(),
            Err(e) => panic!("ONNX Runtime is needed for these tests: {e}"),
        }
    }

    /// Writes a two-graph model sharing an external `weights.bin`:
    /// prefill: `y = x + w`, `ids_f = float(ids)`, `keep_f = float(keep)`; step: `y = x + w`,
    /// with `w = [10, 20, 30]`.
    fn write_model(dir: &Path) -> (PathBuf, PathBuf) {
        let mut store = WeightStore::external(dir, "weights.bin").unwrap();
        let n = || Dim::named("n");
        let weight = |g: &mut GraphBuilder| {
            g.weight("w", DType::F32, &[3], || {
                Ok(narx_graphs::builder::ConstData::F32(vec![10.0, 20.0, 30.0]))
            })
            .unwrap()
        };

        let mut g = GraphBuilder::new("prefill", &mut store);
        let x = g.input("x", DType::F32, &[n(), Dim::Fixed(3)]);
        let ids = g.input("ids", DType::I64, &[n()]);
        let keep = g.input("keep", DType::Bool, &[n(), Dim::Fixed(3)]);
        let w = weight(&mut g);
        let y = g.add(x, w).unwrap();
        let ids_f = g.cast(ids, DType::F32).unwrap();
        let keep_f = g.cast(keep, DType::F32).unwrap();
        g.output("y", y, &[n(), Dim::Fixed(3)]).unwrap();
        g.output("ids_f", ids_f, &[n()]).unwrap();
        g.output("keep_f", keep_f, &[n(), Dim::Fixed(3)]).unwrap();
        let prefill = g.finish();

        let mut g = GraphBuilder::new("step", &mut store);
        let x = g.input("x", DType::F32, &[n(), Dim::Fixed(3)]);
        let w = weight(&mut g);
        let y = g.add(x, w).unwrap();
        g.output("y", y, &[n(), Dim::Fixed(3)]).unwrap();
        let step = g.finish();
        store.finish().unwrap();

        let prefill_path = dir.join("prefill.onnx");
        let step_path = dir.join("step.onnx");
        std::fs::write(&prefill_path, encode_model(&prefill)).unwrap();
        std::fs::write(&step_path, encode_model(&step)).unwrap();
        (prefill_path, step_path)
    }

    fn engine(dir: &Path) -> OrtEngine {
        engine_with(dir, OrtOptions::default())
    }

    fn engine_with(dir: &Path, options: OrtOptions) -> OrtEngine {
        let library = library();
        let (prefill, step) = write_model(dir);
        let paths = [
            (GraphKind::Prefill, prefill.as_path()),
            (GraphKind::Step, step.as_path()),
        ];
        let options = OrtOptions {
            library: Some(library),
            intra_threads: Some(1),
            ..options
        };
        OrtEngine::load(&paths, &options).unwrap()
    }

    fn prefill_inputs(e: &OrtEngine) -> Vec<(String, DynValue)> {
        let x = HostTensor::F32(vec![2, 3], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let ids = HostTensor::I64(vec![2], vec![7, -8]);
        let keep = HostTensor::Bool(vec![2, 3], vec![true, false, true, false, false, true]);
        vec![
            ("x".to_string(), e.upload(x).unwrap()),
            ("ids".to_string(), e.upload(ids).unwrap()),
            ("keep".to_string(), e.upload(keep).unwrap()),
        ]
    }

    fn error_of<T>(result: Result<T, RuntimeError>) -> String {
        match result {
            Ok(_) => panic!("expected an error"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn runs_graphs_and_feeds_outputs_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut e = engine(dir.path());
        assert_eq!(e.name(), "onnxruntime-cpu");

        let inputs = prefill_inputs(&e);
        let mut out = e.run(GraphKind::Prefill, inputs).unwrap();
        let mut names: Vec<&str> = out.keys().map(String::as_str).collect();
        names.sort();
        assert_eq!(names, ["ids_f", "keep_f", "y"]);
        assert_eq!(
            e.download_f32(&out["y"]).unwrap(),
            (vec![2, 3], vec![11.0, 22.0, 33.0, 14.0, 25.0, 36.0])
        );
        assert_eq!(
            e.download_f32(&out["ids_f"]).unwrap(),
            (vec![2], vec![7.0, -8.0])
        );
        assert_eq!(
            e.download_f32(&out["keep_f"]).unwrap(),
            (vec![2, 3], vec![1.0, 0.0, 1.0, 0.0, 0.0, 1.0])
        );

        // The output value itself goes back in, twice: no host round trip.
        let y = out.remove("y").unwrap();
        let mut out = e.run(GraphKind::Step, vec![("x".into(), y)]).unwrap();
        let y = out.remove("y").unwrap();
        let out = e.run(GraphKind::Step, vec![("x".into(), y)]).unwrap();
        assert_eq!(
            e.download_f32(&out["y"]).unwrap(),
            (vec![2, 3], vec![31.0, 62.0, 93.0, 34.0, 65.0, 96.0])
        );
    }

    #[test]
    fn bad_inputs_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let mut e = engine(dir.path());

        let x = e.upload(HostTensor::F32(vec![1, 3], vec![0.0; 3])).unwrap();
        let message = error_of(e.run(GraphKind::Step, vec![("nope".into(), x)]));
        assert!(
            message.contains("`nope`") && message.contains("step"),
            "{message}"
        );

        let x = e.upload(HostTensor::I64(vec![1, 3], vec![0; 3])).unwrap();
        let message = error_of(e.run(GraphKind::Step, vec![("x".into(), x)]));
        assert!(
            message.contains("`x`") && message.contains("i64"),
            "{message}"
        );

        let x = e.upload(HostTensor::F32(vec![1, 4], vec![0.0; 4])).unwrap();
        let message = error_of(e.run(GraphKind::Step, vec![("x".into(), x)]));
        assert!(message.contains("`x`"), "{message}");

        let mut inputs = prefill_inputs(&e);
        inputs.retain(|(n, _)| n != "keep");
        let message = error_of(e.run(GraphKind::Prefill, inputs));
        assert!(message.contains("missing inputs: keep"), "{message}");

        let message = error_of(e.upload(HostTensor::F32(vec![2, 3], vec![0.0; 5])));
        assert!(message.contains("[2, 3]"), "{message}");
        let message = error_of(e.upload(HostTensor::F32(vec![usize::MAX, 2], vec![])));
        assert!(message.contains("upload"), "{message}");

        let ids = e.upload(HostTensor::I64(vec![1], vec![1])).unwrap();
        let message = error_of(e.download_f32(&ids));
        assert!(message.contains("float32"), "{message}");

        let x = e.upload(HostTensor::F32(vec![1, 3], vec![0.0; 3])).unwrap();
        let message = error_of(e.run(GraphKind::Decoder, vec![("x".into(), x)]));
        assert!(message.contains("decoder graph is not loaded"), "{message}");

        // Empty tensors are fine.
        let x = e.upload(HostTensor::F32(vec![0, 3], vec![])).unwrap();
        let out = e.run(GraphKind::Step, vec![("x".into(), x)]).unwrap();
        assert_eq!(e.download_f32(&out["y"]).unwrap(), (vec![0, 3], vec![]));
    }

    /// The address of a value's data.
    fn address(value: &DynValue) -> usize {
        value
            .view()
            .downcast::<DynTensorValueType>()
            .unwrap()
            .data_ptr() as usize
    }

    #[test]
    fn fixed_step_buffers_alternate_without_copying_what_is_fed_back() {
        let dir = tempfile::tempdir().unwrap();
        let options = OrtOptions {
            fixed_step_buffers: Some(vec![("y".into(), "x".into())]),
            ..OrtOptions::default()
        };
        let mut e = engine_with(dir.path(), options);
        assert_eq!(e.staged_bytes(), Some(0));

        // The prefill's output is copied into the buffers once (2 × 3 floats).
        let mut y = e
            .run(GraphKind::Prefill, prefill_inputs(&e))
            .unwrap()
            .remove("y")
            .unwrap();
        let mut addresses = Vec::new();
        for _ in 0..4 {
            y = e
                .run(GraphKind::Step, vec![("x".into(), y)])
                .unwrap()
                .remove("y")
                .unwrap();
            addresses.push(address(&y));
        }
        assert_eq!(
            e.download_f32(&y).unwrap(),
            (vec![2, 3], vec![51.0, 102.0, 153.0, 54.0, 105.0, 156.0])
        );
        assert_eq!(e.staged_bytes(), Some(24));
        // Two sets, taken in turn.
        assert_ne!(addresses[0], addresses[1]);
        assert_eq!(addresses[0], addresses[2]);
        assert_eq!(addresses[1], addresses[3]);

        // Another batch gets buffers of its own; a host input is copied every call.
        let x = e.upload(HostTensor::F32(vec![1, 3], vec![0.0; 3])).unwrap();
        let y = e.run(GraphKind::Step, vec![("x".into(), x)]).unwrap();
        assert_eq!(
            e.download_f32(&y["y"]).unwrap(),
            (vec![1, 3], vec![10.0, 20.0, 30.0])
        );
        assert_eq!(e.staged_bytes(), Some(24 + 12));
    }

    #[test]
    fn reads_the_version_the_library_reports() {
        let library = library();
        let version = runtime_version(&library).unwrap();
        assert!(version >= vec![1, 17], "{version:?}");
        // A wheel's file name carries the version too.
        let named = library_version(&library);
        if !named.is_empty() {
            assert_eq!(version, named);
        }
        assert!(check_cuda_graph_support(&version, &library).is_ok() == (version >= vec![1, 18]));
        let message = error_of(check_cuda_graph_support(&[1, 17, 3], &library));
        assert!(
            message.contains("1.17.3") && message.contains("--no-cuda-graph"),
            "{message}"
        );
        assert!(check_cuda_graph_support(&[1, 18, 0], &library).is_ok());
        assert!(check_cuda_graph_support(&[2, 0], &library).is_ok());
    }

    #[test]
    fn missing_graph_file_is_named() {
        let library = library();
        let dir = tempfile::tempdir().unwrap();
        let absent = dir.path().join("absent.onnx");
        let paths = [
            (GraphKind::Prefill, absent.as_path()),
            (GraphKind::Step, absent.as_path()),
        ];
        let options = OrtOptions {
            library: Some(library),
            intra_threads: None,
            ..OrtOptions::default()
        };
        let message = error_of(OrtEngine::load(&paths, &options));
        assert!(
            message.contains("absent.onnx") && message.contains("prefill"),
            "{message}"
        );
    }

    #[test]
    fn text_file_is_not_a_library() {
        library();
        assert_eq!(NOT_A_LIBRARY.get(), Some(&Ok(())));
    }

    /// The library loaded by [`init`], if any.
    fn loaded_library() -> Option<PathBuf> {
        let guard = RUNTIME.lock().unwrap_or_else(|e| e.into_inner());
        guard.as_ref().map(|l| l.library.clone())
    }

    #[test]
    fn one_library_per_process() {
        let library = library();
        init(&library).unwrap();
        assert_eq!(
            loaded_library(),
            Some(std::fs::canonicalize(&library).unwrap())
        );
        let dir = tempfile::tempdir().unwrap();
        let other = dir.path().join("libonnxruntime.so");
        std::fs::write(&other, "x").unwrap();
        let message = error_of(init(&other));
        assert!(message.contains("already loaded"), "{message}");
    }

    #[test]
    fn explicit_library_must_exist() {
        let message = error_of(find_library(Some(Path::new("/nonexistent/libort.so"))));
        assert!(
            message.contains("--ort-lib /nonexistent/libort.so"),
            "{message}"
        );

        let dir = tempfile::tempdir().unwrap();
        let message = error_of(find_library(Some(dir.path())));
        assert!(message.contains("no ONNX Runtime library"), "{message}");
    }

    #[test]
    fn picks_highest_version_in_a_folder() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "libonnxruntime.so",
            "libonnxruntime.so.1.9.0",
            "libonnxruntime.so.1.16.3",
            "libonnxruntime.so.1",
            "libonnxruntime_providers_shared.so",
            "libonnxruntime.so.bak",
        ] {
            std::fs::write(dir.path().join(name), "").unwrap();
        }
        let found = find_library(Some(dir.path())).unwrap();
        assert_eq!(found, dir.path().join("libonnxruntime.so.1.16.3"));

        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("libonnxruntime.dylib"), "").unwrap();
        assert_eq!(
            library_in_dir(dir.path()),
            Some(dir.path().join("libonnxruntime.dylib"))
        );
    }

    #[test]
    fn not_found_message_says_how_to_get_it() {
        let message = not_found_message();
        for needle in [
            "--ort-lib",
            "ORT_DYLIB_PATH",
            "pip install onnxruntime",
            "/usr/lib",
        ] {
            assert!(message.contains(needle), "{needle}: {message}");
        }
    }
}
