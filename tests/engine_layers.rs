//! The engine's modules form layers whose imports point one way (issue 11,
//! item 7).
//!
//! The test reads `src/engine`: it follows the `mod` declarations from
//! `src/engine/mod.rs`, drops comments, the contents of string and char
//! literals and every `#[cfg(test)]` item (test modules may reach
//! anywhere), resolves each `crate::engine::…`, `super::…`, `self::…` and
//! child-module path to the engine module it names, and checks the imports
//! against [`LAYERS`]. It needs nothing but the source tree.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The engine's layers, bottom first; each lists its units. A unit is a
/// module path below `crate::engine` (`"map"`, `"format::chunk"`), and a
/// file belongs to the listed unit whose path is the longest prefix of its
/// module's path.
///
/// Rules:
/// 1. A unit uses only units of its own layer or of lower layers.
/// 2. The units of every layer import each other without a cycle.
/// 3. Every engine module is in some unit: a new module must be placed.
///
/// A unit may sit above its parent: `format::snapshot` (the snapshot
/// codec) holds a checkpoint and sits with the checkpoint codec; `meta` (the manifest store, the
/// checkpoint chain) is low, its child `meta::task` (the task that drives
/// checkpoints and snapshots of an open volume) sits with the background
/// tasks; `snapshot` (taking, rolling back and deleting snapshots) sits
/// above its child `snapshot::store` (reading them). A child may also be
/// part of its parent's unit: `volume/snapshot.rs` and `volume/space.rs`
/// (the façade's snapshot and space API) are in the unit `volume`.
///
/// Items defined in the engine root (`SECTOR`, `check_range`,
/// `BlockDevice`) may be used from any layer; the root's re-exports
/// (`engine::EngineError`) count as the module they come from.
const LAYERS: &[(&str, &[&str])] = &[
    (
        "format: chunk ids and bounds, object keys, the chunk and manifest codecs, config, write payload buffers",
        &[
            "format",
            "format::limits",
            "format::layout",
            "format::chunk",
            "format::manifest",
            "format::sealed",
            "config",
            "damage",
            "payload_pool",
        ],
    ),
    (
        "map: the extent map, its WAL overlay, chunk location sets, allocation runs",
        &["map", "live", "allocation"],
    ),
    ("wal: the write-ahead log", &["wal"]),
    (
        "metadata codecs: checkpoint and snapshot objects, chunk CRC tables",
        &["checkpoint", "crc_table", "format::snapshot"],
    ),
    ("cache and space accounting", &["cache", "space"]),
    (
        "error: the engine's error, wrapping the lower layers' own",
        &["error"],
    ),
    (
        "metadata store I/O: capped reads, the manifest store and checkpoint chain, fenced deletes",
        &["capped", "meta", "fenced_delete"],
    ),
    (
        "stored snapshots: reading snapshot objects and parent chains, the retention index, \
         read-only snapshot views and their diffs",
        &["snapshot::store", "retain_index", "view", "diff"],
    ),
    (
        "snapshot operations on a stored volume: taking, rolling back and deleting \
         snapshots, deleting the compaction objects nothing names",
        &["compaction_gc", "snapshot"],
    ),
    (
        "detached volume tools: space computed from the store, scrub",
        &["usage", "scrub"],
    ),
    (
        "volume state: requests to the background tasks, the state under the volume's \
         lock, the read path's tables (GETs in flight, readahead streams)",
        &["task_request", "state", "read_state"],
    ),
    (
        "volume core: what an open volume's tasks and request paths share (Inner, \
         Shared, Counters, VolumeParams)",
        &["volume_core"],
    ),
    (
        "request paths: reads, shared GETs, readahead, warm start, space admission, \
         opening the WAL",
        &[
            "read",
            "inflight",
            "prefetch",
            "warm_start",
            "space_admission",
            "wal_open",
        ],
    ),
    (
        "test and bench aids: an in-memory block device, state for benchmarks",
        &["memdisk", "bench_support"],
    ),
    (
        "store side of an open volume: compaction, checkpoints and manifest commits",
        &["compact", "commit"],
    ),
    (
        "open-volume snapshots (served in the meta task) and recovery at open",
        &["live_snapshot", "recovery"],
    ),
    (
        "background tasks: destage, the meta task",
        &["destage", "meta::task"],
    ),
    (
        "the façade: an open volume, and cloning one",
        &["volume", "clone"],
    ),
];

/// A module path below `crate::engine` (`[]` is the engine root).
type ModPath = Vec<String>;

/// Where an import was seen: file and line.
type Site = (PathBuf, usize);

#[test]
fn engine_imports_point_down() {
    let engine = Engine::read(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src/engine"));
    let layers = Layers::new(LAYERS);
    eprintln!("{}", engine.cycle_report(&layers));
    let problems = layers.check(&engine);
    assert!(
        problems.is_empty(),
        "engine import layering (see LAYERS in tests/engine_layers.rs):\n{}",
        problems.join("\n")
    );
}

/// The manifest store (`engine::meta::manifest`) is the one place that
/// reads and writes a volume's manifest: outside `engine::format` (which
/// spells the key) and `engine::meta`, no code in `src/` names
/// `manifest_key` (test items excepted).
#[test]
fn only_the_manifest_store_names_the_manifest_key() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let owners = [src.join("engine/format"), src.join("engine/meta")];
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut found = Vec::new();
    for f in files
        .iter()
        .filter(|f| !owners.iter().any(|o| f.starts_with(o)))
    {
        let text = std::fs::read_to_string(f).unwrap();
        for t in tokens(&strip_test_items(&code_only(&text))) {
            if t.text == "manifest_key" {
                found.push(format!("{}:{}", f.display(), t.line));
            }
        }
    }
    assert!(
        found.is_empty(),
        "manifest_key outside engine::format and engine::meta (read and write \
         the manifest through engine::meta::manifest):\n{}",
        found.join("\n")
    );
}

/// Every `.rs` file under `dir`.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The checker sees what it must: grouped and nested `use` trees, inline
/// paths, `self` in a group, and nothing inside comments, literals or
/// test items.
#[test]
fn the_scanner_finds_imports_and_only_imports() {
    let src = r#"
        //! doc: super::doc_only
        use super::{a::B, c::{self, D}};
        use crate::engine::e::F as G;
        use crate::store::Thing;
        use kid::H;
        mod kid;
        fn f() { let s = "super::in_string"; let c = '{'; super::g::h(); }
        /* super::in_block_comment */
        #[cfg(test)]
        mod tests { use super::super::in_tests::X; }
        #[cfg(test)]
        use super::test_only;
    "#;
    let modules: BTreeSet<ModPath> = ["x", "x::kid"].iter().map(|m| path(m)).collect();
    let found: BTreeSet<String> = scan(src, &path("x"), &modules)
        .paths
        .into_iter()
        .map(|(p, _)| p.join("::"))
        .collect();
    let want: BTreeSet<String> = ["a::B", "c", "c::D", "e::F", "x::kid::H", "g::h"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(found, want);
    let mods = scan(src, &path("x"), &modules).children;
    assert_eq!(mods, vec!["kid".to_string()]);
}

fn path(s: &str) -> ModPath {
    s.split("::")
        .filter(|x| !x.is_empty())
        .map(str::to_string)
        .collect()
}

/// The engine's files, modules and resolved imports.
struct Engine {
    /// Every module, with the file that holds it.
    modules: BTreeMap<ModPath, PathBuf>,
    /// Every engine path each module uses, with where.
    uses: Vec<(ModPath, ModPath, Site)>,
}

impl Engine {
    fn read(root: &Path) -> Engine {
        let mut files: Vec<(ModPath, PathBuf)> = Vec::new();
        let mut modules = BTreeMap::new();
        let mut todo = vec![(ModPath::new(), root.join("mod.rs"))];
        let mut scans = Vec::new();
        // Module paths are known only after the walk; scan twice.
        while let Some((m, file)) = todo.pop() {
            let src = std::fs::read_to_string(&file)
                .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            let dir = if file.file_name().is_some_and(|n| n == "mod.rs") {
                file.parent().unwrap().to_path_buf()
            } else {
                file.with_extension("")
            };
            for child in scan(&src, &m, &BTreeSet::new()).children {
                let mut cm = m.clone();
                cm.push(child.clone());
                let flat = dir.join(format!("{child}.rs"));
                let nested = dir.join(&child).join("mod.rs");
                let f = if flat.exists() { flat } else { nested };
                assert!(f.exists(), "module {} has no file", cm.join("::"));
                todo.push((cm, f));
            }
            modules.insert(m.clone(), file.clone());
            files.push((m, file));
        }
        let known: BTreeSet<ModPath> = modules.keys().cloned().collect();
        let root_src = std::fs::read_to_string(root.join("mod.rs")).unwrap();
        let reexports = root_reexports(&root_src, &known);
        for (m, file) in &files {
            if m.is_empty() {
                continue; // the root: declarations and re-exports
            }
            let src = std::fs::read_to_string(file).unwrap();
            for (mut p, line) in scan(&src, m, &known).paths {
                if let Some(first) = p.first() {
                    if !known.contains(&vec![first.clone()]) {
                        match reexports.get(first) {
                            Some(real) => {
                                let rest = p.split_off(1);
                                p = real.clone();
                                p.extend(rest);
                            }
                            None => continue, // an item of the root
                        }
                    }
                }
                scans.push((m.clone(), p, (file.clone(), line)));
            }
        }
        Engine {
            modules,
            uses: scans,
        }
    }

    /// Import cycles among the engine's units (listed in `layers`, else
    /// top-level modules): Tarjan's strongly connected components, for the
    /// log.
    fn cycle_report(&self, layers: &Layers) -> String {
        let unit = |m: &ModPath| match layers.unit_of(m) {
            Some(u) => u.join("::"),
            None => m.first().cloned().unwrap_or_default(),
        };
        let tops: BTreeSet<String> = self
            .modules
            .keys()
            .filter(|m| !m.is_empty())
            .map(unit)
            .collect();
        let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (from, to, _) in &self.uses {
            let (a, b) = (unit(from), unit(to));
            if a != b && tops.contains(&b) {
                edges.entry(a).or_default().insert(b);
            }
        }
        if std::env::var_os("ENGINE_LAYERS_EDGES").is_some() {
            for (a, bs) in &edges {
                let bs: Vec<&str> = bs.iter().map(String::as_str).collect();
                eprintln!("{a} -> {}", bs.join(" "));
            }
        }
        let sccs = strongly_connected(&tops, &edges);
        let mut cyclic: Vec<&BTreeSet<String>> = sccs.iter().filter(|c| c.len() > 1).collect();
        cyclic.sort_by_key(|c| std::cmp::Reverse(c.len()));
        let mut out = format!(
            "{} engine units; {} in import cycles; largest cycle {}\n",
            tops.len(),
            cyclic.iter().map(|c| c.len()).sum::<usize>(),
            cyclic.first().map_or(0, |c| c.len())
        );
        for c in cyclic {
            let names: Vec<&str> = c.iter().map(String::as_str).collect();
            out += &format!("  cycle of {}: {}\n", c.len(), names.join(" "));
        }
        out
    }
}

/// The layer table, indexed.
struct Layers {
    /// Unit → layer index.
    units: BTreeMap<ModPath, usize>,
    names: Vec<&'static str>,
}

impl Layers {
    fn new(table: &[(&'static str, &[&str])]) -> Layers {
        let mut units = BTreeMap::new();
        for (i, (_, list)) in table.iter().enumerate() {
            for u in *list {
                assert!(
                    units.insert(path(u), i).is_none(),
                    "{u} is listed twice in LAYERS"
                );
            }
        }
        Layers {
            units,
            names: table.iter().map(|(n, _)| *n).collect(),
        }
    }

    /// The unit holding `p`: the longest listed prefix.
    fn unit_of(&self, p: &[String]) -> Option<&ModPath> {
        (1..=p.len())
            .rev()
            .find_map(|n| self.units.get_key_value(&p[..n]).map(|(k, _)| k))
    }

    fn check(&self, engine: &Engine) -> Vec<String> {
        let mut problems = Vec::new();
        for (m, file) in &engine.modules {
            if !m.is_empty() && self.unit_of(m).is_none() {
                problems.push(format!(
                    "module {} ({}) is in no layer",
                    m.join("::"),
                    file.display()
                ));
            }
        }
        for u in self.units.keys() {
            if !engine.modules.contains_key(u) {
                problems.push(format!("LAYERS lists {}, not a module", u.join("::")));
            }
        }
        let mut edges: BTreeMap<(ModPath, ModPath), Site> = BTreeMap::new();
        for (from, to, site) in &engine.uses {
            let (Some(a), Some(b)) = (self.unit_of(from), self.unit_of(to)) else {
                continue; // reported above, or an item of a module in no unit
            };
            if a != b {
                edges
                    .entry((a.clone(), b.clone()))
                    .or_insert_with(|| site.clone());
            }
        }
        for ((a, b), (file, line)) in &edges {
            let (la, lb) = (self.units[a], self.units[b]);
            if lb > la {
                problems.push(format!(
                    "{} (layer \"{}\") imports {} (layer \"{}\", higher) at {}:{line}",
                    a.join("::"),
                    self.names[la],
                    b.join("::"),
                    self.names[lb],
                    file.display()
                ));
            }
        }
        for layer in 0..self.names.len() {
            let members: BTreeSet<String> = self
                .units
                .iter()
                .filter(|(_, &l)| l == layer)
                .map(|(u, _)| u.join("::"))
                .collect();
            let mut inner: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
            for (a, b) in edges.keys() {
                let (a, b) = (a.join("::"), b.join("::"));
                if members.contains(&a) && members.contains(&b) {
                    inner.entry(a).or_default().insert(b);
                }
            }
            for c in strongly_connected(&members, &inner) {
                if c.len() > 1 {
                    let names: Vec<&str> = c.iter().map(String::as_str).collect();
                    problems.push(format!(
                        "layer \"{}\" has an import cycle: {}",
                        self.names[layer],
                        names.join(" ")
                    ));
                }
            }
        }
        problems
    }
}

/// Strongly connected components of a directed graph (Tarjan).
fn strongly_connected(
    nodes: &BTreeSet<String>,
    edges: &BTreeMap<String, BTreeSet<String>>,
) -> Vec<BTreeSet<String>> {
    struct Tarjan<'a> {
        edges: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        out: Vec<BTreeSet<String>>,
    }
    impl<'a> Tarjan<'a> {
        fn visit(&mut self, v: &'a str) {
            let i = self.index.len();
            self.index.insert(v, i);
            self.low.insert(v, i);
            self.stack.push(v);
            for w in self.edges.get(v).into_iter().flatten() {
                if !self.index.contains_key(w.as_str()) {
                    self.visit(w);
                    let lw = self.low[w.as_str()];
                    let lv = self.low.get_mut(v).unwrap();
                    *lv = (*lv).min(lw);
                } else if self.stack.contains(&w.as_str()) {
                    let iw = self.index[w.as_str()];
                    let lv = self.low.get_mut(v).unwrap();
                    *lv = (*lv).min(iw);
                }
            }
            if self.low[v] == self.index[v] {
                let mut c = BTreeSet::new();
                while let Some(w) = self.stack.pop() {
                    c.insert(w.to_string());
                    if w == v {
                        break;
                    }
                }
                self.out.push(c);
            }
        }
    }
    let mut t = Tarjan {
        edges,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        out: Vec::new(),
    };
    for v in nodes {
        if !t.index.contains_key(v.as_str()) {
            t.visit(v);
        }
    }
    t.out
}

/// The engine root's `pub use a::{B, C}` re-exports: name → path.
fn root_reexports(src: &str, known: &BTreeSet<ModPath>) -> BTreeMap<String, ModPath> {
    let toks = tokens(&strip_test_items(&code_only(src)));
    let mut out = BTreeMap::new();
    let mut i = 0;
    while i < toks.len() {
        if toks[i].text == "use" {
            let mut paths = Vec::new();
            i = use_tree(&toks, i + 1, Vec::new(), &mut paths);
            for (p, _) in paths {
                if let (Some(name), Some(real)) = (p.last(), resolve(&p, &[], known)) {
                    out.insert(name.clone(), real);
                }
            }
        }
        i += 1;
    }
    out
}

/// What one file holds: its child module declarations and the engine
/// paths it uses (resolved below `crate::engine`, with their lines).
struct Scan {
    children: Vec<String>,
    paths: Vec<(ModPath, usize)>,
}

/// Scan the source of module `here`; `known` lists the engine's modules
/// (for paths that start with a child module's name).
fn scan(src: &str, here: &[String], known: &BTreeSet<ModPath>) -> Scan {
    let toks = tokens(&strip_test_items(&code_only(src)));
    let mut out = Scan {
        children: Vec::new(),
        paths: Vec::new(),
    };
    let mut i = 0;
    while i < toks.len() {
        let t = &toks[i].text;
        if t == "mod" && toks.get(i + 1).is_some_and(|n| n.is_ident()) {
            match toks.get(i + 2).map(|n| n.text.as_str()) {
                Some(";") => out.children.push(toks[i + 1].text.clone()),
                other => panic!(
                    "inline module {} ({other:?}) outside #[cfg(test)]: not supported",
                    toks[i + 1].text
                ),
            }
            i += 3;
            continue;
        }
        if t == "use" {
            let mut paths = Vec::new();
            i = use_tree(&toks, i + 1, Vec::new(), &mut paths);
            for (p, line) in paths {
                if let Some(r) = resolve(&p, here, known) {
                    out.paths.push((r, line));
                }
            }
            continue;
        }
        let starts_path = toks[i].is_ident()
            && (i == 0 || toks[i - 1].text != "::")
            && toks.get(i + 1).is_some_and(|n| n.text == "::");
        if starts_path {
            let line = toks[i].line;
            let mut p = vec![t.clone()];
            let mut j = i + 1;
            while toks.get(j).is_some_and(|n| n.text == "::")
                && toks.get(j + 1).is_some_and(|n| n.is_ident())
            {
                p.push(toks[j + 1].text.clone());
                j += 2;
            }
            if let Some(r) = resolve(&p, here, known) {
                out.paths.push((r, line));
            }
            i = j;
            continue;
        }
        i += 1;
    }
    out
}

/// Expand the use tree starting at `toks[i]` under `prefix` into `out`;
/// returns the index after the tree (at the `;`, `,` or `}` ending it).
fn use_tree(
    toks: &[Token],
    mut i: usize,
    prefix: Vec<String>,
    out: &mut Vec<(ModPath, usize)>,
) -> usize {
    let mut p = prefix;
    while let Some(t) = toks.get(i) {
        match t.text.as_str() {
            "{" => {
                i += 1;
                while toks.get(i).is_some_and(|t| t.text != "}") {
                    i = use_tree(toks, i, p.clone(), out);
                    if toks.get(i).is_some_and(|t| t.text == ",") {
                        i += 1;
                    }
                }
                return i + 1;
            }
            "*" => {
                out.push((p, t.line));
                return i + 1;
            }
            "::" => i += 1,
            ";" | "," | "}" => {
                out.push((p, t.line));
                return i;
            }
            "as" => i += 2,
            "self" if !p.is_empty() => i += 1,
            _ => {
                p.push(t.text.clone());
                i += 1;
            }
        }
    }
    i
}

/// The path below `crate::engine` that `p`, written in module `here`,
/// names; `None` outside the engine (another crate module, an extern
/// crate, a local item).
fn resolve(p: &[String], here: &[String], known: &BTreeSet<ModPath>) -> Option<ModPath> {
    let first = p.first()?;
    match first.as_str() {
        "crate" => (p.get(1)? == "engine").then(|| p[2..].to_vec()),
        "super" => {
            let mut base = here.to_vec();
            let mut rest = p;
            while rest.first().is_some_and(|s| s == "super") {
                if base.pop().is_none() {
                    let mut c = vec!["crate".to_string()];
                    c.extend_from_slice(&rest[1..]);
                    return resolve(&c, &[], known);
                }
                rest = &rest[1..];
            }
            base.extend_from_slice(rest);
            Some(base)
        }
        "self" => {
            let mut base = here.to_vec();
            base.extend_from_slice(&p[1..]);
            Some(base)
        }
        _ => {
            let mut child = here.to_vec();
            child.push(first.clone());
            known.contains(&child).then(|| {
                let mut base = here.to_vec();
                base.extend_from_slice(p);
                base
            })
        }
    }
}

struct Token {
    text: String,
    line: usize,
}

impl Token {
    fn is_ident(&self) -> bool {
        self.text
            .chars()
            .next()
            .is_some_and(|c| c.is_alphabetic() || c == '_')
    }
}

/// Identifiers (keywords included), `::` and single punctuation characters.
fn tokens(code: &str) -> Vec<Token> {
    let cs: Vec<char> = code.chars().collect();
    let mut out = Vec::new();
    let (mut i, mut line) = (0, 1);
    while i < cs.len() {
        let c = cs[i];
        if c == '\n' {
            line += 1;
            i += 1;
        } else if c.is_whitespace() {
            i += 1;
        } else if c.is_alphanumeric() || c == '_' {
            let s = i;
            while i < cs.len() && (cs[i].is_alphanumeric() || cs[i] == '_') {
                i += 1;
            }
            out.push(Token {
                text: cs[s..i].iter().collect(),
                line,
            });
        } else if c == ':' && cs.get(i + 1) == Some(&':') {
            out.push(Token {
                text: "::".into(),
                line,
            });
            i += 2;
        } else {
            out.push(Token {
                text: c.to_string(),
                line,
            });
            i += 1;
        }
    }
    out
}

/// `code` with every item under `#[cfg(test)]` blanked (newlines kept).
fn strip_test_items(code: &str) -> String {
    let mut cs: Vec<char> = code.chars().collect();
    let attr: Vec<char> = "#[cfg(test)]".chars().collect();
    let mut i = 0;
    while i + attr.len() <= cs.len() {
        let compact: Vec<char> = cs[i..]
            .iter()
            .filter(|c| !c.is_whitespace())
            .take(attr.len())
            .copied()
            .collect();
        if cs[i] != '#' || compact != attr {
            i += 1;
            continue;
        }
        // The item ends at the first `;` outside braces, or at the brace
        // closing its first `{`.
        let mut j = i + 1;
        while cs[j] != ']' {
            j += 1;
        }
        let mut depth = 0usize;
        j += 1;
        while j < cs.len() {
            match cs[j] {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        break;
                    }
                }
                ';' if depth == 0 => break,
                _ => {}
            }
            j += 1;
        }
        let end = j.min(cs.len() - 1);
        for c in &mut cs[i..=end] {
            if *c != '\n' {
                *c = ' ';
            }
        }
        i = j + 1;
    }
    cs.into_iter().collect()
}

/// `src` without comments and with the contents of string and char
/// literals blanked; newlines are kept so lines still count.
fn code_only(src: &str) -> String {
    let cs: Vec<char> = src.chars().collect();
    let mut out = String::with_capacity(src.len());
    let blank = |c: char| if c == '\n' { '\n' } else { ' ' };
    let ident = |c: char| c.is_alphanumeric() || c == '_';
    let mut i = 0;
    while i < cs.len() {
        let c = cs[i];
        let next = cs.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < cs.len() && cs[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < cs.len() {
                if cs[i] == '/' && cs.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if cs[i] == '*' && cs.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    out.push(blank(cs[i]));
                    i += 1;
                }
            }
        } else if c == 'r'
            && (i == 0 || !ident(cs[i - 1]) || (cs[i - 1] == 'b' && (i < 2 || !ident(cs[i - 2]))))
            && matches!(next, Some('"') | Some('#'))
        {
            // A raw string r"…" / r#"…"#, or the identifier r / r#ident.
            let mut j = i + 1;
            while cs.get(j) == Some(&'#') {
                j += 1;
            }
            if cs.get(j) != Some(&'"') {
                out.push(c);
                i += 1;
                continue;
            }
            let hashes = j - i - 1;
            out.push('"');
            j += 1;
            while j < cs.len() {
                if cs[j] == '"' && (1..=hashes).all(|k| cs.get(j + k) == Some(&'#')) {
                    break;
                }
                out.push(blank(cs[j]));
                j += 1;
            }
            out.push('"');
            i = j + 1 + hashes;
        } else if c == '"' {
            out.push('"');
            i += 1;
            while i < cs.len() && cs[i] != '"' {
                if cs[i] == '\\' {
                    out.push(' ');
                    i += 1;
                }
                if i < cs.len() {
                    out.push(blank(cs[i]));
                    i += 1;
                }
            }
            out.push('"');
            i += 1;
        } else if c == '\'' && (next == Some('\\') || cs.get(i + 2) == Some(&'\'')) {
            // A char literal (a lifetime `'a` has no closing quote).
            out.push('\'');
            i += 1;
            while i < cs.len() && cs[i] != '\'' {
                if cs[i] == '\\' {
                    i += 1;
                }
                out.push(' ');
                i += 1;
            }
            out.push('\'');
            i += 1;
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}
