//! The conversion steps, in the vocabulary users already type:
//! `convert/hf_to_megatron`, `convert/megatron_to_hf`, `convert/merge_lora` and
//! `convert/validate`. Each builds its typed request from the parameters
//! ([`params`]), plans, and hands the plan to the [`crate::pipeline`].

pub mod hf_to_megatron;
pub mod megatron_to_hf;
pub mod merge_lora;
pub mod params;
pub mod validate;

pub use params::Params;

use ckpt_wire::Step;

use crate::execute::Progress;
use crate::pipeline::error::Error;
use crate::pipeline::{Report, RunOptions};

/// Runs a conversion step: reads the parameters every conversion takes
/// (`validate`, `smoke_test`) into `opts`, then the step's own.
///
/// # Errors
/// [`Error`] from the step; `convert/validate` is not a conversion
/// ([`validate::run`] runs it).
pub fn run(
    step: Step,
    params: &mut Params,
    mut opts: RunOptions,
    progress: &dyn Progress,
) -> Result<Report, Error> {
    // Every step validates its output before publishing unless told not to.
    opts.validate = params.flag("validate", true)?;
    opts.smoke_test = params.flag("smoke_test", true)?;
    // Steps that split across processes ([`crate::pipeline::split`]): those whose
    // parameter table has `workers`. Whether the three agree is checked once the
    // step's own parameters are read.
    if step.param(ckpt_wire::params::names::WORKERS).is_some() {
        let workers = match params.opt("workers") {
            Some(_) => Some(params.positive("workers", 1)?),
            None => None,
        };
        let part = match params.opt("part") {
            Some(_) => Some(params.count("part", 0)?),
            None => None,
        };
        let finalize = params.flag("finalize", false)?;
        opts.split = Some(crate::pipeline::split::Split {
            workers,
            part,
            finalize,
        });
    }
    match step {
        Step::HfToMegatron => hf_to_megatron::run(params, &opts, progress),
        Step::MegatronToHf => megatron_to_hf::run(params, &opts, progress),
        Step::MergeLora => merge_lora::run(params, &opts, progress),
        Step::Validate => Err(crate::pipeline::preflight::PreflightError::BadValue {
            name: "step".into(),
            value: step.name().into(),
            expected: "a conversion (convert/validate runs with `ckpt-convert validate`)".into(),
        }
        .into()),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use ckpt_wire::Value;
    use ckpt_wire::params::Param;

    use super::*;
    use crate::pipeline::preflight::PreflightError;

    /// A value of the right kind for `p` (paths that do not exist: the request
    /// is refused after its parameters are read).
    fn sample(p: &Param, scope: Option<&str>) -> String {
        match p.value {
            Value::Path | Value::Model => format!("/nonexistent/ckpt-help-test/{}", p.name),
            Value::Text | Value::Ignored => "x".into(),
            Value::Bool => "true".into(),
            Value::Int { min } => min.max(1).to_string(),
            Value::Size => "5GB".into(),
            Value::DType { .. } => "bfloat16".into(),
            Value::Choice(c) => scope
                .and_then(|s| s.split_once('='))
                .filter(|(k, _)| *k == p.name)
                .map_or(c[0], |(_, v)| v)
                .to_owned(),
            Value::Digest => "0".repeat(32),
            Value::Ints => "1,2".into(),
        }
    }

    /// Every documented parameter (of each choice, for merge_lora's backends) is
    /// read by its step: a run with all of them gets past the parameters and is
    /// refused only for its paths. Every parameter a step reads is documented:
    /// reading one outside the table panics.
    #[test]
    fn every_documented_parameter_is_accepted() {
        for step in Step::ALL {
            let mut scopes: Vec<Option<&str>> = vec![None];
            for p in step.params() {
                if p.only.is_some() && !scopes.contains(&p.only) {
                    scopes.push(p.only);
                }
            }
            if scopes.len() > 1 {
                scopes.remove(0);
            }
            for scope in scopes {
                let values: BTreeMap<String, String> = step
                    .params()
                    .iter()
                    .filter(|p| p.only.is_none() || p.only == scope)
                    .map(|p| (p.name.to_owned(), sample(p, scope)))
                    .collect();
                let mut params = Params::new(step, values.clone());
                let result = match step {
                    Step::Validate => validate::run(&mut params).map(|_| ()),
                    _ => run(
                        step,
                        &mut params,
                        RunOptions::default(),
                        &crate::execute::Silent,
                    )
                    .map(|_| ()),
                };
                let err = result.expect_err("paths that do not exist are refused");
                assert!(
                    !matches!(
                        err,
                        Error::Preflight(
                            PreflightError::Unknown { .. } | PreflightError::Missing { .. }
                        )
                    ),
                    "{step} {scope:?}: {err}"
                );
                for name in values.keys() {
                    assert!(
                        params.was_read(name),
                        "{step} {scope:?}: documented parameter {name} was not read (the run stopped at: {err})"
                    );
                }
            }
        }
    }
}
