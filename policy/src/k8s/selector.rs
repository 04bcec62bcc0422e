//! Label selectors as written in a manifest, validated into [`Selector`]s.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::error::{LoadError, Origin};
use crate::selector::{Operator, Requirement, Selector, validate_key, validate_value};

/// A selector as written in a manifest.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct RawSelector {
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
pub(crate) type FieldError = (String, String);

/// Validates the selector at `field` of the object at `origin`; an absent one selects everything.
pub(crate) fn selector_at(raw: Option<&RawSelector>, origin: &Origin, field: &str) -> Result<Selector, LoadError> {
    match raw {
        None => Ok(Selector::everything()),
        Some(r) => r.validate().map_err(|(f, e)| origin.invalid(format!("{field}.{f}"), e)),
    }
}

impl RawSelector {
    /// Validates the selector as the Kubernetes API server does.
    pub(crate) fn validate(&self) -> Result<Selector, FieldError> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::selector::Labels;

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
}
