//! `narx calibrate`: generate on calibration prompts with the calibration build of the graphs,
//! turn what the activations did into clipping ranges, and write a copy of the model
//! directory with the ranges as TensorRT's and ONNX Runtime's tables.

use std::collections::BTreeMap;
use std::path::Path;

use narx_export::model_dir::Staging;
use narx_graphs::manifest::{CalibrationFiles, Manifest};
use narx_graphs::{decode_model, encode_model, DType, GraphError};
use narx_runtime::generate::{GenerateOptions, Prompts};
use narx_runtime::load::{AnyGenerator, LoadOptions, Provider, Purpose};

use crate::observe::{activation_inputs, expose, Observations};
use crate::ranges::Method;
use crate::tables::{ort_trt_table, trt_cache, Calibrator};
use crate::CalibrationError;

/// File names the calibration adds to a model directory.
pub const RANGES_FILE: &str = "calibration.json";
pub const TRT_CACHE_FILE: &str = "calibration.cache";
pub const ORT_TABLE_FILE: &str = "calibration.flatbuffers";

/// Where the calibration build of the graphs runs, inside the staging directory.
const WORK_DIR: &str = "calibration-run";

pub struct CalibrateRequest<'a> {
    pub model: &'a Path,
    pub output: &'a Path,
    /// One generation per entry (a batch of prompts each).
    pub prompts: Vec<Prompts>,
    pub options: GenerateOptions,
    pub method: Method,
    pub trt_version: String,
    pub provider: Provider,
    pub load: LoadOptions,
    pub force: bool,
}

/// What was calibrated.
#[derive(Debug)]
pub struct Calibration {
    pub ranges: Vec<(String, f32)>,
    pub generations: usize,
}

pub fn calibrate(request: &CalibrateRequest) -> Result<Calibration, CalibrationError> {
    let manifest = Manifest::load(request.model).map_err(graph_error)?;
    if manifest.dtype != DType::F32 {
        return Err(CalibrationError::BadInput(format!(
            "{} holds {:?} weights; calibrate a float32 export",
            request.model.display(),
            manifest.dtype
        )));
    }
    if request.prompts.is_empty() || request.prompts.iter().any(Prompts::is_empty) {
        return Err(CalibrationError::BadInput(
            "no calibration prompts: give at least one class".into(),
        ));
    }
    let staging = Staging::new(request.output, request.force).map_err(export_error)?;
    for file in manifest.files() {
        link_or_copy(&request.model.join(file), &staging.path().join(file))?;
    }
    let observations = observe(request, &manifest, staging.path())?;
    let ranges = ranges(&observations, request.method)?;
    let mut manifest = manifest;
    write_tables(staging.path(), &ranges, request)?;
    manifest.calibration = Some(CalibrationFiles {
        method: method_name(request.method),
        generations: request.prompts.len(),
        tensors: ranges.len(),
        ranges: RANGES_FILE.into(),
        trt_cache: TRT_CACHE_FILE.into(),
        trt_version: request.trt_version.clone(),
        ort_table: ORT_TABLE_FILE.into(),
    });
    manifest.save(staging.path()).map_err(graph_error)?;
    staging.commit().map_err(export_error)?;
    Ok(Calibration {
        ranges,
        generations: request.prompts.len(),
    })
}

/// Runs every generation on the calibration build of the prefill and step graphs, written
/// beside a link to the weights in `staging/calibration-run/` (removed afterwards).
fn observe(
    request: &CalibrateRequest,
    manifest: &Manifest,
    staging: &Path,
) -> Result<Observations, CalibrationError> {
    let work = staging.join(WORK_DIR);
    std::fs::create_dir(&work).map_err(|e| io_error(&work, e))?;
    let mut run_manifest = manifest.clone();
    run_manifest.vq_decoder = None;
    run_manifest.larp_decoder = None;
    run_manifest.calibration = None;
    let mut tensors = Vec::new();
    for graph in [
        &mut run_manifest.graphs.prefill,
        &mut run_manifest.graphs.step,
    ] {
        let path = request.model.join(&graph.file);
        let bytes = std::fs::read(&path).map_err(|e| io_error(&path, e))?;
        let mut model = decode_model(&bytes).map_err(graph_error)?;
        let exposed = activation_inputs(&model);
        expose(&mut model, &exposed);
        tensors.extend(exposed);
        graph.file = format!("calibration-{}", graph.file);
        let out = work.join(&graph.file);
        std::fs::write(&out, encode_model(&model)).map_err(|e| io_error(&out, e))?;
    }
    link_or_copy(
        &request.model.join(&manifest.weights.file),
        &work.join(&manifest.weights.file),
    )?;
    run_manifest.save(&work).map_err(graph_error)?;

    let mut observations = Observations::expecting(tensors);
    let (mut generator, _) =
        AnyGenerator::open(&work, request.provider, &request.load, Purpose::Generate)
            .map_err(runtime_error)?;
    let mut failure = None;
    for (seed, prompts) in request.prompts.iter().enumerate() {
        let options = GenerateOptions {
            seed: request.options.seed + seed as u64,
            ..request.options.clone()
        };
        generator
            .generate_observing(prompts, &options, &mut |_| {}, &mut |name, values| {
                if let Err(e) = observations.observe(name, values) {
                    failure.get_or_insert(e);
                }
            })
            .map_err(runtime_error)?;
        if let Some(e) = failure.take() {
            return Err(e);
        }
    }
    drop(generator);
    std::fs::remove_dir_all(&work).map_err(|e| io_error(&work, e))?;
    Ok(observations)
}

/// One range per tensor; every tensor must have been exercised.
fn ranges(
    observations: &Observations,
    method: Method,
) -> Result<Vec<(String, f32)>, CalibrationError> {
    let mut ranges = Vec::new();
    let mut unexercised = Vec::new();
    for (tensor, histogram) in observations.histograms() {
        match method.amax(histogram) {
            Ok(amax) => ranges.push((tensor.clone(), amax)),
            Err(_) => unexercised.push(tensor.as_str()),
        }
    }
    if !unexercised.is_empty() {
        return Err(CalibrationError::BadInput(format!(
            "the calibration set gave no statistics (only zeros, or never run) for {}: \
             calibrate with more or other prompts",
            unexercised.join(", ")
        )));
    }
    Ok(ranges)
}

fn write_tables(
    dir: &Path,
    ranges: &[(String, f32)],
    request: &CalibrateRequest,
) -> Result<(), CalibrationError> {
    let json: BTreeMap<&str, f32> = ranges.iter().map(|(t, a)| (t.as_str(), *a)).collect();
    let json =
        serde_json::to_string_pretty(&json).map_err(|e| CalibrationError::Table(e.to_string()))?;
    let calibrator = match request.method {
        Method::Entropy => Calibrator::Entropy2,
        Method::Max | Method::Percentile(_) => Calibrator::MinMax,
    };
    let files: [(&str, Vec<u8>); 3] = [
        (RANGES_FILE, (json + "\n").into_bytes()),
        (
            TRT_CACHE_FILE,
            trt_cache(&request.trt_version, calibrator, ranges).into_bytes(),
        ),
        (ORT_TABLE_FILE, ort_trt_table(ranges)),
    ];
    for (name, bytes) in files {
        let path = dir.join(name);
        std::fs::write(&path, bytes).map_err(|e| io_error(&path, e))?;
    }
    Ok(())
}

fn method_name(method: Method) -> String {
    match method {
        Method::Max => "max".into(),
        Method::Percentile(p) => format!("percentile {p}"),
        Method::Entropy => "entropy".into(),
    }
}

/// A hard link where the filesystem allows (the weights are large), else a copy.
fn link_or_copy(from: &Path, to: &Path) -> Result<(), CalibrationError> {
    if std::fs::hard_link(from, to).is_ok() {
        return Ok(());
    }
    std::fs::copy(from, to)
        .map(|_| ())
        .map_err(|e| io_error(to, e))
}

fn io_error(path: &Path, e: std::io::Error) -> CalibrationError {
    CalibrationError::Io(GraphError::io(path, e).to_string())
}

fn graph_error(e: GraphError) -> CalibrationError {
    match e {
        GraphError::Io { .. } => CalibrationError::Io(e.to_string()),
        other => CalibrationError::BadInput(other.to_string()),
    }
}

fn export_error(e: narx_export::ExportError) -> CalibrationError {
    if e.is_bad_input() {
        CalibrationError::BadInput(e.to_string())
    } else {
        CalibrationError::Io(e.to_string())
    }
}

fn runtime_error(e: narx_runtime::RuntimeError) -> CalibrationError {
    if e.is_bad_input() {
        CalibrationError::BadInput(e.to_string())
    } else {
        CalibrationError::Run(e.to_string())
    }
}
