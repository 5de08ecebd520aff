//! Writes a kubeconfig document as YAML that kubectl reads back with the same values.
//!
//! serde_yaml writes YAML 1.2 and leaves strings such as `on`, `yes`, `n` or `1_000` unquoted,
//! because YAML 1.2 reads them as strings. kubectl (sigs.k8s.io/yaml over go-yaml v2) reads
//! YAML 1.1, where they are booleans and numbers: a namespace named `on`, quoted in the user's
//! file, would come back as `"true"` after a round trip through serde_yaml. So documents are
//! written here instead: block style like kubectl's own output, strings plain only when they
//! cannot be anything but a string under either YAML version, double-quoted otherwise.

use serde_yaml::value::TaggedValue;
use serde_yaml::{Mapping, Number, Value};
use std::fmt::Write as _;

/// The document as YAML text, ending in a newline.
pub(super) fn to_string(value: &Value) -> String {
    let mut out = String::new();
    match value {
        Value::Mapping(m) if !m.is_empty() => block_mapping(&mut out, m, 0, false),
        Value::Sequence(s) if !s.is_empty() => block_sequence(&mut out, s, 0),
        Value::Tagged(t) => after_indicator(&mut out, &Value::Tagged(t.clone()), 0),
        other => {
            out.push_str(&inline(other, false));
            out.push('\n');
        }
    }
    out
}

fn pad(out: &mut String, indent: usize) {
    out.extend(std::iter::repeat_n(' ', indent));
}

/// Writes `m`'s entries at `indent`; with `first_inline` the first line's indentation is
/// already written (a mapping that starts after `- `).
fn block_mapping(out: &mut String, m: &Mapping, indent: usize, first_inline: bool) {
    for (i, (k, v)) in m.iter().enumerate() {
        if i > 0 || !first_inline {
            pad(out, indent);
        }
        out.push_str(&key(k));
        out.push(':');
        match v {
            Value::Mapping(inner) if !inner.is_empty() => {
                out.push('\n');
                block_mapping(out, inner, indent + 2, false);
            }
            // Sequences under a key at the key's own indentation, as kubectl writes them.
            Value::Sequence(items) if !items.is_empty() => {
                out.push('\n');
                block_sequence(out, items, indent);
            }
            other => after_indicator(out, other, indent + 2),
        }
    }
}

fn block_sequence(out: &mut String, items: &[Value], indent: usize) {
    for item in items {
        pad(out, indent);
        out.push('-');
        match item {
            Value::Mapping(m) if !m.is_empty() => {
                out.push(' ');
                block_mapping(out, m, indent + 2, true);
            }
            Value::Sequence(s) if !s.is_empty() => {
                out.push('\n');
                block_sequence(out, s, indent + 2);
            }
            other => after_indicator(out, other, indent + 2),
        }
    }
}

/// Writes a scalar, empty collection or tagged value after `key:` or `-`; a tagged collection
/// continues on the next lines at `indent`.
fn after_indicator(out: &mut String, value: &Value, indent: usize) {
    match value {
        Value::Tagged(t) => {
            let TaggedValue { tag, value } = &**t;
            let _ = write!(out, " {tag}");
            match value {
                Value::Mapping(m) if !m.is_empty() => {
                    out.push('\n');
                    block_mapping(out, m, indent, false);
                }
                Value::Sequence(s) if !s.is_empty() => {
                    out.push('\n');
                    block_sequence(out, s, indent);
                }
                other => after_indicator(out, other, indent),
            }
        }
        other => {
            out.push(' ');
            out.push_str(&inline(other, false));
            out.push('\n');
        }
    }
}

/// A mapping key: a scalar as in block context, a collection in flow style.
fn key(k: &Value) -> String {
    inline(k, false)
}

/// A value on one line (flow style for collections); `flow` when already inside a flow
/// collection.
fn inline(v: &Value, flow: bool) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => number(n),
        Value::String(s) => string(s, flow),
        Value::Sequence(items) => {
            let items: Vec<String> = items.iter().map(|i| inline(i, true)).collect();
            format!("[{}]", items.join(", "))
        }
        Value::Mapping(m) => {
            let entries: Vec<String> = m
                .iter()
                .map(|(k, v)| format!("{}: {}", inline(k, true), inline(v, true)))
                .collect();
            format!("{{{}}}", entries.join(", "))
        }
        Value::Tagged(t) => format!("{} {}", t.tag, inline(&t.value, flow)),
    }
}

fn number(n: &Number) -> String {
    match n.as_f64() {
        Some(f) if n.is_f64() && f.is_nan() => ".nan".into(),
        Some(f) if n.is_f64() && f.is_infinite() => if f > 0.0 { ".inf" } else { "-.inf" }.into(),
        _ => n.to_string(),
    }
}

/// Words YAML 1.1 reads as booleans or null when plain (compared case-insensitively).
const YAML11_WORDS: [&str; 9] = ["y", "n", "yes", "no", "true", "false", "on", "off", "null"];

/// Whether `s` can be written plain and be read back as this string by YAML 1.1 and 1.2
/// parsers alike. Deliberately narrow: a letter, `_` or `/` first (no number, date, `.inf`,
/// `~`, `<<`, `=` or indicator can start it), then letters, digits and `_./@+=-` (plus `:` in
/// block context, never last), and not one of YAML 1.1's boolean or null words.
fn plain_ok(s: &str, flow: bool) -> bool {
    let mut chars = s.chars();
    let Some(first) = chars.next() else {
        return false;
    };
    if !(first.is_ascii_alphabetic() || first == '_' || first == '/') {
        return false;
    }
    let body_ok = s
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "_./@+=-".contains(c) || (c == ':' && !flow));
    body_ok && !s.ends_with(':') && !YAML11_WORDS.iter().any(|w| w.eq_ignore_ascii_case(s))
}

/// `s` as a plain or double-quoted scalar.
fn string(s: &str, flow: bool) -> String {
    if plain_ok(s, flow) {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            // Controls, DEL and C1 (including NEL, a YAML line break), the Unicode line and
            // paragraph separators (line breaks in YAML 1.1), the BOM and non-characters.
            c if (c as u32) < 0x20
                || (0x7f..=0x9f).contains(&(c as u32))
                || matches!(
                    c,
                    '\u{2028}' | '\u{2029}' | '\u{feff}' | '\u{fffe}' | '\u{ffff}'
                ) =>
            {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn round_trip(v: &Value) -> Value {
        let text = to_string(v);
        serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{e}\n{text}"))
    }

    #[test]
    fn ambiguous_strings_are_quoted() {
        for s in [
            "on",
            "Off",
            "YES",
            "no",
            "y",
            "N",
            "true",
            "False",
            "null",
            "Null",
            "~",
            "",
            "1_000",
            "010",
            "0x10",
            "1e3",
            "2001-01-01",
            "1:20",
            ".inf",
            ".nan",
            "-1",
            "+1",
            "=",
            "<<",
            "a: b",
            "a #b",
            "key:",
            "- x",
            "[x]",
            "{x}",
            "*ref",
            "&anchor",
            "!tag",
            "%x",
            "@x",
            "`x",
            "|",
            ">",
            "'q'",
            "\"q\"",
            " lead",
            "trail ",
            "a\nb",
            "é",
        ] {
            let out = string(s, false);
            assert!(out.starts_with('"'), "{s:?} must be quoted, got {out}");
            let back: String = serde_yaml::from_str(&out).unwrap();
            assert_eq!(back, s);
        }
    }

    #[test]
    fn ordinary_strings_stay_plain() {
        for s in [
            "gatevm-box",
            "https://127.0.0.1:6443",
            "LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCg==",
            "client.authentication.k8s.io/v1",
            "default",
            "/etc/ca.crt",
            "user@example.com",
        ] {
            assert_eq!(string(s, false), s);
        }
        // In flow context a colon is quoted (older libyaml rejects it there).
        assert!(string("https://x:1", true).starts_with('"'));
    }

    #[test]
    fn kubectl_like_layout() {
        let v: Value = serde_yaml::from_str(
            "apiVersion: v1\nclusters:\n- cluster:\n    server: https://h:1\n  name: a\n\
             contexts: []\npreferences: {}\ncurrent-context: a\n",
        )
        .unwrap();
        assert_eq!(
            to_string(&v),
            "apiVersion: v1\nclusters:\n- cluster:\n    server: https://h:1\n  name: a\n\
             contexts: []\npreferences: {}\ncurrent-context: a\n"
        );
    }

    #[test]
    fn special_values_round_trip() {
        let text = "a: !custom {x: 1}\nb: !t [1, 2]\nc: !s text\n? [k]\n: v\n1: one\nnull: z\n\
                    f: .inf\ng: -.inf\nh: 1.5\nn: ~\nl:\n- - 1\n  - []\n- {}\n- !m {p: q}\n";
        let v: Value = serde_yaml::from_str(text).unwrap();
        assert_eq!(round_trip(&v), v);
        let nan: Value = serde_yaml::from_str("x: .nan").unwrap();
        assert!(round_trip(&nan)["x"].as_f64().unwrap().is_nan());
    }

    fn value() -> impl Strategy<Value = Value> {
        let scalar = prop_oneof![
            any::<String>().prop_map(Value::String),
            "[a-zA-Z0-9 _.:/@+=#-]{0,10}".prop_map(Value::String),
            prop::sample::select(vec![
                "on",
                "yes",
                "n",
                "1_000",
                "0x1",
                "null",
                "~",
                "é\u{85}x"
            ])
            .prop_map(|s| Value::String(s.into())),
            any::<i64>().prop_map(|n| Value::Number(n.into())),
            any::<u64>().prop_map(|n| Value::Number(n.into())),
            (-1e9f64..1e9).prop_map(|f| Value::Number(f.into())),
            any::<bool>().prop_map(Value::Bool),
            Just(Value::Null),
        ];
        scalar.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Sequence),
                prop::collection::vec((inner.clone(), inner.clone()), 0..4)
                    .prop_map(|kv| Value::Mapping(kv.into_iter().collect())),
                ("![a-z]{1,5}", inner).prop_map(|(tag, value)| {
                    Value::Tagged(Box::new(TaggedValue {
                        tag: serde_yaml::value::Tag::new(tag),
                        value,
                    }))
                }),
            ]
        })
    }

    proptest! {
        #[test]
        fn any_document_round_trips(v in value()) {
            // A tag on a tagged value is not representable; serde_yaml cannot write it either.
            prop_assume!(!nested_tag(&v));
            prop_assert_eq!(round_trip(&v), v);
        }
    }

    fn nested_tag(v: &Value) -> bool {
        match v {
            Value::Tagged(t) => matches!(t.value, Value::Tagged(_)) || nested_tag(&t.value),
            Value::Sequence(s) => s.iter().any(nested_tag),
            Value::Mapping(m) => m.iter().any(|(k, v)| nested_tag(k) || nested_tag(v)),
            _ => false,
        }
    }
}
