use bytes::Bytes;
use infermesh_proto as pb;

use super::{key, Answer, CacheMetrics, Output, ResponseCache};

fn request(data: &[u8]) -> pb::ModelInferRequest {
    pb::ModelInferRequest {
        model_name: "m".into(),
        inputs: vec![pb::model_infer_request::InferInputTensor {
            name: "x".into(),
            datatype: "UINT8".into(),
            shape: vec![1, data.len() as i64],
            ..Default::default()
        }],
        raw_input_contents: vec![Bytes::copy_from_slice(data)],
        ..Default::default()
    }
}

fn key_of(req: &pb::ModelInferRequest) -> key::Key {
    let v = key::Version {
        name: "m",
        version: 1,
        generation: 7,
    };
    key::of(req, &v, key::Scope::of(None, req))
}

fn answer(n: usize) -> Answer {
    Answer {
        outputs: vec![Output {
            name: "y".into(),
            datatype: "UINT8".into(),
            shape: vec![1, n as i64],
            raw: Bytes::from(vec![1u8; n]),
        }],
    }
}

fn string(s: &str) -> pb::InferParameter {
    pb::InferParameter {
        parameter_choice: Some(pb::infer_parameter::ParameterChoice::StringParam(s.into())),
    }
}

#[test]
fn everything_that_decides_an_answer_is_in_the_key() {
    let base = request(&[1, 2, 3, 4]);
    let k = key_of(&base);
    assert_eq!(k, key_of(&base.clone()), "the same request, the same key");

    let mut neutral = base.clone();
    neutral.id = "another id".into();
    neutral.parameters.insert("timeout".into(), string("5"));
    neutral
        .parameters
        .insert("traceparent".into(), string("00-a-b-01"));
    assert_eq!(
        k,
        key_of(&neutral),
        "id, deadline and tracing change nothing"
    );

    let mut changed = Vec::new();
    changed.push(request(&[1, 2, 3, 5]));
    let mut shape = base.clone();
    shape.inputs[0].shape = vec![2, 2];
    changed.push(shape);
    let mut datatype = base.clone();
    datatype.inputs[0].datatype = "INT8".into();
    changed.push(datatype);
    let mut outputs = base.clone();
    outputs
        .outputs
        .push(pb::model_infer_request::InferRequestedOutputTensor {
            name: "y".into(),
            ..Default::default()
        });
    changed.push(outputs);
    let mut param = base.clone();
    param.parameters.insert("temperature".into(), string("0.5"));
    changed.push(param);
    let mut tenant = base.clone();
    tenant.parameters.insert(key::TENANT.into(), string("bob"));
    changed.push(tenant);
    let mut typed = base.clone();
    typed.raw_input_contents.clear();
    typed.inputs[0].contents = Some(pb::InferTensorContents {
        uint_contents: vec![1, 2, 3, 4],
        ..Default::default()
    });
    changed.push(typed);
    for (i, req) in changed.iter().enumerate() {
        assert_ne!(k.id, key_of(req).id, "change {i} keeps the key");
        assert_ne!(k.check, key_of(req).check, "change {i} keeps the check");
    }

    let v2 = key::Version {
        name: "m",
        version: 1,
        generation: 8,
    };
    assert_ne!(
        k,
        key::of(&base, &v2, key::Scope::of(None, &base)),
        "another load"
    );
    let alice = key::of(
        &base,
        &key::Version {
            name: "m",
            version: 1,
            generation: 7,
        },
        key::Scope::of(Some("alice"), &base),
    );
    assert_ne!(k, alice, "another caller");
}

#[test]
fn a_hit_needs_the_confirming_digest_too() {
    let cache = ResponseCache::new(1 << 20, CacheMetrics::default());
    let model = "m";
    let k = key_of(&request(&[1]));
    cache.put(&k, model, answer(4));
    assert!(cache.get(&k).is_some());
    let mut forged = k.clone();
    forged.check[0] ^= 1;
    assert!(cache.get(&forged).is_none(), "same id, another request");
}

#[test]
fn the_cache_stays_within_its_bytes_evicting_the_least_recently_used() {
    let limit = 64 << 10;
    let cache = ResponseCache::new(limit, CacheMetrics::default());
    let model = "m";
    let first = key_of(&request(&[0, 0]));
    cache.put(&first, model, answer(1000));
    for i in 0..1000u32 {
        let k = key_of(&request(&i.to_le_bytes()));
        cache.put(&k, model, answer(1000));
        // The first entry is used all along: never the least recently used.
        assert!(cache.get(&first).is_some(), "evicted at {i}");
        assert!(cache.used() <= limit);
    }
    assert!(cache.metrics.evictions.get() > 900);
    cache.put(&key_of(&request(&[9])), model, answer(limit));
    assert_eq!(cache.metrics.too_large.get(), 1, "larger than the cache");
    cache.clear_model("m");
    assert_eq!(cache.used(), 0);
    assert!(cache.get(&first).is_none());
}

#[test]
fn cache_config_takes_tritons_syntax_and_refuses_the_rest() {
    let parse =
        |s: &[&str]| super::parse_config(&s.iter().map(|s| s.to_string()).collect::<Vec<_>>());
    assert_eq!(parse(&[]), Ok(None));
    assert_eq!(parse(&["local,size=1048576"]), Ok(Some(1 << 20)));
    for (bad, says) in [
        (&["redis,host=x"][..], "\"redis\" is not available"),
        (&["local,size=lots"][..], "size must be a number"),
        (&["local,ttl=5"][..], "size=BYTES only"),
        (&["local"][..], "expected CACHE,KEY=VALUE"),
        (&["local,size=0"][..], "above 0"),
    ] {
        let e = parse(bad).unwrap_err();
        assert!(e.contains(says), "{bad:?}: {e}");
    }
}
