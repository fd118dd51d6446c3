//! The configuration reference (docs/config-reference.md), rendered from the schema's JSON
//! schema: per section its keys, their types, defaults and the doc comments of
//! [`super::schema`], so the reference cannot drift from what is read.

use std::collections::BTreeSet;

use serde_json::{Map, Value};

use super::schema::Config;

/// The JSON schema of a configuration file.
pub fn json_schema() -> Value {
    serde_json::to_value(schemars::schema_for!(Config)).expect("a schema is JSON")
}

/// The keys (and enum values, and sections) without a description: each must have a doc
/// comment, since the reference is made of them.
pub fn undocumented() -> Vec<String> {
    undocumented_in(&json_schema())
}

/// The keys, enum values and types of `schema` without a description.
pub fn undocumented_in(schema: &Value) -> Vec<String> {
    let defs = definitions(schema);
    let mut out = Vec::new();
    let mut pending = vec![(String::new(), schema)];
    let mut seen = BTreeSet::new();
    while let Some((path, object)) = pending.pop() {
        if !path.is_empty() && description(object).is_none() {
            out.push(path.clone());
        }
        for (key, property) in properties(object) {
            let key_path = if path.is_empty() {
                key.clone()
            } else {
                format!("{path}.{key}")
            };
            if description(property).is_none() {
                out.push(key_path.clone());
            }
            for name in referenced(property) {
                let Some(def) = defs.get(&name) else { continue };
                if is_object(def) && seen.insert(name.clone()) {
                    pending.push((key_path.clone(), def));
                }
            }
        }
    }
    for (name, def) in &defs {
        if description(def).is_none() {
            out.push(format!("type {name}"));
        }
        for (value, text) in enum_values(def) {
            if text.is_empty() {
                out.push(format!("{name}::{value}"));
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// The reference in Markdown.
pub fn markdown() -> String {
    let schema = json_schema();
    let defs = definitions(&schema);
    let mut out = String::from(
        "# Configuration reference\n\n\
         <!-- Rendered from ntp-user/src/config/schema.rs by \
         `NTP_XDP_BLESS=1 cargo test -p ntp-user --test config_reference`; do not edit. -->\n\n",
    );
    out += &format!(
        "{}\n\n",
        one_paragraph(description(&schema).unwrap_or_default())
    );
    out += "Sections and keys are in alphabetical order. A key with neither a default nor \
            \"optional\" is required; durations are written like `500ms`, `30s`, `1h` or `1d`. \
            Unknown keys are errors.\n\n";
    // Tables of tables (a section's key holding a list of tables), rendered after the sections.
    let mut nested: Vec<(String, String)> = Vec::new();
    for (key, property) in properties(&schema) {
        let (def_name, list) = section_def(property);
        let Some(def) = defs.get(&def_name) else {
            continue;
        };
        let heading = if list {
            format!("[[{key}]]")
        } else {
            format!("[{key}]")
        };
        out += &format!("## `{heading}`\n\n");
        let presence = if list {
            "A list: one table per entry, or none."
        } else if required(&schema).contains(&key) {
            "Required."
        } else if property.get("default").is_some() {
            "Optional; absent, every key takes its default."
        } else {
            "Optional; absent, the feature is off."
        };
        out += &format!(
            "{}\n\n{presence}\n\n",
            one_paragraph(
                description(def)
                    .or(description(property))
                    .unwrap_or_default()
            )
        );
        out += &table(key, def, &defs, &mut nested);
    }
    let mut done = BTreeSet::new();
    while let Some((path, def_name)) = nested.pop() {
        if !done.insert(path.clone()) {
            continue;
        }
        let def = &defs[&def_name];
        out += &format!(
            "## `{path}` entries\n\n{}\n\n",
            one_paragraph(description(def).unwrap_or_default())
        );
        out += &table(&path, def, &defs, &mut nested);
    }
    out += "## Types\n\n";
    for (name, def) in &defs {
        if is_object(def) {
            continue;
        }
        out += &format!(
            "### {name}\n\n{}\n\n",
            one_paragraph(
                def.get("title")
                    .and_then(Value::as_str)
                    .map(|t| format!("{t}: {}", description(def).unwrap_or_default()))
                    .as_deref()
                    .or(description(def))
                    .unwrap_or_default()
            )
        );
        let values = enum_values(def);
        if !values.is_empty() {
            for (value, text) in values {
                out += &format!("- `\"{value}\"`: {}\n", one_paragraph(&text));
            }
            out += "\n";
        }
        if let Some(examples) = def.get("examples").and_then(Value::as_array) {
            let examples: Vec<String> = examples.iter().map(|e| format!("`{e}`")).collect();
            out += &format!("Examples: {}.\n\n", examples.join(", "));
        }
    }
    out.truncate(out.trim_end().len());
    out.push('\n');
    out
}

/// A section's table of keys; object-valued keys are queued in `nested`.
fn table(
    path: &str,
    def: &Value,
    defs: &Map<String, Value>,
    nested: &mut Vec<(String, String)>,
) -> String {
    let mut out =
        String::from("| Key | Type | Default | Description |\n| --- | --- | --- | --- |\n");
    let required = required(def);
    for (key, property) in properties(def) {
        for name in referenced(property) {
            if defs.get(&name).is_some_and(is_object) {
                nested.push((format!("{path}.{key}"), name));
            }
        }
        let default = match property.get("default") {
            Some(Value::Null) | None if required.contains(&key) => "required".to_string(),
            Some(Value::Null) | None => "optional".to_string(),
            Some(v) => format!("`{}`", toml_value(v)),
        };
        out += &format!(
            "| `{key}` | {} | {default} | {} |\n",
            type_name(property, defs).replace('|', "\\|"),
            one_paragraph(description(property).unwrap_or_default()).replace('|', "\\|")
        );
    }
    out + "\n"
}

/// How a value is written in TOML.
fn toml_value(v: &Value) -> String {
    match v {
        Value::Array(items) => format!(
            "[{}]",
            items.iter().map(toml_value).collect::<Vec<_>>().join(", ")
        ),
        other => other.to_string(),
    }
}

/// A key's type for a reader: a named type (its own heading under Types), or a JSON type
/// with its format.
fn type_name(property: &Value, defs: &Map<String, Value>) -> String {
    if let Some(name) = ref_name(property) {
        return match defs.get(&name) {
            Some(def) if is_object(def) => "table".into(),
            _ => format!("[{name}](#{})", name.to_lowercase()),
        };
    }
    for key in ["anyOf", "oneOf"] {
        if let Some(options) = property.get(key).and_then(Value::as_array) {
            let names: Vec<String> = options
                .iter()
                .filter(|o| o.get("type").and_then(Value::as_str) != Some("null"))
                .map(|o| type_name(o, defs))
                .collect();
            return names.join(" or ");
        }
    }
    let kind = match property.get("type") {
        Some(Value::String(s)) => s.as_str(),
        Some(Value::Array(kinds)) => kinds
            .iter()
            .filter_map(Value::as_str)
            .find(|k| *k != "null")
            .unwrap_or("null"),
        _ => "any",
    };
    match kind {
        "array" => {
            let items = property
                .get("items")
                .map_or_else(|| "any".to_string(), |i| type_name(i, defs));
            let items = if items == "table" {
                "tables".into()
            } else {
                items
            };
            match (property.get("minItems"), property.get("maxItems")) {
                (Some(a), Some(b)) if a == b => format!("{a} × {items}"),
                _ => format!("list of {items}"),
            }
        }
        "string" => match property.get("format").and_then(Value::as_str) {
            Some("ip") => "IP address".into(),
            Some("ipv4") => "IPv4 address".into(),
            Some("ipv6") => "IPv6 address".into(),
            Some(f) => f.into(),
            None => "string".into(),
        },
        "integer" => match property.get("format").and_then(Value::as_str) {
            Some(f @ ("int8" | "uint8" | "uint16" | "int32" | "uint32" | "int64" | "uint64")) => {
                format!("integer ({f})")
            }
            _ => "integer".into(),
        },
        other => other.into(),
    }
}

fn definitions(schema: &Value) -> Map<String, Value> {
    schema
        .get("$defs")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default()
}

fn properties(object: &Value) -> Vec<(&String, &Value)> {
    object
        .get("properties")
        .and_then(Value::as_object)
        .map(|p| p.iter().collect())
        .unwrap_or_default()
}

fn required(object: &Value) -> Vec<&String> {
    let Some(list) = object.get("required").and_then(Value::as_array) else {
        return Vec::new();
    };
    properties(object)
        .into_iter()
        .map(|(k, _)| k)
        .filter(|k| list.iter().any(|r| r.as_str() == Some(k.as_str())))
        .collect()
}

fn description(v: &Value) -> Option<&str> {
    v.get("description").and_then(Value::as_str)
}

fn is_object(def: &Value) -> bool {
    def.get("type").and_then(Value::as_str) == Some("object")
}

fn ref_name(v: &Value) -> Option<String> {
    v.get("$ref")
        .and_then(Value::as_str)
        .and_then(|r| r.strip_prefix("#/$defs/"))
        .map(str::to_string)
}

/// Every definition a property names, however nested (options, list items).
fn referenced(v: &Value) -> Vec<String> {
    let mut out: Vec<String> = ref_name(v).into_iter().collect();
    for key in ["anyOf", "oneOf"] {
        for o in v.get(key).and_then(Value::as_array).into_iter().flatten() {
            out.extend(referenced(o));
        }
    }
    if let Some(items) = v.get("items") {
        out.extend(referenced(items));
    }
    out
}

/// The definition a top-level key holds, and whether it is a list of them.
fn section_def(property: &Value) -> (String, bool) {
    let list = property.get("type").and_then(Value::as_str) == Some("array");
    let name = referenced(property).into_iter().next().unwrap_or_default();
    (name, list)
}

/// An enum's values and their descriptions.
fn enum_values(def: &Value) -> Vec<(String, String)> {
    def.get("oneOf")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|o| {
            let value = o.get("const").and_then(Value::as_str)?;
            Some((
                value.to_string(),
                description(o).unwrap_or_default().to_string(),
            ))
        })
        .collect()
}

/// A doc comment's lines as one paragraph.
fn one_paragraph(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}
