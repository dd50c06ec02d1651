//! The layer order of ARCHITECTURE.md, kept true: every `crate::` path in `src/` names a
//! module of a lower layer than the file's own module (or the module itself).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The `| Layer | Modules | ... |` table of ARCHITECTURE.md: module → layer.
fn layers(root: &Path) -> BTreeMap<String, u32> {
    let text = std::fs::read_to_string(root.join("ARCHITECTURE.md")).unwrap();
    let section = text
        .split("## Layers")
        .nth(1)
        .expect("ARCHITECTURE.md has a `## Layers` section");
    let mut layers = BTreeMap::new();
    for line in section.lines().skip_while(|l| !l.starts_with('|')) {
        let Some(row) = line.strip_prefix('|') else {
            break;
        };
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let Ok(layer) = cells[0].parse::<u32>() else {
            continue; // the header and its rule
        };
        for module in cells[1].split(',') {
            layers.insert(module.trim().trim_matches('`').to_string(), layer);
        }
    }
    assert!(!layers.is_empty(), "no layer table under `## Layers`");
    layers
}

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Every `crate::name` in `code`, comments left out.
fn crate_paths(code: &str) -> Vec<String> {
    let mut found = Vec::new();
    for line in code.lines() {
        let line = line.split("//").next().unwrap();
        let mut rest = line;
        while let Some(i) = rest.find("crate::") {
            let after = &rest[i + "crate::".len()..];
            let name: String = after
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                found.push(name);
            }
            rest = after;
        }
    }
    found
}

#[test]
fn every_import_goes_down_the_layers() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let layers = layers(root);
    let lib = std::fs::read_to_string(root.join("src/lib.rs")).unwrap();
    let modules: Vec<&str> = lib
        .lines()
        .filter_map(|l| l.strip_prefix("pub mod "))
        .map(|l| l.trim_end_matches(';'))
        .collect();
    for module in &modules {
        assert!(
            layers.contains_key(*module),
            "src/lib.rs declares `{module}`, which the layer table of ARCHITECTURE.md does not place"
        );
    }
    let mut files = Vec::new();
    sources(&root.join("src"), &mut files);
    let mut wrong = Vec::new();
    for file in files {
        let relative = file.strip_prefix(root.join("src")).unwrap();
        let first = relative.components().next().unwrap().as_os_str();
        let module = first.to_string_lossy().trim_end_matches(".rs").to_string();
        let Some(&own) = layers.get(&module) else {
            continue; // lib.rs, main.rs: above every layer
        };
        let code = std::fs::read_to_string(&file).unwrap();
        for used in crate_paths(&code) {
            if used == module {
                continue;
            }
            match layers.get(&used) {
                Some(&layer) if layer < own => {}
                Some(&layer) => wrong.push(format!(
                    "src/{}: `{module}` (layer {own}) uses `crate::{used}` (layer {layer})",
                    relative.display()
                )),
                None => wrong.push(format!(
                    "src/{}: uses `crate::{used}`, which is not in the layer table",
                    relative.display()
                )),
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports against the layer order of ARCHITECTURE.md:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn crate_paths_are_found_outside_comments() {
    let code = "use crate::bus::Bus; // crate::server\nlet x = crate::protocol::now_ms();";
    assert_eq!(crate_paths(code), ["bus", "protocol"]);
}
