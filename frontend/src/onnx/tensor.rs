//! ONNX TensorProto → veil tensor.

use ndarray::ArrayD;
use onnx_protobuf::tensor_proto::{DataLocation, DataType};
use onnx_protobuf::TensorProto;
use protobuf::Enum;
use veil_ir::{Elem, Tensor};

/// What an ONNX element type becomes in veil: floats → f32, integers and booleans → i64.
pub fn elem_of(data_type: i32) -> Result<Elem, String> {
    use DataType::*;
    match DataType::from_i32(data_type) {
        Some(FLOAT | DOUBLE) => Ok(Elem::F32),
        Some(INT8 | INT16 | INT32 | INT64 | UINT8 | UINT16 | UINT32 | UINT64 | BOOL) => Ok(Elem::I64),
        Some(t) => Err(format!("element type {t:?} is not supported (use float32 or integers)")),
        None => Err(format!("unknown element type {data_type}")),
    }
}

/// Decode a tensor's values, from `raw_data` or the typed fields.
pub fn to_tensor(t: &TensorProto) -> Result<Tensor, String> {
    if t.data_location.enum_value_or(DataLocation::DEFAULT) == DataLocation::EXTERNAL {
        return Err(format!("tensor '{}' keeps its data in an external file, which veil does not read", t.name));
    }
    let dims: Vec<usize> = t
        .dims
        .iter()
        .map(|&d| usize::try_from(d).map_err(|_| format!("tensor '{}' has negative dimension {d}", t.name)))
        .collect::<Result<_, _>>()?;
    let count: usize = dims.iter().product();
    let raw = &t.raw_data;
    use DataType::*;
    let dt = DataType::from_i32(t.data_type)
        .ok_or_else(|| format!("tensor '{}' has unknown element type {}", t.name, t.data_type))?;
    if dt == STRING {
        // Class names, as scikit-learn pipelines carry them to map argmax to labels: they
        // become the class indices 0..n (labels come out as indices into these names),
        // as LinearClassifier's string labels do.
        if dims.len() != 1 || t.string_data.len() != count {
            return Err(format!(
                "tensor '{}' holds strings of shape {:?}; veil reads string tensors only as a list of class names",
                t.name, dims
            ));
        }
        return Ok(Tensor::I64(ArrayD::from_shape_vec(dims, (0..count as i64).collect()).map_err(|e| e.to_string())?));
    }
    let width = match dt {
        FLOAT | INT32 | UINT32 => 4,
        DOUBLE | INT64 | UINT64 => 8,
        INT16 | UINT16 => 2,
        INT8 | UINT8 | BOOL => 1,
        other => return Err(format!("tensor '{}' has element type {other:?}, which veil does not support", t.name)),
    };
    if !raw.is_empty() && raw.len() != count * width {
        return Err(format!(
            "tensor '{}' holds {} bytes, expected {} for shape {:?}",
            t.name,
            raw.len(),
            count * width,
            dims
        ));
    }
    let chunks = || raw.chunks_exact(width);
    let floats: Option<Vec<f32>> = match dt {
        FLOAT if !raw.is_empty() => Some(chunks().map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()),
        FLOAT => Some(t.float_data.clone()),
        DOUBLE if !raw.is_empty() => Some(chunks().map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32).collect()),
        DOUBLE => Some(t.double_data.iter().map(|&v| v as f32).collect()),
        _ => None,
    };
    let tensor = if let Some(v) = floats {
        check_len(t, v.len(), count)?;
        Tensor::F32(ArrayD::from_shape_vec(dims, v).map_err(|e| e.to_string())?)
    } else {
        let v: Vec<i64> = if raw.is_empty() {
            match dt {
                INT64 => t.int64_data.clone(),
                UINT32 | UINT64 => t.uint64_data.iter().map(|&v| v as i64).collect(),
                _ => t.int32_data.iter().map(|&v| v as i64).collect(),
            }
        } else {
            chunks()
                .map(|c| match dt {
                    INT32 => i32::from_le_bytes(c.try_into().unwrap()) as i64,
                    UINT32 => u32::from_le_bytes(c.try_into().unwrap()) as i64,
                    INT64 => i64::from_le_bytes(c.try_into().unwrap()),
                    UINT64 => u64::from_le_bytes(c.try_into().unwrap()) as i64,
                    INT16 => i16::from_le_bytes(c.try_into().unwrap()) as i64,
                    UINT16 => u16::from_le_bytes(c.try_into().unwrap()) as i64,
                    INT8 => c[0] as i8 as i64,
                    _ => c[0] as i64,
                })
                .collect()
        };
        check_len(t, v.len(), count)?;
        Tensor::I64(ArrayD::from_shape_vec(dims, v).map_err(|e| e.to_string())?)
    };
    Ok(tensor)
}

fn check_len(t: &TensorProto, got: usize, want: usize) -> Result<(), String> {
    if got != want {
        return Err(format!("tensor '{}' holds {got} values, its shape {:?} needs {want}", t.name, t.dims));
    }
    Ok(())
}
