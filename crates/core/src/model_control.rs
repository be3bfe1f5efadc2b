//! What a RepositoryModelLoad/Unload request may name, checked the same way by the worker
//! and the gateway before anything touches the file system: a model name is one path
//! component, so no request can reach outside the model repository.

use crate::{invalid, text::clip, Error, Result};

/// Longest model name accepted by Load/Unload.
pub const MAX_NAME_BYTES: usize = 128;

/// A model name fit for Load/Unload: `[A-Za-z0-9_.-]+`, at most 128 bytes, not starting
/// with a dot (so neither `.` nor `..`, nor a hidden directory).
pub fn check_name(name: &str) -> Result<()> {
    let why = if name.is_empty() {
        Some("it is empty")
    } else if name.len() > MAX_NAME_BYTES {
        Some("it is longer than 128 bytes")
    } else if name.starts_with('.') {
        Some("it starts with a dot")
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
    {
        Some("it has a character outside A-Z a-z 0-9 _ . -")
    } else {
        None
    };
    match why {
        Some(why) => Err(invalid!(
            "model_name '{}': not a model name ({why}); expected one directory name of the model repository, [A-Za-z0-9_.-]+ not starting with a dot, at most {MAX_NAME_BYTES} bytes",
            clip(name)
        )),
        None => Ok(()),
    }
}

/// Triton's Load parameters that carry a config or model files inline are not supported:
/// a model comes from the repository only.
pub fn check_load_parameters<'a>(keys: impl IntoIterator<Item = &'a String>) -> Result<()> {
    for key in keys {
        if key == "config" || key.starts_with("file:") {
            return Err(Error::Unimplemented(format!(
                "RepositoryModelLoad parameter '{}' is not supported: models, their config.pbtxt and files come from the model repository",
                clip(key)
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_one_path_component() {
        for ok in ["mlp", "digits_v2", "a.b-c", "A9"] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        let long = "m".repeat(129);
        for bad in [
            "", ".", "..", "../x", "/etc", "./mlp", ".hidden", "a/b", "a\0b", "é", &long,
        ] {
            let err = check_name(bad).unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument, "{bad}");
            assert!(err.to_string().starts_with("model_name '"), "{err}");
        }
    }

    #[test]
    fn inline_configs_and_files_are_unimplemented() {
        let keys = ["config".to_string()];
        assert_eq!(
            check_load_parameters(&keys).unwrap_err().code(),
            tonic::Code::Unimplemented
        );
        let keys = ["file:1/model.onnx".to_string()];
        assert_eq!(
            check_load_parameters(&keys).unwrap_err().code(),
            tonic::Code::Unimplemented
        );
        assert!(check_load_parameters(&["other".to_string()]).is_ok());
    }
}
