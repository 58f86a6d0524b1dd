//! Step parameters as users type them (`key=value` or `--key value`), checked
//! against what each step takes. Unknown keys are refused, never silently ignored.

use std::collections::BTreeMap;
use std::path::PathBuf;

use ckpt_wire::Step;

use crate::formats::dtype::DType;
use crate::pipeline::preflight::PreflightError;

/// The raw parameters of one step, consumed as the typed request is built.
#[derive(Debug, Clone)]
pub struct Params {
    step: Step,
    values: BTreeMap<String, String>,
    known: Vec<&'static str>,
    ignored: Vec<String>,
}

impl Params {
    /// Wraps the parameters given to `step`.
    pub fn new(step: Step, values: BTreeMap<String, String>) -> Params {
        Params {
            step,
            values,
            known: Vec::new(),
            ignored: Vec::new(),
        }
    }

    /// Every parameter as given (recorded in the manifest).
    pub fn all(&self) -> &BTreeMap<String, String> {
        &self.values
    }

    fn mark(&mut self, name: &'static str) {
        // Only the step's table is documented and accepted; reading anything else
        // is a bug, caught by any test that runs the step.
        assert!(
            self.step.param(name).is_some(),
            "{}: parameter {name} is read but not in the step's table (ckpt_wire::params)",
            self.step
        );
        if !self.known.contains(&name) {
            self.known.push(name);
        }
    }

    /// An optional string parameter.
    pub fn opt(&mut self, name: &'static str) -> Option<String> {
        self.mark(name);
        self.values
            .get(name)
            .cloned()
            .filter(|v| !v.is_empty() && v != "null")
    }

    /// An optional parameter under a preferred name or an accepted alias.
    pub fn opt_alias(&mut self, name: &'static str, alias: &'static str) -> Option<String> {
        let alias_value = self.opt(alias);
        self.opt(name).or(alias_value)
    }

    /// A required string parameter.
    ///
    /// # Errors
    /// [`PreflightError::Missing`] with `hint`.
    pub fn required(&mut self, name: &'static str, hint: &str) -> Result<String, PreflightError> {
        self.opt(name).ok_or_else(|| PreflightError::Missing {
            step: self.step.name().into(),
            name: name.into(),
            hint: hint.into(),
        })
    }

    /// A required path.
    ///
    /// # Errors
    /// [`PreflightError::Missing`].
    pub fn path(&mut self, name: &'static str, hint: &str) -> Result<PathBuf, PreflightError> {
        self.required(name, hint).map(PathBuf::from)
    }

    /// A `dtype` (also accepted as `torch_dtype`, the Nemotron spelling).
    ///
    /// # Errors
    /// [`PreflightError::BadValue`] for anything but bfloat16, float16, float32.
    pub fn dtype(&mut self, default: Option<DType>) -> Result<Option<DType>, PreflightError> {
        match self.opt_alias("dtype", "torch_dtype") {
            None => Ok(default),
            Some(v) if v == "auto" => Ok(None),
            Some(v) => DType::from_user(&v)
                .map(Some)
                .ok_or_else(|| PreflightError::BadValue {
                    name: "dtype".into(),
                    value: v,
                    expected: "bfloat16, float16 or float32".into(),
                }),
        }
    }

    /// A positive integer (`tp`, `pp`, ...), default `default`.
    ///
    /// # Errors
    /// [`PreflightError::BadValue`] unless it is an integer ≥ 1.
    pub fn positive(&mut self, name: &'static str, default: u64) -> Result<u64, PreflightError> {
        match self.opt(name) {
            None => Ok(default),
            Some(v) => {
                v.parse::<u64>()
                    .ok()
                    .filter(|n| *n >= 1)
                    .ok_or_else(|| PreflightError::BadValue {
                        name: name.into(),
                        value: v,
                        expected: "an integer ≥ 1".into(),
                    })
            }
        }
    }

    /// A non-negative integer.
    ///
    /// # Errors
    /// [`PreflightError::BadValue`].
    pub fn count(&mut self, name: &'static str, default: u64) -> Result<u64, PreflightError> {
        match self.opt(name) {
            None => Ok(default),
            Some(v) => v.parse::<u64>().map_err(|_| PreflightError::BadValue {
                name: name.into(),
                value: v,
                expected: "a non-negative integer".into(),
            }),
        }
    }

    /// A boolean (`true/false/1/0/yes/no`).
    ///
    /// # Errors
    /// [`PreflightError::BadValue`].
    pub fn flag(&mut self, name: &'static str, default: bool) -> Result<bool, PreflightError> {
        match self.opt(name) {
            None => Ok(default),
            Some(v) => match v.to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" => Ok(true),
                "false" | "0" | "no" => Ok(false),
                _ => Err(PreflightError::BadValue {
                    name: name.into(),
                    value: v,
                    expected: "true or false".into(),
                }),
            },
        }
    }

    /// One of a fixed set of words.
    ///
    /// # Errors
    /// [`PreflightError::BadValue`] listing the choices.
    pub fn choice(
        &mut self,
        name: &'static str,
        choices: &[&str],
        default: &str,
    ) -> Result<String, PreflightError> {
        let v = self.opt(name).unwrap_or_else(|| default.to_owned());
        if choices.contains(&v.as_str()) {
            Ok(v)
        } else {
            Err(PreflightError::BadValue {
                name: name.into(),
                value: v,
                expected: format!("one of {}", choices.join(", ")),
            })
        }
    }

    /// Accepts the parameters that tools in the same vocabulary pass but that do
    /// not apply here (`trust_remote_code`: we never run model code; `device_map`:
    /// we use no device): those the step's table marks ignored. They are accepted
    /// so existing command lines work, and reported as ignored.
    pub fn accept_ignored(&mut self) {
        for p in self.step.params() {
            if matches!(p.value, ckpt_wire::Value::Ignored) {
                self.mark(p.name);
                if self.values.contains_key(p.name) {
                    self.ignored.push(p.name.to_owned());
                }
            }
        }
    }

    /// Whether the step has read `name` (or its alias).
    pub fn was_read(&self, name: &str) -> bool {
        self.known
            .iter()
            .any(|k| *k == name || self.step.param(k).is_some_and(|p| p.alias == Some(name)))
    }

    /// The step.
    pub fn step(&self) -> Step {
        self.step
    }

    /// The accepted-but-ignored parameters that were given.
    pub fn ignored(&self) -> &[String] {
        &self.ignored
    }

    /// `warnings`, with one for each accepted-but-ignored parameter given.
    pub fn with_ignored(&self, mut warnings: Vec<String>) -> Vec<String> {
        for p in &self.ignored {
            warnings.push(format!(
                "parameter {p} is accepted for compatibility and has no effect here"
            ));
        }
        warnings
    }

    /// Refuses parameters the step did not ask for.
    ///
    /// # Errors
    /// [`PreflightError::Unknown`] for the first unknown name.
    pub fn finish(&self) -> Result<(), PreflightError> {
        if let Some(k) = self
            .values
            .keys()
            .find(|k| !self.known.contains(&k.as_str()))
        {
            let mut known: Vec<&str> = self.known.clone();
            known.sort_unstable();
            return Err(PreflightError::Unknown {
                step: self.step.name().into(),
                name: k.clone(),
                known: known.join(", "),
            });
        }
        Ok(())
    }
}
