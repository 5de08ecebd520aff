//! Staged-file reconcile: the files the host stages in the instance root (manifests, image
//! archives) and the CNI configuration list of the plan are placed in k3s's data directory, and
//! what gatevm placed earlier but is no longer staged is removed. Which files gatevm placed is
//! recorded in one JSON index per target directory, so files k3s wrote itself are never
//! touched.

use super::plan::{valid_name, CniConflist};
use crate::fsutil::{mkdir_private, write_atomic, write_atomic_with, TMP_SUFFIX};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Whether a staged manifest name is one k3s's deploy controller applies.
pub(crate) fn is_manifest_name(name: &str) -> bool {
    name.ends_with(".yaml") || name.ends_with(".yml") || name.ends_with(".json")
}

/// What a reconciliation of a target directory did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct SyncReport {
    /// Files written (new or changed).
    pub copied: Vec<String>,
    /// Files already up to date.
    pub unchanged: Vec<String>,
    /// Files gatevm had placed earlier and removed because they are no longer staged.
    pub removed: Vec<String>,
    /// Staged entries not placed, with the reason (symbolic links, directories, other names).
    pub ignored: Vec<String>,
    /// Failures (the rest went on).
    pub problems: Vec<String>,
}

impl SyncReport {
    /// Names now in the target that gatevm placed and that are staged (copied or unchanged).
    pub(crate) fn placed(&self) -> Vec<String> {
        let mut v: Vec<String> = self.copied.iter().chain(&self.unchanged).cloned().collect();
        v.sort();
        v
    }

    /// One log line, e.g. `2 copied, 1 unchanged, 1 removed, 1 ignored`.
    pub(crate) fn summary(&self) -> String {
        format!(
            "{} copied, {} unchanged, {} removed, {} ignored, {} problems",
            self.copied.len(),
            self.unchanged.len(),
            self.removed.len(),
            self.ignored.len(),
            self.problems.len()
        )
    }
}

/// The content of one file gatevm wants in a target directory.
enum Source {
    /// A staged regular file, with its metadata from the listing.
    Staged(PathBuf, fs::Metadata),
    /// Generated text.
    Text(String),
}

/// Reads an index of placed names; missing means none. Names that are not [`valid_name`] are
/// dropped, so a damaged index can never make gatevm remove anything outside the target.
/// `None` when the index exists but cannot be read or parsed (reported in `problems`).
fn read_index(index: &Path, problems: &mut Vec<String>) -> Option<BTreeSet<String>> {
    let text = match fs::read_to_string(index) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Some(BTreeSet::new()),
        Err(e) => {
            problems.push(format!("cannot read {}: {e}", index.display()));
            return None;
        }
    };
    let files = serde_json::from_str::<Value>(&text).ok().and_then(|v| {
        v.get("files").and_then(Value::as_array).map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .filter(|n| valid_name(n))
                .map(str::to_string)
                .collect()
        })
    });
    if files.is_none() {
        problems.push(format!(
            "{} is damaged; files gatevm placed earlier are no longer known",
            index.display()
        ));
    }
    files
}

fn write_index(index: &Path, names: &BTreeSet<String>) -> io::Result<()> {
    if let Some(dir) = index.parent() {
        mkdir_private(dir)?;
    }
    let mut text = json!({ "version": 1, "files": names }).to_string();
    text.push('\n');
    write_atomic(index, text.as_bytes(), 0o600)
}

/// Whether `dst` already holds what `src` describes (same size and modification time; gatevm
/// gives its copies the staged file's time).
fn up_to_date(src: &fs::Metadata, dst: &Path) -> bool {
    match fs::symlink_metadata(dst) {
        Ok(d) => {
            d.file_type().is_file()
                && d.len() == src.len()
                && matches!((src.modified(), d.modified()), (Ok(a), Ok(b)) if a == b)
        }
        Err(_) => false,
    }
}

/// Copies a staged file to `dst` through a temporary file: the source is opened without
/// following a symbolic link (a link swapped in after the listing fails the copy), must be a
/// regular file, and its modification time goes to the copy.
fn copy_staged(src: &Path, dst: &Path) -> io::Result<()> {
    let mut from = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(src)?;
    let meta = from.metadata()?;
    if !meta.file_type().is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    write_atomic_with(dst, 0o600, |to| {
        io::copy(&mut from, to)?;
        if let Ok(t) = meta.modified() {
            to.set_modified(t)?;
        }
        Ok(())
    })
}

/// Makes `dst` hold exactly `want` among the files gatevm manages there (recorded in `index`):
/// writes new and changed ones, removes those placed earlier but no longer wanted (only when
/// `complete`: a staging directory that could not be read fully removes nothing), and leaves
/// every other file alone.
fn reconcile(
    dst: &Path,
    index: &Path,
    want: BTreeMap<String, Source>,
    complete: bool,
    report: &mut SyncReport,
) {
    let read = read_index(index, &mut report.problems);
    // What the index on disk says (`None`: unknown, rewrite it).
    let mut recorded = read.clone();
    let previous = read.unwrap_or_default();
    if let Err(e) = mkdir_private(dst) {
        report
            .problems
            .push(format!("cannot create {}: {e}", dst.display()));
        return;
    }
    remove_temporaries(dst);
    // Record everything that may be placed before placing it, so an interrupted run still lets
    // a later boot remove what is no longer staged.
    let mut all = previous.clone();
    all.extend(want.keys().cloned());
    if recorded.as_ref() != Some(&all) {
        if let Err(e) = write_index(index, &all) {
            report
                .problems
                .push(format!("cannot write {}: {e}", index.display()));
            // Without an index, files placed now could never be removed again: place nothing.
            return;
        }
        recorded = Some(all);
    }

    let mut keep = place_wanted(dst, &want, &previous, report);
    let wanted: BTreeSet<String> = want.keys().cloned().collect();
    let unwanted = previous.difference(&wanted).cloned().collect();
    remove_unwanted(dst, unwanted, complete, &mut keep, report);
    if recorded.as_ref() != Some(&keep) {
        if let Err(e) = write_index(index, &keep) {
            report
                .problems
                .push(format!("cannot write {}: {e}", index.display()));
        }
    }
}

/// Removes the temporary files of an interrupted earlier run from `dst`.
fn remove_temporaries(dst: &Path) {
    if let Ok(rd) = fs::read_dir(dst) {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with('.') && n.ends_with(TMP_SUFFIX) {
                let _ = fs::remove_file(e.path());
            }
        }
    }
}

/// Writes the files of `want` that are missing or out of date in `dst`; returns the names to
/// keep recorded (placed now, already up to date, or an older copy left by a failed write).
fn place_wanted(
    dst: &Path,
    want: &BTreeMap<String, Source>,
    previous: &BTreeSet<String>,
    report: &mut SyncReport,
) -> BTreeSet<String> {
    let mut keep = BTreeSet::new();
    for (name, source) in want {
        let target = dst.join(name);
        let result = match source {
            Source::Staged(src, meta) => {
                if up_to_date(meta, &target) {
                    report.unchanged.push(name.clone());
                    keep.insert(name.clone());
                    continue;
                }
                copy_staged(src, &target)
            }
            Source::Text(text) => {
                if fs::symlink_metadata(&target).is_ok_and(|m| m.file_type().is_file())
                    && fs::read(&target).is_ok_and(|b| b == text.as_bytes())
                {
                    report.unchanged.push(name.clone());
                    keep.insert(name.clone());
                    continue;
                }
                write_atomic(&target, text.as_bytes(), 0o644)
            }
        };
        match result {
            Ok(()) => {
                report.copied.push(name.clone());
                keep.insert(name.clone());
            }
            Err(e) => {
                report
                    .problems
                    .push(format!("cannot place {}: {e}", target.display()));
                // An older copy may still be there: keep it recorded so it can go later.
                if fs::symlink_metadata(&target).is_ok() && previous.contains(name) {
                    keep.insert(name.clone());
                }
            }
        }
    }
    keep
}

/// Removes from `dst` the files gatevm placed earlier that are no longer wanted (`unwanted`),
/// only when `complete`; what stays (not removed, or not `complete`) is added to `keep`.
/// Directories are never removed.
fn remove_unwanted(
    dst: &Path,
    unwanted: BTreeSet<String>,
    complete: bool,
    keep: &mut BTreeSet<String>,
    report: &mut SyncReport,
) {
    for name in unwanted {
        let target = dst.join(&name);
        if !complete {
            if fs::symlink_metadata(&target).is_ok() {
                keep.insert(name);
            }
            continue;
        }
        match fs::symlink_metadata(&target) {
            Err(_) => {}
            Ok(m) if m.file_type().is_dir() => report.problems.push(format!(
                "{} is a directory now, not gatevm's file; left alone",
                target.display()
            )),
            Ok(_) => match fs::remove_file(&target) {
                Ok(()) => report.removed.push(name),
                Err(e) => {
                    report
                        .problems
                        .push(format!("cannot remove {}: {e}", target.display()));
                    keep.insert(name);
                }
            },
        }
    }
}

/// Places the regular files of the staging directory `src` whose names `accept` takes into
/// `dst`, replacing same-named files, and removes from `dst` the files an earlier call placed
/// (recorded in `index`) that are no longer staged. Files in `dst` that gatevm did not place
/// (k3s's own, like its packaged `coredns.yaml`) are never touched. Symbolic links in the
/// staging directory are not followed (they are ignored), nor are subdirectories; a missing
/// staging directory stages nothing (so everything placed earlier goes), while one that cannot
/// be read fully (or is a symbolic link) removes nothing. Unchanged files (same size and time)
/// are not copied again.
pub(crate) fn sync_staged(
    src: &Path,
    dst: &Path,
    index: &Path,
    accept: fn(&str) -> bool,
    accepted: &str,
) -> SyncReport {
    let mut report = SyncReport::default();
    let mut want = BTreeMap::new();
    match fs::symlink_metadata(src) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => report
            .problems
            .push(format!("cannot read {}: {e}", src.display())),
        Ok(m) if !m.file_type().is_dir() => report.problems.push(format!(
            "{} is not a directory (symbolic links are not followed); nothing staged, \
             nothing removed",
            src.display()
        )),
        Ok(_) => match fs::read_dir(src) {
            Err(e) => report
                .problems
                .push(format!("cannot read {}: {e}", src.display())),
            Ok(rd) => {
                for entry in rd {
                    let entry = match entry {
                        Ok(e) => e,
                        Err(e) => {
                            report
                                .problems
                                .push(format!("cannot read {}: {e}", src.display()));
                            continue;
                        }
                    };
                    let raw = entry.file_name();
                    let Some(name) = raw.to_str().map(str::to_string) else {
                        report
                            .ignored
                            .push(format!("{raw:?}: the name is not UTF-8"));
                        continue;
                    };
                    let meta = match fs::symlink_metadata(entry.path()) {
                        Ok(m) => m,
                        Err(e) => {
                            report.problems.push(format!("{name}: {e}"));
                            continue;
                        }
                    };
                    let ft = meta.file_type();
                    if ft.is_symlink() {
                        report
                            .ignored
                            .push(format!("{name}: a symbolic link (not followed)"));
                    } else if !ft.is_file() {
                        report.ignored.push(format!("{name}: not a regular file"));
                    } else if !valid_name(&name) {
                        report
                            .ignored
                            .push(format!("{name:?}: not a plain visible file name"));
                    } else if !accept(&name) {
                        report.ignored.push(format!("{name}: not {accepted}"));
                    } else {
                        want.insert(name, Source::Staged(entry.path(), meta));
                    }
                }
            }
        },
    }
    // Any problem reading the staging directory: place what was read, remove nothing.
    let complete = report.problems.is_empty();
    reconcile(dst, index, want, complete, &mut report);
    report
}

/// Writes the plan's CNI configuration list into `dir` (or none), removing a list gatevm wrote
/// on an earlier boot under another name (or when flannel now provides the network), never
/// touching flannel's own `10-flannel.conflist`.
pub(crate) fn place_cni(cni: Option<&CniConflist>, dir: &Path, index: &Path) -> SyncReport {
    let mut report = SyncReport::default();
    let want = cni
        .map(|c| (c.file.clone(), Source::Text(c.json.clone())))
        .into_iter()
        .collect();
    reconcile(dir, index, want, true, &mut report);
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::k3s::testutil::{names, write};
    use std::fs::File;
    use std::os::unix::fs::symlink;
    use std::time::Duration;

    fn manifests(src: &Path, dst: &Path, index: &Path) -> SyncReport {
        sync_staged(
            src,
            dst,
            index,
            is_manifest_name,
            "a .yaml, .yml or .json file",
        )
    }

    #[test]
    fn sync_copies_replaces_and_removes_only_what_it_placed() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("staged");
        let dst = d.path().join("k3s/server/manifests");
        let index = d.path().join("k3s/.gatevm/manifests.json");
        write(&src.join("app.yaml"), "app: 1\n");
        write(&src.join("tls.json"), "{}");
        write(&src.join("coredns.yaml"), "mine\n");
        // k3s's own files.
        write(&dst.join("coredns.yaml"), "k3s's\n");
        write(&dst.join("local-storage.yaml"), "k3s's\n");

        let r = manifests(&src, &dst, &index);
        assert_eq!(r.copied, vec!["app.yaml", "coredns.yaml", "tls.json"]);
        assert!(r.removed.is_empty() && r.problems.is_empty(), "{r:?}");
        assert_eq!(
            fs::read_to_string(dst.join("coredns.yaml")).unwrap(),
            "mine\n"
        );
        assert_eq!(
            fs::read_to_string(dst.join("app.yaml")).unwrap(),
            "app: 1\n"
        );

        // Nothing changed: nothing copied.
        let r = manifests(&src, &dst, &index);
        assert_eq!(r.unchanged, vec!["app.yaml", "coredns.yaml", "tls.json"]);
        assert!(r.copied.is_empty());

        // A changed file is copied again (different size, then same size but another time).
        write(&src.join("app.yaml"), "app: 22\n");
        let r = manifests(&src, &dst, &index);
        assert_eq!(r.copied, vec!["app.yaml"]);
        write(&src.join("app.yaml"), "app: 33\n");
        let f = File::options()
            .write(true)
            .open(src.join("app.yaml"))
            .unwrap();
        f.set_modified(std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000))
            .unwrap();
        let r = manifests(&src, &dst, &index);
        assert_eq!(r.copied, vec!["app.yaml"]);
        assert_eq!(
            fs::read_to_string(dst.join("app.yaml")).unwrap(),
            "app: 33\n"
        );

        // Unstaged files gatevm placed go; k3s's own stay.
        fs::remove_file(src.join("tls.json")).unwrap();
        fs::remove_file(src.join("coredns.yaml")).unwrap();
        let r = manifests(&src, &dst, &index);
        assert_eq!(r.removed, vec!["coredns.yaml", "tls.json"]);
        assert_eq!(names(&dst), vec!["app.yaml", "local-storage.yaml"]);

        // No staging directory at all: everything gatevm placed goes.
        fs::remove_dir_all(&src).unwrap();
        let r = manifests(&src, &dst, &index);
        assert_eq!(r.removed, vec!["app.yaml"]);
        assert!(r.problems.is_empty(), "{r:?}");
        assert_eq!(names(&dst), vec!["local-storage.yaml"]);
        let idx: Value = serde_json::from_str(&fs::read_to_string(&index).unwrap()).unwrap();
        assert_eq!(idx["files"], json!([]));
    }

    #[test]
    fn sync_does_not_follow_symlinks_or_take_other_entries() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("staged");
        let dst = d.path().join("dst");
        let index = d.path().join("idx/manifests.json");
        let outside = d.path().join("secret.yaml");
        write(&outside, "secret\n");
        write(&src.join("ok.yml"), "ok\n");
        write(&src.join("notes.txt"), "x");
        write(&src.join(".hidden.yaml"), "x");
        fs::create_dir_all(src.join("dir.yaml")).unwrap();
        symlink(&outside, src.join("link.yaml")).unwrap();
        symlink(d.path(), src.join("dirlink.yaml")).unwrap();

        let r = manifests(&src, &dst, &index);
        assert_eq!(r.copied, vec!["ok.yml"]);
        assert_eq!(names(&dst), vec!["ok.yml"]);
        let ignored = r.ignored.join("\n");
        for n in [
            "notes.txt",
            ".hidden.yaml",
            "dir.yaml",
            "link.yaml",
            "dirlink.yaml",
        ] {
            assert!(ignored.contains(n), "{n} not reported: {ignored}");
        }
        assert!(ignored.contains("link.yaml: a symbolic link (not followed)"));

        // A staging directory that is itself a symbolic link stages nothing.
        let real = d.path().join("real");
        write(&real.join("x.yaml"), "x");
        let linked = d.path().join("linked");
        symlink(&real, &linked).unwrap();
        let r = manifests(&linked, &dst, &index);
        assert!(r.copied.is_empty());
        assert!(r.problems[0].contains("not a directory"), "{r:?}");
        // Nor does it count as "nothing staged": what gatevm placed stays.
        assert!(r.removed.is_empty(), "{r:?}");
        assert_eq!(names(&dst), vec!["ok.yml"]);
        // The record is kept: once the directory is readable and empty, the file goes.
        fs::remove_dir_all(&src).unwrap();
        fs::create_dir(&src).unwrap();
        assert_eq!(manifests(&src, &dst, &index).removed, vec!["ok.yml"]);
    }

    #[test]
    fn sync_keeps_a_damaged_index_from_deleting_anything() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("staged");
        let dst = d.path().join("dst");
        let index = d.path().join("idx.json");
        fs::create_dir_all(&src).unwrap();
        write(&dst.join("keep.yaml"), "k3s's\n");
        write(&d.path().join("outside.yaml"), "x");
        // Names that are not plain file names are never acted on.
        write(
            &index,
            r#"{"version":1,"files":["../outside.yaml","/etc/passwd",".x","keep/..","a\nb"]}"#,
        );
        let r = manifests(&src, &dst, &index);
        assert!(r.removed.is_empty(), "{r:?}");
        assert!(d.path().join("outside.yaml").exists());
        assert!(dst.join("keep.yaml").exists());

        write(&index, "not json");
        let r = manifests(&src, &dst, &index);
        assert!(r.problems[0].contains("damaged"), "{r:?}");
        assert!(dst.join("keep.yaml").exists());
        // The index is rewritten, so the next run is clean.
        let r = manifests(&src, &dst, &index);
        assert!(r.problems.is_empty(), "{r:?}");
    }

    #[test]
    fn sync_reports_a_directory_in_the_way_and_cleans_temporaries() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("staged");
        let dst = d.path().join("dst");
        let index = d.path().join("idx.json");
        write(&src.join("a.yaml"), "a");
        write(&src.join("b.yaml"), "b");
        fs::create_dir_all(dst.join("a.yaml/sub")).unwrap();
        write(&dst.join(".b.yaml.gatevm-tmp"), "half");
        let r = manifests(&src, &dst, &index);
        assert_eq!(r.copied, vec!["b.yaml"]);
        assert_eq!(r.problems.len(), 1, "{r:?}");
        assert!(r.problems[0].contains("a.yaml"));
        assert_eq!(names(&dst), vec!["a.yaml", "b.yaml"]);
        // Unstaged later: the directory is not gatevm's file and stays.
        fs::remove_file(src.join("a.yaml")).unwrap();
        let r = manifests(&src, &dst, &index);
        assert!(dst.join("a.yaml/sub").is_dir());
        assert!(r.removed.is_empty(), "{r:?}");
    }

    #[test]
    fn images_sync_takes_any_name() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("images");
        let dst = d.path().join("agent/images");
        let index = d.path().join("images.json");
        write(&src.join("k3s-airgap-images-amd64.tar.zst"), "zst");
        write(&src.join("app.tar"), "tar");
        write(&src.join("list.txt"), "img");
        let r = sync_staged(&src, &dst, &index, |_| true, "a regular file");
        assert_eq!(
            r.placed(),
            vec!["app.tar", "k3s-airgap-images-amd64.tar.zst", "list.txt"]
        );
        assert_eq!(
            r.summary(),
            "3 copied, 0 unchanged, 0 removed, 0 ignored, 0 problems"
        );
    }

    #[test]
    fn cni_conflist_is_placed_and_replaced() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("net.d");
        let index = d.path().join("cni.json");
        let a = CniConflist {
            file: "10-gatevm-bridge.conflist".into(),
            json: "{\"a\":1}".into(),
        };
        let r = place_cni(Some(&a), &dir, &index);
        assert_eq!(r.copied, vec!["10-gatevm-bridge.conflist"]);
        assert_eq!(
            fs::read_to_string(dir.join("10-gatevm-bridge.conflist")).unwrap(),
            "{\"a\":1}"
        );
        assert_eq!(place_cni(Some(&a), &dir, &index).unchanged.len(), 1);
        let b = CniConflist {
            file: "20-other.conflist".into(),
            json: "{}".into(),
        };
        let r = place_cni(Some(&b), &dir, &index);
        assert_eq!(r.removed, vec!["10-gatevm-bridge.conflist"]);
        // Flannel's own file (k3s wrote it) is never touched.
        write(&dir.join("10-flannel.conflist"), "flannel");
        let r = place_cni(None, &dir, &index);
        assert_eq!(r.removed, vec!["20-other.conflist"]);
        assert_eq!(names(&dir), vec!["10-flannel.conflist"]);
    }

    #[test]
    fn names_are_checked() {
        for ok in [
            "a.yaml",
            "10-gatevm-bridge.conflist",
            "k3s airgap.tar",
            "ü.yml",
        ] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in ["", ".", "..", ".x", "a/b", "a\nb", &"a".repeat(256)] {
            assert!(!valid_name(bad), "{bad:?}");
        }
        assert!(
            is_manifest_name("a.yaml") && is_manifest_name("a.yml") && is_manifest_name("a.json")
        );
        assert!(!is_manifest_name("a.yaml.skip") && !is_manifest_name("a.YAML"));
    }
}
