//! The ONNX backend's tract session: a model file parsed, typed and optimized into a runnable plan
//! (shared by every worker of a model version), and one request run through it, each request of a
//! batch on its own.

use std::fmt::Write as _;
use std::path::Path;

use serde_json::Value;
use tract_onnx::prelude::*;

use super::codec::{dtype_name, to_tensor, write_tensor, CodecError, Dim, InputSpec, OutputSpec};
use crate::backend::{InferRequest, InferResponse};
use crate::error::ErrorKind;

/// A parsed, optimized ONNX model, shared by every worker of a model version.
pub(super) struct OnnxModel {
    plan: TypedRunnableModel<TypedModel>,
    pub(super) inputs: Vec<InputSpec>,
    pub(super) outputs: Vec<OutputSpec>,
}

/// Why tract could not parse, type or optimize a model file (an unsupported operator, a file that
/// is not ONNX). Shown with tract's whole chain of causes.
#[derive(Debug, thiserror::Error)]
#[error("{0:#}")]
pub struct ModelError(#[from] TractError);

/// Why a request cannot be run (a 400 of its own; the rest of the batch is unaffected). `usage`
/// is the request shape this model takes; `inputs` lists its input names.
#[derive(Debug, thiserror::Error)]
pub(super) enum RequestError {
    #[error("empty request: send JSON {usage}")]
    Empty { usage: String },
    #[error("request body is not valid JSON ({source}): send {usage}")]
    NotJson {
        source: serde_json::Error,
        usage: String,
    },
    #[error("\"inputs\" must be an object mapping input names to arrays: send {usage}")]
    InputsNotObject { usage: String },
    #[error("unknown input {input:?}; the model's inputs are {inputs}")]
    UnknownInput { input: String, inputs: String },
    #[error("missing input {input:?}; the model's inputs are {inputs}")]
    MissingInput { input: String, inputs: String },
    #[error(
        "JSON object needs an \"inputs\" field{} (got fields {fields}): send {usage}",
        if *.single { " or a \"data\" field" } else { "" }
    )]
    NoInputsField {
        single: bool,
        fields: String,
        usage: String,
    },
    #[error("the model has {count} inputs ({inputs}): send {usage}")]
    NotNamed {
        count: usize,
        inputs: String,
        usage: String,
    },
    #[error(transparent)]
    Codec(#[from] CodecError),
}

/// An output tensor that cannot be written as JSON (a 500: the model, not the request, is at fault).
#[derive(Debug, thiserror::Error)]
#[error("cannot write output {output:?}: {source}")]
pub(super) struct OutputError {
    output: String,
    // Boxed: rendering's Ok path stays small; CodecError's request variants are large.
    source: Box<CodecError>,
}

pub(super) fn load_model(file: &Path) -> Result<OnnxModel, ModelError> {
    let inference = tract_onnx::onnx().model_for_path(file)?;
    // Names as the ONNX graph declares them; optimization keeps the order of inputs and outputs.
    let input_names: Vec<String> = inference
        .input_outlets()?
        .iter()
        .map(|o| inference.node(o.node).name.clone())
        .collect();
    let output_names: Vec<String> = inference
        .output_outlets()?
        .iter()
        .map(|o| {
            inference
                .outlet_label(*o)
                .map(str::to_string)
                .unwrap_or_else(|| inference.node(o.node).name.clone())
        })
        .collect();
    let optimized = inference.into_optimized()?;
    let mut inputs = Vec::new();
    for (ix, name) in input_names.into_iter().enumerate() {
        let fact = optimized.input_fact(ix)?;
        let shape = fact
            .shape
            .dims()
            .iter()
            .map(|d| match d {
                TDim::Val(v) if *v >= 0 => Dim::Fixed(*v as usize),
                TDim::Sym(s) => Dim::Symbol(s.to_string()),
                other => Dim::Other(other.to_string()),
            })
            .collect();
        inputs.push(InputSpec {
            name,
            datum_type: fact.datum_type,
            shape,
        });
    }
    let mut outputs = Vec::new();
    for (ix, name) in output_names.into_iter().enumerate() {
        let fact = optimized.output_fact(ix)?;
        outputs.push(OutputSpec {
            name,
            datum_type: fact.datum_type,
            shape: fact.shape.dims().iter().map(|d| d.to_string()).collect(),
        });
    }
    let plan = optimized.into_runnable()?;
    Ok(OnnxModel {
        plan,
        inputs,
        outputs,
    })
}

fn bad_request(message: &str) -> InferResponse {
    InferResponse::error(ErrorKind::BadRequest, message)
}

impl OnnxModel {
    pub(super) fn infer_one(&self, req: &InferRequest) -> InferResponse {
        let tensors = match self.request_tensors(req) {
            Ok(t) => t,
            Err(e) => return bad_request(&e.to_string()),
        };
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.plan
                .run(tensors.into_iter().map(|t| t.into_tvalue()).collect())
        }));
        let outputs = match run {
            Ok(Ok(outputs)) => outputs,
            Ok(Err(e)) => {
                return InferResponse::error(
                    ErrorKind::InternalServer,
                    &format!("ONNX inference failed: {e:#}"),
                )
            }
            Err(_) => {
                return InferResponse::error(
                    ErrorKind::InternalServer,
                    "ONNX inference failed: the model panicked",
                )
            }
        };
        match self.render(&outputs) {
            Ok(body) => InferResponse::ok("application/json", body),
            Err(e) => InferResponse::error(ErrorKind::InternalServer, &e.to_string()),
        }
    }

    /// The request's tensors in the model's input order, or why the request is refused.
    fn request_tensors(&self, req: &InferRequest) -> Result<Vec<Tensor>, RequestError> {
        let payload = req
            .payload()
            .filter(|p| !p.value.is_empty())
            .ok_or_else(|| RequestError::Empty {
                usage: self.usage(),
            })?;
        let body: Value =
            serde_json::from_slice(&payload.value).map_err(|source| RequestError::NotJson {
                source,
                usage: self.usage(),
            })?;
        let values = self.named_values(body)?;
        let mut symbols: Vec<(String, usize, String)> = Vec::new();
        self.inputs
            .iter()
            .zip(values.iter())
            .map(|(spec, value)| Ok(to_tensor(spec, value, &mut symbols)?))
            .collect()
    }

    /// Splits the body into one JSON value per model input, in the model's input order.
    fn named_values(&self, body: Value) -> Result<Vec<Value>, RequestError> {
        let single = self.inputs.len() == 1;
        match body {
            Value::Object(mut map) if map.contains_key("inputs") => {
                let Some(Value::Object(given)) = map.remove("inputs") else {
                    return Err(RequestError::InputsNotObject {
                        usage: self.usage(),
                    });
                };
                if let Some(unknown) = given
                    .keys()
                    .find(|k| !self.inputs.iter().any(|i| &i.name == *k))
                {
                    return Err(RequestError::UnknownInput {
                        input: unknown.clone(),
                        inputs: self.input_list(),
                    });
                }
                let mut given = given;
                self.inputs
                    .iter()
                    .map(|i| {
                        given
                            .remove(&i.name)
                            .ok_or_else(|| RequestError::MissingInput {
                                input: i.name.clone(),
                                inputs: self.input_list(),
                            })
                    })
                    .collect()
            }
            Value::Object(mut map) if single && map.len() == 1 && map.contains_key("data") => {
                Ok(vec![map.remove("data").unwrap_or(Value::Null)])
            }
            Value::Object(map) => Err(RequestError::NoInputsField {
                single,
                fields: map
                    .keys()
                    .map(|k| format!("{k:?}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                usage: self.usage(),
            }),
            value if single => Ok(vec![value]),
            _ => Err(RequestError::NotNamed {
                count: self.inputs.len(),
                inputs: self.input_list(),
                usage: self.usage(),
            }),
        }
    }

    fn input_list(&self) -> String {
        self.inputs
            .iter()
            .map(|i| format!("{:?}", i.name))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn usage(&self) -> String {
        let names: Vec<String> = self
            .inputs
            .iter()
            .map(|i| format!("{:?}: <nested array>", i.name))
            .collect();
        let mut usage = format!("{{\"inputs\": {{{}}}}}", names.join(", "));
        if self.inputs.len() == 1 {
            usage.push_str(", {\"data\": <nested array>} or a bare nested array");
        }
        usage
    }

    /// `{"outputs": {...}}` for the model's outputs, in the model's order.
    fn render(&self, outputs: &[TValue]) -> Result<String, OutputError> {
        let mut out = String::from("{\"outputs\":{");
        for (ix, (spec, value)) in self.outputs.iter().zip(outputs.iter()).enumerate() {
            if ix > 0 {
                out.push(',');
            }
            let _ = write!(
                out,
                "{}:{{\"dtype\":\"{}\",\"shape\":[",
                Value::String(spec.name.clone()),
                dtype_name(value.datum_type())
            );
            for (i, d) in value.shape().iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                let _ = write!(out, "{d}");
            }
            out.push_str("],\"data\":");
            write_tensor(&mut out, value).map_err(|source| OutputError {
                output: spec.name.clone(),
                source: Box::new(source),
            })?;
            out.push('}');
        }
        out.push_str("}}");
        Ok(out)
    }
}
