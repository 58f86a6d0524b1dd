//! Help for `ckpt-convert run`, generated from the steps' parameter tables
//! ([`ckpt_wire::params`]), so what is documented is what is accepted.

use ckpt_wire::Step;
use ckpt_wire::params::{Param, Value};

fn line(p: &Param) -> String {
    let lhs = if matches!(p.value, Value::Ignored) {
        p.name.to_owned()
    } else {
        format!("{}={}", p.name, p.value.describe())
    };
    let mut notes = Vec::new();
    if p.required {
        notes.push("required".to_owned());
    }
    if let Some(d) = p.default {
        notes.push(format!("default {d}"));
    }
    if let Some(a) = p.alias {
        notes.push(format!("also {a}"));
    }
    let notes = if notes.is_empty() {
        String::new()
    } else {
        format!(" ({})", notes.join("; "))
    };
    format!("    {lhs:<36} {}{notes}", p.help)
}

/// The help of one step: what it does, then its parameters, grouped by the
/// choice they belong to.
pub fn step(step: Step) -> String {
    let mut out = format!("{} — {}\n", step.name(), step.summary());
    let params = step.params();
    let (ignored, used): (Vec<&Param>, Vec<&Param>) = params
        .iter()
        .partition(|p| matches!(p.value, Value::Ignored));
    let mut scopes: Vec<Option<&str>> = Vec::new();
    for p in &used {
        if !scopes.contains(&p.only) {
            scopes.push(p.only);
        }
    }
    for scope in scopes {
        if let Some(only) = scope {
            out.push_str(&format!("  with {only}:\n"));
        }
        for p in used.iter().filter(|p| p.only == scope) {
            out.push_str(&line(p));
            out.push('\n');
        }
    }
    if !ignored.is_empty() {
        out.push_str(&format!(
            "  accepted for command lines written for the Python runners, no effect: {}\n",
            ignored
                .iter()
                .map(|p| p.name)
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    out
}

/// The help of every step of `ckpt-convert run`.
pub fn steps() -> String {
    let mut out = String::from("Steps and their parameters (key=value, or --key value):\n\n");
    for s in Step::ALL {
        out.push_str(&step(s));
        out.push('\n');
    }
    out.push_str(
        "Every conversion validates its output before publishing it, including a forward\n\
         pass of source and output compared (LoRA merges: a probe of every merged tensor).\n\n\
         Options: --dry-run (-d) prints the plan; --overwrite replaces an existing output;\n\
         --json prints the report as JSON; --threads N; --memory-budget SIZE;\n\
         -c default (the defaults above) or -c FILE.yaml (parameters from a YAML file, below\n\
         those on the command line; ${oc.env:NAME,default} is resolved).\n",
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn help_documents_every_parameter_of_every_step() {
        let text = steps();
        for s in Step::ALL {
            assert!(text.contains(s.name()), "{s}");
            for p in s.params() {
                let shown = if matches!(p.value, Value::Ignored) {
                    p.name.to_owned()
                } else {
                    format!("{}={}", p.name, p.value.describe())
                };
                assert!(text.contains(&shown), "{s}: {shown} is not in the help");
                if let Some(a) = p.alias {
                    assert!(text.contains(&format!("also {a}")), "{s}: alias {a}");
                }
            }
        }
    }
}
