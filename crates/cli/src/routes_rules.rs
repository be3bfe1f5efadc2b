//! `infermesh routes`: the shadow and guard parts of a model's view.

use infermesh_proto::admin::{Guard, Shadow};

pub fn shadow_json(s: &Shadow) -> serde_json::Value {
    serde_json::json!({
        "target": s.target, "percent": s.percent, "atol": s.atol, "rtol": s.rtol,
        "agree": s.agree, "disagree": s.disagree, "error": s.error, "dropped": s.dropped,
        "agreement": s.agreement, "worst_abs_error": s.worst_abs_error,
        "argmax_changed": s.argmax_changed, "argmax_rows": s.argmax_rows,
        "last_error": s.last_error, "in_flight": s.in_flight,
    })
}

pub fn guard_json(g: &Guard) -> serde_json::Value {
    serde_json::json!({
        "version": g.version, "max_error_rate": g.max_error_rate, "min_agreement": g.min_agreement,
        "window_s": g.window_s, "min_requests": g.min_requests, "requests": g.requests,
        "errors": g.errors, "error_rate": rate(g.errors, g.requests), "comparisons": g.comparisons,
        "agreed": g.agreed, "agreement": (g.comparisons > 0).then(|| rate(g.agreed, g.comparisons)),
        "armed": g.armed, "tripped": g.tripped, "why": g.why,
    })
}

fn rate(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

pub fn shadow_text(s: &Shadow) -> String {
    let compared = s.agree + s.disagree;
    let mut out = format!(
        "  shadow {}% to {} (atol {}, rtol {}): ",
        s.percent, s.target, s.atol, s.rtol
    );
    if compared == 0 {
        out.push_str("no comparison yet");
    } else {
        out.push_str(&format!(
            "agreement {:.2}% ({} of {compared}), worst abs error {:.3e}",
            100.0 * s.agreement,
            s.agree,
            s.worst_abs_error
        ));
    }
    if s.argmax_rows > 0 {
        out.push_str(&format!(
            ", argmax changed {:.2}% ({} of {} rows)",
            100.0 * rate(s.argmax_changed, s.argmax_rows),
            s.argmax_changed,
            s.argmax_rows
        ));
    }
    out.push_str(&format!(
        "; {} errors, {} dropped, {} in flight\n",
        s.error, s.dropped, s.in_flight
    ));
    if !s.last_error.is_empty() {
        out.push_str(&format!("    last error: {}\n", s.last_error));
    }
    out
}

pub fn guard_text(g: &Guard) -> String {
    let mut lines = Vec::new();
    if let Some(m) = g.max_error_rate {
        lines.push(format!("max_error_rate {m}"));
    }
    if let Some(m) = g.min_agreement {
        lines.push(format!("min_agreement {m}"));
    }
    let state = if g.tripped {
        "TRIPPED".to_string()
    } else if g.armed {
        "armed".to_string()
    } else {
        format!("not armed ({} of {} requests)", g.requests, g.min_requests)
    };
    let agreement = if g.comparisons == 0 {
        "no comparisons".to_string()
    } else {
        format!(
            "agreement {:.2}% ({} of {})",
            100.0 * rate(g.agreed, g.comparisons),
            g.agreed,
            g.comparisons
        )
    };
    let mut out = format!(
        "  guard on version {} ({}, window {}s, min {} requests): {state}; window: {} requests, error rate {:.2}% ({} errors), {agreement}\n",
        g.version,
        lines.join(", "),
        g.window_s,
        g.min_requests,
        g.requests,
        100.0 * rate(g.errors, g.requests),
        g.errors,
    );
    if !g.why.is_empty() {
        let what = if g.tripped {
            "tripped"
        } else {
            "would have tripped (last version with weight, kept)"
        };
        out.push_str(&format!("    {what}: {}\n", g.why));
    }
    out
}
