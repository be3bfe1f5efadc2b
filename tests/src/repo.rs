//! Throwaway model repositories for tests: bundled model files plus config.pbtxt text.

use std::path::Path;

pub struct Repo {
    pub dir: tempfile::TempDir,
}

impl Repo {
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// `name/1/model.onnx` linked to bundled model `from`, with `config` as config.pbtxt
    /// (none when empty).
    pub fn onnx(self, name: &str, from: &str, config: &str) -> Self {
        let version = self.path().join(name).join("1");
        std::fs::create_dir_all(&version).unwrap();
        std::os::unix::fs::symlink(
            crate::models().join(from).join("1/model.onnx"),
            version.join("model.onnx"),
        )
        .unwrap();
        if !config.is_empty() {
            std::fs::write(self.path().join(name).join("config.pbtxt"), config).unwrap();
        }
        self
    }

    /// Adds version `version` of model `name` linked to bundled model `from`.
    pub fn version(self, name: &str, version: u32, from: &str) -> Self {
        let dir = self.path().join(name).join(version.to_string());
        std::fs::create_dir_all(&dir).unwrap();
        std::os::unix::fs::symlink(
            crate::models().join(from).join("1/model.onnx"),
            dir.join("model.onnx"),
        )
        .unwrap();
        self
    }

    /// An identity-backend model: `name/1/` with only a config.pbtxt.
    pub fn identity(self, name: &str, config: &str) -> Self {
        std::fs::create_dir_all(self.path().join(name).join("1")).unwrap();
        std::fs::write(self.path().join(name).join("config.pbtxt"), config).unwrap();
        self
    }
}

impl Default for Repo {
    fn default() -> Self {
        Self::new()
    }
}

/// The identity backend's `delay_ms` parameter (each batch takes that long), for
/// [`identity_config`]'s `extra`.
pub fn delay_ms(ms: u64) -> String {
    format!(r#"parameters {{ key: "delay_ms" value: {{ string_value: "{ms}" }} }}"#)
}

/// config.pbtxt for an identity model echoing one FP32 input of `dims`.
pub fn identity_config(extra: &str, dims: &str) -> String {
    format!(
        r#"backend: "identity"
input [ {{ name: "INPUT0" data_type: TYPE_FP32 dims: {dims} }} ]
output [ {{ name: "OUTPUT0" data_type: TYPE_FP32 dims: {dims} }} ]
{extra}
"#
    )
}
