//! The KServe v2 REST endpoints, each the gRPC call it stands for:
//!
//! | method and path | gRPC |
//! |---|---|
//! | `GET /v2` | ServerMetadata |
//! | `GET /v2/openapi.json` | (this surface as OpenAPI 3, docs/openapi.json) |
//! | `GET /v2/health/live`, `/v2/health/ready` | ServerLive, ServerReady (200 or 400, empty body) |
//! | `GET /v2/models/{m}[/versions/{v}]` | ModelMetadata |
//! | `GET …/ready` | ModelReady (200, or 400 with an error) |
//! | `GET …/config` | ModelConfig |
//! | `GET …/stats`, `GET /v2/models/stats` | ModelStatistics |
//! | `POST …/infer` | ModelInfer |
//! | `POST /v2/repository/index` | RepositoryIndex |
//! | `POST /v2/repository/models/{m}/load`, `…/unload` | RepositoryModelLoad, …Unload |

use std::collections::HashMap;

use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::Full;
use infermesh_proto as pb;
use tonic::Status;

use super::{
    body,
    call::{call, call_with_metadata},
    infer, meta,
    status::{self, json},
    Door, Response,
};

macro_rules! rpc {
    ($name:literal) => {
        concat!("/inference.GRPCInferenceService/", $name)
    };
}

/// The REST surface as an OpenAPI 3 document (served at `/v2/openapi.json`).
pub const OPENAPI: &str = include_str!("../../../../docs/openapi.json");

pub async fn handle(door: &Door, req: http::Request<hyper::body::Incoming>) -> Response {
    let (mut parts, body) = req.into_parts();
    if let Err(status) = deadline(&parts.headers).and_then(|()| door.authenticate(&mut parts)) {
        return status::error(&status);
    }
    match route(door, &parts, body).await {
        Ok(resp) => resp,
        Err(status) => status::error(&status),
    }
}

/// The optional deadline header, `grpc-timeout` as gRPC writes it (`500m`, `2S`): passed
/// on to the call when well formed, refused when not (gRPC ignores a bad one; here the
/// client hears why).
fn deadline(headers: &http::HeaderMap) -> Result<(), Status> {
    let Some(v) = headers.get("grpc-timeout") else {
        return Ok(());
    };
    match v.to_str().ok().and_then(crate::deadline::parse_grpc_timeout) {
        Some(_) => Ok(()),
        None => Err(Status::invalid_argument(format!(
            "grpc-timeout: expected 1 to 8 digits and a unit (H, M, S, m, u, n), e.g. 500m, found {v:?}"
        ))),
    }
}

async fn route(
    door: &Door,
    parts: &http::request::Parts,
    body: hyper::body::Incoming,
) -> Result<Response, Status> {
    let segments: Vec<String> = parts
        .uri
        .path()
        .trim_matches('/')
        .split('/')
        .map(percent_decoded)
        .collect::<Result<_, _>>()?;
    let segs: Vec<&str> = segments.iter().map(String::as_str).collect();
    let m = &parts.method;
    match (segs.as_slice(), m) {
        (["v2"], &Method::GET) => {
            let r: pb::ServerMetadataResponse = call(
                &door.stack,
                rpc!("ServerMetadata"),
                &pb::ServerMetadataRequest {},
                parts,
            )
            .await?;
            ok_json(meta::server_metadata(&r))
        }
        (["v2", "openapi.json"], &Method::GET) => {
            Ok(json(StatusCode::OK, OPENAPI.as_bytes().to_vec()))
        }
        // Probes send no credentials: the server's liveness and readiness are
        // grpc.health.v1's "liveness" and "" (open to all, as on the gRPC and health
        // ports), not ServerLive/ServerReady, which need a credential under auth.
        (["v2", "health", which @ ("live" | "ready")], &Method::GET) => {
            let service = match *which {
                "live" => crate::lifecycle::LIVENESS,
                _ => "",
            };
            let r: tonic_health::pb::HealthCheckResponse = call(
                &door.stack,
                "/grpc.health.v1.Health/Check",
                &tonic_health::pb::HealthCheckRequest {
                    service: service.into(),
                },
                parts,
            )
            .await?;
            Ok(empty(
                r.status() == tonic_health::pb::health_check_response::ServingStatus::Serving,
            ))
        }
        (["v2", "models", "stats"], &Method::GET) => stats(door, parts, "", "").await,
        (["v2", "repository", "index"], &Method::POST) => {
            let read = body::read(body, &door.admission.small).await?;
            let asked = match read.bytes.is_empty() {
                true => IndexBody::default(),
                false => object::<IndexBody>(&read.bytes)?,
            };
            let req = pb::RepositoryIndexRequest {
                repository_name: asked.repository_name.unwrap_or_default(),
                ready: asked.ready.unwrap_or(false),
            };
            let (r, metadata): (pb::RepositoryIndexResponse, _) =
                call_with_metadata(&door.stack, rpc!("RepositoryIndex"), &req, parts).await?;
            // A gateway's workers and their states, as on gRPC.
            let mut resp = ok_json(meta::index(&r))?;
            for v in metadata.get_all("infermesh-worker") {
                resp.headers_mut().append("infermesh-worker", v.clone());
            }
            Ok(resp)
        }
        (["v2", "repository", "models", model, action @ ("load" | "unload")], &Method::POST) => {
            let read = body::read(body, &door.admission.small).await?;
            let parameters = match read.bytes.is_empty() {
                true => HashMap::new(),
                false => repository_parameters(object::<LoadBody>(&read.bytes)?.parameters)?,
            };
            if *action == "load" {
                let req = pb::RepositoryModelLoadRequest {
                    repository_name: String::new(),
                    model_name: model.to_string(),
                    parameters,
                };
                let _: pb::RepositoryModelLoadResponse =
                    call(&door.stack, rpc!("RepositoryModelLoad"), &req, parts).await?;
            } else {
                let req = pb::RepositoryModelUnloadRequest {
                    repository_name: String::new(),
                    model_name: model.to_string(),
                    parameters,
                };
                let _: pb::RepositoryModelUnloadResponse =
                    call(&door.stack, rpc!("RepositoryModelUnload"), &req, parts).await?;
            }
            Ok(json(StatusCode::OK, Vec::new()))
        }
        (["v2", "models", rest @ ..], _) if !rest.is_empty() => {
            let (model, version, action) = match rest {
                [m] => (*m, "", None),
                [m, "versions", v] => (*m, *v, None),
                [m, a] => (*m, "", Some(*a)),
                [m, "versions", v, a] => (*m, *v, Some(*a)),
                _ => return Err(not_found(parts)),
            };
            model_route(door, parts, body, model, version, action).await
        }
        (["v2", ..], _) if known(&segs) => Err(Status::unimplemented(format!(
            "{} is not served for {} (see docs/http.md)",
            m,
            parts.uri.path()
        ))),
        _ => Err(not_found(parts)),
    }
}

async fn model_route(
    door: &Door,
    parts: &http::request::Parts,
    body: hyper::body::Incoming,
    model: &str,
    version: &str,
    action: Option<&str>,
) -> Result<Response, Status> {
    let (name, version) = (model.to_string(), version.to_string());
    match (action, &parts.method) {
        (None, &Method::GET) => {
            let req = pb::ModelMetadataRequest { name, version };
            let r: pb::ModelMetadataResponse =
                call(&door.stack, rpc!("ModelMetadata"), &req, parts).await?;
            ok_json(meta::model_metadata(&r))
        }
        (Some("ready"), &Method::GET) => {
            let req = pb::ModelReadyRequest { name, version };
            let r: pb::ModelReadyResponse =
                call(&door.stack, rpc!("ModelReady"), &req, parts).await?;
            Ok(match r.ready {
                true => empty(true),
                false => json(
                    StatusCode::BAD_REQUEST,
                    br#"{"error":"Model version not ready"}"#.to_vec(),
                ),
            })
        }
        (Some("config"), &Method::GET) => {
            let req = pb::ModelConfigRequest { name, version };
            let r: pb::ModelConfigResponse =
                call(&door.stack, rpc!("ModelConfig"), &req, parts).await?;
            let config = r.config.unwrap_or_default();
            Ok(json(
                StatusCode::OK,
                meta::proto_json(&config, "inference.ModelConfig").map_err(Status::internal)?,
            ))
        }
        (Some("stats"), &Method::GET) => stats(door, parts, model, &version).await,
        (Some("infer"), &Method::POST) => infer_route(door, parts, body, model, &version).await,
        (Some("ready" | "config" | "stats" | "infer") | None, _) => Err(Status::unimplemented(
            format!("{} is not served for {}", parts.method, parts.uri.path()),
        )),
        _ => Err(not_found(parts)),
    }
}

async fn stats(
    door: &Door,
    parts: &http::request::Parts,
    model: &str,
    version: &str,
) -> Result<Response, Status> {
    let req = pb::ModelStatisticsRequest {
        name: model.to_string(),
        version: version.to_string(),
    };
    let r: pb::ModelStatisticsResponse =
        call(&door.stack, rpc!("ModelStatistics"), &req, parts).await?;
    Ok(json(
        StatusCode::OK,
        meta::proto_json(&r, "inference.ModelStatisticsResponse").map_err(Status::internal)?,
    ))
}

/// Headers of the binary tensor data extension.
pub const HEADER_LENGTH: &str = "inference-header-content-length";

async fn infer_route(
    door: &Door,
    parts: &http::request::Parts,
    body: hyper::body::Incoming,
    model: &str,
    version: &str,
) -> Result<Response, Status> {
    let encoding = body::Encoding::of(&parts.headers)?;
    let header_len = match parts.headers.get(HEADER_LENGTH) {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<usize>().ok())
                .ok_or_else(|| {
                    Status::invalid_argument(format!(
                        "Inference-Header-Content-Length: expected a byte count, found {v:?}"
                    ))
                })?,
        ),
    };
    // The caller's share when the request was authenticated up front.
    let limits = door
        .admission
        .inference_for(parts.extensions.get::<crate::auth::Caller>());
    let read = body::read(body, &limits).await?;
    let read = body::inflate(read, encoding, &limits)?;
    let parsed =
        infer::parse(&read.bytes, header_len, model, version).map_err(Status::invalid_argument)?;
    // The gRPC path counts the request again as it takes it.
    drop(read.permit);
    let resp: pb::ModelInferResponse =
        call(&door.stack, rpc!("ModelInfer"), &parsed.request, parts).await?;
    let answer = infer::answer(&resp, &parsed.binary).map_err(Status::internal)?;
    // Compressed when the client takes it; Inference-Header-Content-Length stays the
    // JSON's uncompressed length, as Triton's clients read it.
    let gzipped = body::accepts(&parts.headers, "gzip");
    let bytes = match gzipped {
        true => body::gzip(&answer.body),
        false => answer.body,
    };
    let mut out = http::Response::new(Full::new(Bytes::from(bytes)));
    let headers = out.headers_mut();
    if gzipped {
        headers.insert(
            http::header::CONTENT_ENCODING,
            http::HeaderValue::from_static("gzip"),
        );
    }
    match answer.header_len {
        Some(n) => {
            headers.insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/octet-stream"),
            );
            headers.insert(HEADER_LENGTH, http::HeaderValue::from(n));
        }
        None => {
            headers.insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
        }
    }
    Ok(out)
}

#[derive(Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct IndexBody {
    #[serde(default)]
    ready: Option<bool>,
    #[serde(default)]
    repository_name: Option<String>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct LoadBody {
    #[serde(default)]
    parameters: HashMap<String, serde_json::Value>,
}

fn object<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, Status> {
    serde_json::from_slice(bytes)
        .map_err(|e| Status::invalid_argument(format!("the request's JSON: {e}")))
}

fn repository_parameters(
    json: HashMap<String, serde_json::Value>,
) -> Result<HashMap<String, pb::ModelRepositoryParameter>, Status> {
    use pb::model_repository_parameter::ParameterChoice as P;
    json.into_iter()
        .map(|(k, v)| {
            let choice = match v {
                serde_json::Value::Bool(b) => P::BoolParam(b),
                serde_json::Value::String(s) => P::StringParam(s),
                serde_json::Value::Number(n) if n.is_i64() => {
                    P::Int64Param(n.as_i64().expect("checked"))
                }
                other => {
                    return Err(Status::invalid_argument(format!(
                        "parameters: '{}': expected a bool, integer or string, found {other}",
                        crate::text::clip(&k)
                    )))
                }
            };
            Ok((
                k,
                pb::ModelRepositoryParameter {
                    parameter_choice: Some(choice),
                },
            ))
        })
        .collect()
}

/// 200 with an empty body, or 400 (what health and readiness answer).
fn empty(yes: bool) -> Response {
    let mut resp = http::Response::new(Full::new(Bytes::new()));
    if !yes {
        *resp.status_mut() = StatusCode::BAD_REQUEST;
    }
    resp
}

fn ok_json(v: serde_json::Value) -> Result<Response, Status> {
    Ok(json(StatusCode::OK, v.to_string().into_bytes()))
}

fn known(segs: &[&str]) -> bool {
    matches!(
        segs,
        ["v2", "health", "live" | "ready"] | ["v2", "repository", ..]
    )
}

fn not_found(parts: &http::request::Parts) -> Status {
    Status::not_found(format!(
        "no such endpoint: {} {} (see docs/http.md)",
        parts.method,
        crate::text::clip(parts.uri.path())
    ))
}

/// A path segment with its %XX escapes decoded.
fn percent_decoded(s: &str) -> Result<String, Status> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| Status::invalid_argument("the path has a malformed %-escape"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| Status::invalid_argument("the path is not UTF-8"))
}
