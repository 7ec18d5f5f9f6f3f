//! `--provider` and its settings, shared by every subcommand that runs a model.

use std::path::{Path, PathBuf};

use clap::{Args, ValueEnum};

use narx_calibration::tables::tensorrt_int8;
use narx_graphs::manifest::Manifest;
use narx_runtime::backend::ort::OrtOptions;
use narx_runtime::load::{AnyGenerator, GpuOptions, LoadOptions, Provider, Purpose};
use narx_runtime::scheduler::Order;

use super::BadInput;

/// Which backend runs the model, and how.
#[derive(Args)]
pub struct BackendArgs {
    /// auto: the best that starts (ONNX Runtime's TensorRT, CUDA, then CPU provider; tract
    /// when no ONNX Runtime is found). An explicit GPU provider that cannot start is an error.
    #[arg(long, value_enum, default_value = "auto")]
    provider: ProviderArg,
    /// ONNX Runtime shared library (else ORT_DYLIB_PATH, else the usual places). For cuda
    /// and tensorrt it must be a GPU build (the `onnxruntime-gpu` wheel, JetPack's).
    #[arg(long)]
    ort_lib: Option<PathBuf>,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// GPU to run on (cuda, tensorrt).
    #[arg(long, default_value_t = 0)]
    device_id: u32,
    /// TensorRT: allow float16 kernels (default: the manifest's setting).
    #[arg(long)]
    trt_fp16: bool,
    /// TensorRT: allow bfloat16 kernels (default: the manifest's setting).
    #[arg(long)]
    trt_bf16: bool,
    /// TensorRT: most scratch memory per layer, in MiB.
    #[arg(long)]
    trt_workspace_mib: Option<u64>,
    /// TensorRT: builder optimisation level, 0 (fast build) to 5 (longest search).
    #[arg(long)]
    trt_opt_level: Option<u8>,
    /// TensorRT: keep built engines and the timing cache here (default: the model
    /// directory's `trt-cache/`).
    #[arg(long, conflicts_with = "no_trt_cache")]
    trt_cache: Option<PathBuf>,
    /// TensorRT: build engines afresh every run and keep nothing.
    #[arg(long)]
    no_trt_cache: bool,
    /// Where each call's logits are assembled, guided and cut to the top-k candidates: on the
    /// device by the selection graph (the default on cuda and tensorrt: a call then returns
    /// kilobytes) or on the host (the default on cpu and tract).
    #[arg(long, value_enum)]
    select: Option<SelectArg>,
    /// TensorRT: INT8 kernels, with the ranges of a `narx calibrate` output (its calibration
    /// table for the float graphs, or its int8/ QDQ model).
    #[arg(long)]
    trt_int8: bool,
    /// cuda: capture each step call as a CUDA graph and replay it (the default for a
    /// `--static` export, whose shapes allow it).
    #[arg(long, conflicts_with = "no_cuda_graph")]
    cuda_graph: bool,
    /// Launch every kernel of every call instead of replaying CUDA graphs.
    #[arg(long)]
    no_cuda_graph: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum SelectArg {
    Host,
    Device,
}

#[derive(Clone, Copy, ValueEnum)]
enum ProviderArg {
    Auto,
    Tract,
    Cpu,
    Cuda,
    Tensorrt,
}

impl BackendArgs {
    /// Opens the model to generate in `order` (`None`: the model's own); says on stderr
    /// which backend `auto` picked.
    pub fn open(
        &self,
        dir: &Path,
        purpose: Purpose,
        order: Option<Order>,
    ) -> anyhow::Result<AnyGenerator> {
        let (provider, mut options) = self.checked_options(order)?;
        if self.trt_int8 {
            let manifest = Manifest::load(dir)?;
            options.gpu.int8 = Some(tensorrt_int8(dir, &manifest)?);
        }
        let (generator, note) = AnyGenerator::open(dir, provider, &options, purpose)?;
        if let Some(note) = note {
            eprintln!("narx: {note}");
        }
        Ok(generator)
    }

    /// Checks the flags, before any work (a model to export, say): each error names its flag.
    pub fn check(&self) -> anyhow::Result<()> {
        self.checked_options(None).map(|_| ())
    }

    /// The settings, with `--trt-int8` allowed only on TensorRT (its ranges are added by
    /// [`Self::open`], which has the model).
    fn checked_options(&self, order: Option<Order>) -> anyhow::Result<(Provider, LoadOptions)> {
        let (provider, options) = self.float_options(order)?;
        if self.trt_int8 && provider != Provider::TensorRt {
            return Err(BadInput("--trt-int8 needs --provider tensorrt".into()).into());
        }
        Ok((provider, options))
    }

    /// The backend choice and its settings, for code that opens models itself (in float:
    /// `--trt-int8` is refused).
    pub fn load_options(&self, order: Option<Order>) -> anyhow::Result<(Provider, LoadOptions)> {
        if self.trt_int8 {
            return Err(
                BadInput("--trt-int8 is for running a calibrated model, not here".into()).into(),
            );
        }
        self.float_options(order)
    }

    fn float_options(&self, order: Option<Order>) -> anyhow::Result<(Provider, LoadOptions)> {
        if self.threads == Some(0) {
            return Err(BadInput("--threads must be at least 1".into()).into());
        }
        let provider = match self.provider {
            ProviderArg::Auto => Provider::Auto,
            ProviderArg::Tract => Provider::Tract,
            ProviderArg::Cpu => Provider::Cpu,
            ProviderArg::Cuda => Provider::Cuda,
            ProviderArg::Tensorrt => Provider::TensorRt,
        };
        let options = LoadOptions {
            ort: OrtOptions {
                library: self.ort_lib.clone(),
                intra_threads: self.threads,
                ..OrtOptions::default()
            },
            threads: self.threads,
            order,
            gpu: self.gpu_options()?,
            select_on_device: self.select.map(|s| matches!(s, SelectArg::Device)),
        };
        Ok((provider, options))
    }

    fn gpu_options(&self) -> anyhow::Result<GpuOptions> {
        let workspace_bytes = self
            .trt_workspace_mib
            .map(|mib| {
                mib.checked_mul(1 << 20)
                    .filter(|&b| b > 0)
                    .ok_or_else(|| BadInput(format!("--trt-workspace-mib {mib} is out of range")))
            })
            .transpose()?;
        Ok(GpuOptions {
            device_id: self.device_id,
            fp16: self.trt_fp16.then_some(true),
            bf16: self.trt_bf16.then_some(true),
            workspace_bytes,
            builder_optimization_level: self.trt_opt_level,
            cache_dir: self.trt_cache.clone(),
            no_cache: self.no_trt_cache,
            int8: None,
            cuda_graph: match (self.cuda_graph, self.no_cuda_graph) {
                (true, _) => Some(true),
                (_, true) => Some(false),
                _ => None,
            },
        })
    }
}
