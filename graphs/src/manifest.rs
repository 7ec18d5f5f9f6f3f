//! `narx.json`: everything `narx run` needs to know about a model directory, and the only
//! contract between export and run (like onnxruntime-genai's `genai_config.json`).
//! Versioned: a manifest from a newer narx is refused with a message saying so.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::builder::{describe_io, DType, Dim};
use crate::larp::LarpConfig;
use crate::nar::{self, names, ConditionKind, ModelConfig, NarSpec};
use crate::onnx::ModelProto;
use crate::vq::VqConfig;
use crate::GraphError;

/// The manifest file name inside a model directory.
pub const MANIFEST_FILE: &str = "narx.json";
/// The manifest format this narx writes and the newest it reads.
pub const FORMAT_VERSION: u32 = 1;
/// The weight file every graph of a model directory reads.
pub const WEIGHTS_FILE: &str = "weights.bin";
/// Most prompts per batch the TensorRT profiles are built for (twice that many rows with
/// guidance).
const PROFILE_MAX_PROMPTS: usize = 8;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Family {
    #[serde(rename = "nar-c2i")]
    NarC2i,
    #[serde(rename = "nar-t2i")]
    NarT2i,
    #[serde(rename = "nar-video")]
    NarVideo,
    /// LlamaGen c2i: NAR's backbone without the extra block, generated in raster order.
    #[serde(rename = "llamagen-c2i")]
    LlamaGenC2i,
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Family::NarC2i => "nar-c2i",
            Family::NarT2i => "nar-t2i",
            Family::NarVideo => "nar-video",
            Family::LlamaGenC2i => "llamagen-c2i",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format_version: u32,
    /// The narx that wrote it.
    pub producer: String,
    pub family: Family,
    /// Upstream `ModelArgs` of the image or the video model.
    pub config: ModelConfig,
    /// Latent grid: `[rows, cols]` (image) or `[T, H, W]` (video).
    pub grid: Vec<usize>,
    pub vocab_size: usize,
    /// Precision of weights and matmuls.
    pub dtype: DType,
    pub parameters: usize,
    pub condition: Condition,
    /// Dimension heads, in the order the prefill averages them.
    pub heads: Vec<Head>,
    pub graphs: Graphs,
    pub weights: WeightsFile,
    pub kv_cache: KvCache,
    pub sampling: SamplingDefaults,
    /// Per graph, per dynamic input: the shapes TensorRT should optimise for.
    pub tensorrt_profiles: BTreeMap<String, BTreeMap<String, ShapeProfile>>,
    /// TensorRT builder settings `narx run --provider tensorrt` starts from (flags override).
    #[serde(default)]
    pub tensorrt: TensorRtSettings,
    /// Replay each step call as a CUDA graph under the CUDA provider (flags override).
    /// Static exports set it: their step shapes stay the same for a whole generation, which
    /// is what a captured graph needs.
    #[serde(default)]
    pub cuda_graph: bool,
    /// The image tokenizer's decoder, when the export was given one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vq_decoder: Option<DecoderFile>,
    /// The video tokenizer's decoder, when the export was given one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub larp_decoder: Option<LarpDecoderFile>,
    /// INT8 ranges from `narx calibrate`, when the directory has them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibration: Option<CalibrationFiles>,
    /// How the graphs are quantised, for a QDQ model directory (`narx calibrate` writes one
    /// under `int8/`); absent for float models.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantization: Option<String>,
}

/// What `narx calibrate` measured and wrote: one clipping range (`amax`, the |x| that maps
/// to ±127) per activation that feeds a MatMul, Gemm or Conv.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CalibrationFiles {
    /// How ranges were chosen: `entropy`, `max` or `percentile <p>`.
    pub method: String,
    /// Generations observed and tensors ranged.
    pub generations: usize,
    pub tensors: usize,
    /// JSON object tensor name → amax.
    pub ranges: String,
    /// TensorRT's native calibration cache.
    pub trt_cache: String,
    /// The `TRT-<version>` its header names.
    pub trt_version: String,
    /// ONNX Runtime's TensorRT calibration table (flatbuffers).
    pub ort_table: String,
    /// The QDQ model directory made from the ranges, inside this one.
    pub qdq_model: String,
    /// What quantisation costs against float32 on held-out prompts (JSON).
    pub quality: String,
}

/// The LARP decoder graph: `codes (batch, T·H·W)` → `video (batch, 3, frames, height,
/// width)`, nominally in [0, 1].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LarpDecoderFile {
    pub graph: GraphFile,
    pub config: LarpConfig,
}

/// The VQ decoder graph: `codes (batch, rows, cols)` → `image (batch, 3, patch·rows,
/// patch·cols)` in [-1, 1].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecoderFile {
    pub graph: GraphFile,
    pub config: VqConfig,
    /// Pixels per token along each side.
    pub patch: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum Condition {
    /// Class labels `0..num_classes`; `null_class` (if any) is the unconditional row.
    Class {
        num_classes: usize,
        null_class: Option<usize>,
        /// Where the step graph embeds token `class_token_offset + label` as class `label`,
        /// the prefill can run as a step over an empty cache, and a backend needs only the
        /// step graph in memory. Absent in directories exported before.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        class_token_offset: Option<usize>,
    },
    /// Caption features `(tokens, dim)` with a 0/1 mask; the null caption is in the weights.
    Caption { tokens: usize, dim: usize },
}

/// A head predicts the neighbour at +1 along `axis` of the grid.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Head {
    pub name: String,
    /// The graph output holding its logits, `(head_rows, width, vocab)`: one row per row of
    /// the call's `head_mix`.
    pub output: String,
    pub axis: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Graphs {
    pub prefill: GraphFile,
    pub step: GraphFile,
    /// The selection graph (`select` module): assembly, guidance and top-k of a call's
    /// logits, run on the GPU. Absent in directories exported before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub select: Option<GraphFile>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GraphFile {
    pub file: String,
    pub bytes: u64,
    pub inputs: Vec<TensorDesc>,
    pub outputs: Vec<TensorDesc>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorDesc {
    pub name: String,
    pub dtype: DType,
    /// Fixed sizes and symbolic names (`batch`, `head_rows`, `width`, `past`); `?` for a size
    /// the graph computes (`past + width` of the appended cache), which the file leaves
    /// unnamed.
    pub shape: Vec<Dim>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightsFile {
    /// ONNX external-data file shared by the graphs.
    pub file: String,
    pub bytes: u64,
}

/// How the KV cache travels between calls (see the `nar` module docs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheLayout {
    /// Each call's `present.*` = `past.*` + this call's keys, in generation order.
    #[default]
    Append,
    /// Full capacity from the start, every dimension fixed but the batch; `cache_write`
    /// places each call's keys, `key_bias` masks the slots not filled yet.
    Static,
}

impl std::fmt::Display for CacheLayout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CacheLayout::Append => "append",
            CacheLayout::Static => "static",
        })
    }
}

/// The cache's shape and graph names, per block.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KvCache {
    pub layout: CacheLayout,
    pub layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub dtype: DType,
    /// Most positions a generation holds (condition + grid), rounded up to 8 as upstream.
    pub capacity: usize,
    /// Name patterns with `{layer}` ([`names::for_layer`]).
    pub past_key: String,
    pub past_value: String,
    pub present_key: String,
    pub present_value: String,
    pub past_key_bias: String,
    pub present_key_bias: String,
}

impl KvCache {
    /// Every layer's cache outputs with the inputs they feed at the next call:
    /// (`present.L.key`, `past.L.key`), (`present.L.value`, `past.L.value`), ...
    pub fn carried(&self) -> Vec<(String, String)> {
        (0..self.layers)
            .flat_map(|layer| {
                [
                    (&self.present_key, &self.past_key),
                    (&self.present_value, &self.past_value),
                ]
                .map(|(present, past)| (Self::name(present, layer), Self::name(past, layer)))
            })
            .collect()
    }

    pub fn name(pattern: &str, layer: usize) -> String {
        names::for_layer(pattern, layer)
    }
}

/// Upstream sample-script defaults, overridable per run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SamplingDefaults {
    pub cfg_scale: f32,
    pub cfg_interval: i64,
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
}

/// TensorRT settings stored with a model, so a deployed directory carries how its engines
/// are to be built.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TensorRtSettings {
    pub fp16: bool,
    pub bf16: bool,
    /// Most scratch memory per layer, in bytes; `None`: ONNX Runtime's default.
    pub workspace_bytes: Option<u64>,
    /// 0 (fast build) to 5 (longest search); TensorRT's default is 3.
    pub builder_optimization_level: u8,
    /// Engine cache folder, relative to the model directory; `None`: no cache.
    pub engine_cache: Option<String>,
    /// Timing cache folder, relative to the model directory; `None`: no cache.
    pub timing_cache: Option<String>,
}

/// Where built TensorRT engines and the timing cache go inside a model directory.
pub const TENSORRT_CACHE_DIR: &str = "trt-cache";

impl Default for TensorRtSettings {
    fn default() -> Self {
        TensorRtSettings {
            fp16: false,
            bf16: false,
            workspace_bytes: None,
            builder_optimization_level: 3,
            engine_cache: Some(TENSORRT_CACHE_DIR.into()),
            timing_cache: Some(TENSORRT_CACHE_DIR.into()),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShapeProfile {
    pub min: Vec<usize>,
    pub opt: Vec<usize>,
    pub max: Vec<usize>,
}

impl GraphFile {
    /// Describes a built graph's inputs and outputs for the manifest.
    pub fn describe(file: &str, bytes: u64, model: &ModelProto) -> Result<Self, GraphError> {
        let graph = model
            .graph
            .as_ref()
            .ok_or_else(|| GraphError::Invalid(format!("{file}: model has no graph")))?;
        let describe = |infos: &[crate::onnx::ValueInfoProto]| {
            infos
                .iter()
                .map(|info| {
                    let name = info.name.clone().unwrap_or_default();
                    let (dtype, shape) = describe_io(info).ok_or_else(|| {
                        GraphError::Invalid(format!("{file}: {name} has no tensor type"))
                    })?;
                    Ok(TensorDesc { name, dtype, shape })
                })
                .collect::<Result<Vec<_>, GraphError>>()
        };
        Ok(GraphFile {
            file: file.to_string(),
            bytes,
            inputs: describe(&graph.input)?,
            outputs: describe(&graph.output)?,
        })
    }

    /// TensorRT profiles for the inputs with symbolic dims; `ranges` gives (min, opt, max)
    /// for each symbol.
    pub fn profiles(
        &self,
        ranges: &BTreeMap<&str, (usize, usize, usize)>,
    ) -> Result<BTreeMap<String, ShapeProfile>, GraphError> {
        let mut out = BTreeMap::new();
        for input in &self.inputs {
            if input.shape.iter().all(|d| matches!(d, Dim::Fixed(_))) {
                continue;
            }
            let mut profile = ShapeProfile {
                min: vec![],
                opt: vec![],
                max: vec![],
            };
            for dim in &input.shape {
                let (lo, mid, hi) = match dim {
                    Dim::Fixed(n) => (*n, *n, *n),
                    Dim::Named(s) => *ranges.get(s.as_str()).ok_or_else(|| {
                        GraphError::Invalid(format!("no profile range for dimension {s}"))
                    })?,
                };
                profile.min.push(lo);
                profile.opt.push(mid);
                profile.max.push(hi);
            }
            out.insert(input.name.clone(), profile);
        }
        Ok(out)
    }
}

impl Manifest {
    /// The manifest `narx export` writes for `spec`'s prefill and step graphs over
    /// `weight_bytes` of weights, with TensorRT profiles covering up to
    /// [`PROFILE_MAX_PROMPTS`] prompts; the decoders and calibration are added by their
    /// steps.
    pub fn for_export(
        spec: &NarSpec,
        prefill: GraphFile,
        step: GraphFile,
        weight_bytes: u64,
    ) -> Result<Manifest, GraphError> {
        let c = spec.condition_len();
        let rows = 2 * PROFILE_MAX_PROMPTS;
        let (cells, widest) = (spec.cells(), spec.widest_wavefront());
        let ranges: BTreeMap<&str, (usize, usize, usize)> = [
            (nar::dims::BATCH, (1, 2, rows)),
            (nar::dims::HEAD_ROWS, (1, 1, rows)),
            (nar::dims::WIDTH, (1, widest, widest)),
            (nar::dims::PAST, (c, c + cells / 2, c + cells - 1)),
        ]
        .into_iter()
        .collect();
        let tensorrt_profiles = [
            ("prefill".to_string(), prefill.profiles(&ranges)?),
            ("step".to_string(), step.profiles(&ranges)?),
        ]
        .into_iter()
        .collect();
        let derived = Derived::of(spec);
        Ok(Manifest {
            format_version: FORMAT_VERSION,
            producer: format!("narx {}", env!("CARGO_PKG_VERSION")),
            family: derived.family,
            config: spec.config.clone(),
            grid: spec.grid.clone(),
            vocab_size: derived.vocab_size,
            dtype: spec.dtype,
            parameters: derived.parameters,
            condition: derived.condition,
            heads: derived.heads,
            graphs: Graphs {
                prefill,
                step,
                select: None,
            },
            weights: WeightsFile {
                file: WEIGHTS_FILE.into(),
                bytes: weight_bytes,
            },
            kv_cache: derived.kv_cache,
            sampling: derived.sampling,
            tensorrt_profiles,
            tensorrt: TensorRtSettings::default(),
            cuda_graph: spec.layout == CacheLayout::Static,
            vq_decoder: None,
            larp_decoder: None,
            calibration: None,
            quantization: None,
        })
    }

    pub fn path(dir: &Path) -> PathBuf {
        dir.join(MANIFEST_FILE)
    }

    /// Writes `dir/narx.json`.
    pub fn save(&self, dir: &Path) -> Result<(), GraphError> {
        let path = Self::path(dir);
        let text = serde_json::to_string_pretty(self).map_err(|e| GraphError::Manifest {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        std::fs::write(&path, text + "\n").map_err(|e| GraphError::io(&path, e))
    }

    /// Reads `dir/narx.json` and checks it: its contents ([`Manifest::read`]) and the files
    /// it names (present, the weights of the recorded size).
    pub fn load(dir: &Path) -> Result<Self, GraphError> {
        let manifest = Self::read(dir)?;
        manifest
            .check_files(dir)
            .map_err(|m| bad_manifest(dir, m))?;
        Ok(manifest)
    }

    /// Reads `dir/narx.json` and checks its contents, but not the files it names: for
    /// `narx check`, which reports a missing or truncated file next to the graphs' problems.
    pub fn read(dir: &Path) -> Result<Self, GraphError> {
        if !dir.is_dir() {
            return Err(bad_manifest(
                dir,
                format!(
                    "{} is not a model directory (run `narx export` to make one)",
                    dir.display()
                ),
            ));
        }
        let path = Self::path(dir);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                bad_manifest(
                    dir,
                    "missing: this directory was not written by `narx export`".into(),
                )
            } else {
                GraphError::io(&path, e)
            }
        })?;
        Self::parse(&text).map_err(|m| bad_manifest(dir, m))
    }

    /// Parses manifest text and checks its contents; the message names the field at fault.
    fn parse(text: &str) -> Result<Self, String> {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
        let version = match value.get("format_version") {
            None => return Err("no format_version".into()),
            Some(v) => v
                .as_u64()
                .ok_or_else(|| format!("format_version {v} is not a whole number"))?,
        };
        if version > FORMAT_VERSION as u64 {
            return Err(format!(
                "format version {version} is newer than this narx reads ({FORMAT_VERSION}); \
                 upgrade narx or re-export the model"
            ));
        }
        if version == 0 {
            return Err("format version 0 is not valid".into());
        }
        // The decoder configs are lenient types (they read configs copied from training
        // runs); the manifest's copies are what export wrote, so a key they would drop is
        // a mistake.
        let decoder_configs = ["/vq_decoder/config", "/larp_decoder/config"]
            .map(|pointer| value.pointer(pointer).cloned().map(|raw| (pointer, raw)));
        let manifest: Manifest =
            serde_json::from_value(value).map_err(|e| format!("malformed: {e}"))?;
        let written = [
            manifest
                .vq_decoder
                .as_ref()
                .map(|d| serde_json::to_value(&d.config)),
            manifest
                .larp_decoder
                .as_ref()
                .map(|d| serde_json::to_value(&d.config)),
        ];
        for (raw, written) in decoder_configs.into_iter().zip(written) {
            if let (Some((pointer, raw)), Some(written)) = (raw, written) {
                let written = written.map_err(|e| format!("{pointer}: {e}"))?;
                let field = pointer.trim_start_matches('/').replace('/', ".");
                if let Some(key) = unknown_key(&raw, &written, &field) {
                    return Err(format!("{key} is not a field of the decoder config"));
                }
            }
        }
        manifest.validate()?;
        Ok(manifest)
    }

    /// Consistency of the contents: the config is valid, everything the export derives
    /// from it (family, vocabulary, condition, heads, cache layout, decoders) is what it
    /// derives, and every file name stays inside the directory.
    fn validate(&self) -> Result<(), String> {
        if self.grid.is_empty() {
            return Err("grid is empty: it needs one extent per axis".into());
        }
        if let Some(axis) = self.grid.iter().position(|&n| n == 0) {
            return Err(format!(
                "grid {:?} has extent 0 along axis {axis}",
                self.grid
            ));
        }
        let spec = NarSpec::new(self.config.clone(), self.grid.clone(), self.dtype)
            .map_err(|e| e.to_string())?
            .with_layout(self.kv_cache.layout);
        let expected = Derived::of(&spec);
        if self.family != expected.family {
            return Err(format!(
                "family {} does not match its config, which is a {} model",
                self.family, expected.family
            ));
        }
        same("vocab_size", &self.vocab_size, &expected.vocab_size)?;
        same("parameters", &self.parameters, &expected.parameters)?;
        let mut condition = expected.condition;
        // Directories exported before the class token offset existed have none.
        if let (
            Condition::Class {
                class_token_offset: None,
                ..
            },
            Condition::Class {
                class_token_offset, ..
            },
        ) = (&self.condition, &mut condition)
        {
            *class_token_offset = None;
        }
        same("condition", &self.condition, &condition)?;
        same("number of heads", &self.heads.len(), &expected.heads.len())?;
        for (i, (head, want)) in self.heads.iter().zip(&expected.heads).enumerate() {
            same(&format!("heads[{i}].name"), &head.name, &want.name)?;
            same(&format!("heads[{i}].output"), &head.output, &want.output)?;
            same(&format!("heads[{i}].axis"), &head.axis, &want.axis)?;
        }
        let (kv, want) = (&self.kv_cache, &expected.kv_cache);
        same("kv_cache.layers", &kv.layers, &want.layers)?;
        same("kv_cache.kv_heads", &kv.kv_heads, &want.kv_heads)?;
        same("kv_cache.head_dim", &kv.head_dim, &want.head_dim)?;
        same("kv_cache.dtype", &kv.dtype, &want.dtype)?;
        same("kv_cache.capacity", &kv.capacity, &want.capacity)?;
        same("kv_cache.past_key", &kv.past_key, &want.past_key)?;
        same("kv_cache.past_value", &kv.past_value, &want.past_value)?;
        same("kv_cache.present_key", &kv.present_key, &want.present_key)?;
        same(
            "kv_cache.present_value",
            &kv.present_value,
            &want.present_value,
        )?;
        same(
            "kv_cache.past_key_bias",
            &kv.past_key_bias,
            &want.past_key_bias,
        )?;
        same(
            "kv_cache.present_key_bias",
            &kv.present_key_bias,
            &want.present_key_bias,
        )?;
        if self.cuda_graph && self.kv_cache.layout != CacheLayout::Static {
            return Err(
                "cuda_graph is set, but only a static export's shapes allow CUDA graphs".into(),
            );
        }
        self.validate_decoders(&spec)?;
        for (field, name) in self.file_fields().into_iter().chain(self.folder_fields()) {
            if !is_plain_name(name) {
                return Err(format!(
                    "{field} {name:?} must be a plain name inside the model directory"
                ));
            }
        }
        Ok(())
    }

    /// The decoder suits the model: the right kind, a valid config, the same tokenizer.
    fn validate_decoders(&self, spec: &NarSpec) -> Result<(), String> {
        let image = matches!(self.config, ModelConfig::Image(_));
        match (&self.vq_decoder, &self.larp_decoder) {
            (Some(_), Some(_)) => Err("it names both a VQ and a LARP decoder".into()),
            (Some(_), None) if !image => {
                Err("vq_decoder: a video model needs the LARP decoder".into())
            }
            (None, Some(_)) if image => {
                Err("larp_decoder: an image model needs a VQ decoder".into())
            }
            (Some(vq), None) => {
                let config = &vq.config;
                config
                    .validate()
                    .map_err(|e| format!("vq_decoder.config: {e}"))?;
                same(
                    "vq_decoder.config.codebook_size",
                    &config.codebook_size,
                    &self.vocab_size,
                )?;
                same("vq_decoder.patch", &vq.patch, &config.upsample_factor())
            }
            (None, Some(larp)) => {
                let config = &larp.config;
                config
                    .validate()
                    .map_err(|e| format!("larp_decoder.config: {e}"))?;
                same(
                    "larp_decoder.config.bottleneck.args.regularizer.args.codebook_size",
                    &config.codebook_size(),
                    &self.vocab_size,
                )?;
                same(
                    "larp_decoder.config.bottleneck_token_num",
                    &config.latent_tokens(),
                    &spec.cells(),
                )
            }
            (None, None) => Ok(()),
        }
    }

    /// The files and weights the manifest names are there, the weights of the recorded size.
    fn check_files(&self, dir: &Path) -> Result<(), String> {
        for file in self.files() {
            if !dir.join(file).is_file() {
                return Err(format!("{file} is missing from the model directory"));
            }
        }
        let weights = dir.join(&self.weights.file);
        let actual = std::fs::metadata(&weights).map(|m| m.len()).unwrap_or(0);
        if actual != self.weights.bytes {
            return Err(format!(
                "{} has {actual} bytes, the manifest says {} (truncated or replaced?)",
                self.weights.file, self.weights.bytes
            ));
        }
        Ok(())
    }

    /// Every file of the directory besides the manifest: graphs, weights, decoder,
    /// calibration tables.
    pub fn files(&self) -> Vec<&str> {
        self.file_fields().into_iter().map(|(_, f)| f).collect()
    }

    /// [`Manifest::files`], each with the field that names it.
    fn file_fields(&self) -> Vec<(&'static str, &str)> {
        let mut files = vec![
            ("graphs.prefill.file", self.graphs.prefill.file.as_str()),
            ("graphs.step.file", self.graphs.step.file.as_str()),
            ("weights.file", self.weights.file.as_str()),
        ];
        let select = self.graphs.select.as_ref();
        files.extend(select.map(|g| ("graphs.select.file", g.file.as_str())));
        let vq = self.vq_decoder.as_ref();
        files.extend(vq.map(|d| ("vq_decoder.graph.file", d.graph.file.as_str())));
        let larp = self.larp_decoder.as_ref();
        files.extend(larp.map(|d| ("larp_decoder.graph.file", d.graph.file.as_str())));
        if let Some(c) = &self.calibration {
            files.extend([
                ("calibration.ranges", c.ranges.as_str()),
                ("calibration.trt_cache", c.trt_cache.as_str()),
                ("calibration.ort_table", c.ort_table.as_str()),
                ("calibration.quality", c.quality.as_str()),
            ]);
        }
        files
    }

    /// The folders inside the directory the manifest names, each with its field.
    fn folder_fields(&self) -> Vec<(&'static str, &str)> {
        let trt = &self.tensorrt;
        let mut folders = Vec::new();
        let qdq = self.calibration.as_ref();
        folders.extend(qdq.map(|c| ("calibration.qdq_model", c.qdq_model.as_str())));
        folders.extend(
            trt.engine_cache
                .as_deref()
                .map(|f| ("tensorrt.engine_cache", f)),
        );
        folders.extend(
            trt.timing_cache
                .as_deref()
                .map(|f| ("tensorrt.timing_cache", f)),
        );
        folders
    }

    /// The decoder graph (VQ for images, LARP for video), if the export was given one.
    pub fn decoder_graph(&self) -> Option<&GraphFile> {
        let vq = self.vq_decoder.as_ref().map(|d| &d.graph);
        vq.or(self.larp_decoder.as_ref().map(|d| &d.graph))
    }
}

/// What a manifest states that follows from the model alone (config, grid, dtype, cache
/// layout): export writes it, [`Manifest::load`] checks it is still so.
struct Derived {
    family: Family,
    vocab_size: usize,
    parameters: usize,
    condition: Condition,
    heads: Vec<Head>,
    kv_cache: KvCache,
    sampling: SamplingDefaults,
}

impl Derived {
    fn of(spec: &NarSpec) -> Derived {
        let config = &spec.config;
        let shape = config.transformer();
        let class_condition = || {
            let (num_classes, rows) = config.classes().unwrap_or_default();
            Condition::Class {
                num_classes,
                null_class: (rows > num_classes).then_some(num_classes),
                class_token_offset: Some(shape.vocab_size),
            }
        };
        let (family, condition, sampling) = match config {
            ModelConfig::Video(_) => (
                Family::NarVideo,
                class_condition(),
                // NAR-videos README and run_sample_one.sh (sample.py's own default is cfg 1.0).
                SamplingDefaults {
                    cfg_scale: 1.25,
                    cfg_interval: -1,
                    temperature: 1.0,
                    top_k: 0,
                    top_p: 1.0,
                },
            ),
            ModelConfig::Image(args) => match args.condition() {
                ConditionKind::Class => (
                    if args.is_llamagen() {
                        Family::LlamaGenC2i
                    } else {
                        Family::NarC2i
                    },
                    class_condition(),
                    // sample_c2i.py (LlamaGen's sampler has the same defaults)
                    SamplingDefaults {
                        cfg_scale: 4.0,
                        cfg_interval: -1,
                        temperature: 1.0,
                        top_k: 2000,
                        top_p: 1.0,
                    },
                ),
                ConditionKind::Caption => (
                    Family::NarT2i,
                    Condition::Caption {
                        tokens: spec.condition_len(),
                        dim: args.caption_dim,
                    },
                    // sample_t2i.py
                    SamplingDefaults {
                        cfg_scale: 7.5,
                        cfg_interval: -1,
                        temperature: 1.0,
                        top_k: 0,
                        top_p: 1.0,
                    },
                ),
            },
        };
        Derived {
            family,
            vocab_size: shape.vocab_size,
            parameters: config.parameter_count(),
            condition,
            heads: config
                .heads()
                .into_iter()
                .map(|head| Head {
                    name: head.name.into(),
                    output: head.output.into(),
                    axis: head.axis,
                })
                .collect(),
            kv_cache: KvCache {
                layout: spec.layout,
                layers: config.blocks(),
                kv_heads: shape.kv_heads(),
                head_dim: shape.head_dim(),
                dtype: spec.dtype,
                capacity: spec.cache_capacity(),
                past_key: names::PAST_KEY.into(),
                past_value: names::PAST_VALUE.into(),
                present_key: names::PRESENT_KEY.into(),
                present_value: names::PRESENT_VALUE.into(),
                past_key_bias: names::PAST_KEY_BIAS.into(),
                present_key_bias: names::PRESENT_KEY_BIAS.into(),
            },
            sampling,
        }
    }
}

/// A name the manifest may give a file or folder: no directories, nothing hidden.
fn is_plain_name(name: &str) -> bool {
    !name.is_empty() && !name.contains(['/', '\\']) && !name.starts_with('.')
}

fn bad_manifest(dir: &Path, message: String) -> GraphError {
    GraphError::Manifest {
        path: Manifest::path(dir).display().to_string(),
        message,
    }
}

/// `field` holds `actual`, and its config implies `expected`.
fn same<T: PartialEq + Serialize>(field: &str, actual: &T, expected: &T) -> Result<(), String> {
    if actual == expected {
        return Ok(());
    }
    let json = |v: &T| serde_json::to_string(v).unwrap_or_default();
    Err(format!(
        "{field} is {}, but the model config implies {}",
        json(actual),
        json(expected)
    ))
}

/// The first key of `raw` (searched depth first, named by its path under `field`) that
/// `written`, the same object read into a lenient type and written back, does not have.
fn unknown_key(
    raw: &serde_json::Value,
    written: &serde_json::Value,
    field: &str,
) -> Option<String> {
    let (serde_json::Value::Object(raw), serde_json::Value::Object(written)) = (raw, written)
    else {
        return None;
    };
    raw.iter().find_map(|(key, value)| {
        let path = format!("{field}.{key}");
        match written.get(key) {
            None => Some(path),
            Some(kept) => unknown_key(value, kept, &path),
        }
    })
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::*;
    use crate::check::tests::{captions, image, larp_config, video};
    use crate::nar::Zeros;
    use crate::weights::WeightStore;

    /// The manifest export writes for `config` (graphs described, no files), with the
    /// tokenizer decoder of its kind, as JSON to edit.
    fn exported(config: ModelConfig) -> Value {
        let grid = match &config {
            ModelConfig::Image(_) => vec![4, 4],
            ModelConfig::Video(args) => args.latent_shape.clone(),
        };
        let spec = NarSpec::new(config.clone(), grid, DType::F32).unwrap();
        let mut store = WeightStore::inline();
        let graphs = nar::build(&spec, &Zeros(config.parameters()), &mut store).unwrap();
        let describe = |file, model| GraphFile::describe(file, 0, model).unwrap();
        let prefill = describe("prefill.onnx", &graphs.prefill);
        let step = describe("step.onnx", &graphs.step);
        // Any graph will do for the decoder's entry: the contents checks read no graph.
        let decoder = describe("decoder.onnx", &graphs.step);
        let mut manifest = Manifest::for_export(&spec, prefill, step, 0).unwrap();
        match config {
            ModelConfig::Image(_) => {
                let vq = crate::vq::tests::small();
                manifest.vq_decoder = Some(DecoderFile {
                    graph: decoder,
                    patch: vq.upsample_factor(),
                    config: vq,
                });
            }
            ModelConfig::Video(_) => {
                manifest.larp_decoder = Some(LarpDecoderFile {
                    graph: decoder,
                    config: larp_config(),
                });
            }
        }
        serde_json::to_value(&manifest).unwrap()
    }

    fn calibration(qdq_model: &str, ranges: &str) -> Value {
        json!({
            "method": "max", "generations": 1, "tensors": 1, "ranges": ranges,
            "trt_cache": "calibration.cache", "trt_version": "TRT-100000",
            "ort_table": "calibration.flatbuffers", "qdq_model": qdq_model,
            "quality": "quality.json"
        })
    }

    /// Each edit of an exported manifest, and what the refusal must say.
    type Case = (&'static str, fn(&mut Value), &'static [&'static str]);

    fn refusals(config: ModelConfig, cases: &[Case]) {
        let base = exported(config);
        Manifest::parse(&base.to_string()).expect("the exported manifest reads");
        for (what, edit, needles) in cases {
            let mut value = base.clone();
            edit(&mut value);
            let err = Manifest::parse(&value.to_string())
                .err()
                .unwrap_or_else(|| panic!("{what}: accepted"));
            for needle in *needles {
                assert!(err.contains(needle), "{what}: {err:?} lacks {needle:?}");
            }
        }
    }

    #[test]
    fn image_manifests_that_contradict_their_config_are_refused() {
        refusals(
            image(),
            &[
                (
                    "no version",
                    |m| m["format_version"] = Value::Null,
                    &["format_version null is not a whole number"],
                ),
                (
                    "string version",
                    |m| m["format_version"] = "1".into(),
                    &["format_version \"1\" is not a whole number"],
                ),
                (
                    "version absent",
                    |m| {
                        m.as_object_mut().unwrap().remove("format_version");
                    },
                    &["no format_version"],
                ),
                (
                    "future version",
                    |m| m["format_version"] = 2.into(),
                    &["format version 2 is newer"],
                ),
                (
                    "version 0",
                    |m| m["format_version"] = 0.into(),
                    &["format version 0"],
                ),
                (
                    "n_head 0",
                    |m| m["config"]["n_head"] = 0.into(),
                    &["n_head"],
                ),
                (
                    "multiple_of 0",
                    |m| m["config"]["multiple_of"] = 0.into(),
                    &["multiple_of"],
                ),
                (
                    "config vocab 0",
                    |m| m["config"]["vocab_size"] = 0.into(),
                    &["vocab_size"],
                ),
                (
                    "num_classes 0",
                    |m| m["config"]["num_classes"] = 0.into(),
                    &["num_classes"],
                ),
                (
                    "unknown config key",
                    |m| m["config"]["n_heads"] = 2.into(),
                    &["n_heads"],
                ),
                ("empty grid", |m| m["grid"] = json!([]), &["grid is empty"]),
                (
                    "zero extent",
                    |m| m["grid"] = json!([4, 0]),
                    &["grid [4, 0] has extent 0 along axis 1"],
                ),
                (
                    "not square",
                    |m| m["grid"] = json!([4, 5]),
                    &["grid [4, 5]", "n × n"],
                ),
                (
                    "huge grid",
                    |m| m["grid"] = json!([1u64 << 40, 1u64 << 40]),
                    &["positions"],
                ),
                (
                    "vocab",
                    |m| m["vocab_size"] = 17.into(),
                    &["vocab_size is 17", "implies 16"],
                ),
                (
                    "parameters",
                    |m| m["parameters"] = 1.into(),
                    &["parameters is 1"],
                ),
                (
                    "family",
                    |m| m["family"] = "nar-t2i".into(),
                    &["family nar-t2i", "a nar-c2i model"],
                ),
                (
                    "llamagen family",
                    |m| m["family"] = "llamagen-c2i".into(),
                    &["family llamagen-c2i"],
                ),
                (
                    "caption condition",
                    |m| m["condition"] = json!({"kind": "caption", "tokens": 1, "dim": 8}),
                    &["condition is {\"kind\":\"caption\"", "\"num_classes\":10"],
                ),
                (
                    "classes",
                    |m| m["condition"]["num_classes"] = 11.into(),
                    &["condition", "\"num_classes\":10"],
                ),
                (
                    "null class",
                    |m| m["condition"]["null_class"] = Value::Null,
                    &["condition", "\"null_class\":10"],
                ),
                (
                    "class offset",
                    |m| m["condition"]["class_token_offset"] = 3.into(),
                    &["condition", "\"class_token_offset\":16"],
                ),
                (
                    "one head",
                    |m| {
                        m["heads"].as_array_mut().unwrap().pop();
                    },
                    &["number of heads is 1", "implies 2"],
                ),
                (
                    "no heads",
                    |m| m["heads"] = json!([]),
                    &["number of heads is 0"],
                ),
                (
                    "head name",
                    |m| m["heads"][0]["name"] = "left".into(),
                    &["heads[0].name is \"left\"", "\"right\""],
                ),
                (
                    "head output",
                    |m| m["heads"][0]["output"] = "logits_down".into(),
                    &["heads[0].output", "\"logits_right\""],
                ),
                (
                    "head axis",
                    |m| m["heads"][1]["axis"] = 5.into(),
                    &["heads[1].axis is 5", "implies 0"],
                ),
                (
                    "layers",
                    |m| m["kv_cache"]["layers"] = 2.into(),
                    &["kv_cache.layers is 2", "implies 3"],
                ),
                (
                    "kv heads",
                    |m| m["kv_cache"]["kv_heads"] = 1.into(),
                    &["kv_cache.kv_heads is 1"],
                ),
                (
                    "head dim",
                    |m| m["kv_cache"]["head_dim"] = 64.into(),
                    &["kv_cache.head_dim is 64", "implies 32"],
                ),
                (
                    "cache dtype",
                    |m| m["kv_cache"]["dtype"] = "f16".into(),
                    &["kv_cache.dtype is \"f16\""],
                ),
                (
                    "capacity",
                    |m| m["kv_cache"]["capacity"] = u64::MAX.into(),
                    &["kv_cache.capacity", "implies 24"],
                ),
                (
                    "cache name",
                    |m| m["kv_cache"]["past_key"] = "past_{layer}_key".into(),
                    &["kv_cache.past_key", "past.{layer}.key"],
                ),
                (
                    "bias name",
                    |m| m["kv_cache"]["present_key_bias"] = "bias".into(),
                    &["kv_cache.present_key_bias"],
                ),
                (
                    "dtype",
                    |m| m["dtype"] = "i64".into(),
                    &["I64 is not a model dtype"],
                ),
                (
                    "cuda graph",
                    |m| m["cuda_graph"] = true.into(),
                    &["cuda_graph is set"],
                ),
                (
                    "misspelt codebook",
                    |m| {
                        let config = m["vq_decoder"]["config"].as_object_mut().unwrap();
                        let size = config.remove("codebook_size").unwrap();
                        config.insert("codebok_size".into(), size);
                    },
                    &["vq_decoder.config.codebok_size is not a field"],
                ),
                (
                    "codebook",
                    |m| m["vq_decoder"]["config"]["codebook_size"] = 32.into(),
                    &["vq_decoder.config.codebook_size is 32", "implies 16"],
                ),
                (
                    "invalid decoder",
                    |m| m["vq_decoder"]["config"]["ch"] = 0.into(),
                    &["vq_decoder.config", "ch must be positive"],
                ),
                (
                    "patch",
                    |m| m["vq_decoder"]["patch"] = 16.into(),
                    &["vq_decoder.patch is 16", "implies 2"],
                ),
                (
                    "LARP for an image",
                    |m| {
                        let vq = m.as_object_mut().unwrap().remove("vq_decoder").unwrap();
                        let larp = json!({"graph": vq["graph"], "config": larp_config()});
                        m["larp_decoder"] = larp;
                    },
                    &["larp_decoder: an image model needs a VQ decoder"],
                ),
                (
                    "both decoders",
                    |m| {
                        m["larp_decoder"] =
                            json!({"graph": m["vq_decoder"]["graph"], "config": larp_config()});
                    },
                    &["both a VQ and a LARP decoder"],
                ),
                (
                    "folder in a file name",
                    |m| m["graphs"]["step"]["file"] = "../step.onnx".into(),
                    &["graphs.step.file \"../step.onnx\" must be a plain name"],
                ),
                (
                    "absolute weights",
                    |m| m["weights"]["file"] = "/weights.bin".into(),
                    &["weights.file \"/weights.bin\""],
                ),
                (
                    "hidden decoder",
                    |m| m["vq_decoder"]["graph"]["file"] = ".decoder.onnx".into(),
                    &["vq_decoder.graph.file"],
                ),
                (
                    "escaping QDQ model",
                    |m| m["calibration"] = calibration("../int8", "ranges.json"),
                    &["calibration.qdq_model \"../int8\" must be a plain name"],
                ),
                (
                    "absolute QDQ model",
                    |m| m["calibration"] = calibration("/int8", "ranges.json"),
                    &["calibration.qdq_model \"/int8\""],
                ),
                (
                    "empty table name",
                    |m| m["calibration"] = calibration("int8", ""),
                    &["calibration.ranges \"\" must be a plain name"],
                ),
                (
                    "engine cache",
                    |m| m["tensorrt"] = json!({"engine_cache": "/tmp/engines"}),
                    &["tensorrt.engine_cache \"/tmp/engines\""],
                ),
                (
                    "timing cache",
                    |m| m["tensorrt"] = json!({"timing_cache": "a\\b"}),
                    &["tensorrt.timing_cache"],
                ),
            ],
        );
    }

    #[test]
    fn caption_and_video_manifests_that_contradict_their_config_are_refused() {
        refusals(
            captions(),
            &[
                (
                    "family",
                    |m| m["family"] = "nar-c2i".into(),
                    &["family nar-c2i", "a nar-t2i model"],
                ),
                (
                    "class condition",
                    |m| {
                        m["condition"] =
                            json!({"kind": "class", "num_classes": 10, "null_class": 10})
                    },
                    &[
                        "condition is {\"kind\":\"class\"",
                        "{\"kind\":\"caption\",\"tokens\":4,\"dim\":8}",
                    ],
                ),
                (
                    "tokens",
                    |m| m["condition"]["tokens"] = 5.into(),
                    &["condition", "\"tokens\":4"],
                ),
            ],
        );
        refusals(
            video(),
            &[
                (
                    "family",
                    |m| m["family"] = "nar-c2i".into(),
                    &["family nar-c2i", "a nar-video model"],
                ),
                (
                    "grid",
                    |m| m["grid"] = json!([3, 4, 5]),
                    &["video grid [3, 4, 5]", "latent_shape [3, 4, 4]"],
                ),
                (
                    "overflowing grid",
                    |m| {
                        let huge = json!([1u64 << 40, 1u64 << 40, 1u64 << 40]);
                        m["grid"] = huge.clone();
                        m["config"]["latent_shape"] = huge;
                    },
                    &["positions"],
                ),
                (
                    "no down head",
                    |m| {
                        m["heads"].as_array_mut().unwrap().truncate(2);
                    },
                    &["number of heads is 2", "implies 3"],
                ),
                (
                    "codebook",
                    |m| {
                        m["larp_decoder"]["config"]["bottleneck"]["args"]["regularizer"]["args"]
                            ["codebook_size"] = 64.into();
                    },
                    &["regularizer.args.codebook_size is 64", "implies 128"],
                ),
                (
                    "misspelt key",
                    |m| {
                        m["larp_decoder"]["config"]["bottleneck"]["args"]["bottleneck_dimension"] =
                            16.into()
                    },
                    &["larp_decoder.config.bottleneck.args.bottleneck_dimension is not a field"],
                ),
                (
                    "latent tokens",
                    |m| m["larp_decoder"]["config"]["bottleneck_token_num"] = 64.into(),
                    &[
                        "larp_decoder.config.bottleneck_token_num is 64",
                        "implies 48",
                    ],
                ),
                (
                    "VQ for a video",
                    |m| {
                        let larp = m.as_object_mut().unwrap().remove("larp_decoder").unwrap();
                        m["vq_decoder"] =
                            json!({"graph": larp["graph"], "config": {}, "patch": 16});
                    },
                    &["vq_decoder: a video model needs the LARP decoder"],
                ),
            ],
        );
    }

    #[test]
    fn directories_exported_before_the_class_token_offset_still_read() {
        let mut value = exported(image());
        let condition = value["condition"].as_object_mut().unwrap();
        condition.remove("class_token_offset").unwrap();
        let manifest = Manifest::parse(&value.to_string()).unwrap();
        assert!(matches!(
            manifest.condition,
            Condition::Class {
                class_token_offset: None,
                ..
            }
        ));
    }

    #[test]
    fn plain_names() {
        for name in ["weights.bin", "int8", "trt-cache", "a.b"] {
            assert!(is_plain_name(name), "{name}");
        }
        for name in ["", ".", "..", "../x", "/x", "a/b", "a\\b", ".hidden"] {
            assert!(!is_plain_name(name), "{name:?}");
        }
    }
}
