//! The generation loop: prefill, then one step per wavefront, with guidance and sampling
//! between calls; the KV cache stays in the backend's own form from call to call.
//!
//! `Runtime → Runnable → State` as tract splits it: the manifest and the engine are loaded
//! once ([`Generator`]); each call of [`Generator::generate`] owns its cache and RNGs.

use std::collections::HashMap;
use std::time::Instant;

use narx_graphs::manifest::{CacheLayout, Condition, Family, KvCache, Manifest};
use narx_graphs::nar::names;
use narx_graphs::{DType, Dim};

use crate::backend::{Engine, GraphKind, HostTensor};
use crate::decode::Decoded;
use crate::guidance::{identity_mix, model_rows, uses_uncond_half, CfgSchedule};
use crate::sampling::{sample_block, ImageRng, SamplingParams};
use crate::scheduler::{Call, Order, WavefrontPlan};
use crate::RuntimeError;

/// What each image is conditioned on.
#[derive(Clone, Debug)]
pub enum Prompts {
    /// One class label per image.
    Classes(Vec<i64>),
    /// Caption features `(B, tokens, dim)` and their 0/1 mask `(B, tokens)`, left-padded as
    /// upstream's sampler prepares them.
    Captions {
        embeddings: Vec<f32>,
        mask: Vec<f32>,
        count: usize,
    },
}

impl Prompts {
    pub fn len(&self) -> usize {
        match self {
            Prompts::Classes(labels) => labels.len(),
            Prompts::Captions { count, .. } => *count,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether these prompts fit `manifest`'s condition: at least one, of the model's kind,
    /// class labels in range, caption features of the model's shape, and a null condition
    /// when `cfg_scale` asks for guidance. Cheap, so a front end can ask before it opens
    /// the model.
    pub fn check(&self, manifest: &Manifest, cfg_scale: f32) -> Result<(), RuntimeError> {
        let bad = |m: String| Err(RuntimeError::BadInput(m));
        let batch = self.len();
        if batch == 0 {
            return bad("no prompts to generate".into());
        }
        match (&manifest.condition, self) {
            (
                Condition::Class {
                    num_classes,
                    null_class,
                    ..
                },
                Prompts::Classes(labels),
            ) => {
                if let Some(&label) = labels.iter().find(|&&l| l < 0 || l >= *num_classes as i64) {
                    return bad(format!(
                        "class {label} is out of range: this model has classes 0..{}",
                        num_classes.saturating_sub(1)
                    ));
                }
                if uses_uncond_half(cfg_scale) && null_class.is_none() {
                    return bad(
                        "this model has no null class, so it cannot use guidance; pass --cfg-scale 1"
                            .into(),
                    );
                }
                Ok(())
            }
            (
                Condition::Caption { tokens, dim },
                Prompts::Captions {
                    embeddings, mask, ..
                },
            ) => {
                let (t, d) = (*tokens, *dim);
                if embeddings.len() != batch * t * d || mask.len() != batch * t {
                    return bad(format!(
                        "caption embeddings must be ({batch}, {t}, {d}) with a ({batch}, {t}) mask"
                    ));
                }
                Ok(())
            }
            (Condition::Class { .. }, Prompts::Captions { .. }) => {
                bad("this is a class-conditional model: give class labels, not captions".into())
            }
            (Condition::Caption { .. }, Prompts::Classes(_)) => {
                bad("this is a text-conditional model: give caption embeddings, not classes".into())
            }
        }
    }
}

/// How to generate.
#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub cfg_scale: f32,
    /// Upstream's `cfg_interval`: negative = guide every call.
    pub cfg_interval: i64,
    pub sampling: SamplingParams,
    pub seed: u64,
    /// Also report each call's logits before guidance ([`CallReport::logits`]): the heads
    /// then project both halves of the batch. Without it, with guidance, they project each
    /// prompt's guided mix of the two halves (half the head work; see
    /// [`CfgSchedule::head_mix`]).
    pub unguided_logits: bool,
}

/// What happened at one model call, for progress reporting and conformance tests.
pub struct CallReport<'a> {
    pub call: &'a Call,
    pub calls: usize,
    /// Model batch rows (both guidance halves).
    pub rows: usize,
    /// Assembled logits `(rows, produced, vocab)`, before guidance; empty unless
    /// [`GenerateOptions::unguided_logits`] asked for them (the heads otherwise project the
    /// guided mix, and a selection graph keeps them on the device).
    pub logits: &'a [f32],
    /// Guided logits `(prompts, produced, vocab)`; after the selection graph, −∞ outside
    /// each cell's candidates (top-k's and a margin for its ties).
    pub guided: &'a [f32],
    /// Chosen tokens `(prompts, produced)`, in wavefront order.
    pub tokens: &'a [u32],
    /// Seconds in the model call (inputs, run, head logits to the host).
    pub model_seconds: f64,
    /// Seconds assembling, guiding and sampling.
    pub sampling_seconds: f64,
}

/// Generated tokens, `(prompts, cells)` in raster order.
#[derive(Clone, Debug, PartialEq)]
pub struct Generation {
    pub grid: Vec<usize>,
    pub tokens: Vec<Vec<u32>>,
    pub calls: usize,
}

/// Sees a graph output by name, as float32 values.
pub type OutputObserver<'a> = dyn FnMut(&str, &[f32]) + 'a;

/// Named graph inputs in the engine's own form.
type Inputs<E> = Vec<(String, <E as Engine>::Value)>;

/// A loaded model ready to generate.
pub struct Generator<E: Engine> {
    manifest: Manifest,
    engine: E,
    plan: WavefrontPlan,
    order: Order,
    /// The manifest heads the plan reads, in the plan's head order.
    heads: Vec<usize>,
}

impl<E: Engine> Generator<E> {
    /// Generates in the model's own order: NAR's, or raster for LlamaGen.
    pub fn new(manifest: Manifest, engine: E) -> Result<Self, RuntimeError> {
        let order = natural_order(&manifest);
        Self::with_order(manifest, engine, order)
    }

    /// Generates in `order`. Raster order uses the head that predicts along the grid's last
    /// axis (the right head, which reads the trunk) and leaves the others unused.
    pub fn with_order(manifest: Manifest, engine: E, order: Order) -> Result<Self, RuntimeError> {
        let (plan, heads) = match order {
            Order::Nar => {
                if natural_order(&manifest) == Order::Raster {
                    return Err(RuntimeError::BadInput(format!(
                        "{} models have one head and generate in raster order only",
                        manifest.family
                    )));
                }
                let axes: Vec<usize> = manifest.heads.iter().map(|h| h.axis).collect();
                let plan = WavefrontPlan::new(&manifest.grid, &axes)?;
                (plan, (0..axes.len()).collect())
            }
            Order::Raster => {
                let last_axis = manifest.grid.len().saturating_sub(1);
                let head = manifest
                    .heads
                    .iter()
                    .position(|h| h.axis == last_axis)
                    .ok_or_else(|| {
                        RuntimeError::BadInput(
                            "raster order needs a head along the grid's last axis".into(),
                        )
                    })?;
                (
                    WavefrontPlan::raster(&manifest.grid, last_axis)?,
                    vec![head],
                )
            }
        };
        Ok(Generator {
            manifest,
            engine,
            plan,
            order,
            heads,
        })
    }

    pub fn order(&self) -> Order {
        self.order
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn plan(&self) -> &WavefrontPlan {
        &self.plan
    }

    /// The backend the model runs on.
    pub fn engine(&self) -> &E {
        &self.engine
    }

    pub fn engine_name(&self) -> String {
        self.engine.name()
    }

    /// The rows the heads project at each call of a generation of `prompts` prompts:
    /// the model batch, or one guided row per prompt.
    pub fn head_rows(&self, prompts: usize, options: &GenerateOptions) -> usize {
        let rows = model_rows(prompts, options.cfg_scale);
        self.projection(rows, prompts, options.unguided_logits)
            .rows(rows, prompts)
    }

    /// How the heads project a batch of `rows` rows for `prompts` prompts; `unguided` asks
    /// for every row's own logits.
    fn projection(&self, rows: usize, prompts: usize, unguided: bool) -> HeadProjection {
        let step = &self.manifest.graphs.step;
        if !step
            .inputs
            .iter()
            .any(|input| input.name == names::HEAD_MIX)
        {
            HeadProjection::Unmixed
        } else if rows > prompts && !unguided {
            HeadProjection::Guided
        } else {
            HeadProjection::EveryRow
        }
    }

    /// Decodes token grids (raster order) into pictures or clips with the directory's
    /// decoder.
    pub fn decode(&mut self, tokens: &[Vec<u32>], grid: &[usize]) -> Result<Decoded, RuntimeError> {
        crate::decode::decode(&mut self.engine, &self.manifest, tokens, grid)
    }

    /// Generates one token grid per prompt; `report` sees every call.
    pub fn generate(
        &mut self,
        prompts: &Prompts,
        options: &GenerateOptions,
        report: &mut dyn FnMut(&CallReport),
    ) -> Result<Generation, RuntimeError> {
        self.run_generation(prompts, options, report, None, None)
    }

    /// Teacher forcing: generates as [`Self::generate`] reports it, but feeds the model
    /// `forced` (one raster-order token grid per prompt) instead of its own choices, so two
    /// models can be compared call by call on the same inputs.
    pub fn generate_forced(
        &mut self,
        prompts: &Prompts,
        options: &GenerateOptions,
        forced: &[Vec<u32>],
        report: &mut dyn FnMut(&CallReport),
    ) -> Result<Generation, RuntimeError> {
        let cells = self.plan.cell_count();
        if forced.len() != prompts.len() || forced.iter().any(|g| g.len() != cells) {
            return Err(RuntimeError::BadInput(format!(
                "forced tokens must be {} grids of {cells} tokens",
                prompts.len()
            )));
        }
        self.run_generation(prompts, options, report, None, Some(forced))
    }

    /// [`Self::generate`], handing `observe` every graph output except the heads' logits, by
    /// name, as float32, at every call: the cache and whatever a calibration build of the
    /// graphs adds. (Downloading the cache each call costs time; only calibration does it.)
    pub fn generate_observing(
        &mut self,
        prompts: &Prompts,
        options: &GenerateOptions,
        report: &mut dyn FnMut(&CallReport),
        observe: &mut OutputObserver<'_>,
    ) -> Result<Generation, RuntimeError> {
        self.run_generation(prompts, options, report, Some(observe), None)
    }

    fn run_generation(
        &mut self,
        prompts: &Prompts,
        options: &GenerateOptions,
        report: &mut dyn FnMut(&CallReport),
        mut observe: Option<&mut OutputObserver<'_>>,
        forced: Option<&[Vec<u32>]>,
    ) -> Result<Generation, RuntimeError> {
        options.sampling.validate()?;
        let interval = usize::try_from(options.cfg_interval).ok();
        let schedule = CfgSchedule::new(options.cfg_scale, interval)?;
        prompts.check(&self.manifest, options.cfg_scale)?;
        let batch = prompts.len();
        let rows = model_rows(batch, options.cfg_scale);
        // Observers (calibration) see every row's outputs, and every row's logits come back
        // to the host (not through the selection graph) when asked for.
        let every_row_logits = options.unguided_logits || observe.is_some();
        let projection = self.projection(rows, batch, every_row_logits);
        let head_rows = projection.rows(rows, batch);
        let vocab = self.manifest.vocab_size;
        let cells = self.plan.cell_count();
        let condition_len = self.condition_len();
        let mut rngs: Vec<ImageRng> = (0..batch as u64)
            .map(|i| ImageRng::new(options.seed, i))
            .collect();
        let mut grid_tokens = vec![0u32; batch * cells];
        let mut cache: Vec<(String, E::Value)> = Vec::new();
        let mut slots = match self.manifest.kv_cache.layout {
            CacheLayout::Append => None,
            CacheLayout::Static => Some(StaticSlots::new(&self.manifest, rows)?),
        };
        // Buffers reused from call to call (sized for the widest wavefront on first use).
        let (mut logits, mut guided) = (Vec::new(), Vec::new());
        let mut tokens = Vec::new();
        let calls = self.plan.calls().len();
        for index in 0..calls {
            let call = &self.plan.calls()[index];
            let started = Instant::now();
            let (kind, mut inputs) = if call.is_prefill() {
                self.prefill_inputs(prompts, rows)?
            } else {
                let tokens: Vec<i64> = (0..rows)
                    .flat_map(|row| {
                        let image = &grid_tokens[(row % batch) * cells..][..cells];
                        call.fed().iter().map(move |c| i64::from(image[c.raster()]))
                    })
                    .collect();
                let positions: Vec<i64> = call
                    .fed()
                    .iter()
                    .map(|c| (condition_len + c.raster()) as i64)
                    .collect();
                let inputs = match &mut slots {
                    None => self.step_inputs(tokens, positions, rows)?,
                    Some(slots) => {
                        let (tokens, positions, masks) = slots.step(tokens, positions)?;
                        let mut inputs = self.step_inputs(tokens, positions, rows)?;
                        for (name, mask) in masks {
                            inputs.push((name.to_string(), self.engine.upload(mask)?));
                        }
                        inputs
                    }
                };
                (GraphKind::Step, inputs)
            };
            let mix = match projection {
                HeadProjection::Unmixed => None,
                HeadProjection::EveryRow => Some(identity_mix(rows)),
                HeadProjection::Guided => Some(schedule.head_mix(call.tokens_before(), batch)),
            };
            if let Some(mix) = mix {
                let mix = HostTensor::F32(vec![head_rows, rows], mix);
                inputs.push((names::HEAD_MIX.into(), self.engine.upload(mix)?));
            }
            inputs.append(&mut cache);
            let mut outputs = self.engine.run(kind, inputs)?;
            let returned = match &slots {
                Some(slots) if kind == GraphKind::Step => slots.width,
                _ => call.input_len(),
            };
            // With a selection graph, the head logits stay where they are and only each
            // cell's top-k guided logits come back; unless every row's logits were asked for.
            let call_logits = if self.engine.has(GraphKind::Select) && !every_row_logits {
                let guidance = Guidance {
                    rows: head_rows,
                    prompts: batch,
                    guided: projection != HeadProjection::Guided
                        && schedule.is_guided(call.tokens_before()),
                    scale: schedule.scale(),
                    top_k: options.sampling.top_k,
                };
                let model = (&self.manifest, self.heads.as_slice());
                CallLogits::Selected(select(
                    &mut self.engine,
                    model,
                    &mut outputs,
                    call,
                    returned,
                    guidance,
                )?)
            } else {
                CallLogits::Heads(self.head_logits(
                    &mut outputs,
                    head_rows,
                    call.input_len(),
                    returned,
                )?)
            };
            if let Some(observe) = observe.as_mut() {
                for (name, value) in &outputs {
                    if !self.manifest.heads.iter().any(|h| h.output == *name) {
                        let (_, values) = self.engine.download_f32(value)?;
                        observe(name, &values);
                    }
                }
            }
            if let Some(slots) = &mut slots {
                if kind == GraphKind::Prefill {
                    let name = &self.manifest.kv_cache.present_key_bias;
                    let bias = take_output(&self.engine, &mut outputs, name)?;
                    slots.start(&self.engine.download_f32(&bias)?.1)?;
                }
            }
            cache = self.carry_cache(&mut outputs, slots.is_none())?;
            let model_seconds = started.elapsed().as_secs_f64();
            let started = Instant::now();
            let produced = call.output_len();
            match call_logits {
                CallLogits::Heads(heads) => {
                    let head_refs: Vec<&[f32]> = heads.iter().map(Vec::as_slice).collect();
                    if projection == HeadProjection::Guided {
                        logits.clear();
                        guided.resize(batch * produced * vocab, 0.0);
                        call.assemble(&head_refs, batch, vocab, &mut guided)?;
                    } else {
                        logits.resize(rows * produced * vocab, 0.0);
                        call.assemble(&head_refs, rows, vocab, &mut logits)?;
                        guided.resize(batch * produced * vocab, 0.0);
                        schedule.apply(call.tokens_before(), &logits, &mut guided)?;
                    }
                }
                // The guided logits are known at each cell's candidates; the rest are −∞,
                // which is what top-k makes of them on the host too.
                CallLogits::Selected(candidates) => {
                    candidates.check_ties(&options.sampling, vocab)?;
                    logits.clear();
                    guided.clear();
                    guided.resize(batch * produced * vocab, f32::NEG_INFINITY);
                    candidates.scatter(vocab, &mut guided)?;
                }
            }
            tokens.resize(batch * produced, 0);
            sample_block(&guided, vocab, &options.sampling, &mut rngs, &mut tokens)?;
            call.place(&tokens, batch, &mut grid_tokens)?;
            if let Some(forced) = forced {
                for (image, grid) in forced.iter().enumerate() {
                    for produced in call.produced() {
                        let cell = produced.cell().raster();
                        grid_tokens[image * cells + cell] = grid[cell];
                    }
                }
            }
            report(&CallReport {
                call,
                calls,
                rows,
                logits: &logits,
                guided: &guided,
                tokens: &tokens,
                model_seconds,
                sampling_seconds: started.elapsed().as_secs_f64(),
            });
        }
        Ok(Generation {
            grid: self.manifest.grid.clone(),
            tokens: grid_tokens.chunks(cells).map(<[u32]>::to_vec).collect(),
            calls,
        })
    }

    fn condition_len(&self) -> usize {
        match self.manifest.condition {
            Condition::Class { .. } => 1,
            Condition::Caption { tokens, .. } => tokens,
        }
    }

    /// The prefill's graph and inputs for `[cond; uncond]` (or cond only without guidance).
    /// A class-conditional model whose engine has no prefill graph runs the prefill as a
    /// step: the class as token `class_token_offset + label` at position 0, over an empty
    /// cache.
    fn prefill_inputs(
        &self,
        prompts: &Prompts,
        rows: usize,
    ) -> Result<(GraphKind, Inputs<E>), RuntimeError> {
        let batch = prompts.len();
        match (&self.manifest.condition, prompts) {
            (
                Condition::Class {
                    null_class,
                    class_token_offset,
                    ..
                },
                Prompts::Classes(labels),
            ) => {
                let mut all = labels.clone();
                if rows > batch {
                    let null = null_class.ok_or_else(|| {
                        RuntimeError::BadInput("this model has no null class to guide with".into())
                    })?;
                    all.extend(std::iter::repeat_n(null as i64, batch));
                }
                if self.engine.has(GraphKind::Prefill) {
                    let labels = self.engine.upload(HostTensor::I64(vec![rows], all))?;
                    return Ok((
                        GraphKind::Prefill,
                        vec![(names::CLASS_LABELS.into(), labels)],
                    ));
                }
                let offset = class_token_offset.ok_or_else(|| {
                    RuntimeError::BadInput(
                        "the prefill graph is not loaded and this model's step graph does not \
                         embed classes (re-export it with this narx)"
                            .into(),
                    )
                })? as i64;
                let tokens = all.iter().map(|label| offset + label).collect();
                Ok((GraphKind::Step, self.empty_cache_step(tokens, rows)?))
            }
            (
                Condition::Caption { tokens, dim },
                Prompts::Captions {
                    embeddings, mask, ..
                },
            ) => {
                let (t, d) = (*tokens, *dim);
                let mut features = embeddings.clone();
                let mut masks = mask.clone();
                let mut null = vec![false; batch];
                if rows > batch {
                    // The uncond half: the graph swaps in the learned null caption; its
                    // attention still follows the prompt's mask (NAR-SPEC §3.3).
                    features.extend(std::iter::repeat_n(0.0, batch * t * d));
                    masks.extend_from_slice(mask);
                    null.extend(std::iter::repeat_n(true, batch));
                }
                let inputs = vec![
                    (
                        names::CAPTION_EMBEDDINGS.into(),
                        self.engine
                            .upload(HostTensor::F32(vec![rows, t, d], features))?,
                    ),
                    (
                        names::CAPTION_MASK.into(),
                        self.engine.upload(HostTensor::F32(vec![rows, t], masks))?,
                    ),
                    (
                        names::NULL_CAPTION.into(),
                        self.engine.upload(HostTensor::Bool(vec![rows], null))?,
                    ),
                ];
                Ok((GraphKind::Prefill, inputs))
            }
            _ => Err(RuntimeError::BadInput(
                "the prompts do not match the model's condition".into(),
            )),
        }
    }

    /// The logits `(rows, width, vocab)` of each head the plan reads, on the host, in plan
    /// head order, from outputs `returned` wide (the static layout pads the wavefront; the
    /// padding rows are dropped).
    fn head_logits(
        &self,
        outputs: &mut HashMap<String, E::Value>,
        rows: usize,
        width: usize,
        returned: usize,
    ) -> Result<Vec<Vec<f32>>, RuntimeError> {
        let vocab = self.manifest.vocab_size;
        let expected = [rows, returned, vocab];
        self.heads
            .iter()
            .map(|&index| {
                let head = &self.manifest.heads[index];
                let data = download_output(&self.engine, outputs, &head.output, &expected)?;
                if returned == width {
                    return Ok(data);
                }
                Ok(data
                    .chunks(returned * vocab)
                    .flat_map(|row| &row[..width * vocab])
                    .copied()
                    .collect())
            })
            .collect()
    }

    /// The step's token and position inputs: `tokens (rows, width)` at `positions (width)`.
    fn step_inputs(
        &self,
        tokens: Vec<i64>,
        positions: Vec<i64>,
        rows: usize,
    ) -> Result<Inputs<E>, RuntimeError> {
        let width = positions.len();
        Ok(vec![
            (
                names::TOKENS.to_string(),
                self.engine
                    .upload(HostTensor::I64(vec![rows, width], tokens))?,
            ),
            (
                names::POSITIONS.to_string(),
                self.engine
                    .upload(HostTensor::I64(vec![width], positions))?,
            ),
        ])
    }

    /// A step at position 0 over an empty cache: one token per row.
    fn empty_cache_step(&self, tokens: Vec<i64>, rows: usize) -> Result<Inputs<E>, RuntimeError> {
        let mut inputs = self.step_inputs(tokens, vec![0], rows)?;
        let kv = &self.manifest.kv_cache;
        let bias = HostTensor::Empty(DType::F32, vec![rows, 0]);
        inputs.push((kv.past_key_bias.clone(), self.engine.upload(bias)?));
        let cache_shape = vec![rows, kv.kv_heads, 0, kv.head_dim];
        for layer in 0..kv.layers {
            for name in [&kv.past_key, &kv.past_value] {
                let empty = HostTensor::Empty(kv.dtype, cache_shape.clone());
                inputs.push((KvCache::name(name, layer), self.engine.upload(empty)?));
            }
        }
        Ok(inputs)
    }

    /// Renames this call's `present.*` outputs to the next call's `past.*` inputs (the key
    /// bias too, `with_bias`, in the append layout).
    fn carry_cache(
        &self,
        outputs: &mut HashMap<String, E::Value>,
        with_bias: bool,
    ) -> Result<Inputs<E>, RuntimeError> {
        let kv = &self.manifest.kv_cache;
        let mut pairs = kv.carried();
        if with_bias {
            pairs.push((kv.present_key_bias.clone(), kv.past_key_bias.clone()));
        }
        pairs
            .into_iter()
            .map(|(present, past)| Ok((past, take_output(&self.engine, outputs, &present)?)))
            .collect()
    }
}

/// Candidates the selection graph returns past top-k. Its TopK returns exactly as many
/// logits as asked, while top-k keeps every logit tied with the k-th largest (and the
/// temperature's division can tie more): the margin carries those ties to the host's top-k.
const TIE_MARGIN: usize = 64;

/// How many candidates per cell the selection graph returns for `top_k` (0: all).
fn candidate_count(top_k: usize, vocab: usize) -> usize {
    if top_k == 0 {
        vocab
    } else {
        top_k.saturating_add(TIE_MARGIN).min(vocab)
    }
}

/// Runs the selection graph on a call's head logits (taken from `outputs`, which are
/// `width` wide): each produced cell's largest guided logits, [`candidate_count`] of them.
/// `model` is the manifest and the manifest index of each head the plan reads.
fn select<E: Engine>(
    engine: &mut E,
    model: (&Manifest, &[usize]),
    outputs: &mut HashMap<String, E::Value>,
    call: &Call,
    width: usize,
    guidance: Guidance,
) -> Result<Candidates, RuntimeError> {
    let (manifest, plan_heads) = model;
    let (rows, prompts) = (guidance.rows as i64, guidance.prompts as i64);
    let vocab = manifest.vocab_size;
    let slots = manifest.heads.len();
    let produced = call.produced();
    let cells = produced.len();
    let (mut index, mut mask) = (vec![0i64; slots * cells], vec![0f32; slots * cells]);
    let mut count = vec![0f32; cells];
    for (cell, target) in produced.iter().enumerate() {
        for (slot, c) in target.contributions().iter().enumerate() {
            let head = plan_heads[c.head];
            index[slot * cells + cell] = (head * width + c.input) as i64;
            mask[slot * cells + cell] = 1.0;
        }
        count[cell] = target.contributions().len() as f32;
    }
    let k = candidate_count(guidance.top_k, vocab);
    let mut inputs = Vec::new();
    for head in &manifest.heads {
        let logits = take_output(engine, outputs, &head.output)?;
        inputs.push((head.output.clone(), logits));
    }
    use narx_graphs::select::names as select;
    let host = [
        (select::INDEX, HostTensor::I64(vec![slots, cells], index)),
        (select::MASK, HostTensor::F32(vec![slots, cells], mask)),
        (select::COUNT, HostTensor::F32(vec![cells], count)),
        (
            select::COND_ROWS,
            HostTensor::I64(vec![guidance.prompts], (0..prompts).collect()),
        ),
        (
            select::UNCOND_ROWS,
            HostTensor::I64(vec![guidance.prompts], (rows - prompts..rows).collect()),
        ),
        (
            select::GUIDED,
            HostTensor::Bool(vec![1], vec![guidance.guided]),
        ),
        (
            select::CFG_SCALE,
            HostTensor::F32(vec![1], vec![guidance.scale]),
        ),
        (select::TOP_K, HostTensor::I64(vec![1], vec![k as i64])),
    ];
    for (name, tensor) in host {
        inputs.push((name.to_string(), engine.upload(tensor)?));
    }
    let mut selected = engine.run(GraphKind::Select, inputs)?;
    let expected = [guidance.prompts, cells, k];
    Ok(Candidates {
        values: download_output(engine, &mut selected, select::TOP_VALUES, &expected)?,
        ids: download_output(engine, &mut selected, select::TOP_INDICES, &expected)?,
        k,
    })
}

/// Removes the output `name` from a call's outputs; its absence is the engine's error.
fn take_output<E: Engine>(
    engine: &E,
    outputs: &mut HashMap<String, E::Value>,
    name: &str,
) -> Result<E::Value, RuntimeError> {
    outputs
        .remove(name)
        .ok_or_else(|| RuntimeError::backend(&engine.name(), format!("no output {name}")))
}

/// Takes the float32 output `name` to the host, checking that its shape is `expected`.
fn download_output<E: Engine>(
    engine: &E,
    outputs: &mut HashMap<String, E::Value>,
    name: &str,
    expected: &[usize],
) -> Result<Vec<f32>, RuntimeError> {
    let value = take_output(engine, outputs, name)?;
    let (shape, data) = engine.download_f32(&value)?;
    if shape != expected {
        return Err(RuntimeError::backend(
            &engine.name(),
            format!("{name} has shape {shape:?}, expected {expected:?}"),
        ));
    }
    Ok(data)
}

/// What the heads project ([`names::HEAD_MIX`]).
#[derive(Clone, Copy, Debug, PartialEq)]
enum HeadProjection {
    /// Every row, with graphs exported before the mix input existed.
    Unmixed,
    /// Every row (the identity mix): each row's own logits.
    EveryRow,
    /// One guided row per prompt: the logits come back guided.
    Guided,
}

impl HeadProjection {
    /// Rows of head logits from a model batch of `rows` rows for `prompts` prompts.
    fn rows(self, rows: usize, prompts: usize) -> usize {
        match self {
            HeadProjection::Guided => prompts,
            HeadProjection::EveryRow | HeadProjection::Unmixed => rows,
        }
    }
}

/// What a call's logits come back as.
enum CallLogits {
    /// Each head's logits the plan reads, `(rows, width, vocab)`, on the host.
    Heads(Vec<Vec<f32>>),
    /// Each produced cell's top-k guided logits, from the selection graph.
    Selected(Candidates),
}

/// What the selection graph needs to guide a call.
#[derive(Clone, Copy)]
struct Guidance {
    /// Model batch rows: `[cond; uncond]`, or the cond rows only.
    rows: usize,
    prompts: usize,
    guided: bool,
    scale: f32,
    top_k: usize,
}

/// Each produced cell's `k` largest guided logits and their token ids (as float), per
/// `(prompt, cell)` row.
struct Candidates {
    values: Vec<f32>,
    ids: Vec<f32>,
    k: usize,
}

impl Candidates {
    /// Fails where a cell's k-th largest logit, after the temperature, is tied through the
    /// last candidate: more logits than came back may share it, and top-k keeps them all.
    /// Such a cell is only possible with degenerate heads (many equal logits).
    fn check_ties(&self, params: &SamplingParams, vocab: usize) -> Result<(), RuntimeError> {
        if params.greedy || params.top_k == 0 || self.k >= vocab {
            return Ok(());
        }
        let divisor = params.divisor();
        for (row, values) in self.values.chunks_exact(self.k).enumerate() {
            let (kth, last) = (values[params.top_k - 1], values[self.k - 1]);
            if last / divisor >= kth / divisor {
                return Err(RuntimeError::backend(
                    "select",
                    format!(
                        "cell row {row}: the top-{} threshold {kth} is tied by more than \
                         {TIE_MARGIN} further logits; top-k keeps every tie, which the device \
                         selection cannot return: run with --select host",
                        params.top_k
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Writes the candidates into `guided` (`(rows, vocab)`, filled with −∞).
    fn scatter(&self, vocab: usize, guided: &mut [f32]) -> Result<(), RuntimeError> {
        let rows = self.values.chunks(self.k).zip(self.ids.chunks(self.k));
        for ((values, ids), out) in rows.zip(guided.chunks_exact_mut(vocab)) {
            for (&value, &id) in values.iter().zip(ids) {
                let slot = out
                    .get_mut(id as usize)
                    .filter(|_| id >= 0.0)
                    .ok_or_else(|| {
                        RuntimeError::backend(
                            "select",
                            format!("token id {id} outside the vocabulary"),
                        )
                    })?;
                *slot = value;
            }
        }
        Ok(())
    }
}

/// A static step's padded tokens and positions, and its `key_bias` and `cache_write`.
type StaticStep = (Vec<i64>, Vec<i64>, [(&'static str, HostTensor); 2]);

/// The host side of the static cache layout (the `nar` module docs of narx-graphs): which
/// slots are filled, the bias of every slot, and the padded wavefront width.
struct StaticSlots {
    rows: usize,
    capacity: usize,
    width: usize,
    filled: usize,
    /// `(rows, capacity)`: 0 where a key is visible, −∞ where not (or not filled yet).
    bias: Vec<f32>,
}

impl StaticSlots {
    fn new(manifest: &Manifest, rows: usize) -> Result<Self, RuntimeError> {
        let width = manifest
            .graphs
            .step
            .inputs
            .iter()
            .find(|input| input.name == names::TOKENS)
            .and_then(|tokens| match tokens.shape.get(1) {
                Some(Dim::Fixed(width)) => Some(*width),
                _ => None,
            })
            .ok_or_else(|| {
                RuntimeError::BadInput(
                    "the manifest says the cache is static, but the step's tokens have no \
                     fixed width"
                        .into(),
                )
            })?;
        let capacity = manifest.kv_cache.capacity;
        Ok(StaticSlots {
            rows,
            capacity,
            width,
            filled: 0,
            bias: vec![f32::NEG_INFINITY; rows * capacity],
        })
    }

    /// After the prefill: its condition keys' bias `(rows, C)` fills the first slots.
    fn start(&mut self, condition: &[f32]) -> Result<(), RuntimeError> {
        let c = condition.len() / self.rows.max(1);
        if c * self.rows != condition.len() || c > self.capacity {
            return Err(RuntimeError::BadInput(format!(
                "the prefill's key bias has {} values for {} rows and {} slots",
                condition.len(),
                self.rows,
                self.capacity
            )));
        }
        for (row, bias) in condition.chunks(c).enumerate() {
            self.bias[row * self.capacity..][..c].copy_from_slice(bias);
        }
        self.filled = c;
        Ok(())
    }

    /// One step's `tokens (rows, n)` and `positions (n)` padded to the width (padding feeds
    /// token 0 at the first position and is written nowhere), with the key bias that shows
    /// the filled slots and this call's, and the one-hot `cache_write`.
    fn step(&mut self, tokens: Vec<i64>, positions: Vec<i64>) -> Result<StaticStep, RuntimeError> {
        let (n, w, capacity) = (positions.len(), self.width, self.capacity);
        if n > w || self.filled + n > capacity {
            return Err(RuntimeError::BadInput(format!(
                "a step of {n} tokens after {} does not fit the static graphs ({w} tokens per \
                 step, {capacity} cache slots)",
                self.filled
            )));
        }
        let tokens = tokens
            .chunks(n.max(1))
            .flat_map(|row| row.iter().copied().chain(std::iter::repeat_n(0, w - n)))
            .collect();
        let pad = positions.first().copied().unwrap_or(0);
        let positions = positions
            .into_iter()
            .chain(std::iter::repeat_n(pad, w - n))
            .collect();
        let mut write = vec![0.0; capacity * w];
        for j in 0..n {
            write[(self.filled + j) * w + j] = 1.0;
        }
        for row in 0..self.rows {
            self.bias[row * capacity + self.filled..][..n].fill(0.0);
        }
        self.filled += n;
        let masks = [
            (
                names::KEY_BIAS,
                HostTensor::F32(vec![self.rows, capacity], self.bias.clone()),
            ),
            (
                names::CACHE_WRITE,
                HostTensor::F32(vec![capacity, w], write),
            ),
        ];
        Ok((tokens, positions, masks))
    }
}

/// LlamaGen has a single head and generates in raster order; NAR families in theirs.
pub fn natural_order(manifest: &Manifest) -> Order {
    match manifest.family {
        Family::LlamaGenC2i => Order::Raster,
        Family::NarC2i | Family::NarT2i | Family::NarVideo => Order::Nar,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidates(values: Vec<f32>, k: usize) -> Candidates {
        let ids = (0..values.len()).map(|i| (i % k) as f32).collect();
        Candidates { values, ids, k }
    }

    fn top_k(top_k: usize, temperature: f32) -> SamplingParams {
        SamplingParams {
            top_k,
            temperature,
            ..SamplingParams::default()
        }
    }

    #[test]
    fn candidates_cover_top_k_and_a_margin_for_ties() {
        assert_eq!(candidate_count(0, 1000), 1000);
        assert_eq!(candidate_count(10, 1000), 10 + TIE_MARGIN);
        assert_eq!(candidate_count(990, 1000), 1000);
        assert_eq!(candidate_count(usize::MAX, 1000), 1000);
    }

    #[test]
    fn ties_through_the_last_candidate_are_refused() {
        let vocab = 1000;
        let k = 2 + TIE_MARGIN;
        // The 2nd largest ends the ties in time in row 0; in row 1 it is tied to the end.
        let mut fits = vec![5.0, 4.0, 4.0];
        fits.resize(k, 1.0);
        let mut overflows = vec![5.0];
        overflows.resize(k, 4.0);
        let rows = [fits.clone(), overflows].concat();
        assert!(candidates(fits.clone(), k)
            .check_ties(&top_k(2, 1.0), vocab)
            .is_ok());
        let error = candidates(rows.clone(), k)
            .check_ties(&top_k(2, 1.0), vocab)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("cell row 1") && error.contains("--select host"),
            "{error}"
        );
        // Greedy and top-k off need no threshold; all the vocabulary returned has every tie.
        let greedy = SamplingParams {
            greedy: true,
            ..top_k(2, 1.0)
        };
        assert!(candidates(rows.clone(), k)
            .check_ties(&greedy, vocab)
            .is_ok());
        assert!(candidates(rows.clone(), k)
            .check_ties(&top_k(0, 1.0), vocab)
            .is_ok());
        assert!(candidates(rows, k).check_ties(&top_k(2, 1.0), k).is_ok());
    }

    /// The threshold is compared after the temperature, which can round neighbours together.
    #[test]
    fn ties_made_by_the_temperature_count() {
        let k = 1 + TIE_MARGIN;
        // Neighbouring floats that divide by 0.7 to the same quotient.
        const BITS: u32 = 1_068_710_611; // 1.4002327
        let kth = f32::from_bits(BITS);
        let next = f32::from_bits(BITS - 1);
        let divisor = 0.7;
        assert_eq!(
            kth / divisor,
            next / divisor,
            "the example must round together"
        );
        let mut row = vec![kth];
        row.resize(k, next);
        assert!(candidates(row.clone(), k)
            .check_ties(&top_k(1, 1.0), 1000)
            .is_ok());
        assert!(candidates(row, k)
            .check_ties(&top_k(1, divisor), 1000)
            .is_err());
    }
}
