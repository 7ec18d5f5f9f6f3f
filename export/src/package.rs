//! `narx package`: a model directory made ready for a deployment target such as a Jetson,
//! as one `.tar` or a directory: the manifest, the graphs, the weights, whatever TensorRT
//! engines, timing cache and EP-context models were built (so the board need not rebuild
//! them), and a README saying what runtime the bundle expects.
//!
//! Like export, the bundle is written under a temporary sibling name and renamed into place
//! only when complete.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use narx_graphs::manifest::{Manifest, MANIFEST_FILE, TENSORRT_CACHE_DIR};
use narx_graphs::GraphError;

use crate::model_dir::Staging;
use crate::ExportError;

/// The README placed in every bundle.
const BUNDLE_README: &str = "README.md";

/// What was packaged.
#[derive(Debug)]
pub struct Bundle {
    /// Paths inside the bundle, in the order written.
    pub files: Vec<String>,
    pub bytes: u64,
}

/// Packages the model directory `model` into `output`: a tar archive when its name ends in
/// `.tar`, else a directory. `force` replaces an existing bundle.
pub fn package(model: &Path, output: &Path, force: bool) -> Result<Bundle, ExportError> {
    let manifest = Manifest::load(model)?;
    let files = bundle_files(model, &manifest)?;
    let readme = readme(&manifest, &files);
    let as_tar = output
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("tar"));
    let mut bundle = Bundle {
        files: files.clone(),
        bytes: 0,
    };
    bundle.files.push(BUNDLE_README.into());
    if as_tar {
        bundle.bytes = write_tar(model, &files, &readme, output, force)?;
    } else {
        let staging = Staging::new(output, force)?;
        for name in &files {
            let to = staging.path().join(name);
            if let Some(parent) = to.parent() {
                std::fs::create_dir_all(parent).map_err(|e| GraphError::io(parent, e))?;
            }
            bundle.bytes +=
                std::fs::copy(model.join(name), &to).map_err(|e| GraphError::io(&to, e))?;
        }
        let readme_path = staging.path().join(BUNDLE_README);
        std::fs::write(&readme_path, &readme).map_err(|e| GraphError::io(&readme_path, e))?;
        bundle.bytes += readme.len() as u64;
        staging.commit()?;
    }
    Ok(bundle)
}

/// The files of a bundle, relative to the model directory: the manifest, every graph, the
/// weights and calibration tables (all checked present by `Manifest::load`), the QDQ model
/// of a calibrated directory, then the TensorRT cache if any.
fn bundle_files(model: &Path, manifest: &Manifest) -> Result<Vec<String>, ExportError> {
    let mut files = vec![MANIFEST_FILE.to_string()];
    files.extend(manifest.files().into_iter().map(str::to_string));
    // A calibrated directory's QDQ model goes along, checked as a model directory itself.
    if let Some(calibration) = &manifest.calibration {
        let qdq = Manifest::load(&model.join(&calibration.qdq_model))?;
        let inside = |file: &str| format!("{}/{file}", calibration.qdq_model);
        files.push(inside(MANIFEST_FILE));
        files.extend(qdq.files().into_iter().map(inside));
    }
    let cache = model.join(TENSORRT_CACHE_DIR);
    if cache.is_dir() {
        let mut cached: Vec<String> = std::fs::read_dir(&cache)
            .map_err(|e| GraphError::io(&cache, e))?
            .filter_map(|entry| {
                let entry = entry.ok()?;
                let is_file = entry.file_type().ok()?.is_file();
                let name = entry.file_name().into_string().ok()?;
                is_file.then(|| format!("{TENSORRT_CACHE_DIR}/{name}"))
            })
            .collect();
        cached.sort();
        files.extend(cached);
    }
    Ok(files)
}

/// Streams the files into `output` through a temporary sibling and a rename.
fn write_tar(
    model: &Path,
    files: &[String],
    readme: &str,
    output: &Path,
    force: bool,
) -> Result<u64, ExportError> {
    let out_err = |message: String| ExportError::Output {
        path: output.display().to_string(),
        message,
    };
    if output.exists() && !force {
        return Err(out_err(
            "already exists (pass --force to replace it)".into(),
        ));
    }
    if output.is_dir() {
        return Err(out_err("is a directory".into()));
    }
    let name = output
        .file_name()
        .ok_or_else(|| out_err("is not a file name".into()))?;
    let top = Path::new(name)
        .file_stem()
        .map(PathBuf::from)
        .unwrap_or_default();
    let partial = output.with_file_name(format!(".{}.partial", name.to_string_lossy()));
    let result = (|| -> std::io::Result<u64> {
        let mut archive = tar::Builder::new(File::create(&partial)?);
        let mut bytes = 0;
        for file in files {
            let path = model.join(file);
            bytes += std::fs::metadata(&path)?.len();
            archive.append_path_with_name(&path, top.join(file))?;
        }
        let mut header = tar::Header::new_gnu();
        header.set_size(readme.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        archive.append_data(&mut header, top.join(BUNDLE_README), readme.as_bytes())?;
        bytes += readme.len() as u64;
        let mut file = archive.into_inner()?;
        file.flush()?;
        file.sync_all()?;
        std::fs::rename(&partial, output)?;
        Ok(bytes)
    })();
    result.map_err(|source| {
        // Best effort: the temporary may never have been created.
        let _ = std::fs::remove_file(&partial);
        ExportError::Io {
            path: output.display().to_string(),
            source,
        }
    })
}

/// What a person unpacking the bundle on a board needs to know.
fn readme(manifest: &Manifest, files: &[String]) -> String {
    let grid: Vec<String> = manifest.grid.iter().map(usize::to_string).collect();
    let engines = files.iter().any(|f| f.starts_with(TENSORRT_CACHE_DIR));
    let mut text = format!(
        "# {family} model bundle\n\n\
         Made by {producer} (`narx package`): a {family} model, {params} parameters, latent \
         grid {grid}, weights in {dtype:?}.\n\n\
         ## Run it\n\n\
         ```sh\n\
         narx run . --provider tensorrt --ort-lib /path/to/libonnxruntime.so ...\n\
         ```\n\n\
         narx loads ONNX Runtime at run time and needs version 1.17 or newer. For \
         `--provider cuda` or `--provider tensorrt` it must be a GPU build: on a PC the \
         `onnxruntime-gpu` wheel (its `onnxruntime/capi/` folder holds the library and the \
         CUDA and TensorRT provider libraries); on a Jetson an ONNX Runtime GPU build for \
         its JetPack (JetPack 6: CUDA 12, TensorRT 8.6 or 10). The CUDA, cuDNN and TensorRT \
         libraries must be on `LD_LIBRARY_PATH`. `--provider cpu` needs only ONNX Runtime; \
         `--provider tract` nothing.\n\n\
         `narx check . --target tensorrt` lists anything in the graphs that TensorRT's ONNX \
         parser would reject.\n\n",
        family = manifest.family,
        producer = manifest.producer,
        params = manifest.parameters,
        grid = grid.join("×"),
        dtype = manifest.dtype,
    );
    if manifest.cuda_graph {
        text.push_str(
            "## CUDA graphs\n\n\
             The step's shapes are static, so on `--provider cuda` each step call is captured \
             once as a CUDA graph and replayed. That needs ONNX Runtime 1.18 or newer; with an \
             older one, or if ONNX Runtime refuses the session, pass `--no-cuda-graph`.\n\n",
        );
    }
    if engines {
        text.push_str(
            "## Prebuilt TensorRT engines\n\n\
             `trt-cache/` holds engines, the timing cache and EP-context models built on the \
             machine that ran the model before packaging. TensorRT loads them instead of \
             rebuilding only on the same GPU model with the same TensorRT version; otherwise it \
             rebuilds them (minutes) and keeps the new ones there.\n\n",
        );
    } else {
        text.push_str(
            "## TensorRT engines\n\n\
             None are included: the first `--provider tensorrt` run builds them for the board's \
             GPU (minutes for a large model) and keeps them in `trt-cache/` for later runs. \
             Run once on a board, then package from there to ship engines to identical boards.\n\n",
        );
    }
    text.push_str("## Files\n\n");
    for file in files {
        text.push_str(&format!("- `{file}`\n"));
    }
    text
}
