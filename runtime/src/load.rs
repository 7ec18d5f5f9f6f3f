//! Opening a model directory on a chosen backend.

use std::path::Path;

use narx_graphs::manifest::Manifest;

use crate::backend::ort::{find_library, OrtEngine, OrtOptions};
use crate::backend::tract::TractEngine;
use crate::backend::GraphPaths;
use crate::generate::{CallReport, GenerateOptions, Generation, Generator, Prompts};
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

#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    pub ort: OrtOptions,
    /// Threads for tract's matmuls and ONNX Runtime's intra-op pool.
    pub threads: Option<usize>,
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
    ) -> Result<(Self, Option<String>), RuntimeError> {
        let manifest = Manifest::load(dir)?;
        let prefill = dir.join(&manifest.graphs.prefill.file);
        let step = dir.join(&manifest.graphs.step.file);
        let paths = GraphPaths {
            prefill: &prefill,
            step: &step,
        };
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
        let generator = if use_ort {
            AnyGenerator::Ort(Generator::new(manifest, OrtEngine::load(&paths, &ort)?)?)
        } else {
            AnyGenerator::Tract(Generator::new(
                manifest,
                TractEngine::load(&paths, options.threads)?,
            )?)
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

    pub fn calls(&self) -> usize {
        match self {
            AnyGenerator::Tract(g) => g.plan().calls().len(),
            AnyGenerator::Ort(g) => g.plan().calls().len(),
        }
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
