//! Records the git revision the binaries were built from, for `--version` and the start
//! log line: `INFERMESH_GIT_REV` when set (an image build, where `.git` is not copied in),
//! else `git rev-parse`, else "unknown".

use std::{path::Path, process::Command};

fn main() {
    println!("cargo:rerun-if-env-changed=INFERMESH_GIT_REV");
    let rev = std::env::var("INFERMESH_GIT_REV")
        .ok()
        .filter(|r| !r.is_empty())
        .or_else(git_rev)
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=INFERMESH_GIT_REV={rev}");
}

fn git_rev() -> Option<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let git = root.join(".git");
    if !git.is_dir() {
        return None;
    }
    // Rebuild when HEAD moves: a checkout changes HEAD, a commit changes the branch ref.
    // Only files that exist are named: cargo takes a missing one as always changed, which
    // would rebuild this crate and everything above it on every build.
    println!("cargo:rerun-if-changed={}", git.join("HEAD").display());
    let head = std::fs::read_to_string(git.join("HEAD")).ok()?;
    if let Some(r) = head.trim().strip_prefix("ref: ") {
        let loose = git.join(r);
        // A packed branch gets a loose ref at its next commit: its folder changes then.
        let watched = [loose.clone(), git.join("packed-refs")]
            .into_iter()
            .chain(loose.parent().map(Path::to_path_buf));
        for path in watched.filter(|p| p.exists()) {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
    let out = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(&root)
        .output()
        .ok()?;
    let rev = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (out.status.success() && !rev.is_empty()).then_some(rev)
}
