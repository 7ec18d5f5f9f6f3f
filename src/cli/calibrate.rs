//! `narx calibrate`: INT8 ranges for a model directory from generations on calibration
//! prompts, written with TensorRT's and ONNX Runtime's tables into a new model directory.

use std::path::PathBuf;

use clap::{Args, ValueEnum};

use narx_calibration::calibrate::{
    calibrate, CalibrateRequest, ORT_TABLE_FILE, QDQ_DIR, QUALITY_FILE, RANGES_FILE, TRT_CACHE_FILE,
};
use narx_calibration::quality::Quality;
use narx_calibration::ranges::Method;
use narx_calibration::tables::DEFAULT_TRT_VERSION;
use narx_graphs::manifest::{Condition, Manifest};
use narx_runtime::generate::Prompts;

use super::backend::BackendArgs;
use super::run::{read_captions, SamplingArgs};
use super::BadInput;

#[derive(Args)]
pub struct CalibrateArgs {
    /// Model directory written by `narx export` (float32).
    model: PathBuf,
    /// Calibration classes (class-conditional models): numbers and ranges, e.g.
    /// `0,5,100..200` (end excluded).
    #[arg(long, value_delimiter = ',')]
    classes: Vec<String>,
    /// Calibration captions for a text-conditional model: safetensors with
    /// `caption_embeddings` (B, tokens, dim) and `caption_mask` (B, tokens).
    #[arg(long, conflicts_with = "classes")]
    captions: Option<PathBuf>,
    /// Passes over the prompts, each with its own seed.
    #[arg(long, default_value_t = 1)]
    samples: usize,
    /// Prompts per generation.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Held-out classes for the quality report (default: the first --batch classes not
    /// calibrated on; when every class is calibrated on, the first calibration classes, and
    /// quality.json says `"held_out": false`).
    #[arg(long, value_delimiter = ',')]
    holdout_classes: Vec<String>,
    /// A float16 export of the same model (`narx export --dtype fp16`), reported beside the
    /// INT8 model.
    #[arg(long)]
    fp16_model: Option<PathBuf>,
    /// How each tensor's clipping range is chosen.
    #[arg(long, value_enum, default_value = "entropy")]
    method: MethodArg,
    /// The percentile for --method percentile.
    #[arg(long, default_value_t = Method::DEFAULT_PERCENTILE)]
    percentile: f64,
    /// The TensorRT version the native cache's header names, as the integer
    /// NV_TENSORRT_VERSION: 8601 for 8.6.1, 100300 for 10.3.0 (`10` or `8.6` are refused);
    /// TensorRT ignores a cache made for another version.
    #[arg(long, default_value = DEFAULT_TRT_VERSION)]
    trt_version: String,
    /// The calibrated model directory to write.
    #[arg(short, long)]
    output: PathBuf,
    /// Replace the output directory if it is a model directory already.
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    backend: BackendArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
}

#[derive(Clone, Copy, ValueEnum)]
enum MethodArg {
    Entropy,
    Max,
    Percentile,
}

/// `0,5,10..13` → `[0, 5, 10, 11, 12]`, every class in `0..num_classes`; `flag` names the
/// list in messages.
fn parse_classes(flag: &str, items: &[String], num_classes: usize) -> anyhow::Result<Vec<i64>> {
    let bad = |item: &str| BadInput(format!("{flag}: {item:?} is neither N nor A..B"));
    let mut classes = Vec::new();
    for item in items.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
        match item.split_once("..") {
            Some((a, b)) => {
                let (a, b): (i64, i64) = (
                    a.parse().map_err(|_| bad(item))?,
                    b.parse().map_err(|_| bad(item))?,
                );
                if a >= b {
                    return Err(BadInput(format!(
                        "{flag}: {item} is empty (A..B runs from A up to B, excluded)"
                    ))
                    .into());
                }
                classes.extend(a..b);
            }
            None => classes.push(item.parse().map_err(|_| bad(item))?),
        }
    }
    if let Some(c) = classes
        .iter()
        .find(|&&c| usize::try_from(c).map_or(true, |c| c >= num_classes))
    {
        return Err(BadInput(format!(
            "{flag}: class {c} is out of range: this model has classes 0..{num_classes}"
        ))
        .into());
    }
    Ok(classes)
}

pub fn run(args: CalibrateArgs) -> anyhow::Result<()> {
    if args.samples == 0 || args.batch == 0 {
        return Err(BadInput("--samples and --batch must be at least 1".into()).into());
    }
    let method = match args.method {
        MethodArg::Entropy => Method::Entropy,
        MethodArg::Max => Method::Max,
        MethodArg::Percentile => Method::Percentile(args.percentile),
    };
    let manifest = Manifest::load(&args.model)?;
    let (sets, holdout, held_out): (Vec<Prompts>, Vec<Prompts>, bool) = match &manifest.condition {
        Condition::Class { num_classes, .. } => {
            if args.captions.is_some() {
                return Err(BadInput(format!(
                    "--captions: {} is class-conditional; give --classes",
                    args.model.display()
                ))
                .into());
            }
            let classes = parse_classes("--classes", &args.classes, *num_classes)?;
            if classes.is_empty() {
                return Err(BadInput(
                    "the class list is empty: give calibration classes with --classes".into(),
                )
                .into());
            }
            let mut holdout =
                parse_classes("--holdout-classes", &args.holdout_classes, *num_classes)?;
            if holdout.is_empty() {
                holdout = (0..*num_classes as i64)
                    .filter(|c| !classes.contains(c))
                    .take(args.batch)
                    .collect();
            }
            if holdout.is_empty() {
                // Every class was calibrated on: nothing is held out, so reuse the first.
                holdout.extend(classes.iter().take(args.batch));
            }
            let held_out = holdout.iter().all(|c| !classes.contains(c));
            let batches = |list: &[i64]| -> Vec<Prompts> {
                list.chunks(args.batch)
                    .map(|chunk| Prompts::Classes(chunk.to_vec()))
                    .collect()
            };
            (batches(&classes), batches(&holdout), held_out)
        }
        Condition::Caption { tokens, dim } => {
            if !args.classes.is_empty() || !args.holdout_classes.is_empty() {
                return Err(BadInput(format!(
                    "--classes/--holdout-classes: {} is text-conditional; give --captions",
                    args.model.display()
                ))
                .into());
            }
            let path = args.captions.as_ref().ok_or_else(|| {
                BadInput("give calibration captions with --captions F.safetensors".into())
            })?;
            let captions = read_captions(path, *tokens, *dim)?;
            // The quality report runs on the calibration captions themselves.
            (vec![captions.clone()], vec![captions], false)
        }
    };
    let prompts: Vec<Prompts> = (0..args.samples)
        .flat_map(|_| sets.iter().cloned())
        .collect();
    let (provider, load) = args.backend.load_options(None)?;
    let calibration = calibrate(&CalibrateRequest {
        model: &args.model,
        output: &args.output,
        prompts,
        holdout,
        held_out,
        fp16_model: args.fp16_model.as_deref(),
        options: args.sampling.options(&manifest)?,
        method,
        trt_version: args.trt_version.clone(),
        provider,
        load,
        force: args.force,
    })?;
    println!(
        "calibrated {} tensors over {} generation(s) into {}: {TRT_CACHE_FILE} (TensorRT), \
         {ORT_TABLE_FILE} (ONNX Runtime), {RANGES_FILE}, the INT8 QDQ model in {QDQ_DIR}/, \
         {QUALITY_FILE}",
        calibration.ranges.len(),
        calibration.generations,
        args.output.display()
    );
    let header = if held_out {
        "against float32 on held-out prompts"
    } else {
        "against float32 on calibration prompts"
    };
    println!("  {header:38} top-1 agreement (unguided)   mean KL   tokens agree");
    let row = |name: &str, q: &Quality| {
        println!(
            "  {name:38} {:>14.1}% {:>11.1}%  {:>8.4}  {:>12.1}%",
            100.0 * q.top1_agreement,
            100.0 * q.top1_agreement_unguided,
            q.mean_kl,
            100.0 * q.token_agreement
        )
    };
    row("int8 (QDQ)", &calibration.qdq);
    if let Some(fp16) = &calibration.fp16 {
        row("float16", fp16);
    }
    if !held_out {
        println!(
            "  note: no prompt was held out (every class was calibrated on, a caption model, or \
             --holdout-classes overlapping --classes), so these figures flatter the INT8 model"
        );
    }
    Ok(())
}
