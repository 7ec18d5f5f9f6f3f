//! The calibration tables TensorRT and ONNX Runtime read.
//!
//! - TensorRT's native calibration cache: a header line `TRT-<version>-<calibrator>` then one
//!   line per tensor, `name: <hex>`, the hex being the big-endian IEEE-754 bits of the scale
//!   `amax / 127`.
//! - ONNX Runtime's TensorRT calibration table, which its TensorRT provider reads with
//!   `trt_int8_enable` and `trt_int8_calibration_table_name`: a flatbuffers `TrtTable`
//!   (schema `namespace CalTableFlatBuffers; table KeyValue { key: string (key); value:
//!   string; } table TrtTable { dict: [KeyValue]; } root_type TrtTable;`), each value the
//!   tensor's `amax` as decimal text.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use narx_graphs::decode_model;
use narx_graphs::manifest::Manifest;
use narx_runtime::backend::providers::TensorRtInt8;

use crate::observe::activation_inputs;
use crate::CalibrationError;

/// Which TensorRT calibrator a native cache claims to come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Calibrator {
    Entropy2,
    MinMax,
}

impl Calibrator {
    fn name(self) -> &'static str {
        match self {
            Calibrator::Entropy2 => "EntropyCalibration2",
            Calibrator::MinMax => "MinMaxCalibration",
        }
    }
}

/// TensorRT reads a cache only if its header names its own version (`NV_TENSORRT_VERSION`:
/// 8601 for 8.6.1, 100000 for 10.0.0), so the version is the user's to choose.
pub const DEFAULT_TRT_VERSION: &str = "100000";

/// Refuses a TensorRT version not written as `NV_TENSORRT_VERSION` (four digits before
/// TensorRT 10, `major·10000 + minor·100 + patch` from 10 on): TensorRT silently ignores a
/// cache whose header names anything else, such as `TRT-10-…`.
pub fn check_trt_version(version: &str) -> Result<(), CalibrationError> {
    let number = version
        .bytes()
        .all(|b| b.is_ascii_digit())
        .then(|| version.parse::<u32>().ok())
        .flatten();
    match number {
        Some(1000..=9999 | 100_000..=999_999) if !version.starts_with('0') => Ok(()),
        _ => Err(CalibrationError::BadInput(format!(
            "--trt-version {version:?} is not an NV_TENSORRT_VERSION number: write 8.6.1 as \
             8601 and 10.3.0 as 100300"
        ))),
    }
}

/// The native cache text for `(tensor, amax)` pairs, in the order given.
pub fn trt_cache(version: &str, calibrator: Calibrator, ranges: &[(String, f32)]) -> String {
    let mut text = format!("TRT-{version}-{}\n", calibrator.name());
    for (name, amax) in ranges {
        let scale = amax / 127.0;
        text.push_str(&format!("{name}: {:08x}\n", scale.to_bits()));
    }
    text
}

/// Reads a native cache back: its header and each tensor's `amax` (scale × 127).
pub fn parse_trt_cache(text: &str) -> Result<(String, Vec<(String, f32)>), CalibrationError> {
    let bad = |m: String| CalibrationError::Table(m);
    let mut lines = text.lines();
    let header = lines
        .next()
        .filter(|h| h.starts_with("TRT-"))
        .ok_or_else(|| bad("no `TRT-<version>-<calibrator>` header".into()))?;
    let ranges = lines
        .filter(|l| !l.is_empty())
        .map(|line| {
            let (name, hex) = line
                .rsplit_once(": ")
                .ok_or_else(|| bad(format!("line {line:?} is not `name: hex`")))?;
            let bits = u32::from_str_radix(hex, 16)
                .map_err(|_| bad(format!("{name}: {hex:?} is not 8 hex digits")))?;
            Ok((name.to_string(), f32::from_bits(bits) * 127.0))
        })
        .collect::<Result<_, CalibrationError>>()?;
    Ok((header.to_string(), ranges))
}

/// ONNX Runtime's `TrtTable` flatbuffer for `(tensor, amax)` pairs, keys sorted.
///
/// Laid out front to back (flatbuffers only needs offsets that point forward, and vtables
/// reachable by a signed offset): root offset, the two vtables, the `TrtTable`, the vector
/// of `KeyValue` offsets, the `KeyValue` tables, then the strings.
pub fn ort_trt_table(ranges: &[(String, f32)]) -> Vec<u8> {
    let mut entries: Vec<(String, String)> = ranges
        .iter()
        .map(|(name, amax)| (name.clone(), amax.to_string()))
        .collect();
    entries.sort();
    let n = entries.len();
    const TABLE_VTABLE: usize = 4; // [6, 8, 4] + 2 bytes of padding
    const KEY_VALUE_VTABLE: usize = 12; // [8, 12, 4, 8]
    const TRT_TABLE: usize = 20; // soffset, dict offset
    const VECTOR: usize = 28; // length, then n offsets
    let first_key_value = VECTOR + 4 + 4 * n;
    let first_string = first_key_value + 12 * n;

    let mut out = Vec::new();
    let u32_at = |out: &mut Vec<u8>, v: u32| out.extend_from_slice(&v.to_le_bytes());
    let u16_at = |out: &mut Vec<u8>, v: u16| out.extend_from_slice(&v.to_le_bytes());
    u32_at(&mut out, TRT_TABLE as u32);
    for v in [6u16, 8, 4, 0] {
        u16_at(&mut out, v);
    }
    for v in [8u16, 12, 4, 8] {
        u16_at(&mut out, v);
    }
    out.extend_from_slice(&((TRT_TABLE - TABLE_VTABLE) as i32).to_le_bytes());
    u32_at(&mut out, (VECTOR - (TRT_TABLE + 4)) as u32);
    u32_at(&mut out, n as u32);
    for i in 0..n {
        let slot = VECTOR + 4 + 4 * i;
        u32_at(&mut out, (first_key_value + 12 * i - slot) as u32);
    }
    // Strings: length, bytes, a terminating 0, padding to 4.
    let mut strings = Vec::new();
    let mut string_at = Vec::new();
    for (key, value) in &entries {
        for s in [key, value] {
            string_at.push(first_string + strings.len());
            strings.extend_from_slice(&(s.len() as u32).to_le_bytes());
            strings.extend_from_slice(s.as_bytes());
            strings.push(0);
            while !strings.len().is_multiple_of(4) {
                strings.push(0);
            }
        }
    }
    for i in 0..n {
        let table = first_key_value + 12 * i;
        out.extend_from_slice(&((table - KEY_VALUE_VTABLE) as i32).to_le_bytes());
        u32_at(&mut out, (string_at[2 * i] - (table + 4)) as u32);
        u32_at(&mut out, (string_at[2 * i + 1] - (table + 8)) as u32);
    }
    out.extend_from_slice(&strings);
    out
}

/// Reads a `TrtTable` flatbuffer back (any valid layout, not only ours): `(key, amax)` in
/// the table's order.
pub fn parse_ort_trt_table(bytes: &[u8]) -> Result<Vec<(String, f32)>, CalibrationError> {
    let bad = |m: &str| CalibrationError::Table(format!("TrtTable flatbuffer: {m}"));
    let u32_at = |at: usize| -> Result<usize, CalibrationError> {
        let b = bytes.get(at..at + 4).ok_or_else(|| bad("truncated"))?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    let u16_at = |at: usize| -> Result<usize, CalibrationError> {
        let b = bytes.get(at..at + 2).ok_or_else(|| bad("truncated"))?;
        Ok(u16::from_le_bytes([b[0], b[1]]) as usize)
    };
    // The position of field `index` of the table at `table`, if present.
    let field = |table: usize, index: usize| -> Result<Option<usize>, CalibrationError> {
        let soffset = i32::from_le_bytes(
            bytes
                .get(table..table + 4)
                .ok_or_else(|| bad("truncated"))?
                .try_into()
                .map_err(|_| bad("truncated"))?,
        );
        let vtable = usize::try_from(table as i64 - i64::from(soffset))
            .map_err(|_| bad("vtable out of range"))?;
        let size = u16_at(vtable)?;
        if 4 + 2 * index >= size {
            return Ok(None);
        }
        let offset = u16_at(vtable + 4 + 2 * index)?;
        Ok((offset != 0).then_some(table + offset))
    };
    let string = |at: usize| -> Result<String, CalibrationError> {
        let start = at + u32_at(at)?;
        let len = u32_at(start)?;
        let raw = bytes
            .get(start + 4..start + 4 + len)
            .ok_or_else(|| bad("string out of range"))?;
        String::from_utf8(raw.to_vec()).map_err(|_| bad("string is not UTF-8"))
    };
    let root = u32_at(0)?;
    let dict = field(root, 0)?.ok_or_else(|| bad("no dict"))?;
    let vector = dict + u32_at(dict)?;
    let n = u32_at(vector)?;
    (0..n)
        .map(|i| {
            let slot = vector + 4 + 4 * i;
            let table = slot + u32_at(slot)?;
            let key = string(field(table, 0)?.ok_or_else(|| bad("entry without key"))?)?;
            let value = string(field(table, 1)?.ok_or_else(|| bad("entry without value"))?)?;
            let amax = value
                .parse()
                .map_err(|_| bad(&format!("{key}: value {value:?} is not a number")))?;
            Ok((key, amax))
        })
        .collect()
}

/// Where TensorRT takes INT8 ranges from for the model in `dir`: the graphs of a QDQ model,
/// or the ONNX Runtime table of a calibrated directory, checked against the graphs: every
/// activation a MatMul, Gemm or Conv reads has a range, and the table names no tensor the
/// graphs lack (a table made for another model).
pub fn tensorrt_int8(dir: &Path, manifest: &Manifest) -> Result<TensorRtInt8, CalibrationError> {
    if manifest.quantization.is_some() {
        return Ok(TensorRtInt8::Qdq);
    }
    let files = manifest.calibration.as_ref().ok_or_else(|| {
        CalibrationError::BadInput(format!(
            "{} has no INT8 ranges: run `narx calibrate` on it and use its output (float \
             graphs with a calibration table) or the output's int8/ QDQ model",
            dir.display()
        ))
    })?;
    let path = dir.join(&files.ort_table);
    let bytes = std::fs::read(&path)
        .map_err(|e| CalibrationError::Io(format!("{}: {e}", path.display())))?;
    let table: BTreeMap<String, f32> = parse_ort_trt_table(&bytes)
        .map_err(|e| CalibrationError::Table(format!("{}: {e}", path.display())))?
        .into_iter()
        .collect();
    let mut activations = BTreeSet::new();
    for graph in [&manifest.graphs.prefill, &manifest.graphs.step] {
        let graph_path = dir.join(&graph.file);
        let bytes = std::fs::read(&graph_path)
            .map_err(|e| CalibrationError::Io(format!("{}: {e}", graph_path.display())))?;
        let model = decode_model(&bytes)
            .map_err(|e| CalibrationError::BadInput(format!("{}: {e}", graph_path.display())))?;
        activations.extend(activation_inputs(&model));
    }
    let mismatch = |what: String| {
        CalibrationError::Table(format!(
            "{}: {what}: the table was made for a different model",
            path.display()
        ))
    };
    if let Some(tensor) = table.keys().find(|k| !activations.contains(*k)) {
        return Err(mismatch(format!("no graph has the tensor {tensor}")));
    }
    if let Some(tensor) = activations.iter().find(|a| !table.contains_key(*a)) {
        return Err(mismatch(format!("no range for {tensor}")));
    }
    let absolute = std::path::absolute(&path)
        .map_err(|e| CalibrationError::Io(format!("{}: {e}", path.display())))?;
    Ok(TensorRtInt8::Table(absolute))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trt_versions_must_be_nv_tensorrt_version_numbers() {
        for good in ["8601", "8502", DEFAULT_TRT_VERSION, "100300"] {
            assert!(check_trt_version(good).is_ok(), "{good}");
        }
        for bad in [
            "10", "8.6", "8.6.1", "86010", "08601", "+8601", "", "1000000",
        ] {
            let err = check_trt_version(bad).unwrap_err().to_string();
            assert!(err.contains("NV_TENSORRT_VERSION"), "{bad}: {err}");
        }
    }

    fn ranges() -> Vec<(String, f32)> {
        vec![
            ("/layers.0/attn/MatMul_input".into(), 4.5),
            ("tokens_embedded".into(), 0.03125),
            ("a".into(), 127.0),
        ]
    }

    #[test]
    fn native_cache_lines_are_big_endian_scale_bits() {
        let text = trt_cache("8601", Calibrator::Entropy2, &ranges());
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "TRT-8601-EntropyCalibration2");
        // amax 127 → scale 1.0 = 0x3f800000.
        assert_eq!(lines[3], "a: 3f800000");
        assert_eq!(
            lines[1],
            format!(
                "/layers.0/attn/MatMul_input: {:08x}",
                (4.5f32 / 127.0).to_bits()
            )
        );
        let (header, back) = parse_trt_cache(&text).unwrap();
        assert_eq!(header, "TRT-8601-EntropyCalibration2");
        for ((name, amax), (name2, amax2)) in ranges().iter().zip(&back) {
            assert_eq!(name, name2);
            assert!(
                (amax - amax2).abs() <= amax * 1e-6,
                "{name}: {amax} vs {amax2}"
            );
        }
        assert!(trt_cache("100000", Calibrator::MinMax, &[])
            .starts_with("TRT-100000-MinMaxCalibration"));
        assert!(parse_trt_cache("x: 3f800000\n").is_err());
        assert!(parse_trt_cache("TRT-1-MinMaxCalibration\nx: nothex\n").is_err());
    }

    #[test]
    fn trt_table_round_trips_with_sorted_keys() {
        let bytes = ort_trt_table(&ranges());
        assert_eq!(bytes.len() % 4, 0);
        let back = parse_ort_trt_table(&bytes).unwrap();
        let mut expected = ranges();
        expected.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(back, expected);
        assert_eq!(parse_ort_trt_table(&ort_trt_table(&[])).unwrap(), vec![]);
        assert!(parse_ort_trt_table(&bytes[..bytes.len() - 8]).is_err());
    }
}
