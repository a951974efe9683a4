//! The reference in `docs/reference/` agrees with the code:
//!
//! - `flags.md` is generated from every binary's command line (clap's
//!   `Command` of each crate, and `tunnel-local --help`): the test fails when
//!   the file differs, and `UPDATE_REFERENCE=1` rewrites it;
//! - `metrics.md` lists exactly the metrics the components register, with
//!   their types, and no page of the docs names a metric that does not exist;
//! - `annotations.md` lists exactly the annotations the injector knows.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use clap::CommandFactory as _;
use prometheus_client::registry::Registry;

use tunnel_tests::repo_root as root;

fn read(relative: &str) -> String {
    let path = root().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// Compares `relative` with `expected`, or writes it under `UPDATE_REFERENCE=1`.
fn check_generated(relative: &str, expected: &str) {
    let path = root().join(relative);
    if std::env::var_os("UPDATE_REFERENCE").is_some() {
        std::fs::write(&path, expected).unwrap();
        eprintln!("wrote {}", path.display());
        return;
    }
    let actual = std::fs::read_to_string(&path).unwrap_or_default();
    if actual == expected {
        return;
    }
    let (line, (want, have)) = expected
        .lines()
        .chain(std::iter::repeat(""))
        .zip(actual.lines().chain(std::iter::repeat("")))
        .enumerate()
        .find(|(_, (e, a))| e != a)
        .expect("files differ in some line");
    panic!(
        "{relative} does not match the code (first difference at line {}):\n  code says: {want}\n  file says: {have}\n\
         regenerate it with `UPDATE_REFERENCE=1 cargo test -p tunnel-tests --test reference`",
        line + 1
    );
}

// ---------------------------------------------------------------- flags

/// Markdown table cells: one line, `|` escaped.
fn cell(text: &str) -> String {
    text.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .replace('|', "\\|")
}

fn flag_cell(arg: &clap::Arg) -> String {
    let values = || -> String {
        match arg.get_value_names() {
            Some(names) => names
                .iter()
                .map(|n| format!("<{n}>"))
                .collect::<Vec<_>>()
                .join(" "),
            None => format!("<{}>", arg.get_id().as_str().to_uppercase()),
        }
    };
    if arg.is_positional() {
        return format!("`{}`", values());
    }
    let mut names = Vec::new();
    if let Some(short) = arg.get_short() {
        names.push(format!("-{short}"));
    }
    if let Some(long) = arg.get_long() {
        names.push(format!("--{long}"));
    }
    let mut text = names.join(", ");
    if arg.get_action().takes_values() {
        text.push(' ');
        text.push_str(&values());
    }
    format!("`{text}`")
}

fn describe_command(out: &mut String, path: &str, cmd: &clap::Command, depth: usize) {
    let heading = "#".repeat(depth.min(4));
    writeln!(out, "{heading} `{path}`\n").unwrap();
    if let Some(about) = cmd.get_long_about().or(cmd.get_about()) {
        writeln!(out, "{}\n", about.to_string().trim()).unwrap();
    }
    let args: Vec<&clap::Arg> = cmd
        .get_arguments()
        .filter(|a| !a.is_hide_set() && !matches!(a.get_id().as_str(), "help" | "version"))
        .collect();
    if !args.is_empty() {
        out.push_str("| flag | env | default | meaning |\n| --- | --- | --- | --- |\n");
        for arg in args {
            let env = arg
                .get_env()
                .map(|e| format!("`{}`", e.to_string_lossy()))
                .unwrap_or_else(|| "—".into());
            let defaults: Vec<String> = arg
                .get_default_values()
                .iter()
                .map(|v| v.to_string_lossy().into_owned())
                .collect();
            let default = if defaults.is_empty() {
                if arg.is_required_set() {
                    "required".into()
                } else {
                    "—".into()
                }
            } else {
                format!("`{}`", defaults.join(","))
            };
            let mut meaning = arg
                .get_long_help()
                .or(arg.get_help())
                .map(|h| h.to_string())
                .unwrap_or_default();
            let possible: Vec<String> = arg
                .get_possible_values()
                .iter()
                .filter(|p| !p.is_hide_set())
                .map(|p| format!("`{}`", p.get_name()))
                .collect();
            if !possible.is_empty() && arg.get_action().takes_values() {
                write!(meaning, " (one of {})", possible.join(", ")).unwrap();
            }
            writeln!(
                out,
                "| {} | {env} | {default} | {} |",
                flag_cell(arg),
                cell(&meaning)
            )
            .unwrap();
        }
        out.push('\n');
    }
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        describe_command(out, &format!("{path} {}", sub.get_name()), sub, depth + 1);
    }
}

fn flags_reference() -> String {
    let mut out = String::from(
        "# Command-line flags\n\n\
         Every flag of every binary, generated from their command-line definitions: a test\n\
         (`tests/tests/reference.rs`) fails when this page and the code disagree, and\n\
         `UPDATE_REFERENCE=1 cargo test -p tunnel-tests --test reference` rewrites it. Every flag\n\
         with an environment variable also reads it; a flag given on the command line wins.\n\
         Durations take `ms`, `s`, `m`, `h`. `TUNNEL_WORKER_THREADS=N` sets the runtime's worker\n\
         threads of any binary, and every binary prints its version and git revision with\n\
         `--version`.\n\n",
    );
    let binaries: [(&str, clap::Command); 5] = [
        ("tunnel-server", tunnel_server::cli::Cli::command()),
        ("tunnel-agent", tunnel_agent::cli::Cli::command()),
        ("tunnel-sidecar", tunnel_sidecar::config::Cli::command()),
        ("tunnel-injector", tunnel_injector::cli::Cli::command()),
        ("tunnel-manager", tunnel_manager::cli::Cli::command()),
    ];
    out.push_str("| binary | what it is |\n| --- | --- |\n");
    for (name, _) in &binaries {
        writeln!(out, "| [`{name}`](#{name}) | {} |", what_it_is(name)).unwrap();
    }
    writeln!(
        out,
        "| [`tunnel-local`](#tunnel-local) | {} |\n",
        what_it_is("tunnel-local")
    )
    .unwrap();
    for (name, cmd) in &binaries {
        describe_command(&mut out, name, cmd, 2);
    }
    // tunnel-local's command line lives in its binary: its help, verbatim.
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_tunnel-local"))
        .arg("--help")
        .output()
        .expect("run tunnel-local --help");
    assert!(help.status.success(), "tunnel-local --help failed");
    writeln!(
        out,
        "## `tunnel-local`\n\n`tunnel-local --help` prints:\n\n```text\n{}\n```",
        String::from_utf8_lossy(&help.stdout).trim_end()
    )
    .unwrap();
    out
}

fn what_it_is(binary: &str) -> &'static str {
    match binary {
        "tunnel-server" => "the proxy server on the hub: agents' tunnels, clients' connections",
        "tunnel-agent" => {
            "runs in each managed cluster: tunnels to every server, dials destinations"
        }
        "tunnel-sidecar" => "beside a hub app: per-cluster loopback ports and an HTTP proxy",
        "tunnel-injector" => "the admission webhook that adds the sidecar to opted-in pods",
        "tunnel-manager" => "the hub's controllers, the OCM addon, certificates, `health`",
        _ => "the whole system on one machine (server, agents, sidecar, sample services)",
    }
}

#[test]
fn the_flag_reference_is_every_flag_of_every_binary() {
    check_generated("docs/reference/flags.md", &flags_reference());
}

// -------------------------------------------------------------- metrics

/// Every metric the components register, by the name it is registered
/// under (prefix included; a scrape adds `_total` to counters), with its type
/// where the registry tells it.
///
/// prometheus-client encodes no family without samples, so the names come
/// from the registries' `Debug` form (each sub-registry's prefix, then its
/// descriptors); the types from the text encoding of what has samples
/// (every metric but the empty families, whose type the docs' `_total`
/// suffix must then agree with).
fn registered_metrics() -> BTreeMap<String, Option<String>> {
    let mut registries = Vec::new();
    macro_rules! registry {
        ($metrics:path) => {{
            let mut r = Registry::default();
            let _ = <$metrics>::register(&mut r);
            registries.push(r);
        }};
    }
    registry!(tunnel_server::metrics::ServerMetrics);
    registry!(tunnel_agent::metrics::AgentMetrics);
    registry!(tunnel_sidecar::metrics::SidecarMetrics);
    registry!(tunnel_injector::metrics::InjectorMetrics);
    registry!(tunnel_manager::metrics::ManagerMetrics);
    let mut metrics = BTreeMap::new();
    for r in &registries {
        let debug = format!("{r:?}");
        let mut prefix = String::new();
        let mut rest = debug.as_str();
        loop {
            let next_prefix = rest.find("Prefix(\"");
            let next_name = rest.find("Descriptor { name: \"");
            let (at, is_prefix) = match (next_prefix, next_name) {
                (Some(p), Some(n)) if p < n => (p + "Prefix(\"".len(), true),
                (Some(p), None) => (p + "Prefix(\"".len(), true),
                (_, Some(n)) => (n + "Descriptor { name: \"".len(), false),
                (None, None) => break,
            };
            let value = &rest[at..at + rest[at..].find('"').expect("closing quote")];
            if is_prefix {
                prefix = value.to_owned();
            } else {
                metrics.insert(format!("{prefix}_{value}"), None);
            }
            rest = &rest[at..];
        }
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, r).unwrap();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("# TYPE name type");
                let known = metrics.get_mut(name);
                let known =
                    known.unwrap_or_else(|| panic!("{name} encoded but not found in {debug}"));
                *known = Some(kind.to_owned());
            }
        }
    }
    assert!(
        metrics.len() >= 20 && metrics.values().any(Option::is_some),
        "registries read wrongly: {metrics:?}"
    );
    metrics
}

/// The rows of the Markdown tables in `text` whose first cell starts with a
/// code span: (first cell without backticks, the other cells).
fn table_rows(text: &str) -> Vec<(String, Vec<String>)> {
    text.lines()
        .filter(|l| l.starts_with("| `"))
        .map(|l| {
            let cells: Vec<String> = l
                .trim_matches('|')
                .split(" | ")
                .map(|c| c.trim().to_owned())
                .collect();
            (cells[0].replace('`', ""), cells[1..].to_vec())
        })
        .collect()
}

#[test]
fn the_metric_reference_lists_every_registered_metric_with_its_type() {
    let registered = registered_metrics();
    let doc = read("docs/reference/metrics.md");
    let mut documented = BTreeMap::new();
    for (name, cells) in table_rows(&doc) {
        let name = name.split('{').next().unwrap().to_owned();
        let kind = cells.first().cloned().unwrap_or_default();
        // A scrape shows counters with `_total`, and so do the docs.
        let base = match kind.as_str() {
            "counter" => name
                .strip_suffix("_total")
                .unwrap_or_else(|| {
                    panic!("docs/reference/metrics.md: counter {name} without _total")
                })
                .to_owned(),
            "gauge" | "histogram" => name.clone(),
            other => panic!("docs/reference/metrics.md: {name} has type {other:?}"),
        };
        assert!(
            documented.insert(base, kind).is_none(),
            "docs/reference/metrics.md lists {name} twice"
        );
    }
    let missing: Vec<_> = registered
        .keys()
        .filter(|k| !documented.contains_key(*k))
        .collect();
    let unknown: Vec<_> = documented
        .keys()
        .filter(|k| !registered.contains_key(*k))
        .collect();
    assert!(
        missing.is_empty() && unknown.is_empty(),
        "docs/reference/metrics.md disagrees with the code: not documented {missing:?}, \
         documented but not registered {unknown:?}"
    );
    for (name, kind) in &registered {
        if let Some(kind) = kind {
            assert_eq!(
                &documented[name], kind,
                "docs/reference/metrics.md: type of {name}"
            );
        }
    }
}

/// Every Markdown page of the project.
fn doc_pages() -> Vec<PathBuf> {
    let mut pages = vec![root().join("README.md")];
    let mut dirs = vec![root().join("docs")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "md") {
                pages.push(path);
            }
        }
    }
    pages.sort();
    pages
}

#[test]
fn every_metric_the_docs_name_exists() {
    let registered = registered_metrics();
    let prefixes = [
        "tunnel_server_",
        "tunnel_agent_",
        "tunnel_sidecar_",
        "tunnel_injector_",
        "tunnel_manager_",
    ];
    let mut wrong = Vec::new();
    for page in doc_pages() {
        let text = std::fs::read_to_string(&page).unwrap();
        let words = text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '*'));
        for word in words {
            if !prefixes.iter().any(|p| word.starts_with(p)) {
                continue;
            }
            let known = match word.strip_suffix('*') {
                Some(prefix) => registered.keys().any(|k| k.starts_with(prefix)),
                None => ["", "_total", "_bucket", "_sum", "_count"]
                    .iter()
                    .any(|suffix| {
                        word.strip_suffix(suffix)
                            .is_some_and(|base| registered.contains_key(base))
                    }),
            };
            if !known {
                wrong.push(format!(
                    "{}: {word}",
                    page.strip_prefix(root()).unwrap().display()
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "the docs name metrics no component registers: {wrong:?}"
    );
}

// ---------------------------------------------------------- annotations

#[test]
fn the_annotation_reference_lists_exactly_the_injectors_annotations() {
    let doc = read("docs/reference/annotations.md");
    let section = doc
        .split("## Annotations")
        .nth(1)
        .expect("docs/reference/annotations.md has an '## Annotations' section");
    let section = section.split("\n## ").next().unwrap();
    let documented: Vec<String> = table_rows(section).into_iter().map(|(n, _)| n).collect();
    let mut sorted = documented.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(
        sorted.len(),
        documented.len(),
        "an annotation is listed twice"
    );
    let mut known: Vec<String> = tunnel_api::annotations::KNOWN
        .iter()
        .map(|a| a.to_string())
        .collect();
    known.sort();
    assert_eq!(
        sorted, known,
        "docs/reference/annotations.md's annotations are not the injector's (annotations::KNOWN)"
    );
}

// ---------------------------------------------------------- flags in prose

/// Every long flag of every command and subcommand of `cmd`.
fn long_flags(cmd: &clap::Command, into: &mut std::collections::BTreeSet<String>) {
    for arg in cmd.get_arguments() {
        if let Some(long) = arg.get_long() {
            into.insert(format!("--{long}"));
        }
        for alias in arg.get_all_aliases().unwrap_or_default() {
            into.insert(format!("--{alias}"));
        }
    }
    for sub in cmd.get_subcommands() {
        long_flags(sub, into);
    }
}

/// Flags of other tools the docs show in commands: cargo, helm, curl, clusteradm, debootstrap,
/// the image builders, `scripts/build-images` and the benchmark.
const OTHER_TOOLS_FLAGS: &[&str] = &[
    // cargo
    "--release",
    "--bin",
    "--test",
    "--lib",
    "--workspace",
    "--all-targets",
    "--check",
    "--locked",
    "--open",
    "--bench",
    // the benchmark (tests/benches/tunnel/)
    "--json",
    "--workloads",
    "--paths",
    // helm
    "--set",
    "--set-file",
    "--create-namespace",
    "--reuse-values",
    // curl
    "--cacert",
    "--resolve",
    "--proxy",
    "--proxy-cacert",
    "--proxy-cert",
    "--proxy-key",
    "--proxy-header",
    // kubectl
    "--from-file",
    // clusteradm
    "--names",
    "--clusters",
    // debootstrap, docker/buildah, scripts/build-images
    "--variant",
    "--target",
    "--build-arg",
    "--tag",
    "--registry",
    "--builder",
    "--no-cargo",
    // perf (docs/benchmark.md)
    "--call-graph",
];

#[test]
fn every_flag_the_docs_name_is_a_flag_of_a_binary() {
    let mut known = std::collections::BTreeSet::new();
    long_flags(&tunnel_server::cli::Cli::command(), &mut known);
    long_flags(&tunnel_agent::cli::Cli::command(), &mut known);
    long_flags(&tunnel_sidecar::config::Cli::command(), &mut known);
    long_flags(&tunnel_injector::cli::Cli::command(), &mut known);
    long_flags(&tunnel_manager::cli::Cli::command(), &mut known);
    let local = std::process::Command::new(env!("CARGO_BIN_EXE_tunnel-local"))
        .arg("--help")
        .output()
        .expect("run tunnel-local --help");
    let local = String::from_utf8_lossy(&local.stdout).into_owned();
    known.extend(flag_words(&local));
    known.extend(["--help".to_owned(), "--version".to_owned()]);
    known.extend(OTHER_TOOLS_FLAGS.iter().map(|f| f.to_string()));
    let mut unknown = Vec::new();
    for page in doc_pages() {
        let text = std::fs::read_to_string(&page).unwrap();
        for flag in flag_words(&text) {
            if !known.contains(&flag) {
                unknown.push(format!(
                    "{}: {flag}",
                    page.strip_prefix(root()).unwrap().display()
                ));
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "the docs name flags no binary has (or another tool's: add it to OTHER_TOOLS_FLAGS): {unknown:?}"
    );
}

/// The `--long-flag` words of a text.
fn flag_words(text: &str) -> Vec<String> {
    let mut flags = Vec::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(pos) = text[i..].find("--") {
        let start = i + pos;
        let before_ok =
            start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'-');
        let mut end = start + 2;
        while end < bytes.len()
            && (bytes[end].is_ascii_lowercase()
                || bytes[end].is_ascii_digit()
                || bytes[end] == b'-')
        {
            end += 1;
        }
        let word = text[start..end].trim_end_matches('-');
        if before_ok && word.len() > 2 && bytes[start + 2].is_ascii_lowercase() {
            flags.push(word.to_owned());
        }
        i = end.max(start + 2);
    }
    flags
}
