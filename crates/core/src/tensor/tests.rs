use super::*;

fn input(name: &str, dt: &str, shape: &[i64]) -> InferInputTensor {
    InferInputTensor {
        name: name.into(),
        datatype: dt.into(),
        shape: shape.to_vec(),
        ..Default::default()
    }
}

fn strings(items: &[&[u8]]) -> Bytes {
    let t = Tensor {
        name: "s".into(),
        datatype: DataType::Bytes,
        shape: vec![items.len() as i64],
        data: TensorData::Strings(items.iter().map(|s| Bytes::copy_from_slice(s)).collect()),
    };
    t.to_raw()
}

#[test]
fn raw_fixed_size_must_match_shape() {
    let x = input("x", "FP32", &[2, 2]);
    let ok = Tensor::decode(&x, Some(&Bytes::from(vec![0u8; 16]))).unwrap();
    assert_eq!(ok.element_count(), 4);
    let err = Tensor::decode(&x, Some(&Bytes::from(vec![0u8; 12]))).unwrap_err();
    assert!(err.to_string().contains("'x'") && err.to_string().contains("12 bytes"));
    assert!(err.to_string().contains("expected 16"), "{err}");
}

#[test]
fn raw_strings_round_trip_and_reject_bad_prefixes() {
    let raw = strings(&[b"ab", b"", b"xyz"]);
    let t = Tensor::decode(&input("s", "BYTES", &[3]), Some(&raw)).unwrap();
    assert_eq!(t.to_raw(), raw);

    let truncated = raw.slice(..raw.len() - 5);
    let err = Tensor::decode(&input("s", "BYTES", &[3]), Some(&truncated)).unwrap_err();
    assert!(err.to_string().contains("element 2"), "{err}");

    let mut overlong = raw.to_vec();
    overlong[0] = 200;
    let err = Tensor::decode(&input("s", "BYTES", &[3]), Some(&overlong.into())).unwrap_err();
    assert!(err.to_string().contains("declares 200 bytes"), "{err}");

    let err = Tensor::decode(&input("s", "BYTES", &[2]), Some(&raw)).unwrap_err();
    assert!(err.to_string().contains("left over"), "{err}");
}

#[test]
fn typed_contents_convert_to_little_endian() {
    let mut x = input("k", "INT16", &[2]);
    x.contents = Some(InferTensorContents {
        int_contents: vec![-2, 300],
        ..Default::default()
    });
    let t = Tensor::decode(&x, None).unwrap();
    assert_eq!(t.to_raw().as_ref(), &[0xfe, 0xff, 0x2c, 0x01]);

    x.contents.as_mut().unwrap().int_contents = vec![1, 40000];
    let err = Tensor::decode(&x, None).unwrap_err();
    assert!(err.to_string().contains("out of range for INT16"), "{err}");
}

#[test]
fn typed_count_and_mixing_are_rejected() {
    let mut x = input("x", "FP32", &[3]);
    x.contents = Some(InferTensorContents {
        fp32_contents: vec![1.0, 2.0],
        ..Default::default()
    });
    let err = Tensor::decode(&x, None).unwrap_err();
    assert!(err
        .to_string()
        .contains("fp32_contents has 2 elements; expected 3"));
    let err = Tensor::decode(&x, Some(&Bytes::from(vec![0u8; 12]))).unwrap_err();
    assert!(err
        .to_string()
        .contains("both raw_input_contents and typed contents"));
}

#[test]
fn request_level_checks() {
    let a = input("a", "UINT8", &[1]);
    let one = Bytes::from_static(&[1]);
    let err = decode_inputs(&[a.clone(), a.clone()], &[one.clone(), one]).unwrap_err();
    assert!(err.to_string().contains("more than once"));
    let err = decode_inputs(&[a], &[Bytes::from_static(&[1]), Bytes::new()]).unwrap_err();
    assert!(err.to_string().contains("raw_input_contents has 2 entries"));
    let err = Tensor::decode(&input("q", "FLOAT", &[1]), None).unwrap_err();
    assert!(err.to_string().contains("unknown datatype 'FLOAT'"));
}

#[test]
fn a_long_input_name_is_kept_whole_and_cut_only_in_messages() {
    let name = "n".repeat(100);
    let t = Tensor::decode(
        &input(&name, "UINT8", &[1]),
        Some(&Bytes::from_static(b"\x01")),
    )
    .unwrap();
    assert_eq!(t.name, name);
    let err = Tensor::decode(
        &input(&name, "UINT8", &[2]),
        Some(&Bytes::from_static(b"\x01")),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("…(100 bytes)"), "{err}");
}
