//! `narx calibrate`: generate on calibration prompts with the calibration build of the graphs,
//! turn what the activations did into clipping ranges, and write a copy of the model
//! directory with the ranges as TensorRT's and ONNX Runtime's tables.

use std::collections::BTreeMap;
use std::path::Path;

use narx_export::checkpoint::map_file;
use narx_export::model_dir::Staging;
use narx_graphs::manifest::{CalibrationFiles, GraphFile, Manifest};
use narx_graphs::onnx::TensorProto;
use narx_graphs::qdq::quantize;
use narx_graphs::weights::WeightStore;
use narx_graphs::{decode_model, encode_model, DType, GraphError};
use narx_runtime::generate::{GenerateOptions, Prompts};
use narx_runtime::load::{AnyGenerator, LoadOptions, Provider, Purpose};

use crate::observe::{activation_inputs, expose, Observations};
use crate::quality::{check_comparable, compare, Quality};
use crate::ranges::Method;
use crate::tables::{check_trt_version, ort_trt_table, trt_cache, Calibrator};
use crate::CalibrationError;

/// File names the calibration adds to a model directory.
pub const RANGES_FILE: &str = "calibration.json";
pub const TRT_CACHE_FILE: &str = "calibration.cache";
pub const ORT_TABLE_FILE: &str = "calibration.flatbuffers";
pub const QUALITY_FILE: &str = "quality.json";

/// Where the calibration build of the graphs runs, inside the staging directory.
const WORK_DIR: &str = "calibration-run";
/// The QDQ model directory, inside the calibrated one.
pub const QDQ_DIR: &str = "int8";

pub struct CalibrateRequest<'a> {
    pub model: &'a Path,
    pub output: &'a Path,
    /// One generation per entry (a batch of prompts each).
    pub prompts: Vec<Prompts>,
    /// Prompts for the quality report.
    pub holdout: Vec<Prompts>,
    /// Whether `holdout` shares no prompt with `prompts`; recorded in `quality.json`, since
    /// figures measured on the calibration prompts flatter the INT8 model.
    pub held_out: bool,
    /// A float16 export of the same model, to report beside the QDQ model.
    pub fp16_model: Option<&'a Path>,
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
    pub qdq: Quality,
    pub fp16: Option<Quality>,
}

pub fn calibrate(request: &CalibrateRequest) -> Result<Calibration, CalibrationError> {
    request.method.validate()?;
    check_trt_version(&request.trt_version)?;
    let mut manifest = Manifest::load(request.model).map_err(graph_error)?;
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
    if let Some(fp16) = request.fp16_model {
        let candidate = Manifest::load(fp16).map_err(graph_error)?;
        check_comparable(&manifest, &candidate, fp16)?;
    }
    // A calibrated input's tables are made anew, never linked: writing them would write
    // through the link into the input's files.
    manifest.calibration = None;
    let staging = Staging::new(request.output, request.force).map_err(export_error)?;
    for file in manifest.files() {
        link_or_copy(&request.model.join(file), &staging.path().join(file))?;
    }
    let observations = observe(request, &manifest, staging.path())?;
    let ranges = ranges(&observations, request.method)?;
    write_tables(staging.path(), &ranges, request)?;
    write_qdq_model(
        request.model,
        &manifest,
        &ranges,
        request.method,
        staging.path(),
    )?;
    let (qdq, fp16) = write_quality(request, staging.path())?;
    manifest.calibration = Some(CalibrationFiles {
        method: method_name(request.method),
        generations: request.prompts.len(),
        tensors: ranges.len(),
        ranges: RANGES_FILE.into(),
        trt_cache: TRT_CACHE_FILE.into(),
        trt_version: request.trt_version.clone(),
        ort_table: ORT_TABLE_FILE.into(),
        qdq_model: QDQ_DIR.into(),
        quality: QUALITY_FILE.into(),
    });
    manifest.save(staging.path()).map_err(graph_error)?;
    staging.commit().map_err(export_error)?;
    Ok(Calibration {
        ranges,
        generations: request.prompts.len(),
        qdq,
        fp16,
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
    run_manifest.graphs.select = None;
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
    // The calibration build has no selection graph.
    let host_selection = LoadOptions {
        select_on_device: Some(false),
        ..request.load.clone()
    };
    let (mut generator, _) =
        AnyGenerator::open(&work, request.provider, &host_selection, Purpose::Generate)
            .map_err(runtime_error)?;
    let mut failure = None;
    for (seed, prompts) in request.prompts.iter().enumerate() {
        let options = GenerateOptions {
            seed: request.options.seed.wrapping_add(seed as u64),
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
        match method.amax(histogram)? {
            Some(amax) => ranges.push((tensor.clone(), amax)),
            None => unexercised.push(tensor.as_str()),
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

/// The QDQ model under `dir/int8/`: the same manifest with every graph rewritten by
/// [`narx_graphs::qdq::quantize`] (the decoders only move their weights) and one new weight
/// file holding the INT8 weights and the float ones still used.
fn write_qdq_model(
    model: &Path,
    manifest: &Manifest,
    ranges: &[(String, f32)],
    method: Method,
    dir: &Path,
) -> Result<(), CalibrationError> {
    let out = dir.join(QDQ_DIR);
    std::fs::create_dir(&out).map_err(|e| io_error(&out, e))?;
    let ranges: BTreeMap<String, f32> = ranges.iter().cloned().collect();
    let weights_path = model.join(&manifest.weights.file);
    let weights = map_file(&weights_path).map_err(|e| CalibrationError::Io(e.to_string()))?;
    let read = |tensor: &TensorProto| external_bytes(tensor, &weights, &manifest.weights.file);
    let mut store = WeightStore::external(&out, &manifest.weights.file).map_err(graph_error)?;
    let mut qdq = manifest.clone();
    qdq.calibration = None;
    qdq.quantization = Some(format!(
        "int8 QDQ: activations per tensor ({}), weights per output channel, symmetric",
        method_name(method)
    ));
    let decoder = qdq
        .vq_decoder
        .as_mut()
        .map(|d| &mut d.graph)
        .or(qdq.larp_decoder.as_mut().map(|d| &mut d.graph));
    // The selection graph and the decoders stay float (they are copied over).
    let graphs = [
        (&mut qdq.graphs.prefill, true),
        (&mut qdq.graphs.step, true),
    ]
    .into_iter()
    .chain(qdq.graphs.select.as_mut().map(|g| (g, false)))
    .chain(decoder.map(|g| (g, false)));
    for (graph, quantise) in graphs {
        let path = model.join(&graph.file);
        let bytes = std::fs::read(&path).map_err(|e| io_error(&path, e))?;
        let original = decode_model(&bytes).map_err(graph_error)?;
        let rewritten = quantize(&original, quantise.then_some(&ranges), &read, &mut store)
            .map_err(graph_error)?;
        let encoded = encode_model(&rewritten);
        let file = out.join(&graph.file);
        std::fs::write(&file, &encoded).map_err(|e| io_error(&file, e))?;
        *graph = GraphFile::describe(&graph.file, encoded.len() as u64, &rewritten)
            .map_err(graph_error)?;
    }
    qdq.weights.bytes = store.finish().map_err(graph_error)?;
    qdq.save(&out).map_err(graph_error)
}

/// Compares the QDQ model (and the float16 export, if given) with the float32 model on the
/// quality prompts; writes `quality.json` (keys `qdq.*`, `fp16.*`).
fn write_quality(
    request: &CalibrateRequest,
    dir: &Path,
) -> Result<(Quality, Option<Quality>), CalibrationError> {
    let against = |candidate: &Path| {
        compare(
            request.model,
            candidate,
            &request.holdout,
            &request.options,
            request.provider,
            &request.load,
        )
    };
    let qdq = against(&dir.join(QDQ_DIR))?;
    let fp16 = request.fp16_model.map(against).transpose()?;
    let mut report = serde_json::json!({
        "prompts": request.holdout.iter().map(Prompts::len).sum::<usize>(),
        "held_out": request.held_out,
        "qdq": qdq.to_json(),
    });
    if let Some(fp16) = fp16 {
        report["fp16"] = fp16.to_json();
    }
    let path = dir.join(QUALITY_FILE);
    let text = serde_json::to_string_pretty(&report)
        .map_err(|e| CalibrationError::Table(e.to_string()))?;
    std::fs::write(&path, text + "\n").map_err(|e| io_error(&path, e))?;
    Ok((qdq, fp16))
}

/// An initializer's bytes: inline, or from the model's weight file `weights_file`.
fn external_bytes(
    tensor: &TensorProto,
    weights: &[u8],
    weights_file: &str,
) -> Result<Vec<u8>, GraphError> {
    if tensor.external_data.is_empty() {
        return Ok(tensor.raw_data.clone().unwrap_or_default());
    }
    let name = tensor.name.as_deref().unwrap_or("?");
    let value = |key: &str| {
        tensor
            .external_data
            .iter()
            .find(|e| e.key.as_deref() == Some(key))
            .and_then(|e| e.value.as_deref())
    };
    let location = value("location").unwrap_or_default();
    if location != weights_file {
        return Err(GraphError::Invalid(format!(
            "{name}: external data in {location:?}, expected the manifest's weight file \
             {weights_file:?}"
        )));
    }
    let number = |key: &str| {
        value(key)
            .and_then(|v| v.parse::<usize>().ok())
            .ok_or_else(|| GraphError::Invalid(format!("{name}: no external {key} (a number)")))
    };
    let (offset, length) = (number("offset")?, number("length")?);
    offset
        .checked_add(length)
        .and_then(|end| weights.get(offset..end))
        .map(<[u8]>::to_vec)
        .ok_or_else(|| {
            GraphError::Invalid(format!(
                "{name}: {length} bytes at offset {offset} lie outside {weights_file} ({} bytes)",
                weights.len()
            ))
        })
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

#[cfg(test)]
mod tests {
    use super::*;
    use narx_graphs::onnx::StringStringEntryProto;

    fn external(location: &str, offset: &str, length: &str) -> TensorProto {
        let entry = |key: &str, value: &str| StringStringEntryProto {
            key: Some(key.into()),
            value: Some(value.into()),
        };
        TensorProto {
            name: Some("w".into()),
            external_data: vec![
                entry("location", location),
                entry("offset", offset),
                entry("length", length),
            ],
            ..Default::default()
        }
    }

    #[test]
    fn external_data_is_checked_against_the_weight_file() {
        let weights = [1u8, 2, 3, 4, 5, 6];
        let read = |t: &TensorProto| external_bytes(t, &weights, "weights.bin");
        assert_eq!(read(&external("weights.bin", "2", "3")).unwrap(), [3, 4, 5]);
        let err = read(&external("other.bin", "0", "1"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("\"other.bin\"") && err.contains("weights.bin"),
            "{err}"
        );
        let max = usize::MAX.to_string();
        for (offset, length) in [(max.as_str(), "2"), ("4", "3")] {
            let err = read(&external("weights.bin", offset, length))
                .unwrap_err()
                .to_string();
            assert!(err.contains("lie outside weights.bin (6 bytes)"), "{err}");
        }
        let err = read(&external("weights.bin", "x", "1"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("no external offset"), "{err}");
    }
}
