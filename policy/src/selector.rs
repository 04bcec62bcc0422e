//! Kubernetes label selectors (`matchLabels`, `matchExpressions`) and label syntax.

use std::collections::BTreeMap;

use serde::Deserialize;

/// Labels of a pod or a namespace.
pub type Labels = BTreeMap<String, String>;

/// A label-selector operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Operator {
    /// The label's value is one of the values.
    In,
    /// The label is absent or its value is none of the values.
    NotIn,
    /// The label is present.
    Exists,
    /// The label is absent.
    DoesNotExist,
}

/// One requirement of a selector.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Requirement {
    /// The label key.
    pub key: String,
    /// The operator.
    pub operator: Operator,
    /// The values (sorted; empty for `Exists` and `DoesNotExist`).
    pub values: Vec<String>,
}

impl Requirement {
    fn matches(&self, labels: &Labels) -> bool {
        let v = labels.get(&self.key);
        match self.operator {
            Operator::In => v.is_some_and(|v| self.values.iter().any(|x| x == v)),
            Operator::NotIn => !v.is_some_and(|v| self.values.iter().any(|x| x == v)),
            Operator::Exists => v.is_some(),
            Operator::DoesNotExist => v.is_none(),
        }
    }
}

/// A validated label selector. The empty selector matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Selector {
    /// `matchLabels`.
    pub match_labels: Labels,
    /// `matchExpressions`, in input order.
    pub expressions: Vec<Requirement>,
}

impl Selector {
    /// The selector that matches everything (`{}`).
    pub fn everything() -> Selector {
        Selector::default()
    }

    /// Whether this selector matches every label set.
    pub fn is_everything(&self) -> bool {
        self.match_labels.is_empty() && self.expressions.is_empty()
    }

    /// Whether the labels satisfy every requirement.
    pub fn matches(&self, labels: &Labels) -> bool {
        self.match_labels.iter().all(|(k, v)| labels.get(k) == Some(v))
            && self.expressions.iter().all(|r| r.matches(labels))
    }

    /// One `key=value` pair that every matching label set has, when there is one: used to index
    /// selectors by label.
    pub fn anchor(&self) -> Option<(&str, &str)> {
        if let Some((k, v)) = self.match_labels.iter().next() {
            return Some((k, v));
        }
        self.expressions.iter().find_map(|r| match (r.operator, r.values.as_slice()) {
            (Operator::In, [v]) => Some((r.key.as_str(), v.as_str())),
            _ => None,
        })
    }
}

impl std::fmt::Display for Selector {
    /// The `kubectl` form: `app=web,tier in (a,b),!debug`; `{}` matches everything.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_everything() {
            return f.write_str("{}");
        }
        let mut parts: Vec<String> = self.match_labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        for r in &self.expressions {
            parts.push(match r.operator {
                Operator::In => format!("{} in ({})", r.key, r.values.join(",")),
                Operator::NotIn => format!("{} notin ({})", r.key, r.values.join(",")),
                Operator::Exists => r.key.clone(),
                Operator::DoesNotExist => format!("!{}", r.key),
            });
        }
        f.write_str(&parts.join(","))
    }
}

/// A selector as written in a manifest.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RawSelector {
    #[serde(default)]
    match_labels: Option<BTreeMap<String, String>>,
    #[serde(default)]
    match_expressions: Option<Vec<RawRequirement>>,
}

#[derive(Clone, Debug, Deserialize)]
struct RawRequirement {
    #[serde(default)]
    key: String,
    #[serde(default)]
    operator: String,
    #[serde(default)]
    values: Option<Vec<String>>,
}

/// A selector error: the field below the selector and what is wrong.
pub type FieldError = (String, String);

impl RawSelector {
    /// Validates the selector as the Kubernetes API server does.
    pub fn validate(&self) -> Result<Selector, FieldError> {
        let mut sel = Selector::default();
        for (k, v) in self.match_labels.iter().flatten() {
            validate_key(k).map_err(|e| (format!("matchLabels.{k}"), e))?;
            validate_value(v).map_err(|e| (format!("matchLabels.{k}"), e))?;
            sel.match_labels.insert(k.clone(), v.clone());
        }
        for (i, r) in self.match_expressions.iter().flatten().enumerate() {
            let field = |f: &str| format!("matchExpressions[{i}].{f}");
            validate_key(&r.key).map_err(|e| (field("key"), e))?;
            let operator = match r.operator.as_str() {
                "In" => Operator::In,
                "NotIn" => Operator::NotIn,
                "Exists" => Operator::Exists,
                "DoesNotExist" => Operator::DoesNotExist,
                other => {
                    return Err((
                        field("operator"),
                        format!("unknown operator {other:?}; expected In, NotIn, Exists or DoesNotExist"),
                    ));
                }
            };
            let mut values = r.values.clone().unwrap_or_default();
            match operator {
                Operator::In | Operator::NotIn if values.is_empty() => {
                    return Err((field("values"), format!("must be non-empty for operator {}", r.operator)));
                }
                Operator::Exists | Operator::DoesNotExist if !values.is_empty() => {
                    return Err((field("values"), format!("must be empty for operator {}", r.operator)));
                }
                _ => {}
            }
            for (j, v) in values.iter().enumerate() {
                validate_value(v).map_err(|e| (format!("matchExpressions[{i}].values[{j}]"), e))?;
            }
            values.sort();
            values.dedup();
            sel.expressions.push(Requirement { key: r.key.clone(), operator, values });
        }
        Ok(sel)
    }
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.'
}

/// Validates a label name part or value body: at most 63 characters, alphanumerics, `-`, `_`, `.`,
/// beginning and ending with an alphanumeric.
fn validate_name(s: &str, what: &str) -> Result<(), String> {
    if s.len() > 63 {
        return Err(format!("{what} {s:?} is longer than 63 characters"));
    }
    let ok_ends = s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && s.chars().last().is_some_and(|c| c.is_ascii_alphanumeric());
    if !ok_ends || !s.chars().all(is_name_char) {
        return Err(format!(
            "{what} {s:?} is not valid: use alphanumerics, '-', '_' or '.', beginning and ending with an alphanumeric"
        ));
    }
    Ok(())
}

/// Validates a label key: `[prefix/]name`, the prefix a DNS subdomain.
pub fn validate_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if name.is_empty() {
        return Err(format!("label key {key:?} has an empty name"));
    }
    validate_name(name, "label key name")?;
    if let Some(p) = prefix {
        let dns_ok = !p.is_empty()
            && p.len() <= 253
            && p.split('.').all(|part| {
                !part.is_empty()
                    && part.len() <= 63
                    && part.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                    && !part.starts_with('-')
                    && !part.ends_with('-')
            });
        if !dns_ok {
            return Err(format!("label key prefix {p:?} is not a DNS subdomain (lower case, '.', '-')"));
        }
    }
    Ok(())
}

/// Validates a label value: empty, or a valid name.
pub fn validate_value(v: &str) -> Result<(), String> {
    if v.is_empty() { Ok(()) } else { validate_name(v, "label value") }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(v: &[(&str, &str)]) -> Labels {
        v.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    fn raw(json: &str) -> RawSelector {
        serde_json::from_str(json).unwrap_or_default()
    }

    #[test]
    fn operators() {
        let l = labels(&[("app", "web"), ("tier", "front")]);
        let cases = [
            (r#"{}"#, true),
            (r#"{"matchLabels":{"app":"web"}}"#, true),
            (r#"{"matchLabels":{"app":"db"}}"#, false),
            (r#"{"matchExpressions":[{"key":"app","operator":"In","values":["db","web"]}]}"#, true),
            (r#"{"matchExpressions":[{"key":"app","operator":"NotIn","values":["web"]}]}"#, false),
            (r#"{"matchExpressions":[{"key":"zone","operator":"NotIn","values":["a"]}]}"#, true),
            (r#"{"matchExpressions":[{"key":"tier","operator":"Exists"}]}"#, true),
            (r#"{"matchExpressions":[{"key":"tier","operator":"DoesNotExist"}]}"#, false),
            (r#"{"matchExpressions":[{"key":"x","operator":"DoesNotExist"}]}"#, true),
            (
                r#"{"matchLabels":{"app":"web"},"matchExpressions":[{"key":"tier","operator":"In","values":["back"]}]}"#,
                false,
            ),
        ];
        for (json, want) in cases {
            let sel = raw(json).validate();
            assert_eq!(sel.map(|s| s.matches(&l)), Ok(want), "{json}");
        }
    }

    #[test]
    fn invalid_selectors_name_the_field() {
        let cases = [
            (r#"{"matchLabels":{"-bad":"x"}}"#, "matchLabels.-bad"),
            (r#"{"matchLabels":{"app":"white space"}}"#, "matchLabels.app"),
            (r#"{"matchLabels":{"Bad_Prefix/app":"x"}}"#, "matchLabels.Bad_Prefix/app"),
            (
                r#"{"matchExpressions":[{"key":"a","operator":"Equals","values":["x"]}]}"#,
                "matchExpressions[0].operator",
            ),
            (r#"{"matchExpressions":[{"key":"a","operator":"In"}]}"#, "matchExpressions[0].values"),
            (r#"{"matchExpressions":[{"key":"a","operator":"Exists","values":["x"]}]}"#, "matchExpressions[0].values"),
            (
                r#"{"matchExpressions":[{"key":"a","operator":"In","values":["ok","no!"]}]}"#,
                "matchExpressions[0].values[1]",
            ),
        ];
        for (json, field) in cases {
            match raw(json).validate() {
                Err((f, _)) => assert_eq!(f, field, "{json}"),
                Ok(s) => unreachable!("{json} accepted as {s}"),
            }
        }
    }

    #[test]
    fn keys_and_values() {
        assert!(validate_key("kubernetes.io/metadata.name").is_ok());
        assert!(validate_key("app.kubernetes.io/part-of").is_ok());
        assert!(validate_key("a/b/c").is_err());
        assert!(validate_key(&"x".repeat(64)).is_err());
        assert!(validate_value("").is_ok());
        assert!(validate_value("v1.2_3-x").is_ok());
        assert!(validate_value("end-").is_err());
    }
}
