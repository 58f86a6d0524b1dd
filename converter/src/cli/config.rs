//! `-c NAME|FILE`: the step configuration the Nemotron tooling's `-c default`
//! names. `default` is the step's own defaults (the parameter tables); a YAML file
//! gives parameters as its keys, below the ones on the command line (as an
//! OmegaConf dotlist overrides a config), so a copy of a Nemotron step config
//! runs as it is:
//! - nested sections are read as dotted keys (`a: {b: 1}` is `a.b=1`); the
//!   launcher's own sections (`run`, `script`, `torchrun`: container image,
//!   upstream script, process count) are skipped, because the converter is the
//!   program they would launch;
//! - `${oc.env:NAME,default}` and `${oc.env:NAME}` take the environment variable
//!   (or the default); any other interpolation is refused, naming the key.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// Largest configuration file read (a step config is a few kB).
const MAX_BYTES: u64 = 1 << 20;

/// Sections that configure the Nemotron launcher, not the conversion.
const LAUNCHER: &[&str] = &["run", "script", "torchrun"];

/// The parameters `-c NAME|FILE` gives.
///
/// # Errors
/// An unknown name, an unreadable or malformed file, a value that is not a
/// scalar, an interpolation other than `oc.env`, or an unset variable without a
/// default.
pub fn parameters(name: &str) -> Result<BTreeMap<String, String>> {
    if name == "default" {
        return Ok(BTreeMap::new());
    }
    let path = Path::new(name);
    if !path.exists() {
        bail!("-c {name}: neither the built-in config \"default\" nor a YAML file");
    }
    let text = ckpt_convert::formats::file::read_text(path, MAX_BYTES)
        .with_context(|| format!("-c {name}"))?;
    let doc = ckpt_convert::formats::yaml::parse(&text).with_context(|| format!("-c {name}"))?;
    let mut out = BTreeMap::new();
    match doc {
        Value::Object(map) => {
            for (k, v) in map {
                if !LAUNCHER.contains(&k.as_str()) {
                    flatten(name, &k, &v, &mut out)?;
                }
            }
        }
        Value::Null => {}
        other => bail!("-c {name}: expected a mapping of parameters, found {other}"),
    }
    Ok(out)
}

fn flatten(file: &str, key: &str, v: &Value, out: &mut BTreeMap<String, String>) -> Result<()> {
    let text = match v {
        Value::Object(map) => {
            for (k, v) in map {
                flatten(file, &format!("{key}.{k}"), v, out)?;
            }
            return Ok(());
        }
        // An unset value leaves the step's default.
        Value::Null => return Ok(()),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => interpolate(file, key, s)?,
        Value::Array(_) => bail!("-c {file}: {key}: a list; parameters are single values"),
    };
    out.insert(key.to_owned(), text);
    Ok(())
}

/// Resolves `${oc.env:NAME[,default]}` in `s`.
fn interpolate(file: &str, key: &str, s: &str) -> Result<String> {
    let mut out = String::new();
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .with_context(|| format!("-c {file}: {key}: unterminated ${{ in {s:?}"))?;
        let expr = &after[..end];
        let Some(var) = expr.strip_prefix("oc.env:") else {
            bail!(
                "-c {file}: {key}: the interpolation ${{{expr}}} is not supported (only ${{oc.env:NAME,default}}); give the value on the command line"
            );
        };
        let (var, default) = match var.split_once(',') {
            Some((v, d)) => (v.trim(), Some(d.trim())),
            None => (var.trim(), None),
        };
        match (std::env::var(var), default) {
            (Ok(v), _) => out.push_str(&v),
            (Err(_), Some(d)) => out.push_str(d.trim_matches(|c| c == '"' || c == '\'')),
            (Err(_), None) => bail!(
                "-c {file}: {key}: the environment variable {var} is not set and ${{{expr}}} has no default"
            ),
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> (tempfile::TempDir, String) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("c.yaml");
        std::fs::write(&p, text).unwrap();
        let s = p.to_string_lossy().into_owned();
        (d, s)
    }

    #[test]
    fn default_is_the_tables() {
        assert!(parameters("default").unwrap().is_empty());
        assert!(parameters("no-such-config").is_err());
    }

    #[test]
    fn a_nemotron_style_file_gives_its_parameters() {
        let (_d, p) = write(
            "run:\n  env:\n    container_image: nvcr.io/nvidia/nemo:26.04\nscript:\n  path: /opt/x.py\n\
             hf_model_id: nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-Base-BF16\n\
             ep: ${oc.env:CKPT_TEST_UNSET_VARIABLE_EP,8}\ntp: 1\ndevice_map: null\ntrust_remote_code: true\n",
        );
        let got = parameters(&p).unwrap();
        let want: BTreeMap<String, String> = [
            (
                "hf_model_id",
                "nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-Base-BF16",
            ),
            ("ep", "8"),
            ("tp", "1"),
            ("trust_remote_code", "true"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn other_interpolations_and_lists_are_refused_by_key() {
        let (_d, p) = write("megatron_path: ${paths.out}/x\n");
        let e = parameters(&p).unwrap_err().to_string();
        assert!(
            e.contains("megatron_path") && e.contains("paths.out"),
            "{e}"
        );
        let (_d, p) = write("tp: [1, 2]\n");
        assert!(parameters(&p).unwrap_err().to_string().contains("tp"));
        let (_d, p) = write("x: ${oc.env:CKPT_TEST_UNSET_VARIABLE_X}\n");
        assert!(
            parameters(&p)
                .unwrap_err()
                .to_string()
                .contains("CKPT_TEST_UNSET_VARIABLE_X")
        );
    }
}
