//! The snap as snapcraft would build it, without snapcraft (which cannot run
//! on these machines): `meta/snap.yaml` generated from `snap/snapcraft.yaml`,
//! the tree laid out the way snapcraft lays out its prime directory, and the
//! checks that a packed snap really holds what `snapcraft.yaml` declares.
//!
//! Shared by the `snap-pack` tool (`scripts/snap-pack`) and the integration
//! test `tests/it/snap_pack.rs`, so the snap that CI packs and the one the
//! tests check come from the same code.
//!
//! Generation follows snapcraft (core22/core24 lifecycle):
//! `snapcraft/meta/snap_yaml.py` writes name, version, summary, description,
//! architectures, base, apps, confinement, grade, then a default
//! `environment` (LD_LIBRARY_PATH, PATH) for strict snaps, in that order;
//! apps keep their keys as written. `snapcraft/parts/setup_assets.py` copies
//! `snap/hooks/*` to `snap/hooks/` in the snap and writes a wrapper in
//! `meta/hooks/` that execs it, and creates `meta/gui/`.
//!
//! Every key of `snapcraft.yaml` must be one this code knows: a new key
//! fails generation loudly instead of being silently left out of the snap.
#![allow(dead_code)]

use serde::{Deserialize, Serialize};
use serde_norway::{Mapping, Value};
use std::fmt::Write as _;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

pub type Result<T> = std::result::Result<T, String>;

/// The part of `snapcraft.yaml` this project uses.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Snapcraft {
    pub name: String,
    pub base: String,
    pub version: String,
    pub summary: String,
    pub description: String,
    pub grade: String,
    pub confinement: String,
    /// Kept as a mapping so the apps stay in the order they are written.
    pub apps: Mapping,
    /// Copied as written (snapcraft does not change slots).
    #[serde(default)]
    pub slots: Option<Mapping>,
    /// Build instructions only: nothing of them lands in `meta/snap.yaml`
    /// (the files of `stage-packages` do: [`staged_files`]).
    pub parts: Mapping,
}

/// A part's keys this tool acts on; the others steer snapcraft's build of
/// the agent, which `cargo build --release` stands in for.
#[derive(Debug, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
struct Part {
    #[serde(default)]
    stage_packages: Vec<String>,
    #[serde(default)]
    prime: Vec<String>,
}

/// An app, as written in `snapcraft.yaml` and copied into `snap.yaml`.
/// Field order is snapcraft's (`SnapApp`), so the output matches its.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct App {
    pub command: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start_timeout: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_timeout: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restart_delay: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub daemon: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub after: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub before: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restart_condition: Option<String>,
    /// `disable`: a daemon installed stopped (the relay, for a server).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub install_mode: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plugs: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slots: Option<Vec<String>>,
}

/// `meta/snap.yaml`, in snapcraft's key order.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
struct SnapYaml<'a> {
    name: &'a str,
    version: &'a str,
    summary: &'a str,
    description: &'a str,
    architectures: Vec<String>,
    base: &'a str,
    apps: Mapping,
    confinement: &'a str,
    grade: &'a str,
    environment: Environment,
    #[serde(skip_serializing_if = "Option::is_none")]
    slots: Option<&'a Mapping>,
}

/// What snapcraft sets for a strict snap that declares no environment and
/// ships no `lib/` directories.
#[derive(Debug, Serialize)]
struct Environment {
    #[serde(rename = "LD_LIBRARY_PATH")]
    ld_library_path: &'static str,
    #[serde(rename = "PATH")]
    path: &'static str,
}

const LD_LIBRARY_PATH: &str = "${SNAP_LIBRARY_PATH}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}";
const PATH: &str = "$SNAP/usr/sbin:$SNAP/usr/bin:$SNAP/sbin:$SNAP/bin:$PATH";

/// Keys of `snapcraft.yaml` that only steer the build.
const BUILD_ONLY_KEYS: &[&str] = &["parts"];

/// The keys snapcraft adds that `snapcraft.yaml` does not have.
const GENERATED_KEYS: &[&str] = &["architectures", "environment"];

/// The Debian architecture name of the machine this tool was built for
/// (the one `cargo build --release` builds the agent for).
pub fn snap_arch() -> Result<&'static str> {
    Ok(match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "arm" => "armhf",
        "x86" => "i386",
        "riscv64" => "riscv64",
        "s390x" => "s390x",
        "powerpc64" => "ppc64el",
        other => return Err(format!("no snap architecture known for {other}")),
    })
}

pub fn parse_snapcraft(text: &str) -> Result<Snapcraft> {
    serde_norway::from_str(text).map_err(|e| format!("snap/snapcraft.yaml: {e}"))
}

/// `meta/snap.yaml` for `snapcraft.yaml`, built for `arch`.
pub fn generate(snapcraft_yaml: &str, arch: &str) -> Result<String> {
    let s = parse_snapcraft(snapcraft_yaml)?;
    let mut apps = Mapping::new();
    for (name, app) in &s.apps {
        let app: App = serde_norway::from_value(app.clone())
            .map_err(|e| format!("snap/snapcraft.yaml: app {}: {e}", show(name)))?;
        let value = serde_norway::to_value(&app).map_err(|e| e.to_string())?;
        apps.insert(name.clone(), value);
    }
    let meta = SnapYaml {
        name: &s.name,
        version: &s.version,
        summary: &s.summary,
        description: &s.description,
        architectures: vec![arch.to_string()],
        base: &s.base,
        apps,
        confinement: &s.confinement,
        grade: &s.grade,
        environment: Environment {
            ld_library_path: LD_LIBRARY_PATH,
            path: PATH,
        },
        slots: s.slots.as_ref(),
    };
    serde_norway::to_string(&meta).map_err(|e| e.to_string())
}

/// Where `snapcraft.yaml` and `meta/snap.yaml` disagree, one line per
/// difference (empty: they agree). Compares parsed documents, independently
/// of [`generate`]: every key of `snapcraft.yaml` but the build-only ones
/// must be in `snap.yaml` with the same value, every app with the same keys
/// and values, and `snap.yaml` must have nothing else but what snapcraft
/// adds.
pub fn disagreements(snapcraft_yaml: &str, snap_yaml: &str) -> Result<Vec<String>> {
    let project: Mapping =
        serde_norway::from_str(snapcraft_yaml).map_err(|e| format!("snap/snapcraft.yaml: {e}"))?;
    let meta: Mapping =
        serde_norway::from_str(snap_yaml).map_err(|e| format!("meta/snap.yaml: {e}"))?;
    let mut out = Vec::new();
    for (key, value) in &project {
        let k = show(key);
        if BUILD_ONLY_KEYS.contains(&k.as_str()) {
            if meta.contains_key(key) {
                out.push(format!("meta/snap.yaml has the build-only key {k}"));
            }
            continue;
        }
        match meta.get(key) {
            None => out.push(format!("meta/snap.yaml lacks {k}")),
            Some(m) if k == "apps" => compare_apps(value, m, &mut out),
            Some(m) if m != value => out.push(format!(
                "{k}: snapcraft.yaml has {}, meta/snap.yaml has {}",
                show(value),
                show(m)
            )),
            Some(_) => {}
        }
    }
    for key in meta.keys() {
        let k = show(key);
        if !project.contains_key(key) && !GENERATED_KEYS.contains(&k.as_str()) {
            out.push(format!("meta/snap.yaml has {k}, snapcraft.yaml does not"));
        }
    }
    Ok(out)
}

fn compare_apps(project: &Value, meta: &Value, out: &mut Vec<String>) {
    let (Some(project), Some(meta)) = (project.as_mapping(), meta.as_mapping()) else {
        out.push("apps is not a mapping".into());
        return;
    };
    for (name, app) in project {
        let n = show(name);
        let Some(m) = meta.get(name) else {
            out.push(format!("meta/snap.yaml lacks app {n}"));
            continue;
        };
        let (Some(app), Some(m)) = (app.as_mapping(), m.as_mapping()) else {
            out.push(format!("app {n} is not a mapping"));
            continue;
        };
        for (key, value) in app {
            match m.get(key) {
                Some(v) if v == value => {}
                Some(v) => out.push(format!(
                    "app {n} {}: snapcraft.yaml has {}, meta/snap.yaml has {}",
                    show(key),
                    show(value),
                    show(v)
                )),
                None => out.push(format!("meta/snap.yaml app {n} lacks {}", show(key))),
            }
        }
        for key in m.keys() {
            if !app.contains_key(key) {
                out.push(format!(
                    "meta/snap.yaml app {n} has {}, snapcraft.yaml does not",
                    show(key)
                ));
            }
        }
    }
    for name in meta.keys() {
        if !project.contains_key(name) {
            out.push(format!(
                "meta/snap.yaml has app {}, snapcraft.yaml does not",
                show(name)
            ));
        }
    }
}

/// A YAML value on one line, for messages.
fn show(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => serde_norway::to_string(other)
            .map(|s| s.trim().replace('\n', " "))
            .unwrap_or_else(|_| format!("{other:?}")),
    }
}

/// The source files of the snap.
pub struct Sources {
    /// The agent's (release) binary.
    pub binary: PathBuf,
    /// The relay's, built beside it (`cargo install --root`, which the rust
    /// plugin runs, installs every binary of the crate).
    pub relay: PathBuf,
    /// `snap/snapcraft.yaml`.
    pub snapcraft_yaml: PathBuf,
    /// `snap/hooks/`.
    pub hooks: PathBuf,
}

impl Sources {
    /// The project's files under `root`, with `binary`.
    pub fn of_project(root: &Path, binary: &Path) -> Sources {
        Sources {
            binary: binary.to_path_buf(),
            relay: binary.with_file_name("iot-relay"),
            snapcraft_yaml: root.join("snap/snapcraft.yaml"),
            hooks: root.join("snap/hooks"),
        }
    }
}

/// The hook wrapper snapcraft writes into `meta/hooks/`.
pub fn hook_wrapper(name: &str) -> String {
    format!("#!/bin/sh\nexec \"$SNAP/snap/hooks/{name}\" \"$@\"\n")
}

/// Lays out the snap's tree in `prime` (created; must not exist yet) as
/// snapcraft's prime directory would be: `bin/iot-agent` and `bin/iot-relay` (where the rust
/// plugin's `cargo install --root` puts it), `meta/snap.yaml`,
/// `snap/hooks/*`, their wrappers in `meta/hooks/`, and `meta/gui/`.
pub fn layout(src: &Sources, prime: &Path) -> Result<()> {
    let io = |what: &str, e: std::io::Error| format!("{what}: {e}");
    if prime.exists() {
        return Err(format!("{} exists already", prime.display()));
    }
    let yaml = fs::read_to_string(&src.snapcraft_yaml)
        .map_err(|e| io(&src.snapcraft_yaml.display().to_string(), e))?;
    let meta = generate(&yaml, snap_arch()?)?;
    for dir in ["bin", "meta/hooks", "meta/gui", "snap/hooks"] {
        fs::create_dir_all(prime.join(dir)).map_err(|e| io(dir, e))?;
    }
    for (from, to) in [
        (&src.binary, "bin/iot-agent"),
        (&src.relay, "bin/iot-relay"),
    ] {
        fs::copy(from, prime.join(to)).map_err(|e| io(&from.display().to_string(), e))?;
        set_mode(&prime.join(to), 0o755)?;
    }
    fs::write(prime.join("meta/snap.yaml"), meta).map_err(|e| io("meta/snap.yaml", e))?;
    for f in staged_files(&yaml)? {
        let to = prime.join(&f.path);
        if let Some(dir) = to.parent() {
            fs::create_dir_all(dir).map_err(|e| io(&f.path, e))?;
        }
        fs::copy(Path::new("/").join(&f.path), &to).map_err(|e| io(&f.path, e))?;
    }
    for name in hook_names(&src.hooks)? {
        let hook = prime.join("snap/hooks").join(&name);
        fs::copy(src.hooks.join(&name), &hook).map_err(|e| io(&name, e))?;
        set_mode(&hook, 0o755)?;
        let wrapper = prime.join("meta/hooks").join(&name);
        fs::write(&wrapper, hook_wrapper(&name)).map_err(|e| io(&name, e))?;
        set_mode(&wrapper, 0o755)?;
    }
    Ok(())
}

/// A file a part's `stage-packages` brings into the snap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Staged {
    pub package: String,
    /// Relative to the snap's root (and to `/` of the build machine).
    pub path: String,
}

/// The files of every part's `stage-packages` that its `prime` list keeps,
/// each checked to belong to its Debian package on this machine
/// (`dpkg-query -L`): what snapcraft would unpack from the same package.
pub fn staged_files(snapcraft_yaml: &str) -> Result<Vec<Staged>> {
    let s = parse_snapcraft(snapcraft_yaml)?;
    let mut out = Vec::new();
    for (name, part) in &s.parts {
        let part: Part = serde_norway::from_value(part.clone())
            .map_err(|e| format!("snap/snapcraft.yaml: part {}: {e}", show(name)))?;
        for package in &part.stage_packages {
            let list = Command::new("dpkg-query")
                .args(["-L", package])
                .output()
                .map_err(|e| format!("cannot run dpkg-query: {e}"))?;
            if !list.status.success() {
                return Err(format!(
                    "stage-packages {package}: not installed on this machine \
                     (apt-get install {package}; scripts/setup does): {}",
                    String::from_utf8_lossy(&list.stderr).trim()
                ));
            }
            let owned: Vec<String> = String::from_utf8_lossy(&list.stdout)
                .lines()
                .map(|l| l.trim_start_matches('/').to_string())
                .collect();
            for path in &part.prime {
                if !owned.contains(path) {
                    return Err(format!(
                        "part {}: prime lists {path}, which package {package} does not have",
                        show(name)
                    ));
                }
                out.push(Staged {
                    package: package.clone(),
                    path: path.clone(),
                });
            }
        }
    }
    Ok(out)
}

/// The hooks in `snap/hooks/`, sorted.
pub fn hook_names(dir: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    let entries = fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for entry in entries {
        let entry = entry.map_err(|e| e.to_string())?;
        names.push(entry.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    Ok(names)
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(|e| format!("chmod {}: {e}", path.display()))
}

/// Checks a snap's tree (a laid-out prime directory or an unpacked snap)
/// against the sources: `meta/snap.yaml` is exactly what [`generate`] makes
/// of `snapcraft.yaml` and agrees with it ([`disagreements`]); every app's
/// command is an executable in the tree; every hook of `snap/hooks/` is
/// there byte for byte with its `meta/hooks/` wrapper; `bin/iot-agent` is an
/// ELF executable whose `version` is the snap's version. Returns what was
/// checked, one line per item, or every problem found.
pub fn check_tree(src: &Sources, tree: &Path) -> Result<Vec<String>> {
    let mut problems = Vec::new();
    let mut checked = Vec::new();
    let yaml = fs::read_to_string(&src.snapcraft_yaml)
        .map_err(|e| format!("{}: {e}", src.snapcraft_yaml.display()))?;
    let project = parse_snapcraft(&yaml)?;

    let meta = fs::read_to_string(tree.join("meta/snap.yaml"))
        .map_err(|e| format!("meta/snap.yaml in the snap: {e}"))?;
    if meta != generate(&yaml, snap_arch()?)? {
        problems.push("meta/snap.yaml differs from the one generated from snapcraft.yaml".into());
    }
    let drift = disagreements(&yaml, &meta)?;
    if drift.is_empty() {
        checked.push("meta/snap.yaml agrees with snap/snapcraft.yaml".into());
    }
    problems.extend(drift);

    let meta_doc: Mapping = serde_norway::from_str(&meta).map_err(|e| e.to_string())?;
    let apps = meta_doc
        .get("apps")
        .and_then(Value::as_mapping)
        .cloned()
        .unwrap_or_default();
    for (name, app) in &apps {
        let name = show(name);
        let command = app.get("command").map(show).unwrap_or_default();
        let exe = command.split_whitespace().next().unwrap_or_default();
        match executable(&tree.join(exe)) {
            Ok(()) => {
                let plugs = app
                    .get("plugs")
                    .and_then(Value::as_sequence)
                    .map(|p| p.iter().map(show).collect::<Vec<_>>().join(", "))
                    .unwrap_or_else(|| "no plugs".into());
                let daemon = app
                    .get("daemon")
                    .map(|d| format!(" (daemon: {})", show(d)))
                    .unwrap_or_default();
                checked.push(format!("app {name}{daemon}: {command}; plugs: {plugs}"));
            }
            Err(e) => problems.push(format!("app {name}: {e}")),
        }
    }

    for hook in hook_names(&src.hooks)? {
        let ours = fs::read(src.hooks.join(&hook)).map_err(|e| e.to_string())?;
        let packed = tree.join("snap/hooks").join(&hook);
        let wrapper = tree.join("meta/hooks").join(&hook);
        let mut ok = true;
        if fs::read(&packed).ok().as_ref() != Some(&ours) {
            problems.push(format!("snap/hooks/{hook} is missing or differs from ours"));
            ok = false;
        }
        if fs::read_to_string(&wrapper).ok() != Some(hook_wrapper(&hook)) {
            problems.push(format!("meta/hooks/{hook} is missing or not the wrapper"));
            ok = false;
        }
        for path in [&packed, &wrapper] {
            if let Err(e) = executable(path) {
                problems.push(format!("hook {hook}: {e}"));
                ok = false;
            }
        }
        if ok {
            checked.push(format!(
                "hook {hook}: meta/hooks/{hook} -> snap/hooks/{hook}"
            ));
        }
    }

    for f in staged_files(&yaml)? {
        let ours = fs::read(Path::new("/").join(&f.path)).map_err(|e| e.to_string())?;
        match fs::read(tree.join(&f.path)) {
            Ok(b) if b == ours => checked.push(format!(
                "{} (staged from package {}): {} bytes",
                f.path,
                f.package,
                b.len()
            )),
            Ok(_) => problems.push(format!("{} differs from package {}'s", f.path, f.package)),
            Err(e) => problems.push(format!("{} (package {}): {e}", f.path, f.package)),
        }
    }
    match bundled_server_accepts_generated_config(tree) {
        Ok(line) => checked.push(line),
        Err(e) => problems.push(e),
    }

    for name in ["iot-agent", "iot-relay"] {
        let binary = tree.join("bin").join(name);
        match fs::read(&binary) {
            Ok(bytes) if bytes.starts_with(b"\x7fELF") => {
                let out = Command::new(&binary).arg("version").output();
                let want = format!("{name} {}", project.version);
                match out {
                    Ok(o) if String::from_utf8_lossy(&o.stdout).trim() == want => checked.push(
                        format!("bin/{name}: ELF, {} bytes, prints {want:?}", bytes.len()),
                    ),
                    Ok(o) => problems.push(format!(
                        "bin/{name} version printed {:?}, the snap's version is {:?}",
                        String::from_utf8_lossy(&o.stdout).trim(),
                        project.version
                    )),
                    Err(e) => problems.push(format!("cannot run bin/{name}: {e}")),
                }
            }
            Ok(_) => problems.push(format!("bin/{name} is not an ELF executable")),
            Err(e) => problems.push(format!("bin/{name}: {e}")),
        }
    }

    if problems.is_empty() {
        Ok(checked)
    } else {
        let mut msg = String::from("the snap does not match its sources:");
        for p in &problems {
            let _ = write!(msg, "\n  - {p}");
        }
        Err(msg)
    }
}

/// The snap's own pair, as the `nats` daemon runs them: `bin/iot-agent
/// nats-config` writes the configuration (defaults, in a scratch data
/// directory) and the staged `usr/sbin/nats-server -t` accepts it.
fn bundled_server_accepts_generated_config(tree: &Path) -> Result<String> {
    let server = tree.join("usr/sbin/nats-server");
    if !server.exists() {
        return Err("usr/sbin/nats-server is not in the snap".into());
    }
    executable(&server)?;
    let scratch = tempfile::tempdir().map_err(|e| e.to_string())?;
    let out = Command::new(tree.join("bin/iot-agent"))
        .arg("nats-config")
        .env("IOT_AGENT_DIRS__DATA", scratch.path().join("data"))
        .env("IOT_AGENT_DIRS__COMMON", scratch.path().join("common"))
        .env_remove("SNAP")
        .env_remove("SNAP_NAME")
        .env_remove("SNAP_DATA")
        .env_remove("SNAP_COMMON")
        .output()
        .map_err(|e| format!("cannot run bin/iot-agent nats-config: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "bin/iot-agent nats-config failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let conf = scratch.path().join("data/nats/nats-server.conf");
    let test = Command::new(&server)
        .arg("-t")
        .arg("-c")
        .arg(&conf)
        .output()
        .map_err(|e| format!("cannot run usr/sbin/nats-server: {e}"))?;
    if !test.status.success() {
        return Err(format!(
            "usr/sbin/nats-server -t refuses the generated configuration: {}{}",
            String::from_utf8_lossy(&test.stdout).trim(),
            String::from_utf8_lossy(&test.stderr).trim()
        ));
    }
    let version = Command::new(&server)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    Ok(format!(
        "usr/sbin/nats-server ({version}) accepts the configuration bin/iot-agent nats-config generates"
    ))
}

fn executable(path: &Path) -> Result<()> {
    let meta = fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
        return Err(format!("{} is not an executable file", path.display()));
    }
    Ok(())
}

/// Unpacks a `.snap` (squashfs) with `unsquashfs` into `into` (must not
/// exist) and returns the file list `unsquashfs -l` prints, relative to the
/// snap's root.
pub fn unpack(snap: &Path, into: &Path) -> Result<Vec<String>> {
    let list = Command::new("unsquashfs")
        .arg("-l")
        .arg(snap)
        .output()
        .map_err(|e| format!("cannot run unsquashfs (apt-get install squashfs-tools): {e}"))?;
    if !list.status.success() {
        return Err(format!(
            "unsquashfs -l {}: {}",
            snap.display(),
            String::from_utf8_lossy(&list.stderr).trim()
        ));
    }
    let files = String::from_utf8_lossy(&list.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("squashfs-root/"))
        .map(str::to_string)
        .collect();
    let out = Command::new("unsquashfs")
        .arg("-no-progress")
        .arg("-d")
        .arg(into)
        .arg(snap)
        .output()
        .map_err(|e| format!("cannot run unsquashfs: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "unsquashfs -d {} {}: {}",
            into.display(),
            snap.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(files)
}
