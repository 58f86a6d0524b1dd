//! Arguments in two layers: the raw words (`key=value` and `--flags` fill the same
//! map, nothing touches the filesystem), then typed options built after parsing.

use std::collections::BTreeMap;

use anyhow::{Result, bail};

/// What `ckpt-convert run STEP ...` was given.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunArgs {
    /// Step parameters (`hf_model_id=...` or `--hf-model-id ...`).
    pub params: BTreeMap<String, String>,
    /// `--dry-run` / `-d`.
    pub dry_run: bool,
    /// `--overwrite`.
    pub overwrite: bool,
    /// `--json`.
    pub json: bool,
    /// `--threads N`.
    pub threads: Option<usize>,
    /// `--memory-budget SIZE`.
    pub memory_budget: Option<String>,
    /// `-c NAME|FILE` / `--config`: the step configuration ([`super::config`]).
    pub config: Option<String>,
    /// `--run PROFILE` / `-r` or `--batch PROFILE` / `-b`: run where the profile says.
    pub remote: Option<Remote>,
    /// `--env-file FILE`: the profiles file.
    pub env_file: Option<String>,
}

/// Where a step runs instead of here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remote {
    /// The profile.
    pub profile: String,
    /// `--run`: wait for the run; `--batch`: submit and return its name.
    pub attached: bool,
}

/// Options of the command itself, not step parameters.
const FLAGS: &[&str] = &["dry-run", "overwrite", "json"];
const VALUED: &[&str] = &[
    "threads",
    "memory-budget",
    "config",
    "run",
    "batch",
    "env-file",
];

/// Parses the words after the step name.
///
/// # Errors
/// A message for a word that is neither `key=value` nor a `--flag`, a flag without
/// its value, or a parameter given twice with different values.
pub fn parse_run(words: &[String]) -> Result<RunArgs> {
    let mut out = RunArgs::default();
    let mut i = 0;
    let remote = |out: &mut RunArgs, profile: &str, attached: bool| -> Result<()> {
        if let Some(old) = &out.remote {
            bail!(
                "--run and --batch given twice ({} and {profile}): a step runs in one place",
                old.profile
            );
        }
        out.remote = Some(Remote {
            profile: profile.to_owned(),
            attached,
        });
        Ok(())
    };
    let set = |out: &mut RunArgs, key: &str, value: String| -> Result<()> {
        let key = key.replace('-', "_");
        if let Some(old) = out.params.get(&key)
            && *old != value
        {
            bail!("parameter {key} given twice ({old:?} and {value:?})");
        }
        out.params.insert(key, value);
        Ok(())
    };
    while i < words.len() {
        let w = &words[i];
        i += 1;
        if w == "-d" {
            out.dry_run = true;
            continue;
        }
        if w == "-c" {
            let Some(v) = words.get(i).filter(|v| !v.starts_with('-')) else {
                bail!("-c needs a value (a config name such as default, or a YAML file)");
            };
            i += 1;
            out.config = Some(v.clone());
            continue;
        }
        if w == "-r" || w == "-b" {
            let Some(v) = words.get(i).filter(|v| !v.starts_with('-')) else {
                bail!("{w} needs a profile (from env.toml)");
            };
            i += 1;
            remote(&mut out, v, w == "-r")?;
            continue;
        }

        if let Some(flag) = w.strip_prefix("--") {
            let (name, inline) = match flag.split_once('=') {
                Some((n, v)) => (n, Some(v.to_owned())),
                None => (flag, None),
            };
            if FLAGS.contains(&name) {
                let on = match inline.as_deref() {
                    None | Some("true") => true,
                    Some("false") => false,
                    Some(v) => bail!("--{name} takes no value (found {v:?})"),
                };
                match name {
                    "dry-run" => out.dry_run = on,
                    "overwrite" => out.overwrite = on,
                    _ => out.json = on,
                }
                continue;
            }
            let value = match inline {
                Some(v) => v,
                None => {
                    let v = words.get(i).filter(|v| !v.starts_with("--"));
                    let Some(v) = v else {
                        bail!("--{name} needs a value");
                    };
                    i += 1;
                    v.clone()
                }
            };
            if VALUED.contains(&name) {
                match name {
                    "threads" => {
                        let n: usize = value.parse().ok().filter(|n| *n >= 1).ok_or_else(|| {
                            anyhow::anyhow!("--threads={value}: expected an integer ≥ 1")
                        })?;
                        out.threads = Some(n);
                    }
                    "config" => out.config = Some(value),
                    "run" | "batch" => remote(&mut out, &value, name == "run")?,
                    "env-file" => out.env_file = Some(value),
                    _ => out.memory_budget = Some(value),
                }
            } else {
                set(&mut out, name, value)?;
            }
            continue;
        }
        match w.split_once('=') {
            Some((k, v)) if !k.is_empty() => set(&mut out, k, v.to_owned())?,
            // `ckpt-convert run STEP … workers=N finalize`, the split's last step.
            None if w == "finalize" => set(&mut out, "finalize", "true".into())?,
            _ => bail!("unexpected argument {w:?}: expected key=value or --key value"),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn both_spellings_fill_the_same_map() {
        let a = parse_run(&words("hf_model_id=/m megatron_path=/o --dry-run")).unwrap();
        let b = parse_run(&words("--hf-model-id /m --megatron_path=/o -d")).unwrap();
        assert_eq!(a, b);
        assert!(a.dry_run);
        assert_eq!(a.params["hf_model_id"], "/m");
        let c = parse_run(&words("-c default hf_model_id=/m")).unwrap();
        assert_eq!(c.config.as_deref(), Some("default"));
        assert_eq!(
            c,
            parse_run(&words("hf_model_id=/m --config default")).unwrap()
        );
        assert!(parse_run(&words("-c")).is_err());
    }

    #[test]
    fn command_options_are_not_parameters() {
        let a = parse_run(&words(
            "x=1 --threads 3 --json --overwrite --memory-budget 1GB",
        ))
        .unwrap();
        assert_eq!(a.threads, Some(3));
        assert!(a.json && a.overwrite);
        assert_eq!(a.memory_budget.as_deref(), Some("1GB"));
        assert_eq!(a.params.len(), 1);
    }

    #[test]
    fn profiles_choose_where_a_step_runs() {
        let a = parse_run(&words(
            "-c default --batch lepton_convert_model megatron_path=/m --env-file e.toml",
        ))
        .unwrap();
        assert_eq!(
            a.remote,
            Some(Remote {
                profile: "lepton_convert_model".into(),
                attached: false
            })
        );
        assert_eq!(a.env_file.as_deref(), Some("e.toml"));
        assert_eq!(a.params.len(), 1);
        let r = parse_run(&words("-r slurm_convert_model x=1")).unwrap();
        assert!(r.remote.unwrap().attached);
        assert_eq!(
            parse_run(&words("-b p")).unwrap(),
            parse_run(&words("--batch=p")).unwrap()
        );
        assert!(parse_run(&words("--run a --batch b")).is_err());
        assert!(parse_run(&words("-b")).is_err());
    }

    #[test]
    fn bad_words_are_refused() {
        assert!(parse_run(&words("positional")).is_err());
        assert!(parse_run(&words("--threads")).is_err());
        assert!(parse_run(&words("--threads 0")).is_err());
        assert!(parse_run(&words("a=1 a=2")).is_err());
        assert!(parse_run(&words("a=1 a=1")).is_ok());
    }
}
