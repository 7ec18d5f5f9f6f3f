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
pub const PROFILE_MAX_PROMPTS: usize = 8;

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
    /// The QDQ model directory made from the ranges, relative to this one.
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
    /// The graph output holding its logits, `(batch, width, vocab)`.
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
    /// Fixed sizes and symbolic names (`batch`, `width`, `past`, `past+width`).
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

/// How the KV cache travels between calls (see `nar` module docs).
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
    /// Name patterns with `{layer}`.
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
        pattern.replace("{layer}", &layer.to_string())
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
        let config = &spec.config;
        let shape = config.transformer();
        let c = spec.condition_len();
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
                        tokens: c,
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
        Ok(Manifest {
            format_version: FORMAT_VERSION,
            producer: format!("narx {}", env!("CARGO_PKG_VERSION")),
            family,
            config: config.clone(),
            grid: spec.grid.clone(),
            vocab_size: shape.vocab_size,
            dtype: spec.dtype,
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
            graphs: Graphs {
                prefill,
                step,
                select: None,
            },
            weights: WeightsFile {
                file: WEIGHTS_FILE.into(),
                bytes: weight_bytes,
            },
            kv_cache: KvCache {
                layout: spec.layout,
                layers: config.blocks(),
                kv_heads: shape.kv_heads(),
                head_dim: shape.head_dim(),
                dtype: spec.dtype,
                capacity: spec.cache_capacity(),
                past_key: "past.{layer}.key".into(),
                past_value: "past.{layer}.value".into(),
                present_key: "present.{layer}.key".into(),
                present_value: "present.{layer}.value".into(),
                past_key_bias: names::PAST_KEY_BIAS.into(),
                present_key_bias: names::PRESENT_KEY_BIAS.into(),
            },
            sampling,
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

    /// Reads and checks `dir/narx.json`.
    pub fn load(dir: &Path) -> Result<Self, GraphError> {
        let path = Self::path(dir);
        let bad = |message: String| GraphError::Manifest {
            path: path.display().to_string(),
            message,
        };
        if !dir.is_dir() {
            return Err(bad(format!(
                "{} is not a model directory (run `narx export` to make one)",
                dir.display()
            )));
        }
        let text = std::fs::read_to_string(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                bad("missing: this directory was not written by `narx export`".into())
            } else {
                GraphError::io(&path, e)
            }
        })?;
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        let version = value
            .get("format_version")
            .and_then(|v| v.as_u64())
            .ok_or_else(|| bad("no format_version".into()))?;
        if version > FORMAT_VERSION as u64 {
            return Err(bad(format!(
                "format version {version} is newer than this narx reads ({FORMAT_VERSION}); \
                 upgrade narx or re-export the model"
            )));
        }
        if version == 0 {
            return Err(bad("format version 0 is not valid".into()));
        }
        let manifest: Manifest =
            serde_json::from_value(value).map_err(|e| bad(format!("malformed: {e}")))?;
        manifest.check(dir).map_err(bad)?;
        Ok(manifest)
    }

    /// Consistency a hand-edited or truncated directory could break.
    fn check(&self, dir: &Path) -> Result<(), String> {
        if self.grid.is_empty() || self.grid.contains(&0) {
            return Err(format!("grid {:?} is empty", self.grid));
        }
        if self.heads.is_empty() {
            return Err("no heads".into());
        }
        let (kind, expected) = match &self.config {
            ModelConfig::Video(_) => ("video", vec![Family::NarVideo]),
            ModelConfig::Image(args) if args.is_llamagen() => {
                ("LlamaGen", vec![Family::LlamaGenC2i])
            }
            ModelConfig::Image(_) => ("NAR image", vec![Family::NarC2i, Family::NarT2i]),
        };
        if !expected.contains(&self.family) {
            return Err(format!(
                "family {} does not match its config (a {kind} model's arguments)",
                self.family
            ));
        }
        for head in &self.heads {
            if head.axis >= self.grid.len() {
                return Err(format!(
                    "head {} predicts along axis {} of a {}-D grid",
                    head.name,
                    head.axis,
                    self.grid.len()
                ));
            }
        }
        if self.cuda_graph && self.kv_cache.layout != CacheLayout::Static {
            return Err(
                "cuda_graph is set, but only a static export's shapes allow CUDA graphs".into(),
            );
        }
        if self.vq_decoder.is_some() && self.larp_decoder.is_some() {
            return Err("it names both a VQ and a LARP decoder".into());
        }
        for file in self.files() {
            if file.contains('/') || file.contains('\\') || file.starts_with('.') {
                return Err(format!("file name {file:?} must be a plain name"));
            }
            let path = dir.join(file);
            if !path.is_file() {
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
        let mut files = vec![
            self.graphs.prefill.file.as_str(),
            self.graphs.step.file.as_str(),
            self.weights.file.as_str(),
        ];
        files.extend(self.graphs.select.as_ref().map(|g| g.file.as_str()));
        files.extend(self.decoder_graph().map(|g| g.file.as_str()));
        if let Some(c) = &self.calibration {
            files.extend([
                c.ranges.as_str(),
                c.trt_cache.as_str(),
                c.ort_table.as_str(),
                c.quality.as_str(),
            ]);
        }
        files
    }

    /// The decoder graph (VQ for images, LARP for video), if the export was given one.
    pub fn decoder_graph(&self) -> Option<&GraphFile> {
        let vq = self.vq_decoder.as_ref().map(|d| &d.graph);
        vq.or(self.larp_decoder.as_ref().map(|d| &d.graph))
    }

    /// The graph input description named `name`, if the graph has it.
    pub fn input<'a>(graph: &'a GraphFile, name: &str) -> Option<&'a TensorDesc> {
        graph.inputs.iter().find(|d| d.name == name)
    }
}
