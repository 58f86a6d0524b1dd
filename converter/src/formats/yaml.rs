//! A reader for the YAML that Megatron-Bridge writes (`run_config.yaml`, produced
//! by OmegaConf/PyYAML in block style): nested block mappings and sequences,
//! one-line flow sequences and mappings, quoted and plain scalars, comments,
//! literal and folded block scalars. Values come back as JSON values so the
//! readers look fields up the same way as in `config.json`.
//!
//! Anchors, aliases, tags, multi-line flow collections and multi-document
//! streams are refused with the line number, not guessed at: a configuration we
//! cannot read exactly must not steer a merge.

use serde_json::{Map, Number, Value};

/// Why a YAML text was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {why}")]
pub struct YamlError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong.
    pub why: String,
}

struct Line<'a> {
    no: usize,
    indent: usize,
    text: &'a str,
}

/// Removes a comment (`#` at the start or after a space, outside quotes).
fn strip_comment(s: &str) -> &str {
    let (mut single, mut double) = (false, false);
    let bytes = s.as_bytes();
    for (i, &c) in bytes.iter().enumerate() {
        match c {
            b'\'' if !double => single = !single,
            b'"' if !single => double = !double,
            b'#' if !single && !double && (i == 0 || bytes[i - 1] == b' ') => {
                return s[..i].trim_end();
            }
            _ => {}
        }
    }
    s.trim_end()
}

/// Parses a YAML document into a JSON value.
///
/// # Errors
/// [`YamlError`] naming the line.
pub fn parse(text: &str) -> Result<Value, YamlError> {
    let mut lines = Vec::new();
    let mut raw: Vec<(usize, &str)> = Vec::new();
    for (i, l) in text.lines().enumerate() {
        raw.push((i + 1, l));
    }
    let mut started = false;
    for &(no, l) in &raw {
        if l.starts_with('\t') {
            return Err(YamlError {
                line: no,
                why: "tab indentation".into(),
            });
        }
        let body = strip_comment(l);
        if body.trim().is_empty() {
            continue;
        }
        if body.trim() == "---" {
            if started {
                return Err(YamlError {
                    line: no,
                    why: "a second document".into(),
                });
            }
            started = true;
            continue;
        }
        if body.trim() == "..." {
            break;
        }
        started = true;
        let indent = body.len() - body.trim_start().len();
        lines.push(Line {
            no,
            indent,
            text: body.trim_start(),
        });
    }
    let mut p = Parser { lines, at: 0, raw };
    if p.lines.is_empty() {
        return Ok(Value::Null);
    }
    let indent = p.lines[0].indent;
    let v = p.block(indent)?;
    if let Some(l) = p.lines.get(p.at) {
        return Err(YamlError {
            line: l.no,
            why: "unexpected indentation".into(),
        });
    }
    Ok(v)
}

struct Parser<'a> {
    lines: Vec<Line<'a>>,
    at: usize,
    raw: Vec<(usize, &'a str)>,
}

fn err(line: usize, why: impl Into<String>) -> YamlError {
    YamlError {
        line,
        why: why.into(),
    }
}

impl<'a> Parser<'a> {
    fn block(&mut self, indent: usize) -> Result<Value, YamlError> {
        let first = &self.lines[self.at];
        if first.text == "-" || first.text.starts_with("- ") {
            self.sequence(indent)
        } else {
            self.mapping(indent)
        }
    }

    fn sequence(&mut self, indent: usize) -> Result<Value, YamlError> {
        let mut items = Vec::new();
        while let Some(l) = self.lines.get(self.at) {
            if l.indent != indent || !(l.text == "-" || l.text.starts_with("- ")) {
                break;
            }
            let (no, text) = (l.no, l.text);
            let rest = text[1..].trim_start();
            if rest.is_empty() {
                self.at += 1;
                match self.lines.get(self.at) {
                    Some(n) if n.indent > indent => {
                        let ni = n.indent;
                        items.push(self.block(ni)?);
                    }
                    _ => items.push(Value::Null),
                }
            } else if key_split(rest).is_some() {
                // `- key: value` opens a mapping whose keys sit where `key` does.
                let inner = indent + (text.len() - rest.len());
                self.lines[self.at].text = rest;
                self.lines[self.at].indent = inner;
                items.push(self.mapping(inner)?);
            } else {
                self.at += 1;
                items.push(scalar_or_flow(rest, no)?);
            }
        }
        Ok(Value::Array(items))
    }

    fn mapping(&mut self, indent: usize) -> Result<Value, YamlError> {
        let mut map = Map::new();
        while let Some(l) = self.lines.get(self.at) {
            if l.indent < indent {
                break;
            }
            if l.indent > indent {
                return Err(err(l.no, "unexpected indentation"));
            }
            let no = l.no;
            let Some((key, rest)) = key_split(l.text) else {
                return Err(err(
                    no,
                    format!("expected `key: value`, found {:?}", l.text),
                ));
            };
            let key = unquote_key(key, no)?;
            self.at += 1;
            let value = if rest.is_empty() {
                match self.lines.get(self.at) {
                    Some(n) if n.indent > indent => {
                        let ni = n.indent;
                        self.block(ni)?
                    }
                    // A sequence may sit at the key's own indentation.
                    Some(n)
                        if n.indent == indent && (n.text == "-" || n.text.starts_with("- ")) =>
                    {
                        self.sequence(indent)?
                    }
                    _ => Value::Null,
                }
            } else if rest == "|"
                || rest == ">"
                || rest.starts_with("|-")
                || rest.starts_with(">-")
                || rest.starts_with("|+")
                || rest.starts_with(">+")
            {
                self.block_scalar(no, indent, rest)?
            } else {
                scalar_or_flow(rest, no)?
            };
            if map.insert(key.clone(), value).is_some() {
                return Err(err(no, format!("key {key:?} appears twice")));
            }
        }
        Ok(Value::Object(map))
    }

    fn block_scalar(&mut self, no: usize, indent: usize, style: &str) -> Result<Value, YamlError> {
        // Take the raw lines (comments are content here) more indented than the key.
        let start = self
            .raw
            .iter()
            .position(|(n, _)| *n == no)
            .expect("line exists")
            + 1;
        let mut body: Vec<&str> = Vec::new();
        let mut last_no = no;
        for &(n, l) in &self.raw[start..] {
            let ind = l.len() - l.trim_start().len();
            if !l.trim().is_empty() && ind <= indent {
                break;
            }
            body.push(l);
            last_no = n;
        }
        while self.lines.get(self.at).is_some_and(|l| l.no <= last_no) {
            self.at += 1;
        }
        let min = body
            .iter()
            .filter(|l| !l.trim().is_empty())
            .map(|l| l.len() - l.trim_start().len())
            .min()
            .unwrap_or(0);
        let texts: Vec<String> = body
            .iter()
            .map(|l| l.get(min..).unwrap_or("").to_owned())
            .collect();
        let mut s = if style.starts_with('>') {
            texts.join(" ")
        } else {
            texts.join("\n")
        };
        if !style.ends_with('-') {
            s.push('\n');
        }
        Ok(Value::String(s))
    }
}

/// Splits `key: rest` at the first `: ` (or a trailing `:`) outside quotes.
fn key_split(s: &str) -> Option<(&str, &str)> {
    let (mut single, mut double) = (false, false);
    let b = s.as_bytes();
    for (i, &c) in b.iter().enumerate() {
        match c {
            b'\'' if !double => single = !single,
            b'"' if !single => double = !double,
            b'{' | b'[' if !single && !double && i == 0 => return None,
            b':' if !single && !double && (i + 1 == b.len() || b[i + 1] == b' ') => {
                return Some((s[..i].trim_end(), s[i + 1..].trim()));
            }
            _ => {}
        }
    }
    None
}

fn unquote_key(k: &str, line: usize) -> Result<String, YamlError> {
    match scalar(k, line)? {
        Value::String(s) => Ok(s),
        Value::Null => Ok("null".into()),
        other => Ok(other.to_string()),
    }
}

fn scalar_or_flow(s: &str, line: usize) -> Result<Value, YamlError> {
    if s.starts_with('&') || s.starts_with('*') || s.starts_with('!') {
        return Err(err(
            line,
            "anchors, aliases and tags are not supported in this file",
        ));
    }
    if s.starts_with('[') || s.starts_with('{') {
        let mut f = Flow {
            s: s.as_bytes(),
            at: 0,
            line,
        };
        let v = f.value()?;
        f.skip_ws();
        if f.at != f.s.len() {
            return Err(err(
                line,
                format!("unexpected text after a flow collection: {s:?}"),
            ));
        }
        return Ok(v);
    }
    scalar(s, line)
}

/// A plain or quoted scalar, typed as YAML 1.1 readers (PyYAML) type it.
fn scalar(s: &str, line: usize) -> Result<Value, YamlError> {
    let s = s.trim();
    if let Some(inner) = s.strip_prefix('"') {
        let Some(body) = inner.strip_suffix('"') else {
            return Err(err(line, format!("unterminated string {s:?}")));
        };
        return serde_json::from_str::<String>(&format!("\"{body}\""))
            .map(Value::String)
            .map_err(|e| err(line, format!("bad double-quoted string {s:?}: {e}")));
    }
    if let Some(inner) = s.strip_prefix('\'') {
        let Some(body) = inner.strip_suffix('\'') else {
            return Err(err(line, format!("unterminated string {s:?}")));
        };
        return Ok(Value::String(body.replace("''", "'")));
    }
    Ok(match s {
        "" | "~" | "null" | "Null" | "NULL" => Value::Null,
        "true" | "True" | "TRUE" | "yes" | "Yes" | "on" | "On" => Value::Bool(true),
        "false" | "False" | "FALSE" | "no" | "No" | "off" | "Off" => Value::Bool(false),
        ".inf" | "+.inf" => Value::String(s.into()),
        _ => {
            let digits = s.strip_prefix(['-', '+']).unwrap_or(s);
            if !digits.is_empty() && digits.bytes().all(|c| c.is_ascii_digit() || c == b'_') {
                match s.replace('_', "").parse::<i64>() {
                    Ok(i) => Value::Number(i.into()),
                    Err(_) => Value::String(s.into()),
                }
            } else if looks_float(s) {
                match s.parse::<f64>().ok().and_then(Number::from_f64) {
                    Some(n) => Value::Number(n),
                    None => Value::String(s.into()),
                }
            } else {
                Value::String(s.into())
            }
        }
    })
}

/// PyYAML's float: digits with a dot (and an optional exponent); `1e-5` without a
/// dot is a string there, and so here.
fn looks_float(s: &str) -> bool {
    let t = s.strip_prefix(['-', '+']).unwrap_or(s);
    let (mant, exp) = match t.find(['e', 'E']) {
        Some(i) => (&t[..i], Some(&t[i + 1..])),
        None => (t, None),
    };
    let Some((a, b)) = mant.split_once('.') else {
        return false;
    };
    let digits = |x: &str| x.bytes().all(|c| c.is_ascii_digit());
    (!a.is_empty() || !b.is_empty())
        && digits(a)
        && digits(b)
        && exp.is_none_or(|e| {
            let e = e.strip_prefix(['-', '+']).unwrap_or(e);
            !e.is_empty() && digits(e)
        })
}

struct Flow<'a> {
    s: &'a [u8],
    at: usize,
    line: usize,
}

impl Flow<'_> {
    fn skip_ws(&mut self) {
        while self.s.get(self.at).is_some_and(|c| *c == b' ') {
            self.at += 1;
        }
    }

    fn value(&mut self) -> Result<Value, YamlError> {
        self.skip_ws();
        match self.s.get(self.at) {
            Some(b'[') => {
                self.at += 1;
                let mut items = Vec::new();
                loop {
                    self.skip_ws();
                    if self.s.get(self.at) == Some(&b']') {
                        self.at += 1;
                        return Ok(Value::Array(items));
                    }
                    items.push(self.value()?);
                    self.skip_ws();
                    match self.s.get(self.at) {
                        Some(b',') => self.at += 1,
                        Some(b']') => {}
                        _ => return Err(err(self.line, "unterminated flow sequence")),
                    }
                }
            }
            Some(b'{') => {
                self.at += 1;
                let mut map = Map::new();
                loop {
                    self.skip_ws();
                    if self.s.get(self.at) == Some(&b'}') {
                        self.at += 1;
                        return Ok(Value::Object(map));
                    }
                    let k = self.atom(true)?;
                    self.skip_ws();
                    if self.s.get(self.at) != Some(&b':') {
                        return Err(err(self.line, "expected `:` in a flow mapping"));
                    }
                    self.at += 1;
                    let v = self.value()?;
                    let key = match k {
                        Value::String(s) => s,
                        other => other.to_string(),
                    };
                    map.insert(key, v);
                    self.skip_ws();
                    match self.s.get(self.at) {
                        Some(b',') => self.at += 1,
                        Some(b'}') => {}
                        _ => return Err(err(self.line, "unterminated flow mapping")),
                    }
                }
            }
            _ => self.atom(false),
        }
    }

    fn atom(&mut self, key: bool) -> Result<Value, YamlError> {
        self.skip_ws();
        let start = self.at;
        match self.s.get(self.at) {
            Some(q @ (b'"' | b'\'')) => {
                let q = *q;
                self.at += 1;
                while let Some(&c) = self.s.get(self.at) {
                    self.at += 1;
                    if c == b'\\' && q == b'"' {
                        self.at += 1;
                    } else if c == q {
                        if q == b'\'' && self.s.get(self.at) == Some(&b'\'') {
                            self.at += 1;
                            continue;
                        }
                        break;
                    }
                }
            }
            _ => {
                while let Some(&c) = self.s.get(self.at) {
                    if c == b',' || c == b']' || c == b'}' || (key && c == b':') {
                        break;
                    }
                    if c == b':' && self.s.get(self.at + 1) == Some(&b' ') {
                        break;
                    }
                    self.at += 1;
                }
            }
        }
        let text = std::str::from_utf8(&self.s[start..self.at])
            .map_err(|_| err(self.line, "not UTF-8"))?;
        scalar(text, self.line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_what_megatron_bridge_writes() {
        let text = r#"
# written by OmegaConf
checkpoint:
  pretrained_checkpoint: /ckpt/base/iter_0000000
  save_optim: false
model:
  _target_: megatron.bridge.models.gpt_provider.GPTModelProvider
  num_layers: 2
  hf_model_id: "meta-llama/Llama-3.2-1B"
  layernorm_epsilon: 1.0e-05
  params_dtype: {_call_: false, _target_: torch.bfloat16}
peft:
  _target_: megatron.bridge.peft.lora.LoRA
  alpha: 32
  dim: 16
  dropout: 0.0
  target_modules:
  - linear_qkv
  - linear_proj
  exclude: []
  names: [a, 'b c', "d"]
notes: |
  line one
  # not a comment
"#;
        let v = parse(text).unwrap();
        assert_eq!(
            v["checkpoint"]["pretrained_checkpoint"],
            json!("/ckpt/base/iter_0000000")
        );
        assert_eq!(v["model"]["num_layers"], json!(2));
        assert_eq!(v["model"]["layernorm_epsilon"], json!(1.0e-05));
        assert_eq!(
            v["model"]["params_dtype"]["_target_"],
            json!("torch.bfloat16")
        );
        assert_eq!(v["peft"]["dim"], json!(16));
        assert_eq!(v["peft"]["dropout"], json!(0.0));
        assert_eq!(
            v["peft"]["target_modules"],
            json!(["linear_qkv", "linear_proj"])
        );
        assert_eq!(v["peft"]["exclude"], json!([]));
        assert_eq!(v["peft"]["names"], json!(["a", "b c", "d"]));
        assert_eq!(v["notes"], json!("line one\n# not a comment\n"));
    }

    #[test]
    fn sequences_of_mappings_and_scalar_types() {
        let v = parse(
            "items:\n  - name: a\n    size: 1\n  - name: b\n    size: 2\nx: 1e-5\ny: 0.5\nz: ~\n",
        )
        .unwrap();
        assert_eq!(
            v["items"],
            json!([{"name": "a", "size": 1}, {"name": "b", "size": 2}])
        );
        // PyYAML reads 1e-5 (no dot) as a string.
        assert_eq!(v["x"], json!("1e-5"));
        assert_eq!(v["y"], json!(0.5));
        assert_eq!(v["z"], Value::Null);
    }

    #[test]
    fn what_is_not_read_is_refused_with_its_line() {
        assert_eq!(parse("a: &x 1\n").unwrap_err().line, 1);
        assert_eq!(parse("a: 1\na: 2\n").unwrap_err().line, 2);
        assert_eq!(parse("a: 1\n    b: 2\n").unwrap_err().line, 2);
        assert_eq!(parse("a: [1, 2\n").unwrap_err().line, 1);
    }
}
