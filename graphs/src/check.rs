//! A static TensorRT compatibility check of a model directory: what TensorRT's ONNX parser
//! would refuse, or quietly change, in each graph, found without a GPU — before a directory
//! is copied to a Jetson, or an engine build fails minutes into `narx run`.
//!
//! The rules are onnx-tensorrt's `docs/operators.md` for the target (the operators, the
//! element types each one computes on, the operands that must be constants, the opsets), its
//! importers where the table is silent, and what ONNX Runtime's TensorRT execution provider
//! needs on top: a shape profile for every dynamic input, and external data it can read.
//! Nodes inside `If`/`Loop`/`Scan` bodies are checked for operator support only.
//!
//! INT64 on TensorRT 8.6: its parser imports every INT64 tensor (inputs, weights, results) as
//! INT32 (`convertDtype` in `onnx2trt_utils.cpp`), so INT64 works wherever the operator takes
//! INT32. What remains is reported: INT64 graph inputs and outputs, which ONNX Runtime's
//! TensorRT EP converts on every call, and integer arithmetic on run-time data, which can
//! wrap (warnings); operators without INT32 (MatMul, Reduce*, Softmax, …) fail (errors).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::ops::RangeInclusive;
use std::path::{Component, Path};
use std::str::FromStr;

use crate::manifest::{Manifest, ShapeProfile};
use crate::onnx::tensor_proto::{DataLocation, DataType};
use crate::onnx::tensor_shape_proto::{dimension::Value as DimValue, Dimension};
use crate::onnx::{type_proto, GraphProto, ModelProto, NodeProto, ValueInfoProto};
use crate::GraphError;

/// Which TensorRT the graphs must build with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TensorRtTarget {
    /// TensorRT 10.0 or later: opsets 9 to 20, INT64 computed natively.
    #[default]
    V10,
    /// TensorRT 8.6 (JetPack 5): opsets up to 17, and every INT64 tensor becomes INT32.
    V8_6,
}

impl TensorRtTarget {
    /// The default-domain opsets the parser supports: operators.md's header ("opset 9 to
    /// opset 20" for 10; "up to Opset 17" for 8.6, whose parser warns below 7).
    pub fn opsets(self) -> RangeInclusive<i64> {
        match self {
            TensorRtTarget::V10 => 9..=20,
            TensorRtTarget::V8_6 => 7..=17,
        }
    }

    /// The element types TensorRT computes `op` on; `None` when it has no importer for it.
    fn operator_types(self, op: &str) -> Option<Types> {
        let &(_, v8_6, v10) = OPERATORS.iter().find(|(name, ..)| *name == op)?;
        let types = match self {
            TensorRtTarget::V10 => v10,
            TensorRtTarget::V8_6 => v8_6,
        };
        (types != 0).then_some(types)
    }

    /// The type the parser gives a tensor of ONNX type `onnx` (its `convertDtype`); `None`
    /// when TensorRT has no such tensors.
    fn import_type(self, onnx: DataType) -> Option<DataType> {
        match (onnx, self) {
            (DataType::Double, _) => Some(DataType::Float),
            (DataType::Int64, TensorRtTarget::V8_6) => Some(DataType::Int32),
            (
                DataType::Float
                | DataType::Float16
                | DataType::Int32
                | DataType::Int64
                | DataType::Int8
                | DataType::Uint8
                | DataType::Bool,
                _,
            )
            | (DataType::Bfloat16 | DataType::Float8e4m3fn | DataType::Int4, TensorRtTarget::V10) => {
                Some(onnx)
            }
            _ => None,
        }
    }
}

impl fmt::Display for TensorRtTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TensorRtTarget::V10 => "TensorRT 10",
            TensorRtTarget::V8_6 => "TensorRT 8.6",
        })
    }
}

impl FromStr for TensorRtTarget {
    type Err = GraphError;

    fn from_str(s: &str) -> Result<Self, GraphError> {
        match s {
            "10" => Ok(TensorRtTarget::V10),
            "8.6" => Ok(TensorRtTarget::V8_6),
            other => Err(GraphError::Config(format!(
                "unknown TensorRT version {other:?}: expected 10 or 8.6"
            ))),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    /// The parser or the engine build fails (or the node leaves TensorRT).
    Error,
    /// It builds, but TensorRT changes something the graph says.
    Warning,
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Severity::Error => "error",
            Severity::Warning => "warning",
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProblemKind {
    /// The graph's default-domain opset is outside the target's range.
    Opset,
    /// An operator the parser has no importer for, or a non-standard domain.
    Operator,
    /// An operand the importer needs as a build-time constant is computed.
    ConstantOperand,
    /// An element type TensorRT lacks, casts, or does not compute the operator on.
    DataType,
    /// A dynamic input without a consistent TensorRT shape profile.
    Profile,
    /// A graph, weight or external-data file that is missing, too large or too short.
    File,
}

/// One finding, naming the file and the node or tensor it is about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub severity: Severity,
    pub kind: ProblemKind,
    /// The graph file (`step.onnx`), or the weight file for its own problems.
    pub graph: String,
    /// `name (OpType)` of the node, or `input name` / `output name` / `initializer name`.
    pub node: Option<String>,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.severity, self.graph)?;
        if let Some(node) = &self.node {
            write!(f, ": {node}")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Element types as a bit set, named as operators.md names them.
type Types = u16;
const F32: Types = 1;
const F16: Types = 1 << 1;
const BF16: Types = 1 << 2;
const I32: Types = 1 << 3;
const I64: Types = 1 << 4;
const I8: Types = 1 << 5;
const U8: Types = 1 << 6;
const BOOL: Types = 1 << 7;
const FP8: Types = 1 << 8;
const I4: Types = 1 << 9;
const FP: Types = F32 | F16;
const FP_BF: Types = FP | BF16;
/// Numbers on 8.6: floats and INT32.
const NUM: Types = FP | I32;
const NUM_10: Types = FP_BF | I32 | I64;
/// What 8.6 moves and reshapes: numbers, INT8 and BOOL.
const DATA: Types = NUM | I8 | BOOL;
const DATA_10: Types = NUM_10 | BOOL;

const TYPE_NAMES: [(Types, DataType, &str); 10] = [
    (F32, DataType::Float, "FP32"),
    (F16, DataType::Float16, "FP16"),
    (BF16, DataType::Bfloat16, "BF16"),
    (I32, DataType::Int32, "INT32"),
    (I64, DataType::Int64, "INT64"),
    (I8, DataType::Int8, "INT8"),
    (U8, DataType::Uint8, "UINT8"),
    (BOOL, DataType::Bool, "BOOL"),
    (FP8, DataType::Float8e4m3fn, "FP8"),
    (I4, DataType::Int4, "INT4"),
];

/// `(operator, types on TensorRT 8.6, types on TensorRT 10)`; 0: not supported there. An
/// operator not listed is supported by neither.
///
/// Source: onnx-tensorrt `docs/operators.md` on branches `8.6-GA` and `10.1-GA` (`10.0-GA`
/// lists the same operators; 10.1 completes ConstantOfShape's types). One exception, from
/// `builtin_op_importers.cpp` of 8.6-GA: its ConstantOfShape refuses only UINT8 values,
/// where the 8.6 table says FP32.
const OPERATORS: &[(&str, Types, Types)] = &[
    ("Abs", NUM, NUM_10),
    ("Acos", FP, FP_BF),
    ("Acosh", FP, FP_BF),
    ("Add", NUM, NUM_10),
    ("And", BOOL, BOOL),
    ("ArgMax", NUM, NUM_10),
    ("ArgMin", NUM, NUM_10),
    ("Asin", FP, FP_BF),
    ("Asinh", FP, FP_BF),
    ("Atan", FP, FP_BF),
    ("Atanh", FP, FP_BF),
    ("AveragePool", NUM | I8, FP_BF),
    ("BatchNormalization", FP, FP_BF),
    ("Cast", DATA | U8, DATA_10 | U8),
    ("CastLike", 0, DATA_10 | U8),
    ("Ceil", FP, FP_BF),
    ("Celu", FP, FP_BF),
    ("Clip", FP | I8, FP_BF),
    ("Concat", DATA, DATA_10),
    ("Constant", DATA, DATA_10),
    ("ConstantOfShape", DATA, DATA_10),
    ("Conv", FP | I8, FP_BF),
    ("ConvTranspose", FP | I8, FP_BF),
    ("Cos", FP, FP_BF),
    ("Cosh", FP, FP_BF),
    ("CumSum", FP, FP_BF),
    ("DeformConv", 0, FP),
    ("DepthToSpace", NUM, NUM_10),
    ("DequantizeLinear", I8, I8 | FP8 | I4),
    ("Div", NUM, NUM_10),
    ("Dropout", FP, FP_BF),
    ("Einsum", FP, FP_BF),
    ("Elu", FP | I8, FP_BF),
    ("Equal", NUM, NUM_10),
    ("Erf", FP, FP_BF),
    ("Exp", FP, FP_BF),
    ("Expand", NUM | BOOL, DATA_10),
    ("EyeLike", NUM | BOOL, DATA_10),
    ("Flatten", NUM | BOOL, DATA_10),
    ("Floor", FP, FP_BF),
    ("Gather", DATA, DATA_10),
    ("GatherElements", DATA, DATA_10),
    ("GatherND", DATA, DATA_10),
    ("Gelu", 0, NUM_10 | I8),
    ("Gemm", FP | I8, FP_BF),
    ("GlobalAveragePool", FP | I8, FP_BF),
    ("GlobalLpPool", FP | I8, FP_BF),
    ("GlobalMaxPool", FP | I8, FP_BF),
    ("Greater", NUM, NUM_10),
    ("GreaterOrEqual", NUM, NUM_10),
    ("GridSample", FP, FP),
    ("GroupNormalization", FP, FP_BF),
    ("GRU", FP, FP_BF),
    ("Hardmax", 0, FP_BF),
    ("HardSigmoid", FP | I8, FP_BF),
    ("HardSwish", FP | I8, FP_BF),
    ("Identity", DATA, DATA_10),
    ("If", NUM | BOOL, DATA_10),
    ("ImageScaler", FP, FP_BF),
    ("InstanceNormalization", FP, FP_BF),
    ("IsInf", FP, FP_BF),
    ("IsNaN", NUM, NUM_10),
    ("LayerNormalization", FP, FP_BF),
    ("LeakyRelu", FP | I8, FP_BF),
    ("Less", NUM, NUM_10),
    ("LessOrEqual", NUM, NUM_10),
    ("Log", FP, FP_BF),
    ("LogSoftmax", FP, FP_BF),
    ("Loop", NUM | BOOL, DATA_10),
    ("LpNormalization", FP, FP_BF),
    ("LpPool", FP | I8, FP_BF),
    ("LRN", FP, FP_BF),
    ("LSTM", FP, FP_BF),
    ("MatMul", FP, FP_BF),
    ("Max", NUM, NUM_10),
    ("MaxPool", FP | I8, FP_BF),
    ("Mean", NUM, NUM_10 | FP8),
    ("MeanVarianceNormalization", FP, FP_BF),
    ("Min", NUM, NUM_10),
    ("Mish", 0, FP),
    ("Mod", NUM, NUM_10),
    ("Mul", NUM, NUM_10),
    ("Neg", NUM, NUM_10),
    ("NonMaxSuppression", FP, FP),
    ("NonZero", FP, FP),
    ("Not", BOOL, BOOL),
    ("OneHot", NUM | BOOL, DATA_10),
    ("Or", BOOL, BOOL),
    ("Pad", NUM | I8, NUM_10),
    ("ParametricSoftplus", FP | I8, FP_BF),
    ("Pow", FP, FP_BF),
    ("PRelu", FP | I8, FP_BF),
    ("QuantizeLinear", FP, FP_BF),
    ("RandomNormal", FP, FP_BF),
    ("RandomNormalLike", FP, FP_BF),
    ("RandomUniform", FP, FP_BF),
    ("RandomUniformLike", FP, FP_BF),
    ("Range", NUM, NUM_10),
    ("Reciprocal", FP, FP_BF),
    ("ReduceL1", FP, NUM_10),
    ("ReduceL2", FP, NUM_10),
    ("ReduceLogSum", FP, NUM_10),
    ("ReduceLogSumExp", FP, NUM_10),
    ("ReduceMax", FP, NUM_10),
    ("ReduceMean", FP, NUM_10),
    ("ReduceMin", FP, NUM_10),
    ("ReduceProd", FP, NUM_10),
    ("ReduceSum", FP, NUM_10),
    ("ReduceSumSquare", FP, NUM_10),
    ("Relu", FP | I8, NUM_10),
    ("Reshape", DATA, DATA_10),
    ("Resize", FP, FP_BF),
    ("ReverseSequence", DATA, DATA_10),
    ("RNN", FP, FP_BF),
    ("RoiAlign", FP, FP),
    ("Round", FP | I8, FP_BF),
    ("ScaledTanh", FP | I8, FP_BF),
    ("Scan", FP, FP_BF),
    ("Scatter", NUM | I8, NUM_10),
    ("ScatterElements", NUM | I8, NUM_10),
    ("ScatterND", NUM | I8, NUM_10),
    ("Selu", FP | I8, FP_BF),
    ("Shape", DATA, DATA_10),
    ("Shrink", NUM, NUM_10),
    ("Sigmoid", FP | I8, FP_BF),
    ("Sign", NUM | I8, NUM_10),
    ("Sin", FP, FP_BF),
    ("Sinh", FP, FP_BF),
    ("Size", DATA, DATA_10),
    ("Slice", DATA, DATA_10),
    ("Softmax", FP, FP_BF),
    ("Softplus", FP | I8, FP_BF),
    ("Softsign", FP | I8, FP_BF),
    ("SpaceToDepth", NUM, NUM_10),
    ("Split", NUM | BOOL, DATA_10),
    ("Sqrt", FP, FP_BF),
    ("Squeeze", DATA, DATA_10),
    ("Sub", NUM, NUM_10),
    ("Sum", NUM, NUM_10),
    ("Tan", FP, FP_BF),
    ("Tanh", FP | I8, FP_BF),
    ("ThresholdedRelu", FP | I8, FP_BF),
    ("Tile", NUM | BOOL, DATA_10),
    ("TopK", NUM, NUM_10),
    ("Transpose", DATA, DATA_10),
    ("Trilu", DATA, DATA_10),
    ("Unsqueeze", DATA, DATA_10),
    ("Upsample", FP, FP_BF),
    ("Where", NUM | BOOL, DATA_10),
    ("Xor", BOOL, BOOL),
];

/// Operands the importer needs as build-time constants (an initializer or a `Constant`):
/// `(operator, input index, operand, also on 8.6)`; every one applies on 10. `Reduce*` is
/// each Reduce operator whose axes are an input (opset 18; ReduceSum from 13).
///
/// Source: the Restrictions column of the same operators.md files; for Reduce* on 8.6, its
/// `reduceTensor` ("Axis input must be an initializer!").
const CONSTANT_OPERANDS: &[(&str, usize, &str, bool)] = &[
    ("CumSum", 1, "axis", true),
    ("Slice", 3, "axes", true),
    ("Squeeze", 1, "axes", true),
    ("Unsqueeze", 1, "axes", true),
    ("Reduce*", 1, "axes", true),
    ("Pad", 3, "axes", false),
    ("Dropout", 2, "training_mode", false),
    ("OneHot", 1, "depth", false),
];

/// Integer arithmetic whose result can leave INT32's range, which TensorRT 8.6 computes in.
const INT32_OVERFLOW: &[&str] = &["Add", "Sub", "Mul", "Sum", "Range"];

/// The most bytes a protobuf file the parser reads may have: it raises protobuf's limit to
/// `INT_MAX` (`SetTotalBytesLimit` in its ModelImporter.cpp), no further.
const PROTOBUF_LIMIT: u64 = i32::MAX as u64;

/// Prefill and step without an entry in `tensorrt_profiles`: no input has a profile.
static NO_PROFILES: BTreeMap<String, ShapeProfile> = BTreeMap::new();

/// Checks the model directory `dir` for `target`; every problem found, in file order.
///
/// Errors only when the manifest cannot be read or fails [`Manifest::read`]'s checks, or a
/// file cannot be read for a reason other than its absence; a missing, truncated or
/// unparseable file is a [`Problem`].
pub fn check_tensorrt(dir: &Path, target: &TensorRtTarget) -> Result<Vec<Problem>, GraphError> {
    let manifest = Manifest::read(dir)?;
    let mut problems = Vec::new();
    let mut weights = FileCheck {
        target: *target,
        file: &manifest.weights.file,
        problems: &mut problems,
    };
    weights.weights_file(dir, manifest.weights.bytes);
    let nar = [
        ("prefill", &manifest.graphs.prefill),
        ("step", &manifest.graphs.step),
    ]
    .map(|(name, graph)| {
        let profiles = manifest.tensorrt_profiles.get(name);
        (&graph.file, Some(profiles.unwrap_or(&NO_PROFILES)))
    });
    // Decoders have no profiles: the runtime gives the TensorRT EP none for them.
    let decoder = manifest.decoder_graph().map(|graph| (&graph.file, None));
    for (file, profiles) in nar.into_iter().chain(decoder) {
        let mut check = FileCheck {
            target: *target,
            file,
            problems: &mut problems,
        };
        if let Some(model) = check.load(dir)? {
            check.model(dir, &model, profiles);
        }
    }
    Ok(problems)
}

/// What the check knows of a value while walking the graph.
#[derive(Clone, Copy, Debug, Default)]
struct Facts {
    /// ONNX element type, when known.
    elem: Option<i32>,
    /// Its contents come from graph inputs (run-time data, not weights or shapes).
    from_inputs: bool,
    /// An initializer or a `Constant` output: a build-time constant for the importer.
    constant: bool,
}

/// The checks of one file, collecting into the shared list.
struct FileCheck<'a> {
    target: TensorRtTarget,
    file: &'a str,
    problems: &'a mut Vec<Problem>,
}

impl FileCheck<'_> {
    fn report(
        &mut self,
        severity: Severity,
        kind: ProblemKind,
        node: Option<String>,
        message: String,
    ) {
        self.problems.push(Problem {
            severity,
            kind,
            graph: self.file.to_string(),
            node,
            message,
        });
    }

    fn error(&mut self, kind: ProblemKind, node: Option<String>, message: String) {
        self.report(Severity::Error, kind, node, message);
    }

    fn warning(&mut self, kind: ProblemKind, node: Option<String>, message: String) {
        self.report(Severity::Warning, kind, node, message);
    }

    /// The weight file exists with the size the manifest recorded.
    fn weights_file(&mut self, dir: &Path, bytes: u64) {
        let message = match std::fs::metadata(dir.join(self.file)) {
            Ok(meta) if meta.is_file() && meta.len() == bytes => return,
            Ok(meta) if meta.is_file() => format!(
                "has {} bytes, the manifest says {bytes} (truncated or replaced?)",
                meta.len()
            ),
            _ => "is missing from the model directory".to_string(),
        };
        self.error(ProblemKind::File, None, message);
    }

    /// Reads and decodes the graph file; `None` (with the problem reported) when that fails.
    fn load(&mut self, dir: &Path) -> Result<Option<ModelProto>, GraphError> {
        let path = dir.join(self.file);
        let size = match std::fs::metadata(&path) {
            Ok(meta) if meta.is_file() => meta.len(),
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(GraphError::io(&path, e))
            }
            _ => {
                let message = "is missing from the model directory".to_string();
                self.error(ProblemKind::File, None, message);
                return Ok(None);
            }
        };
        if size > PROTOBUF_LIMIT {
            let message = format!(
                "has {size} bytes: the parser reads protobuf files below 2 GiB only; move \
                 the weights to external data"
            );
            self.error(ProblemKind::File, None, message);
            return Ok(None);
        }
        let bytes = std::fs::read(&path).map_err(|e| GraphError::io(&path, e))?;
        match crate::decode_model(&bytes) {
            Ok(model) => Ok(Some(model)),
            Err(e) => {
                self.error(ProblemKind::File, None, e.to_string());
                Ok(None)
            }
        }
    }

    fn model(
        &mut self,
        dir: &Path,
        model: &ModelProto,
        profiles: Option<&BTreeMap<String, ShapeProfile>>,
    ) {
        self.opset(model);
        let Some(graph) = &model.graph else {
            self.error(ProblemKind::File, None, "the model has no graph".into());
            return;
        };
        let initializers: HashSet<&str> = graph
            .initializer
            .iter()
            .filter_map(|t| t.name.as_deref())
            .collect();
        // The parser binds only the inputs that are not initializers.
        let inputs: Vec<&ValueInfoProto> = graph
            .input
            .iter()
            .filter(|i| !initializers.contains(name_of(i)))
            .collect();
        self.io_types(graph, &inputs);
        self.nodes(graph, &inputs);
        self.profiles(&inputs, profiles);
        self.external_data(dir, graph);
    }

    fn opset(&mut self, model: &ModelProto) {
        let version = model
            .opset_import
            .iter()
            .find(|o| is_default_domain(o.domain.as_deref()))
            .and_then(|o| o.version);
        let range = self.target.opsets();
        let message = match version {
            None => "imports no default-domain (ai.onnx) opset".to_string(),
            Some(v) if !range.contains(&v) => format!(
                "opset {v} is outside {}'s opsets {} to {}",
                self.target,
                range.start(),
                range.end()
            ),
            Some(_) => return,
        };
        self.error(ProblemKind::Opset, None, message);
    }

    /// Element types of graph inputs, outputs and initializers.
    fn io_types(&mut self, graph: &GraphProto, inputs: &[&ValueInfoProto]) {
        let inputs = inputs.iter().map(|info| ("input", *info));
        let outputs = graph.output.iter().map(|info| ("output", info));
        for (role, info) in inputs.chain(outputs) {
            let node = Some(format!("{role} {}", name_of(info)));
            let Some(code) = tensor_type(info).and_then(|t| t.elem_type) else {
                let message = "is not a tensor: TensorRT binds tensors only".to_string();
                self.error(ProblemKind::DataType, node, message);
                continue;
            };
            let onnx = DataType::try_from(code).ok();
            match onnx.and_then(|t| self.target.import_type(t)) {
                None => {
                    let message = format!(
                        "is {}: {} has no such tensors",
                        type_name(code),
                        self.target
                    );
                    self.error(ProblemKind::DataType, node, message);
                }
                Some(_) if onnx == Some(DataType::Double) => {
                    self.warning(ProblemKind::DataType, node, double_note("is"));
                }
                Some(DataType::Int32) if onnx == Some(DataType::Int64) => {
                    let message = format!(
                        "is INT64: {} binds it as INT32, so ONNX Runtime's TensorRT EP \
                         converts it on every call and its values must fit in INT32",
                        self.target
                    );
                    self.warning(ProblemKind::DataType, node, message);
                }
                Some(_) => {}
            }
        }
        for tensor in &graph.initializer {
            if tensor.data_type == Some(DataType::Double as i32) {
                let node = Some(format!(
                    "initializer {}",
                    tensor.name.as_deref().unwrap_or("")
                ));
                self.warning(ProblemKind::DataType, node, double_note("is"));
            }
        }
    }

    /// Operators, constant operands and the types each node computes on, propagating element
    /// types from the inputs and initializers through the nodes (in their topological order).
    fn nodes(&mut self, graph: &GraphProto, inputs: &[&ValueInfoProto]) {
        let mut facts: HashMap<&str, Facts> = HashMap::new();
        for tensor in &graph.initializer {
            let facts_of = Facts {
                elem: tensor.data_type,
                from_inputs: false,
                constant: true,
            };
            facts.insert(tensor.name.as_deref().unwrap_or(""), facts_of);
        }
        for info in inputs {
            let facts_of = Facts {
                elem: tensor_type(info).and_then(|t| t.elem_type),
                from_inputs: true,
                constant: false,
            };
            facts.insert(name_of(info), facts_of);
        }
        let declared: HashMap<&str, i32> = graph
            .value_info
            .iter()
            .chain(&graph.output)
            .filter_map(|info| Some((name_of(info), tensor_type(info)?.elem_type?)))
            .collect();
        for (index, node) in graph.node.iter().enumerate() {
            let op = node.op_type.as_deref().unwrap_or("");
            let label = node_label(node, index);
            let supported = self.operator(node, &label);
            self.subgraph_operators(node);
            let input = |i: usize| match node.input.get(i) {
                Some(name) if !name.is_empty() => Some((
                    name.as_str(),
                    facts.get(name.as_str()).copied().unwrap_or_default(),
                )),
                _ => None,
            };
            let from_inputs = !matches!(op, "Shape" | "Size" | "ConstantOfShape")
                && (0..node.input.len()).any(|i| input(i).is_some_and(|(_, f)| f.from_inputs));
            let outputs: Vec<(&str, Facts)> = node
                .output
                .iter()
                .enumerate()
                .map(|(i, name)| {
                    let elem = output_type(node, op, i, |k| input(k).and_then(|(_, f)| f.elem))
                        .or_else(|| declared.get(name.as_str()).copied());
                    let facts_of = Facts {
                        elem,
                        from_inputs,
                        constant: op == "Constant",
                    };
                    (name.as_str(), facts_of)
                })
                .collect();
            self.constant_operands(op, &label, &input);
            if let Some(supported) = supported {
                let operands = match op {
                    "Constant" | "ConstantOfShape" => vec![outputs.first().copied()],
                    "Where" => vec![input(1)],
                    "Cast" | "CastLike" => vec![input(0), outputs.first().copied()],
                    _ => vec![input(0)],
                };
                for (name, facts_of) in operands.into_iter().flatten() {
                    self.computation_type(op, &label, name, facts_of, supported);
                }
            }
            let made = outputs.first().and_then(|(_, f)| f.elem);
            if matches!(op, "Cast" | "Constant" | "ConstantOfShape")
                && made == Some(DataType::Double as i32)
            {
                self.warning(
                    ProblemKind::DataType,
                    Some(label.clone()),
                    double_note("makes"),
                );
            }
            facts.extend(outputs);
        }
    }

    /// The node's operator is one the target imports; its element types if so.
    fn operator(&mut self, node: &NodeProto, label: &str) -> Option<Types> {
        let op = node.op_type.as_deref().unwrap_or("");
        let node_name = Some(label.to_string());
        let domain = node.domain.as_deref();
        if !is_default_domain(domain) {
            let message = format!(
                "{op} is in domain {}: TensorRT's parser imports standard ONNX operators \
                 (and TensorRT plugins registered under the operator's name)",
                domain.unwrap_or("")
            );
            self.error(ProblemKind::Operator, node_name, message);
            return None;
        }
        let supported = self.target.operator_types(op);
        if supported.is_none() {
            let message = format!(
                "{op} is not supported by {}'s ONNX parser (onnx-tensorrt operators.md)",
                self.target
            );
            self.error(ProblemKind::Operator, node_name, message);
        }
        supported
    }

    /// Operators of `If`/`Loop`/`Scan` bodies (the parser imports those too).
    fn subgraph_operators(&mut self, node: &NodeProto) {
        for attribute in &node.attribute {
            for graph in attribute.g.iter().chain(&attribute.graphs) {
                for (index, inner) in graph.node.iter().enumerate() {
                    self.operator(inner, &node_label(inner, index));
                    self.subgraph_operators(inner);
                }
            }
        }
    }

    fn constant_operands<'n>(
        &mut self,
        op: &str,
        label: &str,
        input: &impl Fn(usize) -> Option<(&'n str, Facts)>,
    ) {
        let target = self.target;
        let applies = |&&(name, _, _, on_8_6): &&(&str, usize, &str, bool)| {
            let matches = name == op || (name == "Reduce*" && op.starts_with("Reduce"));
            matches && (on_8_6 || target == TensorRtTarget::V10)
        };
        for &(_, index, operand, _) in CONSTANT_OPERANDS.iter().filter(applies) {
            let Some((name, facts_of)) = input(index) else {
                continue;
            };
            if !facts_of.constant {
                let message = format!(
                    "its {operand} ({name}) is computed in the graph, but {} imports {op} \
                     only with {operand} as an initializer or Constant",
                    self.target
                );
                self.error(
                    ProblemKind::ConstantOperand,
                    Some(label.to_string()),
                    message,
                );
            }
        }
    }

    /// The element type `op` computes on (operand `name`) is one the target supports for it.
    fn computation_type(
        &mut self,
        op: &str,
        label: &str,
        name: &str,
        facts_of: Facts,
        supported: Types,
    ) {
        let Some(code) = facts_of.elem else {
            return;
        };
        let target = self.target;
        let onnx = DataType::try_from(code).ok();
        let node = Some(label.to_string());
        match onnx.and_then(|t| target.import_type(t)) {
            None => {
                let message = format!(
                    "{op} on {} ({name}): {target} has no such tensors",
                    type_name(code)
                );
                self.error(ProblemKind::DataType, node, message);
            }
            Some(imported) if type_bit(imported) & supported == 0 => {
                let note = if imported as i32 != code {
                    format!(", which {target} imports as {}", type_name(imported as i32))
                } else {
                    String::new()
                };
                let message = format!(
                    "{op} on {} ({name}){note}: {target} computes {op} on {} only",
                    type_name(code),
                    type_list(supported)
                );
                self.error(ProblemKind::DataType, node, message);
            }
            Some(DataType::Int32)
                if onnx == Some(DataType::Int64)
                    && facts_of.from_inputs
                    && INT32_OVERFLOW.contains(&op) =>
            {
                let message = format!(
                    "{op} on INT64 ({name}): {target} computes integers in INT32, so \
                     results beyond ±2^31 wrap; cast to INT32 or compute in float"
                );
                self.warning(ProblemKind::DataType, node, message);
            }
            Some(_) => {}
        }
    }

    /// Every dynamic input has a profile of its rank, with 1 ≤ min ≤ opt ≤ max, its fixed
    /// dims, and the same range wherever a dimension name recurs.
    fn profiles(
        &mut self,
        inputs: &[&ValueInfoProto],
        profiles: Option<&BTreeMap<String, ShapeProfile>>,
    ) {
        let mut named: HashMap<&str, (&str, [usize; 3])> = HashMap::new();
        for info in inputs {
            let name = name_of(info);
            let node = Some(format!("input {name}"));
            let Some(dims) = tensor_type(info).and_then(|t| t.shape.as_ref()) else {
                let message = "has no shape: TensorRT needs every input's rank".to_string();
                self.error(ProblemKind::Profile, node, message);
                continue;
            };
            let dims = &dims.dim;
            let dynamic = dims
                .iter()
                .any(|d| !matches!(d.value, Some(DimValue::DimValue(_))));
            let shape = describe_shape(dims);
            match profiles.map(|p| p.get(name)) {
                None if dynamic => {
                    let message = format!(
                        "has dynamic shape {shape} and no profile (narx.json profiles prefill \
                         and step only): the TensorRT EP builds the engine for the shapes it \
                         sees first and rebuilds it when a larger one comes"
                    );
                    self.warning(ProblemKind::Profile, node, message);
                }
                Some(None) if dynamic => {
                    let message = format!(
                        "has dynamic shape {shape} but no TensorRT profile in narx.json; \
                         ONNX Runtime's TensorRT EP needs one for every dynamic input"
                    );
                    self.error(ProblemKind::Profile, node, message);
                }
                Some(Some(profile)) => self.profile(name, dims, profile, &mut named),
                _ => {}
            }
        }
        let names: HashSet<&str> = inputs.iter().map(|info| name_of(info)).collect();
        for name in profiles.into_iter().flat_map(|p| p.keys()) {
            if !names.contains(name.as_str()) {
                let message = "narx.json has a profile for it, but the graph has no such \
                               input"
                    .to_string();
                self.warning(ProblemKind::Profile, Some(format!("input {name}")), message);
            }
        }
    }

    fn profile<'n>(
        &mut self,
        input: &'n str,
        dims: &'n [Dimension],
        profile: &ShapeProfile,
        named: &mut HashMap<&'n str, (&'n str, [usize; 3])>,
    ) {
        let node = Some(format!("input {input}"));
        let ShapeProfile { min, opt, max } = profile;
        if [min, opt, max].iter().any(|v| v.len() != dims.len()) {
            let message = format!(
                "profile min {min:?} opt {opt:?} max {max:?} does not have the rank of its \
                 shape {}",
                describe_shape(dims)
            );
            self.error(ProblemKind::Profile, node, message);
            return;
        }
        let ranges = min.iter().zip(opt).zip(max).map(|((&a, &b), &c)| [a, b, c]);
        for (axis, (dim, range)) in dims.iter().zip(ranges).enumerate() {
            let [lo, mid, hi] = range;
            let message = match &dim.value {
                _ if !(1 <= lo && lo <= mid && mid <= hi) => format!(
                    "axis {axis}: profile min {lo}, opt {mid}, max {hi} must satisfy \
                     1 ≤ min ≤ opt ≤ max"
                ),
                Some(DimValue::DimValue(n)) if range.iter().any(|&v| v as i64 != *n) => {
                    format!("axis {axis} is fixed at {n}, but the profile gives {lo}, {mid}, {hi}")
                }
                Some(DimValue::DimParam(symbol)) => {
                    match named.get(symbol.as_str()) {
                        Some(&(other, seen)) if seen != range => {
                            let message = format!(
                                "dimension {symbol} has profile {range:?} here but {seen:?} in \
                                 {other}: TensorRT holds equally named dimensions equal"
                            );
                            self.warning(ProblemKind::Profile, node.clone(), message);
                        }
                        Some(_) => {}
                        None => {
                            named.insert(symbol, (input, range));
                        }
                    }
                    continue;
                }
                _ => continue,
            };
            self.error(ProblemKind::Profile, node.clone(), message);
        }
    }

    /// External data of the initializers: a file inside the directory that holds every
    /// tensor's bytes. Reported once per file, with the first tensor past its end.
    fn external_data(&mut self, dir: &Path, graph: &GraphProto) {
        struct DataFile<'g> {
            size: Option<u64>,
            tensors: usize,
            past_end: Vec<(&'g str, u64)>,
        }
        let mut files: BTreeMap<&str, DataFile> = BTreeMap::new();
        for tensor in &graph.initializer {
            if tensor.data_location != Some(DataLocation::External as i32) {
                continue;
            }
            let name = tensor.name.as_deref().unwrap_or("");
            let node = Some(format!("initializer {name}"));
            let entry = |key: &str| {
                let entry = tensor
                    .external_data
                    .iter()
                    .find(|e| e.key.as_deref() == Some(key));
                entry.and_then(|e| e.value.as_deref())
            };
            let Some(location) = entry("location") else {
                let message = "is external data without a location".to_string();
                self.error(ProblemKind::File, node, message);
                continue;
            };
            if !is_inside(location) {
                let message = format!(
                    "names external data {location:?}, which is not a file inside the model \
                     directory"
                );
                self.error(ProblemKind::File, node, message);
                continue;
            }
            let number = |key| entry(key).map(str::parse::<u64>).transpose();
            let (Ok(offset), Ok(length)) = (number("offset"), number("length")) else {
                let message = format!("has an offset or length in {location} that is not a number");
                self.error(ProblemKind::File, node, message);
                continue;
            };
            let file = files.entry(location).or_insert_with(|| DataFile {
                size: std::fs::metadata(dir.join(location))
                    .ok()
                    .filter(|meta| meta.is_file())
                    .map(|meta| meta.len()),
                tensors: 0,
                past_end: Vec::new(),
            });
            file.tensors += 1;
            let end = offset.unwrap_or(0).saturating_add(length.unwrap_or(0));
            if file.size.is_some_and(|size| end > size) {
                file.past_end.push((name, end));
            }
        }
        for (location, file) in files {
            match (file.size, file.past_end.first()) {
                (None, _) => {
                    let message = format!(
                        "external data file {location} ({} initializers) is missing",
                        file.tensors
                    );
                    self.error(ProblemKind::File, None, message);
                }
                (Some(size), Some(&(name, end))) => {
                    let more = match file.past_end.len() - 1 {
                        0 => String::new(),
                        n => format!(" (and {n} more initializers)"),
                    };
                    let message = format!(
                        "needs bytes up to {end} of {location}, which has {size}{more}: \
                         truncated?"
                    );
                    self.error(
                        ProblemKind::File,
                        Some(format!("initializer {name}")),
                        message,
                    );
                }
                (Some(_), None) => {}
            }
        }
    }
}

/// The element type of output `index` of `node`, given its inputs' types: ONNX's rule for
/// the operators whose output type is not their first input's.
fn output_type(
    node: &NodeProto,
    op: &str,
    index: usize,
    input: impl Fn(usize) -> Option<i32>,
) -> Option<i32> {
    let attribute = |name: &str| {
        node.attribute
            .iter()
            .find(|a| a.name.as_deref() == Some(name))
    };
    let int64 = Some(DataType::Int64 as i32);
    match (op, index) {
        ("Cast", _) => attribute("to")?.i.and_then(|to| i32::try_from(to).ok()),
        ("CastLike" | "Where" | "DequantizeLinear", _) => input(1),
        ("Shape" | "Size" | "NonZero" | "ArgMax" | "ArgMin", _) | ("TopK" | "MaxPool", 1) => int64,
        (
            "Equal" | "Greater" | "GreaterOrEqual" | "Less" | "LessOrEqual" | "Not" | "And" | "Or"
            | "Xor" | "IsNaN" | "IsInf",
            _,
        ) => Some(DataType::Bool as i32),
        ("ConstantOfShape", _) => Some(
            attribute("value")
                .and_then(|a| a.t.as_ref()?.data_type)
                .unwrap_or(DataType::Float as i32),
        ),
        ("QuantizeLinear", _) => input(2).or(Some(DataType::Uint8 as i32)),
        ("Constant", _) => {
            // A Constant has one attribute, which says how its value is held.
            let value = node.attribute.first()?;
            match value.name.as_deref()? {
                "value" => value.t.as_ref()?.data_type,
                "sparse_value" => value.sparse_tensor.as_ref()?.values.as_ref()?.data_type,
                "value_float" | "value_floats" => Some(DataType::Float as i32),
                "value_int" | "value_ints" => int64,
                "value_string" | "value_strings" => Some(DataType::String as i32),
                _ => None,
            }
        }
        _ => input(0),
    }
}

/// `is DOUBLE: …` for tensors, `makes DOUBLE: …` for nodes.
fn double_note(verb: &str) -> String {
    format!("{verb} DOUBLE: TensorRT casts it to FP32, clamping to ±FLT_MAX")
}

fn is_default_domain(domain: Option<&str>) -> bool {
    matches!(domain, None | Some("") | Some("ai.onnx"))
}

/// A relative path that stays inside the directory it is relative to.
fn is_inside(location: &str) -> bool {
    let mut components = Path::new(location).components().peekable();
    components.peek().is_some()
        && components.all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
}

fn name_of(info: &ValueInfoProto) -> &str {
    info.name.as_deref().unwrap_or("")
}

fn tensor_type(info: &ValueInfoProto) -> Option<&type_proto::Tensor> {
    match info.r#type.as_ref()?.value.as_ref()? {
        type_proto::Value::TensorType(tensor) => Some(tensor),
        _ => None,
    }
}

fn node_label(node: &NodeProto, index: usize) -> String {
    let op = node.op_type.as_deref().unwrap_or("?");
    match node.name.as_deref() {
        Some(name) if !name.is_empty() => format!("{name} ({op})"),
        _ => format!("node #{index} ({op})"),
    }
}

/// `(batch, 3, ?)`: fixed sizes, dimension names, `?` for unnamed dynamic dims.
fn describe_shape(dims: &[Dimension]) -> String {
    let dims: Vec<String> = dims
        .iter()
        .map(|d| match &d.value {
            Some(DimValue::DimValue(n)) => n.to_string(),
            Some(DimValue::DimParam(name)) => name.clone(),
            None => "?".to_string(),
        })
        .collect();
    format!("({})", dims.join(", "))
}

fn type_bit(t: DataType) -> Types {
    TYPE_NAMES
        .iter()
        .find(|(_, onnx, _)| *onnx == t)
        .map_or(0, |(bit, ..)| *bit)
}

/// operators.md's name for the type where it has one, ONNX's otherwise.
fn type_name(code: i32) -> String {
    let Ok(onnx) = DataType::try_from(code) else {
        return format!("element type {code}");
    };
    let known = TYPE_NAMES.iter().find(|(_, t, _)| *t == onnx);
    known
        .map_or(onnx.as_str_name(), |(.., name)| *name)
        .to_string()
}

fn type_list(types: Types) -> String {
    let names: Vec<&str> = TYPE_NAMES
        .iter()
        .filter(|(bit, ..)| types & bit != 0)
        .map(|(.., name)| *name)
        .collect();
    names.join(", ")
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::builder::{Attr, DType, Dim, GraphBuilder};
    use crate::larp::{self, LarpConfig};
    use crate::manifest::{CacheLayout, DecoderFile, GraphFile, LarpDecoderFile};
    use crate::nar::Zeros;
    use crate::nar::{self, ModelArgs, ModelConfig, NarSpec, VideoArgs};
    use crate::vq;
    use crate::weights::WeightStore;

    pub(crate) fn image() -> ModelConfig {
        ModelConfig::Image(ModelArgs {
            dim: 64,
            n_layer: 2,
            n_head: 2,
            vocab_size: 16,
            num_classes: 10,
            block_size: 16,
            ..ModelArgs::default()
        })
    }

    /// The t2i variant: captions of 4 tokens, with a 0/1 mask and a null-caption flag.
    pub(crate) fn captions() -> ModelConfig {
        let ModelConfig::Image(args) = image() else {
            unreachable!("image() is an image model")
        };
        ModelConfig::Image(ModelArgs {
            model_type: "t2i".into(),
            cls_token_num: 4,
            caption_dim: 8,
            ..args
        })
    }

    pub(crate) fn video() -> ModelConfig {
        ModelConfig::Video(VideoArgs {
            dim: 64,
            n_layer: 2,
            n_head: 2,
            vocab_size: 128,
            max_seq_len: 48,
            latent_shape: vec![3, 4, 4],
            ..VideoArgs::default()
        })
    }

    /// The `larp-tiny` fixture's tokenizer: 48 latent tokens, a 128-entry codebook.
    pub(crate) fn larp_config() -> LarpConfig {
        serde_json::from_str(
            r#"{"bottleneck": {"name": "bottleneck", "args": {"bottleneck_dim": 16,
                "norm": "none", "regularizer": {"name": "vq", "args": {
                "codebook_size": 128, "l2_normalized": true}}}},
                "bottleneck_token_num": 48, "input_size": 32, "frame_num": 12,
                "temporal_patch_size": 4, "patch_size": 8, "decoder_temporal_patch_size": 4,
                "decoder_patch_size": 8, "transformer_name": "transformer_encoder_parallel",
                "encoder_hidden_size": 64, "decoder_hidden_size": 64, "encoder_num_heads": 2,
                "decoder_num_heads": 2, "encoder_depth": 2, "decoder_depth": 2}"#,
        )
        .unwrap()
    }

    fn write_graph(dir: &Path, file: &str, model: &ModelProto) -> GraphFile {
        let bytes = crate::encode_model(model);
        std::fs::write(dir.join(file), &bytes).unwrap();
        GraphFile::describe(file, bytes.len() as u64, model).unwrap()
    }

    /// Writes a model directory as `narx export` does: prefill, step and the tokenizer's
    /// decoder over one weight file, and a manifest with export's profile ranges.
    fn export(dir: &Path, config: ModelConfig) -> Manifest {
        export_as(dir, config, CacheLayout::Append)
    }

    fn export_as(dir: &Path, config: ModelConfig, layout: CacheLayout) -> Manifest {
        let grid = match &config {
            ModelConfig::Image(_) => vec![4, 4],
            ModelConfig::Video(args) => args.latent_shape.clone(),
        };
        let spec = NarSpec::new(config.clone(), grid, DType::F32)
            .unwrap()
            .with_layout(layout);
        let mut store = WeightStore::external(dir, "weights.bin").unwrap();
        let graphs = nar::build(&spec, &Zeros(config.parameters()), &mut store).unwrap();
        let (vq, larp) = (crate::vq::tests::small(), larp_config());
        let decoder = match &config {
            ModelConfig::Image(_) => vq::build_decoder(&vq, &Zeros(vq.parameters()), &mut store),
            ModelConfig::Video(_) => {
                larp::build_decoder(&larp, &Zeros(larp.parameters()), &mut store)
            }
        }
        .unwrap();
        let weight_bytes = store.finish().unwrap();
        let prefill = write_graph(dir, "prefill.onnx", &graphs.prefill);
        let step = write_graph(dir, "step.onnx", &graphs.step);
        let decoder = write_graph(dir, "decoder.onnx", &decoder);
        let mut manifest = Manifest::for_export(&spec, prefill, step, weight_bytes).unwrap();
        match &config {
            ModelConfig::Image(_) => {
                let patch = vq.upsample_factor();
                manifest.vq_decoder = Some(DecoderFile {
                    graph: decoder,
                    config: vq,
                    patch,
                });
            }
            ModelConfig::Video(_) => {
                manifest.larp_decoder = Some(LarpDecoderFile {
                    graph: decoder,
                    config: larp,
                });
            }
        }
        manifest.save(dir).unwrap();
        // What `narx run` would accept.
        Manifest::load(dir).unwrap();
        manifest
    }

    fn check(dir: &Path, target: TensorRtTarget) -> Vec<Problem> {
        check_tensorrt(dir, &target).unwrap()
    }

    /// `(severity, kind, graph, node)` of each problem, to compare whole reports.
    fn summary(problems: &[Problem]) -> Vec<(Severity, ProblemKind, &str, Option<&str>)> {
        problems
            .iter()
            .map(|p| (p.severity, p.kind, p.graph.as_str(), p.node.as_deref()))
            .collect()
    }

    fn find<'p>(problems: &'p [Problem], node: &str) -> Vec<&'p Problem> {
        problems
            .iter()
            .filter(|p| p.node.as_deref() == Some(node))
            .collect()
    }

    fn edit_graph(dir: &Path, file: &str, edit: impl FnOnce(&mut ModelProto)) {
        let path = dir.join(file);
        let mut model = crate::decode_model(&std::fs::read(&path).unwrap()).unwrap();
        edit(&mut model);
        std::fs::write(&path, crate::encode_model(&model)).unwrap();
    }

    /// A graph built by `build`, weights inline.
    fn planted(build: impl FnOnce(&mut GraphBuilder) -> Result<(), GraphError>) -> ModelProto {
        let mut store = WeightStore::inline();
        let mut b = GraphBuilder::new("planted", &mut store);
        build(&mut b).unwrap();
        b.finish()
    }

    /// A c2i directory whose step graph is `model` (without profiles): the problems of
    /// that graph.
    fn step_problems(model: &ModelProto, target: TensorRtTarget) -> Vec<Problem> {
        let dir = tempfile::tempdir().unwrap();
        let mut manifest = export(dir.path(), image());
        std::fs::write(dir.path().join("step.onnx"), crate::encode_model(model)).unwrap();
        manifest.tensorrt_profiles.remove("step");
        manifest.save(dir.path()).unwrap();
        let mut problems = check(dir.path(), target);
        problems.retain(|p| p.graph == "step.onnx");
        problems
    }

    #[test]
    fn our_graphs_build_on_tensorrt_10() {
        let layouts = [CacheLayout::Append, CacheLayout::Static];
        for (config, layout) in [image(), captions(), video()]
            .into_iter()
            .flat_map(|config| layouts.map(|layout| (config.clone(), layout)))
        {
            let dir = tempfile::tempdir().unwrap();
            export_as(dir.path(), config, layout);
            let problems = check(dir.path(), TensorRtTarget::V10);
            // Only the decoder's batch, which has no profile by design.
            assert_eq!(
                summary(&problems),
                [(
                    Severity::Warning,
                    ProblemKind::Profile,
                    "decoder.onnx",
                    Some("input codes")
                )],
                "{problems:#?}"
            );
        }
    }

    #[test]
    fn our_graphs_on_tensorrt_8_6_only_cast_their_int64_inputs() {
        let (warning, data) = (Severity::Warning, ProblemKind::DataType);
        let labels = (warning, data, "prefill.onnx", Some("input class_labels"));
        for (config, class_labels) in [(image(), true), (captions(), false), (video(), true)] {
            let dir = tempfile::tempdir().unwrap();
            export(dir.path(), config);
            let problems = check(dir.path(), TensorRtTarget::V8_6);
            let mut expected = Vec::from_iter(class_labels.then_some(labels));
            expected.extend([
                (warning, data, "step.onnx", Some("input tokens")),
                (warning, data, "step.onnx", Some("input positions")),
                (warning, data, "decoder.onnx", Some("input codes")),
                (
                    warning,
                    ProblemKind::Profile,
                    "decoder.onnx",
                    Some("input codes"),
                ),
            ]);
            assert_eq!(summary(&problems), expected, "{problems:#?}");
            assert!(
                problems[0].message.contains("binds it as INT32"),
                "{}",
                problems[0]
            );
        }
    }

    #[test]
    fn int64_arithmetic_on_run_time_data_is_flagged_on_8_6_only() {
        let model = planted(|b| {
            let positions = b.input("positions", DType::I64, &[Dim::Fixed(4)]);
            let one = b.const_i64(&[1])?;
            let next = b.add(positions, one)?;
            b.output("next", next, &[Dim::Fixed(4)])?;
            // Shape arithmetic stays within INT32 on any TensorRT.
            let x = b.input("x", DType::F32, &[Dim::Fixed(4)]);
            let shape = b.shape(x)?;
            let two = b.const_i64(&[2])?;
            let doubled = b.mul(shape, two)?;
            b.output("doubled", doubled, &[Dim::Fixed(1)])
        });
        let problems = step_problems(&model, TensorRtTarget::V8_6);
        let add = find(&problems, "/Add (Add)");
        assert_eq!(add.len(), 1, "{problems:#?}");
        assert_eq!(
            (add[0].severity, add[0].kind),
            (Severity::Warning, ProblemKind::DataType)
        );
        assert_eq!(
            add[0].to_string(),
            "warning: step.onnx: /Add (Add): Add on INT64 (positions): TensorRT 8.6 computes \
             integers in INT32, so results beyond ±2^31 wrap; cast to INT32 or compute in float"
        );
        assert!(find(&problems, "/Mul (Mul)").is_empty(), "{problems:#?}");
        assert!(problems.iter().all(|p| p.severity == Severity::Warning));
        assert_eq!(find(&problems, "input positions").len(), 1);
        assert_eq!(find(&problems, "output next").len(), 1);
        assert!(step_problems(&model, TensorRtTarget::V10).is_empty());
    }

    #[test]
    fn int64_operands_an_operator_lacks_are_errors() {
        let model = planted(|b| {
            let a = b.input("a", DType::I64, &[Dim::Fixed(2), Dim::Fixed(2)]);
            let product = b.matmul(a, a)?;
            b.output("product", product, &[Dim::Fixed(2), Dim::Fixed(2)])?;
            let mean = b.reduce_mean(a, &[1])?;
            b.output("mean", mean, &[Dim::Fixed(2), Dim::Fixed(1)])
        });
        let on_8_6 = step_problems(&model, TensorRtTarget::V8_6);
        let matmul = find(&on_8_6, "/MatMul (MatMul)");
        assert_eq!(matmul.len(), 1, "{on_8_6:#?}");
        assert_eq!(matmul[0].severity, Severity::Error);
        assert!(
            matmul[0]
                .message
                .contains("which TensorRT 8.6 imports as INT32")
                && matmul[0]
                    .message
                    .ends_with("computes MatMul on FP32, FP16 only"),
            "{}",
            matmul[0]
        );
        assert_eq!(find(&on_8_6, "/ReduceMean (ReduceMean)").len(), 1);
        // TensorRT 10 reduces INT64, but still multiplies matrices of floats only.
        let on_10 = step_problems(&model, TensorRtTarget::V10);
        assert_eq!(
            summary(&on_10),
            [(
                Severity::Error,
                ProblemKind::DataType,
                "step.onnx",
                Some("/MatMul (MatMul)")
            )]
        );
    }

    #[test]
    fn unsupported_operators_are_errors() {
        let mut model = planted(|b| {
            let x = b.input("x", DType::F32, &[Dim::Fixed(4)]);
            for op in ["Unique", "StringNormalizer", "Hardmax", "FusedMatMul"] {
                let y = b.node1(op, &[x], &[], DType::F32)?;
                b.output(&format!("{op}.y"), y, &[Dim::Fixed(4)])?;
            }
            Ok(())
        });
        let nodes = &mut model.graph.as_mut().unwrap().node;
        let fused = nodes
            .iter_mut()
            .find(|n| n.op_type.as_deref() == Some("FusedMatMul"));
        fused.unwrap().domain = Some("com.microsoft".into());
        let operator_errors = |target| {
            let problems = step_problems(&model, target);
            assert!(problems.iter().all(|p| p.kind == ProblemKind::Operator));
            assert!(problems.iter().all(|p| p.severity == Severity::Error));
            problems
                .into_iter()
                .filter_map(|p| p.node)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            operator_errors(TensorRtTarget::V10),
            [
                "/Unique (Unique)",
                "/StringNormalizer (StringNormalizer)",
                "/FusedMatMul (FusedMatMul)"
            ]
        );
        // TensorRT 10 added Hardmax.
        assert_eq!(
            operator_errors(TensorRtTarget::V8_6),
            [
                "/Unique (Unique)",
                "/StringNormalizer (StringNormalizer)",
                "/Hardmax (Hardmax)",
                "/FusedMatMul (FusedMatMul)"
            ]
        );
    }

    #[test]
    fn computed_axes_are_errors() {
        let model = planted(|b| {
            let x = b.input("x", DType::F32, &[Dim::Fixed(4)]);
            let axes = b.input("axes", DType::I64, &[Dim::Fixed(1)]);
            let y = b.node1("Unsqueeze", &[x, axes], &[], DType::F32)?;
            b.output("y", y, &[Dim::Fixed(1), Dim::Fixed(4)])?;
            // Constant axes are fine.
            let z = b.unsqueeze(x, &[0])?;
            b.output("z", z, &[Dim::Fixed(1), Dim::Fixed(4)])
        });
        let problems = step_problems(&model, TensorRtTarget::V10);
        assert_eq!(
            summary(&problems),
            [(
                Severity::Error,
                ProblemKind::ConstantOperand,
                "step.onnx",
                Some("/Unsqueeze (Unsqueeze)")
            )]
        );
        assert!(problems[0].message.contains("its axes (axes) is computed"));
    }

    #[test]
    fn double_is_cast_down_and_types_tensorrt_lacks_are_errors() {
        let mut model = planted(|b| {
            let x = b.input("x", DType::F32, &[Dim::Fixed(4)]);
            let to = Attr::Int(DataType::Double as i64);
            let wide = b.node1("Cast", &[x], &[("to", to)], DType::F32)?;
            let sum = b.add(wide, wide)?;
            b.output("sum", sum, &[Dim::Fixed(4)])
        });
        let graph = model.graph.as_mut().unwrap();
        let x = graph.input[0]
            .r#type
            .as_mut()
            .and_then(|t| t.value.as_mut());
        let Some(type_proto::Value::TensorType(x)) = x else {
            panic!("x is not a tensor")
        };
        x.elem_type = Some(DataType::Uint16 as i32);
        for target in [TensorRtTarget::V10, TensorRtTarget::V8_6] {
            let problems = step_problems(&model, target);
            assert_eq!(
                summary(&problems),
                [
                    (
                        Severity::Error,
                        ProblemKind::DataType,
                        "step.onnx",
                        Some("input x")
                    ),
                    (
                        Severity::Error,
                        ProblemKind::DataType,
                        "step.onnx",
                        Some("/Cast (Cast)")
                    ),
                    (
                        Severity::Warning,
                        ProblemKind::DataType,
                        "step.onnx",
                        Some("/Cast (Cast)")
                    ),
                ],
                "{problems:#?}"
            );
            assert!(problems[1].message.starts_with("Cast on UINT16 (x)"));
            assert!(problems[2].message.contains("DOUBLE"));
        }
    }

    #[test]
    fn dynamic_inputs_need_consistent_profiles() {
        let dir = tempfile::tempdir().unwrap();
        let mut manifest = export(dir.path(), image());
        let step = manifest.tensorrt_profiles.get_mut("step").unwrap();
        step.remove("positions");
        step.get_mut("tokens").unwrap().min[0] = 17;
        step.get_mut("past_key_bias").unwrap().max.push(1);
        let key = step.get_mut("past.0.key").unwrap();
        for side in [&mut key.min, &mut key.opt, &mut key.max] {
            side[1] += 1;
        }
        step.get_mut("past.1.value").unwrap().max[0] = 8;
        step.insert(
            "cache".into(),
            ShapeProfile {
                min: vec![1],
                opt: vec![1],
                max: vec![1],
            },
        );
        manifest.save(dir.path()).unwrap();
        let problems = check(dir.path(), TensorRtTarget::V10);
        let (error, warning, profile) = (Severity::Error, Severity::Warning, ProblemKind::Profile);
        assert_eq!(
            summary(&problems),
            [
                (error, profile, "step.onnx", Some("input tokens")),
                (error, profile, "step.onnx", Some("input positions")),
                (error, profile, "step.onnx", Some("input past_key_bias")),
                (error, profile, "step.onnx", Some("input past.0.key")),
                (warning, profile, "step.onnx", Some("input past.1.value")),
                (warning, profile, "step.onnx", Some("input cache")),
                (warning, profile, "decoder.onnx", Some("input codes")),
            ],
            "{problems:#?}"
        );
        let message = |i: usize| problems[i].message.as_str();
        assert!(
            message(0).contains("min 17, opt 2, max 16"),
            "{}",
            message(0)
        );
        assert!(message(1).contains("no TensorRT profile"), "{}", message(1));
        assert!(message(2).contains("rank"), "{}", message(2));
        assert!(
            message(3).contains("axis 1 is fixed at 2"),
            "{}",
            message(3)
        );
        assert!(message(4).contains("dimension batch"), "{}", message(4));
    }

    #[test]
    fn opsets_outside_the_target_range_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        export(dir.path(), image());
        let set_opset = |version| {
            edit_graph(dir.path(), "step.onnx", |model| {
                model.opset_import[0].version = Some(version)
            })
        };
        let opset_errors = |target| {
            let problems = check(dir.path(), target);
            let opsets = problems.iter().filter(|p| p.kind == ProblemKind::Opset);
            opsets.map(|p| p.to_string()).collect::<Vec<_>>()
        };
        set_opset(21);
        assert_eq!(
            opset_errors(TensorRtTarget::V10),
            ["error: step.onnx: opset 21 is outside TensorRT 10's opsets 9 to 20"]
        );
        assert_eq!(opset_errors(TensorRtTarget::V8_6).len(), 1);
        set_opset(18);
        assert!(opset_errors(TensorRtTarget::V10).is_empty());
        assert_eq!(
            opset_errors(TensorRtTarget::V8_6),
            ["error: step.onnx: opset 18 is outside TensorRT 8.6's opsets 7 to 17"]
        );
    }

    #[test]
    fn an_unreadable_manifest_is_refused_as_run_refuses_it() {
        let dir = tempfile::tempdir().unwrap();
        let refusal = || {
            check_tensorrt(dir.path(), &TensorRtTarget::V10)
                .unwrap_err()
                .to_string()
        };
        let err = refusal();
        assert!(err.contains("narx.json: missing"), "{err}");
        let mut manifest = serde_json::to_value(export(dir.path(), image())).unwrap();
        manifest["format_version"] = "one".into();
        std::fs::write(dir.path().join("narx.json"), manifest.to_string()).unwrap();
        let err = refusal();
        assert!(
            err.contains("format_version \"one\" is not a whole number"),
            "{err}"
        );
        manifest["format_version"] = 1.into();
        manifest["graphs"]["step"]["file"] = "../step.onnx".into();
        std::fs::write(dir.path().join("narx.json"), manifest.to_string()).unwrap();
        let err = refusal();
        assert!(err.contains("graphs.step.file \"../step.onnx\""), "{err}");
    }

    #[test]
    fn missing_and_truncated_files_are_reported() {
        /// Fewer bytes than the first tensor has.
        const KEPT: u64 = 100;
        let dir = tempfile::tempdir().unwrap();
        let manifest = export(dir.path(), image());
        let weights = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.path().join("weights.bin"))
            .unwrap();
        weights.set_len(KEPT).unwrap();
        std::fs::remove_file(dir.path().join("decoder.onnx")).unwrap();
        edit_graph(dir.path(), "prefill.onnx", |model| {
            let graph = model.graph.as_mut().unwrap();
            let tensor = graph
                .initializer
                .iter_mut()
                .find(|t| !t.external_data.is_empty());
            let location = &mut tensor.unwrap().external_data[0];
            assert_eq!(location.key.as_deref(), Some("location"));
            location.value = Some("../weights.bin".into());
        });
        let problems = check(dir.path(), TensorRtTarget::V10);
        let files: Vec<_> = problems
            .iter()
            .filter(|p| p.kind == ProblemKind::File)
            .collect();
        assert!(files.iter().all(|p| p.severity == Severity::Error));

        assert_eq!(
            files[0].to_string(),
            format!(
                "error: weights.bin: has {KEPT} bytes, the manifest says {} (truncated or \
                 replaced?)",
                manifest.weights.bytes
            )
        );
        assert!(files[1]
            .message
            .contains("not a file inside the model directory"));
        assert_eq!(files[1].graph, "prefill.onnx");
        let past_end = |graph: &str| {
            files.iter().any(|p| {
                p.graph == graph
                    && p.message
                        .contains(&format!("of weights.bin, which has {KEPT}"))
            })
        };
        assert!(
            past_end("prefill.onnx") && past_end("step.onnx"),
            "{files:#?}"
        );
        let missing = files.last().unwrap();
        assert_eq!(
            missing.to_string(),
            "error: decoder.onnx: is missing from the model directory"
        );
    }

    #[test]
    fn target_names() {
        assert_eq!("10".parse::<TensorRtTarget>().unwrap(), TensorRtTarget::V10);
        assert_eq!(
            "8.6".parse::<TensorRtTarget>().unwrap(),
            TensorRtTarget::V8_6
        );
        assert!("7".parse::<TensorRtTarget>().is_err());
        assert_eq!(TensorRtTarget::default(), TensorRtTarget::V10);
        assert_eq!(TensorRtTarget::V8_6.to_string(), "TensorRT 8.6");
    }
}
