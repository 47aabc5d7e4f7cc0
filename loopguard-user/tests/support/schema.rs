//! A validator of the JSON Schema subset docs/events.schema.json uses:
//! `$ref` to `#/$defs/NAME`, `oneOf`, `type` (one or a list), `properties`,
//! `required`, `additionalProperties: false`, `items`, `enum`, `const`,
//! `minimum`, and `format: date-time` (RFC 3339). Any other keyword in the
//! schema is an error, so the schema cannot grow past what is checked.

use serde_json::Value;

/// The schema of loopguard's events.
pub fn events_schema() -> Value {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/events.schema.json"
    ))
    .expect("read docs/events.schema.json");
    serde_json::from_str(&text).expect("docs/events.schema.json is JSON")
}

const KNOWN: [&str; 16] = [
    "$schema",
    "$id",
    "$ref",
    "$defs",
    "title",
    "description",
    "oneOf",
    "type",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "enum",
    "const",
    "minimum",
    "format",
];

fn type_matches(name: &str, value: &Value) -> bool {
    match name {
        "null" => value.is_null(),
        "boolean" => value.is_boolean(),
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "number" => value.is_number(),
        "integer" => value.is_u64() || value.is_i64(),
        other => panic!("schema: unknown type {other}"),
    }
}

fn is_date_time(text: &str) -> bool {
    let b = text.as_bytes();
    let digits = |range: std::ops::Range<usize>| {
        range
            .into_iter()
            .all(|i| b.get(i).is_some_and(u8::is_ascii_digit))
    };
    b.len() >= 20
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && b[10] == b'T'
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19)
        && (b.len() == 20 || (b[19] == b'.' && digits(20..b.len() - 1)))
        && b[b.len() - 1] == b'Z'
}

/// Checks `value` against `schema` (a part of `root`); errors name the path.
pub fn check(root: &Value, schema: &Value, value: &Value, path: &str, errors: &mut Vec<String>) {
    let Some(rules) = schema.as_object() else {
        panic!("schema at {path} is not an object");
    };
    for key in rules.keys() {
        assert!(
            KNOWN.contains(&key.as_str()),
            "schema keyword {key} at {path} is not supported by this validator"
        );
    }
    if let Some(reference) = rules.get("$ref").and_then(Value::as_str) {
        let name = reference
            .strip_prefix("#/$defs/")
            .unwrap_or_else(|| panic!("unsupported $ref {reference}"));
        let target = &root["$defs"][name];
        assert!(!target.is_null(), "$ref to a missing definition {name}");
        check(root, target, value, path, errors);
    }
    if let Some(options) = rules.get("oneOf").and_then(Value::as_array) {
        let mut failures = Vec::new();
        let passing = options
            .iter()
            .filter(|option| {
                let mut found = Vec::new();
                check(root, option, value, path, &mut found);
                let ok = found.is_empty();
                failures.extend(found);
                ok
            })
            .count();
        if passing != 1 {
            errors.push(format!(
                "{path}: matches {passing} of the oneOf options, not exactly one ({})",
                failures.join("; ")
            ));
            return;
        }
    }
    if let Some(kind) = rules.get("type") {
        let names: Vec<&str> = match kind {
            Value::String(name) => vec![name.as_str()],
            Value::Array(names) => names.iter().filter_map(Value::as_str).collect(),
            other => panic!("bad type {other}"),
        };
        if !names.iter().any(|name| type_matches(name, value)) {
            errors.push(format!("{path}: {value} is not of type {kind}"));
            return;
        }
    }
    if let Some(expected) = rules.get("const")
        && value != expected
    {
        errors.push(format!("{path}: {value} is not {expected}"));
    }
    if let Some(allowed) = rules.get("enum").and_then(Value::as_array)
        && !allowed.contains(value)
    {
        errors.push(format!("{path}: {value} is not one of {allowed:?}"));
    }
    if let (Some(minimum), Some(number)) =
        (rules.get("minimum").and_then(Value::as_f64), value.as_f64())
        && number < minimum
    {
        errors.push(format!("{path}: {number} is below {minimum}"));
    }
    if rules.get("format").and_then(Value::as_str) == Some("date-time")
        && let Some(text) = value.as_str()
        && !is_date_time(text)
    {
        errors.push(format!("{path}: {text:?} is not an RFC 3339 date-time"));
    }
    if let Some(object) = value.as_object() {
        let properties = rules.get("properties").and_then(Value::as_object);
        for required in rules
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let name = required.as_str().unwrap();
            if !object.contains_key(name) {
                errors.push(format!("{path}: missing {name}"));
            }
        }
        for (name, field) in object {
            match properties.and_then(|p| p.get(name)) {
                Some(rule) => check(root, rule, field, &format!("{path}.{name}"), errors),
                None if rules.get("additionalProperties") == Some(&Value::Bool(false)) => {
                    errors.push(format!("{path}: {name} is not in the schema"));
                }
                None => {}
            }
        }
    }
    if let (Some(items), Some(array)) = (rules.get("items"), value.as_array()) {
        for (index, item) in array.iter().enumerate() {
            check(root, items, item, &format!("{path}[{index}]"), errors);
        }
    }
}

/// Panics with every problem unless each of `events` follows the schema.
pub fn assert_events_follow_schema<'a>(events: impl IntoIterator<Item = &'a Value>) {
    let schema = events_schema();
    let mut errors = Vec::new();
    let mut count = 0;
    for event in events {
        count += 1;
        let kind = event["type"].as_str().unwrap_or("?");
        check(
            &schema,
            &schema,
            event,
            &format!("({kind} #{count})"),
            &mut errors,
        );
    }
    assert!(count > 0, "no events to check");
    assert!(
        errors.is_empty(),
        "events do not follow docs/events.schema.json:\n{}",
        errors.join("\n")
    );
}
