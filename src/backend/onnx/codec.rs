//! The ONNX backend's JSON tensor codec: a request's nested JSON arrays into tract tensors of the
//! model's input types and shapes, and output tensors into JSON, with no tract session involved.
//!
//! Nothing is allocated from a size the client declares: a tensor's leaves are collected as the
//! JSON is walked, so memory follows the body (bounded by `max_request_size`), not the widths of
//! its first elements.

use serde_json::Value;
use tract_onnx::prelude::*;

/// One dimension of a model input as the model declares it.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Dim {
    /// A fixed size the request must match.
    Fixed(usize),
    /// A named symbol (e.g. a batch `N`): any size, the same across a request's inputs.
    Symbol(String),
    /// Any other expression: any size, checked by the model itself when it runs.
    Other(String),
}

impl std::fmt::Display for Dim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dim::Fixed(n) => write!(f, "{n}"),
            Dim::Symbol(s) | Dim::Other(s) => f.write_str(s),
        }
    }
}

#[derive(Debug, Clone)]
pub(super) struct InputSpec {
    pub(super) name: String,
    pub(super) datum_type: DatumType,
    pub(super) shape: Vec<Dim>,
}

#[derive(Debug, Clone)]
pub(super) struct OutputSpec {
    pub(super) name: String,
    pub(super) datum_type: DatumType,
    pub(super) shape: Vec<String>,
}

/// Why a nested JSON array is not rectangular. Positions and values are rendered as the client
/// wrote them (`[1, 0]`, a shortened JSON value).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub(super) enum RaggedError {
    #[error("ragged array: element at {at} is a nested array, but the first elements are nested only {depth} deep")]
    TooDeep { at: String, depth: usize },
    #[error("ragged array: element at {at} is {found}, expected an array of {len} elements")]
    NotArray {
        at: String,
        found: String,
        len: usize,
    },
    #[error(
        "ragged array: array at {at} has {len} elements, expected {want} like its first sibling"
    )]
    Width { at: String, len: usize, want: usize },
}

/// Why a request's JSON cannot become an input tensor (a 400 naming the input), or an output
/// tensor cannot be written as JSON (a 500). Shapes are rendered as `[2, N]`.
#[derive(Debug, thiserror::Error)]
pub(super) enum CodecError {
    #[error("input {input:?}: {source}")]
    Ragged { input: String, source: RaggedError },
    #[error("input {input:?}: expected shape {want} (rank {want_rank}), got shape {got} (rank {got_rank})")]
    Rank {
        input: String,
        want: String,
        want_rank: usize,
        got: String,
        got_rank: usize,
    },
    #[error("input {input:?}: expected shape {want}, got shape {got} (dimension {axis} must be {size}, got {got_size})")]
    Dimension {
        input: String,
        want: String,
        got: String,
        axis: usize,
        size: usize,
        got_size: usize,
    },
    #[error("input {input:?}: dimension {axis} ({symbol}) is {size}, but input {owner:?} has {symbol} = {owner_size}")]
    Symbol {
        input: String,
        axis: usize,
        symbol: String,
        size: usize,
        owner: String,
        owner_size: usize,
    },
    #[error("input {input:?} ({dtype}): element at {at} is {found}, expected {expected}")]
    Element {
        input: String,
        dtype: String,
        at: String,
        found: String,
        expected: String,
    },
    #[error("input {input:?} has element type {dtype}, which JSON requests cannot supply")]
    InputType { input: String, dtype: String },
    #[error("element type {0} cannot be written as JSON")]
    OutputType(String),
    /// tract refused to build or read a tensor (shapes were checked first, so not expected).
    #[error("{0:#}")]
    Tract(#[from] TractError),
    #[error("{0}")]
    Shape(#[from] tract_ndarray::ShapeError),
}

/// A JSON value shortened for error messages.
pub(super) fn show(value: &Value) -> String {
    let text = value.to_string();
    if text.chars().count() > 40 {
        let short: String = text.chars().take(37).collect();
        format!("{short}...")
    } else {
        text
    }
}

pub(super) fn show_shape(shape: &[usize]) -> String {
    let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
    format!("[{}]", dims.join(", "))
}

pub(super) fn show_dims(shape: &[Dim]) -> String {
    let dims: Vec<String> = shape.iter().map(Dim::to_string).collect();
    format!("[{}]", dims.join(", "))
}

/// The shape of a nested JSON array and its leaves in row-major order, or why it is not a
/// rectangular array.
pub(super) fn flatten(value: &Value) -> Result<(Vec<usize>, Vec<&Value>), RaggedError> {
    let mut shape = Vec::new();
    let mut probe = value;
    while let Value::Array(items) = probe {
        shape.push(items.len());
        match items.first() {
            Some(first) => probe = first,
            None => break,
        }
    }
    // No capacity from the shape: the widths of the first elements are the client's claim, and
    // their product (1000^5 for a 10 KB body) can exceed memory or overflow. The leaves grow with
    // what actually arrived, and `collect` stops at the first ragged element.
    let mut leaves = Vec::new();
    let mut at = Vec::with_capacity(shape.len());
    collect(value, &shape, &mut at, &mut leaves)?;
    Ok((shape, leaves))
}

fn collect<'a>(
    value: &'a Value,
    shape: &[usize],
    at: &mut Vec<usize>,
    leaves: &mut Vec<&'a Value>,
) -> Result<(), RaggedError> {
    let depth = at.len();
    if depth == shape.len() {
        if value.is_array() {
            return Err(RaggedError::TooDeep {
                at: show_shape(at),
                depth: shape.len(),
            });
        }
        leaves.push(value);
        return Ok(());
    }
    let Value::Array(items) = value else {
        return Err(RaggedError::NotArray {
            at: show_shape(at),
            found: show(value),
            len: shape[depth],
        });
    };
    if items.len() != shape[depth] {
        return Err(RaggedError::Width {
            at: show_shape(at),
            len: items.len(),
            want: shape[depth],
        });
    }
    for (i, item) in items.iter().enumerate() {
        at.push(i);
        collect(item, shape, at, leaves)?;
        at.pop();
    }
    Ok(())
}

/// The multi-index of leaf `flat` of an array of this shape.
pub(super) fn position(shape: &[usize], mut flat: usize) -> String {
    let mut index = vec![0; shape.len()];
    for (slot, &dim) in index.iter_mut().zip(shape.iter()).rev() {
        if dim > 0 {
            *slot = flat % dim;
            flat /= dim;
        }
    }
    show_shape(&index)
}

/// Converts one input's JSON value to a tensor of the model's type and checked shape. `symbols`
/// records the sizes symbolic dimensions took in earlier inputs of the request.
pub(super) fn to_tensor(
    spec: &InputSpec,
    value: &Value,
    symbols: &mut Vec<(String, usize, String)>,
) -> Result<Tensor, CodecError> {
    let (shape, leaves) = flatten(value).map_err(|source| CodecError::Ragged {
        input: spec.name.clone(),
        source,
    })?;
    if shape.len() != spec.shape.len() {
        return Err(CodecError::Rank {
            input: spec.name.clone(),
            want: show_dims(&spec.shape),
            want_rank: spec.shape.len(),
            got: show_shape(&shape),
            got_rank: shape.len(),
        });
    }
    for (axis, (want, &got)) in spec.shape.iter().zip(shape.iter()).enumerate() {
        match want {
            Dim::Fixed(n) if *n != got => {
                return Err(CodecError::Dimension {
                    input: spec.name.clone(),
                    want: show_dims(&spec.shape),
                    got: show_shape(&shape),
                    axis,
                    size: *n,
                    got_size: got,
                });
            }
            Dim::Symbol(sym) => {
                if let Some((_, size, owner)) = symbols.iter().find(|(s, _, _)| s == sym) {
                    if *size != got {
                        return Err(CodecError::Symbol {
                            input: spec.name.clone(),
                            axis,
                            symbol: sym.clone(),
                            size: got,
                            owner: owner.clone(),
                            owner_size: *size,
                        });
                    }
                } else {
                    symbols.push((sym.clone(), got, spec.name.clone()));
                }
            }
            _ => {}
        }
    }
    let dt = spec.datum_type;
    let wrong = |i: usize, expected: &str| CodecError::Element {
        input: spec.name.clone(),
        dtype: dtype_name(dt),
        at: position(&shape, i),
        found: show(leaves[i]),
        expected: expected.to_string(),
    };
    let tensor = match dt {
        DatumType::F16 | DatumType::F32 | DatumType::F64 => {
            let mut data = Vec::with_capacity(leaves.len());
            for (i, leaf) in leaves.iter().enumerate() {
                data.push(leaf.as_f64().ok_or_else(|| wrong(i, "a number"))?);
            }
            let t = Tensor::from_shape(&shape, &data)?;
            if dt == DatumType::F64 {
                t
            } else {
                t.cast_to_dt(dt)?.into_owned()
            }
        }
        DatumType::I8
        | DatumType::I16
        | DatumType::I32
        | DatumType::I64
        | DatumType::U8
        | DatumType::U16
        | DatumType::U32
        | DatumType::U64 => {
            let (min, max) = int_range(dt);
            let expected = format!("an integer in {min}..={max}");
            let mut data = Vec::with_capacity(leaves.len());
            for (i, leaf) in leaves.iter().enumerate() {
                let v = as_integer(leaf)
                    .filter(|v| (min..=max).contains(v))
                    .ok_or_else(|| wrong(i, &expected))?;
                data.push(v);
            }
            if dt == DatumType::U64 {
                let data: Vec<u64> = data.into_iter().map(|v| v as u64).collect();
                Tensor::from_shape(&shape, &data)?
            } else {
                let data: Vec<i64> = data.into_iter().map(|v| v as i64).collect();
                let t = Tensor::from_shape(&shape, &data)?;
                if dt == DatumType::I64 {
                    t
                } else {
                    t.cast_to_dt(dt)?.into_owned()
                }
            }
        }
        DatumType::Bool => {
            let mut data = Vec::with_capacity(leaves.len());
            for (i, leaf) in leaves.iter().enumerate() {
                let v = match leaf {
                    Value::Bool(b) => *b,
                    other => match as_integer(other) {
                        Some(0) => false,
                        Some(1) => true,
                        _ => return Err(wrong(i, "true, false, 0 or 1")),
                    },
                };
                data.push(v);
            }
            Tensor::from_shape(&shape, &data)?
        }
        DatumType::String => {
            let mut data = Vec::with_capacity(leaves.len());
            for (i, leaf) in leaves.iter().enumerate() {
                data.push(
                    leaf.as_str()
                        .ok_or_else(|| wrong(i, "a string"))?
                        .to_string(),
                );
            }
            tract_ndarray::ArrayD::from_shape_vec(shape.clone(), data)?.into()
        }
        other => {
            return Err(CodecError::InputType {
                input: spec.name.clone(),
                dtype: dtype_name(other),
            })
        }
    };
    Ok(tensor)
}

/// A JSON number as an integer: integral values only (`2` and `2.0`, not `2.5`).
fn as_integer(value: &Value) -> Option<i128> {
    if let Some(v) = value.as_i64() {
        return Some(v.into());
    }
    if let Some(v) = value.as_u64() {
        return Some(v.into());
    }
    let f = value.as_f64()?;
    // 2^64 bounds every integer type supported here; larger floats are refused by the range check.
    (f.is_finite() && f.fract() == 0.0 && f.abs() < 1.9e19).then_some(f as i128)
}

fn int_range(dt: DatumType) -> (i128, i128) {
    match dt {
        DatumType::I8 => (i8::MIN.into(), i8::MAX.into()),
        DatumType::I16 => (i16::MIN.into(), i16::MAX.into()),
        DatumType::I32 => (i32::MIN.into(), i32::MAX.into()),
        DatumType::I64 => (i64::MIN.into(), i64::MAX.into()),
        DatumType::U8 => (0, u8::MAX.into()),
        DatumType::U16 => (0, u16::MAX.into()),
        DatumType::U32 => (0, u32::MAX.into()),
        _ => (0, u64::MAX.into()),
    }
}

/// The ONNX-style name of an element type (`float32`, `int64`, ...).
pub(super) fn dtype_name(dt: DatumType) -> String {
    match dt {
        DatumType::Bool => "bool".into(),
        DatumType::U8 => "uint8".into(),
        DatumType::U16 => "uint16".into(),
        DatumType::U32 => "uint32".into(),
        DatumType::U64 => "uint64".into(),
        DatumType::I8 => "int8".into(),
        DatumType::I16 => "int16".into(),
        DatumType::I32 => "int32".into(),
        DatumType::I64 => "int64".into(),
        DatumType::F16 => "float16".into(),
        DatumType::F32 => "float32".into(),
        DatumType::F64 => "float64".into(),
        DatumType::String => "string".into(),
        other => format!("{other:?}"),
    }
}

/// Writes floats in their shortest exact form; NaN and infinities (not JSON) as `null`.
fn write_floats<F: ryu::Float + Copy + Into<f64>>(out: &mut String, shape: &[usize], data: &[F]) {
    let mut buf = ryu::Buffer::new();
    write_nested(out, shape, data, &mut |out, v| {
        if (*v).into().is_finite() {
            out.push_str(buf.format_finite(*v));
        } else {
            out.push_str("null");
        }
    });
}

/// Writes a tensor's elements as a JSON array nested to the tensor's rank.
pub(super) fn write_tensor(out: &mut String, t: &Tensor) -> Result<(), CodecError> {
    let shape = t.shape().to_vec();
    match t.datum_type() {
        DatumType::F32 => write_floats(out, &shape, t.as_slice::<f32>()?),
        DatumType::F16 | DatumType::F64 => {
            let cast = t.cast_to::<f64>()?;
            write_floats(out, &shape, cast.as_slice::<f64>()?);
        }
        DatumType::I8
        | DatumType::I16
        | DatumType::I32
        | DatumType::I64
        | DatumType::U8
        | DatumType::U16
        | DatumType::U32 => {
            let cast = t.cast_to::<i64>()?;
            let data = cast.as_slice::<i64>()?;
            let mut buf = itoa::Buffer::new();
            write_nested(out, &shape, data, &mut |out, v| {
                out.push_str(buf.format(*v))
            });
        }
        DatumType::U64 => {
            let data = t.as_slice::<u64>()?;
            let mut buf = itoa::Buffer::new();
            write_nested(out, &shape, data, &mut |out, v| {
                out.push_str(buf.format(*v))
            });
        }
        DatumType::Bool => {
            let data = t.as_slice::<bool>()?;
            write_nested(out, &shape, data, &mut |out, v| {
                out.push_str(if *v { "true" } else { "false" })
            });
        }
        DatumType::String => {
            let data = t.as_slice::<String>()?;
            write_nested(out, &shape, data, &mut |out, v| {
                out.push_str(&Value::String(v.clone()).to_string())
            });
        }
        other => return Err(CodecError::OutputType(dtype_name(other))),
    }
    Ok(())
}

fn write_nested<T>(
    out: &mut String,
    shape: &[usize],
    data: &[T],
    leaf: &mut dyn FnMut(&mut String, &T),
) {
    match shape.split_first() {
        None => {
            if let Some(v) = data.first() {
                leaf(out, v);
            }
        }
        Some((&n, rest)) => {
            let stride: usize = rest.iter().product();
            out.push('[');
            for i in 0..n {
                if i > 0 {
                    out.push(',');
                }
                write_nested(out, rest, &data[i * stride..(i + 1) * stride], leaf);
            }
            out.push(']');
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_arrays_flatten_or_explain() {
        let v: Value = serde_json::from_str("[[1, 2, 3], [4, 5, 6]]").unwrap();
        let (shape, leaves) = flatten(&v).unwrap();
        assert_eq!(shape, vec![2, 3]);
        assert_eq!(leaves.len(), 6);
        let v: Value = serde_json::from_str("[[1, 2, 3], [4, 5]]").unwrap();
        let e = flatten(&v).unwrap_err().to_string();
        assert!(e.contains("array at [1] has 2 elements, expected 3"), "{e}");
        let v: Value = serde_json::from_str("[[1, 2], 3]").unwrap();
        assert!(flatten(&v)
            .unwrap_err()
            .to_string()
            .contains("element at [1] is 3"));
        let scalar = Value::from(1.5);
        let (shape, leaves) = flatten(&scalar).unwrap();
        assert!(shape.is_empty());
        assert_eq!(leaves.len(), 1);
        assert_eq!(position(&[2, 3], 5), "[1, 2]");
    }

    #[test]
    fn integers_refuse_fractions_and_overflow() {
        let spec = InputSpec {
            name: "ids".into(),
            datum_type: DatumType::U8,
            shape: vec![Dim::Symbol("N".into())],
        };
        let ok: Value = serde_json::from_str("[0, 255, 3.0]").unwrap();
        let t = to_tensor(&spec, &ok, &mut Vec::new()).unwrap();
        assert_eq!(t.as_slice::<u8>().unwrap(), &[0, 255, 3]);
        for bad in ["[256]", "[-1]", "[1.5]", "[\"1\"]"] {
            let v: Value = serde_json::from_str(bad).unwrap();
            let e = to_tensor(&spec, &v, &mut Vec::new())
                .unwrap_err()
                .to_string();
            assert!(e.contains("expected an integer in 0..=255"), "{bad}: {e}");
        }
    }

    #[test]
    fn symbols_must_agree_across_inputs() {
        let a = InputSpec {
            name: "a".into(),
            datum_type: DatumType::F32,
            shape: vec![Dim::Symbol("N".into()), Dim::Fixed(2)],
        };
        let b = InputSpec {
            name: "b".into(),
            ..a.clone()
        };
        let mut symbols = Vec::new();
        let two: Value = serde_json::from_str("[[1, 2], [3, 4]]").unwrap();
        let one: Value = serde_json::from_str("[[1, 2]]").unwrap();
        to_tensor(&a, &two, &mut symbols).unwrap();
        let e = to_tensor(&b, &one, &mut symbols).unwrap_err().to_string();
        assert!(e.contains("input \"a\" has N = 2"), "{e}");
    }

    #[test]
    fn outputs_nest_to_their_rank() {
        let t = Tensor::from_shape(&[2, 2], &[1.5f32, f32::NAN, 0.1, 2.0]).unwrap();
        let mut out = String::new();
        write_tensor(&mut out, &t).unwrap();
        assert_eq!(out, "[[1.5,null],[0.1,2.0]]");
        let mut out = String::new();
        write_tensor(&mut out, &Tensor::from(7i64)).unwrap();
        assert_eq!(out, "7");
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        /// Nested JSON arrays of numbers, strings and booleans, up to 5 deep.
        fn nested() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                any::<i32>().prop_map(Value::from),
                any::<f64>().prop_map(|f| serde_json::Number::from_f64(f)
                    .map(Value::Number)
                    .unwrap_or(Value::Null)),
                any::<bool>().prop_map(Value::from),
                "[a-z]{0,3}".prop_map(Value::from),
            ];
            leaf.prop_recursive(5, 200, 8, |inner| {
                prop_oneof![
                    proptest::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
                    // Wide first elements with short tails: the shape that claimed 1000^5.
                    (proptest::collection::vec(inner.clone(), 0..8), 0usize..1000).prop_map(
                        |(v, w)| {
                            let mut first = v;
                            first.extend(std::iter::repeat_n(Value::from(0), w));
                            Value::Array(vec![Value::Array(first), Value::from(1)])
                        }
                    ),
                ]
            })
        }

        fn leaves_in(v: &Value) -> usize {
            match v {
                Value::Array(items) => items.iter().map(leaves_in).sum::<usize>().max(1),
                _ => 1,
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(128))]

            /// Flattening never panics, and what it keeps is never more than what arrived.
            #[test]
            fn tensors_never_allocate_past_the_body(value in nested()) {
                if let Ok((shape, leaves)) = flatten(&value) {
                    prop_assert!(leaves.len() <= leaves_in(&value));
                    prop_assert_eq!(Some(leaves.len()), shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)));
                }
                for dt in [DatumType::F32, DatumType::I64, DatumType::U8, DatumType::Bool, DatumType::String] {
                    let spec = InputSpec {
                        name: "x".into(),
                        datum_type: dt,
                        shape: vec![Dim::Symbol("N".into()), Dim::Fixed(2)],
                    };
                    let _ = to_tensor(&spec, &value, &mut Vec::new());
                }
            }
        }
    }
}
