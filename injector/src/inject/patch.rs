//! The JSON Patch operations injection is made of, against the pod exactly
//! as the API server sent it: a list or map that is missing is added whole,
//! one that exists gets its items one by one, and every key is escaped as a
//! JSON Pointer token.

use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, PatchOperation};
use k8s_openapi::api::core::v1::Container;
use serde_json::{Value, json};

use super::env::PROXY_VARS;

/// Adds to one container the variables it does not set itself. Each pair of
/// proxy spellings counts as one: if the container sets either, both stay as
/// they are (programs disagree on which one wins).
pub(super) fn add_env(
    ops: &mut Vec<PatchOperation>,
    list: &str,
    index: usize,
    container: &Container,
    env: &[(String, String)],
) {
    let existing: Vec<&str> = container
        .env
        .iter()
        .flatten()
        .map(|e| e.name.as_str())
        .collect();
    let set_by_pod = |name: &str| {
        let pair = PROXY_VARS
            .iter()
            .find(|(u, l)| *u == name || *l == name)
            .map_or([name, name], |(u, l)| [*u, *l]);
        pair.iter().any(|n| existing.contains(n))
    };
    let values: Vec<Value> = env
        .iter()
        .filter(|(name, _)| !set_by_pod(name))
        .map(|(name, value)| json!({ "name": name, "value": value }))
        .collect();
    let index = index.to_string();
    add_list_items(
        ops,
        &["spec", list, &index, "env"],
        container.env.is_some(),
        &values,
    );
}

/// Appends `items` to the list at `path`, or adds the list when it is missing.
pub(super) fn add_list_items(
    ops: &mut Vec<PatchOperation>,
    path: &[&str],
    exists: bool,
    items: &[Value],
) {
    if items.is_empty() {
        return;
    }
    if exists {
        for item in items {
            let mut p = path.to_vec();
            p.push("-");
            ops.push(add(&p, item.clone()));
        }
    } else {
        ops.push(add(path, Value::Array(items.to_vec())));
    }
}

/// Sets keys of the map at `path`, or adds the map when it is missing.
pub(super) fn add_map_entries(
    ops: &mut Vec<PatchOperation>,
    path: &[&str],
    exists: bool,
    entries: &[(&str, String)],
) {
    if entries.is_empty() {
        return;
    }
    if exists {
        for (key, value) in entries {
            let mut p = path.to_vec();
            p.push(key);
            ops.push(add(&p, Value::String(value.clone())));
        }
    } else {
        let map = entries
            .iter()
            .map(|(k, v)| ((*k).to_owned(), Value::String(v.clone())))
            .collect();
        ops.push(add(path, Value::Object(map)));
    }
}

/// An `add` operation; each element of `path` is one unescaped token.
pub fn add(path: &[&str], value: Value) -> PatchOperation {
    PatchOperation::Add(AddOperation {
        path: PointerBuf::from_tokens(path.iter().copied()),
        value,
    })
}

pub(super) fn to_value<T: serde::Serialize>(v: T) -> Value {
    // k8s-openapi types always serialize.
    serde_json::to_value(v).expect("Kubernetes types serialize to JSON")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pointers_escape_slash_and_tilde() {
        let op = add(
            &["metadata", "annotations", "cluster-tunnel.io/injected"],
            json!("x"),
        );
        assert_eq!(
            op.path().as_str(),
            "/metadata/annotations/cluster-tunnel.io~1injected"
        );
        let op = add(&["metadata", "annotations", "a~b/c"], json!("x"));
        assert_eq!(op.path().as_str(), "/metadata/annotations/a~0b~1c");
        let mut doc = json!({ "metadata": { "annotations": { "a~b/c": "old" } } });
        json_patch::patch(&mut doc, &[op]).unwrap();
        assert_eq!(doc["metadata"]["annotations"]["a~b/c"], "x");
    }
}
