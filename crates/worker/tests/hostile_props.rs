//! Property tests (fixed seeds) over everything a request's bytes reach before a model
//! runs: tensor decoding, validation, batch join/split, `grpc-timeout` and config.pbtxt
//! parsing. Arbitrary shapes, counts, byte lengths and strings never panic, either succeed
//! consistently or give the right code, and never allocate more than a small multiple of
//! the bytes that came: a counting global allocator measures each call's peak.

// A global allocator cannot be written without `unsafe`; it only forwards to `System`.
#![allow(unsafe_code)]

use std::{
    alloc::{GlobalAlloc, Layout, System},
    cell::Cell,
};

use bytes::Bytes;
use infermesh_core::{tensor::decode_inputs, DataType, Tensor, TensorData};
use infermesh_proto::{model_infer_request::InferInputTensor, InferTensorContents};
use infermesh_worker::{
    batch,
    engine::IoSpec,
    model::{validate, Signature},
    model_config,
};
use proptest::{prelude::*, test_runner::RngSeed};

/// Counts the bytes each thread holds, and the most it held since the last reset.
struct Counting;

thread_local! {
    static HELD: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn note(delta: isize) {
    let _ = HELD.try_with(|h| {
        let now = h.get() + delta;
        h.set(now);
        let _ = PEAK.try_with(|p| p.set(p.get().max(now)));
    });
}

// SAFETY: every call is passed to the system allocator unchanged; the counters are
// const-initialised thread-locals, which never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size() as isize);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        note(-(layout.size() as isize));
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size as isize - layout.size() as isize);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Runs `f` and returns its result with the most it allocated on top of what was held.
fn peak<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = HELD.with(Cell::get);
    PEAK.with(|p| p.set(base));
    let out = f();
    let top = PEAK.with(Cell::get);
    (out, (top - base).max(0) as usize)
}

/// What a call may allocate: a small multiple of the request's bytes (typed contents
/// widen up to 8× and each BYTES element costs a `Bytes` handle) plus room for messages.
fn budget(input_bytes: usize) -> usize {
    16 * input_bytes + 64 * 1024
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 512,
        rng_seed: RngSeed::Fixed(20261129),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn dim() -> impl Strategy<Value = i64> {
    prop_oneof![
        0i64..5,
        Just(-1),
        Just(i64::MIN),
        Just(i64::MAX),
        Just(1 << 31),
        Just(1 << 40),
        Just(1 << 62),
        Just(1_000_000_000),
        any::<i64>(),
    ]
}

fn datatype() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(DataType::ALL.map(DataType::as_str).to_vec()).prop_map(String::from),
        "[A-Z0-9]{0,6}",
    ]
}

fn contents() -> impl Strategy<Value = Option<InferTensorContents>> {
    prop_oneof![
        Just(None),
        (0usize..8, prop::collection::vec(any::<i64>(), 0..40)).prop_map(|(kind, v)| {
            let mut c = InferTensorContents::default();
            match kind {
                0 => c.bool_contents = v.iter().map(|x| x & 1 == 1).collect(),
                1 => c.int_contents = v.iter().map(|&x| x as i32).collect(),
                2 => c.int64_contents = v,
                3 => c.uint_contents = v.iter().map(|&x| x as u32).collect(),
                4 => c.uint64_contents = v.iter().map(|&x| x as u64).collect(),
                5 => c.fp32_contents = v.iter().map(|&x| x as f32).collect(),
                6 => c.fp64_contents = v.iter().map(|&x| x as f64).collect(),
                _ => {
                    c.bytes_contents = v
                        .iter()
                        .map(|x| Bytes::from(x.to_le_bytes()[..(*x as usize % 9)].to_vec()))
                        .collect()
                }
            }
            Some(c)
        }),
    ]
}

/// Raw bytes: random, or BYTES elements with hostile length prefixes.
fn raw() -> impl Strategy<Value = Bytes> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..256).prop_map(Bytes::from),
        prop::collection::vec(
            (any::<u32>(), prop::collection::vec(any::<u8>(), 0..8)),
            0..8
        )
        .prop_map(|items| {
            let mut out = Vec::new();
            for (len, body) in items {
                out.extend_from_slice(&len.to_le_bytes());
                out.extend_from_slice(&body);
            }
            Bytes::from(out)
        }),
    ]
}

fn input() -> impl Strategy<Value = InferInputTensor> {
    (
        prop_oneof![Just("x".to_string()), Just("y".to_string()), ".{0,80}"],
        datatype(),
        prop::collection::vec(dim(), 0..6),
        contents(),
    )
        .prop_map(|(name, datatype, shape, contents)| InferInputTensor {
            name,
            datatype,
            shape,
            contents,
            ..Default::default()
        })
}

fn wire_bytes(inputs: &[InferInputTensor], raw: &[Bytes]) -> usize {
    use prost::Message;
    inputs.iter().map(|i| i.encoded_len()).sum::<usize>()
        + raw.iter().map(Bytes::len).sum::<usize>()
}

fn signature() -> Signature {
    let io = |name: &str, datatype, dims: Vec<i64>| IoSpec {
        name: name.into(),
        datatype,
        dims,
    };
    Signature {
        max_batch_size: 8,
        inputs: vec![
            io("x", DataType::F32, vec![-1]),
            io("y", DataType::Bytes, vec![-1, 2]),
        ],
        outputs: vec![io("out", DataType::F32, vec![-1])],
        text_strings: true,
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn decoding_is_bounded_by_the_bytes_that_came(
        inputs in prop::collection::vec(input(), 0..4),
        raw in prop::collection::vec(raw(), 0..4),
    ) {
        let bytes = wire_bytes(&inputs, &raw);
        let (result, used) = peak(|| decode_inputs(&inputs, &raw));
        prop_assert!(used <= budget(bytes), "{used} bytes allocated for {bytes} bytes of request");
        match result {
            Ok(tensors) => {
                for (t, i) in tensors.iter().zip(&inputs) {
                    let count: u128 = t.shape.iter().map(|&d| d as u128).product();
                    prop_assert_eq!(count, t.element_count() as u128);
                    if let (TensorData::Fixed(b), Some(size)) = (&t.data, t.datatype.size()) {
                        prop_assert_eq!(b.len() as u128, count * size as u128);
                    }
                    prop_assert_eq!(&t.shape, &i.shape);
                }
            }
            Err(e) => {
                prop_assert_eq!(e.code(), tonic::Code::InvalidArgument);
                prop_assert!(tonic::Status::from(e).message().len() <= 4096);
            }
        }
    }

    #[test]
    fn validation_answers_every_request_with_a_bounded_message(
        inputs in prop::collection::vec(input(), 0..4),
        raw in prop::collection::vec(raw(), 0..4),
    ) {
        let sig = signature();
        let bytes = wire_bytes(&inputs, &raw);
        let (result, used) = peak(|| {
            let rows = validate::inputs("m", &sig, &inputs)?;
            let tensors = decode_inputs(&inputs, &raw)?;
            validate::strings(&sig, &tensors)?;
            Ok::<_, infermesh_core::Error>((rows, tensors))
        });
        prop_assert!(used <= budget(bytes), "{used} bytes allocated for {bytes} bytes of request");
        match result {
            Ok((rows, tensors)) => {
                prop_assert!((1..=8).contains(&rows));
                for t in &tensors {
                    prop_assert_eq!(t.shape[0], rows as i64);
                    if let TensorData::Strings(items) = &t.data {
                        prop_assert!(items.iter().all(|s| std::str::from_utf8(s).is_ok() && !s.contains(&0)));
                    }
                }
            }
            Err(e) => {
                prop_assert_eq!(e.code(), tonic::Code::InvalidArgument);
                prop_assert!(tonic::Status::from(e).message().len() <= 4096);
            }
        }
    }

    #[test]
    fn a_batch_splits_back_into_its_requests(
        rows in prop::collection::vec(1usize..5, 1..6),
        width in 0usize..4,
        strings in any::<bool>(),
    ) {
        let requests: Vec<Vec<Tensor>> = rows.iter().enumerate().map(|(r, &n)| {
            let count = n * width;
            let data = if strings {
                TensorData::Strings((0..count).map(|i| Bytes::from(format!("{r}-{i}"))).collect())
            } else {
                TensorData::Fixed(Bytes::from((0..count * 4).map(|i| (r * 31 + i) as u8).collect::<Vec<_>>()))
            };
            vec![Tensor {
                name: "x".into(),
                datatype: if strings { DataType::Bytes } else { DataType::F32 },
                shape: vec![n as i64, width as i64],
                data,
            }]
        }).collect();
        let refs: Vec<&[Tensor]> = requests.iter().map(Vec::as_slice).collect();
        let joined = batch::concat(&refs);
        let parts = batch::split(joined, &rows).expect("whole rows");
        prop_assert_eq!(parts, requests);
    }

    #[test]
    fn split_refuses_outputs_that_are_not_whole_rows(
        rows in prop::collection::vec(0usize..5, 1..6),
        shape in prop::collection::vec(0i64..6, 0..4),
        len in 0usize..64,
    ) {
        let out = Tensor {
            name: "o".into(),
            datatype: DataType::F32,
            shape,
            data: TensorData::Fixed(Bytes::from(vec![0u8; len])),
        };
        // Never panics: either whole rows for every request, or an error.
        if let Ok(parts) = batch::split(vec![out], &rows) {
            prop_assert_eq!(parts.len(), rows.len());
        }
    }

    #[test]
    fn grpc_timeout_parsing_never_panics(v in ".{0,24}", digits in "[0-9]{1,24}", unit in "[HMSmun]") {
        let _ = infermesh_core::deadline::parse_grpc_timeout(&v);
        let long = format!("{digits}{unit}");
        let parsed = infermesh_core::deadline::parse_grpc_timeout(&long);
        prop_assert_eq!(parsed.is_some(), digits.len() <= 8);
        let mut md = tonic::metadata::MetadataMap::new();
        if let Ok(value) = long.parse() {
            md.insert("grpc-timeout", value);
        }
        let _ = infermesh_core::deadline::deadline(&md, Some(i64::MAX), std::time::Instant::now());
    }

    #[test]
    fn config_pbtxt_parsing_never_panics(text in ".{0,200}", cut in 0usize..400, junk in ".{0,20}") {
        let _ = model_config::parse(&text);
        let valid = r#"backend: "identity" max_batch_size: 8
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ -1, 4 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ -1, 4 ] } ]
parameters { key: "delay_ms" value: { string_value: "1" } }"#;
        let mut at = cut.min(valid.len());
        while !valid.is_char_boundary(at) { at -= 1; }
        let mutated = format!("{}{junk}{}", &valid[..at], &valid[at..]);
        let (_, used) = peak(|| model_config::parse(&mutated));
        prop_assert!(used <= budget(mutated.len()) * 4);
    }
}

#[test]
fn the_query_of_death_allocates_nothing_like_its_claim() {
    // 1e9 BYTES elements declared, 5 bytes sent: once a 32 GB allocation and an abort.
    let input = InferInputTensor {
        name: "INPUT0".into(),
        datatype: "BYTES".into(),
        shape: vec![1_000_000_000],
        ..Default::default()
    };
    let raw = [Bytes::from_static(b"\x01\0\0\0a")];
    let (result, used) = peak(|| decode_inputs(std::slice::from_ref(&input), &raw));
    assert_eq!(result.unwrap_err().code(), tonic::Code::InvalidArgument);
    assert!(used < 64 * 1024, "{used}");
}
