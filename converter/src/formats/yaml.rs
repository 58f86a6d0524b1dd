//! The YAML Megatron-Bridge writes (`run_config.yaml`, dumped by PyYAML), read
//! with the `yaml-rust2` parser into JSON values, so the readers look fields up
//! the same way as in `config.json`.
//!
//! What PyYAML writes and how it reads here:
//! - plain scalars are typed by PyYAML's YAML 1.1 rules, not YAML 1.2's: `yes`,
//!   `on`, `off` are booleans; a float needs a dot and a signed exponent (`1e-5`
//!   and `1.0e5` are strings, `1.0e-05` is a float); `0o17`-less octals (`017`),
//!   `0x`, `0b` and sexagesimal (`1:30`) integers; `~`, `null` and empty are null;
//!   quoted scalars are strings;
//! - `!!set` (a Python set, e.g. `peft.params_to_save`) becomes a list of its
//!   members in file order; `!!python/tuple` a list; the other `!!python/`
//!   scalar tags (`str`, `int`, `float`, `bool`, `none`) their value;
//! - anchors and aliases (`&a`, `*a`) and merge keys (`<<: *a`) are resolved;
//! - `.inf`, `-.inf` and `.nan` become the strings `inf`, `-inf` and `nan` (JSON
//!   has no such numbers).
//!
//! Refused, naming the line: tags that would need code to run in Python
//! (`!!python/object…`, `!!python/name:`, `!!python/module:`, any tag without a
//! standard meaning), duplicate keys (PyYAML keeps the last; a configuration with
//! two values for one key must not steer a merge), a mapping or sequence as a key
//! or `!!set` member (PyYAML refuses them as unhashable), more than one document,
//! and documents that expand past [`MAX_NODES`] values through aliases.

use serde_json::{Map, Number, Value};
use yaml_rust2::parser::{Event, Parser, Tag};
use yaml_rust2::scanner::{Marker, TScalarStyle};

/// The most values a document may expand to (aliases included), so a few lines
/// of nested aliases cannot make us build gigabytes.
pub const MAX_NODES: usize = 1 << 20;

/// Why a YAML text was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {why}")]
pub struct YamlError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong.
    pub why: String,
}

fn err(mark: &Marker, why: impl Into<String>) -> YamlError {
    YamlError {
        line: mark.line(),
        why: why.into(),
    }
}

/// What a tag asks for.
enum Kind {
    /// No tag, or a standard one that changes nothing here.
    Plain,
    /// Force a string (`!!str`, `!!python/str`).
    Str,
    /// A set: a mapping whose keys are the members.
    Set,
    /// A sequence (`!!python/tuple`, `!!seq`).
    Seq,
}

/// What a tag asks for, or why it is refused, naming the line the tag is on (a
/// collection's own position is its first entry, which may be a line later).
fn tag_kind(tag: &Option<Tag>, mark: &Marker, text: &str) -> Result<Kind, YamlError> {
    let Some(t) = tag else {
        return Ok(Kind::Plain);
    };
    tag_kind_at(t, mark).map_err(|mut e| {
        let lines: Vec<&str> = text.lines().collect();
        if let Some(l) = (1..=e.line.min(lines.len()))
            .rev()
            .find(|&l| lines[l - 1].contains(t.suffix.as_str()))
        {
            e.line = l;
        }
        e
    })
}

fn tag_kind_at(t: &Tag, mark: &Marker) -> Result<Kind, YamlError> {
    // `!!x` arrives as handle `tag:yaml.org,2002:`, suffix `x`.
    let name = if t.handle == "tag:yaml.org,2002:" || t.handle == "!!" {
        t.suffix.as_str()
    } else if t.handle == "!" && t.suffix.is_empty() {
        // The non-specific tag `!`: a plain string.
        return Ok(Kind::Str);
    } else {
        return Err(err(
            mark,
            format!(
                "tag {}{} has no standard meaning (PyYAML would need a constructor, that is code, to read it)",
                t.handle, t.suffix
            ),
        ));
    };
    Ok(match name {
        "str" | "python/str" | "python/unicode" | "binary" => Kind::Str,
        "set" => Kind::Set,
        "seq" | "python/tuple" | "python/list" | "omap" | "pairs" => Kind::Seq,
        "map" | "python/dict" | "int" | "float" | "bool" | "null" | "timestamp" | "python/int"
        | "python/long" | "python/float" | "python/bool" | "python/none" | "merge" | "value" => {
            Kind::Plain
        }
        other if other.starts_with("python/") => {
            return Err(err(
                mark,
                format!(
                    "tag !!{other} asks Python to import or call code when the file is loaded; refused"
                ),
            ));
        }
        other => {
            return Err(err(
                mark,
                format!("tag !!{other} is not a standard YAML tag"),
            ));
        }
    })
}

fn strip_underscores(s: &str) -> String {
    s.chars().filter(|c| *c != '_').collect()
}

/// A plain scalar typed as PyYAML's resolver types it.
fn resolve(s: &str) -> Value {
    match s {
        "" | "~" | "null" | "Null" | "NULL" => return Value::Null,
        "yes" | "Yes" | "YES" | "true" | "True" | "TRUE" | "on" | "On" | "ON" => {
            return Value::Bool(true);
        }
        "no" | "No" | "NO" | "false" | "False" | "FALSE" | "off" | "Off" | "OFF" => {
            return Value::Bool(false);
        }
        ".inf" | ".Inf" | ".INF" | "+.inf" | "+.Inf" | "+.INF" => {
            return Value::String("inf".into());
        }
        "-.inf" | "-.Inf" | "-.INF" => return Value::String("-inf".into()),
        ".nan" | ".NaN" | ".NAN" => return Value::String("nan".into()),
        _ => {}
    }
    if let Some(v) = resolve_int(s) {
        return v;
    }
    if let Some(f) = resolve_float(s) {
        return Number::from_f64(f).map_or_else(|| Value::String(s.into()), Value::Number);
    }
    Value::String(s.into())
}

fn resolve_int(s: &str) -> Option<Value> {
    let (neg, body) = match s.as_bytes().first()? {
        b'-' => (true, &s[1..]),
        b'+' => (false, &s[1..]),
        _ => (false, s),
    };
    let digits_ok = |d: &str, ok: fn(char) -> bool| {
        !d.is_empty() && d.chars().all(|c| c == '_' || ok(c)) && d.chars().any(|c| c != '_')
    };
    let magnitude: i128 = if let Some(b) = body.strip_prefix("0b") {
        digits_ok(b, |c| c == '0' || c == '1')
            .then(|| i128::from_str_radix(&strip_underscores(b), 2).ok())??
    } else if let Some(x) = body.strip_prefix("0x") {
        digits_ok(x, |c| c.is_ascii_hexdigit())
            .then(|| i128::from_str_radix(&strip_underscores(x), 16).ok())??
    } else if body.len() > 1 && body.starts_with('0') {
        digits_ok(&body[1..], |c| ('0'..='7').contains(&c))
            .then(|| i128::from_str_radix(&strip_underscores(&body[1..]), 8).ok())??
    } else if body.contains(':') {
        // Sexagesimal: 1:30 is 90.
        let mut parts = body.split(':');
        let first = parts.next()?;
        if !digits_ok(first, |c| c.is_ascii_digit()) || first.starts_with('0') {
            return None;
        }
        let mut v: i128 = strip_underscores(first).parse().ok()?;
        for p in parts {
            if p.is_empty() || p.len() > 2 || !p.chars().all(|c| c.is_ascii_digit()) {
                return None;
            }
            let d: i128 = p.parse().ok()?;
            if d > 59 {
                return None;
            }
            // Past 128 bits it is not an integer we keep (PyYAML's would be text
            // to us anyway: beyond 64 bits is kept as text below).
            v = v.checked_mul(60)?.checked_add(d)?;
        }
        v
    } else {
        if !digits_ok(body, |c| c.is_ascii_digit()) || (body.len() > 1 && body.starts_with('_')) {
            return None;
        }
        strip_underscores(body).parse().ok()?
    };
    let v = if neg { -magnitude } else { magnitude };
    Some(match (i64::try_from(v), u64::try_from(v)) {
        (Ok(i), _) => Value::Number(i.into()),
        (_, Ok(u)) => Value::Number(u.into()),
        // Beyond 64 bits, as text rather than a rounded number.
        _ => Value::String(s.into()),
    })
}

/// `[-+]?([0-9][0-9_]*)?\.[0-9_]*([eE][-+][0-9]+)?`, and the sexagesimal form.
fn resolve_float(s: &str) -> Option<f64> {
    let body = s.strip_prefix(['-', '+']).unwrap_or(s);
    let neg = s.starts_with('-');
    if body.contains(':') {
        let (int, frac) = body.split_once('.')?;
        let mut v = 0f64;
        for (i, p) in int.split(':').enumerate() {
            let ok = !p.is_empty()
                && p.chars().all(|c| c.is_ascii_digit() || c == '_')
                && (i == 0 || (p.len() <= 2 && p.parse::<u32>().ok()? <= 59));
            if !ok {
                return None;
            }
            v = v * 60.0 + strip_underscores(p).parse::<f64>().ok()?;
        }
        let f: f64 = format!("0.{}", strip_underscores(frac)).parse().ok()?;
        return Some(if neg { -(v + f) } else { v + f });
    }
    let (mantissa, exp) = match body.find(['e', 'E']) {
        Some(i) => (&body[..i], Some(&body[i + 1..])),
        None => (body, None),
    };
    let (int, frac) = mantissa.split_once('.')?;
    if !(int.is_empty() || int.starts_with(|c: char| c.is_ascii_digit()))
        || !int.chars().all(|c| c.is_ascii_digit() || c == '_')
        || !frac.chars().all(|c| c.is_ascii_digit() || c == '_')
        || (int.is_empty() && frac.is_empty())
    {
        return None;
    }
    if let Some(e) = exp {
        let digits = e.strip_prefix(['-', '+'])?;
        if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_digit()) {
            return None;
        }
    }
    let text = format!(
        "{}{}.{}{}",
        if neg { "-" } else { "" },
        if int.is_empty() {
            "0".to_owned()
        } else {
            strip_underscores(int)
        },
        strip_underscores(frac),
        exp.map(|e| format!("e{e}")).unwrap_or_default()
    );
    text.parse().ok()
}

/// A JSON object key for a YAML key (Python keeps ints and booleans as keys;
/// JSON has only strings).
fn key_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "null".into(),
        other => other.to_string(),
    }
}

/// A container being built (one per open collection, so their sizes do not
/// matter).
#[allow(clippy::large_enum_variant)]
enum Frame {
    Seq {
        items: Vec<Value>,
        anchor: usize,
        mark: Marker,
    },
    Map {
        map: Map<String, Value>,
        /// Members in order, for a `!!set`.
        set: Option<Vec<Value>>,
        key: Option<(Value, Marker)>,
        /// Keys merged in with `<<`, which explicit keys override.
        merged: Map<String, Value>,
        anchor: usize,
        mark: Marker,
    },
}

struct Builder {
    stack: Vec<Frame>,
    anchors: std::collections::HashMap<usize, Value>,
    done: Option<Value>,
    nodes: usize,
}

fn count(v: &Value) -> usize {
    match v {
        Value::Array(a) => 1 + a.iter().map(count).sum::<usize>(),
        Value::Object(o) => 1 + o.values().map(count).sum::<usize>(),
        _ => 1,
    }
}

impl Builder {
    /// Adds `v`, which makes `weight` new values (1 for a scalar or a finished
    /// collection, whose items were counted as they came; all of an alias's).
    fn add(
        &mut self,
        v: Value,
        weight: usize,
        anchor: usize,
        mark: &Marker,
    ) -> Result<(), YamlError> {
        self.nodes += weight;
        if self.nodes > MAX_NODES {
            return Err(err(
                mark,
                format!("the document expands to more than {MAX_NODES} values (nested aliases?)"),
            ));
        }
        if anchor > 0 {
            self.anchors.insert(anchor, v.clone());
        }
        match self.stack.last_mut() {
            None => {
                if self.done.is_some() {
                    return Err(err(mark, "a second document; expected one"));
                }
                self.done = Some(v);
            }
            Some(Frame::Seq { items, .. }) => items.push(v),
            Some(Frame::Map {
                map,
                set,
                key,
                merged,
                ..
            }) => match key.take() {
                None => *key = Some((v, *mark)),
                // PyYAML refuses them (a dict or list cannot be a dict key or a set
                // member), and their text as a key nests escapes, doubling per level.
                Some((Value::Array(_) | Value::Object(_), kmark)) => {
                    return Err(err(
                        &kmark,
                        "a mapping or sequence as a key or set member; expected a scalar",
                    ));
                }
                Some((k, kmark)) => {
                    if let Some(members) = set {
                        if !v.is_null() {
                            return Err(err(&kmark, "a !!set member with a value"));
                        }
                        members.push(k);
                    } else if k == Value::String("<<".into()) {
                        let sources = match v {
                            Value::Array(a) => a,
                            one => vec![one],
                        };
                        for s in sources {
                            let Value::Object(o) = s else {
                                return Err(err(
                                    &kmark,
                                    "a merge key (<<) whose value is not a mapping",
                                ));
                            };
                            for (mk, mv) in o {
                                merged.entry(mk).or_insert(mv);
                            }
                        }
                    } else {
                        let name = key_text(&k);
                        if map.contains_key(&name) {
                            return Err(err(&kmark, format!("key {name:?} appears twice")));
                        }
                        map.insert(name, v);
                    }
                }
            },
        }
        Ok(())
    }
}

/// Parses a YAML document into a JSON value.
///
/// # Errors
/// [`YamlError`] naming the line.
pub fn parse(text: &str) -> Result<Value, YamlError> {
    let mut parser = Parser::new_from_str(text);
    let mut b = Builder {
        stack: Vec::new(),
        anchors: std::collections::HashMap::new(),
        done: None,
        nodes: 0,
    };
    let mut documents = 0;
    loop {
        let (event, mark) = parser.next_token().map_err(|e| YamlError {
            line: e.marker().line(),
            why: e.info().to_owned(),
        })?;
        match event {
            Event::StreamEnd => break,
            Event::StreamStart | Event::Nothing | Event::DocumentEnd => {}
            Event::DocumentStart => {
                documents += 1;
                if documents > 1 {
                    return Err(err(&mark, "a second document; expected one"));
                }
            }
            Event::Alias(id) => {
                let v = b
                    .anchors
                    .get(&id)
                    .cloned()
                    .ok_or_else(|| err(&mark, "an alias of an unknown anchor"))?;
                let weight = count(&v);
                b.add(v, weight, 0, &mark)?;
            }
            Event::Scalar(value, style, anchor, tag) => {
                let v = match tag_kind(&tag, &mark, text)? {
                    Kind::Str => Value::String(value),
                    Kind::Set | Kind::Seq => {
                        return Err(err(&mark, "a collection tag on a scalar"));
                    }
                    // A quoted scalar is a string unless a tag names its type.
                    Kind::Plain if style == TScalarStyle::Plain || tag.is_some() => resolve(&value),
                    Kind::Plain => Value::String(value),
                };
                b.add(v, 1, anchor, &mark)?;
            }
            Event::SequenceStart(anchor, tag) => {
                if let Kind::Set | Kind::Str = tag_kind(&tag, &mark, text)? {
                    return Err(err(&mark, "a set or string tag on a sequence"));
                }
                b.stack.push(Frame::Seq {
                    items: Vec::new(),
                    anchor,
                    mark,
                });
            }
            Event::MappingStart(anchor, tag) => {
                let set = match tag_kind(&tag, &mark, text)? {
                    Kind::Set => Some(Vec::new()),
                    Kind::Plain => None,
                    Kind::Str | Kind::Seq => {
                        return Err(err(&mark, "a string or sequence tag on a mapping"));
                    }
                };
                b.stack.push(Frame::Map {
                    map: Map::new(),
                    set,
                    key: None,
                    merged: Map::new(),
                    anchor,
                    mark,
                });
            }
            Event::SequenceEnd | Event::MappingEnd => {
                let (v, anchor, start) = match b.stack.pop() {
                    Some(Frame::Seq {
                        items,
                        anchor,
                        mark,
                    }) => (Value::Array(items), anchor, mark),
                    Some(Frame::Map {
                        mut map,
                        set,
                        merged,
                        anchor,
                        mark,
                        ..
                    }) => match set {
                        Some(members) => (Value::Array(members), anchor, mark),
                        None => {
                            for (k, v) in merged {
                                map.entry(k).or_insert(v);
                            }
                            (Value::Object(map), anchor, mark)
                        }
                    },
                    None => return Err(err(&mark, "an unbalanced end of a collection")),
                };
                b.add(v, 1, anchor, &start)?;
            }
        }
    }
    Ok(b.done.unwrap_or(Value::Null))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_what_megatron_bridge_writes() {
        let text = r#"
# written by PyYAML
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
  params_to_save: !!set
    decoder.final_layernorm.weight: null
    output_layer.weight: null
  shape: !!python/tuple
  - 1
  - 2
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
        assert_eq!(
            v["peft"]["params_to_save"],
            json!(["decoder.final_layernorm.weight", "output_layer.weight"])
        );
        assert_eq!(v["peft"]["shape"], json!([1, 2]));
        assert_eq!(v["peft"]["exclude"], json!([]));
        assert_eq!(v["peft"]["names"], json!(["a", "b c", "d"]));
        assert_eq!(v["notes"], json!("line one\n# not a comment\n"));
    }

    #[test]
    fn scalars_are_typed_as_pyyaml_types_them() {
        let v = parse(
            "a: 1e-5\nb: 1.0e-05\nc: 1.0e5\nd: yes\ne: off\nf: 017\ng: 0x1F\nh: 1:30\ni: ~\nj: '1'\nk: .inf\nl: 1_000\nm: .5\nn: -2\no: 1.5e+3\np: 12345678901234567890123\n",
        )
        .unwrap();
        assert_eq!(v["a"], json!("1e-5"));
        assert_eq!(v["b"], json!(1.0e-05));
        assert_eq!(v["c"], json!("1.0e5"));
        assert_eq!(v["d"], json!(true));
        assert_eq!(v["e"], json!(false));
        assert_eq!(v["f"], json!(15));
        assert_eq!(v["g"], json!(31));
        assert_eq!(v["h"], json!(90));
        assert_eq!(v["i"], Value::Null);
        assert_eq!(v["j"], json!("1"));
        assert_eq!(v["k"], json!("inf"));
        assert_eq!(v["l"], json!(1000));
        assert_eq!(v["m"], json!(0.5));
        assert_eq!(v["n"], json!(-2));
        assert_eq!(v["o"], json!(1500.0));
        assert_eq!(v["p"], json!("12345678901234567890123"));
    }

    #[test]
    fn anchors_aliases_and_merge_keys_resolve() {
        let v =
            parse("base: &b {x: 1, y: 2}\nmore:\n  <<: *b\n  y: 3\nlist: &l [1, 2]\nagain: *l\n")
                .unwrap();
        assert_eq!(v["more"], json!({"x": 1, "y": 3}));
        assert_eq!(v["again"], json!([1, 2]));
    }

    #[test]
    fn what_is_not_read_is_refused_with_its_line() {
        assert_eq!(parse("a: 1\na: 2\n").unwrap_err().line, 2);
        assert_eq!(parse("a: [1, 2\n").unwrap_err().line, 2);
        let e = parse("ok: 1\nx: !!python/object/apply:os.system ['true']\n").unwrap_err();
        assert_eq!(e.line, 2);
        assert!(e.why.contains("python/object/apply"), "{}", e.why);
        let e = parse("x: !!python/name:os.system\n").unwrap_err();
        assert!(e.why.contains("import or call code"), "{}", e.why);
        assert!(parse("x: !custom 1\n").is_err());
        assert!(parse("a: 1\n---\nb: 2\n").is_err());
        // Nested aliases that would expand to billions of values.
        let mut bomb = String::from("a: &a [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 0..9 {
            let prev = (b'a' + i) as char;
            let next = (b'a' + i + 1) as char;
            bomb.push_str(&format!(
                "{next}: &{next} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]\n"
            ));
        }
        assert!(parse(&bomb).unwrap_err().why.contains("expands"));
        // Mappings as keys, nested: refused at once (the fuzzer's input ran out of
        // memory when each level's key was the escaped text of the one inside).
        let nested = format!("a:\n  - {}{}\n", "{".repeat(40), "}".repeat(40));
        let e = parse(&nested).unwrap_err();
        assert!(e.why.contains("as a key"), "{}", e.why);
        assert!(
            parse("? [1, 2]\n: x\n")
                .unwrap_err()
                .why
                .contains("as a key")
        );
        assert!(parse("!!set {? {a: 1}}\n").is_err());
    }
}
