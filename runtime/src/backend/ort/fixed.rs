//! The step graph on buffers allocated once, as CUDA graphs need.
//!
//! A captured CUDA graph replays its kernels on the addresses it was captured with, so each
//! input and output of a replayed step must sit at the same address call after call. A
//! step's cache outputs are the next step's cache inputs, and a call cannot write the
//! buffers it reads, so there are two sets of output buffers and the calls alternate: a call
//! of parity `p` writes set `p` and reads its cache from set `1 − p`, which the call before
//! wrote. Each parity is its own captured graph (ONNX Runtime's `gpu_graph_id` run option).
//! Inputs that come from the host (tokens, positions, masks) are copied into buffers of their
//! own every call; a cache that is not the last call's output (the prefill's) is copied into
//! the set the call reads, once per generation.
//!
//! The outputs [`FixedStep::run`] returns share these buffers: they are valid until the step
//! has run twice more, which is how the generator uses them (each call's outputs are
//! consumed by the next), and must not outlive the engine, which holds the allocator the
//! buffers came from (ONNX Runtime frees a buffer through it when its last value goes).

use std::collections::HashMap;

use ort::memory::{Allocator, MemoryInfo};
use ort::session::{RunOptions, Session};
use ort::value::{DynTensor, DynTensorValueType, DynValue, TensorElementType, ValueType};

use super::{by_name, BACKEND};
use crate::RuntimeError;

/// The fixed buffers of one step session and what feeds what.
pub(super) struct FixedStep {
    /// Step input → the output that feeds it at the next call (`past.0.key` ←
    /// `present.0.key`).
    carried: HashMap<String, String>,
    buffers: Option<StepBuffers>,
    /// Allocates the buffers on the provider's device; made on first use and kept for the
    /// life of the engine, so buffers of an earlier batch can be freed through it.
    allocator: Option<Allocator>,
    /// The first `gpu_graph_id` the next set of buffers takes (two per set: one per parity).
    next_graph_id: u32,
    /// Bytes copied into the buffers so far.
    staged_bytes: u64,
}

/// Buffers for one set of input shapes (one batch size).
struct StepBuffers {
    /// The input shapes they were made for, by name.
    shapes: Vec<(String, Vec<usize>)>,
    /// The outputs written by the calls of parity 0 and of parity 1.
    outputs: [HashMap<String, DynTensor>; 2],
    /// Inputs that no output feeds.
    inputs: HashMap<String, DynTensor>,
    /// `gpu_graph_id` for each parity.
    run_options: [RunOptions; 2],
    /// The parity of the next call.
    next: usize,
}

impl FixedStep {
    /// `carried`: (output, input) pairs, each output feeding that input at the next call.
    pub(super) fn new(carried: &[(String, String)]) -> Self {
        FixedStep {
            carried: carried
                .iter()
                .map(|(output, input)| (input.clone(), output.clone()))
                .collect(),
            buffers: None,
            allocator: None,
            // ONNX Runtime keeps 0 for itself.
            next_graph_id: 1,
            staged_bytes: 0,
        }
    }

    /// Bytes copied into the buffers so far: the host inputs of every call, and any cache
    /// that was not the previous call's output.
    pub(super) fn staged_bytes(&self) -> u64 {
        self.staged_bytes
    }

    /// Runs `session` (the step graph) on the fixed buffers: copies each input into its
    /// buffer unless it is that buffer already, runs this call's parity, and returns every
    /// output by name (sharing the buffers; see the module docs).
    pub(super) fn run(
        &mut self,
        session: &mut Session,
        device: &MemoryInfo<'static>,
        inputs: Vec<(String, DynValue)>,
    ) -> Result<HashMap<String, DynValue>, RuntimeError> {
        let shapes = input_shapes(&inputs)?;
        if self.buffers.as_ref().is_none_or(|b| b.shapes != shapes) {
            // The old buffers go: their graph ids are never replayed again.
            self.buffers = None;
            let allocator = match &mut self.allocator {
                Some(allocator) => allocator,
                none => none.insert(
                    Allocator::new(session, device.clone())
                        .map_err(fail("creating an allocator"))?,
                ),
            };
            let buffers = StepBuffers::new(
                session,
                allocator,
                &self.carried,
                shapes,
                self.next_graph_id,
            )?;
            self.next_graph_id += 2;
            self.buffers = Some(buffers);
        }
        let buffers = self.buffers.as_mut().expect("made above");
        let parity = buffers.next;
        buffers.next = 1 - parity;
        let mut binding = session.create_binding().map_err(fail("binding"))?;
        for (name, value) in &inputs {
            let target = match self.carried.get(name) {
                Some(output) => buffers.outputs[1 - parity].get_mut(output),
                None => buffers.inputs.get_mut(name),
            }
            .expect("every input has a buffer");
            let source = value
                .view()
                .downcast::<DynTensorValueType>()
                .map_err(fail("staging an input"))?;
            if source.data_ptr() != target.data_ptr() {
                source
                    .copy_into(&mut *target)
                    .map_err(fail(&format!("copying `{name}` into its buffer")))?;
                self.staged_bytes += target.size().unwrap_or(0) as u64;
            }
            binding
                .bind_input(name.as_str(), &*target)
                .map_err(fail("binding an input"))?;
        }
        for (name, tensor) in buffers.outputs[parity].iter_mut() {
            binding
                .bind_output(name.as_str(), &mut *tensor)
                .map_err(fail("binding an output"))?;
        }
        let outputs = session
            .run_binding_with_options(&binding, &buffers.run_options[parity])
            .map_err(fail("running the step graph"))?;
        Ok(by_name(outputs))
    }
}

impl StepBuffers {
    fn new(
        session: &Session,
        allocator: &Allocator,
        carried: &HashMap<String, String>,
        shapes: Vec<(String, Vec<usize>)>,
        first_graph_id: u32,
    ) -> Result<Self, RuntimeError> {
        let sizes = symbol_sizes(session, &shapes)?;
        let mut outputs = [HashMap::new(), HashMap::new()];
        for outlet in session.outputs() {
            let ValueType::Tensor {
                ty,
                shape,
                dimension_symbols,
            } = outlet.dtype()
            else {
                return Err(bad(format!("output `{}` is not a tensor", outlet.name())));
            };
            let dims = shape
                .iter()
                .zip(dimension_symbols.iter())
                .map(|(&dim, symbol)| match usize::try_from(dim) {
                    Ok(dim) => Ok(dim),
                    Err(_) => sizes.get(symbol.as_str()).copied().ok_or_else(|| {
                        bad(format!(
                            "output `{}` has a dimension its inputs do not fix; CUDA graphs \
                             need a static export (`narx export --static`)",
                            outlet.name()
                        ))
                    }),
                })
                .collect::<Result<Vec<usize>, _>>()?;
            for set in &mut outputs {
                set.insert(outlet.name().to_string(), allocate(allocator, *ty, &dims)?);
            }
        }
        let mut inputs = HashMap::new();
        for (name, dims) in &shapes {
            match carried.get(name) {
                Some(output) => {
                    let fed = outputs[0].get(output).ok_or_else(|| {
                        bad(format!(
                            "input `{name}` is fed by `{output}`, which is no output"
                        ))
                    })?;
                    if !matches!(fed.dtype(), ValueType::Tensor { shape, .. }
                        if shape.iter().map(|&d| d as usize).eq(dims.iter().copied()))
                    {
                        return Err(bad(format!(
                            "input `{name}` is {dims:?}, but `{output}`, which feeds it, is {}",
                            fed.dtype()
                        )));
                    }
                }
                None => {
                    let declared = session
                        .inputs()
                        .iter()
                        .find(|o| o.name() == name)
                        .and_then(|o| match o.dtype() {
                            ValueType::Tensor { ty, .. } => Some(*ty),
                            _ => None,
                        })
                        .ok_or_else(|| bad(format!("input `{name}` is not a tensor input")))?;
                    inputs.insert(name.clone(), allocate(allocator, declared, dims)?);
                }
            }
        }
        let graph = |parity: u32| -> Result<RunOptions, RuntimeError> {
            let mut options = RunOptions::new().map_err(fail("creating run options"))?;
            options
                .set("gpu_graph_id", (first_graph_id + parity).to_string())
                .map_err(fail("setting gpu_graph_id"))?;
            Ok(options)
        };
        Ok(StepBuffers {
            shapes,
            outputs,
            inputs,
            run_options: [graph(0)?, graph(1)?],
            next: 0,
        })
    }
}

/// The inputs' shapes, sorted by name.
fn input_shapes(inputs: &[(String, DynValue)]) -> Result<Vec<(String, Vec<usize>)>, RuntimeError> {
    let mut shapes = inputs
        .iter()
        .map(|(name, value)| match value.dtype() {
            ValueType::Tensor { shape, .. } => {
                Ok((name.clone(), shape.iter().map(|&d| d as usize).collect()))
            }
            other => Err(bad(format!("input `{name}` is {other}, not a tensor"))),
        })
        .collect::<Result<Vec<_>, _>>()?;
    shapes.sort();
    Ok(shapes)
}

/// The size each named dynamic dimension (`batch`) has in these inputs.
fn symbol_sizes(
    session: &Session,
    shapes: &[(String, Vec<usize>)],
) -> Result<HashMap<String, usize>, RuntimeError> {
    let mut sizes = HashMap::new();
    for outlet in session.inputs() {
        let ValueType::Tensor {
            shape,
            dimension_symbols,
            ..
        } = outlet.dtype()
        else {
            continue;
        };
        let Some((_, given)) = shapes.iter().find(|(name, _)| name == outlet.name()) else {
            continue;
        };
        for ((&declared, symbol), &size) in shape.iter().zip(dimension_symbols.iter()).zip(given) {
            if declared >= 0 || symbol.is_empty() {
                continue;
            }
            if let Some(&seen) = sizes.get(symbol) {
                if seen != size {
                    return Err(bad(format!(
                        "dimension `{symbol}` is {seen} in one input and {size} in `{}`",
                        outlet.name()
                    )));
                }
            }
            sizes.insert(symbol.clone(), size);
        }
    }
    Ok(sizes)
}

fn allocate(
    allocator: &Allocator,
    ty: TensorElementType,
    dims: &[usize],
) -> Result<DynTensor, RuntimeError> {
    DynTensor::new(allocator, ty, dims.to_vec()).map_err(fail("allocating a step buffer"))
}

fn bad(message: String) -> RuntimeError {
    RuntimeError::backend(BACKEND, format!("step graph on fixed buffers: {message}"))
}

fn fail(what: &str) -> impl Fn(ort::Error) -> RuntimeError + '_ {
    move |e| RuntimeError::backend(BACKEND, format!("step graph on fixed buffers: {what}: {e}"))
}
