//! ONNX Runtime's execution providers: CPU, CUDA and TensorRT, the options narx exposes for
//! them, and the exact provider-option keys ONNX Runtime takes (`OrtCUDAProviderOptionsV2`,
//! `OrtTensorRTProviderOptionsV2`).
//!
//! The mapping to keys is a plain function so that it is tested on machines without a GPU;
//! [`super::ort`] registers the result.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use narx_graphs::manifest::ShapeProfile;

use crate::RuntimeError;

/// Which ONNX Runtime execution provider runs a session.
#[derive(Clone, Debug, PartialEq)]
pub enum ExecutionProvider {
    Cpu,
    Cuda(CudaOptions),
    TensorRt(TensorRtOptions),
}

impl ExecutionProvider {
    /// ONNX Runtime's name for the provider, as `GetAvailableProviders` lists it.
    pub fn ort_name(&self) -> &'static str {
        match self {
            ExecutionProvider::Cpu => "CPUExecutionProvider",
            ExecutionProvider::Cuda(_) => "CUDAExecutionProvider",
            ExecutionProvider::TensorRt(_) => "TensorrtExecutionProvider",
        }
    }

    /// What the provider needs besides ONNX Runtime itself, for error messages.
    pub fn needs(&self) -> &'static str {
        match self {
            ExecutionProvider::Cpu => "nothing else",
            ExecutionProvider::Cuda(_) => {
                "an NVIDIA GPU with its driver, the CUDA runtime and cuDNN libraries"
            }
            ExecutionProvider::TensorRt(_) => {
                "an NVIDIA GPU with its driver, the CUDA runtime, cuDNN and TensorRT libraries"
            }
        }
    }

    /// Whether sessions on this provider replay CUDA graphs (only CUDA's can: see
    /// [`CudaOptions::cuda_graph`]).
    pub fn cuda_graph(&self) -> bool {
        matches!(self, ExecutionProvider::Cuda(options) if options.cuda_graph)
    }

    /// The same provider without CUDA graphs, for the sessions whose inputs do not stay at
    /// fixed addresses (the prefill, the selection graph, the decoder).
    pub fn without_cuda_graph(&self) -> Self {
        match self {
            ExecutionProvider::Cuda(options) => ExecutionProvider::Cuda(CudaOptions {
                cuda_graph: false,
                ..options.clone()
            }),
            other => other.clone(),
        }
    }
}

impl fmt::Display for ExecutionProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ExecutionProvider::Cpu => "cpu",
            ExecutionProvider::Cuda(_) => "cuda",
            ExecutionProvider::TensorRt(_) => "tensorrt",
        })
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CudaOptions {
    pub device_id: u32,
    /// Capture the session's run as a CUDA graph and replay it (the step graph of a static
    /// export; see [`super::ort::OrtOptions::fixed_step_buffers`]). The step needs two
    /// captured graphs, one per cache buffer set, which ONNX Runtime's CUDA provider keeps
    /// apart by `gpu_graph_id`; its TensorRT provider keeps one graph per session whatever
    /// the id, so TensorRT runs without them.
    pub cuda_graph: bool,
}

impl CudaOptions {
    /// `OrtCUDAProviderOptionsV2` keys and values.
    pub fn provider_options(&self) -> Vec<(&'static str, String)> {
        vec![
            ("device_id", self.device_id.to_string()),
            ("enable_cuda_graph", flag(self.cuda_graph)),
        ]
    }
}

/// ONNX Runtime's spelling of a boolean provider option.
fn flag(on: bool) -> String {
    if on { "1" } else { "0" }.to_string()
}

/// TensorRT's builder optimisation levels (0 builds fastest, 5 searches longest).
pub const MAX_BUILDER_OPTIMIZATION_LEVEL: u8 = 5;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorRtOptions {
    pub device_id: u32,
    /// Let TensorRT choose float16 kernels.
    pub fp16: bool,
    /// Let TensorRT choose bfloat16 kernels.
    pub bf16: bool,
    /// Most scratch memory a TensorRT layer may use, in bytes (`None`: ONNX Runtime's default).
    pub workspace_bytes: Option<u64>,
    /// 0 to 5; TensorRT's default is 3.
    pub builder_optimization_level: u8,
    /// Folder for built engines, so later runs load them instead of rebuilding (minutes for
    /// a large model); `None` turns the cache off.
    pub engine_cache: Option<PathBuf>,
    /// Folder for TensorRT's timing cache, which speeds up building engines for other shapes;
    /// `None` turns it off.
    pub timing_cache: Option<PathBuf>,
    /// INT8 kernels; `None` keeps TensorRT in float.
    pub int8: Option<TensorRtInt8>,
    /// Folder where each built engine's EP-context model (`<graph>_ctx.onnx`, pointing at
    /// the engine file) is written, and looked for on later runs: a board given the folder
    /// loads engines without the ONNX parser or a rebuild. Goes with the engine cache.
    pub ep_context: Option<PathBuf>,
}

/// 64-bit FNV-1a: a hash that stays the same across builds, so engine folders do too.
struct Fnv1a(u64);

impl Default for Fnv1a {
    fn default() -> Self {
        Fnv1a(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv1a {
    fn bytes(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    /// A file's name, size and contents: all of a small file, and of a large one (the
    /// weights) 256 evenly spaced runs of 256 bytes, which any re-export with other weights
    /// changes, at a cost that does not grow with the model. Not modification times: a
    /// packaged copy of the model must find the engines built for it. An unreadable file
    /// hashes as empty; the session that reads it reports the error.
    fn file(&mut self, path: &Path) {
        use std::io::{Read, Seek, SeekFrom};
        const RUNS: u64 = 256;
        const RUN: u64 = 256;
        self.bytes(path.file_name().unwrap_or_default().as_encoded_bytes());
        let Ok(mut file) = std::fs::File::open(path) else {
            return;
        };
        let len = file.metadata().map_or(0, |m| m.len());
        self.bytes(&len.to_le_bytes());
        let mut run = Vec::new();
        if len <= RUNS * RUN {
            if file.read_to_end(&mut run).is_ok() {
                self.bytes(&run);
            }
            return;
        }
        for i in 0..RUNS {
            run.clear();
            let at = (len - RUN) / (RUNS - 1) * i;
            let read = file
                .seek(SeekFrom::Start(at))
                .and_then(|_| (&mut file).take(RUN).read_to_end(&mut run));
            if read.is_ok() {
                self.bytes(&run);
            }
        }
    }
}

/// Where TensorRT's INT8 ranges come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TensorRtInt8 {
    /// The graph carries them (a QDQ model, explicit quantisation).
    Qdq,
    /// A float graph with ONNX Runtime's `TrtTable` calibration table (implicit
    /// quantisation), as `narx calibrate` writes it.
    Table(PathBuf),
}

impl Default for TensorRtOptions {
    fn default() -> Self {
        TensorRtOptions {
            device_id: 0,
            fp16: false,
            bf16: false,
            workspace_bytes: None,
            builder_optimization_level: 3,
            engine_cache: None,
            timing_cache: None,
            int8: None,
            ep_context: None,
        }
    }
}

impl TensorRtOptions {
    pub fn validate(&self) -> Result<(), RuntimeError> {
        if self.builder_optimization_level > MAX_BUILDER_OPTIMIZATION_LEVEL {
            return Err(RuntimeError::BadInput(format!(
                "TensorRT builder optimisation level {} is out of range 0..={}",
                self.builder_optimization_level, MAX_BUILDER_OPTIMIZATION_LEVEL
            )));
        }
        if self.workspace_bytes == Some(0) {
            return Err(RuntimeError::BadInput(
                "the TensorRT workspace must be larger than 0".into(),
            ));
        }
        Ok(())
    }

    /// These options with the engine cache and the EP-context models in a subfolder named
    /// after what TensorRT bakes into an engine: the precision, the builder level and the
    /// model's `files` (see [`Fnv1a::file`]). Neither ONNX Runtime's
    /// engine cache nor an EP-context model notices when those change, so a run with other
    /// precision flags, or after a re-export, builds its own engines instead of loading stale
    /// ones. The timing cache stays shared: its timings hold for any engine.
    pub fn keyed_by(mut self, files: &[PathBuf]) -> Self {
        let mut precision = String::from("fp32");
        for (on, name) in [(self.fp16, "fp16"), (self.bf16, "bf16")] {
            if on {
                precision += "-";
                precision += name;
            }
        }
        let mut fingerprint = Fnv1a::default();
        match &self.int8 {
            None => {}
            Some(TensorRtInt8::Qdq) => precision += "-int8qdq",
            Some(TensorRtInt8::Table(table)) => {
                precision += "-int8table";
                fingerprint.file(table);
            }
        }
        for file in files {
            fingerprint.file(file);
        }
        let key = format!(
            "{precision}-o{}-{:016x}",
            self.builder_optimization_level, fingerprint.0
        );
        self.engine_cache = self.engine_cache.map(|dir| dir.join(&key));
        self.ep_context = self.ep_context.map(|dir| dir.join(&key));
        self
    }

    /// The EP-context model an earlier run wrote for `graph` (`step.onnx` →
    /// `<ep_context>/step_ctx.onnx`), if there is one.
    pub fn ep_context_model(&self, graph: &Path) -> Option<PathBuf> {
        let stem = graph.file_stem()?.to_string_lossy();
        let model = self.ep_context.as_ref()?.join(format!("{stem}_ctx.onnx"));
        model.is_file().then_some(model)
    }

    /// `OrtTensorRTProviderOptionsV2` keys and values for one session, with the shape
    /// profile of its graph so that TensorRT builds one engine for the whole range of shapes
    /// a generation goes through instead of rebuilding mid-generation.
    pub fn provider_options(&self, profile: Option<&ProfileShapes>) -> Vec<(&'static str, String)> {
        let mut options = vec![
            ("device_id", self.device_id.to_string()),
            ("trt_fp16_enable", flag(self.fp16)),
            ("trt_bf16_enable", flag(self.bf16)),
            (
                "trt_builder_optimization_level",
                self.builder_optimization_level.to_string(),
            ),
            ("trt_engine_cache_enable", flag(self.engine_cache.is_some())),
            ("trt_timing_cache_enable", flag(self.timing_cache.is_some())),
        ];
        if let Some(bytes) = self.workspace_bytes {
            options.push(("trt_max_workspace_size", bytes.to_string()));
        }
        if let Some(dir) = &self.engine_cache {
            options.push(("trt_engine_cache_path", dir.display().to_string()));
        }
        if let Some(dir) = &self.timing_cache {
            options.push(("trt_timing_cache_path", dir.display().to_string()));
        }
        if let Some(dir) = &self.ep_context {
            options.push(("trt_dump_ep_context_model", flag(true)));
            options.push(("trt_ep_context_file_path", dir.display().to_string()));
            // The context model names the engine file instead of embedding it.
            options.push(("trt_ep_context_embed_mode", "0".to_string()));
        }
        if let Some(int8) = &self.int8 {
            options.push(("trt_int8_enable", flag(true)));
            if let TensorRtInt8::Table(table) = int8 {
                // An absolute path: ONNX Runtime resolves the name against the engine cache
                // folder, which an absolute path overrides.
                options.push((
                    "trt_int8_calibration_table_name",
                    table.display().to_string(),
                ));
                options.push(("trt_int8_use_native_calibration_table", flag(false)));
            }
        }
        if let Some(profile) = profile {
            options.push(("trt_profile_min_shapes", profile.min.clone()));
            options.push(("trt_profile_opt_shapes", profile.opt.clone()));
            options.push(("trt_profile_max_shapes", profile.max.clone()));
        }
        options
    }
}

/// One graph's optimisation profile in ONNX Runtime's TensorRT syntax:
/// `name:d0xd1x…,name:…` for the minimum, optimum and maximum shapes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProfileShapes {
    pub min: String,
    pub opt: String,
    pub max: String,
}

impl ProfileShapes {
    /// From the manifest's profiles of one graph (input name → min/opt/max); `None` when the
    /// graph has no dynamic input.
    pub fn from_manifest(profiles: &BTreeMap<String, ShapeProfile>) -> Option<Self> {
        if profiles.is_empty() {
            return None;
        }
        let join = |pick: fn(&ShapeProfile) -> &Vec<usize>| {
            profiles
                .iter()
                .map(|(name, profile)| {
                    let dims: Vec<String> = pick(profile).iter().map(usize::to_string).collect();
                    format!("{name}:{}", dims.join("x"))
                })
                .collect::<Vec<_>>()
                .join(",")
        };
        Some(ProfileShapes {
            min: join(|p| &p.min),
            opt: join(|p| &p.opt),
            max: join(|p| &p.max),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(min: &[usize], opt: &[usize], max: &[usize]) -> ShapeProfile {
        ShapeProfile {
            min: min.to_vec(),
            opt: opt.to_vec(),
            max: max.to_vec(),
        }
    }

    #[test]
    fn profile_strings_use_onnxruntime_syntax() {
        let profiles: BTreeMap<String, ShapeProfile> = [
            ("tokens".to_string(), profile(&[1, 1], &[2, 16], &[16, 16])),
            (
                "past.0.key".to_string(),
                profile(&[1, 12, 1, 64], &[2, 12, 129, 64], &[16, 12, 256, 64]),
            ),
        ]
        .into_iter()
        .collect();
        let shapes = ProfileShapes::from_manifest(&profiles).unwrap();
        assert_eq!(shapes.min, "past.0.key:1x12x1x64,tokens:1x1");
        assert_eq!(shapes.opt, "past.0.key:2x12x129x64,tokens:2x16");
        assert_eq!(shapes.max, "past.0.key:16x12x256x64,tokens:16x16");
        assert!(ProfileShapes::from_manifest(&BTreeMap::new()).is_none());
    }

    #[test]
    fn tensorrt_options_map_to_onnxruntime_keys() {
        let options = TensorRtOptions {
            device_id: 1,
            fp16: true,
            bf16: false,
            workspace_bytes: Some(2 << 30),
            builder_optimization_level: 5,
            engine_cache: Some(PathBuf::from("/models/b/trt-cache")),
            timing_cache: Some(PathBuf::from("/models/b/trt-cache")),
            int8: Some(TensorRtInt8::Table(PathBuf::from(
                "/models/b/calibration.flatbuffers",
            ))),
            ep_context: Some(PathBuf::from("/models/b/trt-cache")),
        };
        let shapes = ProfileShapes {
            min: "tokens:1x1".into(),
            opt: "tokens:2x8".into(),
            max: "tokens:16x16".into(),
        };
        let got: BTreeMap<&str, String> = options
            .provider_options(Some(&shapes))
            .into_iter()
            .collect();
        let want: BTreeMap<&str, String> = [
            ("device_id", "1"),
            ("trt_fp16_enable", "1"),
            ("trt_bf16_enable", "0"),
            ("trt_builder_optimization_level", "5"),
            ("trt_max_workspace_size", "2147483648"),
            ("trt_engine_cache_enable", "1"),
            ("trt_engine_cache_path", "/models/b/trt-cache"),
            ("trt_timing_cache_enable", "1"),
            ("trt_timing_cache_path", "/models/b/trt-cache"),
            ("trt_dump_ep_context_model", "1"),
            ("trt_ep_context_file_path", "/models/b/trt-cache"),
            ("trt_ep_context_embed_mode", "0"),
            ("trt_int8_enable", "1"),
            (
                "trt_int8_calibration_table_name",
                "/models/b/calibration.flatbuffers",
            ),
            ("trt_int8_use_native_calibration_table", "0"),
            ("trt_profile_min_shapes", "tokens:1x1"),
            ("trt_profile_opt_shapes", "tokens:2x8"),
            ("trt_profile_max_shapes", "tokens:16x16"),
        ]
        .into_iter()
        .map(|(k, v)| (k, v.to_string()))
        .collect();
        assert_eq!(got, want);

        // Caches off and no profile: no paths, no shapes, no workspace key.
        let plain: BTreeMap<&str, String> = TensorRtOptions::default()
            .provider_options(None)
            .into_iter()
            .collect();
        assert_eq!(plain["trt_engine_cache_enable"], "0");
        assert_eq!(plain["trt_builder_optimization_level"], "3");
        assert!(!plain.contains_key("trt_engine_cache_path"));
        assert!(!plain.contains_key("trt_profile_min_shapes"));
        assert!(!plain.contains_key("trt_max_workspace_size"));
        assert!(!plain.contains_key("trt_int8_enable"));
        assert!(!plain.contains_key("trt_dump_ep_context_model"));

        // A QDQ model carries its ranges: INT8 on, no table.
        let qdq: BTreeMap<&str, String> = TensorRtOptions {
            int8: Some(TensorRtInt8::Qdq),
            ..TensorRtOptions::default()
        }
        .provider_options(None)
        .into_iter()
        .collect();
        assert_eq!(qdq["trt_int8_enable"], "1");
        assert!(!qdq.contains_key("trt_int8_calibration_table_name"));
    }

    #[test]
    fn tensorrt_options_are_checked() {
        let level = TensorRtOptions {
            builder_optimization_level: 6,
            ..TensorRtOptions::default()
        };
        assert!(matches!(level.validate(), Err(RuntimeError::BadInput(_))));
        let workspace = TensorRtOptions {
            workspace_bytes: Some(0),
            ..TensorRtOptions::default()
        };
        assert!(matches!(
            workspace.validate(),
            Err(RuntimeError::BadInput(_))
        ));
        assert!(TensorRtOptions::default().validate().is_ok());
    }

    #[test]
    fn cuda_options_map_to_onnxruntime_keys() {
        let options = CudaOptions {
            device_id: 3,
            cuda_graph: true,
        };
        assert_eq!(
            options.provider_options(),
            vec![
                ("device_id", "3".to_string()),
                ("enable_cuda_graph", "1".to_string())
            ]
        );
        assert_eq!(
            CudaOptions::default().provider_options()[1],
            ("enable_cuda_graph", "0".to_string())
        );
    }

    #[test]
    fn only_sessions_asked_to_replay_cuda_graphs() {
        let cuda = ExecutionProvider::Cuda(CudaOptions {
            device_id: 1,
            cuda_graph: true,
        });
        assert!(cuda.cuda_graph());
        // Everything else is kept.
        assert_eq!(
            cuda.without_cuda_graph(),
            ExecutionProvider::Cuda(CudaOptions {
                device_id: 1,
                cuda_graph: false
            })
        );
        let trt = ExecutionProvider::TensorRt(TensorRtOptions::default());
        assert!(!trt.cuda_graph() && !ExecutionProvider::Cpu.cuda_graph());
        assert_eq!(trt.without_cuda_graph(), trt);
    }

    #[test]
    fn engines_are_kept_per_precision_and_per_model() {
        let temp = tempfile::tempdir().unwrap();
        let (graph, weights) = (
            temp.path().join("step.onnx"),
            temp.path().join("weights.bin"),
        );
        std::fs::write(&graph, b"graph").unwrap();
        let mut bytes: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&weights, &bytes).unwrap();
        let files = [graph, weights.clone()];
        let cache = temp.path().join("trt-cache");
        let base = TensorRtOptions {
            engine_cache: Some(cache.clone()),
            timing_cache: Some(cache.clone()),
            ep_context: Some(cache.clone()),
            ..TensorRtOptions::default()
        };
        let folder = |options: &TensorRtOptions| {
            let keyed = options.clone().keyed_by(&files);
            assert_eq!(keyed.ep_context, keyed.engine_cache);
            assert_eq!(
                keyed.timing_cache,
                Some(cache.clone()),
                "timings stay shared"
            );
            let folder = keyed.engine_cache.unwrap();
            assert_eq!(folder.parent(), Some(cache.as_path()));
            folder.file_name().unwrap().to_string_lossy().into_owned()
        };
        let plain = folder(&base);
        assert!(plain.starts_with("fp32-o3-"), "{plain}");
        assert_eq!(
            folder(&base),
            plain,
            "the same settings find the same engines"
        );
        let fp16 = TensorRtOptions {
            fp16: true,
            ..base.clone()
        };
        assert!(folder(&fp16).starts_with("fp32-fp16-o3-"));
        let int8 = TensorRtOptions {
            int8: Some(TensorRtInt8::Qdq),
            builder_optimization_level: 5,
            ..base.clone()
        };
        assert!(folder(&int8).starts_with("fp32-int8qdq-o5-"));
        // Weights of the same size but other values (a re-export of another checkpoint).
        let sampled = 150_000 - 150_000 % ((200_000 - 256) / 255);
        bytes[sampled] ^= 0xff;
        std::fs::write(&weights, &bytes).unwrap();
        assert_ne!(folder(&base), plain);
        // No cache: nothing to key.
        let none = TensorRtOptions::default().keyed_by(&files);
        assert_eq!((none.engine_cache, none.ep_context), (None, None));
    }
}
