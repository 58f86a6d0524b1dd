//! Reading a model's `config.json`: typed fields, transformers' defaults, and a
//! refusal that names the file, the field and the value for anything a family
//! cannot convert faithfully or that no model can have (a zero rope base, a
//! negative norm epsilon).

use std::path::{Path, PathBuf};

use serde_json::Value;

/// Why a model was refused before anything was read (exit code 2).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    /// No configuration, so no architecture.
    #[error(
        "{}: no config.json, so the architecture is unknown (use mapping=identity to copy tensors under their own names)",
        dir.display()
    )]
    NoConfig {
        /// The model directory.
        dir: PathBuf,
    },
    /// No family maps the architecture.
    #[error(
        "{}: architecture {architecture} is not supported (supported: {supported}; mapping=identity copies tensors under their own names)",
        path.display()
    )]
    Architecture {
        /// The configuration file.
        path: PathBuf,
        /// The architecture (or `model_type`).
        architecture: String,
        /// The architectures that are.
        supported: String,
    },
    /// An option the family cannot convert faithfully.
    #[error("{}: {architecture} with {option} is not supported{}", path.display(), hint.as_deref().map(|h| format!(" ({h})")).unwrap_or_default())]
    Unsupported {
        /// The configuration file.
        path: PathBuf,
        /// The architecture.
        architecture: String,
        /// The field and value (`hidden_act=gelu`).
        option: String,
        /// Why, or what to do instead.
        hint: Option<String>,
    },
    /// A field missing or of a value no model can have.
    #[error("{}: {field}: expected {expected}, found {found}", path.display())]
    Field {
        /// The configuration file.
        path: PathBuf,
        /// The field.
        field: String,
        /// What a model needs.
        expected: String,
        /// What is there.
        found: String,
    },
    /// A parallel size the model cannot be split into.
    #[error("{name}={value}: expected a divisor of {dim}={dim_value} ({architecture})")]
    Parallel {
        /// `tp`, `pp`, `ep`.
        name: String,
        /// The size asked for.
        value: u64,
        /// The dimension it must divide.
        dim: String,
        /// Its value.
        dim_value: u64,
        /// The architecture.
        architecture: String,
    },
}

/// What the user asked to convert anyway, although the two sides will compute
/// differently (recorded in the manifest with the step's parameters).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Overrides {
    /// `allow_rope_mismatch`: a Llama 3 rope scaling Megatron-Core cannot express.
    pub rope_mismatch: bool,
}

/// A `config.json`, read with the path and architecture every message names.
pub struct Config<'a> {
    /// The JSON.
    pub json: &'a Value,
    /// Its file.
    pub path: PathBuf,
    /// `architectures[0]`, else `model_type`.
    pub architecture: String,
    /// What the user asked to convert anyway.
    pub overrides: Overrides,
}

impl<'a> Config<'a> {
    /// Wraps the `config.json` of `dir`.
    pub fn new(json: &'a Value, dir: &Path) -> Config<'a> {
        Config {
            json,
            path: dir.join("config.json"),
            architecture: architecture(json).unwrap_or_else(|| "(none)".into()),
            overrides: Overrides::default(),
        }
    }

    /// A field that is present and not null.
    pub fn get(&self, key: &str) -> Option<&'a Value> {
        self.json.get(key).filter(|v| !v.is_null())
    }

    fn found(&self, key: &str) -> String {
        self.json
            .get(key)
            .map_or_else(|| "nothing".into(), |v| v.to_string())
    }

    /// A field error for `key`.
    pub fn field_error(&self, key: &str, expected: &str) -> ModelError {
        ModelError::Field {
            path: self.path.clone(),
            field: key.into(),
            expected: expected.into(),
            found: self.found(key),
        }
    }

    /// A positive integer.
    ///
    /// # Errors
    /// [`ModelError::Field`] when missing or not a positive integer.
    pub fn count(&self, key: &str) -> Result<u64, ModelError> {
        self.get(key)
            .and_then(Value::as_u64)
            .filter(|v| *v > 0)
            .ok_or_else(|| self.field_error(key, "a positive integer"))
    }

    /// A positive integer, `default` when absent.
    ///
    /// # Errors
    /// [`ModelError::Field`] when present but not a positive integer.
    pub fn count_or(&self, key: &str, default: u64) -> Result<u64, ModelError> {
        match self.get(key) {
            None => Ok(default),
            Some(_) => self.count(key),
        }
    }

    /// A non-negative integer, `default` when absent.
    ///
    /// # Errors
    /// [`ModelError::Field`] when present but not a non-negative integer.
    pub fn int_or(&self, key: &str, default: u64) -> Result<u64, ModelError> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_u64()
                .ok_or_else(|| self.field_error(key, "a non-negative integer")),
        }
    }

    /// A finite number greater than zero, `default` when absent.
    ///
    /// # Errors
    /// [`ModelError::Field`] when present but not a positive finite number.
    pub fn positive(&self, key: &str, default: f64) -> Result<f64, ModelError> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite() && *x > 0.0)
                .ok_or_else(|| self.field_error(key, "a number greater than 0")),
        }
    }

    /// A number within `[0, 1)` or another finite number, `default` when absent.
    ///
    /// # Errors
    /// [`ModelError::Field`] when present but not a finite number.
    pub fn number(&self, key: &str, default: f64) -> Result<f64, ModelError> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite())
                .ok_or_else(|| self.field_error(key, "a finite number")),
        }
    }

    /// A boolean, when present.
    pub fn flag(&self, key: &str) -> Option<bool> {
        self.get(key).and_then(Value::as_bool)
    }

    /// A string, when present.
    pub fn text(&self, key: &str) -> Option<&'a str> {
        self.get(key).and_then(Value::as_str)
    }

    /// A refusal of `option` (`hidden_act=gelu`).
    pub fn unsupported(&self, option: impl Into<String>, hint: Option<&str>) -> ModelError {
        ModelError::Unsupported {
            path: self.path.clone(),
            architecture: self.architecture.clone(),
            option: option.into(),
            hint: hint.map(str::to_owned),
        }
    }
}

/// `architectures[0]`, else `model_type`.
pub fn architecture(json: &Value) -> Option<String> {
    json.get("architectures")
        .and_then(|a| a.get(0))
        .and_then(Value::as_str)
        .or_else(|| json.get("model_type").and_then(Value::as_str))
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn impossible_values_name_the_field() {
        let json = serde_json::json!({"architectures": ["LlamaForCausalLM"], "rope_theta": 0,
            "rms_norm_eps": -1e-5, "hidden_size": 0});
        let c = Config::new(&json, Path::new("/m"));
        let e = c.positive("rope_theta", 10000.0).unwrap_err().to_string();
        assert_eq!(
            e,
            "/m/config.json: rope_theta: expected a number greater than 0, found 0"
        );
        assert!(
            c.positive("rms_norm_eps", 1e-6)
                .unwrap_err()
                .to_string()
                .contains("rms_norm_eps: expected a number greater than 0, found -")
        );
        assert!(c.count("hidden_size").is_err());
        assert!(
            c.count("num_hidden_layers")
                .unwrap_err()
                .to_string()
                .contains("found nothing")
        );
        assert_eq!(c.positive("absent", 2.5).unwrap(), 2.5);
    }
}
