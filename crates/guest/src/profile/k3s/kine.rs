//! k3s's datastore (kine on SQLite) at boot: which leftovers of an earlier run are stale and
//! safe to remove before k3s starts.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// k3s's datastore with its default SQLite backend (kine) is `<data-dir>/server/db/state.db`,
/// opened in WAL mode, so next to it may be `state.db-wal` (committed transactions not yet
/// copied into the database) and `state.db-shm` (the WAL's index, shared memory between
/// connections). This returns the files that are stale at boot and safe to delete. It runs
/// before k3s starts in this boot, when nothing has the database open.
///
/// - `state.db` exists (a regular file): only `state.db-shm`. It holds no data, only an index
///   of the WAL, which the first connection rebuilds from `state.db-wal` (SQLite would also
///   discard a stale one by itself; removing it makes certain no index of a crashed run is
///   reused). `state.db-wal` is kept: deleting it loses the transactions committed since the
///   last checkpoint. A `state.db-journal` is kept too: a hot rollback journal is what undoes a
///   half-written transaction. `state.db` itself is never deleted.
/// - `state.db` does not exist (first boot, or a reset that removed only the database):
///   `state.db-wal`, `state.db-shm` and `state.db-journal`, left without their database. SQLite
///   ignores and deletes a WAL or journal whose database is missing or empty, so they hold
///   nothing; they are removed so that no leftover of an earlier datastore sits next to the new
///   one.
/// - `state.db` is something else (a directory, a symbolic link): nothing; gatevm does not
///   guess.
///
/// Never removed: `*.lock` files. SQLite's default unix VFS locks with POSIX advisory locks,
/// which die with the process (and the VM), and kine creates no lock files, so a lock file here
/// is not SQLite's or kine's. k3s's "bootstrap lock" is not a file either: it is a row of the
/// `kine` table (the key `/bootstrap/<token hash>` with an empty value, created before k3s
/// writes its encrypted bootstrap data, left behind when k3s dies in between). Removing that row
/// needs a SQLite engine, which the guest does not have; deleting every `/bootstrap/%` row, as
/// some scripts do, would also delete the populated bootstrap data. Current k3s deletes an
/// empty bootstrap key itself after five one-second waits ("Bootstrap key lock timed out -
/// deleting lock and retrying"), so gatevm leaves the row to k3s.
///
/// Only regular files are returned (never symbolic links or directories).
pub(crate) fn kine_stale_files(db_dir: &Path) -> Vec<PathBuf> {
    let db = db_dir.join("state.db");
    let candidates: &[&str] = match fs::symlink_metadata(&db) {
        Ok(m) if m.file_type().is_file() => &["state.db-shm"],
        Ok(_) => &[],
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            &["state.db-wal", "state.db-shm", "state.db-journal"]
        }
        Err(_) => &[],
    };
    candidates
        .iter()
        .map(|n| db_dir.join(n))
        .filter(|p| fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_file()))
        .collect()
}

/// Removes [`kine_stale_files`]; returns what was removed and the problems.
pub(crate) fn clean_kine(db_dir: &Path) -> (Vec<String>, Vec<String>) {
    let mut removed = Vec::new();
    let mut problems = Vec::new();
    for p in kine_stale_files(db_dir) {
        match fs::remove_file(&p) {
            Ok(()) => removed.push(p.display().to_string()),
            Err(e) => problems.push(format!("cannot remove {}: {e}", p.display())),
        }
    }
    (removed, problems)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::k3s::testutil::{names, write};
    use std::os::unix::fs::symlink;

    #[test]
    fn kine_cleanup_decision() {
        let d = tempfile::tempdir().unwrap();
        let db = d.path().join("server/db");
        fs::create_dir_all(&db).unwrap();
        for n in [
            "state.db-wal",
            "state.db-shm",
            "state.db-journal",
            "state.db.lock",
        ] {
            write(&db.join(n), "x");
        }
        // No database: its companions are orphans, and only they go.
        let stale = kine_stale_files(&db);
        assert_eq!(
            stale,
            vec![
                db.join("state.db-wal"),
                db.join("state.db-shm"),
                db.join("state.db-journal")
            ]
        );

        // With the database: only the shared-memory index; never the database or its WAL.
        write(&db.join("state.db"), "SQLite format 3\0");
        assert_eq!(kine_stale_files(&db), vec![db.join("state.db-shm")]);
        let (removed, problems) = clean_kine(&db);
        assert_eq!(removed, vec![db.join("state.db-shm").display().to_string()]);
        assert!(problems.is_empty());
        assert_eq!(
            names(&db),
            vec![
                "state.db",
                "state.db-journal",
                "state.db-wal",
                "state.db.lock"
            ]
        );
        assert!(kine_stale_files(&db).is_empty());

        // A symbolic link in place of a companion is not removed.
        symlink(d.path(), db.join("state.db-shm")).unwrap();
        assert!(kine_stale_files(&db).is_empty());

        // Something odd in place of the database: no guessing.
        let odd = d.path().join("odd");
        fs::create_dir_all(odd.join("state.db")).unwrap();
        write(&odd.join("state.db-wal"), "x");
        assert!(kine_stale_files(&odd).is_empty());
        // No directory at all (first boot).
        assert!(kine_stale_files(&d.path().join("none")).is_empty());
    }
}
