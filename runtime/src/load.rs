//! Opening a model directory on a chosen backend.

use std::path::Path;

use narx_graphs::manifest::Manifest;

use crate::backend::ort::{find_library, OrtEngine, OrtOptions};
use crate::backend::tract::TractEngine;
use crate::backend::GraphKind;
use crate::decode::Decoded;
use crate::generate::{natural_order, CallReport, GenerateOptions, Generation, Generator, Prompts};
use crate::scheduler::{Order, WavefrontPlan};
use crate::RuntimeError;

/// Which backend runs the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Provider {
    /// ONNX Runtime if its library is found, else tract.
    Auto,
    /// tract, embedded.
    Tract,
    /// ONNX Runtime's CPU provider.
    Cpu,
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
        let decoder = manifest.decoder_graph().map(|graph| &graph.file);
        let files: Vec<(GraphKind, std::path::PathBuf)> = match purpose {
            Purpose::Generate => [
                (GraphKind::Prefill, Some(&manifest.graphs.prefill.file)),
                (GraphKind::Step, Some(&manifest.graphs.step.file)),
                (GraphKind::Decoder, decoder),
            ]
            .into_iter()
            .filter_map(|(kind, file)| file.map(|f| (kind, dir.join(f))))
            .collect(),
            Purpose::Decode => {
                let file = decoder.ok_or_else(|| {
                    RuntimeError::BadInput(format!(
                        "{} has no decoder (export with --vq-checkpoint or --larp-checkpoint)",
                        dir.display()
                    ))
                })?;
                vec![(GraphKind::Decoder, dir.join(file))]
            }
        };
        let paths: Vec<(GraphKind, &Path)> = files.iter().map(|(k, p)| (*k, p.as_path())).collect();
        let mut ort = options.ort.clone();
        if ort.intra_threads.is_none() {
            ort.intra_threads = options.threads;
        }
        let (use_ort, note) = match provider {
            Provider::Tract => (false, None),
            Provider::Cpu => (true, None),
            Provider::Auto => match find_library(ort.library.as_deref()) {
                Ok(path) => (
                    true,
                    Some(format!("using ONNX Runtime ({})", path.display())),
                ),
                Err(e) => (false, Some(format!("using tract ({e})"))),
            },
        };
        let order = options.order.unwrap_or_else(|| natural_order(&manifest));
        let generator = if use_ort {
            let engine = OrtEngine::load(&paths, &ort)?;
            AnyGenerator::Ort(Generator::with_order(manifest, engine, order)?)
        } else {
            let engine = TractEngine::load(&paths, options.threads)?;
            AnyGenerator::Tract(Generator::with_order(manifest, engine, order)?)
        };
        Ok((generator, note))
    }

    pub fn manifest(&self) -> &Manifest {
        match self {
            AnyGenerator::Tract(g) => g.manifest(),
            AnyGenerator::Ort(g) => g.manifest(),
        }
    }

    pub fn engine_name(&self) -> String {
        match self {
            AnyGenerator::Tract(g) => g.engine_name(),
            AnyGenerator::Ort(g) => g.engine_name(),
        }
    }

    /// Decodes token grids into pictures or clips with the model's decoder.
    pub fn decode(&mut self, tokens: &[Vec<u32>], grid: &[usize]) -> Result<Decoded, RuntimeError> {
        match self {
            AnyGenerator::Tract(g) => g.decode(tokens, grid),
            AnyGenerator::Ort(g) => g.decode(tokens, grid),
        }
    }

    pub fn order(&self) -> Order {
        match self {
            AnyGenerator::Tract(g) => g.order(),
            AnyGenerator::Ort(g) => g.order(),
        }
    }

    pub fn plan(&self) -> &WavefrontPlan {
        match self {
            AnyGenerator::Tract(g) => g.plan(),
            AnyGenerator::Ort(g) => g.plan(),
        }
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
        match self {
            AnyGenerator::Tract(g) => g.generate(prompts, options, report),
            AnyGenerator::Ort(g) => g.generate(prompts, options, report),
        }
    }
}
