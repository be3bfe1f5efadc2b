//! `infermesh routes`: a gateway's live routing policy (infermesh.admin.v1.Routes/Get).

use infermesh_proto::admin::{
    routes_client::RoutesClient, GetRoutesRequest, GetRoutesResponse, ModelRoute,
};

#[derive(clap::Args)]
pub struct RoutesArgs {
    /// Gateway address, e.g. localhost:8001.
    #[arg(long, env = "INFERMESH_URL", default_value = "localhost:8001")]
    pub url: String,
    #[command(flatten)]
    pub conn: crate::conn::ConnArgs,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Check a routing file offline, as the gateway reads it (exits non-zero naming the
    /// line and field of the first mistake), instead of asking a gateway.
    #[arg(long, value_name = "FILE")]
    pub check: Option<std::path::PathBuf>,
}

pub async fn run(args: RoutesArgs) -> anyhow::Result<()> {
    if let Some(path) = &args.check {
        return check(path);
    }
    let mut client = RoutesClient::new(crate::conn::connect(&args.url, &args.conn).await?);
    let answer = client
        .get(GetRoutesRequest::default())
        .await
        .map_err(|s| anyhow::anyhow!("routes: {}: {}", s.code(), s.message()))?
        .into_inner();
    if args.json {
        println!("{}", json(&answer));
    } else {
        print!("{}", text(&answer));
    }
    Ok(())
}

fn check(path: &std::path::Path) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let file = infermesh_gateway::routes::file::parse(&text)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    println!("{}: ok, {} model(s)", path.display(), file.models.len());
    for (model, entry) in &file.models {
        let split = entry.split.as_ref().map_or_else(
            || "newest ready version".to_string(),
            |s| {
                format!(
                    "split {s:?}{}",
                    if entry.fallback { " with fallback" } else { "" }
                )
            },
        );
        let hedge = entry
            .hedge
            .map_or_else(|| "no hedging".to_string(), |h| format!("hedge {h}"));
        let shadow = entry.shadow.as_ref().map_or_else(String::new, |s| {
            format!(
                "; shadow {}% to {}",
                f64::from(s.per_10k) / 100.0,
                s.label(model)
            )
        });
        let guard = entry
            .guard
            .as_ref()
            .map_or_else(String::new, |g| format!("; guard on version {}", g.version));
        println!("  {model}: {split}; {hedge}{shadow}{guard}");
    }
    Ok(())
}

fn rate(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

fn json(r: &GetRoutesResponse) -> serde_json::Value {
    let models: Vec<serde_json::Value> = r.models.iter().map(model_json).collect();
    serde_json::json!({"file": r.file, "reloads": r.reloads, "models": models})
}

fn model_json(m: &ModelRoute) -> serde_json::Value {
    let split: Vec<serde_json::Value> = m
        .split
        .iter()
        .map(|v| {
            serde_json::json!({
                "version": v.version, "weight": v.weight, "weight_in_force": v.weight_in_force,
                "skipped": v.skipped, "routed": v.routed, "unavailable": v.unavailable,
            })
        })
        .collect();
    let mut out = serde_json::json!({"model": m.model, "split": split, "fallback": m.fallback, "hedge": m.hedge});
    if let Some(s) = &m.shadow {
        out["shadow"] = crate::routes_rules::shadow_json(s);
    }
    if let Some(g) = &m.guard {
        out["guard"] = crate::routes_rules::guard_json(g);
    }
    if let Some(h) = &m.hedging {
        out["hedging"] = serde_json::json!({
            "delay_ms": h.delay_ms, "waiting": h.waiting, "requests": h.requests, "hedged": h.hedged,
            "won": h.won, "hedge_rate": rate(h.hedged, h.requests), "win_rate": rate(h.won, h.hedged),
        });
    }
    out
}

fn text(r: &GetRoutesResponse) -> String {
    let mut out = String::new();
    if r.file.is_empty() {
        out.push_str(
            "no routing file (--routes): every model goes to its newest ready version, unhedged\n",
        );
        return out;
    }
    out.push_str(&format!(
        "routing file {} (reloaded {} times)\n",
        r.file, r.reloads
    ));
    if r.models.is_empty() {
        out.push_str("no models in it\n");
    }
    for m in &r.models {
        out.push_str(&format!("\n{}\n", m.model));
        if !m.split.is_empty() {
            let fallback = if m.fallback { "yes" } else { "no" };
            out.push_str(&format!("  split (fallback: {fallback})\n"));
            for v in &m.split {
                out.push_str(&format!(
                    "    version {:<4} weight {:<5} in force {:<5} routed {:<8} unavailable {}",
                    v.version, v.weight, v.weight_in_force, v.routed, v.unavailable
                ));
                if !v.skipped.is_empty() {
                    out.push_str(&format!("  ({})", v.skipped));
                }
                out.push('\n');
            }
        }
        if let Some(h) = &m.hedging {
            let delay = if h.waiting.is_empty() {
                format!("delay {:.2} ms", h.delay_ms)
            } else {
                format!("no hedges yet: {}", h.waiting)
            };
            out.push_str(&format!(
                "  hedge {}: {delay}; {} requests, {} hedged ({:.1}%), {} won ({:.1}% of hedges)\n",
                m.hedge,
                h.requests,
                h.hedged,
                100.0 * rate(h.hedged, h.requests),
                h.won,
                100.0 * rate(h.won, h.hedged)
            ));
        }
        if let Some(s) = &m.shadow {
            out.push_str(&crate::routes_rules::shadow_text(s));
        }
        if let Some(g) = &m.guard {
            out.push_str(&crate::routes_rules::guard_text(g));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use infermesh_proto::admin::{Hedging, VersionShare};

    use super::*;

    #[test]
    fn text_and_json_show_weights_skips_and_rates() {
        let r = GetRoutesResponse {
            file: "/etc/routes.yaml".into(),
            reloads: 2,
            models: vec![ModelRoute {
                model: "mlp".into(),
                split: vec![
                    VersionShare {
                        version: 1,
                        weight: 9,
                        weight_in_force: 9,
                        routed: 90,
                        ..Default::default()
                    },
                    VersionShare {
                        version: 2,
                        weight: 1,
                        weight_in_force: 0,
                        skipped: "no ready worker".into(),
                        ..Default::default()
                    },
                ],
                fallback: true,
                hedge: "after: p95".into(),
                hedging: Some(Hedging {
                    delay_ms: 3.0,
                    requests: 100,
                    hedged: 10,
                    won: 5,
                    ..Default::default()
                }),
                shadow: Some(infermesh_proto::admin::Shadow {
                    target: "mlp:2".into(),
                    percent: 25.0,
                    agree: 997,
                    disagree: 3,
                    agreement: 0.997,
                    worst_abs_error: 0.5,
                    ..Default::default()
                }),
                guard: Some(infermesh_proto::admin::Guard {
                    version: 2,
                    max_error_rate: Some(0.02),
                    window_s: 30,
                    min_requests: 200,
                    requests: 12,
                    ..Default::default()
                }),
            }],
        };
        let t = text(&r);
        assert!(t.contains("version 2    weight 1     in force 0"), "{t}");
        assert!(
            t.contains("(no ready worker)")
                && t.contains("10 hedged (10.0%), 5 won (50.0% of hedges)"),
            "{t}"
        );
        assert!(
            t.contains("agreement 99.70% (997 of 1000), worst abs error 5.000e-1")
                && t.contains("guard on version 2 (max_error_rate 0.02, window 30s, min 200 requests): not armed (12 of 200 requests)"),
            "{t}"
        );
        let j = json(&r);
        assert_eq!(j["models"][0]["hedging"]["win_rate"], 0.5);
        assert_eq!(j["models"][0]["shadow"]["disagree"], 3);
        assert_eq!(j["models"][0]["guard"]["armed"], false);
        assert_eq!(j["models"][0]["split"][1]["weight_in_force"], 0);
    }
}
