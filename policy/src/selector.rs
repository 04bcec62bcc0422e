//! Kubernetes label selectors (`matchLabels`, `matchExpressions`) and label syntax.

use std::collections::BTreeMap;

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
