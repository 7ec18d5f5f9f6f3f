//! Calibration tables read back by an independent reader: ONNX Runtime's own Python code for
//! its TensorRT calibration table (`onnxruntime.quantization.CalTableFlatBuffers`, generated
//! by flatc from the schema), from the `onnxruntime` wheel the tests install.

use std::process::Command;

use narx_calibration::tables::{ort_trt_table, parse_trt_cache, trt_cache, Calibrator};

#[test]
fn onnxruntime_reads_our_trt_table() {
    let ranges: Vec<(String, f32)> = vec![
        ("/layers.0/attn/wqkv/MatMul_input".into(), 3.25),
        ("/layers.11/ffn/w2/MatMul_input".into(), 17.5),
        ("/head_right/output/MatMul_input".into(), 0.0078125),
    ];
    let temp = tempfile::tempdir().unwrap();
    let path = temp.path().join("calibration.flatbuffers");
    std::fs::write(&path, ort_trt_table(&ranges)).unwrap();
    let script = r#"
import json, sys
from onnxruntime.quantization.CalTableFlatBuffers.TrtTable import TrtTable
buf = open(sys.argv[1], "rb").read()
table = TrtTable.GetRootAsTrtTable(buf, 0)
print(json.dumps({table.Dict(i).Key().decode(): table.Dict(i).Value().decode()
                  for i in range(table.DictLength())}))
"#;
    let output = Command::new("python3")
        .args(["-c", script, path.to_str().unwrap()])
        .output()
        .expect("python3 runs");
    assert!(
        output.status.success(),
        "ONNX Runtime's reader failed (the tests need the onnxruntime wheel: run them through \
         `bash .ci/run`):\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let read: std::collections::BTreeMap<String, String> =
        serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(read.len(), ranges.len());
    for (name, amax) in &ranges {
        let value: f32 = read[name].parse().unwrap();
        assert_eq!(value, *amax, "{name}");
    }

    // The native cache parses back to the same ranges.
    let (_, back) = parse_trt_cache(&trt_cache("8601", Calibrator::Entropy2, &ranges)).unwrap();
    for ((name, amax), (name2, amax2)) in ranges.iter().zip(&back) {
        assert_eq!(name, name2);
        assert!((amax - amax2).abs() <= amax * 1e-6);
    }
}
