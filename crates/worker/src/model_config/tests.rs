use super::*;

const TRITON_STYLE: &str = r#"
name: "densenet"   # a comment with [brackets]
platform: "onnxruntime_onnx"
max_batch_size: 8
input [
  {
    name: "data_0"
    data_type: TYPE_FP32
    dims [ 3, 224, 224 ]
  }
]
output [ { name: "prob" data_type: TYPE_FP32 dims: [ 1000 ] label_filename: "a[b].txt" } ]
instance_group [ { count: 2 kind: KIND_GPU gpus: [ 0, 1 ] } ]
dynamic_batching {
  preferred_batch_size: [ 4, 8 ]
  max_queue_delay_microseconds: 100
  default_queue_policy { max_queue_size: 16 default_timeout_microseconds: 5000 allow_timeout_override: true }
}
version_policy: { latest { num_versions: 2 } }
model_transaction_policy { decoupled: false }
parameters { key: "delay_ms" value: { string_value: "5" } }
"#;

#[test]
fn parses_triton_style_config() {
    let c = parse(TRITON_STYLE).unwrap();
    assert_eq!(c.name, "densenet");
    assert_eq!(c.max_batch_size, 8);
    assert_eq!(c.input[0].dims, [3, 224, 224]);
    assert_eq!(c.output[0].label_filename, "a[b].txt");
    assert_eq!(c.instance_group[0].gpus, [0, 1]);
    let policy = batch_policy(&c).unwrap();
    assert_eq!(policy.preferred, [4, 8]);
    assert_eq!(policy.max_queue_delay, Duration::from_micros(100));
    assert_eq!(policy.default_timeout, Some(Duration::from_micros(5000)));
    assert_eq!(queue_capacity(&c, 99), 16);
    assert_eq!(c.parameters["delay_ms"].string_value, "5");
    let devices = instances(&c, DeviceRequest::Cpu).unwrap();
    assert_eq!(
        devices,
        [
            DeviceRequest::Gpu(0),
            DeviceRequest::Gpu(0),
            DeviceRequest::Gpu(1),
            DeviceRequest::Gpu(1)
        ]
    );
}

#[test]
fn unknown_fields_are_errors_that_name_them() {
    let err = parse("max_batch_sise: 8").unwrap_err();
    assert!(err.contains("max_batch_sise"), "{err}");
}

fn graph() -> GraphSpec {
    let io = |n: &str, dims: &[i64]| IoSpec {
        name: n.into(),
        datatype: DataType::F32,
        dims: dims.to_vec(),
    };
    GraphSpec {
        inputs: vec![io("x", &[-1, 4])],
        outputs: vec![io("y", &[-1, 2])],
    }
}

#[test]
fn complete_fills_from_the_graph_and_names_disagreements() {
    let c = complete(pb::ModelConfig::default(), "m", &graph(), false, 8).unwrap();
    assert_eq!(c.max_batch_size, 8);
    assert_eq!(c.input[0].dims, [4]);
    assert!(
        batch_policy(&c).is_some(),
        "auto-complete enables dynamic batching"
    );

    let bad =
        parse(r#"max_batch_size: 4 input [ { name: "x" data_type: TYPE_FP32 dims: [ 5 ] } ]"#)
            .unwrap();
    let err = complete(bad, "m", &graph(), true, 8)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("input[0] 'x'") && err.contains("[5]") && err.contains("[4]"),
        "{err}"
    );

    let bad = parse(r#"input [ { name: "x" data_type: TYPE_INT64 dims: [ -1, 4 ] } ]"#).unwrap();
    let err = complete(bad, "m", &graph(), true, 8)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("TYPE_INT64") && err.contains("TYPE_FP32"),
        "{err}"
    );

    let bad = parse(r#"name: "other""#).unwrap();
    assert!(complete(bad, "m", &graph(), true, 8)
        .unwrap_err()
        .to_string()
        .contains("'other'"));
}

#[test]
fn syntax_errors_name_line_and_column() {
    // Line 4 lacks the ',' or ']' closing the input list; the parser sees `output` instead.
    let text = "name: \"m\"\ninput [\n  { name: \"x\" data_type: TYPE_FP32 dims [ 1 ] }\noutput [ { name: \"y\" } ]\n";
    let err = parse(text).unwrap_err();
    assert!(err.starts_with("line 4, column 1: "), "{err}");
    // An unknown field, after a list whose colon was added: still the file's column.
    let err = parse("input [ ]\n  nmae: \"x\"\n").unwrap_err();
    assert!(err.starts_with("line 2, column 3: "), "{err}");
}
